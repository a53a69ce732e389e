"""Per-sample layer dropout: which samples each block runs on, for one micro-batch.

Rate (docs/concepts.md): p(l, t) = S(t) · D(l) · p_max, no 1/(1-p) rescaling. A dropped sample
skips block l entirely; the model runs the block on the kept samples only (`keep[l]`), which is
where the compute is saved.

Decisions are a pure function of (seed, step, micro-batch index, layer, sample), drawn on the CPU
from a generator seeded by a hash of (seed, step, micro) — all layers in one draw, before the
forward. Consequences:
- no host-device sync per layer, and nothing random inside the forward, so activation
  checkpointing recomputes exactly the same subsets and torch.compile sees no RNG;
- resuming needs only (seed, step): the "generator state" is the step the trainer already saves;
- tensor-parallel ranks make identical decisions, because the TP rank is not an input at all
  (only the data-parallel rank is, and TP ranks of one group share it and hold the same samples).

Two modes:
- `balanced` (the paper's): how many samples layer l drops is drawn from (seed, step, micro)
  only, so it is the same on every data-parallel rank (equal work, no rank waits for another);
  which local samples are dropped is drawn with the dp rank mixed into the seed.
- `global`: sample i of the global batch decides from (seed, step, micro, i) only. Each rank
  draws the [L, global_batch] matrix and keeps its own columns, so the same global batch gets the
  same decisions whatever the data-parallel layout (work per rank may differ).

Evaluation: the caller simply passes no `keep` to the model.
"""
from __future__ import annotations

import hashlib
import struct
import warnings
from dataclasses import dataclass

import torch

from train.config import DropoutConfig

# Separate random streams for the draws below, so that e.g. the balanced count stream of
# (seed, step, micro) never coincides with the global-mode stream of the same triple.
_STREAM_COUNT, _STREAM_WHICH, _STREAM_GLOBAL = 1, 2, 3


def depth_scale(shape: str, layer: int, n_layers: int) -> float:
    """D(l): 0 at the first block, 1 at the last (`exp`, `linear`), or 1 everywhere (`uniform`).
    A one-layer model's only block is its last, so D = 1 there."""
    x = layer / (n_layers - 1) if n_layers > 1 else 1.0
    if shape == "exp":
        return 2.0 ** x - 1.0
    if shape == "linear":
        return x
    if shape == "uniform":
        return 1.0
    raise ValueError(f"layerskip.dropout.depth must be exp|linear|uniform, got {shape!r}")


def time_scale(shape: str, step: int, total_steps: int) -> float:
    """S(t): 1 (`constant`, continual pretraining / finetuning), or rising from 0 at step 0 to 1 at
    the last step (`exp` = 2^{t/(T-1)} - 1, the paper's from-scratch schedule; `linear`). Steps
    past the end stay at 1; a one-step run is at its end from the start (S = 1)."""
    if shape == "constant":
        return 1.0
    x = min(max(step, 0), total_steps - 1) / (total_steps - 1) if total_steps > 1 else 1.0
    if shape == "exp":
        return 2.0 ** x - 1.0
    if shape == "linear":
        return x
    raise ValueError(f"layerskip.dropout.time must be constant|exp|linear, got {shape!r}")


def layer_rates(cfg: DropoutConfig, n_layers: int, step: int, total_steps: int) -> list[float]:
    """p(l, t) for every block l at step t. An explicit `cfg.rates` list replaces D(l) · p_max
    (and is still scaled by S(t))."""
    cfg.validate(n_layers)
    s = time_scale(cfg.time, step, total_steps)
    if cfg.rates is not None:
        base = [float(r) for r in cfg.rates]
    else:
        base = [depth_scale(cfg.depth, l, n_layers) * cfg.p_max for l in range(n_layers)]
    return [min(1.0, max(0.0, s * b)) for b in base]


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a stable hash of integers (Python's hash() is not meant to be
    stable across versions; blake2b is)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid non-negative seed
    return g


@dataclass
class DropPlan:
    """The decisions for one micro-batch on this rank.

    keep[l]: LongTensor of the local sample indices block l runs on (on the target device), or
    None when block l runs on every sample (rate 0 or nothing drawn). Pass `plan.keep` to
    `model(tokens, keep=...)`. kept_fraction / rates are host floats, known without any sync."""
    keep: list[torch.Tensor | None]
    kept_fraction: list[float]
    rates: list[float]

    @property
    def drop_fraction(self) -> list[float]:
        return [1.0 - k for k in self.kept_fraction]

    @property
    def saved_fraction(self) -> float:
        """Fraction of block compute skipped (every block costs the same per sample)."""
        return sum(self.drop_fraction) / len(self.drop_fraction) if self.drop_fraction else 0.0


class LayerDropout:
    """Chooses, per micro-batch, the samples each block keeps. See the module docstring.

    The constructor takes the data-parallel rank and degree but deliberately no tensor-parallel
    rank: TP ranks of one group must (and do) draw identical decisions."""

    def __init__(self, cfg: DropoutConfig, n_layers: int, total_steps: int, seed: int,
                 dp_rank: int = 0, dp_degree: int = 1):
        cfg.validate(n_layers)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank {dp_rank} is outside the data-parallel degree {dp_degree}")
        self.cfg = cfg
        self.n_layers = n_layers
        self.total_steps = total_steps
        self.seed = int(seed)
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def rates(self, step: int) -> list[float]:
        return layer_rates(self.cfg, self.n_layers, step, self.total_steps)

    def dropped_mask(self, step: int, micro: int, batch_size: int) -> torch.Tensor:
        """[L, batch_size] bool on the CPU: True where block l skips local sample i."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = torch.tensor(self.rates(step), dtype=torch.float64)[:, None]
        L, B = self.n_layers, batch_size
        if self.cfg.mode == "global":
            u = torch.rand(L, self.dp_degree * B, generator=_generator(_STREAM_GLOBAL, self.seed, step, micro),
                           dtype=torch.float64)
            return u[:, self.dp_rank * B:(self.dp_rank + 1) * B] < p
        # balanced: the count per layer is the same draw on every dp rank ...
        u = torch.rand(L, B, generator=_generator(_STREAM_COUNT, self.seed, step, micro), dtype=torch.float64)
        n_drop = (u < p).sum(dim=1, keepdim=True)  # [L, 1], Binomial(B, p_l)
        # ... and which samples is a per-rank random permutation: drop its first n_drop entries.
        g = _generator(_STREAM_WHICH, self.seed, step, micro, self.dp_rank)
        perm = torch.rand(L, B, generator=g).argsort(dim=1)
        first = torch.arange(B)[None, :] < n_drop
        return torch.zeros(L, B, dtype=torch.bool).scatter_(1, perm, first)

    def plan(self, step: int, micro: int, batch_size: int,
             device: torch.device | str = "cpu") -> DropPlan:
        """Decisions for micro-batch `micro` of step `step` (local batch of `batch_size`), with the
        kept indices moved to `device` in one (non-blocking) copy."""
        rates = self.rates(step)
        dropped = self.dropped_mask(step, micro, batch_size)
        n_dropped = dropped.sum(dim=1).tolist()  # CPU tensor: no device sync
        kept = [(~dropped[l]).nonzero().flatten() for l in range(self.n_layers)]
        device = torch.device(device)
        keep: list[torch.Tensor | None] = [None] * self.n_layers
        active = [l for l in range(self.n_layers) if n_dropped[l] > 0]
        if active:
            flat = torch.cat([kept[l] for l in active])
            if device.type == "cuda":
                flat = flat.pin_memory()  # lets the copy below really be asynchronous
            flat = flat.to(device, non_blocking=True)
            for l, part in zip(active, flat.split([len(kept[l]) for l in active])):
                keep[l] = part
        return DropPlan(keep=keep, kept_fraction=[(batch_size - n) / batch_size for n in n_dropped], rates=rates)

    # -- checkpointing: the decisions depend only on (seed, step), and the trainer saves the step.
    def state_dict(self) -> dict:
        return {"seed": self.seed, "mode": self.cfg.mode}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Checks that the checkpoint's dropout stream is the one this run draws; a different seed
        or mode would silently change every later decision, so it is reported (an error when
        strict, a warning otherwise)."""
        problems = []
        if int(state.get("seed", self.seed)) != self.seed:
            problems.append(f"seed {state['seed']} in the checkpoint, train.seed={self.seed} now")
        if state.get("mode", self.cfg.mode) != self.cfg.mode:
            problems.append(f"mode {state['mode']!r} in the checkpoint, "
                            f"layerskip.dropout.mode={self.cfg.mode!r} now")
        if problems:
            msg = "layer dropout state does not match this run: " + "; ".join(problems)
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
