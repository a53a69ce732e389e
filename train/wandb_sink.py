"""Weights & Biases sink (optional, `logging.wandb=true`): the same keys as TensorBoard, from
global rank 0 only, in ONE W&B run per training run however often it is preempted and requeued.

The W&B run id is part of the run's state: it is saved in every checkpoint (the trainer's JSON
state) and in RUN_DIR/wandb.json. A resumed run (the same command after a preemption, a requeue,
an elastic restart) takes the id of the checkpoint it resumes, else the one in RUN_DIR/wandb.json,
and continues that W&B run (`wandb.init(id=..., resume="allow")`); a run that starts from step 0
starts a new W&B run. W&B ignores a step lower than one it already holds: after a crash (not a
preemption, which saves the step in progress) the steps between the last checkpoint and the crash
are logged once, by the first attempt.

A preemption signal sent to every process of the job (as Slurm and `scancel` do) also stops W&B's
own service process, which then loses what it had not yet written or uploaded. So a resumed run
first backfills its W&B history from RUN_DIR/metrics.jsonl (every step W&B does not hold yet, up to
the resumed step); the history has no gap however the last attempt ended.

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

    def backfill(self, metrics_jsonl: Path, upto_step: int) -> int:
        """Log the records of `metrics_jsonl` (the last one of each step) from the first step
        this W&B run does not hold up to `upto_step`; returns how many steps were sent."""
        if self._run is None or not Path(metrics_jsonl).is_file():
            return 0
        from train.metrics import ALIASES
        first = int(getattr(self._run, "step", 0) or 0)  # the next step W&B expects (0 offline)
        rows: dict[int, dict[str, float]] = {}
        for line in Path(metrics_jsonl).read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            step = record.get("step")
            if not isinstance(step, int) or not first <= step <= upto_step:
                continue
            values = {k: v for k, v in record.items() if k not in ("step", "time")
                      and k not in ALIASES.values() and isinstance(v, (int, float))}
            rows.setdefault(step, {}).update(values)  # training and validation records of a step
        for step in sorted(rows):
            self.log(step, rows[step])
        return len(rows)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._run is None:
            return
        try:
            self._run.log({k: float(v) for k, v in values.items() if math.isfinite(float(v))}, step=step)
        except Exception as e:  # noqa: BLE001 - W&B trouble must never stop the training
            self._failed(e)

    def close(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as e:  # noqa: BLE001
            self._failed(e)
        self._run = None

    def _failed(self, error: Exception) -> None:
        """W&B (its service process, the network) failed: warn once and go on without it; the
        metrics are still in metrics.jsonl (and TensorBoard)."""
        log.warning("W&B logging stopped (%s: %s); metrics.jsonl keeps every metric", type(error).__name__, error)
        self._run = None
