"""Shared set-up of the prepare benchmarks: one large .txt file of real text and a tokenizer.

The text is the running Python's standard-library sources (the quickstart's corpus), concatenated
and repeated until the file has the requested size: realistic code text, in ONE file, the case that
must be split into byte ranges and read in bounded memory. The tokenizer is an 8192-token BPE
trained on a sample of it, like the quickstart's. Both are cached in the work folder.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from train.data.sources import open_corpus
from train.data.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def text_file(work: Path, mb: int) -> Path:
    path = work / f"stdlib-{mb}mb.txt"
    if path.is_file() and path.stat().st_size >= mb * 2**20:
        return path
    docs = [d for d in open_corpus("stdlib").documents()]
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        while written < mb * 2**20:
            for d in docs:
                fh.write(d if d.endswith("\n") else d + "\n")
                written += len(d.encode()) + (not d.endswith("\n"))
                if written >= mb * 2**20:
                    break
    os.replace(tmp, path)
    return path


def tokenizer(work: Path, vocab: int = 8192) -> Path:
    path = work / f"tokenizer-{vocab}.model"
    if not path.is_file():
        corpus = open_corpus("stdlib")
        train_tokenizer(corpus.documents(20_000_000), vocab, path, expected_chars=20_000_000)
    return path


class TreeRSS:
    """Peak of the summed resident memory of a process and all its descendants (polled /proc)."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss(self.pid))
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _tree_rss(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_prepare(source: Path, tok: Path, out: Path, workers: int, shard_bytes: int) -> dict:
    """`python -m train.data.prepare` as a new user runs it; wall time, its own timing, peak RSS."""
    cmd = [sys.executable, "-m", "train.data.prepare", f"data.source={source}", f"data.tokenizer={tok}",
           "model.vocab_size=8192", "data.max_chars=null", "data.val_fraction=0.01", f"prepare.out={out}",
           f"prepare.workers={workers}", f"prepare.shard_bytes={shard_bytes}", "prepare.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = TreeRSS(proc.pid)
    output = proc.communicate()[0]
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    peak = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{output[-3000:]}")
    line = next(l for l in output.splitlines() if l.startswith("task 0/1:"))
    seconds = float(line.split(" tokens in ")[1].split(" s ")[0])
    tokens = int(line.split(" shards, ")[1].split(" tokens")[0].replace(",", ""))
    return {"workers": workers, "tokens": tokens, "prepare_s": seconds, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu, "peak_rss_mib": peak / 2**20}


def _children_cpu() -> float:
    """CPU seconds (user + system) of the waited-for child processes and their descendants so far:
    start-up included, so a rate from it is a lower bound (less disturbed by a busy machine)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
