"""Prepare throughput per worker against the tokenizer's own batch-encode, 1 vs 2 workers, peak RSS.

    PYTHONPATH=. python bench/prepare_throughput.py [--mb 1024] [--ref-mb 256] [--work .cache/bench-prepare]
                                       [--out bench/results/prepare_throughput_cpu.json]

On one .txt file of --mb MiB of real text (bench/prepare_corpus.py), in the same run:
- reference: `encode_batch(pieces, num_threads=1)` of the tokenizer itself on the file's first
  --ref-mb MiB, cut into the same 4 KiB line-aligned pieces prepare encodes (text already in
  memory: the pure encode rate, an upper bound for one worker);
- rates per wall-clock second (the targets) and per CPU second (a check that is less disturbed by
  other work on the machine);
- `python -m train.data.prepare` with prepare.workers=1 and =2 (shards of min(64 MiB, file/16), so
  two workers have work to share), tokens/s from its own timing, peak resident memory of the whole
  process tree (main + workers, polled from /proc).
Targets (issue 8): one worker >= 0.8x the reference, 2 workers >= 1.7x one worker, peak RSS < 1 GiB
on a file of >= 1 GB. Run it on a quiet machine (the load average is recorded before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from bench.prepare_corpus import run_prepare, text_file, tokenizer
from train.data.shards import UNIT_BYTES
from train.data.tokenizer import load_tokenizer


def reference_rate(path: Path, tok_path: Path, mb: int) -> dict:
    tok = load_tokenizer(tok_path)
    pieces, block, lines, read = [], -1, [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            if read // UNIT_BYTES != block and lines:
                pieces.append(b"".join(lines).decode())
                lines = []
            block = read // UNIT_BYTES
            lines.append(raw)
            read += len(raw)
            if read >= mb * 2**20:
                break
    pieces.append(b"".join(lines).decode())
    tokens, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    for k in range(0, len(pieces), 1000):  # ~1 MB per call, as prepare does
        tokens += sum(map(len, tok.encode_batch(pieces[k:k + 1000], num_threads=1)))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"mib": read / 2**20, "tokens": tokens, "seconds": seconds, "cpu_s": cpu,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of the text file, MiB")
    ap.add_argument("--ref-mb", type=int, default=256, help="MiB encoded for the reference rate")
    ap.add_argument("--work", default=".cache/bench-prepare")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    text, tok = text_file(work, args.mb), tokenizer(work)
    size = text.stat().st_size
    shard_bytes = max(1 << 16, min(64 * 2**20, size // 16))
    ref = reference_rate(text, tok, min(args.ref_mb, args.mb))
    print(f"reference encode_batch (1 thread): {ref['tokens_per_s']:,.0f} tokens/s on {ref['mib']:.0f} MiB")
    runs = []
    for workers in (1, 2):
        out = work / f"prepared-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_prepare(text, tok, out, workers, shard_bytes)
        shutil.rmtree(out, ignore_errors=True)
        print(f"prepare, {workers} worker(s): {r['tokens_per_s']:,.0f} tokens/s, peak RSS "
              f"{r['peak_rss_mib']:,.0f} MiB ({r['prepare_s']:.1f} s)")
        runs.append(r)
    one, two = runs
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
        "command": f"PYTHONPATH=. python bench/prepare_throughput.py --mb {args.mb} --ref-mb {args.ref_mb}",
        "file_mib": size / 2**20, "shard_bytes": shard_bytes, "reference": ref, "prepare": runs,
        "per_worker_over_reference": one["tokens_per_s"] / ref["tokens_per_s"],
        "per_worker_over_reference_cpu_time": one["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"],
        "two_over_one_worker": two["tokens_per_s"] / one["tokens_per_s"],
        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
    }
    print(json.dumps({k: result[k] for k in ("per_worker_over_reference", "per_worker_over_reference_cpu_time",
                                             "two_over_one_worker", "peak_rss_mib_max")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
