"""The GPU suite's one JSON and one table: bench/gpu_suite.sh's runs as ratios against the targets.

Reads what the suite's steps left in its work folder -- torchtitan's metrics (summarised by
bench/titan_baseline/summarize.py), our runs' metrics.jsonl, bench/layerskip_cost.py's JSON and the dry run's
estimate -- and writes suite.json and suite.md into --out. Exit status 1 if a step failed or left
no figures; missed targets are reported, not an error (they are the measurement).

Targets: tokens/s against torchtitan >= 1.00 with LayerSkip off, eager
and compiled; realised layer-dropout saving >= 80 % of ideal; time per early exit <= 1.25x the
three-GEMM bound; peak memory with every layer exiting <= 1.05x that with none.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path


def _anchor_summarize(anchor: Path):
    spec = importlib.util.spec_from_file_location("anchor_summarize", anchor / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.summarize


def ours(run_dir: Path, warmup: int) -> dict | None:
    """Median tokens/s and MFU over the logged steps after `warmup`, peak memory over the run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_s" in r]
    if not rows:
        return None
    steady = [r for r in rows if r["step"] > warmup] or rows
    med = lambda k: statistics.median(float(r[k]) for r in steady)  # noqa: E731
    mem = [r.get("memory/active_gib", r.get("memory/max_rss_gib", float("nan"))) for r in rows]
    return {"steps_logged": len(rows), "tps_per_gpu_median": med("tokens_per_s"),
            "mfu_pct_median": med("throughput/mfu_pct"), "loss_first": rows[0]["loss"],
            "loss_last": rows[-1]["loss"], "peak_active_gib": max(float(m) for m in mem),
            "memory_kind": "cuda max allocated" if "memory/active_gib" in rows[0] else "process max RSS"}


def _check(name: str, value: float | None, op: str, target: float, dry: bool) -> dict:
    ok = None if value is None else (value >= target if op == ">=" else value <= target)
    verdict = "n/a" if value is None else ("dry run" if dry else ("PASS" if ok else "MISS"))
    return {"check": name, "value": value, "target": f"{op} {target:g}", "pass": None if dry else ok,
            "verdict": verdict}


def build(work: Path, anchor: Path, flavor: str, warmup: int, dry: bool) -> dict:
    summarize = _anchor_summarize(anchor)
    status = {}
    status_file = work / "status.txt"
    if status_file.is_file():
        for line in status_file.read_text().splitlines():
            name, rc = line.split()
            status[name] = rc
    runs: dict[str, dict | None] = {}
    for mode in ("eager", "compile"):
        path = work / "titan" / f"metrics_{flavor}_{mode}.jsonl"
        summary = summarize(str(path), warmup) if path.is_file() else None
        if summary is not None:  # the kit's name for its peak, under ours too
            summary["peak_active_gib"] = summary["peak_max_active_gib"]
        runs[f"titan_{mode}"] = summary
    for name in ("ours_eager", "ours_compile", "paper"):
        runs[name] = ours(work / "runs" / name, warmup)
    cost_path = work / "layerskip_cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else None
    cmp_path = work / "hf_compare.json"  # bench/smollm2_speed.py
    hf_compare = json.loads(cmp_path.read_text()) if cmp_path.is_file() else None
    mask_path = work / "document_mask.json"  # bench/document_mask_cost.py
    doc_mask = json.loads(mask_path.read_text()) if mask_path.is_file() else None
    est_path = work / "estimate.json"
    estimate = json.loads(est_path.read_text()) if est_path.is_file() else None

    def ratio(a: str, b: str, key: str) -> float | None:
        ra, rb = runs.get(a), runs.get(b)
        return ra[key] / rb[key] if ra and rb and rb[key] else None

    def cost_of(case: str, key: str) -> float | None:
        return cost["results"].get(case, {}).get(key) if cost else None

    checks = [
        _check("tokens/s vs torchtitan, LayerSkip off, eager", ratio("ours_eager", "titan_eager", "tps_per_gpu_median"), ">=", 1.0, dry),
        _check("tokens/s vs torchtitan, LayerSkip off, compiled", ratio("ours_compile", "titan_compile", "tps_per_gpu_median"), ">=", 1.0, dry),
        *[_check(f"layer dropout p_max {p}: realised / ideal saving", cost_of(f"drop_p{p}", "realised_over_ideal"), ">=", 0.8, dry)
          for p in ("0.1", "0.2", "0.5")],
        _check("time per exit / three-GEMM bound, rotational R=4", cost_of("exit_rot4", "per_exit_over_floor"), "<=", 1.25, dry),
        _check("time per exit / three-GEMM bound, every layer", cost_of("exit_all", "per_exit_over_floor"), "<=", 1.25, dry),
        _check("peak memory, every layer exiting / no exits", cost_of("exit_all", "peak_vs_final_fused"), "<=", 1.05, dry),
        _check("step speed vs HF LlamaForCausalLM (SmolLM2 shape, fp32), LayerSkip off",
               hf_compare.get("ours_over_hf_speed_1proc") if hf_compare else None, ">=", 1.0, dry),
    ]
    info = {
        "paper setting MFU % (compiled on GPU)": runs["paper"]["mfu_pct_median"] if runs.get("paper") else None,
        "torchtitan MFU % (compiled)": runs["titan_compile"]["mfu_pct_median"] if runs.get("titan_compile") else None,
        "paper setting tokens/s vs ours with LayerSkip off": ratio("paper", "ours_compile" if runs.get("ours_compile") else "ours_eager", "tps_per_gpu_median"),
        "peak memory ours / torchtitan, eager": ratio("ours_eager", "titan_eager", "peak_active_gib"),
        "validation of every exit / FLOP bound (SmolLM2 shape; GPU: datasheet bf16 peak)": (
            hf_compare["validation"]["over_flop_bound"] if hf_compare and "validation" in hf_compare else None),
        "document masking: step time block_causal / causal (Llama 3.2 1B recipe)": (
            next(iter(doc_mask["results"].values()))["masked_over_causal"] if doc_mask else None),
        # (in a dry run: a bf16 estimate against an fp32 CPU process's resident set: no meaning)
        "dry-run estimate / measured peak, ours eager": (
            estimate["total_bytes_per_rank"] / 2**30 / runs["ours_eager"]["peak_active_gib"]
            if estimate and runs.get("ours_eager") else None),
    }
    device, torch_version = "unknown", "unknown"  # as bench/titan_baseline/run.sh's first line reports them
    titan_log = work / "titan_eager.log"
    for line in (titan_log.read_text(errors="replace").splitlines() if titan_log.is_file() else []):
        if line.startswith("torch ") and " dev=" in line:
            torch_version = line.split()[1]
            device = line.split(" dev=", 1)[1].split(" | ")[0]
            break
    expected = ["titan_eager", "prep", "ours_eager", "paper", "layerskip_cost", "estimate", "hf_compare",
                "document_mask"]
    if not dry or "titan_compile" in status:
        expected += ["titan_compile", "ours_compile"]
    missing = [n for n in expected if status.get(n) != "0"]
    if status.get("decode") not in (None, "0", "skipped"):  # run (not skipped for time) and failed
        missing.append("decode")
    decode_path = work / "decode.json"  # bench/decode_speed.py
    decode = json.loads(decode_path.read_text()) if decode_path.is_file() else None
    missing += [n for n in ("titan_eager", "ours_eager", "paper") if runs.get(n) is None and n not in missing]
    if cost is None and "layerskip_cost" not in missing:
        missing.append("layerskip_cost")
    return {"mode": "dry_run" if dry else "gpu", "device": device, "torch": torch_version,
            "steps": status, "failed_or_missing": missing, "runs": runs, "checks": checks, "info": info,
            "layerskip_cost": cost, "estimate": estimate, "hf_compare": hf_compare, "decode": decode,
            "document_mask": doc_mask}


def table(report: dict) -> str:
    def fmt(v, spec=".3f"):
        return "" if v is None else format(v, spec)
    lines = [f"GPU suite ({report['mode']}, {report['device']}, torch {report['torch']})", "",
             "| run | tokens/s (median) | MFU % | peak memory GiB | loss first → last |",
             "|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        if r is None:
            lines.append(f"| {name} | not run | | | |")
            continue
        peak = r["peak_active_gib"]
        lines.append(f"| {name} | {r['tps_per_gpu_median']:,.0f} | {r['mfu_pct_median']:.1f} | "
                     f"{fmt(peak, '.1f')} | {fmt(r.get('loss_first'), '.2f')} → {fmt(r.get('loss_last'), '.2f')} |")
    lines += ["", "| check | measured | target | verdict |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['check']} | {fmt(c['value'])} | {c['target']} | {c['verdict']} |")
    for k, v in report["info"].items():
        lines.append(f"| {k} | {fmt(v)} | (reported) | |")
    if report.get("decode"):
        d = report["decode"]
        lines += ["", f"Decoding ({d['model']}, {d['dtype']}, exit {d['exit']}, {d['draft']} drafts a round): "
                  "tokens/s and speedup over plain decoding", "",
                  "| mode | batch | ours plain | ours self-speculative | acceptance | HF plain | "
                  "HF assistant_early_exit | HF draft model |", "|---|---|---|---|---|---|---|---|"]
        for r in d["results"]:
            o, h = r["ours"], r.get("hf")
            hf_cells = (f"{h['plain_tokens_per_s']:,.0f} | {h['early_exit']['tokens_per_s']:,.0f} "
                        f"({h['early_exit']['speedup']:.2f}x) | {h['draft_model']['tokens_per_s']:,.0f} "
                        f"({h['draft_model']['speedup']:.2f}x)") if h else " | | "
            lines.append(f"| {r['mode']} | {r['batch_size']} | {o['plain_tokens_per_s']:,.0f} | "
                         f"{o['spec_tokens_per_s']:,.0f} ({o['speedup']:.2f}x) | {o['acceptance_rate']:.2f} | {hf_cells} |")
    if report["failed_or_missing"]:
        lines += ["", "failed or missing steps: " + ", ".join(report["failed_or_missing"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--anchor", type=Path, required=True)
    ap.add_argument("--flavor", required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--elapsed", type=int)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    report = build(args.work, args.anchor, args.flavor, args.warmup, args.dry_run)
    report["elapsed_s"] = args.elapsed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = table(report)
    (args.out / "suite.md").write_text(text + "\n")
    print(text)
    sys.exit(1 if report["failed_or_missing"] else 0)


if __name__ == "__main__":
    main()
