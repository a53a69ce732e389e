"""`bash launch/quickstart.sh` is named by its command: run twice, the second run finds the first's
run directory, says the run is complete and exports it again (shrunk in size and steps only; the
script runs in the repository, outputs/quickstart-<hash>, removed before and after)."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests._cluster import default_run_dir, env
from tests._launch import ROOT, start, wait_all

pytestmark = pytest.mark.slow
TINY = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.vocab_size=512",
        "model.multiple_of=16", "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=2",
        "data.max_chars=300000", "train.steps=3", "eval.every=0", "eval.batches=1", "logging.every=1",
        "logging.tensorboard=false", "checkpoint.interval=0"]


def _installed() -> bool:
    """launch/_env.sh's own test: would the script (re)install the project into .venv now?"""
    stamp = ROOT / ".venv" / ".installed"
    return stamp.is_file() and stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime


@pytest.mark.skipif(not _installed(), reason="the project's .venv is not installed as launch/_env.sh "
                    "expects (the quickstart would install it first): run `bash launch/test.sh`")
def test_quickstart_twice_resumes_its_run_and_exports_again(tmp_path):
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'data'}"]
    run_dir = default_run_dir(ROOT, ["experiment=quickstart", *overrides])
    shutil.rmtree(run_dir, ignore_errors=True)
    e = env(NPROC="2", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        outputs = []
        for _ in range(2):
            (done,) = wait_all([start(["bash", str(ROOT / "launch" / "quickstart.sh"), *overrides],
                                     cwd=tmp_path, env=e)], timeout_s=240)
            outputs.append(done.check().output)
            assert f"in {run_dir.relative_to(ROOT)}" in done.output, done.output[-3000:]
            assert (run_dir / "hf" / "config.json").is_file()
        first, second = outputs
        assert "resumed from step" not in first and "done: 3 steps" in first
        assert "resumed from step 3 (" in second and "the run is complete (step 3 of train.steps=3)" in second
        assert re.search(r"exported \S+step-0000003 to \S+/hf", second), second[-3000:]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
