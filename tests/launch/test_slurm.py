"""launch/slurm.sbatch on a real one-node Slurm (launch/install_slurm.sh installs and starts it;
.ci/run runs that first): submitted with CPU overrides, the recipes' data settings (2 loader
workers per rank) and without the project's environment on PATH; warned as the time limit would
(`scancel --batch --signal=USR1`, what --signal=B:USR1@120 sends), the job saves, requeues itself
and resumes; requeued by `scontrol requeue` (SIGTERM to every process of the job), it saves and
resumes again; always in the run directory the command names (outputs/quickstart-<hash> in the
repository, removed before and after), ending with the losses of an uninterrupted run."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests._cluster import TINY, default_run_dir, env, read_losses, shared_reference, signal_after
from tests._launch import ROOT, free_port

pytestmark = pytest.mark.slow
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def slurm():
    """A running one-node Slurm, installed and started by the repository's script if need be."""
    if shutil.which("bash") is None:
        pytest.skip(reason="no bash")
    done = subprocess.run(["bash", str(ROOT / "launch" / "install_slurm.sh")], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(reason="Slurm cannot be installed or started here (launch/install_slurm.sh exit "
                    f"{done.returncode}): {done.stdout.strip().splitlines()[-1:]}")


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait_state(job_id: str, states: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _job(job_id).get("JobState", "")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} within {timeout_s:.0f} s: {_job(job_id).get('JobState')}")


class _Job:
    """What signal_after polls (proc.poll()): the job's state, None while it runs or waits."""

    def __init__(self, job_id: str):
        self.job_id, self.returncode = job_id, None

    def poll(self):
        state = _job(self.job_id).get("JobState")
        return None if state in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING") or \
            state.startswith("REQUEUE") else state


def _wait_text(log: Path, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text() if log.is_file() else "")
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in {log} within {timeout_s:.0f} s:\n"
                         + (log.read_text()[-4000:] if log.is_file() else "(no log)"))


def test_sbatch_preempted_at_the_time_limit_and_requeued_resumes_exactly(slurm, tmp_path_factory, tmp_path):
    """One job, two interruptions: the time-limit warning (`scancel --batch --signal=USR1`: the
    script saves and requeues itself), then `scontrol requeue` (SIGTERM to every process of the
    job: the ranks, their loader workers, torchrun and the scripts; Slurm requeues). Each restart
    resumes from the checkpoint of the step in progress; the job ends with the uninterrupted
    run's losses."""
    corpus, want = shared_reference(tmp_path_factory)
    out = tmp_path / "slurm-%j.out"
    overrides = [*TINY, f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}"]
    run_dir = default_run_dir(ROOT, overrides)  # the script runs in the repository
    shutil.rmtree(run_dir, ignore_errors=True)  # an identical earlier command's run
    # No .venv on PATH: the script must find the project's environment by itself.
    e = env(NPROC="2", MASTER_PORT=str(free_port()), PATH=SYSTEM_PATH)
    e.pop("VIRTUAL_ENV", None)
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
         f"--output={out}", str(ROOT / "launch" / "slurm.sbatch"), *overrides],
        capture_output=True, text=True, env=e, cwd=tmp_path, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    log = Path(str(out).replace("%j", job))
    try:
        _wait_state(job, {"RUNNING"}, 60)
        signal_after(_Job(job), run_dir, 3, lambda: subprocess.run(
            ["scancel", "--batch", "--signal=USR1", job], check=True), timeout_s=120)
        # Requeued: Slurm holds a requeued job for its credential lifetime before it may start
        # again (cred_expire: 15 s on the test cluster, 120 s by default). Forcing an earlier
        # start races the revoked credential ("Job credential revoked").
        first = int(_wait_text(log, r'\[launch\] preempted, checkpoint saved: \{"step": (\d+)', 60).group(1))
        _wait_text(log, rf"resumed from step {first} \(", 120)
        signal_after(_Job(job), run_dir, first + 3, lambda: subprocess.run(
            ["scontrol", "requeue", job], check=True), timeout_s=120)
        _wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 240)
        text = log.read_text()
        assert _job(job).get("JobState") == "COMPLETED", text[-4000:]
        assert re.search(r"job \d+ \(restart 0\).*\.venv/bin/torchrun", text), text[:2000]
        saved = [int(s) for s in re.findall(r'\[launch\] preempted, checkpoint saved: \{"step": (\d+)', text)]
        assert len(saved) == 2 and first == saved[0] < saved[1], text[-4000:]
        assert "requeueing job" in text and re.search(r"job \d+ \(restart 2\)", text), text[-4000:]
        assert "is killed by signal" not in text, text[-4000:]  # the loader workers survived SIGTERM
        for step in saved:
            assert re.search(rf"resumed from step {step} \(\S*{run_dir.name}/checkpoints/", text), text[-4000:]
        assert read_losses(run_dir) == want
    finally:
        if _job(job).get("JobState") in ("RUNNING", "PENDING", "REQUEUED"):
            subprocess.run(["scancel", job])
        shutil.rmtree(run_dir, ignore_errors=True)
