"""`bash bench/gpu_suite.sh --dry-run` end to end on this CPU, so the GPU command cannot rot.

Same script, same steps as on the GPU (the anchor kit in its CPU mode from the carried wheels,
our trainer through our data path, the paper setting, bench/layerskip_cost.py, the dry-run
estimate, the report), with tiny shapes. The wheels come from bench/fetch_wheels.sh: the
developer's .gpu_suite/ if it is complete, else fetched into a temporary folder (needs PyPI).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ESTIMATE_KEYS = {"world_size", "param_bytes_per_rank", "grad_bytes_per_rank", "optimizer_bytes_per_rank",
                 "activation_bytes_per_rank", "total_bytes_per_rank", "fits"}

pytestmark = pytest.mark.slow


def _kit(tmp_path: Path) -> Path:
    kit = ROOT / ".gpu_suite"
    if list((kit / "anchor" / "wheels").glob("torchtitan-*.whl")) and list((kit / "wheels").glob("hydra_core-*.whl")):
        return kit
    kit = tmp_path / "kit"
    subprocess.run(["bash", str(ROOT / "bench" / "fetch_wheels.sh")], check=True, timeout=300,
                   env={**os.environ, "GPU_SUITE_KIT": str(kit)})
    return kit


def test_gpu_suite_dry_run(tmp_path):
    kit = _kit(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "GPU_SUITE_KIT": str(kit), "GPU_SUITE_WORK": str(work)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    log = (out / "suite.log").read_text() if (out / "suite.log").is_file() else proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    report = json.loads((out / "suite.json").read_text())
    assert report["mode"] == "dry_run" and report["failed_or_missing"] == []
    for run in ("titan_eager", "ours_eager", "paper"):
        r = report["runs"][run]
        assert r["tps_per_gpu_median"] > 0 and r["steps_logged"] >= 2, run
    # torchtitan came from the carried wheels, unpacked by the anchor kit (not from this venv)
    assert "titan/vendor/torchtitan" in (work / "titan_eager.log").read_text()
    checks = {c["check"]: c for c in report["checks"]}
    assert all(c["value"] is not None for name, c in checks.items() if "compiled" not in name)
    assert set(report["estimate"]) >= ESTIMATE_KEYS
    assert report["estimate"]["param_bytes_per_rank"] == report["estimate"]["param_count"] * 4
    assert (out / "suite.md").read_text().startswith("GPU suite (dry_run")
