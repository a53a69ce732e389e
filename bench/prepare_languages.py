"""Prepare one large plain-text file in a script other than English (Cyrillic, Chinese): rate with
1 and 2 workers, against the tokenizer's own encode_batch, peak memory, held-out fraction.

    PYTHONPATH=. python bench/prepare_languages.py [--mb 1024] [--langs russian,chinese]
        [--tokenizer FOLDER_OR_FILE] [--ref-mb 256] [--val-fraction 0.01] [--work .cache/bench-languages]
        [--pairs 4] [--pair-mb 128] [--skip-full]

Per language, one .txt file of --mb MiB (tests/train/_languages.py: sentences of real words with
the script's punctuation and line breaks; Chinese without spaces), written in 1 MiB pieces (never
whole in memory), then:
- reference: the tokenizer's `encode_batch(num_threads=1)` of the file's first --ref-mb MiB, in
  pieces of about UNIT_BYTES (text already in memory: the pure encode rate of one worker);
- `python -m train.data.prepare` with prepare.workers=1 and =2 (shards of min(64 MiB, file/16)),
  tokens/s from its own timing, peak resident memory of the whole process tree (main + workers,
  polled from /proc), the held-out fraction (held-out characters / all) and fallback cuts;
- the scaling in --pairs adjacent pairs of 1- and 2-worker prepares of the file's first --pair-mb
  MiB, alternating which goes first, each pair also timing the tokenizer alone in 1 and 2
  processes (the machine's own ceiling): the speed of a shared or virtual machine drifts by up to
  2x over minutes, so one 1-worker run followed by one 2-worker run measures the drift as much as
  the scaling. The figure is the median pair's ratio.
Targets: 2 workers >= 1.7x 1 worker, 1 worker >= 0.8x the reference, peak RSS < 1 GiB,
held-out fraction within +-25 % of --val-fraction. Tokenizer: SmolLM2-135M's (bench/smollm2.py)
unless given. Writes bench/results/prepare_languages_<date>.json (date, machine, command, commit).
Run it on a quiet machine (the load average is recorded before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.prepare_corpus import TreeRSS, _children_cpu
from tests.train._languages import text as language_text
from train.data.shards import UNIT_BYTES
from train.data.tokenizer import find_tokenizer_file, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def text_file(work: Path, lang: str, mib: float) -> Path:
    """--mb MiB of `lang`, written a piece at a time; cached by name."""
    path = work / f"{lang}-{mib:g}mib.txt"
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    target, written, seed = int(mib * 2**20), 0, 0
    with open(tmp, "wb") as fh:
        while written < target:
            piece = language_text(lang, 1 << 19, seed=seed).encode()[:target - written]
            piece = piece.decode("utf-8", errors="ignore").encode()  # a whole last character
            fh.write(piece)
            written += len(piece)
            seed += 1
            if not piece:
                break
    os.replace(tmp, path)
    return path


def reference_rate(path: Path, tok_path: Path, mib: float, offset: int = 0) -> dict:
    tok = load_tokenizer(tok_path)
    pieces, read = [], 0
    with open(path, "rb") as fh:
        if offset:
            fh.seek(offset)
            fh.readline()  # from the next whole line on (whole characters)
        while read < mib * 2**20:
            raw = fh.read(UNIT_BYTES) + fh.readline()  # about a unit, whole lines (whole characters)
            if not raw:
                break
            pieces.append(raw.decode())
            read += len(raw)
    tokens, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    for k in range(0, len(pieces), 250):  # ~1 MB per call, as prepare does
        tokens += sum(map(len, tok.encode_batch(pieces[k:k + 250], num_threads=1)))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"mib": read / 2**20, "tokens": tokens, "seconds": seconds, "cpu_s": cpu,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu}


def run_prepare(source: Path, tok: Path, out: Path, workers: int, shard_bytes: int, vocab: int,
                val_fraction: float) -> dict:
    """`python -m train.data.prepare` as a user runs it: its timing, peak RSS of the tree, manifest."""
    cmd = [sys.executable, "-m", "train.data.prepare", f"data.source={source}", f"data.tokenizer={tok}",
           f"model.vocab_size={vocab}", "data.max_chars=null", f"data.val_fraction={val_fraction}",
           f"prepare.out={out}", f"prepare.workers={workers}", f"prepare.shard_bytes={shard_bytes}",
           "prepare.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = TreeRSS(proc.pid)
    output = proc.communicate()[0]
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    peak = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{output[-3000:]}")
    line = next(x for x in output.splitlines() if x.startswith("task 0/1:"))
    seconds = float(line.split(" tokens in ")[1].split(" s ")[0])
    tokens = int(line.split(" shards, ")[1].split(" tokens")[0].replace(",", ""))
    m = json.loads((out / "manifest.json").read_text())
    chars = {s: m[s]["characters"] for s in ("train", "val")}
    return {"workers": workers, "tokens": tokens, "prepare_s": seconds, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu,
            "peak_rss_mib": peak / 2**20, "units": m["train"]["units"] + m["val"]["units"],
            "held_out_fraction": chars["val"] / max(1, chars["train"] + chars["val"]),
            "fallback_cuts": m["fallback_cuts"], "summary": [x for x in output.splitlines() if "fallback" in x]}


def full_file(lang: str, text: Path, tok_path: Path, vocab: int, work: Path, args) -> dict:
    """The whole file: the reference encode rate, then prepare with 1 and 2 workers."""
    size = text.stat().st_size
    shard_bytes = max(1 << 16, min(64 * 2**20, size // 16))
    ref = reference_rate(text, tok_path, min(args.ref_mb, args.mb))
    print(f"{lang}: reference encode_batch (1 thread): {ref['tokens_per_s']:,.0f} tokens/s on "
          f"{ref['mib']:.0f} MiB")
    runs = []
    for workers in (1, 2):
        out = work / f"prepared-{lang}-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_prepare(text, tok_path, out, workers, shard_bytes, vocab, args.val_fraction)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{lang}: prepare, {workers} worker(s): {r['tokens_per_s']:,.0f} tokens/s, peak RSS "
              f"{r['peak_rss_mib']:,.0f} MiB, held out {r['held_out_fraction']:.4f}, "
              f"{r['fallback_cuts']} fallback cuts ({r['prepare_s']:.1f} s)")
        runs.append(r)
    one, two = runs
    return {
        "file_mib": size / 2**20, "shard_bytes": shard_bytes, "reference": ref, "prepare": runs,
        "per_worker_over_reference": one["tokens_per_s"] / ref["tokens_per_s"],
        "per_worker_over_reference_cpu_time": one["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"],
        "two_over_one_worker": two["tokens_per_s"] / one["tokens_per_s"],
        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
        "held_out_over_val_fraction": one["held_out_fraction"] / args.val_fraction,
    }


def head_file(big: Path, mib: float) -> Path:
    """The first `mib` MiB of `big`, ending at a line end (cached by name)."""
    path = big.with_name(f"{big.stem}-head{mib:g}mib.txt")
    if not path.is_file():
        with open(big, "rb") as src, open(path.with_name(path.name + ".tmp"), "wb") as dst:
            dst.write(src.read(int(mib * 2**20)) + src.readline())
        os.replace(path.with_name(path.name + ".tmp"), path)
    return path


def _vocab_size(tok_path: Path) -> int:
    return load_tokenizer(tok_path).vocab_size


def encode_ceiling(path: Path, tok_path: Path, mib: float, processes: int) -> float:
    """Tokens/s of `processes` concurrent processes, each running the reference encode on its own
    `mib` MiB of `path`: what this machine's cores give the tokenizer alone, without prepare."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    size = path.stat().st_size
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        list(pool.map(_vocab_size, [tok_path] * processes))  # started, imported, before the clock
        t0 = time.perf_counter()
        runs = list(pool.map(reference_rate, [path] * processes, [tok_path] * processes,
                             [mib] * processes, [k * size // processes for k in range(processes)]))
        return sum(r["tokens"] for r in runs) / (time.perf_counter() - t0)


def paired_scaling(lang: str, big: Path, tok_path: Path, vocab: int, work: Path, args) -> dict:
    """2 workers over 1 on the first --pair-mb MiB, in --pairs adjacent pairs with alternating order
    (1,2 then 2,1, ...), and the same for the tokenizer alone (encode_ceiling): the speed of a
    shared or virtual machine drifts over minutes, which a single 1-worker run followed by a single
    2-worker run mistakes for scaling; adjacent pairs see nearly the same machine."""
    text = head_file(big, args.pair_mb)
    shard_bytes = max(1 << 16, text.stat().st_size // 16)  # as for the full file: 16 shards
    ratios, ceilings, pairs = [], [], []
    for i in range(args.pairs):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        rate, ceiling = {}, {}
        for workers in order:
            out = work / f"pair-{lang}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            rate[workers] = run_prepare(text, tok_path, out, workers, shard_bytes, vocab,
                                        args.val_fraction)["tokens_per_s"]
            shutil.rmtree(out, ignore_errors=True)
            ceiling[workers] = encode_ceiling(text, tok_path, args.pair_mb / 4, workers)
        ratios.append(rate[2] / rate[1])
        ceilings.append(ceiling[2] / ceiling[1])
        pairs.append({"order": order, "prepare_tokens_per_s": rate, "encode_tokens_per_s": ceiling})
        print(f"{lang}: pair {i + 1}/{args.pairs}: prepare 2/1 workers {ratios[-1]:.2f}x, the tokenizer "
              f"alone 2/1 processes {ceilings[-1]:.2f}x", flush=True)
    return {"pair_mib": args.pair_mb, "shard_bytes": shard_bytes, "pairs": pairs,
            "two_over_one_worker": statistics.median(ratios), "encode_two_over_one": statistics.median(ceilings)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1024, help="size of each text file, MiB")
    ap.add_argument("--langs", default="russian,chinese")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer file or folder (default: SmolLM2-135M's)")
    ap.add_argument("--ref-mb", type=float, default=256, help="MiB encoded for the reference rate")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--work", default=".cache/bench-languages")
    ap.add_argument("--pairs", type=int, default=4, help="adjacent 1-/2-worker pairs for the scaling figure")
    ap.add_argument("--pair-mb", type=float, default=128, help="MiB (the file's head) each pair prepares")
    ap.add_argument("--skip-full", action="store_true", help="only the pairs, not the whole file")
    ap.add_argument("--out", default=None, help="default: bench/results/prepare_languages_<date>.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        from bench.smollm2 import smollm2_dir
        args.tokenizer = str(smollm2_dir())
    tok_path = find_tokenizer_file(args.tokenizer)
    vocab = load_tokenizer(tok_path).vocab_size
    load_before = os.getloadavg()
    results = {}
    for lang in args.langs.split(","):
        text = text_file(work, lang, args.mb)
        results[lang] = {} if args.skip_full else full_file(lang, text, tok_path, vocab, work, args)
        if args.pairs:
            results[lang]["paired"] = paired_scaling(lang, text, tok_path, vocab, work, args)
        print(json.dumps({k: v for k, v in results[lang].items() if not isinstance(v, (dict, list))}, indent=1))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "load_before": load_before, "load_after": os.getloadavg(),
        "command": "PYTHONPATH=. python " + " ".join(sys.argv), "commit": commit,
        "tokenizer": str(tok_path), "val_fraction": args.val_fraction, "languages": results,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"prepare_languages_{time.strftime('%Y-%m-%d')}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    random.seed(0)
    main()
