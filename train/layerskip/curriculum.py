"""Early-exit curriculum C(t, l) and loss weights ẽ(t, l) (docs/concepts.md).

Exit l means the output of block l through the model's own final norm and head; the last block
L-1 is the model's normal output and is always in the loss. The exits a run may use are
`ExitConfig.layer_list(L)`; the curriculum switches some of them on at each step:
- rotational, period R: C(t, l) = 1 iff (l - t) mod R = 0;
- gradual: C(t, l) = 1 iff t >= (L-1-l) · T / (2L) — from the last layer down, all on by T/2;
- fixed: every listed exit at every step.

Weights of the active exits are normalised to sum to 1:
- paper: e(l) = e_scale · l(l+1)/2 for l < L-1, e(L-1) = (L-1) + e_scale · Σ_{i=0}^{L-2} i.
  Note e(0) = 0: exit 0 takes part (its loss is computed for logging) but never gets gradient,
  exactly as in the paper's formula.
- uniform: equal weights; linear: proportional to l + 1.

Everything is a pure function of the step. The curriculum also keeps a `position` (the next step)
with `advance()`, and puts it in its state_dict with the settings it depends on, so a resumed run
continues exactly where it stopped and a changed setting is reported instead of silently shifting
the schedule (a public implementation lost its position on resume).
"""
from __future__ import annotations

import warnings

from train.config import ExitConfig


def exit_scale(layer: int, n_layers: int, e_scale: float) -> float:
    """The paper's unnormalised e(l)."""
    if layer < n_layers - 1:
        return e_scale * layer * (layer + 1) / 2
    return (n_layers - 1) + e_scale * (n_layers - 2) * (n_layers - 1) / 2


class ExitCurriculum:
    def __init__(self, cfg: ExitConfig, n_layers: int, total_steps: int):
        cfg.validate(n_layers)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg = cfg
        self.n_layers = n_layers
        self.total_steps = total_steps
        self.last = n_layers - 1
        self.layers = cfg.layer_list(n_layers)  # never contains the last layer
        self.position = 0

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def _on(self, layer: int, step: int) -> bool:
        c = self.cfg.curriculum
        if c == "rotational":
            return (layer - step) % self.cfg.period == 0
        if c == "gradual":
            L, T = self.n_layers, self.total_steps
            return 2 * L * step >= (L - 1 - layer) * T  # t >= (L-1-l)·T/(2L), in integers
        return True  # fixed

    def active(self, step: int) -> list[int]:
        """Exit layers in the loss at `step`, ascending; always ends with the last layer."""
        return [l for l in self.layers if self._on(l, step)] + [self.last]

    def capture(self, step: int) -> list[int]:
        """The hidden states the model must return at `step` (`model(..., capture=...)`)."""
        return self.active(step)[:-1]

    def weights(self, step: int) -> dict[int, float]:
        """{exit layer: normalised weight} over the active exits (sums to 1, includes L-1)."""
        active = self.active(step)
        w = self.cfg.weighting
        if w == "paper":
            raw = [exit_scale(l, self.n_layers, self.cfg.e_scale) for l in active]
        elif w == "linear":
            raw = [float(l + 1) for l in active]
        else:
            raw = [1.0] * len(active)
        total = sum(raw)
        if total <= 0:  # only possible for a one-layer model under the paper weighting (e = 0)
            return {l: float(l == self.last) for l in active}
        return {l: r / total for l, r in zip(active, raw)}

    def advance(self) -> dict[int, float]:
        """Weights for the step at `position`, then move to the next step."""
        w = self.weights(self.position)
        self.position += 1
        return w

    # -- checkpointing
    def fingerprint(self) -> dict:
        """Every setting the schedule depends on."""
        return {"layers": self.layers, "curriculum": self.cfg.curriculum, "period": self.cfg.period,
                "e_scale": self.cfg.e_scale, "weighting": self.cfg.weighting,
                "n_layers": self.n_layers, "total_steps": self.total_steps}

    def state_dict(self) -> dict:
        return {"position": self.position, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore the position. A setting that differs from the checkpoint's would change the
        schedule from here on: an error when strict, a warning otherwise (position restored)."""
        saved, now = state.get("fingerprint", {}), self.fingerprint()
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            msg = "early-exit curriculum settings differ from the checkpoint's: " + "; ".join(changed)
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        self.position = int(state["position"])
