"""The training run: config -> build -> parallelize -> loop -> checkpoint.

`run(cfg)` is everything `python -m train` does after Hydra composed the config. Each piece it
wires lives in its own module; this file only decides the order and the bookkeeping of one step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel

from parallel.dims import ParallelDims
from parallel.distributed import all_reduce_mean, clip_grad_norm_, destroy, init_distributed
from parallel.parallelize import load_full_state_dict, parallelize
from train.checkpoint import CheckpointManager
from train.config import Config, ConfigError, to_dict
from train.data import build_data
from train.layerskip.curriculum import ExitCurriculum
from train.layerskip.dropout import LayerDropout
from train.layerskip.exit_loss import make_exit_loss
from train.metrics import MetricsLogger, device_peak_flops, memory_stats
from train.model import build_model, flops_per_token, init_model
from train.optim import build_optimizer, lr_at, set_lr

log = logging.getLogger("train")


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainState:
    """Counters that, with the model, optimizer and data position, define where a run stands.
    The LR schedule, curriculum and dropout decisions are pure functions of (seed, step)."""
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0


def resolve_run_dir(cfg: Config, rank: int) -> Path:
    """One run directory per job, named from the launcher's run id (identical on every rank and
    across elastic restarts), never from each rank's clock."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if not run_id or run_id == "none":
        stamp = [time.strftime("%Y%m%d-%H%M%S") if rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(stamp, src=0)
        run_id = stamp[0]
    return Path("outputs") / f"{cfg.experiment}-{run_id}"


def _dtypes(cfg: Config, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(param/compute dtype, gradient-reduction dtype)."""
    name = cfg.train.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, name), torch.float32


def _loss_context(tp: int):
    """Under tensor parallelism the head's logits are DTensors sharded over the vocabulary; the
    exit loss's cross-entropy on them needs loss_parallel(), around forward AND backward."""
    return loss_parallel() if tp > 1 else nullcontext()


def _write_config(cfg: Config, run_dir: Path) -> None:
    from omegaconf import OmegaConf
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    os.replace(tmp, run_dir / "config.yaml")


def _write_run_assets(data, run_dir: Path) -> None:
    """The tokenizer and a slice of held-out text travel with the run, so the export and
    `python -m train.decode --model RUN_DIR` need nothing else."""
    import shutil
    shutil.copyfile(data.tokenizer.path, run_dir / "tokenizer.model.tmp")
    os.replace(run_dir / "tokenizer.model.tmp", run_dir / "tokenizer.model")
    ids = [seq for inputs, _ in data.val_batches(4) for seq in inputs.tolist()]
    text = "\n".join(data.tokenizer.decode(seq) for seq in ids[:64])
    (run_dir / "heldout.txt.tmp").write_text(text, encoding="utf-8")
    os.replace(run_dir / "heldout.txt.tmp", run_dir / "heldout.txt")


@torch.no_grad()
def evaluate(model, batches, n_layers: int, per_layer: bool, chunk_tokens: int, tp: int,
             dp_group) -> dict[str, float]:
    """Mean loss (and perplexity) of every layer's exit over the held-out batches."""
    was_training = model.training
    model.eval()
    layers = list(range(n_layers)) if per_layer else [n_layers - 1]
    sums = torch.zeros(len(layers), dtype=torch.float64)
    for inputs, labels in batches:
        fn = make_exit_loss(labels, {l: 1.0 for l in layers}, chunk_tokens, tp_degree=tp)
        with _loss_context(tp):
            out = model(inputs, capture=[l for l in layers if l != n_layers - 1], loss_fn=fn)
        sums += torch.tensor(torch.stack([out.per_layer[l] for l in layers]).tolist(), dtype=torch.float64)
    means = all_reduce_mean({str(l): float(s) / len(batches) for l, s in zip(layers, sums)}, dp_group)
    model.train(was_training)
    result = {}
    for l in layers:
        loss = means[str(l)]
        result[f"val/loss/layer_{l:02d}"] = loss
        result[f"val/ppl/layer_{l:02d}"] = math.exp(min(loss, 50.0))
    result["val/loss/final"] = means[str(n_layers - 1)]
    return result


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


def run(cfg: Config) -> Path:
    rank, world, local_rank, device = init_distributed(cfg.parallel.timeout_s)
    try:
        return _run(cfg, rank, world, device)
    finally:
        destroy()


def _run(cfg: Config, rank: int, world: int, device: torch.device) -> Path:
    is_main = rank == 0
    dims = ParallelDims(dp_shard=cfg.parallel.dp_shard, tp=cfg.parallel.tp, world_size=world)
    dims.check_model(cfg.model, cfg.data.seq_len)
    mesh = dims.build_mesh(device.type)
    dp_group = mesh["dp_shard"].get_group()
    run_dir = resolve_run_dir(cfg, rank)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("run directory: %s", run_dir.resolve())
    L = cfg.model.n_layers
    B, S = cfg.data.batch_size, cfg.data.seq_len

    # ---- data (continual pretraining from a HF folder uses its tokenizer unless told otherwise)
    if cfg.model.init_from and cfg.data.tokenizer is None:
        hf_tokenizer = Path(cfg.model.init_from) / "tokenizer.model"
        if hf_tokenizer.is_file():
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(hf_tokenizer)))
    data = build_data(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed,
                      dp_rank=dims.dp_rank, dp_world=dims.dp_world, is_main=is_main)

    if is_main:
        _write_run_assets(data, run_dir)

    # ---- model: meta -> parallelize -> allocate + init (or import) on the device
    param_dtype, reduce_dtype = _dtypes(cfg, device)
    model = build_model(cfg.model)
    parallelize(model, dims, cfg.parallel, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    init_weights(model, cfg, device, rank)
    if cfg.model.init_from:
        from train.hf import load_into_model
        load_into_model(model, cfg.model.init_from, cfg.model)
        log.info("initialised from Hugging Face checkpoint %s", cfg.model.init_from)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device)

    # ---- LayerSkip
    dropout = LayerDropout(cfg.layerskip.dropout, n_layers=L, total_steps=cfg.train.steps,
                           seed=cfg.train.seed, dp_rank=dims.dp_rank, dp_degree=dims.dp_world)
    curriculum = ExitCurriculum(cfg.layerskip.exit, n_layers=L, total_steps=cfg.train.steps)

    # ---- state, resume
    state = TrainState()
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint, rank=rank, world=world,
                             model_cfg=cfg.model)
    resumed = ckpt.load(model, optimizer)
    if resumed is not None:
        state = TrainState(**resumed["train_state"])
        data.train.load_state_dict(resumed["data"])
        dropout.load_state_dict(resumed["dropout"])
        curriculum.load_state_dict(resumed["curriculum"])
        if "torch_rng" in resumed:
            torch.set_rng_state(torch.tensor(resumed["torch_rng"], dtype=torch.uint8))
        log.info("resumed from step %d (%s)", state.step, ckpt.folder)
    if is_main:  # only now: a refused resume must not overwrite the config of the run it refused
        _write_config(cfg, run_dir)

    def extra_state() -> dict:
        return {"train_state": dataclasses.asdict(state), "data": data.train.state_dict(),
                "dropout": dropout.state_dict(), "curriculum": curriculum.state_dict(),
                "torch_rng": torch.get_rng_state().tolist()}

    # ---- accounting for throughput / MFU
    n_params, flops_tok, block_flops_tok = flops_per_token(cfg.model, model, S)
    head_flops_tok = 6 * cfg.model.dim * cfg.model.vocab_size
    peak, peak_src = device_peak_flops(device)
    if is_main:
        log.info("model %s: %.1fM parameters, %d layers; world %d (dp %d x tp %d); peak %.1f TFLOP/s (%s)",
                 cfg.model.name, n_params / 1e6, L, world, dims.dp_world, dims.tp, peak / 1e12, peak_src)
    metrics = MetricsLogger(run_dir, enabled=is_main, tensorboard=cfg.logging.tensorboard)
    val_batches = [(i.to(device), y.to(device)) for i, y in data.val_batches(cfg.eval.batches)]
    source_val = {name: [(i.to(device), y.to(device)) for i, y in batches]  # mixtures: per source
                  for name, batches in data.source_val_batches(cfg.eval.batches).items()}
    fsdp = isinstance(model, FSDPModule)

    def validate(step: int) -> dict[str, float]:
        vals = evaluate(model, val_batches, L, cfg.eval.per_layer, cfg.layerskip.exit.chunk_tokens,
                        dims.tp, dp_group)
        for name, batches in source_val.items():
            vals[f"val/loss/source/{name}"] = evaluate(model, batches, L, False, cfg.layerskip.exit.chunk_tokens,
                                                       dims.tp, dp_group)["val/loss/final"]
        if is_main:
            shown = " ".join(f"L{l}={vals[f'val/loss/layer_{l:02d}']:.3f}"
                             for l in range(L) if f"val/loss/layer_{l:02d}" in vals)
            metrics.log(step, vals, console=f"step {step:>6} | val loss {vals['val/loss/final']:.4f} | {shown}")
        return vals

    if state.step == 0 and cfg.eval.every > 0:
        validate(0)

    train_iter = iter(data.train)
    window_t, window_tokens, window_flops, window_steps = time.perf_counter(), 0, 0.0, 0
    window_exits: dict[int, list[tuple[float, float]]] = {}  # exit -> [(loss, weight)] since last log
    window_kept = [0.0] * L  # per-block kept fractions summed since the last log
    accum = cfg.train.grad_accum
    nan_streak = 0
    try:
        while state.step < cfg.train.steps:
            step = state.step
            set_lr(optimizer, lr := lr_at(step, cfg.train.steps, cfg.optim))
            weights = curriculum.weights(step)  # active exits -> normalised weight (incl. L-1)
            capture = [l for l in weights if l != L - 1]
            totals = None  # [total, per exit...] summed over micro-batches, on the device
            kept = [0.0] * L
            for micro in range(accum):
                inputs, labels = next(train_iter)
                inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                plan = dropout.plan(step, micro, batch_size=inputs.shape[0], device=device)
                if fsdp:  # reduce-scatter gradients once per optimizer step
                    model.set_requires_gradient_sync(micro == accum - 1)
                fn = make_exit_loss(labels, weights, cfg.layerskip.exit.chunk_tokens, tp_degree=dims.tp)
                with _loss_context(dims.tp):
                    out = model(inputs, keep=plan.keep, capture=capture, loss_fn=fn)
                    (out.loss / accum).backward()
                parts = torch.stack([out.loss.detach()] + [out.per_layer[l].detach() for l in weights])
                totals = parts / accum if totals is None else totals + parts / accum
                kept = [k + f / accum for k, f in zip(kept, plan.kept_fraction)]
            norm = clip_grad_norm_(list(model.parameters()), cfg.optim.grad_clip)
            # the step's one device->host sync: losses and the gradient norm together
            host = torch.cat([totals.double(), norm.to(totals.device, torch.float64).reshape(1)]).tolist()
            grad_norm = host.pop()
            reduced = all_reduce_mean({"total": host[0], **{str(l): v for l, v in zip(weights, host[1:])},
                                       **{f"kept/{l}": k for l, k in enumerate(kept)}}, dp_group)
            kept = [reduced[f"kept/{l}"] for l in range(L)]  # the global batch's, not this rank's
            if not math.isfinite(reduced["total"]) or not math.isfinite(grad_norm):
                nan_streak += 1
                optimizer.zero_grad(set_to_none=True)
                if nan_streak > cfg.train.max_nan_steps:
                    raise NonFiniteLossError(
                        f"non-finite loss ({reduced['total']}) or gradient norm ({grad_norm}) at step "
                        f"{step}; stopping. Lower optim.lr, check the data, or raise train.max_nan_steps "
                        f"to skip such steps.")
                log.warning("non-finite loss at step %d; step skipped", step)
            else:
                nan_streak = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            step_tokens = B * S * accum * dims.dp_world
            state.tokens_seen += step_tokens
            kept_mean = sum(kept) / L
            window_tokens += step_tokens
            window_flops += step_tokens * (block_flops_tok * L * kept_mean
                                           + head_flops_tok * len(weights))
            window_steps += 1
            window_kept = [a + k for a, k in zip(window_kept, kept)]
            for l, w in weights.items():  # exits rotate: average each one over the steps it was on
                window_exits.setdefault(l, []).append((reduced[str(l)], w))

            if state.step % cfg.logging.every == 0 or state.step == cfg.train.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt
                mfu = window_flops / dt / world / peak
                step_time = dt / window_steps
                values = {"loss/total": reduced["total"], "optim/lr": lr, "optim/grad_norm": grad_norm,
                          "throughput/tokens_per_s": tps, "throughput/mfu_pct": 100 * mfu,
                          "throughput/step_time_s": step_time, "throughput/tokens_seen": state.tokens_seen,
                          "layerskip/saved_block_compute": 1.0 - sum(window_kept) / (L * window_steps),
                          **memory_stats(device), **data.train_tokens_by_source()}
                for l, seen in sorted(window_exits.items()):
                    values[f"loss/layer_{l:02d}"] = sum(v for v, _ in seen) / len(seen)
                    values[f"layerskip/exit_weight/layer_{l:02d}"] = sum(w for _, w in seen) / len(seen)
                if cfg.layerskip.dropout.enabled:
                    for l in range(L):
                        values[f"layerskip/drop_fraction/layer_{l:02d}"] = 1.0 - window_kept[l] / window_steps
                eta = (cfg.train.steps - state.step) * step_time
                metrics.log(state.step, values, console=(
                    f"step {state.step:>6}/{cfg.train.steps} | loss {reduced['total']:.4f} | lr {lr:.2e} | "
                    f"gnorm {grad_norm:.3f} | {tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | "
                    f"exits {sorted(window_exits)} | saved {100 * values['layerskip/saved_block_compute']:.1f}% | ETA {eta:.0f}s"))
                window_t, window_tokens, window_flops, window_steps = time.perf_counter(), 0, 0.0, 0
                window_exits, window_kept = {}, [0.0] * L

            last = state.step == cfg.train.steps
            if cfg.eval.every and (state.step % cfg.eval.every == 0 or last) or (last and cfg.eval.every == 0):
                validate(state.step)
            if ckpt.should_save(state.step, last):
                ckpt.save(state.step, model, optimizer, extra_state())
        ckpt.wait()  # collective: only on the success path (a failing rank must not block the others)
    finally:
        metrics.close()
    if is_main:
        log.info("done: %d steps, %d tokens; run directory %s", state.step, state.tokens_seen, run_dir.resolve())
    return run_dir
