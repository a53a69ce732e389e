"""Does subset compute realise layer dropout's saving? A controlled CPU/GPU measurement.

bench/layerskip_cost.py samples real drop decisions, so its step-to-step spread (which samples,
how many) is as large as the effect at small p_max. Here every block keeps the same fixed number
of the batch's samples, every step, so the saving is deterministic:

    ideal saving(k) = (dropped share of sample-blocks) x (blocks' share of the step's FLOPs)
    realised saving(k) = 1 - t(keep k) / t(keep all)

With --sampled, the decisions are instead drawn by LayerDropout at p_max 0.1, 0.2 and 0.5 (the
paper's exp depth shape, a new draw every step), interleaved with steps that keep everything.
Each round pairs one step of every case with that round's keep-all step, so slow drift of the
machine cancels; the estimate is mean(realised) / mean(ideal) over the rounds, using each step's
actual skipped share:

    python bench/dropout_scaling.py [--rounds 10] [--sampled] [--batch 4] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from train.config import ModelConfig
from train.layerskip.exit_loss import make_exit_loss
from train.model import build_model, flops_per_token, init_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sampled", action="store_true", help="sampled decisions at p_max 0.1/0.2/0.5")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    cfg = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=16384, multiple_of=64,
                      max_seq_len=args.seq)
    model = init_model(build_model(cfg), dev, 0)
    B, L = args.batch, cfg.n_layers
    tok = torch.randint(0, cfg.vocab_size, (B, args.seq + 1), device=dev)
    inputs, labels = tok[:, :-1], tok[:, 1:]
    clock = time.perf_counter if cuda else time.process_time  # CPU time: robust to other load

    def step(keep) -> float:
        t0 = clock()
        out = model(inputs, keep=keep, loss_fn=make_exit_loss(labels, {L - 1: 1.0}, 256))
        out.loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = clock() - t0
        model.zero_grad(set_to_none=True)
        return dt

    _, total, per_block = flops_per_token(cfg, model, args.seq)
    block_share = L * per_block / total
    if args.sampled:
        return sampled(args, step, B, L, block_share, dev)
    cases = {k: (None if k == B else [torch.arange(k, device=dev)] * L) for k in range(B, 0, -1)}
    for keep in cases.values():  # warm-up
        step(keep)
    times = {k: [] for k in cases}
    for _ in range(args.rounds):  # interleaved, so drift hits every case alike
        for k, keep in cases.items():
            times[k].append(step(keep))
    t = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in range(B - 1, 0, -1):
        ideal = (B - k) / B * block_share
        realised = 1 - t[k] / t[B]
        rows.append({"kept": k, "of": B, "step_ms": 1000 * t[k], "ideal_saving": ideal,
                     "realised_saving": realised, "realised_over_ideal": realised / ideal})
    print(f"{dev.type}; batch {B} x {args.seq}; all kept {1000 * t[B]:.0f} ms; blocks' share of FLOPs "
          f"{100 * block_share:.1f} %")
    print("| kept per block | step | ideal saving | realised saving | realised / ideal |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kept']} of {r['of']} | {r['step_ms']:.0f} ms | {100 * r['ideal_saving']:.1f} % | "
              f"{100 * r['realised_saving']:.1f} % | {100 * r['realised_over_ideal']:.0f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev.type, "batch": B, "seq": args.seq, "block_flop_share": block_share,
                       "ms": {k: 1000 * v for k, v in t.items()}, "rows": rows}, f, indent=1)


def sampled(args, step, B: int, L: int, block_share: float, dev) -> None:
    from train.config import DropoutConfig
    from train.layerskip.dropout import LayerDropout
    droppers = {p: LayerDropout(DropoutConfig(p_max=p), n_layers=L, total_steps=10**6, seed=0)
                for p in (0.1, 0.2, 0.5)}
    for p, d in droppers.items():  # warm-up
        step(d.plan(0, 0, B, dev).keep)
    pairs = {p: [] for p in droppers}  # (realised, ideal) per round
    for r in range(args.rounds):
        base = step(None)
        for p, d in droppers.items():
            plan = d.plan(r + 1, 0, B, dev)
            t = step(plan.keep)
            pairs[p].append((1 - t / base, plan.saved_fraction * block_share))
    print(f"{dev.type}; batch {B} x {args.seq}; {args.rounds} paired rounds; blocks' share of FLOPs "
          f"{100 * block_share:.1f} %")
    print("| p_max | skipped (mean) | ideal saving | realised saving | realised / ideal |\n|---|---|---|---|---|")
    rows = []
    for p, pr in pairs.items():
        real = statistics.mean(a for a, _ in pr)
        ideal = statistics.mean(b for _, b in pr)
        rows.append({"p_max": p, "skipped": ideal / block_share, "ideal_saving": ideal,
                     "realised_saving": real, "realised_over_ideal": real / ideal, "pairs": pr})
        print(f"| {p} | {100 * ideal / block_share:.1f} % | {100 * ideal:.1f} % | {100 * real:.1f} % | "
              f"{100 * real / ideal:.0f} % |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev.type, "batch": B, "seq": args.seq, "block_flop_share": block_share,
                       "mode": "sampled", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
