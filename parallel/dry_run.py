"""A layout's per-rank shard sizes without the ranks: the real `parallelize` on a fake process group.

torch's fake process group (the one torchtitan's dry-run mode and memory estimator use) lets one
CPU process stand in for rank r of a world of W ranks: the device mesh is built as in a real
launch and every collective is a no-op. A model built on the meta device and passed through the
real `parallelize` (TP, AC, compile wrapper, FSDP2) then has exactly the local shard shapes rank r
would hold, and no memory is allocated. What this module reads off those shapes:
- the parameters each rank stores (FSDP2 keeps the sharded parameters in the dtype they were built
  in; mixed precision casts only the all-gathered copy) and its gradients (FSDP2 reduce-scatters
  into sharded gradients of the parameter's dtype): the same bytes;
- the size of each FSDP unit once all-gathered (compute dtype), which bounds the weights alive
  during a step.

Rank 0 holds the largest shard (FSDP2 splits dimension 0 like torch.chunk: the first ranks get the
rounded-up share), so its figures are the per-rank maximum.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from parallel.dims import ParallelDims
from parallel.parallelize import parallelize, wrapper_of
from train.config import ParallelConfig


@dataclass
class ShardSizes:
    """One rank's share of the model under a layout (bytes unless named otherwise)."""
    world_size: int
    rank: int
    dp_shard: int
    tp: int
    wrapper: str  # what parallelize wrapped the model in: "fsdp", "ddp" or "plain"
    param_count: int  # the whole model's parameters (global numel)
    local_param_count: int  # numel of this rank's shards
    param_tensors: int  # parameter tensors (each gets its own optimizer step counter)
    param_bytes: int  # this rank's stored (sharded) parameters
    grad_bytes: int  # this rank's sharded gradients
    largest_unit_gathered_bytes: int  # the largest non-root FSDP unit, all-gathered, compute dtype
    root_unit_gathered_bytes: int  # the root unit (kept gathered from forward to backward)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


@contextlib.contextmanager
def fake_world(world_size: int, rank: int = 0) -> Iterator[None]:
    """A default process group of `world_size` ranks in which this process is `rank`; no
    communication happens. Refuses to run inside a real process group."""
    if dist.is_initialized():
        raise RuntimeError("a process group already exists: the dry run needs a process of its own")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for a world of {world_size}")
    # Importing it registers the "fake" backend with torch.distributed (as torchtitan's dry run does).
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _unit_numel(model: nn.Module) -> tuple[int, list[int]]:
    """Local numel of the root FSDP unit's own parameters, and of every other unit's."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    owned: set[int] = set()
    sizes = []
    for unit in units:
        params = list(unit.parameters())
        owned.update(id(p) for p in params)
        sizes.append(sum(_local(p).numel() for p in params))
    root = sum(_local(p).numel() for p in model.parameters() if id(p) not in owned)
    return root, sizes


def shard_sizes(model: nn.Module, dims: ParallelDims, cfg: ParallelConfig, *,
                param_dtype: torch.dtype, reduce_dtype: torch.dtype, rank: int = 0) -> ShardSizes:
    """Parallelise `model` (built on the meta device) for `dims` as rank `rank` of a fake world and
    measure its shards. Raises `ConfigError` where a real launch would (the same checks run)."""
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError("shard_sizes needs a model built on the meta device")
    param_count = sum(p.numel() for p in model.parameters())
    with fake_world(dims.world_size, rank):
        dims.build_mesh("cpu")
        # compile_backend "eager": torch.compile only wraps the blocks here (nothing is run), so
        # the compile-related layout checks still apply without a compiler.
        parallelize(model, dims, cfg, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                    compile_backend="eager")
        params = [p for p in model.parameters()]
        local = [_local(p) for p in params]
        stored = sum(t.numel() * t.element_size() for t in local)
        grads = sum(t.numel() * t.element_size() for p, t in zip(params, local) if p.requires_grad)
        root, units = _unit_numel(model)
    gathered = torch.tensor([], dtype=param_dtype).element_size() * dims.dp_shard
    return ShardSizes(
        world_size=dims.world_size, rank=rank, dp_shard=dims.dp_shard, tp=dims.tp,
        wrapper=wrapper_of(model),
        param_count=param_count, local_param_count=sum(t.numel() for t in local),
        param_tensors=len(params), param_bytes=stored, grad_bytes=grads,
        largest_unit_gathered_bytes=max(units, default=0) * gathered,
        root_unit_gathered_bytes=root * gathered)
