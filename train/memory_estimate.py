"""`python -m train parallel.dry_run=WORLD ...`: a launch's per-rank memory, checked on one CPU.

The model is built on the meta device and parallelised by the real `parallelize` as rank 0 of a
fake world of WORLD ranks (parallel/dry_run.py): that validates the layout with a real launch's
checks and gives each rank's parameter, gradient and FSDP-unit sizes from the real shard shapes.
This module adds what only training knows: AdamW's state, the activations of the configured batch,
sequence, activation checkpointing and LayerSkip settings, and the exit loss's chunk of logits.
Nothing is allocated, no data is read and nothing is written (except `parallel.dry_run_json`).

The estimate assumes a GPU run: `train.dtype=auto` means bf16 compute with fp32 parameters,
gradients and optimizer state. Activations are counted per block and token from the tensors
torchtitan's Llama block saves for backward (fused attention: no seq x seq scores), divided by
the tensor-parallel degree (sequence parallelism splits what heads do not):
- no AC:        8D + 2Dkv + 4F, as read with saved-tensor hooks on the block (block input, both
                norms' inputs and outputs, q, the attention output in two layouts, k and v, the
                w1, w3, SiLU and product tensors of the FFN; tests/train/test_memory_estimate.py);
- selective AC: what the policy of parallel/parallelize.py keeps: the block input and the
                outputs of the matmuls and attention, 5D + 2Dkv + 2F, plus one block's
                recomputed rest during its backward;
- full AC:      the block input D, plus one whole block recomputed during its backward.
Layer dropout only lowers this (dropped samples skip the block), but a step may drop none, so it
is not counted as a saving. Each active early exit keeps the gradient of its hidden state
(tokens x D) from the fused loss's forward until backward; one chunk of logits (chunk x vocab,
fp32, plus its gradient in the compute dtype) and the head's fp32 gradient accumulator are alive
while a loss runs. FSDP2 adds the all-gathered root unit (kept from forward to backward) and, at
a time, two gathered blocks (one prefetched) and one block's unsharded gradient.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parallel.dims import ParallelDims
from parallel.dry_run import ShardSizes, shard_sizes
from train.config import Config
from train.layerskip.curriculum import ExitCurriculum
from train.model import build_model

log = logging.getLogger("train")

GIB = 2**30


@dataclass
class MemoryReport:
    world_size: int
    dp_replicate: int
    dp_shard: int
    tp: int
    rank: int
    param_count: int
    param_bytes_per_rank: int
    grad_bytes_per_rank: int
    optimizer_bytes_per_rank: int
    fsdp_gathered_bytes_per_rank: int
    activation_bytes_per_rank: int
    block_activation_bytes: int  # part of activation_bytes_per_rank: the blocks' saved tensors
    exit_loss_bytes: int  # part of activation_bytes_per_rank: exits' kept gradients + logits chunk
    max_active_exits: int
    total_bytes_per_rank: int
    device_bytes: int
    fits: bool
    compute_dtype: str
    command: str = ""


def compute_dtypes(cfg: Config) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, gradient-reduction dtype) of a GPU run with these settings."""
    name = "bfloat16" if cfg.train.dtype == "auto" else cfg.train.dtype
    return getattr(torch, name), torch.float32


def max_active_exits(cfg: Config) -> int:
    """Most exits (the last layer included) in the loss at any step of the run."""
    curriculum = ExitCurriculum(cfg.layerskip.exit, cfg.model.n_layers, cfg.train.steps)
    if cfg.layerskip.exit.curriculum == "rotational":  # periodic in the step
        steps = range(min(cfg.train.steps, cfg.layerskip.exit.period))
    else:  # gradual switches exits on and never off; fixed is constant
        steps = [cfg.train.steps - 1]
    return max(len(curriculum.active(t)) for t in steps)


def block_elements_per_token(cfg: Config) -> tuple[int, int]:
    """(elements saved per token by one block for backward, elements alive while one block is
    recomputed in its backward), before tensor parallelism."""
    m = cfg.model
    D, F = m.dim, m.ffn_hidden_dim
    Dkv = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    everything = 8 * D + 2 * Dkv + 4 * F
    if cfg.parallel.ac == "none":
        return everything, 0
    if cfg.parallel.ac == "selective":
        return 5 * D + 2 * Dkv + 2 * F, everything
    return D, everything


def activation_bytes(cfg: Config, tp: int, compute: torch.dtype) -> tuple[int, int, int]:
    """(activations in total, of which the blocks', of which the exit loss's) for one
    micro-batch on one rank."""
    m = cfg.model
    cb = torch.tensor([], dtype=compute).element_size()
    tokens = cfg.data.batch_size * cfg.data.seq_len
    saved, recompute = block_elements_per_token(cfg)
    blocks = (m.n_layers * saved + recompute) * tokens * cb // tp
    exits = max_active_exits(cfg)
    chunk = min(cfg.layerskip.exit.chunk_tokens, tokens)
    logits = chunk * (m.vocab_size // tp) * (4 + cb)  # fp32 logits (softmax in place) + gradient
    head_grad = 4 * m.vocab_size * m.dim // tp  # fp32 accumulator of the head's gradient
    kept_grads = (exits - 1) * tokens * m.dim * cb // tp  # early exits' hidden-state gradients
    exit_loss = kept_grads + logits + head_grad
    embeddings = tokens * m.dim * cb // tp
    return blocks + exit_loss + embeddings, blocks, exit_loss


def estimate(cfg: Config, world_size: int, rank: int = 0) -> MemoryReport:
    """Per-rank memory of `cfg` on `world_size` ranks (the figures of rank `rank`)."""
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    dims.check_model(cfg.model, cfg.data.seq_len)
    compute, reduce = compute_dtypes(cfg)
    sizes: ShardSizes = shard_sizes(build_model(cfg.model, "meta"), dims, cfg.parallel,
                                    param_dtype=compute, reduce_dtype=reduce, rank=rank)
    # AdamW: exp_avg and exp_avg_sq in the parameter's dtype, and a float32 step per tensor.
    optimizer = 2 * sizes.param_bytes + 4 * sizes.param_tensors
    cb, rb = (torch.tensor([], dtype=d).element_size() for d in (compute, reduce))
    unit = sizes.largest_unit_gathered_bytes
    root = sizes.root_unit_gathered_bytes
    if sizes.wrapper == "fsdp":
        # root params + grads (gathered all step), two gathered blocks, one block's unsharded
        # grads (compute dtype, then cast to the reduction dtype for the reduce-scatter).
        fsdp = 2 * root + 2 * unit + unit + unit * rb // cb
    elif sizes.wrapper == "ddp":  # DDP's gradient buckets: a second copy of the gradients
        fsdp = sizes.grad_bytes
    else:  # a plain module: parameters and gradients are already counted whole
        fsdp = 0
    acts, blocks, exit_loss = activation_bytes(cfg, dims.tp, compute)
    total = sizes.param_bytes + sizes.grad_bytes + optimizer + fsdp + acts
    device = int(cfg.parallel.device_gib * GIB)
    return MemoryReport(
        world_size=world_size, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, tp=dims.tp,
        rank=rank,
        param_count=sizes.param_count, param_bytes_per_rank=sizes.param_bytes,
        grad_bytes_per_rank=sizes.grad_bytes, optimizer_bytes_per_rank=optimizer,
        fsdp_gathered_bytes_per_rank=fsdp, activation_bytes_per_rank=acts,
        block_activation_bytes=blocks, exit_loss_bytes=exit_loss,
        max_active_exits=max_active_exits(cfg), total_bytes_per_rank=total,
        device_bytes=device, fits=total <= device, compute_dtype=str(compute).replace("torch.", ""))


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_report(r: MemoryReport, cfg: Config) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    lines = [
        f"dry run: {cfg.model.name} ({_count(r.param_count)} parameters) on {r.world_size} ranks = "
        + (f"dp_replicate {r.dp_replicate} x " if r.dp_replicate > 1 else "") +
        f"dp_shard {r.dp_shard} x tp {r.tp}; per rank (rank {r.rank}; rank 0 holds the largest "
        f"shard): batch {cfg.data.batch_size} x seq "
        f"{cfg.data.seq_len}, ac={cfg.parallel.ac}, {r.compute_dtype} compute, fp32 master weights; "
        f"up to {r.max_active_exits} exits per step (last layer included)",
        f"  parameters (sharded, fp32)      {g(r.param_bytes_per_rank)}",
        f"  gradients (sharded, fp32)       {g(r.grad_bytes_per_rank)}",
        f"  AdamW state                     {g(r.optimizer_bytes_per_rank)}",
        f"  FSDP gathered / DDP buckets     {g(r.fsdp_gathered_bytes_per_rank)}",
        f"  activations                     {g(r.activation_bytes_per_rank)}"
        f"  (blocks {r.block_activation_bytes / GIB:.2f}, exit loss {r.exit_loss_bytes / GIB:.2f})",
        f"  total per rank                  {g(r.total_bytes_per_rank)} of {r.device_bytes / GIB:.0f} GiB: "
        + ("fits" if r.fits else "DOES NOT FIT"),
    ]
    return "\n".join(lines)


def dry_run(cfg: Config, command: str = "") -> MemoryReport:
    """What `python -m train parallel.dry_run=WORLD` does: estimate, print, optionally write JSON."""
    report = estimate(cfg, cfg.parallel.dry_run)
    report.command = command
    print(format_report(report, cfg), flush=True)
    if cfg.parallel.dry_run_json:
        path = Path(cfg.parallel.dry_run_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
