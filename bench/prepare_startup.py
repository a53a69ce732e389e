"""Launch-to-first-step time of training on a large prepared dataset versus a small one.

    PYTHONPATH=. python bench/prepare_startup.py [--gb 1.1] [--small-mb 10] [--repeats 3] [--work .cache/bench-prepare]
                                    [--out bench/results/prepare_startup_cpu.json]

Small: --small-mb MiB of real text (bench/prepare_corpus.py) prepared by `python -m
train.data.prepare`. Large: the same prepared shard repeated (hard links, so no extra disk) until
the folder holds at least --gb GB of tokens, with its own plan, shard markers and manifest written
by the prepare code (train/data/prepare.py `finalize`): to the loader it is a prepared dataset of
that size like any other. Each run is `python -m train` on the tiny model for one step; the time
is from the launch until the first step's log line. Runs alternate small/large, --repeats times;
the medians are compared (target, issue 8: within 2 s of each other).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.prepare_corpus import ROOT, run_prepare, text_file, tokenizer
from train.data.prepare import finalize


def large_copy(small: Path, out: Path, min_bytes: float) -> dict:
    """A prepared folder made of `small`'s shards repeated until its tokens take `min_bytes`."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "shards").mkdir(parents=True)
    plan = json.loads((small / "plan.json").read_text())
    records = [json.loads((small / "shards" / f"{k:06d}.done.json").read_text()) for k in range(plan["shards"])]
    itemsize = 2 if plan["manifest"]["dtype"] == "uint16" else 4
    per_copy = sum(r["train"]["tokens"] + r["val"]["tokens"] for r in records) * itemsize
    copies = int(-(-min_bytes // per_copy))
    k = 0
    for _ in range(copies):
        for r in records:
            for split in ("train", "val"):
                for ext in ("bin", "idx"):
                    os.link(small / "shards" / f"{r['id']:06d}.{split}.{ext}",
                            out / "shards" / f"{k:06d}.{split}.{ext}")
            (out / "shards" / f"{k:06d}.done.json").write_text(json.dumps({**r, "id": k}, sort_keys=True))
            k += 1
    tok = plan["manifest"]["tokenizer"]["file"]
    shutil.copyfile(small / tok, out / tok)
    (out / "plan.json").write_text(json.dumps({**plan, "shards": k}, indent=1, sort_keys=True))
    manifest = finalize(out)
    return {"shards": k, "tokens": manifest["train"]["tokens"] + manifest["val"]["tokens"],
            "token_bytes": (manifest["train"]["tokens"] + manifest["val"]["tokens"]) * itemsize}


def time_to_first_step(data: Path, run_dir: Path) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "train", f"data.source={data}", f"run_dir={run_dir}", "train.steps=1",
           "model.vocab_size=8192", "eval.every=0", "logging.every=1", "logging.tensorboard=false",
           "checkpoint.interval=0", "checkpoint.save_final=false", "data.num_workers=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if seen is None and "step      1/1" in line:
            seen = time.perf_counter() - t0
    proc.wait()
    if proc.returncode != 0 or seen is None:
        raise RuntimeError("training run failed:\n" + "".join(lines[-40:]))
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.1, help="GB (1e9 bytes) of tokens in the large dataset")
    ap.add_argument("--small-mb", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=".cache/bench-prepare")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    small = work / f"prepared-small-{args.small_mb}mb"
    if not (small / "manifest.json").is_file():
        run_prepare(text_file(work, args.small_mb), tokenizer(work), small, workers=1,
                    shard_bytes=64 * 2**20)
    large = work / "prepared-large"
    info = large_copy(small, large, args.gb * 1e9)
    print(f"large: {info['tokens']:,} tokens ({info['token_bytes'] / 1e9:.2f} GB) in {info['shards']} shards")
    times: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(args.repeats):
        for name, folder in (("small", small), ("large", large)):
            times[name].append(time_to_first_step(folder, work / f"run-{name}"))
            print(f"{name}: {times[name][-1]:.2f} s to the first step")
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
        "command": f"PYTHONPATH=. python bench/prepare_startup.py --gb {args.gb} --small-mb {args.small_mb} "
                   f"--repeats {args.repeats}",
        "large": info, "small_mib_text": args.small_mb, "seconds": times, "median_s": med,
        "large_minus_small_s": med["large"] - med["small"],
    }
    print(json.dumps({"median_s": med, "large_minus_small_s": result["large_minus_small_s"]}, indent=1))
    shutil.rmtree(large, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
