"""Loss-spike detection: is this step's loss (or gradient norm) far above the recent ones?

The signal is the final layer's loss, not the total: with LayerSkip the total moves with the
rotating exit weights by design, while the final layer's loss is as smooth as a baseline's. The
loss compared is the largest over the data-parallel ranks (one rank's corrupted batch shows there
before the mean dilutes it), the gradient norm is the global one before clipping.

A step is a spike when, with a full window of the last `window` accepted steps, either value is
more than `sigma` standard deviations above the window's mean (OLMo-core's SkipStepAdamW: 6 sigma
over 128 steps). Then, by `mode`:
    off    nothing is measured;
    warn   a warning names the step; the update is applied and enters the window;
    skip   the update is not applied and the step is not counted: the next batch is trained at the
           same step number (as if the spiky batch had not been in the data). After `max_skips`
           consecutive skips the level is taken as real (a new data source, say): the update is
           applied and the window starts again.
Every rank holds the same window and sees the same gathered values, so every rank reaches the
same verdict without a further collective. The window and counters are saved in the checkpoint
and restored exactly (floats round-trip through JSON).
"""
from __future__ import annotations

import math
from collections import deque

OK, WARN, SKIP = "ok", "warn", "skip"


class SpikeDetector:
    def __init__(self, mode: str, sigma: float, window: int, max_skips: int):
        self.mode, self.sigma, self.max_skips = mode, sigma, max_skips
        self.loss: deque[float] = deque(maxlen=window)
        self.grad_norm: deque[float] = deque(maxlen=window)
        self.detected = 0  # spikes seen (every mode but off)
        self.skipped = 0  # updates not applied
        self.consecutive = 0  # skips in a row
        self.last_z = (0.0, 0.0)  # (loss, grad norm) z-scores of the last step checked

    @staticmethod
    def _z(value: float, window: deque) -> float:
        n = len(window)
        mean = sum(window) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / n)
        # A flat window (std 0) would make any change infinitely many sigmas: floor the spread at
        # a millionth of the level.
        return (value - mean) / max(std, 1e-6 * abs(mean), 1e-12)

    def check(self, loss: float, grad_norm: float) -> str:
        """The verdict for a step with these (finite) values: OK, WARN or SKIP; updates the window
        and counters accordingly."""
        if self.mode == "off":
            return OK
        if len(self.loss) < self.loss.maxlen:  # warming up: every step is accepted
            self._accept(loss, grad_norm)
            self.last_z = (0.0, 0.0)
            return OK
        self.last_z = (self._z(loss, self.loss), self._z(grad_norm, self.grad_norm))
        if max(self.last_z) <= self.sigma:
            self.consecutive = 0
            self._accept(loss, grad_norm)
            return OK
        self.detected += 1
        if self.mode == "skip":
            if self.consecutive < self.max_skips:
                self.consecutive += 1
                self.skipped += 1
                return SKIP
            self.loss.clear()  # a lasting new level: apply, and measure from here
            self.grad_norm.clear()
        self.consecutive = 0
        self._accept(loss, grad_norm)
        return WARN

    def _accept(self, loss: float, grad_norm: float) -> None:
        self.loss.append(loss)
        self.grad_norm.append(grad_norm)

    def metrics(self) -> dict[str, float]:
        if self.mode == "off":
            return {}
        return {"spike/detected": self.detected, "spike/skipped": self.skipped,
                "spike/loss_zscore": self.last_z[0], "spike/grad_norm_zscore": self.last_z[1]}

    def state_dict(self) -> dict:
        return {"loss": list(self.loss), "grad_norm": list(self.grad_norm), "detected": self.detected,
                "skipped": self.skipped, "consecutive": self.consecutive, "last_z": list(self.last_z)}

    def load_state_dict(self, state: dict) -> None:
        self.loss.clear()
        self.loss.extend(state["loss"][-self.loss.maxlen:])
        self.grad_norm.clear()
        self.grad_norm.extend(state["grad_norm"][-self.grad_norm.maxlen:])
        self.detected, self.skipped = state["detected"], state["skipped"]
        self.consecutive = state["consecutive"]
        self.last_z = tuple(state["last_z"])
