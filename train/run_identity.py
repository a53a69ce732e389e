"""Which run a command is: its run directory follows from the command, never from a random id.

"Rerun the same command to resume" holds for every launcher (single_node.sh, multi_node.sh,
slurm.sbatch, `torchrun --standalone`, `python -m train`) because the default run directory,
`outputs/<experiment>-<hash>`, is named from the settings that define what is trained: the
experiment, the model, the data and how it is read (with the global batch size), the optimizer,
LayerSkip and the train settings. Everything that may change between a run and its resume is left
out: the parallel layout (a checkpoint reshards onto another one with the same global batch),
checkpointing (checkpoint.resume, interval, keep), logging, validation,
profiling, preemption signals, the run directory itself and how data is fetched or where its
cache lives (data.num_workers, pin_memory, cache_dir, ...).

The identity is recorded in `<run_dir>/identity.json`. A command whose identity differs from the
recorded one and would resume the run's checkpoints (checkpoint.resume=latest in an explicit
run_dir) is refused, naming each differing setting; `checkpoint.resume=none` starts fresh in that
folder, `run_dir=` chooses another, and `checkpoint.resume=<step>` resumes on purpose.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from train.config import Config, ConfigError, to_dict

IDENTITY_FILE = "identity.json"
# Sections that define the run (all their keys, except those below), and the top-level keys.
_SECTIONS = ("model", "data", "optim", "layerskip", "train")
_TOP_LEVEL = ("experiment",)
# Keys of those sections that do not change what is trained.
_NOT_IDENTITY = {"data.num_workers", "data.pin_memory", "data.cache_dir", "data.prepare_wait_s",
                 "data.max_auto_prepare_bytes", "layerskip.exit.chunk_tokens", "optim.fused"}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def run_identity(cfg: Config, dp_world: int) -> dict[str, Any]:
    """{dotted key: value} of the settings that identify the run `cfg` describes on `dp_world`
    data-parallel ranks. The batch counts as the global one (data.batch_size x dp_world): a
    checkpoint resumes on another layout with the same global batch (the data order is global)."""
    full = to_dict(cfg)
    flat: dict[str, Any] = {}
    for section in _SECTIONS:
        _flatten(full[section], section, flat)
    for key in _TOP_LEVEL:
        flat[key] = full[key]
    flat["data.global_batch_size"] = flat.pop("data.batch_size") * dp_world
    return {k: v for k, v in sorted(flat.items()) if k not in _NOT_IDENTITY}


def identity_hash(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def default_run_dir(cfg: Config, dp_world: int) -> Path:
    """outputs/<experiment>-<hash of the run's identity>, relative to the working directory."""
    return Path("outputs") / f"{cfg.experiment}-{identity_hash(run_identity(cfg, dp_world))}"


def differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(identity))
    return [f"{k}: run {recorded.get(k, '<unset>')!r}, this command {identity.get(k, '<unset>')!r}"
            for k in keys if recorded.get(k, "<unset>") != identity.get(k, "<unset>")]


def check_identity(run_dir: Path, identity: dict[str, Any], resume: str, has_checkpoints: bool) -> str | None:
    """The refusal message when this command would resume checkpoints of a different run in
    `run_dir`, else None (a warning is logged by the caller for an explicit resume=<step>)."""
    path = run_dir / IDENTITY_FILE
    if str(resume) != "latest" or not has_checkpoints or not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())["identity"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); remove it, or set checkpoint.resume=none to "
                          f"start fresh in {run_dir}") from e
    diffs = differences(recorded, identity)
    if not diffs:
        return None
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    return (f"{run_dir} holds checkpoints of a different run ({shown}). Rerun that run's command to "
            f"resume it; or start fresh: checkpoint.resume=none (in this folder: its checkpoints are "
            f"set aside) or run_dir=<another folder>; or resume it with these settings on purpose: "
            f"checkpoint.resume=<step>")


def write_identity(run_dir: Path, identity: dict[str, Any], command: list[str]) -> None:
    """Record the run's identity (and the command that started it) atomically."""
    record = {"hash": identity_hash(identity), "command": command, "identity": identity}
    tmp = run_dir / f"{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, run_dir / IDENTITY_FILE)
