"""Continual pretraining of a real pretrained Llama (SmolLM2-135M) with LayerSkip, against its
`layerskip=none` baseline, measured the paper's three ways. Run by `bash bench/smollm2_report.sh`.

Every stage is the command a user runs, as a subprocess:
1. `torchrun --nproc-per-node=2 -m train experiment=continual_smollm2_135m` with the recipe's CPU
   overrides (bench/smollm2.py's folder, the standard library's sources, 2 x 256 tokens a step),
   once as it is and once with `layerskip=none`: every exit's validation loss and top-1 agreement
   with the final layer before training (step 0) and after (LayerSkip also halfway, for the trend).
2. `python -m train.export` of both, float32.
3. `python -m train.eval_exits` of both trained models (--eval-before: also the imported one), on the word-order task
   (bench/word_order_task.py) built from held-out text: the prepared data's held-out split, which
   no run trains on.
4. `python -m train.decode` of both trained models on the same held-out text: perplexity of every
   exit, our self-speculative decoding and Hugging Face's `assistant_early_exit` (acceptance,
   speedup over greedy decoding, identity with greedy output).
Then one JSON, one PNG and one markdown summary into --results, including, from the measured
agreement trend, an estimate of the training budget after which self-speculative decoding would
pay off (bench/results/smollm2_report_cpu.*).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from smollm2 import smollm2_dir  # noqa: E402
from word_order_task import write_task  # noqa: E402

GPU_TARGET = 1.5  # the paper's speedups are 1.8-2.2x
ARMS = {"layerskip": [], "baseline": ["layerskip=none"]}
LABELS = {"before": "SmolLM2-135M as imported", "layerskip": "LayerSkip (continual_smollm2_135m)",
          "baseline": "baseline (layerskip=none)"}


def sh(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run `cmd` (output to the console and `log`); stop the report if it fails. Returns seconds."""
    print(f"\n[smollm2_report] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, cwd=ROOT)
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        if proc.wait():
            raise SystemExit(f"[smollm2_report] failed ({proc.returncode}): {' '.join(cmd)}; log {log}")
    return time.perf_counter() - t0


def heldout_text(cache_dir: Path, max_tokens: int) -> str:
    """The prepared data's held-out split (documents chosen when the data was prepared; no run
    trains on them), decoded with the data's own tokenizer."""
    from train.data.tokenizer import load_tokenizer
    (folder,) = [p.parent for p in cache_dir.glob("prepared-*/manifest.json")]
    manifest = json.loads((folder / "manifest.json").read_text())
    tokens = np.concatenate([np.fromfile(p, dtype=manifest["dtype"])
                             for p in sorted(folder.glob("shards/*.val.bin"))])[:max_tokens]
    tok = load_tokenizer(folder)
    special = {tok.bos_id, tok.eos_id}
    return tok.decode([int(t) for t in tokens if int(t) not in special])


def validations(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val/loss" in r:
            out[r["step"]] = {k: v for k, v in r.items() if k.startswith("val/")}
    return out


def by_exit(v: dict[str, float], key: str, L: int) -> list[float | None]:
    """The validation `key` of every exit; item E - 1 is exit E (blocks run, 1..L)."""
    return [v.get(f"val/{key}/exit_{e:02d}") for e in range(1, L + 1)]


# --------------------------------------------------------------------------- the estimate

def decode_cost(E: int, L: int, block: float, head: float, verify_factor: float) -> tuple[float, float]:
    """(draft step, verify pass) cost in units of one greedy step (L blocks + head), counting the
    weights each reads: a draft step E blocks and the head, the verify pass the other L - E blocks
    and the head once for all d + 1 tokens, times `verify_factor` (what d + 1 tokens cost against
    one: 1 where decoding is memory-bound, as on a GPU at batch 1; measured here on the CPU)."""
    full = L * block + head
    return (E * block + head) / full, verify_factor * ((L - E) * block + head) / full


def predicted_speedup(alpha: float, E: int, d: int, L: int, block: float, head: float,
                      verify_factor: float) -> float:
    """Tokens per round (d drafts, each accepted with probability alpha while all before it were,
    plus the verify pass's own token) over the round's cost."""
    draft, verify = decode_cost(E, L, block, head, verify_factor)
    tokens = (1 - alpha ** (d + 1)) / (1 - alpha) if alpha < 1 else d + 1
    return tokens / (d * draft + verify)


def break_even(E: int, L: int, block: float, head: float, verify_factor: float, target: float,
               drafts=(1, 2, 3, 4, 6, 8)) -> float:
    """The smallest acceptance at exit E for which some draft length gives a speedup > `target`."""
    for a in np.arange(0.0, 1.0001, 0.005):
        if any(predicted_speedup(float(a), E, d, L, block, head, verify_factor) > target for d in drafts):
            return float(a)
    return 1.0


def verify_factor(decode: dict, L: int, block: float, head: float) -> float:
    """decode_cost's verify_factor, fitted to our measured runs: each run's time is its draft steps at
    the greedy step's time scaled by weights read, plus its verify passes; the factor is what makes
    the verify passes' share fit (median over runs). Per-call overheads land in it too."""
    g = decode["speculative"]["greedy"]
    step = g["seconds"] / g["tokens"]
    factors = []
    for r in decode["speculative"]["runs"]:
        draft, verify = decode_cost(r["exit"], L, block, head, 1.0)
        rest = r["seconds"] - r["drafted"] * draft * step
        if r["verify_passes"] and rest > 0:
            factors.append(rest / (r["verify_passes"] * verify * step))
    return float(np.median(factors)) if factors else 1.0


def estimate(ls_vals: dict[int, dict], step_tokens: int, L: int, dim: int, vocab: int, ffn: int,
             kv_dim: int, exits: list[int], decode: dict) -> dict:
    """For each draft exit E: the acceptance needed for any speedup on this CPU (decode_cost with the
    measured verify_factor) and for the paper's kind of speedup, 1.5x, on a GPU (memory-bound, factor
    1: optimistic, per-call overheads ignored), the measured top-1 agreement at
    each validation (acceptance's proxy), and where a straight line in log(tokens) through the
    trained validations reaches each (None: not on this trend)."""
    block = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * ffn  # q, o; k, v; w1, w2, w3
    head = dim * vocab
    factor = verify_factor(decode, L, block, head)
    steps = sorted(s for s in ls_vals if s > 0)
    out = {"model": f"weights read per token: block {block / 1e6:.2f}M, head {head / 1e6:.2f}M parameters; "
                    f"verify pass of d + 1 tokens = {factor:.2f}x one token's on this CPU (fitted), 1x on a GPU; "
                    f"targets: any speedup on this CPU, {GPU_TARGET}x on a GPU",
           "verify_factor_cpu": factor, "exits": {}}
    for E in exits:
        agree = {s: ls_vals[s].get(f"val/agree/exit_{E:02d}") for s in sorted(ls_vals)}
        pts = [(math.log(s * step_tokens), agree[s]) for s in steps if agree[s] is not None]
        fit = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1) if len(pts) >= 2 else None
        row = {"agreement_by_step": agree}
        for where, f, target in (("cpu", factor, 1.0), ("gpu", 1.0, GPU_TARGET)):
            need = break_even(E, L, block, head, f, target)
            row[f"break_even_{where}"] = need
            tokens = None
            if pts and pts[-1][1] >= need:
                tokens = steps[-1] * step_tokens
            elif fit is not None and fit[0] > 0 and (need - fit[1]) / fit[0] < 46:  # e^46 = 1e20 tokens
                tokens = float(math.exp((need - fit[1]) / fit[0]))
            row[f"tokens_needed_{where}"] = tokens
        if fit is not None:
            row["slope_per_e_fold_tokens"] = float(fit[0])
        out["exits"][str(E)] = row
    return out


# --------------------------------------------------------------------------- the figure

def plot(summary: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = summary["n_layers"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (a_loss, a_agree), (a_acc, a_dec) = axes
    fig.suptitle(f"SmolLM2-135M, continual pretraining on this CPU: {summary['steps']} steps x "
                 f"{summary['step_tokens']} tokens ({summary['date']})")
    xs = list(range(1, L + 1))  # exits E
    for key, v in summary["validation"].items():
        style = {"before": ("black", ":"), "layerskip": ("C0", "-"), "baseline": ("C1", "--")}[key.split("@")[0]]
        a_loss.plot(xs, v["loss"], color=style[0], linestyle=style[1], marker=".", label=v["label"])
        a_agree.plot(xs[:-1], v["agree"][:-1], color=style[0], linestyle=style[1], marker=".", label=v["label"])
    a_loss.set(title="validation loss of every exit", xlabel="exit E (blocks run)", ylabel="cross-entropy (nats)")
    a_agree.set(title="top-1 agreement with the full model", xlabel="exit E (blocks run)", ylabel="share of tokens",
                ylim=(0, 1))
    for arm, r in summary["eval_exits"].items():
        es = sorted(r, key=int)
        acc = [r[e]["word_order"]["acc"] for e in es]
        err = [r[e]["word_order"].get("acc_stderr", 0) for e in es]
        a_acc.errorbar([int(e) for e in es], acc, yerr=err, marker="o", capsize=3, label=LABELS[arm])
    a_acc.axhline(0.5, color="grey", linewidth=0.8)
    a_acc.set(title="word-order accuracy by exit E (lm-eval, held-out text)", xlabel="exit E (blocks run)",
              ylabel="accuracy", ylim=(0.3, 1))
    width = 0.2
    runs = [(arm, r) for arm, d in summary["decode"].items() for r in d["speculative"]["runs"]]
    labels = sorted({(r["exit"], r["draft"]) for _, r in runs})
    for i, (arm, src, key) in enumerate([("layerskip", "speculative", "ours"), ("baseline", "speculative", "ours"),
                                         ("layerskip", "hf", "HF"), ("baseline", "hf", "HF")]):
        got = {(r["exit"], r["draft"]): r["speedup"] for r in summary["decode"][arm][src]["runs"]}
        a_dec.bar([j + (i - 1.5) * width for j in range(len(labels))], [got.get(k, 0) for k in labels], width,
                  label=f"{key}, {arm}")
    a_dec.axhline(1.0, color="grey", linewidth=0.8)
    a_dec.set(title="self-speculative speedup over greedy decoding (CPU, batch 1)",
              xticks=range(len(labels)), xticklabels=[f"E={e}\nd={d}" for e, d in labels], ylabel="speedup")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(summary: dict) -> str:
    L = summary["n_layers"]
    shown = [1, 6, 11, 15, 19, 22, 25, 27, 29, L]  # exits E (blocks run)
    lines = [f"| validation ({summary['validation_tokens']} held-out tokens) | "
             + " | ".join(f"exit {e}" if e < L else f"full ({e})" for e in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for key, v in summary["validation"].items():
        lines.append(f"| {v['label']}: loss | " + " | ".join(f"{v['loss'][e - 1]:.2f}" for e in shown) + " |")
    for key, v in summary["validation"].items():
        lines.append(f"| {v['label']}: agreement | "
                     + " | ".join("1" if e == L else f"{v['agree'][e - 1]:.2f}" for e in shown) + " |")
    es = sorted(next(iter(summary["eval_exits"].values())), key=int)
    lines += ["", "| word-order accuracy, exit E | " + " | ".join(es) + " |", "|---|" + "---|" * len(es)]
    for arm, r in summary["eval_exits"].items():
        lines.append(f"| {LABELS[arm]} | " + " | ".join(
            f"{r[e]['word_order']['acc']:.3f} ± {r[e]['word_order'].get('acc_stderr', 0):.3f}" for e in es) + " |")
    lines += ["", "| decoding (E, d) | LayerSkip: accept / speedup, identical | baseline: accept / speedup, "
              "identical | HF assistant_early_exit speedup, LayerSkip / baseline (identical) |", "|---|---|---|---|"]
    dec = summary["decode"]
    for i, r in enumerate(dec["layerskip"]["speculative"]["runs"]):
        b = dec["baseline"]["speculative"]["runs"][i]
        h1, h2 = dec["layerskip"]["hf"]["runs"][i], dec["baseline"]["hf"]["runs"][i]
        lines.append(f"| E={r['exit']}, d={r['draft']} | {r['acceptance_rate']:.2f} / {r['speedup']:.2f}×, "
                     f"{r['identical']} | {b['acceptance_rate']:.2f} / {b['speedup']:.2f}×, {b['identical']} | "
                     f"{h1['speedup']:.2f}× / {h2['speedup']:.2f}× ({h1['identical'] and h2['identical']}) |")
    for arm in ("layerskip", "baseline"):
        g, hg = dec[arm]["speculative"]["greedy"], dec[arm]["hf"]["greedy"]
        lines.append(f"\n{arm}: greedy {g['tokens_per_s']:.1f} tokens/s (ours), {hg['tokens_per_s']:.1f} (HF), "
                     f"HF greedy identical to ours: {hg['identical_to_ours']}")
    est = summary["estimate"]
    lines += ["", f"Estimate ({est['model']}):", "",
              f"| draft exit E | agreement by step | acceptance needed: CPU > 1x / GPU {GPU_TARGET}x | tokens "
              "until then on the trend: CPU / GPU |", "|---|---|---|---|"]
    show = lambda t: "not on this trend" if t is None else f"{t:.3g}"  # noqa: E731
    for E, row in est["exits"].items():
        by_step = ", ".join(f"{s}: {a:.2f}" for s, a in row["agreement_by_step"].items() if a is not None)
        lines.append(f"| {E} | {by_step} | {row['break_even_cpu']:.2f} / {row['break_even_gpu']:.2f} | "
                     f"{show(row['tokens_needed_cpu'])} / {show(row['tokens_needed_gpu'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=f"outputs/smollm2-report-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--results", default="bench/results", help="where the JSON, PNG and markdown go")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per rank per step (2 ranks)")
    ap.add_argument("--eval-batches", type=int, default=1, help="validation batches per rank")
    ap.add_argument("--items", type=int, default=40, help="word-order task items")
    ap.add_argument("--exits", default="15,22,30", help="eval_exits exits")
    ap.add_argument("--eval-before", action="store_true", help="also eval_exits the imported model")
    ap.add_argument("--draft-exits", default="22,26", help="decode draft exits E")
    ap.add_argument("--drafts", default="2")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--name", default="smollm2_report_cpu")
    args = ap.parse_args()
    out, results = (ROOT / args.out).resolve(), (ROOT / args.results).resolve()
    for arm in ARMS:
        if (out / arm).exists():
            raise SystemExit(f"[smollm2_report] {out / arm} exists; give another --out")
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    started, seconds = time.perf_counter(), {}
    model = smollm2_dir()
    cache = out / "cache"
    common = ["experiment=continual_smollm2_135m", f"model.init_from={model}", "data=stdlib",
              f"data.seq_len={args.seq_len}", "data.batch_size=1", "parallel=default",
              f"train.steps={args.steps}", "optim.lr=1e-4", "optim.warmup_steps=5",
              f"eval.batches={args.eval_batches}", "checkpoint.interval=0", "logging.every=5",
              f"data.cache_dir={cache}"]
    # The trend needs LayerSkip's validations along the way; the baseline's step 0 is the same model
    # on the same windows as LayerSkip's step 0, so it validates only at the end.
    every = {"layerskip": f"eval.every={max(1, args.steps // 2)}", "baseline": "eval.every=0"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train"]
    for arm, extra in ARMS.items():
        seconds[f"train_{arm}"] = sh([*torchrun, *common, every[arm], *extra, f"run_dir={out / arm}"],
                                     out / f"train_{arm}.log", {"OMP_NUM_THREADS": "1"})
        seconds[f"export_{arm}"] = sh([sys.executable, "-m", "train.export", "--run", str(out / arm), "--out",
                                       str(out / arm / "hf"), "--dtype", "float32"], out / f"export_{arm}.log")
    text = heldout_text(cache, max_tokens=60_000)
    (out / "heldout.txt").write_text(text, encoding="utf-8")
    tasks = write_task(text, out / "tasks", n_items=args.items)
    evals = {}
    for arm in ("before", *ARMS) if args.eval_before else ARMS:
        path = str(model) if arm == "before" else str(out / arm / "hf")
        seconds[f"eval_exits_{arm}"] = sh(
            [sys.executable, "-m", "train.eval_exits", "--model", path, "--exits", args.exits, "--tasks",
             "word_order", "--include-path", str(tasks), "--json", str(out / f"eval_exits_{arm}.json")],
            out / f"eval_exits_{arm}.log", {"OMP_NUM_THREADS": "2", "HF_DATASETS_OFFLINE": "1"})
        evals[arm] = json.loads((out / f"eval_exits_{arm}.json").read_text())["results"]
    decodes = {}
    for arm in ARMS:
        seconds[f"decode_{arm}"] = sh(
            [sys.executable, "-m", "train.decode", "--model", str(out / arm / "hf"), "--text", str(out / "heldout.txt"),
             "--exits", args.draft_exits, "--draft", args.drafts, "--prompts", str(args.prompts),
             "--max-new-tokens", str(args.new_tokens), "--max-tokens", "512", "--seq-len", "256",
             "--json", str(out / f"decode_{arm}.json")], out / f"decode_{arm}.log", {"OMP_NUM_THREADS": "2"})
        decodes[arm] = json.loads((out / f"decode_{arm}.json").read_text())
        for part in ("speculative", "hf"):  # the token lists are long and in the run folder
            decodes[arm][part].get("greedy", {}).pop("outputs", None)
            for r in decodes[arm][part]["runs"]:
                r.pop("outputs", None)

    cfg = json.loads((model / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    ls_vals, base_vals = validations(out / "layerskip"), validations(out / "baseline")
    val = {"before": {"label": "before (step 0)", "loss": by_exit(ls_vals[0], "loss", L),
                      "agree": by_exit(ls_vals[0], "agree", L)}}
    for arm, vals in (("layerskip", ls_vals), ("baseline", base_vals)):
        last = max(vals)
        val[arm] = {"label": f"{LABELS[arm]}, step {last}", "loss": by_exit(vals[last], "loss", L),
                    "agree": by_exit(vals[last], "agree", L)}
    step_tokens = 2 * args.seq_len
    draft_exits = [int(e) for e in args.draft_exits.split(",")] + [E for E in (8, 20, 28)]
    summary = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{platform.node()}: {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}", "loadavg_end": open("/proc/loadavg").read().split()[:3],
        "command": "bash bench/smollm2_report.sh " + " ".join(sys.argv[1:]), "model": str(model), "n_layers": L,
        "steps": args.steps, "step_tokens": step_tokens, "validation_tokens": 2 * args.eval_batches * args.seq_len,
        "overrides": common, "validation": val,
        "validation_by_step": {"layerskip": ls_vals, "baseline": base_vals},
        "eval_exits": evals, "decode": decodes, "seconds": seconds,
        "estimate": estimate(ls_vals, step_tokens, L, cfg["hidden_size"], cfg["vocab_size"],
                             cfg["intermediate_size"], cfg["hidden_size"] * cfg["num_key_value_heads"]
                             // cfg["num_attention_heads"], sorted(set(draft_exits)), decodes["layerskip"]),
    }
    summary["seconds"]["total"] = time.perf_counter() - started
    (results / f"{args.name}.json").write_text(json.dumps(summary, indent=2))
    plot(summary, results / f"{args.name}.png")
    table = markdown(summary)
    (results / f"{args.name}.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\n[smollm2_report] {summary['seconds']['total']:.0f} s; {results / args.name}.json, .png, .md")


if __name__ == "__main__":
    main()
