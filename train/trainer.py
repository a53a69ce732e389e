"""The training run: config -> build -> parallelize -> loop -> checkpoint.

`run(cfg)` is everything `python -m train` does after Hydra composed the config. Each piece it
wires lives in its own module; this file only decides the order and the bookkeeping of a step.
The phases, in the order a run goes through them, each in one place:

    build_run     data, model (meta -> parallelize -> init or import), optimizer, LayerSkip
                  schedules, checkpoint manager: everything a `Run` holds
    resume        restore model, optimizer, data position and schedules from the newest checkpoint
    train_loop    step after step: `train_step` (one optimizer step over grad_accum micro-batches),
                  the metrics line (`LogWindow`, train/log_window.py), validation (held-out loss
                  of every exit, train/validation.py), `save_if_due` (periodic and final
                  checkpoints), `stop_for_preemption` (a signalled run saves and stops,
                  train/preemption.py)

Around the loop: `HangDumps` (every rank's stacks when it stalls, parallel/distributed.py), NCCL's
flight recorder (train/flight_recorder.py), the garbage collector's schedule (train/gc_control.py),
with profiling.enable a `StepProfiler` (train/profiling.py), and with logging.wandb a W&B sink
(train/wandb_sink.py). Each step may measure per-block gradient norms (train/grad_norms.py) and
each rank's own compute time (train/stragglers.py), and is judged for a loss spike
(train/spikes.py) the same way on every rank.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from parallel.dims import ParallelDims
from parallel.distributed import (HangDumps, clip_grad_norm_, destroy, gather_rows, init_distributed,
                                  is_collective_timeout)
from parallel.parallelize import load_full_state_dict, parallelize, wrapper_of
from train.checkpoint import CheckpointManager, step_dir_name
from train.config import Config, to_dict
from train.data import build_data
from train.data.tokenizer import copy_tokenizer, resolve_tokenizer_path
from train.document_mask import DocumentBoundaries
from train.flight_recorder import configure_flight_recorder
from train.gc_control import GarbageCollection
from train.grad_norms import block_grad_norms
from train.layerskip.curriculum import ExitCurriculum
from train.layerskip.dropout import LayerDropout
from train.layerskip.exit_loss import make_exit_loss
from train.log_window import LogWindow, log_window, throughput_model
from train.metrics import MetricsLogger
from train.model import build_model, document_boundaries, init_model
from train.optim import build_optimizer, lr_at, set_lr
from train.preemption import PreemptionWatch, Preempted, write_marker
from train.preemption import exit_code as preempted_exit_code
from train.profiling import build_profiler
from train.run_identity import open_run
from train.run_state import Run, StepResult, TrainState
from train.spikes import SKIP, WARN, SpikeDetector
from train.stragglers import ComputeTimer
from train.validation import loss_context, validate, validation_due
from train.wandb_sink import WandbSink, choose_run_id

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    pass


class CollectiveTimeoutError(RuntimeError):
    """A collective a peer never joined; the message names the hang dumps."""




def _dtypes(cfg: Config, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(param/compute dtype, gradient-reduction dtype)."""
    name = cfg.train.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name), torch.float32


def _write_config(cfg: Config, run_dir: Path) -> None:
    from omegaconf import OmegaConf
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    os.replace(tmp, run_dir / "config.yaml")


def _write_run_assets(data, run_dir: Path) -> None:
    """The tokenizer and a slice of held-out text travel with the run, so the export and
    `python -m train.decode --model RUN_DIR` need nothing else."""
    copy_tokenizer(data.tokenizer, run_dir)  # tokenizer.model, or tokenizer.json + its configs
    ids = [seq for inputs, _ in data.val_batches(4) for seq in inputs.tolist()]
    text = "\n".join(data.tokenizer.decode(seq) for seq in ids[:64])
    (run_dir / "heldout.txt.tmp").write_text(text, encoding="utf-8")
    os.replace(run_dir / "heldout.txt.tmp", run_dir / "heldout.txt")


def init_weights(model, cfg: Config, device: torch.device, rank: int) -> None:
    """Allocate the local shards and initialise them. On CUDA, sharded init (DTensor random ops
    are layout-invariant there). On CPU they are not, so rank 0 initialises the full model once
    and broadcasts it: every layout then starts from the same weights (CPU models are small)."""
    init_model(model, device, cfg.train.seed)
    if device.type == "cpu":
        full = None
        if rank == 0:
            full = init_model(build_model(cfg.model, "cpu"), "cpu", cfg.train.seed).state_dict()
        load_full_state_dict(model, full)


def run(cfg: Config, typed: Config | None = None) -> Path:
    """Train as `cfg` says; returns the run directory. `typed` is the configuration as the user
    gave it, before Hub ids were resolved (it names the run, train/run_identity.py; default `cfg`).
    Raises `Preempted` after the checkpoint a preemption signal asked for (the entry point turns
    it into the exit code)."""
    # First: a signal that arrives while the run builds must not kill it before it can save.
    watch = PreemptionWatch(cfg.preempt.signals)
    configure_flight_recorder(cfg.monitor.nccl_trace_buffer)  # read when the NCCL group is created
    try:
        rank, world, local_rank, device = init_distributed(cfg.parallel.timeout_s)
        r = build_run(cfg, rank, world, device, typed)
        r.preemption = watch
        resume(r)
        return train_loop(r)
    finally:
        watch.close()
        destroy()


# --------------------------------------------------------------------------- build

def build_run(cfg: Config, rank: int, world: int, device: torch.device, typed: Config | None = None) -> Run:
    """Mesh, run directory, data, model (meta -> parallelize -> allocate + init or import),
    optimizer, LayerSkip schedules and the checkpoint manager; nothing is restored yet."""
    is_main = rank == 0
    dims = ParallelDims.from_config(cfg.parallel, world)
    dims.check_model(cfg.model, cfg.data.seq_len)
    dims.build_mesh(device.type)
    home = open_run(typed or cfg, cfg, dims.dp_world, is_main)  # named by the settings as typed
    run_dir = home.dir

    # data (continual pretraining from a HF folder uses its tokenizer unless told otherwise)
    tokenizer = resolve_tokenizer_path(cfg.data, cfg.model)
    if tokenizer is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tokenizer)))
    data = build_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed,
                      dp_rank=dims.dp_rank, dp_world=dims.dp_world, is_main=is_main)
    if is_main:
        _write_run_assets(data, run_dir)

    # model: meta -> parallelize -> allocate + init (or import) on the device
    param_dtype, reduce_dtype = _dtypes(cfg, device)
    # model.attention=block_causal: the model finds the documents in its input by BOS/EOS
    documents = document_boundaries(cfg.model, data.tokenizer)
    if is_main and documents is not None:
        log.info("attention masked at document boundaries (a document starts at BOS %d after EOS %d)",
                 documents.bos_id, documents.eos_id)
    model = build_model(cfg.model, documents=documents)
    parallelize(model, dims, cfg.parallel, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if is_main and device.type == "cpu" and wrapper_of(model) == "fsdp" and dims.dp_world == dims.dp_shard \
            and dims.tp == 1 and param_dtype == torch.float32:
        log.info("FSDP2 over %d CPU processes blocks the step on every unit's gloo collectives; if the "
                 "model and its AdamW state fit each process whole, parallel.dp_replicate=%d "
                 "parallel.dp_shard=1 (DDP) is faster (docs/parallelism.md)",
                 dims.dp_shard, dims.dp_shard)
    init_weights(model, cfg, device, rank)
    if cfg.model.init_from:
        from train.hf import load_into_model
        load_into_model(model, cfg.model.init_from, cfg.model)
        log.info("initialised from Hugging Face checkpoint %s", cfg.model.init_from)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device)

    L = cfg.model.n_layers
    dropout = LayerDropout(cfg.layerskip.dropout, n_layers=L, total_steps=cfg.train.steps,
                           seed=cfg.train.seed, dp_rank=dims.dp_rank, dp_degree=dims.dp_world)
    curriculum = ExitCurriculum(cfg.layerskip.exit, n_layers=L, total_steps=cfg.train.steps)
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint, rank=rank, world=world,
                             model_cfg=cfg.model)
    m = cfg.monitor
    spikes = SpikeDetector(m.spike, m.spike_sigma, m.spike_window, m.spike_max_skips)
    return Run(cfg=cfg, rank=rank, world=world, device=device, dims=dims,
               dp_group=dims.dp_mesh.get_group(), run_dir=run_dir, data=data, model=model,
               optimizer=optimizer, dropout=dropout, curriculum=curriculum, ckpt=ckpt, home=home,
               spikes=spikes, compute_timer=ComputeTimer(model, device) if cfg.logging.stragglers else None)


# --------------------------------------------------------------------------- resume

def resume(r: Run) -> None:
    """Restore the newest (or the requested) checkpoint into the run, if there is one; then write
    the run's config.yaml."""
    resumed = r.ckpt.load(r.model, r.optimizer)
    if resumed is not None:
        r.state = TrainState(**resumed["train_state"])
        r.data.train.load_state_dict(resumed["data"])
        r.dropout.load_state_dict(resumed["dropout"])
        # train.steps may change between submissions of a run (docs/runs.md; the change is logged
        # by RunHome.record): the curriculum follows the new end instead of refusing it.
        saved = dict(resumed["curriculum"])
        saved["fingerprint"] = {k: v for k, v in saved.get("fingerprint", {}).items() if k != "total_steps"}
        r.curriculum.load_state_dict(saved)
        if "torch_rng" in resumed:
            torch.set_rng_state(torch.tensor(resumed["torch_rng"], dtype=torch.uint8))
        if "spikes" in resumed and r.spikes is not None:
            r.spikes.load_state_dict(resumed["spikes"])
        r.wandb_run_id = resumed.get("wandb_run_id")
        log.info("resumed from step %d (%s)", r.state.step, r.ckpt.folder)
    if r.is_main:  # only now: a refused resume must not overwrite the config of the run it refused
        _write_config(r.cfg, r.run_dir)
        r.home.record(r.cfg, r.state.step if resumed is not None else None, ["python -m train", *sys.argv[1:]])


# --------------------------------------------------------------------------- one step

def targets(cfg: Config, tokenizer, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as the loss sees it: with data.loss_across_documents=false, no loss on the target
    that lies in the next document (an EOS input, the next document's BOS as its label)."""
    if not cfg.data.loss_across_documents:
        labels = DocumentBoundaries(tokenizer.bos_id, tokenizer.eos_id).without_cross_document_targets(inputs, labels)
    return inputs, labels


def train_step(r: Run, batches: Iterator) -> StepResult:
    """Forward + backward over grad_accum micro-batches, clip, reduce the metrics over the
    data-parallel ranks, optimizer step (skipped for a non-finite loss), state.step += 1. A loss
    spike in monitor.spike=skip mode applies no update and leaves state.step as it was (the next
    batch is trained at the same step, train/spikes.py)."""
    cfg, L, step = r.cfg, r.n_layers, r.state.step
    started = time.perf_counter()
    accum = cfg.train.grad_accum
    # FSDP2 and DDP modules both have it; a plain module has no gradients to synchronise
    gradient_sync = getattr(r.model, "set_requires_gradient_sync", None)
    set_lr(r.optimizer, lr := lr_at(step, cfg.train.steps, cfg.optim))
    weights = r.curriculum.weights(step)  # active exits -> normalised weight (incl. L-1)
    capture = [l for l in weights if l != L - 1]
    totals = None  # [total, per exit...] summed over micro-batches, on the device
    kept = [0.0] * L
    for micro in range(accum):
        inputs, labels = targets(r.cfg, r.data.tokenizer, *next(batches))
        inputs, labels = inputs.to(r.device, non_blocking=True), labels.to(r.device, non_blocking=True)
        plan = r.dropout.plan(step, micro, batch_size=inputs.shape[0], device=r.device)
        if gradient_sync is not None:  # reduce gradients once per optimizer step
            gradient_sync(micro == accum - 1)
        fn = make_exit_loss(labels, weights, cfg.layerskip.exit.chunk_tokens, tp_degree=r.dims.tp)
        with loss_context(r.dims.tp):
            out = r.model(inputs, keep=plan.keep, capture=capture, loss_fn=fn)
            (out.loss / accum).backward()
        parts = torch.stack([out.loss.detach()] + [out.per_layer[l].detach() for l in weights])
        totals = parts / accum if totals is None else totals + parts / accum
        kept = [k + f / accum for k, f in zip(kept, plan.kept_fraction)]
    every = cfg.logging.block_grad_norms_every
    block_norms = block_grad_norms(r.model) if every and (step + 1) % every == 0 else None  # before clipping
    norm = clip_grad_norm_(list(r.model.parameters()), cfg.optim.grad_clip)
    # the step's one device->host sync: losses and the gradient norm together
    host = torch.cat([totals.double(), norm.to(totals.device, torch.float64).reshape(1)]).tolist()
    grad_norm = host.pop()
    compute_s = r.compute_timer.take() if r.compute_timer is not None else 0.0  # after the sync
    # The step's one collective for metrics: every rank's losses, kept fractions, own compute
    # time, step time and preemption flag, so the means, the straggler and "anyone signalled" agree.
    signalled = float(r.preemption is not None and r.preemption.requested)
    rows = gather_rows(host + kept + [compute_s, time.perf_counter() - started, signalled])
    n = len(rows)
    mean = [sum(col) / n for col in zip(*rows)]
    losses = {"total": mean[0], **{str(l): v for l, v in zip(weights, mean[1:len(host)])}}
    final = 1 + list(weights).index(L - 1)  # the final layer's column
    kept = mean[len(host):len(host) + L]  # the global batch's, not this rank's
    result = StepResult(lr=lr, weights=weights, losses=losses, grad_norm=grad_norm, kept=kept,
                        rank_step_s=[row[-2] for row in rows],
                        rank_kept=[sum(row[len(host):len(host) + L]) / L for row in rows],
                        preempt=any(row[-1] > 0 for row in rows), final_loss=mean[final],
                        rank_final_loss=[row[final] for row in rows], rank_compute_s=[row[-3] for row in rows],
                        block_grad_norms=block_norms)
    # Every rank judges the same gathered values against the same window: one verdict everywhere.
    if r.spikes is not None and math.isfinite(losses["total"]) and math.isfinite(grad_norm):
        result.spike = r.spikes.check(max(result.rank_final_loss), grad_norm)
    if result.spike == SKIP:
        r.optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        if r.is_main:
            worst = max(range(n), key=result.rank_final_loss.__getitem__)
            log.warning("loss spike at step %d (final-layer loss %.4f on rank %d, z %.1f; gradient norm "
                        "%.3g, z %.1f): update skipped, the next batch is trained at this step",
                        step + 1, result.rank_final_loss[worst], worst, r.spikes.last_z[0], grad_norm,
                        r.spikes.last_z[1])
        return result
    if result.spike == WARN and r.is_main:
        log.warning("loss spike at step %d (final-layer loss z %.1f, gradient norm z %.1f above the last "
                    "%d steps; monitor.spike=warn: applied)", step + 1, *r.spikes.last_z, cfg.monitor.spike_window)
    _optimizer_step(r, losses["total"], grad_norm, step)
    r.state.step += 1
    r.state.tokens_seen += cfg.data.batch_size * cfg.data.seq_len * accum * r.dims.dp_world
    return result


def _optimizer_step(r: Run, loss: float, grad_norm: float, step: int) -> None:
    """Apply the gradients, or skip a step whose loss or gradient is not finite (at most
    train.max_nan_steps in a row; then stop with NonFiniteLossError)."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        r.nan_streak += 1
        r.optimizer.zero_grad(set_to_none=True)
        if r.nan_streak > r.cfg.train.max_nan_steps:
            raise NonFiniteLossError(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step "
                f"{step}; stopping. Lower optim.lr, check the data, or raise train.max_nan_steps "
                f"to skip such steps.")
        log.warning("non-finite loss at step %d; step skipped", step)
    else:
        r.nan_streak = 0
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- save

def save_if_due(r: Run, last: bool) -> bool:
    """Periodic checkpoints (checkpoint.interval) and the final one (checkpoint.save_final);
    True when this step was saved."""
    if r.ckpt.should_save(r.state.step, last):
        r.ckpt.save(r.state.step, r.model, r.optimizer, r.extra_state())
        return True
    return False


def stop_for_preemption(r: Run) -> Preempted:
    """Every rank learnt that some rank was signalled: make sure a complete checkpoint of the
    current step exists (complete an async save of it in flight, or save it now, synchronously;
    never a second save of a step already on disk) and return the `Preempted` to raise."""
    started = time.perf_counter()
    r.ckpt.wait()  # an async save in flight (of this step or an earlier one): complete it
    if r.ckpt.step_on_disk != r.state.step:
        r.ckpt.save(r.state.step, r.model, r.optimizer, r.extra_state(), blocking=True)
    save_s = time.perf_counter() - started
    signal_name = (r.preemption.received if r.preemption else None) or "a peer's signal"
    folder = r.ckpt.root / step_dir_name(r.state.step)
    write_marker(r.state.step, signal_name, folder, save_s)
    if r.is_main:
        log.warning("preempted (%s): saved checkpoint %s in %.1f s; stopping with exit code %d",
                    signal_name, folder, save_s, preempted_exit_code())
    return Preempted(r.state.step, signal_name, folder)


# --------------------------------------------------------------------------- the loop

def _wandb_sink(r: Run) -> WandbSink | None:
    """Rank 0's W&B sink (logging.wandb), continuing the W&B run of the checkpoint it resumed."""
    if not (r.cfg.logging.wandb and r.is_main):
        return None
    r.wandb_run_id = choose_run_id(r.run_dir, r.wandb_run_id, resumed=r.state.step > 0)
    sink = WandbSink(r.cfg.logging, r.run_dir, r.wandb_run_id, name=r.run_dir.name, config=to_dict(r.cfg))
    if r.state.step > 0:  # what the last attempt's W&B service may have lost (train/wandb_sink.py)
        sink.backfill(r.run_dir / "metrics.jsonl", r.state.step)
    return sink


def train_loop(r: Run) -> Path:
    """Steps until train.steps: one step, then (when due) the metrics line, validation and a
    checkpoint. Returns the run directory."""
    cfg = r.cfg
    tp = throughput_model(r)
    metrics = MetricsLogger(r.run_dir, enabled=r.is_main, tensorboard=cfg.logging.tensorboard,
                            n_layers=r.n_layers, wandb=_wandb_sink(r))
    collector = GarbageCollection(cfg.monitor.gc_every)

    def on_device(batches):
        return [tuple(t.to(r.device) for t in targets(cfg, r.data.tokenizer, i, y)) for i, y in batches]
    val_batches = on_device(r.data.val_batches(cfg.eval.batches))
    source_val = {name: on_device(batches)  # mixtures: per source
                  for name, batches in r.data.source_val_batches(cfg.eval.batches).items()}
    step_tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum * r.dims.dp_world
    # A little under the collective timeout: a stalled rank dumps before its peers' collective fails.
    dumps = HangDumps(r.run_dir / "dumps", r.rank, after_s=0.9 * cfg.parallel.timeout_s)
    profiler = build_profiler(cfg.profiling, r.run_dir / "profile", r.rank, r.device)
    try:
        # Where a preemption signal is noticed (every rank together, so that all stop at the same
        # point): in each step's metrics sync, between validation batches, after a periodic save,
        # and before the first step (a signal while the run was built, resumed or first
        # validated; with parallel.compile the first step compiles, and its sync is the next check).
        if r.state.step == 0 and cfg.eval.every > 0:
            validate(r, val_batches, metrics, source_val)
        if r.any_rank_signalled():
            raise stop_for_preemption(r)
        batches = iter(r.data.train)
        window = LogWindow(r.n_layers)
        while r.state.step < cfg.train.steps:
            dumps.heartbeat()
            if profiler:
                profiler.step_begins(r.state.step + 1)
            result = train_step(r, batches)
            if profiler:
                profiler.step_ended(r.state.step)
            window.add(result, step_tokens, tp)
            if result.skipped:  # a spike: no update, the same step again on the next batch
                if result.preempt:
                    raise stop_for_preemption(r)
                continue
            collector.step(r.state.step)
            step, last = r.state.step, r.state.step == cfg.train.steps
            preempt = result.preempt
            if step % cfg.logging.every == 0 or last or preempt:
                log_window(r, window, result, tp, metrics)
                window = LogWindow(r.n_layers)
            if validation_due(cfg, step, last) and not preempt:
                dumps.heartbeat()
                preempt = validate(r, val_batches, metrics, source_val) is None  # None: interrupted
            dumps.heartbeat()  # a save may take long: its own watchdog budget
            if save_if_due(r, last) and not preempt and not last:
                preempt = r.any_rank_signalled()  # a signal during the save: stop at this step
            if preempt and not last:
                raise stop_for_preemption(r)
        r.ckpt.wait()  # collective: only on the success path (a failing rank must not block the others)
    except Exception as e:
        if not is_collective_timeout(e):
            raise
        dumps.dump_now()
        raise CollectiveTimeoutError(f"a collective timed out on rank {r.rank} (parallel.timeout_s="
                                     f"{cfg.parallel.timeout_s:g}): {e}. Where each rank was: "
                                     f"{dumps.describe()}") from e
    finally:
        dumps.close()
        if profiler:
            profiler.close()
        metrics.close()
        collector.close()
    if r.is_main:
        log.info("done: %d steps, %d tokens; run directory %s", r.state.step, r.state.tokens_seen,
                 r.run_dir.resolve())
    return r.run_dir
