"""Per-block gradient norms: how much each transformer block's weights are being pushed.

Tuning LayerSkip's `p_max` and `e_scale` is about how depth-dependent layer dropout and exit
weights change the gradient of deep blocks; the global norm hides that. `block_grad_norms` gives
the L2 norm of each block's gradient (all its parameters together), the same value on every rank,
with ONE all-reduce of an L-vector over the world, whatever the layout:

each rank sums the squares of its local gradient pieces per block, each piece divided by the
number of ranks that hold a copy of it: the ranks outside its mesh (data-parallel replicas of a
DTensor that lives on a sub-mesh, or every other rank for a plain tensor) times the size of each
mesh dimension it is replicated over. Summed over the world, every element then counts once:
Shard(d) pieces are disjoint, Replicate copies add up to one. A Partial gradient (not produced by
FSDP2, DDP or torchtitan's TP plan) is reduced to a full tensor first.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial


def _copies(g: torch.Tensor, world: int) -> int:
    """How many ranks of the world hold this (local piece of a) gradient."""
    if not isinstance(g, DTensor):
        return world
    mesh = g.device_mesh
    copies = world // mesh.size()
    for dim, placement in enumerate(g.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return copies


@torch.no_grad()
def block_grad_norms(model: nn.Module) -> list[float]:
    """L2 norm of each block's gradient (block l = model.layers[str(l)]), by block, before any
    clipping is applied; a collective: every rank calls it at the same point."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    blocks = list(model.layers.values())
    device = next(model.parameters()).device
    squares = torch.zeros(len(blocks), dtype=torch.float64, device=device)
    for i, block in enumerate(blocks):
        for p in block.parameters():
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
                g = g.full_tensor()  # rare: reduce, then count as one copy per rank
                squares[i] += g.double().square().sum() / world
                continue
            local = g.to_local() if isinstance(g, DTensor) else g
            squares[i] += local.double().square().sum() / _copies(g, world)
    if world > 1:
        dist.all_reduce(squares)
    return squares.sqrt().tolist()
