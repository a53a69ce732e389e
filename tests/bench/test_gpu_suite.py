"""`bash bench/gpu_suite.sh --dry-run` end to end on a CPU, from the checkout alone, so the GPU
command cannot rot.

Same script, same steps as on a GPU (torchtitan's own trainer in its CPU mode with the configuration
in bench/titan_baseline/, our trainer through our data path, the paper setting,
bench/layerskip_cost.py, the dry-run estimate, the report), with tiny shapes. Nothing is fetched:
the packages are the test environment's, as for a user who installed the project.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ESTIMATE_KEYS = {"world_size", "param_bytes_per_rank", "grad_bytes_per_rank", "optimizer_bytes_per_rank",
                 "activation_bytes_per_rank", "total_bytes_per_rank", "fits"}

pytestmark = pytest.mark.slow


def test_gpu_suite_dry_run(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    # an empty kit: no fetched wheels, whatever the developer's .gpu_suite/ holds
    env = {**os.environ, "GPU_SUITE_KIT": str(tmp_path / "no_kit"), "GPU_SUITE_WORK": str(work), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    log = (out / "suite.log").read_text() if (out / "suite.log").is_file() else proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    report = json.loads((out / "suite.json").read_text())
    assert report["mode"] == "dry_run" and report["failed_or_missing"] == []
    assert report["hf_compare"]["ours"]["step_s_median"] > 0 and report["hf_compare"]["hf"]["tied"]
    for run in ("titan_eager", "ours_eager", "paper"):
        r = report["runs"][run]
        assert r["tps_per_gpu_median"] > 0 and r["steps_logged"] >= 2, run
    # torchtitan's own trainer ran, with the configuration kept in bench/titan_baseline/
    assert "torchtitan 0.2.2" in (work / "titan_eager.log").read_text()
    checks = {c["check"]: c for c in report["checks"]}
    assert all(c["value"] is not None for name, c in checks.items() if "compiled" not in name)
    assert report["document_mask"]["results"]["tiny"]["masked_over_causal"] > 0
    assert set(report["estimate"]) >= ESTIMATE_KEYS
    assert report["estimate"]["param_bytes_per_rank"] == report["estimate"]["param_count"] * 4
    assert (out / "suite.md").read_text().startswith("GPU suite (dry_run")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_on_gpu_figures(tmp_path):
    """The GPU-only branch of the report (not reached by the dry run): ratios and verdicts from
    figures laid out as bench/titan_baseline/, our trainer and layerskip_cost.py write them."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_suite_report", ROOT / "bench" / "gpu_suite_report.py")
    report_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report_mod)
    anchor = ROOT / "bench" / "titan_baseline"
    work = tmp_path
    steps = ["titan_eager", "prep", "estimate", "ours_eager", "titan_compile", "ours_compile",
             "layerskip_cost", "hf_compare", "paper", "document_mask"]
    (work / "status.txt").write_text("".join(f"{s} 0\n" for s in steps))
    (work / "titan_eager.log").write_text("torch 2.11.0+cu130 cuda=13.0 avail=True dev=NVIDIA H100 | torchtitan 0.2.2\n")
    for mode, tps in (("eager", 1000.0), ("compile", 2000.0)):
        _jsonl(work / "titan" / f"metrics_1B_{mode}.jsonl",
               [{"step": s, "throughput(tps)": tps if s > 1 else 1.0, "tflops": 1.0, "mfu(%)": 40.0,
                 "loss_metrics/global_avg_loss": 10.0, "memory/max_active(GiB)": 50.0,
                 "memory/max_reserved(GiB)": 60.0} for s in range(1, 5)])
    for name, tps in (("ours_eager", 1100.0), ("ours_compile", 1800.0), ("paper", 1500.0)):
        _jsonl(work / "runs" / name / "metrics.jsonl",
               [{"step": s, "tokens_per_s": tps if s > 1 else 1.0, "throughput/mfu_pct": 41.0,
                 "loss": 10.0, "memory/active_gib": 40.0} for s in range(1, 5)])
    cost = {f"drop_p{p}": {"realised_over_ideal": v} for p, v in (("0.1", 0.9), ("0.2", 0.7), ("0.5", 1.0))}
    cost |= {"exit_rot4": {"per_exit_over_floor": 1.1}, "exit_all": {"per_exit_over_floor": 1.3,
                                                                     "peak_vs_final_fused": 1.02}}
    (work / "layerskip_cost.json").write_text(json.dumps({"meta": {}, "results": cost}))
    (work / "estimate.json").write_text(json.dumps({"total_bytes_per_rank": 44 * 2**30}))
    (work / "hf_compare.json").write_text(json.dumps({"ours_over_hf_speed_1proc": 1.2,
                                                      "validation": {"over_flop_bound": 1.4}}))
    (work / "document_mask.json").write_text(json.dumps({"results": {"llama3_2_1b": {"masked_over_causal": 1.07}}}))
    report = report_mod.build(work, anchor, "1B", warmup=1, dry=False)
    assert report["failed_or_missing"] == [] and report["device"] == "NVIDIA H100"
    verdicts = {c["check"]: (round(c["value"], 3), c["verdict"]) for c in report["checks"]}
    assert verdicts["tokens/s vs torchtitan, LayerSkip off, eager"] == (1.1, "PASS")
    assert verdicts["tokens/s vs torchtitan, LayerSkip off, compiled"] == (0.9, "MISS")
    assert verdicts["layer dropout p_max 0.2: realised / ideal saving"] == (0.7, "MISS")
    assert verdicts["time per exit / three-GEMM bound, every layer"] == (1.3, "MISS")
    assert verdicts["peak memory, every layer exiting / no exits"] == (1.02, "PASS")
    assert verdicts["step speed vs HF LlamaForCausalLM (SmolLM2 shape, fp32), LayerSkip off"] == (1.2, "PASS")
    assert report["info"]["peak memory ours / torchtitan, eager"] == pytest.approx(0.8)
    assert report["info"]["dry-run estimate / measured peak, ours eager"] == pytest.approx(1.1)
    assert report["info"]["document masking: step time block_causal / causal (Llama 3.2 1B recipe)"] == 1.07
    assert "| ours_compile | 1,800 |" in report_mod.table(report)
