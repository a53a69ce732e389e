"""Metrics sinks: console, `metrics.jsonl`, TensorBoard and (optional) Weights & Biases, written by
global rank 0 only. docs/metrics.md lists every key and what it means.

Keys are TensorBoard tags (`loss/total`, `loss/exit_04`, `val/loss/exit_04`, `throughput/tokens_per_s`,
...). Exits are named by E, the blocks run (`exit_04`: the output of the 4th block through the
shared norm + head; `exit_L` is the full model), as everywhere a user reads or types an exit
(docs/concepts.md); per-block quantities (layer dropout) by the block's number 1..L
(`block_04` is the block whose output is exit 4). `exit_key` and `block_key` make these names.
The JSONL file also carries the short aliases other tools rely on: `step`, `loss`, `lr`,
`tokens_per_s`, and `val/loss` at validation steps. TensorBoard also gets a custom-scalars layout
(`tensorboard_layout`, the CUSTOM SCALARS tab) overlaying every exit's curve of one quantity.
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import torch

log = logging.getLogger("train")

ALIASES = {"loss/total": "loss", "optim/lr": "lr", "throughput/tokens_per_s": "tokens_per_s",
           "val/loss/final": "val/loss", "optim/grad_norm": "grad_norm"}


def exit_key(prefix: str, exit: int) -> str:
    """The metric name of exit E = `exit` (blocks run, 1..L), e.g. exit_key("val/loss", 4) ==
    "val/loss/exit_04"."""
    return f"{prefix}/exit_{exit:02d}"


def block_key(prefix: str, block: int) -> str:
    """The metric name of the `block`-th block (1..L), e.g. "layerskip/drop_fraction/block_04"."""
    return f"{prefix}/block_{block:02d}"


# What exit_key / block_key write: (prefix, "exit" or "block", number).
KEY_PATTERN = re.compile(r"^(?P<prefix>.+)/(?P<kind>exit|block)_(?P<number>\d+)$")


def tensorboard_layout(n_layers: int) -> dict:
    """TensorBoard custom-scalars layout: every exit's curve of one quantity overlaid in one chart
    (one glance instead of 2L separate charts). Each tag is named exactly (anchored regex)."""
    def tags(prefix: str, key=exit_key) -> list[str]:
        return [f"^{key(prefix, e)}$" for e in range(1, n_layers + 1)]
    return {"LayerSkip: every exit": {
        "training loss by exit E (blocks run)": ["Multiline", tags("loss")],
        "validation loss by exit E (blocks run)": ["Multiline", tags("val/loss")],
        "validation top-1 agreement with the full model": ["Multiline", tags("val/agree")],
        "layer-dropout rate by block (1..L)": ["Multiline", tags("layerskip/drop_fraction", block_key)],
        "early-exit loss weight by exit E": ["Multiline", tags("layerskip/exit_weight")],
        "gradient norm by block (1..L)": ["Multiline", tags("grad_norm", block_key)],
    }}


def block_norm_metrics(norms: list[float]) -> dict[str, float]:
    """Per-block gradient norms as metrics: `grad_norm/block_BB` for block BB = 1..L (the BB-th
    block from the embedding, the last block that exit E = BB runs)."""
    return {block_key("grad_norm", b): v for b, v in enumerate(norms, start=1)}


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, n_layers: int | None = None,
                 wandb=None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = wandb  # train/wandb_sink.WandbSink, or None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of a resumed run in one file; resumed steps are rewritten
        # with the same values, so readers should take the last record of a step.
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            if n_layers:
                self._tb.add_custom_scalars(tensorboard_layout(n_layers))

    def log(self, step: int, values: dict[str, float], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3)}
        for k, v in values.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
            if k in ALIASES:
                record[ALIASES[k]] = record[k]
            if self._tb is not None and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(step, values)
        if console:
            log.info(console)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak dense bf16 FLOP/s of the device for MFU, and where the number comes from. On a CPU there
    is no datasheet number we can know, so we measure the fp32 matmul rate: the best of several
    short trials (a busy machine slows some trials, rarely all of them), so the peak is stable and
    CPU MFU reads low rather than flattering."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "B200": 2250e12, "GB200": 2500e12}
        for key, peak in table.items():
            if key in name:
                return peak, f"{name} datasheet bf16 dense"
        return 312e12, f"{name} (unknown; assuming A100 bf16 dense)"
    n, reps, trials = 1024, 2, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best, (f"measured fp32 matmul, best of {trials} trials, "
                                    f"{torch.get_num_threads()} thread(s) per process")


def mfu_pct(flops: float, seconds: float, world: int, peak: float) -> float | None:
    """Model FLOPs utilisation in percent, or None when it would exceed 100 %: then the peak it is
    measured against is wrong (a CPU peak measured on a busy machine), and no figure is better
    than an impossible one."""
    pct = 100.0 * flops / seconds / world / peak
    return pct if pct <= 100.0 else None


def rank_balance(step_s: list[float], kept: list[float]) -> dict[str, float]:
    """The slowest and the fastest rank (by mean step time over the logging window) with their
    kept-sample fractions: layer dropout in `global` mode gives ranks unequal work by design."""
    slow = max(range(len(step_s)), key=step_s.__getitem__)
    fast = min(range(len(step_s)), key=step_s.__getitem__)
    return {"balance/slowest_rank": slow, "balance/slowest_step_s": step_s[slow],
            "balance/slowest_kept": kept[slow], "balance/fastest_rank": fast,
            "balance/fastest_step_s": step_s[fast], "balance/fastest_kept": kept[fast],
            "balance/kept_min": min(kept), "balance/kept_max": max(kept)}


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory/active_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    try:
        import resource
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"memory/max_rss_gib": rss_kib / 2**20}
    except ImportError:  # pragma: no cover - non-POSIX
        return {}
