"""`python -m train.data.prepare` killed with SIGKILL (the OOM killer, `kill -9`) leaves none of its
pool's worker processes behind: they die with it (train/process_lifetime.py)."""
from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests._cluster import alive, job_pids, wait_gone
from tests._launch import LaunchTimeout, start, train_env, wait_all
from train.data.sources import open_corpus
from train.data.tokenizer import train_tokenizer

WORDS = "the early exit of a layer skips blocks when the model is sure of the next token".split()


def test_prepare_killed_with_sigkill_leaves_no_worker(tmp_path: Path) -> None:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))) for _ in range(200_000)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")  # ~15 MB: many shards to write
    tok = train_tokenizer(open_corpus(str(tmp_path / "corpus.txt")).documents(), 300,
                          tmp_path / "tokenizer.model", expected_chars=200_000).path
    launch = start([sys.executable, "-m", "train.data.prepare", f"data.source={tmp_path / 'corpus.txt'}",
                    f"data.tokenizer={tok}", "model.vocab_size=300", "data.max_chars=null",
                    f"prepare.out={tmp_path / 'prepared'}", "prepare.workers=2",
                    f"prepare.shard_bytes={1 << 18}", "prepare.progress=false"], cwd=tmp_path, env=train_env())
    try:
        deadline = time.monotonic() + 60
        while True:  # the pool's two workers (and multiprocessing's helpers) have started
            workers = [p for p in job_pids(launch.proc.pid)[1:] if "spawn_main" in _cmdline(p)]
            if len(workers) >= 2:
                break
            assert launch.proc.poll() is None, "prepare ended before its workers could be seen"
            assert time.monotonic() < deadline, "no prepare workers within 60 s"
            time.sleep(0.05)
        time.sleep(1.0)  # the workers are past their start-up, writing shards
        assert launch.proc.poll() is None, "prepare finished before it could be killed"
        pids = job_pids(launch.proc.pid)[1:]
        launch.proc.send_signal(signal.SIGKILL)
        launch.proc.wait(timeout=10)
        left = wait_gone(pids, timeout_s=5)
        assert not left, f"prepare's workers outlived it: {[(p, _cmdline(p)) for p in alive(left)]}"
    finally:
        with contextlib.suppress(LaunchTimeout):
            wait_all([launch], timeout_s=1)  # and kill whatever is left of its session


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
