"""Early-exit curriculum C(t, E) and loss weights ẽ(t, E) (docs/concepts.md).

Exit E (E = 1..L, blocks run) is the output of the E-th block through the model's own final norm
and head; E = L is the model's normal output and is always in the loss. The exits a run may use
are `ExitConfig.exit_list(L)`; the curriculum switches some of them on at each step t:
- rotational, period R: C(t, E) = 1 iff (E - 1 - t) mod R = 0;
- gradual: C(t, E) = 1 iff t >= (L - E) · T / (2L) — from the last exit down, all on by T/2;
- fixed: every listed exit at every step.

Weights of the active exits are normalised to sum to 1:
- paper: e(E) = e_scale · (E-1)E/2 for E < L, e(L) = (L-1) + e_scale · (L-2)(L-1)/2.
  Note e(1) = 0 (the paper's e(0), its block 0): exit 1 takes part (its loss is computed for
  logging) but never gets gradient, exactly as in the paper's formula.
- uniform: equal weights; linear: proportional to E.

Inside, as in the model's `capture` and the loss (`model(..., capture=[l], ...)`), an exit is held
as the index l = E - 1 of the block whose output it is; `active`, `capture` and `weights` speak
that index. Only the fingerprint, which an error message may show, speaks E.

Everything is a pure function of the step. The curriculum also keeps a `position` (the next step)
with `advance()`, and puts it in its state_dict with the settings it depends on, so a resumed run
continues exactly where it stopped and a changed setting is reported instead of silently shifting
the schedule (a public implementation lost its position on resume).
"""
from __future__ import annotations

import warnings

from train.config import ExitConfig


def exit_scale(layer: int, n_layers: int, e_scale: float) -> float:
    """The paper's unnormalised weight of the output of block `layer` (exit E = layer + 1)."""
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
        # Block indices l = E - 1 of the early exits; never the last block (E = L).
        self.layers = [e - 1 for e in cfg.exit_list(n_layers)]
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
            return 2 * L * step >= (L - 1 - layer) * T  # t >= (L-E)·T/(2L), in integers
        return True  # fixed

    def active(self, step: int) -> list[int]:
        """Block indices (E - 1) of the exits in the loss at `step`, ascending; always ends with
        the last block (E = L)."""
        return [l for l in self.layers if self._on(l, step)] + [self.last]

    def capture(self, step: int) -> list[int]:
        """The hidden states the model must return at `step` (`model(..., capture=...)`)."""
        return self.active(step)[:-1]

    def weights(self, step: int) -> dict[int, float]:
        """{block index E - 1: normalised weight} over the active exits (sums to 1, includes the
        last block)."""
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
        return {"exits": [l + 1 for l in self.layers], "curriculum": self.cfg.curriculum, "period": self.cfg.period,
                "e_scale": self.cfg.e_scale, "weighting": self.cfg.weighting,
                "n_layers": self.n_layers, "total_steps": self.total_steps}

    def state_dict(self) -> dict:
        return {"position": self.position, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore the position. A setting that differs from the checkpoint's would change the
        schedule from here on: an error when strict, a warning otherwise (position restored)."""
        saved, now = dict(state.get("fingerprint", {})), self.fingerprint()
        if "layers" in saved:  # written before exits were counted in blocks run: block l is exit l + 1
            saved["exits"] = [l + 1 for l in saved.pop("layers")]
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k]]
        if changed:
            msg = "early-exit curriculum settings differ from the checkpoint's: " + "; ".join(changed)
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        self.position = int(state["position"])
