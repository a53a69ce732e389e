"""The state of a training run, as the loop's phases share it: `Run` (everything `build_run` wires
together), `TrainState` (the counters a checkpoint keeps) and `StepResult` (one optimizer step as
every rank agrees on it).

Types only, in a module of their own, so that the pieces of the loop (train/log_window.py,
train/validation.py) can name them without importing the trainer that imports them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallel.dims import ParallelDims
from parallel.distributed import gather_rows
from train.checkpoint import CheckpointManager
from train.config import Config
from train.layerskip.curriculum import ExitCurriculum
from train.layerskip.dropout import LayerDropout
from train.preemption import PreemptionWatch
from train.run_identity import RunHome
from train.spikes import SpikeDetector


@dataclasses.dataclass
class TrainState:
    """Counters that, with the model, optimizer and data position, define where a run stands.
    The LR schedule, curriculum and dropout decisions are pure functions of (seed, step)."""
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0


@dataclasses.dataclass
class Run:
    """Everything `build_run` wires together; the loop's phases read (and `state` records) it."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    dims: ParallelDims
    dp_group: Any
    run_dir: Path
    data: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    dropout: LayerDropout
    curriculum: ExitCurriculum
    ckpt: CheckpointManager
    state: TrainState = dataclasses.field(default_factory=TrainState)
    nan_streak: int = 0  # consecutive steps skipped for a non-finite loss (not checkpointed)
    preemption: PreemptionWatch | None = None  # set by run(): the signals that stop the run
    home: RunHome | None = None  # the run's directory and identity (train/run_identity.py)
    # Loss-spike detection (train/spikes.py): its window and counters travel with the checkpoint.
    spikes: SpikeDetector | None = None
    compute_timer: Any = None  # train/stragglers.py: this rank's own compute time per step
    wandb_run_id: str | None = None  # train/wandb_sink.py: the W&B run this run logs to

    def any_rank_signalled(self) -> bool:
        """Collective (every rank calls it at the same point): did some rank get a preemption
        signal? The step's own sync carries the flag too; this asks between steps."""
        mine = float(self.preemption is not None and self.preemption.requested)
        return any(row[0] > 0 for row in gather_rows([mine]))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def n_layers(self) -> int:
        return self.cfg.model.n_layers

    def extra_state(self) -> dict:
        """The JSON part of a checkpoint: where the run stands besides the tensors."""
        extra = {"train_state": dataclasses.asdict(self.state), "data": self.data.train.state_dict(),
                 "dropout": self.dropout.state_dict(), "curriculum": self.curriculum.state_dict(),
                 "torch_rng": torch.get_rng_state().tolist()}
        if self.spikes is not None:
            extra["spikes"] = self.spikes.state_dict()
        if self.wandb_run_id is not None:
            extra["wandb_run_id"] = self.wandb_run_id
        return extra


@dataclasses.dataclass
class StepResult:
    """One optimizer step, as every rank agrees on it (means over the ranks; tensor-parallel
    ranks of a group hold the same values, so these are the data-parallel means)."""
    lr: float
    weights: dict[int, float]  # active exit -> normalised weight (the last layer included)
    losses: dict[str, float]  # "total" and one entry per active exit (str(layer))
    grad_norm: float
    kept: list[float]  # per block: fraction of the global batch's samples that ran it
    rank_step_s: list[float]  # by rank: seconds from the step's start to its metrics sync
    rank_kept: list[float]  # by rank: mean over blocks of the fraction of its samples kept
    preempt: bool  # some rank received a preemption signal
    final_loss: float = float("nan")  # the final layer's loss (mean over the ranks)
    rank_final_loss: list[float] = dataclasses.field(default_factory=list)  # by rank
    rank_compute_s: list[float] = dataclasses.field(default_factory=list)  # by rank (stragglers.py)
    block_grad_norms: list[float] | None = None  # per block, when measured this step (grad_norms.py)
    spike: str = "ok"  # ok | warn | skip (train/spikes.py)
    skipped: bool = False  # no update was applied (a spike skip): state.step did not advance
