"""Python's garbage collector on a schedule: off between steps, one collection every N steps.

Left alone, the collector runs whenever allocations cross its thresholds, at a different moment on
each rank: a pause of tens to hundreds of milliseconds on one rank is a pause for all of them at
the next collective. As torchtitan (`gc_freq`, 50 by default) and OLMo-core's GC callback do,
automatic collection is disabled and every rank collects at the same step (generation 1: young
objects, cheap; reference cycles that survive longer are left to the final full collection).
"""
from __future__ import annotations

import gc
import logging

log = logging.getLogger("train")


class GarbageCollection:
    def __init__(self, every: int):
        self.every = every
        self._was_enabled = gc.isenabled()
        if every > 0:
            gc.disable()
            gc.collect()  # start from a clean heap: what the build left behind

    def step(self, step: int) -> None:
        """Call after each completed step (every rank at the same step)."""
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every > 0 and self._was_enabled:
            gc.enable()
