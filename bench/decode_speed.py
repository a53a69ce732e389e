"""Self-speculative decoding as it is served: speed over plain decoding, greedy and sampled, at
batch 1 and batch 8, beside Hugging Face's two ways of doing it.

    python bench/decode_speed.py --model RUN_DIR|HF_DIR --exit E --draft d \
        [--batch-sizes 1,8] [--prompts 8] [--prompt-tokens 32] [--max-new-tokens 64] \
        [--temperature 0.8 --top-p 0.95 --seed 0] [--device cpu|cuda] [--dtype float32|bfloat16] \
        [--out bench/results/decode_speed_quickstart_cpu.json]
    python bench/decode_speed.py --random tiny ...   # random weights of recipes/model/tiny.yaml's
                                                     # shape: engine speed only (acceptance is meaningless)

For each mode (greedy; sampled with --temperature/--top-k/--top-p) and batch size B, on the same
prompts cut from the held-out text (EOS ignored, so every prompt gets --max-new-tokens):
  ours      plain decoding and self-speculative decoding (exit E, d drafts a round) with the KV-cache
            engine of train/inference.py, B prompts at a time: tokens/s, speedup, acceptance, and
            (greedy) whether every output equals plain greedy decoding;
  hf        transformers' plain `generate` (B prompts at a time), `generate(assistant_early_exit=E)`
            and `generate(assistant_model=DRAFT)` with the draft folder of
            `python -m train.export --draft-exit E`; transformers' assisted generation takes one
            prompt at a time, so at B > 1 it decodes the B prompts one after the other (its speedup
            is then over transformers' batched plain decoding, what a server would otherwise run).
The JSON holds the date, device, command, commit and every figure; a table goes to stdout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.decode import (_prompts, add_sampling_args, decode_batched, hf_generate, hf_model,  # noqa: E402
                          resolve_model, sampling_from_args, set_early_exit_drafts)
from train.inference import Sampling, generate, self_speculative_generate  # noqa: E402


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} torch threads"


def random_export(shape: str, out: Path) -> Path:
    """A Hugging Face folder of random weights in the shape of recipes/model/SHAPE.yaml, with
    blocks that change the prediction (at the trainer's init every exit predicts alike)."""
    from omegaconf import OmegaConf

    from train.config import ModelConfig
    from train.hf import export_hf
    from train.model import build_model, init_model
    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "recipes" / "model" / f"{shape}.yaml"))
    cfg = ModelConfig(**fields)
    model = init_model(build_model(cfg), "cpu", 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "tok_embeddings" not in name:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    return export_hf(model.state_dict(), cfg, out, None, torch.float32)


def ours(model, prompts, batch_size, max_new, E, d, sampling: Sampling) -> dict:
    plain = lambda b: generate(model, b, max_new, None, sampling)  # noqa: E731
    spec = lambda b: self_speculative_generate(model, b, max_new, E, d, None, sampling)  # noqa: E731
    decode_batched(plain, prompts[:batch_size], batch_size)  # warm-up
    decode_batched(spec, prompts[:batch_size], batch_size)
    base, base_s = decode_batched(plain, prompts, batch_size)
    runs, spec_s = decode_batched(spec, prompts, batch_size)
    tokens = sum(len(r.tokens) for r in runs)
    return {"plain_tokens_per_s": sum(len(g.tokens) for g in base) / base_s,
            "spec_tokens_per_s": tokens / spec_s,
            "speedup": (tokens / spec_s) / (sum(len(g.tokens) for g in base) / base_s),
            "acceptance_rate": sum(r.accepted for r in runs) / max(1, sum(r.drafted for r in runs)),
            "identical_to_plain": [r.tokens for r in runs] == [g.tokens for g in base] if sampling.greedy else None,
            "outputs": [g.tokens for g in base]}


def hf(model, draft, prompts, batch_size, max_new, E, d, sampling: Sampling, our_outputs,
       assisted_cache: dict) -> dict:
    from train.decode import hf_sampling_kwargs

    def plain_batch(batch):
        ids = torch.tensor(batch, device=model.device)  # prompts of equal length: no padding
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 **hf_sampling_kwargs(sampling))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].tolist(), time.perf_counter() - t0

    plain_batch(prompts[:batch_size])  # warm-up
    outs, secs = [], 0.0
    for i in range(0, len(prompts), batch_size):
        o, s = plain_batch(prompts[i:i + batch_size])
        outs += o
        secs += s
    plain_tps = sum(len(o) for o in outs) / secs
    result = {"plain_tokens_per_s": plain_tps,
              "plain_identical_to_ours": outs == our_outputs if sampling.greedy else None}
    set_early_exit_drafts(model, d)
    for name, kw in (("early_exit", {"assistant_early_exit": E}), ("draft_model", {"assistant_model": draft})):
        if name not in assisted_cache:  # batch 1 only: the same run serves every batch size
            hf_generate(model, prompts[0], max_new, sampling, **kw)  # warm-up
            assisted_cache[name] = [hf_generate(model, p, max_new, sampling, **kw) for p in prompts]
        runs = assisted_cache[name]
        tps = sum(len(o) for o, _ in runs) / sum(s for _, s in runs)
        result[name] = {"tokens_per_s": tps, "speedup": tps / plain_tps,
                        "identical_to_plain": [o for o, _ in runs] == outs if sampling.greedy else None}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="run directory, Hugging Face export or Hub id")
    src.add_argument("--random", metavar="SHAPE", help="random weights of recipes/model/SHAPE.yaml")
    ap.add_argument("--text", help="held-out text for the prompts (default: the export's heldout.txt)")
    ap.add_argument("--exit", type=int, required=True, help="draft depth E (blocks)")
    ap.add_argument("--draft", type=int, required=True, help="drafts per round d")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    add_sampling_args(ap)
    ap.set_defaults(temperature=0.8, top_p=0.95)
    ap.add_argument("--no-hf", action="store_true", help="ours only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    sampling = sampling_from_args(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.prompts % max(batch_sizes):
        raise SystemExit(f"--prompts {args.prompts} must be a multiple of every batch size {batch_sizes}")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="decode_speed-") as tmp:
        if args.random:
            import contextlib
            source = contextlib.nullcontext(random_export(args.random, Path(tmp) / "hf"))
        else:
            source = resolve_model(args.model)
        with source as hf_dir:
            return _run(args, Path(hf_dir), Path(tmp), sampling, batch_sizes, dtype)


def _run(args, hf_dir: Path, tmp: Path, sampling: Sampling, batch_sizes: list[int], dtype) -> dict:
    from train.hf import export_draft_from_hf, load_hf_model
    model, cfg = load_hf_model(hf_dir, args.device, dtype)
    if not 1 <= args.exit < cfg.n_layers:
        raise SystemExit(f"--exit must be in [1, {cfg.n_layers - 1}], got {args.exit}")
    if args.random:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (args.prompts * args.prompt_tokens * 2,), generator=g).tolist()
    else:
        from train.data.tokenizer import load_tokenizer
        text = Path(args.text) if args.text else hf_dir / "heldout.txt"
        if not text.is_file():
            raise SystemExit(f"no held-out text: {text} does not exist; pass --text FILE")
        ids = load_tokenizer(hf_dir).encode(text.read_text(encoding="utf-8"))
    prompts = _prompts(ids, args.prompts, args.prompt_tokens)
    draft_dir = export_draft_from_hf(hf_dir, tmp / "draft", args.exit) if not args.no_hf else None
    hf_full = hf_draft = None
    if draft_dir is not None:
        from transformers import LlamaForCausalLM
        hf_full = hf_model(hf_dir, args.device, dtype, None)
        hf_draft = LlamaForCausalLM.from_pretrained(str(draft_dir), dtype=dtype).to(args.device).eval()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": _device_name(args.device), "dtype": args.dtype,
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "commit": _commit(), "torch": torch.__version__, "model": args.model or f"random {args.random}",
              "n_layers": cfg.n_layers, "exit": args.exit, "draft": args.draft, "prompts": args.prompts,
              "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens, "results": []}
    if hf_full is not None:
        import transformers
        report["transformers"] = transformers.__version__
    for mode, s in (("greedy", Sampling()), ("sampled", sampling)):
        assisted: dict = {}  # transformers' assisted runs of this mode (batch 1), reused for every B
        for B in batch_sizes:
            row = {"mode": mode, "batch_size": B,
                   "sampling": None if s.greedy else {"temperature": s.temperature, "top_k": s.top_k,
                                                      "top_p": s.top_p, "seed": s.seed}}
            row["ours"] = ours(model, prompts, B, args.max_new_tokens, args.exit, args.draft, s)
            if hf_full is not None:
                row["hf"] = hf(hf_full, hf_draft, prompts, B, args.max_new_tokens, args.exit, args.draft, s,
                               row["ours"]["outputs"], assisted)
                for name in ("early_exit", "draft_model"):
                    row["hf"][name]["ours_spec_over_it"] = row["ours"]["spec_tokens_per_s"] / row["hf"][name]["tokens_per_s"]
            row["ours"].pop("outputs")
            report["results"].append(row)
            o = row["ours"]
            line = (f"{mode:>7} B={B}: ours plain {o['plain_tokens_per_s']:8.1f} tok/s, spec "
                    f"{o['spec_tokens_per_s']:8.1f} ({o['speedup']:.2f}x, accept {o['acceptance_rate']:.2f}, "
                    f"identical {o['identical_to_plain']})")
            if "hf" in row:
                h = row["hf"]
                line += (f" | HF plain {h['plain_tokens_per_s']:8.1f}, early exit {h['early_exit']['tokens_per_s']:8.1f} "
                         f"({h['early_exit']['speedup']:.2f}x), draft model {h['draft_model']['tokens_per_s']:8.1f} "
                         f"({h['draft_model']['speedup']:.2f}x)")
            print(line, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text(json.dumps(report, indent=2))
        tmp_out.replace(out)
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
