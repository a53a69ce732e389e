"""Profiling on demand: torch.profiler traces of chosen steps, per rank, and CUDA memory snapshots.

`profiling.enable=true` profiles the steps profiling.start_step .. start_step + steps - 1 (numbered
as logged, from 1) and writes, under RUN_DIR/profile/:

    trace-rank<r>-steps<a>-<b>.json      Chrome/Perfetto trace of those steps (open it in
                                         https://ui.perfetto.dev or chrome://tracing)
    memory-rank<r>-steps<a>-<b>.pickle   CUDA, profiling.memory: the allocator's history up to the
                                         end of those steps (drop it on https://pytorch.org/memory_viz)
    oom-rank<r>.pickle                   CUDA, profiling.memory: the same, written when an
                                         allocation fails with out-of-memory

Off (the default) `build_profiler` returns None and the loop makes no profiler call at all.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from train.config import ProfilingConfig

log = logging.getLogger("train")

_MEMORY_HISTORY_ENTRIES = 100_000


def build_profiler(cfg: ProfilingConfig, folder: Path, rank: int, device: torch.device,
                   ) -> StepProfiler | None:
    return StepProfiler(cfg, folder, rank, device) if cfg.enable else None


class StepProfiler:
    def __init__(self, cfg: ProfilingConfig, folder: Path, rank: int, device: torch.device):
        self.cfg, self.folder, self.rank = cfg, Path(folder), rank
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.cuda = device.type == "cuda"
        self.memory = self.cuda and cfg.memory
        self._prof: profile | None = None
        self._range: record_function | None = None  # "train step N" in the trace
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.memory:
            # Recording from the start: the OOM snapshot then shows how memory got there.
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_HISTORY_ENTRIES)
            oom_path = self.folder / f"oom-rank{rank}.pickle"

            def on_oom(device, alloc, device_alloc, device_free) -> None:
                torch.cuda.memory._dump_snapshot(str(oom_path))
                log.error("out of memory on rank %d: allocator snapshot in %s", rank, oom_path)
            attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
            if attach is None:
                log.warning("this torch build has no out-of-memory observer: no OOM snapshot")
            else:
                attach(on_oom)

    def _name(self, kind: str, ext: str) -> Path:
        return self.folder / f"{kind}-rank{self.rank}-steps{self.first}-{self.last}.{ext}"

    def step_begins(self, step: int) -> None:
        """`step`: the number (from 1) of the step about to run."""
        if step == self.first and self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=True, with_stack=False,
                                 profile_memory=self.cfg.memory)
            self._prof.__enter__()
        if self._prof is not None:
            self._range = record_function(f"train step {step}")
            self._range.__enter__()

    def step_ended(self, step: int) -> None:
        if self._prof is not None:
            self._range.__exit__(None, None, None)
            self._range = None
            self._prof.step()
            if step >= self.last:
                self._finish()

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        if self._range is not None:  # closed early (an error in the step)
            self._range.__exit__(None, None, None)
            self._range = None
        prof.__exit__(None, None, None)
        trace = self._name("trace", "json")
        prof.export_chrome_trace(str(trace))
        written = [trace]
        if self.memory:
            snapshot = self._name("memory", "pickle")
            torch.cuda.memory._dump_snapshot(str(snapshot))
            written.append(snapshot)
        if self.rank == 0:
            log.info("profiled steps %d-%d: %s (one per rank)", self.first, self.last,
                     ", ".join(str(p) for p in written))

    def close(self) -> None:
        """End of the run (also on error): write what was profiled so far."""
        if self._prof is not None:
            self._finish()
        if self.memory:
            torch.cuda.memory._record_memory_history(enabled=None)
