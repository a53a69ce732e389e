"""The logging window: the steps since the last metrics line, and the line that reports them
(loss per exit, learning rate, throughput and MFU, the ranks' balance and the straggler, loss
spikes, per-block gradient norms, LayerSkip's saved compute). docs/metrics.md lists every key.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import torch

from parallel.parallelize import wrapper_of
from train.metrics import (MetricsLogger, block_key, block_norm_metrics, device_peak_flops, exit_key,
                           memory_stats, mfu_pct,
                           rank_balance)
from train.model import flops_per_token
from train.run_state import Run, StepResult
from train.stragglers import straggler_metrics

log = logging.getLogger("train")


@dataclasses.dataclass
class Throughput:
    """FLOPs per token of one block and of one exit head (forward + backward), and the peak the
    MFU is measured against."""
    block_flops_tok: float
    head_flops_tok: float
    peak: float


class LogWindow:
    """The steps since the last metrics line: the line reports their averages (exits rotate, so
    each exit is averaged over the steps it was on)."""

    def __init__(self, n_layers: int):
        self.started = time.perf_counter()
        self.tokens, self.flops, self.steps = 0, 0.0, 0
        self.exits: dict[int, list[tuple[float, float]]] = {}  # exit -> [(loss, weight)]
        self.kept = [0.0] * n_layers  # per-block kept fractions summed over the steps
        self.rank_step_s: list[float] = []  # by rank, summed over the steps
        self.rank_kept: list[float] = []
        self.rank_compute_s: list[float] = []  # by rank: own compute time (train/stragglers.py)
        self.final: list[float] = []  # the final layer's loss of each applied step
        self.block_grad_norms: list[float] | None = None  # the window's last measurement
        self.skipped = 0  # spike skips (no update) in the window

    def add(self, result: StepResult, tokens: int, tp: Throughput) -> None:
        kept_mean = sum(result.kept) / len(result.kept)
        self.tokens += tokens
        self.flops += tokens * (tp.block_flops_tok * len(result.kept) * kept_mean
                                + tp.head_flops_tok * len(result.weights))
        self.steps += 1
        self.kept = [a + k for a, k in zip(self.kept, result.kept)]
        self.rank_compute_s = [a + b for a, b in zip(self.rank_compute_s or [0.0] * len(result.rank_compute_s),
                                                     result.rank_compute_s)]
        if result.block_grad_norms is not None:
            self.block_grad_norms = result.block_grad_norms
        if result.skipped:  # its work counts in the throughput; its losses do not describe the model
            self.skipped += 1
        else:
            self.final.append(result.final_loss)
            for l, w in result.weights.items():
                self.exits.setdefault(l, []).append((result.losses[str(l)], w))
        self.rank_step_s = [a + b for a, b in zip(self.rank_step_s or [0.0] * len(result.rank_step_s),
                                                  result.rank_step_s)]
        self.rank_kept = [a + b for a, b in zip(self.rank_kept or [0.0] * len(result.rank_kept),
                                                result.rank_kept)]


def log_window(r: Run, window: LogWindow, last: StepResult, tp: Throughput,
               metrics: MetricsLogger) -> None:
    """Write the metrics line for the window ending with step `last` (state.step)."""
    cfg, L, step = r.cfg, r.n_layers, r.state.step
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)
    dt = time.perf_counter() - window.started
    tps = window.tokens / dt
    mfu = mfu_pct(window.flops, dt, r.world, tp.peak)  # None: above 100 %, the peak is not trusted
    step_time = dt / window.steps
    balance = rank_balance([t / window.steps for t in window.rank_step_s],
                           [k / window.steps for k in window.rank_kept])
    values = {"loss/total": last.losses["total"], "optim/lr": last.lr, "optim/grad_norm": last.grad_norm,
              "throughput/tokens_per_s": tps, "throughput/step_time_s": step_time,
              "throughput/tokens_seen": r.state.tokens_seen,
              "layerskip/saved_block_compute": 1.0 - sum(window.kept) / (L * window.steps),
              **balance, **memory_stats(r.device), **r.data.train_tokens_by_source()}
    if mfu is not None:
        values["throughput/mfu_pct"] = mfu
    if window.final:
        values["loss/final"] = sum(window.final) / len(window.final)
    straggler = (straggler_metrics([t / window.steps for t in window.rank_compute_s])
                 if r.compute_timer is not None and window.rank_compute_s else {})
    values.update(straggler)
    if r.spikes is not None:
        values.update(r.spikes.metrics())
    if window.block_grad_norms is not None:
        values.update(block_norm_metrics(window.block_grad_norms))
    for l, seen in sorted(window.exits.items()):  # l: block index; its output is exit E = l + 1
        values[exit_key("loss", l + 1)] = sum(v for v, _ in seen) / len(seen)
        values[exit_key("layerskip/exit_weight", l + 1)] = sum(w for _, w in seen) / len(seen)
    if cfg.layerskip.dropout.enabled:
        for l in range(L):
            values[block_key("layerskip/drop_fraction", l + 1)] = 1.0 - window.kept[l] / window.steps
    eta = (cfg.train.steps - step) * step_time
    metrics.log(step, values, console=(
        f"step {step:>6}/{cfg.train.steps} | loss {last.losses['total']:.4f} | lr {last.lr:.2e} | "
        f"gnorm {last.grad_norm:.3f} | {tps:,.0f} tok/s | "
        f"MFU {'n/a' if mfu is None else f'{mfu:.1f}%'} | "
        f"ranks {balance['balance/fastest_step_s']:.3f}-{balance['balance/slowest_step_s']:.3f}s | "
        + (f"slowest rank {straggler['straggler/rank']} (+{straggler['straggler/excess_pct']:.0f}% compute) | "
           if straggler and r.world > 1 else "")
        + (f"spikes {r.spikes.detected} (skipped {r.spikes.skipped}) | " if r.spikes is not None and r.spikes.detected
           else "") +
        f"exits E {[l + 1 for l in sorted(window.exits)]} | "
        f"saved {100 * values['layerskip/saved_block_compute']:.1f}% | ETA {eta:.0f}s"))


def throughput_model(r: Run) -> Throughput:
    n_params, _, block_flops_tok = flops_per_token(r.cfg.model, r.model, r.cfg.data.seq_len)
    peak, peak_src = device_peak_flops(r.device)
    if r.is_main:
        d = r.dims
        log.info("model %s: %.1fM parameters, %d layers; world %d (dp %d = replicate %d x shard %d, "
                 "tp %d; %s); peak %.3g TFLOP/s (%s)",
                 r.cfg.model.name, n_params / 1e6, r.n_layers, r.world, d.dp_world, d.dp_replicate,
                 d.dp_shard, d.tp, {"fsdp": "FSDP2", "ddp": "DDP", "plain": "a plain module"}[wrapper_of(r.model)],
                 peak / 1e12, peak_src)
    return Throughput(block_flops_tok=block_flops_tok,
                      head_flops_tok=6 * r.cfg.model.dim * r.cfg.model.vocab_size, peak=peak)
