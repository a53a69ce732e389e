"""Straggler attribution: each rank's own compute time per step, and who is slowest.

A rank's step time up to the metrics sync is useless for naming a slow rank: FSDP2's all-gathers
(and DDP's all-reduces) make every rank wait for the slowest one inside the step, so all ranks
report nearly the same time. What differs is the work a rank does between those waits. This
module measures it as the forward time of the transformer blocks, each block timed from just
after its parameters are available (after FSDP2's pre-forward hook, which waits on the
all-gather) to the end of its forward (before FSDP2 reshards). Included: the block's own compute
and, under tensor parallelism, the block's TP collectives (TP peers wait for each other there, so
the slow member's whole TP group reads slow). Not included: the all-gathers, the backward (its
hooks would interleave with FSDP2's gradient reduction), the embedding and the exit heads (equal
on every rank). A slow device, a throttled node or `global` layer dropout's unequal kept-sample
counts all show in the forward as they do in the backward, in proportion.

On CUDA the times are CUDA events on the compute stream (kernels, not Python launch time), read
after the step's existing device->host sync; on CPU, wall-clock time.
"""
from __future__ import annotations

import time

import torch
from torch import nn


class ComputeTimer:
    """Hooks on every block of `model` that add up their forward time; `take()` returns the
    seconds since the last `take()` (call it after the step's device->host sync)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self._seconds = 0.0
        self._started = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._open: torch.cuda.Event | None = None
        self._handles = []
        for block in model.layers.values():
            # Appended after FSDP2's pre-forward hook (the all-gather wait); the post-forward hook
            # prepended, before FSDP2's reshard.
            self._handles.append(block.register_forward_pre_hook(self._begin))
            self._handles.append(block.register_forward_hook(self._end, prepend=True))

    def _begin(self, module, args) -> None:
        if not torch.is_grad_enabled():  # validation and activation recomputation are not timed
            return
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._started = time.perf_counter()

    def _end(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        if self.cuda:
            if self._open is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((self._open, end))
                self._open = None
        else:
            self._seconds += time.perf_counter() - self._started

    def take(self) -> float:
        seconds = self._seconds + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        self._seconds, self._events = 0.0, []
        return seconds

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def straggler_metrics(rank_compute_s: list[float]) -> dict[str, float]:
    """The slowest rank by its own compute time (summed over the logging window), and how much
    longer it computes than the median rank (what the others wait for it, per step, in %)."""
    ranked = sorted(rank_compute_s)
    median = ranked[(len(ranked) - 1) // 2]  # the lower median: with 2 ranks, the other one
    slow = max(range(len(rank_compute_s)), key=rank_compute_s.__getitem__)
    return {"straggler/rank": slow, "straggler/compute_s": rank_compute_s[slow],
            "straggler/median_compute_s": median, "straggler/fastest_compute_s": ranked[0],
            "straggler/excess_pct": 100.0 * (rank_compute_s[slow] / median - 1.0) if median > 0 else 0.0}
