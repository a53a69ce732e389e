"""Evaluate a trained model's early exits and self-speculative decoding.

    python -m train.decode --model RUN_DIR|HF_DIR [--text FILE] [--json FILE] [--plot FILE.png]
        [--exits 2,4,6] [--draft 2,4,8] [--max-new-tokens 64] [--prompts N] [--max-tokens N]
        [--batch-size B] [--temperature T --top-k K --top-p P --seed S] [--device cuda --dtype bfloat16]

--model is a Hugging Face export (config.json + safetensors + the run's tokenizer: tokenizer.model
or tokenizer.json), a Hugging Face Hub id (org/name[@revision], train/hub.py), or a run directory:
its newest complete checkpoint (or --step N) is exported to a temporary folder first, as
`python -m train.eval_exits` does (a run directory without checkpoints uses RUN_DIR/hf). The
held-out text is --text, else the export's heldout.txt (the trainer's held-out documents).

Decoding is greedy unless --temperature > 0 (then sampled, with --top-k/--top-p, seeded by
--seed; self-speculative sampling keeps the full model's distribution exactly, so its outputs are
compared by speed and acceptance, not token for token). --batch-size B decodes B prompts at once.

Reports (table on stdout, --json, --plot):
1. Perplexity of every exit E = 1..L (E blocks, then the shared norm + head) on the held-out text
   (--max-tokens of it; 0 skips this).
2. Self-speculative decoding for every (E, d) in --exits x --draft on --prompts prompts cut from the
   held-out text: acceptance rate, tokens/s, speedup over ordinary greedy decoding measured in the
   same process on the same prompts (plain decoding, greedy or sampled as asked, same batch size),
   and, greedy, whether the outputs are identical (they must be; in bfloat16 rare near-ties may
   differ). --prompts 0 skips this.
3. Hugging Face's own self-speculative decoding, `generate(..., assistant_early_exit=E)` with d
   draft tokens per round, on the same prompts (needs the `hf` extra; --no-hf skips it): its
   tokens/s beside ours, and, greedy, whether its outputs equal its own `generate` (and ours).
   Hugging Face's assisted generation decodes one prompt at a time, so it runs at batch 1.
The plot (drawn by train/report.py) has a panel per part: perplexity by E, acceptance
rate and speedup over (E, d) as annotated heatmaps, and tokens/s of ours beside Hugging Face's.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from train.data.sources import DataError
from train.data.tokenizer import load_tokenizer
from train.hf import load_hf_model
from train.inference import Generation, Sampling, generate, self_speculative_generate
from train.model import LayerSkipLlama


@contextlib.contextmanager
def resolve_model(path: str, step: int | None = None) -> Iterator[Path]:
    """The Hugging Face folder for --model (`train.eval_exits.resolve_model`): a folder or Hub id
    as it is; a run directory's checkpoint exported to a temporary folder that lives as long as
    the context."""
    from train.eval_exits import resolve_model as resolve
    stack = contextlib.ExitStack()
    try:
        hf_dir, _ = stack.enter_context(resolve(path, step))
    except SystemExit as e:
        raise SystemExit(f"{e}; an export is written by: python -m train.export --run RUN_DIR --out HF_DIR") from None
    with stack:
        yield Path(hf_dir)


def _ints(spec: str, name: str) -> list[int]:
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{name}: {spec!r} is not a comma-separated list of integers") from None


@torch.no_grad()
def exit_perplexities(model: LayerSkipLlama, ids: list[int], seq_len: int, max_tokens: int,
                      chunk_tokens: int = 2048) -> dict:
    """Cross-entropy and perplexity of every exit on non-overlapping windows of `ids` (at most
    `max_tokens` predicted tokens, at least one window). Logits are computed one layer and
    `chunk_tokens` at a time, so memory stays at chunk_tokens x vocabulary."""
    L, device = model.n_layers, model.freqs_cis.device
    n_windows = min((len(ids) - 1) // seq_len, max(1, max_tokens // seq_len))
    if n_windows < 1:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    data = torch.tensor(ids[:n_windows * seq_len + 1], device=device)
    totals = torch.zeros(L, dtype=torch.float64)
    per_batch = max(1, chunk_tokens // seq_len)
    for start in range(0, n_windows, per_batch):
        idx = torch.arange(start, min(start + per_batch, n_windows), device=device)
        pos = idx[:, None] * seq_len + torch.arange(seq_len + 1, device=device)
        x, y = data[pos[:, :-1]], data[pos[:, 1:]]
        _, hidden = model(x, capture=range(L))
        for l in range(L):
            h, t = hidden[l].flatten(0, 1), y.flatten()
            for c in range(0, h.shape[0], chunk_tokens):
                logits = model.unembed(h[c:c + chunk_tokens]).float()
                totals[l] += F.cross_entropy(logits, t[c:c + chunk_tokens], reduction="sum").item()
    n = n_windows * seq_len
    rows = [{"exit": l + 1, "loss": totals[l].item() / n,
             "perplexity": math.exp(min(totals[l].item() / n, 700.0))} for l in range(L)]
    return {"tokens": n, "seq_len": seq_len, "layers": rows}


def decode_batched(fn, prompts: list[list[int]], batch_size: int) -> tuple[list[Generation], float]:
    """`fn(batch of prompts)` over `prompts` in batches: every prompt's Generation and the seconds
    all batches took."""
    out, seconds = [], 0.0
    for i in range(0, len(prompts), batch_size):
        runs = fn(prompts[i:i + batch_size])
        out += runs
        seconds += runs[0].wall_s  # a batch's rows share its wall time
    return out, seconds


def speculative_sweep(model: LayerSkipLlama, prompts: list[list[int]], exits: list[int], drafts: list[int],
                      max_new_tokens: int, eos_id: int | None, sampling: Sampling | None = None,
                      batch_size: int = 1) -> dict:
    """Plain decoding (greedy or sampled) and self-speculative decoding for every (E, d), on the
    same prompts, `batch_size` prompts at a time. Greedy runs are compared token for token."""
    sampling = sampling or Sampling()
    plain = lambda batch: generate(model, batch, max_new_tokens, eos_id, sampling)  # noqa: E731
    spec = lambda E, d: lambda batch: self_speculative_generate(  # noqa: E731
        model, batch, max_new_tokens, E, d, eos_id, sampling)
    # Warm-up (allocator, kernels) so the first timed configuration is not penalised.
    decode_batched(plain, prompts[:batch_size], batch_size)
    decode_batched(spec(exits[0], drafts[0]), prompts[:batch_size], batch_size)
    base, base_s = decode_batched(plain, prompts, batch_size)
    base_tokens = sum(len(g.tokens) for g in base)
    baseline = {"tokens": base_tokens, "seconds": base_s, "tokens_per_s": base_tokens / base_s,
                "outputs": [g.tokens for g in base]}
    result = {("greedy" if sampling.greedy else "sampled"): baseline, "batch_size": batch_size, "runs": []}
    for E in exits:
        for d in drafts:
            runs, secs = decode_batched(spec(E, d), prompts, batch_size)
            tokens = sum(len(r.tokens) for r in runs)
            drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
            mismatched = sum(r.tokens != g.tokens for r, g in zip(runs, base)) if sampling.greedy else None
            tps = tokens / secs
            result["runs"].append({
                "exit": E, "draft": d, "acceptance_rate": accepted / drafted if drafted else 0.0,
                "drafted": drafted, "accepted": accepted, "verify_passes": sum(r.verify_passes for r in runs),
                "tokens": tokens, "seconds": secs, "tokens_per_s": tps,
                "speedup": tps / baseline["tokens_per_s"],
                "identical": None if mismatched is None else mismatched == 0, "mismatched_prompts": mismatched})
    return result


def hf_sampling_kwargs(sampling: Sampling) -> dict:
    """`generate()` arguments for the same decoding in transformers."""
    if sampling.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,  # 0: off
            "top_p": sampling.top_p}


def hf_model(hf_dir: Path, device: str, dtype: torch.dtype, eos_id: int | None):
    """A transformers LlamaForCausalLM of `hf_dir` set to stop at `eos_id` (None: never)."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device=device).eval()
    config = model.generation_config
    config.eos_token_id = eos_id  # None: never stop early, as --ignore-eos
    config.pad_token_id = eos_id if eos_id is not None else 0
    return model


def hf_generate(model, prompt: list[int], max_new_tokens: int, sampling: Sampling, **kw) -> tuple[list[int], float]:
    """One prompt through `model.generate` (Hugging Face's assisted generation is batch 1 only)."""
    ids = torch.tensor([prompt], device=model.device)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             **hf_sampling_kwargs(sampling), **kw)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0


def set_early_exit_drafts(model, d: int) -> None:
    """d draft tokens a round for `assistant_early_exit` / `assistant_model`: transformers reads
    these from the model's own generation config, not from generate()'s arguments (4.47-5.x)."""
    config = model.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = d, "constant"
    config.assistant_confidence_threshold = 0.0  # 0: no early stop of a draft


def hf_assisted_sweep(hf_dir: Path, prompts: list[list[int]], pairs: list[tuple[int, int]],
                      max_new_tokens: int, eos_id: int | None, ours: list[list[int]], device: str,
                      dtype: torch.dtype, sampling: Sampling | None = None) -> dict:
    """Hugging Face's `generate(..., assistant_early_exit=E)` (its LayerSkip candidate generator:
    the first E layers of the same model draft, the whole model verifies) for every (E, d) in
    `pairs`, d draft tokens per round (constant schedule, no confidence cut-off, as ours), and its
    plain `generate`, on the same prompts, one at a time. `ours`: our plain outputs, to compare
    with (greedy). `model_calls` counts the forward calls of the model (each draft step and each
    verify pass)."""
    sampling = sampling or Sampling()
    model = hf_model(hf_dir, device, dtype, eos_id)
    calls: list[int] = []
    model.model.register_forward_hook(lambda *_: calls.append(1))

    def timed(outputs: list[tuple[list[int], float]]) -> tuple[int, float]:
        return sum(len(o) for o, _ in outputs), sum(s for _, s in outputs)

    hf_generate(model, prompts[0], max_new_tokens, sampling)  # warm-up
    plain = [hf_generate(model, p, max_new_tokens, sampling) for p in prompts]
    tokens, secs = timed(plain)
    same = [o for o, _ in plain] == ours if sampling.greedy else None
    result = {("greedy" if sampling.greedy else "sampled"): {
        "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "identical_to_ours": same},
        "runs": []}
    for E, d in pairs:
        set_early_exit_drafts(model, d)
        calls.clear()
        runs = [hf_generate(model, p, max_new_tokens, sampling, assistant_early_exit=E) for p in prompts]
        tokens, secs = timed(runs)
        base = result["greedy" if sampling.greedy else "sampled"]
        result["runs"].append({
            "exit": E, "draft": d, "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "speedup": tokens / secs / base["tokens_per_s"], "model_calls": len(calls),
            "identical": [o for o, _ in runs] == [o for o, _ in plain] if sampling.greedy else None})
    return result


def _prompts(ids: list[int], n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens at evenly spaced offsets of the held-out text."""
    if len(ids) < length:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than --prompt-tokens {length}")
    span = len(ids) - length
    offsets = [0] if n == 1 else [i * span // (n - 1) for i in range(n)]
    return [ids[o:o + length] for o in offsets]


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    try:
        return Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise SystemExit(f"--{str(e).split()[0].replace('_', '-')}: {e}") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m train.decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF export folder, Hub id or run directory")
    ap.add_argument("--step", type=int, help="checkpoint step of a run directory (default: newest complete)")
    ap.add_argument("--text", help="held-out text file (default: the export's heldout.txt)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--exits", help="draft depths E for speculative decoding (default: L/4, L/2, 3L/4)")
    ap.add_argument("--draft", default="2,4,8", help="draft lengths d (default: 2,4,8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the speculative sweep (0: skip)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (ours)")
    add_sampling_args(ap)
    ap.add_argument("--max-tokens", type=int, default=16384, help="tokens for perplexity (0: skip)")
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window (capped at the context)")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    ap.add_argument("--no-hf", action="store_true",
                    help="skip Hugging Face's generate(assistant_early_exit=E) comparison")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)
    sampling = sampling_from_args(args)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    with resolve_model(args.model, args.step) as hf_dir:
        return _run(args, hf_dir, sampling)


def _run(args: argparse.Namespace, hf_dir: Path, sampling: Sampling) -> dict:
    text_path = Path(args.text) if args.text else hf_dir / "heldout.txt"
    if not text_path.is_file():
        raise SystemExit(f"no held-out text: {text_path} does not exist (the run wrote no heldout.txt); "
                         "pass --text FILE")
    try:  # the tokenizer the run trained with, whichever kind (export writes it)
        tok = load_tokenizer(hf_dir)
    except DataError as e:
        raise SystemExit(f"{hf_dir}: no tokenizer to tokenize the text with: {e}") from None
    model, cfg = load_hf_model(hf_dir, args.device, getattr(torch, args.dtype))
    L = cfg.n_layers
    exits = _ints(args.exits, "--exits") if args.exits else sorted({max(1, L * k // 4) for k in (1, 2, 3)} - {L})
    drafts = _ints(args.draft, "--draft")
    bad = [e for e in exits if not 1 <= e < L] + [d for d in drafts if d < 1]
    if bad or not exits or not drafts:
        raise SystemExit(f"--exits must be in [1, {L - 1}] and --draft >= 1 (got {exits}, {drafts})")
    ids = tok.encode(text_path.read_text(encoding="utf-8"))
    eos = None if args.ignore_eos else tok.eos_id
    report: dict = {"model": args.model, "n_layers": L, "device": args.device, "dtype": args.dtype,
                    "text": args.text or "heldout.txt of the export", "text_tokens": len(ids),
                    "sampling": dataclasses.asdict(sampling), "batch_size": args.batch_size}

    if args.max_tokens > 0:
        seq_len = min(args.seq_len, cfg.max_seq_len)
        ppl = report["perplexity"] = exit_perplexities(model, [tok.bos_id] + ids, seq_len, args.max_tokens)
        rows = ppl["layers"]
        print(f"\nEarly-exit perplexity on {text_path} ({ppl['tokens']} tokens, windows of {seq_len})")
        print(f"{'exit E':>6} {'loss':>8} {'perplexity':>12}")
        for r in rows:
            print(f"{r['exit']:>6} {r['loss']:>8.4f} {r['perplexity']:>12.2f}")

    if args.prompts > 0:
        prompts = _prompts(ids, args.prompts, args.prompt_tokens)
        spec = speculative_sweep(model, prompts, exits, drafts, args.max_new_tokens, eos, sampling, args.batch_size)
        spec.update(prompts=len(prompts), prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens)
        report["speculative"] = spec
        mode = "greedy" if sampling.greedy else "sampled"
        g = spec[mode]
        print(f"\nSelf-speculative decoding, {len(prompts)} prompts x {args.max_new_tokens} new tokens, batch "
              f"{args.batch_size}, {mode}; plain decoding {g['tokens_per_s']:.1f} tokens/s")
        print(f"{'E':>3} {'d':>3} {'accept':>7} {'tok/s':>9} {'speedup':>8} {'identical':>9}")
        for r in spec["runs"]:
            print(f"{r['exit']:>3} {r['draft']:>3} {r['acceptance_rate']:>7.3f} {r['tokens_per_s']:>9.1f} "
                  f"{r['speedup']:>7.2f}x {str(r['identical']):>9}")
        if sampling.greedy and not all(r["identical"] for r in spec["runs"]):
            print("WARNING: some speculative outputs differ from greedy decoding", file=sys.stderr)

        if not args.no_hf:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("\n(Hugging Face comparison skipped: transformers is not installed; "
                      "pip install 'layerskip-titan[hf]')")
            else:
                hf = report["hf"] = hf_assisted_sweep(
                    hf_dir, prompts, [(r["exit"], r["draft"]) for r in spec["runs"]], args.max_new_tokens,
                    eos, g["outputs"], args.device, getattr(torch, args.dtype), sampling)
                ours = {(r["exit"], r["draft"]): r for r in spec["runs"]}
                print(f"\nHugging Face generate(assistant_early_exit=E), same prompts one at a time; HF plain "
                      f"{hf[mode]['tokens_per_s']:.1f} tokens/s (ours {g['tokens_per_s']:.1f}), "
                      f"HF greedy output identical to ours: {hf[mode]['identical_to_ours']}")
                print(f"{'E':>3} {'d':>3} {'HF tok/s':>9} {'HF speedup':>10} {'ours tok/s':>10} "
                      f"{'ours/HF':>8} {'identical':>9}")
                for r in hf["runs"]:
                    o = ours[(r["exit"], r["draft"])]
                    r["ours_over_hf"] = o["tokens_per_s"] / r["tokens_per_s"]
                    print(f"{r['exit']:>3} {r['draft']:>3} {r['tokens_per_s']:>9.1f} {r['speedup']:>9.2f}x "
                          f"{o['tokens_per_s']:>10.1f} {r['ours_over_hf']:>7.2f}x {str(r['identical']):>9}")

    if args.plot:
        from train.report import plot_decode
        plot_decode(report, args.plot)
        report["plot"] = args.plot
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
