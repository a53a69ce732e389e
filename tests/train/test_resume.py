"""End to end: `python -m train` / torchrun runs that stop, crash or change layout and resume
from their checkpoints reproduce the uninterrupted run.

Reference: the same command run straight through. On CPU in fp32 a resumed run on the same
layout must reproduce its training losses exactly (model, AdamW, data position, layer-dropout and
curriculum state all come back); on another layout (2-rank FSDP2 -> 1 process with the same global
batch) up to the rounding of the gradient reduction. Every subprocess runs under a hard timeout
and in its own session, so a hang is killed with all its workers.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
# A tiny model and corpus; layer dropout (global mode: layout-independent decisions) and the
# rotational early-exit curriculum stay on (quickstart), so their state must survive a resume.
# Attention is masked at document boundaries (the Llama 3 recipes' setting): the corpus' documents
# are a sentence each, so every window holds several.
TINY = ["experiment=quickstart", "model.n_layers=2", "model.dim=64", "model.n_heads=4",
        "model.n_kv_heads=2", "model.vocab_size=512", "model.multiple_of=16", "model.max_seq_len=64",
        "model.attention=block_causal",
        "data=files", "data.seq_len=32", "data.val_fraction=0.05",
        "eval.every=0", "eval.batches=1", "logging.every=1", "logging.tensorboard=false",
        "optim.warmup_steps=2", "checkpoint.interval=2", "checkpoint.keep=10"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default torchrun's c10d rendezvous shares one
    # TCPStore across restarts, and a restarted worker can read its peer's address from the
    # previous attempt and hang or fail in init_process_group (pytorch/pytorch#135712; seen
    # here with torch 2.13 when rank 0 restarts slower than rank 1).
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _overrides(corpus: dict, run_dir: Path, steps: int, batch: int, *extra: str) -> list[str]:
    return [*TINY, f"data.source={corpus['text']}", f"data.cache_dir={corpus['cache']}",
            f"run_dir={run_dir}", f"train.steps={steps}", f"data.batch_size={batch}", *extra]


def _train(cwd: Path, overrides: list[str], timeout_s: float = 90) -> str:
    """`python -m train ...` in one process; returns its log (stderr)."""
    return _run([sys.executable, "-m", "train", *overrides], cwd, timeout_s)


def _torchrun(cwd: Path, overrides: list[str], timeout_s: float = 120) -> str:
    return _run(_torchrun_cmd(overrides), cwd, timeout_s)


def _torchrun_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
            "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "train", *overrides]


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> str:
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout_s:.0f} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{out[-6000:]}"
    return out


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a resumed run rewrites steps, the last record of a step counts."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (run_dir / "checkpoints").glob("step-*/COMPLETE")
                  if p.parent.name[5:].isdigit())  # not step-N.tmp-*: being finalised


def _copy_run(src: Path, dst: Path, up_to_step: int) -> Path:
    """A run directory as it was when the run stopped right after checkpoint `up_to_step`."""
    (dst / "checkpoints").mkdir(parents=True)
    for step in _complete_steps(src):
        if step <= up_to_step:
            name = f"step-{step:07d}"
            shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    records = [line for line in (src / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["step"] <= up_to_step]
    (dst / "metrics.jsonl").write_text("\n".join(records) + "\n")
    return dst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A small corpus of 3000 one-sentence documents (.jsonl) and a data cache shared by every run
    (tokenizer trained once)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ("the early exit of a layer skips blocks when the model is sure of the next token "
             "and dropout of layers makes the later blocks robust to missing inputs").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 18))) + "." for _ in range(3000)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return {"text": folder / "corpus.jsonl", "cache": folder / "cache", "cwd": folder}


@pytest.fixture(scope="module")
def straight(corpus) -> Path:
    """One process, STEPS steps, uninterrupted (checkpoints every 2 steps, all kept)."""
    run_dir = corpus["cwd"] / "straight"
    _train(corpus["cwd"], _overrides(corpus, run_dir, STEPS, 4))
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def test_stop_and_resume_equals_straight_run(corpus, straight: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(straight, tmp_path / "run", up_to_step=4)
    log = _train(corpus["cwd"], _overrides(corpus, run_dir, STEPS, 4))
    assert "resumed from step 4" in log
    assert "attention masked at document boundaries" in log
    assert _losses(run_dir) == _losses(straight)


def test_half_written_checkpoint_is_ignored(corpus, straight: Path, tmp_path: Path) -> None:
    run_dir = _copy_run(straight, tmp_path / "run", up_to_step=4)
    # A later save that died before its COMPLETE marker: files there, truncated, no marker.
    half = run_dir / "checkpoints" / "step-0000006"
    shutil.copytree(straight / "checkpoints" / "step-0000006", half)
    (half / "COMPLETE").unlink()
    shard = half / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    log = _train(corpus["cwd"], _overrides(corpus, run_dir, STEPS, 4))
    assert "resumed from step 4" in log and "step-0000006" in log
    assert _losses(run_dir) == _losses(straight)
    assert (run_dir / "checkpoints" / "step-0000006" / "COMPLETE").is_file()  # replaced by a real one


# ---------------------------------------------------------------------- 2 processes (torchrun)

KILL_STEPS = 30  # long enough to kill a worker between the first checkpoint and the end


@pytest.fixture(scope="module")
def fsdp_straight(corpus) -> Path:
    """torchrun, 2 ranks (FSDP2 over 2), batch 4 per rank, uninterrupted."""
    run_dir = corpus["cwd"] / "fsdp_straight"
    _torchrun(corpus["cwd"], _overrides(corpus, run_dir, KILL_STEPS, 4, "checkpoint.interval=5"))
    assert sorted(_losses(run_dir)) == list(range(1, KILL_STEPS + 1))
    return run_dir


def test_killed_worker_restarts_from_last_checkpoint(corpus, fsdp_straight: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = _torchrun_cmd(_overrides(corpus, run_dir, KILL_STEPS, 4, "checkpoint.interval=5"))
    log_file = tmp_path / "torchrun.log"  # a file, not a pipe: nobody reads while we poll
    with open(log_file, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=corpus["cwd"], env=_env(), stdout=sink,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        killed_at = None
        while killed_at is None:
            if proc.poll() is not None:
                pytest.fail("the run ended before a worker was killed:\n" + log_file.read_text()[-4000:])
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            done = _complete_steps(run_dir)
            steps = _losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
            first = done[0] if done else None
            if first is not None and steps and max(steps) > first:
                workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                         text=True).stdout.split()
                if workers:
                    os.kill(int(workers[-1]), signal.SIGKILL)
                    killed_at = max(steps)
            time.sleep(0.02)
        assert killed_at < KILL_STEPS, "the run finished before the kill; raise KILL_STEPS"
        proc.wait(timeout=150)
    except BaseException:
        _kill_session(proc)
        raise
    out = log_file.read_text()
    assert proc.returncode == 0, out[-6000:]
    assert "resumed from step" in out  # the restarted workers resumed instead of starting over
    assert _losses(run_dir) == _losses(fsdp_straight)


def test_resume_on_another_layout(corpus, fsdp_straight: Path, tmp_path: Path) -> None:
    """Saved by 2 FSDP ranks x batch 4, resumed by 1 process x batch 8: the same global batches."""
    run_dir = _copy_run(fsdp_straight, tmp_path / "run", up_to_step=20)
    log = _train(corpus["cwd"], _overrides(corpus, run_dir, KILL_STEPS, 8, "checkpoint.interval=5"))
    assert "resumed from step 20" in log and "resharding" in log
    got, want = _losses(run_dir), _losses(fsdp_straight)
    assert sorted(got) == sorted(want)
    for step in range(21, KILL_STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


def test_resume_from_fsdp_on_ddp_replicas(corpus, fsdp_straight: Path, tmp_path: Path) -> None:
    """Saved by 2 FSDP ranks (sharded DTensors), resumed by 2 DDP replicas (plain tensors, the
    optimizer state whole on each): the same losses as the uninterrupted FSDP run."""
    run_dir = _copy_run(fsdp_straight, tmp_path / "run", up_to_step=20)
    log = _torchrun(corpus["cwd"], _overrides(corpus, run_dir, KILL_STEPS, 4, "checkpoint.interval=5",
                                              "parallel.dp_replicate=2", "parallel.dp_shard=1"))
    assert "resumed from step 20" in log
    got, want = _losses(run_dir), _losses(fsdp_straight)
    assert sorted(got) == sorted(want)
    for step in range(21, KILL_STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


# ---------------------------------------------------------------------- the run a command names

def test_every_setting_is_either_identity_or_operational() -> None:
    """The two documented lists cover the schema exactly: a new setting must be placed in one."""
    from train.run_identity import IDENTITY_KEYS, OPERATIONAL_KEYS, schema_keys
    keys = schema_keys()
    assert len(keys) == len(set(keys))
    unplaced = [k for k in keys if k not in IDENTITY_KEYS and k not in OPERATIONAL_KEYS]
    assert not unplaced, f"settings in neither list of train/run_identity.py (and docs/runs.md): {unplaced}"
    assert not set(IDENTITY_KEYS) & set(OPERATIONAL_KEYS)
    assert not (set(IDENTITY_KEYS) | set(OPERATIONAL_KEYS)) - set(keys), "listed keys the schema lacks"
    assert {"train.steps", "train.max_nan_steps", "data.num_workers", "eval.every"} <= set(OPERATIONAL_KEYS)
    assert {"train.seed", "model.init_from", "data.source", "optim.lr", "optim.schedule"} <= set(IDENTITY_KEYS)


def test_run_directory_follows_from_the_settings_that_define_the_run(monkeypatch, tmp_path) -> None:
    """Only what is trained names the run: the layout (with the same global batch), the run's
    length, checkpointing, logging, validation, data fetching and the launcher's ids do not; a Hub
    id counts as typed (train/run_identity.py)."""
    from tests._launch import compose_config
    from train.run_identity import default_run_dir, open_run
    base = [*TINY, "data.source=/corpus/c.txt", "train.steps=8", "data.batch_size=4"]
    name = default_run_dir(compose_config(base), 1)
    assert name.parent.name == "outputs" and name.name.startswith("quickstart-")
    for same in (["checkpoint.resume=none"], ["checkpoint.interval=5", "checkpoint.keep=1"],
                 ["data.num_workers=3"], ["logging.every=7"], ["eval.every=3"], ["run_dir=/x"],
                 ["data.cache_dir=/elsewhere"], ["preempt.signals=[SIGUSR2]"], ["train.steps=9"],
                 ["train.max_nan_steps=3"], ["parallel.timeout_s=60"]):
        assert default_run_dir(compose_config(base + same), 1) == name, same
    assert default_run_dir(compose_config(base + ["data.batch_size=2"]), 2) == name  # 2 ranks x 2
    for other in (["model.dim=32"], ["optim.lr=0.001"], ["train.seed=1"], ["optim.schedule=wsd"],
                  ["layerskip.dropout.p_max=0.3"], ["data.source=/corpus/d.txt"], ["data.batch_size=8"],
                  ["model.init_from=org/name"], ["model.init_from=org/name@v1"]):
        assert default_run_dir(compose_config(base + other), 1) != name, other
    monkeypatch.chdir(tmp_path)
    for var, value in (("TORCHELASTIC_RUN_ID", "a1b2"), ("SLURM_JOB_ID", "77")):
        monkeypatch.setenv(var, value)
        cfg = compose_config(base)
        assert open_run(cfg, cfg, 1, is_main=True).dir == name


def test_python_m_train_resumes_by_the_same_command_and_refuses_another(corpus, tmp_path: Path) -> None:
    """Plain `python -m train` (no run_dir), SIGTERM mid-run: exit 75 and a checkpoint; the same
    command resumes it; another command pointed at its folder is refused, naming what differs."""
    from tests._cluster import signal_after
    from tests._launch import start, wait_all
    base = [*TINY, f"data.source={corpus['text']}", f"data.cache_dir={corpus['cache']}",
            "train.steps=150", "checkpoint.interval=0"]
    launch = start([sys.executable, "-m", "train", *base], cwd=tmp_path, env=_env())
    try:
        run_dir = None
        deadline = time.monotonic() + 60
        while run_dir is None:  # the one folder the command made under outputs/
            made = list((tmp_path / "outputs").glob("quickstart-*"))
            run_dir = made[0] if made else None
            assert time.monotonic() < deadline and launch.proc.poll() is None, "no run directory"
            time.sleep(0.05)
        signal_after(launch.proc, run_dir, 3, lambda: launch.proc.send_signal(signal.SIGTERM))
    finally:
        (done,) = wait_all([launch], timeout_s=60)
    assert done.returncode == 75, done.output[-4000:]
    (saved,) = _complete_steps(run_dir)

    # Operational settings changed (the advice of NonFiniteLossError, loader workers, validation)
    # and train.steps raised: the same run resumes and trains to the new end.
    longer = [*base, "train.steps=160", "train.max_nan_steps=2", "data.num_workers=1", "eval.every=155"]
    again = _train(tmp_path, longer, timeout_s=120)
    assert f"resumed from step {saved}" in again and sorted(_losses(run_dir)) == list(range(1, 161))
    assert "train.steps changed from 150 to 160" in again, again[-3000:]
    assert list((tmp_path / "outputs").iterdir()) == [run_dir]
    assert json.loads((run_dir / "identity.json").read_text())["train.steps"] == 160

    shorter = subprocess.run([sys.executable, "-m", "train", *base, "train.steps=100"], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert shorter.returncode == 2, shorter.stderr[-4000:]
    errors = [l for l in shorter.stderr.splitlines() if " ERROR " in l]
    assert len(errors) == 1 and "train.steps=100 ends before step 160" in errors[0], shorter.stderr[-3000:]

    other = subprocess.run([sys.executable, "-m", "train", *base, "optim.lr=0.001", f"run_dir={run_dir}"],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert other.returncode == 2, other.stderr[-4000:]
    assert "optim.lr: run 0.003, this command 0.001" in other.stderr
    assert "checkpoint.resume=none" in other.stderr and "run_dir=" in other.stderr


# ---------------------------------------------------------------------- loader workers, any start method

# `python -m train` with multiprocessing's default start method set first: Python 3.14 makes
# forkserver Linux's default, and the loader's workers (data=files: 2 per rank) must work and die
# with their trainer under each.
_WITH_START_METHOD = ("import multiprocessing, runpy, sys\n"
                      "multiprocessing.set_start_method(sys.argv[1])\n"
                      "sys.argv = ['train', *sys.argv[2:]]\n"
                      "runpy.run_module('train', run_name='__main__', alter_sys=True)")
START_METHODS = ("fork", "spawn", "forkserver")


def _with_start_method(method: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", _WITH_START_METHOD, method, *overrides]


def test_loader_workers_under_every_start_method(corpus, straight: Path, tmp_path: Path) -> None:
    """Under fork, spawn and forkserver: a run's losses are those of the reference run (started
    with Python's default here), and a trainer killed with SIGKILL leaves none of its processes
    (loader workers, fork server) behind."""
    from tests._cluster import job_pids, read_losses, wait_gone
    from tests._launch import LaunchTimeout, start, wait_all
    assert _overrides(corpus, straight, STEPS, 4)[:len(TINY)] == TINY and "data=files" in TINY
    runs = {m: start(_with_start_method(m, _overrides(corpus, tmp_path / m, STEPS, 4)), corpus["cwd"], _env())
            for m in START_METHODS[1:]}  # fork is the reference's own (Python 3.11-3.13's default)
    for m, done in zip(runs, wait_all(list(runs.values()), timeout_s=240)):
        done.check()
        assert _losses(tmp_path / m) == _losses(straight), m

    killed = {m: start(_with_start_method(m, _overrides(corpus, tmp_path / f"killed-{m}", 10_000, 4)),
                       corpus["cwd"], _env()) for m in START_METHODS}
    try:
        deadline = time.monotonic() + 180
        for m, launch in killed.items():  # once its first step is logged, its workers are up
            while not read_losses(tmp_path / f"killed-{m}"):
                assert launch.proc.poll() is None, f"{m}: the run ended before it could be killed"
                assert time.monotonic() < deadline, f"{m}: no step logged within 180 s"
                time.sleep(0.1)
            pids = job_pids(launch.proc.pid)
            assert len(pids) >= 3, f"{m}: expected the trainer and its 2 loader workers, got {pids}"
            launch.proc.send_signal(signal.SIGKILL)
            left = wait_gone(pids, timeout_s=10)
            assert not left, f"{m}: processes outlived the killed trainer: {left}"
    finally:
        for launch in killed.values():
            try:
                wait_all([launch], timeout_s=0.1)
            except LaunchTimeout:
                pass
