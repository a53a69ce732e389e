"""Launch the real entry point (`python -m train`, `torchrun ... -m train`) from tests, never hanging.

    done = run(train_cmd([...overrides]), cwd=tmp_path, timeout_s=90)
    done = run(torchrun_cmd([...], nproc=4), cwd=tmp_path, timeout_s=120)
    steps = read_metrics(run_dir)   # {step: last metrics.jsonl record with a training loss}

Several launches can run at once (two torchrun agents forming one job, or independent runs that
each use one core): `start()` them all, then `wait_all()`. Every launch runs in its own session
(process group) with its output in a file, so on timeout the whole tree (agent and workers) is
killed with one signal to that group, and a chatty process can never block on a full pipe.
Subprocesses get OMP_NUM_THREADS=1 (the test machine has 2 cores shared by up to 4 ranks) and the
repository on PYTHONPATH; they run in `cwd`, so nothing they write lands in the repository.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class LaunchTimeout(AssertionError):
    """A launch did not finish in time; it (and every launch waited on with it) was killed."""


@dataclass
class Finished:
    cmd: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved
    seconds: float  # from start until wait_all saw it finished (waited on in order)

    def check(self) -> Finished:
        """Raise with the tail of the output unless the command exited with status 0."""
        if self.returncode != 0:
            raise AssertionError(f"{_short(self.cmd)} exited with {self.returncode} after "
                                 f"{self.seconds:.0f} s:\n{self.output[-6000:]}")
        return self


@dataclass
class Launch:
    cmd: list[str]
    proc: subprocess.Popen
    log: tempfile._TemporaryFileWrapper
    started: float


def train_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
            **extra}


def train_cmd(overrides: list[str]) -> list[str]:
    """`python -m train OVERRIDES` in this interpreter (the test's virtual environment)."""
    return [sys.executable, "-m", "train", *overrides]


def torchrun_cmd(overrides: list[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
                 rdzv_endpoint: str | None = None, rdzv_id: str = "test") -> list[str]:
    """torchrun (as `python -m torch.distributed.run`) of `nproc` local ranks. One node:
    `--standalone`. Several nodes: one agent per node, all given the same c10d `rdzv_endpoint`
    (host:port) and `rdzv_id`; node 0's agent hosts the rendezvous store (is_host is said
    explicitly, since every "node" of a test runs on localhost)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need a rendezvous endpoint (host:port)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
                f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}"]
    return [*cmd, "-m", "train", *overrides]


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (good enough for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> Launch:
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or train_env(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    return Launch(cmd=cmd, proc=proc, log=log, started=time.monotonic())


def wait_all(launches: list[Launch], timeout_s: float) -> list[Finished]:
    """Wait for every launch; if any is still running after `timeout_s`, kill all of them (each
    with its whole process group) and raise LaunchTimeout with their output."""
    deadline = time.monotonic() + timeout_s
    try:
        for launch in launches:
            launch.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for launch in launches:
            _kill(launch)
        outputs = "\n".join(f"--- {_short(l.cmd)} (exit {l.proc.returncode}):\n{_read(l)[-3000:]}"
                            for l in launches)
        raise LaunchTimeout(f"did not finish within {timeout_s:.0f} s; killed:\n{outputs}") from None
    finally:
        for launch in launches:  # workers a finished agent left behind (it should leave none)
            _kill(launch)
    done = [Finished(cmd=l.cmd, returncode=l.proc.returncode, output=_read(l),
                     seconds=time.monotonic() - l.started) for l in launches]
    for l in launches:
        l.log.close()
    return done


def run(cmd: list[str], cwd: Path, timeout_s: float, check: bool = True,
        env: dict[str, str] | None = None) -> Finished:
    """Start one command and wait for it; with `check`, a non-zero exit raises with its output."""
    (done,) = wait_all([start(cmd, cwd, env)], timeout_s)
    return done.check() if check else done


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """{step: record} of the training steps in RUN_DIR/metrics.jsonl (records with a `loss`).
    A resumed run rewrites steps; the last record of a step counts. Validation records (with
    `val/loss`) are merged into the record of their step."""
    steps: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record["step"]
        if "loss" in record:
            steps[step] = {**{k: v for k, v in steps.get(step, {}).items() if k.startswith("val/")},
                           **record}
        elif step in steps:
            steps[step].update(record)
        else:
            steps[step] = record
    return {s: r for s, r in steps.items() if "loss" in r}


def compose_config(overrides: list[str]):
    """The typed `Config` that `python -m train OVERRIDES` would run with (same recipes, same
    Hydra composition), built in this process: for preparing its data or checking its values."""
    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        return load_config(compose("train", overrides=list(overrides)))


def prepare_data(overrides: list[str]) -> None:
    """Train the tokenizer and tokenize the corpus of the run `overrides` describe into its
    data.cache_dir, here and once, so that later runs (of any layout) only read the cache and no
    two runs started together race to write it. Takes about a second for a small corpus."""
    from train.data import build_data
    cfg = compose_config(overrides)
    build_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed)


def _kill(launch: Launch) -> None:
    try:
        os.killpg(launch.proc.pid, signal.SIGKILL)  # the session started for this launch
    except (ProcessLookupError, PermissionError):
        pass
    try:
        launch.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _read(launch: Launch) -> str:
    launch.log.flush()
    launch.log.seek(0)
    return launch.log.read()


def _short(cmd: list[str]) -> str:
    args = cmd[1:] if cmd and cmd[0] == sys.executable else cmd
    return " ".join(a for a in args if not a.startswith(("data.", "model.", "run_dir=")))[:300]
