"""Evaluate a trained model's early exits and self-speculative decoding.

    python -m train.decode --model RUN_DIR|HF_DIR [--text FILE] [--json FILE] [--plot FILE.png]
        [--exits 2,4,6] [--draft 2,4,8] [--max-new-tokens 64] [--prompts N] [--max-tokens N]

--model is a Hugging Face export (config.json + safetensors + the run's tokenizer: tokenizer.model
or tokenizer.json), a Hugging Face Hub id (org/name[@revision], train/hub.py), or a run directory
holding an export at RUN_DIR/hf/ (`python -m train.export --run RUN_DIR --out RUN_DIR/hf` writes
it; training runs export there when they finish). The held-out text is --text, else
HF_DIR/heldout.txt.

Reports (table on stdout, --json, --plot):
1. Perplexity of every exit E = 1..L (E blocks, then the shared norm + head) on the held-out text
   (--max-tokens of it; 0 skips this).
2. Self-speculative decoding for every (E, d) in --exits x --draft on --prompts prompts cut from the
   held-out text: acceptance rate, tokens/s, speedup over ordinary greedy decoding measured in the
   same process on the same prompts, and whether the outputs are identical (they must be; in
   bfloat16 rare near-ties may differ). --prompts 0 skips this.
3. Hugging Face's own self-speculative decoding, `generate(..., assistant_early_exit=E)` with d
   draft tokens per round, on the same prompts (needs the `hf` extra; --no-hf skips it): its
   tokens/s beside ours, and whether its outputs equal its own greedy `generate` (and ours).
The plot (drawn by train/report.py) has a panel per part: perplexity by E, acceptance
rate and speedup over (E, d) as annotated heatmaps, and tokens/s of ours beside Hugging Face's.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train.data.sources import DataError
from train.data.tokenizer import load_tokenizer
from train.hf import load_hf_model
from train.inference import greedy_generate, self_speculative_generate
from train.model import LayerSkipLlama


def resolve_hf_dir(path: str) -> Path:
    from train.hub import hub_folder
    if (folder := hub_folder(path, "--model")) is not None:
        return folder
    p = Path(path)
    for cand in (p, p / "hf"):
        if (cand / "config.json").is_file():
            return cand
    raise SystemExit(f"--model {path}: neither a Hugging Face export (no {p}/config.json) nor a run "
                     f"directory with one at {p}/hf; write it with: "
                     f"python -m train.export --run {path} --out {p}/hf")


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


def speculative_sweep(model: LayerSkipLlama, prompts: list[list[int]], exits: list[int], drafts: list[int],
                      max_new_tokens: int, eos_id: int | None) -> dict:
    """Greedy baseline and self-speculative decoding for every (E, d), on the same prompts."""
    # Warm-up (allocator, kernels) so the first timed configuration is not penalised.
    greedy_generate(model, prompts[0], min(8, max_new_tokens), eos_id)
    self_speculative_generate(model, prompts[0], min(8, max_new_tokens), exits[0], drafts[0], eos_id)
    base = [greedy_generate(model, p, max_new_tokens, eos_id) for p in prompts]
    base_tokens, base_s = sum(len(g.tokens) for g in base), sum(g.wall_s for g in base)
    result = {"greedy": {"tokens": base_tokens, "seconds": base_s, "tokens_per_s": base_tokens / base_s,
                         "outputs": [g.tokens for g in base]},
              "runs": []}
    for E in exits:
        for d in drafts:
            runs = [self_speculative_generate(model, p, max_new_tokens, E, d, eos_id) for p in prompts]
            tokens, secs = sum(len(r.tokens) for r in runs), sum(r.wall_s for r in runs)
            drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
            mismatched = sum(r.tokens != g.tokens for r, g in zip(runs, base))
            tps = tokens / secs
            result["runs"].append({
                "exit": E, "draft": d, "acceptance_rate": accepted / drafted if drafted else 0.0,
                "drafted": drafted, "accepted": accepted, "verify_passes": sum(r.verify_passes for r in runs),
                "tokens": tokens, "seconds": secs, "tokens_per_s": tps,
                "speedup": tps / result["greedy"]["tokens_per_s"],
                "identical": mismatched == 0, "mismatched_prompts": mismatched})
    return result


def hf_assisted_sweep(hf_dir: Path, prompts: list[list[int]], pairs: list[tuple[int, int]],
                      max_new_tokens: int, eos_id: int | None, ours: list[list[int]], device: str,
                      dtype: torch.dtype) -> dict:
    """Hugging Face's `generate(..., assistant_early_exit=E)` (its LayerSkip candidate generator:
    the first E layers of the same model draft, the whole model verifies) for every (E, d) in
    `pairs`, d draft tokens per round (constant schedule, no confidence cut-off, as ours), and its
    plain greedy `generate`, on the same prompts. `ours`: our greedy outputs, to compare with.
    `model_calls` counts the forward calls of the model (each draft step and each verify pass)."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(str(hf_dir)).to(device=device, dtype=dtype).eval()
    config = model.generation_config
    config.eos_token_id = eos_id  # None: never stop early, as --ignore-eos
    config.pad_token_id = eos_id if eos_id is not None else 0
    calls: list[int] = []
    model.model.register_forward_hook(lambda *_: calls.append(1))

    @torch.no_grad()
    def generate(prompt: list[int], **kw) -> tuple[list[int], float]:
        ids = torch.tensor([prompt], device=device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, **kw)
        return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t0

    def timed(outputs: list[tuple[list[int], float]]) -> tuple[int, float]:
        return sum(len(o) for o, _ in outputs), sum(s for _, s in outputs)

    generate(prompts[0])  # warm-up
    greedy = [generate(p) for p in prompts]
    tokens, secs = timed(greedy)
    result = {"greedy": {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
                         "identical_to_ours": [o for o, _ in greedy] == ours}, "runs": []}
    for E, d in pairs:
        # The early-exit assistant reads these from the model's own generation config, not from
        # generate()'s arguments (transformers 4.47-5.x).
        config.num_assistant_tokens, config.num_assistant_tokens_schedule = d, "constant"
        config.assistant_confidence_threshold = 0.0  # 0: no early stop of a draft
        calls.clear()
        runs = [generate(p, assistant_early_exit=E) for p in prompts]
        tokens, secs = timed(runs)
        result["runs"].append({
            "exit": E, "draft": d, "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs,
            "speedup": tokens / secs / result["greedy"]["tokens_per_s"], "model_calls": len(calls),
            "identical": [o for o, _ in runs] == [o for o, _ in greedy]})
    return result


def _prompts(ids: list[int], n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens at evenly spaced offsets of the held-out text."""
    if len(ids) < length:
        raise SystemExit(f"the held-out text has {len(ids)} tokens, fewer than --prompt-tokens {length}")
    span = len(ids) - length
    offsets = [0] if n == 1 else [i * span // (n - 1) for i in range(n)]
    return [ids[o:o + length] for o in offsets]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m train.decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF export folder or run directory (uses RUN_DIR/hf)")
    ap.add_argument("--text", help="held-out text file (default: HF_DIR/heldout.txt)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--exits", help="draft depths E for speculative decoding (default: L/4, L/2, 3L/4)")
    ap.add_argument("--draft", default="2,4,8", help="draft lengths d (default: 2,4,8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="prompts for the speculative sweep (0: skip)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16384, help="tokens for perplexity (0: skip)")
    ap.add_argument("--seq-len", type=int, default=512, help="perplexity window (capped at the context)")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    ap.add_argument("--no-hf", action="store_true",
                    help="skip Hugging Face's generate(assistant_early_exit=E) comparison")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)

    hf_dir = resolve_hf_dir(args.model)
    text_path = Path(args.text) if args.text else hf_dir / "heldout.txt"
    if not text_path.is_file():
        raise SystemExit(f"no held-out text: {text_path} does not exist; pass --text FILE")
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
    report: dict = {"model": str(hf_dir), "n_layers": L, "device": args.device, "dtype": args.dtype,
                    "text": str(text_path), "text_tokens": len(ids)}

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
        spec = speculative_sweep(model, prompts, exits, drafts, args.max_new_tokens, eos)
        spec.update(prompts=len(prompts), prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens)
        report["speculative"] = spec
        g = spec["greedy"]
        print(f"\nSelf-speculative decoding, {len(prompts)} prompts x {args.max_new_tokens} new tokens; "
              f"greedy baseline {g['tokens_per_s']:.1f} tokens/s")
        print(f"{'E':>3} {'d':>3} {'accept':>7} {'tok/s':>9} {'speedup':>8} {'identical':>9}")
        for r in spec["runs"]:
            print(f"{r['exit']:>3} {r['draft']:>3} {r['acceptance_rate']:>7.3f} {r['tokens_per_s']:>9.1f} "
                  f"{r['speedup']:>7.2f}x {str(r['identical']):>9}")
        if not all(r["identical"] for r in spec["runs"]):
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
                    eos, spec["greedy"]["outputs"], args.device, getattr(torch, args.dtype))
                ours = {(r["exit"], r["draft"]): r for r in spec["runs"]}
                print(f"\nHugging Face generate(assistant_early_exit=E), same prompts; HF greedy "
                      f"{hf['greedy']['tokens_per_s']:.1f} tokens/s (ours {g['tokens_per_s']:.1f}), "
                      f"HF greedy output identical to ours: {hf['greedy']['identical_to_ours']}")
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
