"""Turn a model built on the meta device into a parallel one: TP -> AC -> compile -> FSDP2/DDP.

The order matters, as in torchtitan: tensor parallelism rewrites the weights into DTensors and
installs the sequence-parallel layouts; activation checkpointing and compile wrap each block
(compile sees the TP collectives and the checkpoint region); FSDP2 comes last so that its
all-gather / reduce-scatter hooks sit outside the compiled, checkpointed block.

What this module assumes of the model (torchtitan's Llama layout): blocks in the ModuleDict
`model.layers`, each called as `block(h, freqs_cis, attention_masks=...)` (None, or the
document mask of the rows it runs on: no parameter, nothing to shard); `tok_embeddings`, `norm`
and `output` at the root. It knows nothing of what the forward computes: layer dropout
selects samples (`index_select` / `index_copy` on the batch dimension) *outside* the blocks, so it
is never inside a checkpointed or compiled region, and under TP the tensors between blocks are
plain local tensors of shape [batch, seq / tp, dim] whose batch dimension is intact.

Tied embeddings (the output projection's weight is the token embedding's Parameter, as in
torchtitan's Qwen3): under TP both modules shard that matrix over the vocabulary (the embedding
row-wise, Shard(0) of [vocab, dim]; the head column-wise, also Shard(0) of its [vocab, dim]
weight), so after TP has sharded each module's weight the head is given the embedding's DTensor
again: one sharded matrix serves both. Under FSDP2 the matrix must live in one unit, or the
second unit would shard and gather a second copy: the embedding then gets no unit of its own and
joins the root's, with the head. `tied_embeddings` tells which case a model is in, by identity.

Wrapping renames parameters: checkpointing inserts `_checkpoint_wrapped_module.` and compile
`_orig_mod.` into the names. `canonical_name` removes them; torch.distributed.checkpoint's
get_model_state_dict / set_model_state_dict already do.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed._composable.replicate import DDP, replicate
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torchtitan.models.llama3.infra.parallelize import apply_tp as _torchtitan_apply_tp

from parallel.dims import ParallelDims
from train.config import ConfigError, ParallelConfig

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name without the prefixes that checkpointing and compile insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _blocks(model: nn.Module) -> nn.ModuleDict:
    return model.layers  # type: ignore[return-value]


def tied_embeddings(model: nn.Module) -> bool:
    """True when the output head uses the token embedding's own Parameter."""
    return model.output.weight is model.tok_embeddings.weight


# ------------------------------------------------------------------------------------------- TP

def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """torchtitan's Llama plan: column/row-parallel attention and FFN, sequence parallelism for
    the norms and the residual stream (between blocks, hidden states are local [B, S/tp, D]),
    and a loss-parallel head: logits come out as a DTensor sharded over the vocabulary
    (Shard(-1)); compute cross-entropy on them under `torch.distributed.tensor.parallel.
    loss_parallel()`, or call `.full_tensor()`."""
    tied = tied_embeddings(model)
    _torchtitan_apply_tp(model, tp_mesh, loss_parallel=True, enable_float8_tensorwise_tp=False)
    if tied:  # each plan entry made its own DTensor; both are Shard(0) of [vocab, dim]
        embedding, head = model.tok_embeddings.weight, model.output.weight
        if embedding.placements != head.placements:
            raise AssertionError(f"tied embeddings: the embedding is sharded {embedding.placements} "
                                 f"but the head {head.placements}; they cannot share one matrix")
        model.output.weight = embedding


# ------------------------------------------------------------------------------------------- AC

# Selective AC keeps the outputs of the expensive ops (matmuls, attention, and the TP
# reduce-scatter, which would otherwise be a collective repeated in backward) and recomputes the
# cheap ones (norms, RoPE, SiLU, residual adds), as in Korthikanti et al. 2022 and torchtitan's
# op-level SAC. Layer-level alternatives (checkpoint every other block) would make the memory of
# a block depend on its index; op-level is the same for every block.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
    torch._higher_order_ops.flex_attention,  # model.attention=block_causal on CUDA
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation checkpointing per block (non-reentrant).

    none: keep every activation. full: keep only each block's input; the whole block is
    recomputed in backward. selective: op-level -- keep matmul / attention / reduce-scatter
    outputs, recompute the rest. The wrapped block takes the same arguments as the block."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ConfigError(f"parallel.ac must be none|selective|full, got {mode!r}")
    blocks = _blocks(model)
    for name, block in list(blocks.named_children()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)  # blocks draw no randoms
        else:
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False,
                context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
        blocks.register_module(name, wrapped)


# -------------------------------------------------------------------------------------- compile

def _materialize(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.clone()


def apply_compile(model: nn.Module, backend: str | object = "inductor") -> None:
    """torch.compile each block separately (all blocks share one code object, so they share
    compiled graphs and compile time does not grow with depth). The model marks the per-sample
    batch dimension of a block's input as dynamic, so layer dropout's varying kept counts reuse
    one graph instead of recompiling per count."""
    if isinstance(model.tok_embeddings.weight, DTensor):
        # Under TP the embedding's output is an AsyncCollectiveTensor (its reduce-scatter not yet
        # waited on). Passed straight into a compiled block, the embedding receives no gradient
        # (torch 2.13, seen with aot_eager). A clone waits and hands the block a plain tensor;
        # the clone's backward saves nothing, so it costs one copy and no memory.
        model.tok_embeddings.register_forward_hook(_materialize)
    blocks = _blocks(model)
    for name, block in list(blocks.named_children()):
        blocks.register_module(name, torch.compile(block, backend=backend, fullgraph=True))


# ------------------------------------------------------------------------------- data parallel

def data_parallel_wrapper(dims: ParallelDims, param_dtype: torch.dtype) -> str | None:
    """Which wrapper does the data-parallel work: "fsdp", "ddp" or None.

    FSDP2 where it shards over more than one rank (HSDP when dp_replicate > 1 too), casts the fp32
    parameters for compute (mixed precision), or under TP brings the gradients that TP's backward
    leaves in other layouts than their parameters (the embedding's gradient whole on every rank,
    the norms' as pending sums) back to the parameters' layouts.

    DDP where data parallelism is pure replication in fp32 (dp_shard = tp = 1, dp_replicate > 1):
    there FSDP2 would only all-gather whole copies and reduce-scatter into whole copies, each a
    blocking collective per block on gloo (whose reduce-scatter is an all-reduce), and make every
    parameter a DTensor; DDP all-reduces gradient buckets while backward still runs, and keeps
    plain tensors. On 2 CPU processes it is what makes the trainer scale as HF's DDP does
    (bench/smollm2_speed.py).

    None in one fp32 process: FSDP2 would only copy (every unit's parameters into an all-gather
    buffer before forward and backward, every gradient through a reduce-scatter buffer), and
    DTensor dispatch would slow clipping and the optimizer step. The model stays a plain module."""
    if dims.dp_shard > 1 or dims.tp > 1 or param_dtype != torch.float32:
        return "fsdp"
    return "ddp" if dims.dp_replicate > 1 else None


def wrapper_of(model: nn.Module) -> str:
    """What `parallelize` wrapped the model in: "fsdp", "ddp" or "plain"."""
    if isinstance(model, FSDPModule):
        return "fsdp"
    return "ddp" if isinstance(model, DDP) else "plain"


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, reshard_after_forward: bool) -> None:
    """FSDP2 units: the token embedding, each block, and the root (final norm + output head +
    anything else). The head stays in the root because every exit's loss is computed inside the
    root forward and may use `output.weight` directly. A tied embedding is the head's matrix, so
    it stays in the root's unit too (one unit per matrix). A 2-D `dp_mesh` (replicate, shard)
    makes it HSDP: shards within a replica, an all-reduce of the reduced shards across replicas.

    Gradients are averaged over `dp_mesh` by FSDP2's default reduction (ReduceOp.AVG, or SUM on
    one rank): no gradient divide factor, which would need PREMUL_SUM, unsupported by gloo."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    shard = partial(fully_shard, mesh=dp_mesh, mp_policy=mp)
    if not tied_embeddings(model):
        shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward)
    for block in _blocks(model).values():
        shard(block, reshard_after_forward=reshard_after_forward)
    # The root's parameters are needed again right at the start of backward: FSDP2 keeps the
    # root unsharded after forward regardless of this flag.
    shard(model, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, compiled: bool) -> None:
    """DDP over `dp_mesh` through torch's composable `replicate` (as torchtitan's apply_ddp): the
    module keeps its class, parameter names and plain tensors, and gains
    `set_requires_gradient_sync` as FSDP2 modules have. Gradients are averaged (AVG) in 100 MB
    buckets, launched while backward runs. Buffers are not broadcast each forward: the model's
    only buffer (the RoPE table) is computed identically on every rank."""
    if compiled:  # the blocks are compiled one by one; let dynamo split graphs at DDP buckets
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    replicate(model, process_group=dp_mesh.get_group(), bucket_cap_mb=100, broadcast_buffers=False)


# ------------------------------------------------------------------------------------ composed

def parallelize(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, *,
                param_dtype: torch.dtype, reduce_dtype: torch.dtype,
                compile_backend: str | object = "inductor") -> nn.Module:
    """Apply TP (if tp > 1), AC, compile (if enabled) and the data-parallel wrapper (FSDP2 or
    DDP, see `data_parallel_wrapper`), in that order, in place; returns the model.
    `dims.build_mesh()` must have been called.

    In a single fp32 process the model stays a plain module (every one-process test and run takes
    that path). Checkpointing (torch.distributed.checkpoint), gradient clipping
    (parallel.distributed.clip_grad_norm_) and the exit loss take plain tensors and DTensors
    alike, so a checkpoint of one layout loads in any other."""
    if cfg.compile and cfg.ac == "full" and dims.tp_enabled:
        # torch 2.13's AOT autograd fails on a compiled full-checkpoint region that contains TP
        # collectives (it tries to save a DeviceMesh for backward); selective AC compiles fine.
        raise ConfigError("parallel.ac=full cannot be compiled with parallel.tp > 1 in this torch "
                          "version: use parallel.ac=selective, or parallel.compile=false")
    if dims.tp_enabled:
        apply_tp(model, dims.tp_mesh)
    apply_ac(model, cfg.ac)
    if cfg.compile:
        apply_compile(model, compile_backend)
    wrapper = data_parallel_wrapper(dims, param_dtype)
    if wrapper == "fsdp":
        apply_fsdp(model, dims.fsdp_mesh, param_dtype, reduce_dtype, cfg.reshard_after_forward)
    elif wrapper == "ddp":
        apply_ddp(model, dims.dp_replicate_mesh, cfg.compile)
    return model


def load_full_state_dict(model: nn.Module, full_state_dict: dict[str, torch.Tensor] | None) -> None:
    """Load unsharded weights held by rank 0 into a parallelised (sharded) model on every rank:
    rank 0 broadcasts each tensor and every rank keeps its own shard. Other ranks may pass None.

    Use after the model's parameters are allocated (e.g. by `train.model.init_model`). This is
    how to get the same weights in every layout: DTensor random init is layout-invariant only on
    CUDA (not on CPU, and not equal to a plain-tensor init), while an init done once, unsharded,
    on rank 0's CPU with a fixed seed is the same for every mesh and device."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0 and full_state_dict is None:
        raise ValueError("load_full_state_dict: rank 0 must pass the full state dict")
    set_model_state_dict(
        model, full_state_dict if rank0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))
