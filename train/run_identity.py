"""Which run a command is: its run directory follows from the command, never from a random id.

"Rerun the same command to resume" holds for every launcher (single_node.sh, multi_node.sh,
slurm.sbatch, quickstart.sh, `torchrun --standalone`, `python -m train`) because the default run
directory, `outputs/<experiment>-<hash>`, is named from the settings that define what is trained,
exactly as the user gave them: a Hub id (`model.init_from=org/name[@revision]`, `data.tokenizer`)
counts as typed, never as the cache folder it resolves to, so a run resumes whichever cache
(`HF_HOME`) or snapshot commit it meets; the folder and commit it was resolved to are recorded in
`<run_dir>/identity.json` for provenance.

Every key of the schema (train/config.py) is in exactly one of two lists (a test walks the schema):
`IDENTITY_KEYS` define the run and are hashed; `OPERATIONAL_KEYS` may change between submissions of
the same run (the layout, checkpointing, logging, validation, data fetching, timeouts, profiling,
`train.max_nan_steps`, ... and `train.steps`). The batch counts as the global one (data.batch_size
x data-parallel ranks): a checkpoint reshards onto another layout with the same global batch.

`train.steps` is operational: raised, the run resumes and trains to the new end (the schedules
that depend on it, the learning rate's among them, follow the new end; the change is logged with
both values); lowered below the step the run would resume from, the command is refused (exit 2)
with both numbers.

A command whose identity differs from the recorded one and would resume the run's checkpoints
(checkpoint.resume=latest in an explicit run_dir) is refused, naming each differing setting;
`checkpoint.resume=none` starts fresh in that folder, `run_dir=` chooses another, and
`checkpoint.resume=<step>` resumes on purpose. docs/runs.md is the user's page on all of this.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import typing
from pathlib import Path
from typing import Any

import torch.distributed as dist

from train.config import RENAMED_KEYS, Config, ConfigError, OptimConfig, to_dict

log = logging.getLogger("train")

IDENTITY_FILE = "identity.json"

# The settings that define what is trained. Changing one of them makes another run.
IDENTITY_KEYS = (
    "experiment",
    # the model, as typed (model=hf: the shape comes from model.init_from, which is here)
    "model.name", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.vocab_size", "model.multiple_of", "model.ffn_dim_multiplier", "model.norm_eps",
    "model.rope_theta", "model.rope_scaling", "model.max_seq_len", "model.tie_embeddings",
    "model.init_from", "model.attention",
    # the data and its order (data.batch_size enters as the global batch)
    "data.source", "data.text_field", "data.tokenizer", "data.max_chars", "data.seq_len",
    "data.batch_size", "data.val_fraction", "data.mixture", "data.loss_across_documents",
    # the optimizer and its schedule's shape (its length is train.steps, operational)
    "optim.lr", "optim.min_lr_ratio", "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps",
    "optim.warmup_steps", "optim.schedule", "optim.decay_fraction", "optim.grad_clip",
    # LayerSkip
    "layerskip.dropout.p_max", "layerskip.dropout.depth", "layerskip.dropout.time",
    "layerskip.dropout.rates", "layerskip.dropout.mode",
    "layerskip.exit.exits", "layerskip.exit.curriculum", "layerskip.exit.period",
    "layerskip.exit.e_scale", "layerskip.exit.weighting",
    # the random streams (data order, layer dropout) and the samples in one optimizer step
    "train.seed", "train.grad_accum",
)

# Everything else: how, where and how long the run is computed, and what it reports.
OPERATIONAL_KEYS = (
    "run_dir",
    "train.steps", "train.dtype", "train.max_nan_steps",
    "data.cache_dir", "data.num_workers", "data.max_auto_prepare_bytes", "data.prepare_wait_s",
    "optim.fused", "layerskip.exit.chunk_tokens",
    "parallel.dp_shard", "parallel.dp_replicate", "parallel.tp", "parallel.ac", "parallel.compile",
    "parallel.reshard_after_forward", "parallel.timeout_s", "parallel.dry_run",
    "parallel.dry_run_json", "parallel.device_gib",
    "checkpoint.interval", "checkpoint.keep", "checkpoint.async", "checkpoint.resume",
    "checkpoint.save_final",
    "logging.every", "logging.tensorboard", "logging.wandb", "logging.wandb_project",
    "logging.wandb_entity", "logging.block_grad_norms_every", "logging.stragglers",
    # a stability guard: switching spike skipping on after a spike must resume the same run
    "monitor.spike", "monitor.spike_sigma", "monitor.spike_window", "monitor.spike_max_skips",
    "monitor.gc_every", "monitor.nccl_trace_buffer",
    "eval.every", "eval.batches", "eval.per_layer", "eval.at_exits",
    "preempt.signals",
    "profiling.enable", "profiling.start_step", "profiling.steps", "profiling.memory",
    "prepare.out", "prepare.workers", "prepare.num_tasks", "prepare.task_id", "prepare.finalize",
    "prepare.shard_bytes", "prepare.progress",
)


def schema_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every setting of the schema as a dotted key (YAML names). A nested section is walked; an
    optional or listed structure (model.rope_scaling, data.mixture) is one setting. Renamed keys
    (kept in the schema only to be refused with their new name) are no settings."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.metadata.get("key", f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], key + ".")
        elif key not in RENAMED_KEYS:
            keys.append(key)
    return keys


def _lookup(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def run_identity(cfg: Config, dp_world: int) -> dict[str, Any]:
    """{dotted key: value} of the IDENTITY_KEYS of `cfg` (as the user typed it) on `dp_world`
    data-parallel ranks, data.batch_size as data.global_batch_size."""
    full = to_dict(cfg)
    identity = {key: _lookup(full, key) for key in IDENTITY_KEYS}
    identity["data.global_batch_size"] = identity.pop("data.batch_size") * dp_world
    return dict(sorted(identity.items()))


def identity_hash(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def default_run_dir(cfg: Config, dp_world: int) -> Path:
    """outputs/<experiment>-<hash of the run's identity>, relative to the working directory."""
    return Path("outputs") / f"{cfg.experiment}-{identity_hash(run_identity(cfg, dp_world))}"


def differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The identity settings that differ. Only keys both sides know are compared: a run recorded
    by an older version may list a setting that has since become operational (train.steps)."""
    keys = sorted(set(recorded) & set(identity))
    return [f"{k}: run {recorded[k]!r}, this command {identity[k]!r}"
            for k in keys if recorded[k] != identity[k]]


def read_record(run_dir: Path) -> dict | None:
    """The run's identity.json, None if there is none."""
    path = run_dir / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["identity"]  # noqa: B018 - a record without it is unreadable
        return record
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); remove it, or set checkpoint.resume=none to "
                          f"start fresh in {run_dir}") from e


def check_identity(run_dir: Path, identity: dict[str, Any], resume: str, has_checkpoints: bool) -> str | None:
    """The refusal message when this command would resume checkpoints of a different run in
    `run_dir`, else None."""
    if str(resume) != "latest" or not has_checkpoints:
        return None
    record = read_record(run_dir)
    diffs = differences(record["identity"], identity) if record else []
    if not diffs:
        return None
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    return (f"{run_dir} holds checkpoints of a different run ({shown}). Rerun that run's command to "
            f"resume it; or start fresh: checkpoint.resume=none (in this folder: its checkpoints are "
            f"set aside) or run_dir=<another folder>; or resume it with these settings on purpose: "
            f"checkpoint.resume=<step>")


def check_steps(run_dir: Path, steps: int, resume_step: int | None) -> str | None:
    """The refusal message when train.steps ends before the step this command would resume from."""
    if resume_step is None or steps >= resume_step:
        return None
    return (f"train.steps={steps} ends before step {resume_step}, the checkpoint this run resumes "
            f"from ({run_dir / 'checkpoints'}): a run cannot train backwards. Give train.steps >= "
            f"{resume_step} (train.steps={resume_step} only re-saves the finished run), or start a new "
            f"run: checkpoint.resume=none (sets its checkpoints aside) or run_dir=<another folder>")


def resume_step(run_dir: Path, resume: str) -> int | None:
    """The step a command with checkpoint.resume=`resume` would resume from (None: a fresh start)."""
    from train.checkpoint import complete_checkpoints
    resume = str(resume)
    if resume == "none":
        return None
    if resume != "latest":
        return int(resume)
    done = complete_checkpoints(run_dir / "checkpoints")
    return max(step for step, _ in done) if done else None


def provenance(typed: Config, resolved: Config) -> dict[str, dict[str, str]]:
    """Where each setting given as a Hub id was resolved: {key: {"folder", "commit"}} (the commit
    is the snapshot folder's name in a Hugging Face cache). Recorded, not hashed."""
    out = {}
    for key in ("model.init_from", "data.tokenizer"):
        given, found = _lookup(to_dict(typed), key), _lookup(to_dict(resolved), key)
        if given is not None and found is not None and given != found:
            folder = Path(found)
            commit = folder.name if folder.parent.name == "snapshots" else None
            out[key] = {"given": given, "folder": str(folder), "commit": commit}
    return out


@dataclasses.dataclass
class RunHome:
    """The run a command names: its directory, identity and where its Hub ids were resolved."""
    dir: Path
    identity: dict[str, Any]
    provenance: dict[str, dict[str, str]]
    recorded: dict | None  # the run's identity.json as found (None: a new run directory)

    def record(self, cfg: Config, resumed_step: int | None, command: list[str]) -> None:
        """After the resume (rank 0): log a changed train.steps and write identity.json."""
        before = (self.recorded or {}).get("train.steps", (self.recorded or {}).get("identity", {}).get("train.steps"))
        if resumed_step is not None and before is not None and int(before) != cfg.train.steps:
            log.warning("train.steps changed from %d to %d: resuming at step %d and training to step %d; "
                        "the schedules follow the new end (learning rate at step %d: %.3g with %d steps, "
                        "now %.3g)", int(before), cfg.train.steps, resumed_step, cfg.train.steps,
                        resumed_step, _lr(resumed_step, int(before), cfg.optim), int(before),
                        _lr(resumed_step, cfg.train.steps, cfg.optim))
        if resumed_step is not None and resumed_step >= cfg.train.steps:
            log.info("the run is complete (step %d of train.steps=%d): nothing to train; a larger "
                     "train.steps trains on", resumed_step, cfg.train.steps)
        write_identity(self.dir, self.identity, command, train_steps=cfg.train.steps,
                       provenance=self.provenance)


def _lr(step: int, steps: int, optim: OptimConfig) -> float:
    from train.optim import lr_at
    return lr_at(step, steps, optim)


def open_run(typed: Config, resolved: Config, dp_world: int, is_main: bool) -> RunHome:
    """The run directory this command names, checked; collective (every rank calls it).

    run_dir, else outputs/<experiment>-<hash of `typed`'s identity>, so the same command finds the
    same run on every launcher, across elastic restarts and requeues. Every rank must have been
    given the same run (rank 0's directory is the job's). Refused (ConfigError, every rank, one
    message) when it would resume another command's checkpoints or train.steps ends before the
    checkpoint it resumes from. Rank 0 creates the directory."""
    identity = run_identity(typed, dp_world)
    run_dir = Path(typed.run_dir) if typed.run_dir else default_run_dir(typed, dp_world)
    if dist.is_initialized() and dist.get_world_size() > 1:
        hashes = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, identity_hash(identity))
        if len(set(hashes)) > 1:
            odd = [i for i, h in enumerate(hashes) if h != hashes[0]]
            raise ConfigError(f"ranks {odd} were started with other settings than rank 0 (model, data, "
                              f"optim, layerskip or train differ): start every node with the same command")
    problem, recorded = None, None
    if is_main:
        try:
            step = resume_step(run_dir, typed.checkpoint.resume)
            problem = (check_identity(run_dir, identity, typed.checkpoint.resume, step is not None)
                       or check_steps(run_dir, typed.train.steps, step))
            recorded = read_record(run_dir)
        except ConfigError as e:
            problem = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [str(run_dir), problem]
        dist.broadcast_object_list(box, src=0)
        run_dir, problem = Path(box[0]), box[1]
    if problem:
        raise ConfigError(problem)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("run directory: %s", run_dir.resolve())
    return RunHome(dir=run_dir, identity=identity, provenance=provenance(typed, resolved), recorded=recorded)


def write_identity(run_dir: Path, identity: dict[str, Any], command: list[str], *,
                   train_steps: int | None = None, provenance: dict | None = None) -> None:
    """Record the run's identity, the command that last ran it, its train.steps and where its Hub
    ids were resolved, atomically."""
    record = {"hash": identity_hash(identity), "command": command, "identity": identity,
              "train.steps": train_steps, "resolved": provenance or {}}
    tmp = run_dir / f"{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, run_dir / IDENTITY_FILE)


def main(argv: list[str]) -> None:
    """`python -m train.run_identity [--nproc N] [overrides]`: print the run directory that
    `python -m train [overrides]` on N ranks (default 1) names, without starting anything."""
    world = 1
    if argv[:1] == ["--nproc"]:
        world, argv = int(argv[1]), argv[2:]
    from hydra import compose, initialize_config_dir

    from parallel.dims import ParallelDims
    from train.config import load_config, register_schemas
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parent.parent / "recipes")):
        cfg = load_config(compose("train", overrides=argv))
    dp_world = ParallelDims.from_config(cfg.parallel, world).dp_world
    print(Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg, dp_world))


if __name__ == "__main__":
    import sys
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        raise SystemExit(f"invalid configuration: {e}") from None
