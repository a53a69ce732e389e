"""Weights & Biases sink (optional, `logging.wandb=true`): the same keys as TensorBoard, from
global rank 0 only, in ONE W&B run per training run however often it is preempted and requeued.

The W&B run id is part of the run's state: it is saved in every checkpoint (the trainer's JSON
state) and in RUN_DIR/wandb.json. A resumed run (the same command after a preemption, a requeue,
an elastic restart) takes the id of the checkpoint it resumes, else the one in RUN_DIR/wandb.json,
and continues that W&B run (`wandb.init(id=..., resume="allow")`); a run that starts from step 0
starts a new W&B run. W&B ignores a step lower than one it already holds: after a crash (not a
preemption, which saves the step in progress) the steps between the last checkpoint and the crash
are logged once, by the first attempt.

`WANDB_MODE=offline` (no network) writes the run under RUN_DIR/wandb/ for a later `wandb sync`;
every other WANDB_* variable (WANDB_API_KEY, WANDB_BASE_URL, ...) applies as usual.
W&B's sections come from the keys' first component (`loss`, `val`, `layerskip`, ...): every exit's
curve of one quantity sits in the same section, as in TensorBoard's custom-scalars layout.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
from pathlib import Path

from train.config import ConfigError, LoggingConfig

log = logging.getLogger("train")

ID_FILE = "wandb.json"


def stored_run_id(run_dir: Path) -> str | None:
    path = Path(run_dir) / ID_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def choose_run_id(run_dir: Path, from_checkpoint: str | None, resumed: bool) -> str:
    """The checkpoint's id, else (resuming a checkpoint saved without W&B) the run directory's,
    else a new one."""
    if from_checkpoint:
        return from_checkpoint
    if resumed and (stored := stored_run_id(run_dir)):
        return stored
    alphabet = string.ascii_lowercase + string.digits  # W&B's own run ids: 8 of these
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbSink:
    """`log(step, values)` sends one history row; `close()` finishes the run (uploads, or
    completes the offline files). Build it on rank 0 only."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, run_id: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install "
                              "'layerskip-titan[wandb]' (or pip install wandb)") from None
        run_dir = Path(run_dir)
        tmp = run_dir / f"{ID_FILE}.tmp"
        tmp.write_text(json.dumps({"run_id": run_id, "project": cfg.wandb_project}) + "\n")
        os.replace(tmp, run_dir / ID_FILE)
        self._run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=run_id,
                               resume="allow", name=name, dir=str(run_dir), config=config)
        log.info("W&B run %s (%s)", run_id, os.environ.get("WANDB_MODE", "online"))

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log({k: float(v) for k, v in values.items() if math.isfinite(float(v))}, step=step)

    def close(self) -> None:
        self._run.finish()
