"""Process groups and the few collectives training needs outside the model.

One rule for every layout: there is always a process group. Launched by torchrun (RANK /
WORLD_SIZE / MASTER_ADDR in the environment) we join it; started as a plain `python` process we
create a one-rank group on an in-memory store. The rest of the code (device meshes, FSDP2,
DTensor, metric reductions) then never branches on "distributed or not".

Backend: NCCL on CUDA, gloo on CPU. The group's timeout bounds every collective: with gloo a
collective that a peer never joins raises after `timeout_s`; with NCCL the watchdog aborts the
process after `timeout_s`. Either way a rank that fell out of step fails instead of hanging.

Hangs leave evidence (`HangDumps`): every rank arms a faulthandler watchdog that writes all its
threads' Python stacks to `<dump dir>/stacks-rank<r>.txt` when the rank makes no progress for a
little less than the collective timeout (every rank of a hung job stalls, so every rank dumps,
each showing where it is); on NCCL, torch's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE and
TORCH_NCCL_DUMP_ON_TIMEOUT, set by the trainer before the group starts: train/flight_recorder.py) writes the last collectives of every rank
to `<dump dir>/nccl_trace_rank_<r>` when the watchdog times out.
"""
from __future__ import annotations

import datetime
import faulthandler
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


def init_distributed(timeout_s: float, device_type: str | None = None,
                     ) -> tuple[int, int, int, torch.device]:
    """Join (or create) the default process group; returns (rank, world, local_rank, device).

    `device_type` None picks CUDA when available, else CPU; pass "cpu" to force gloo on CPU.
    Idempotent: if a group already exists it is reused (its timeout is not changed)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"init_distributed: device_type must be cuda or cpu, got {device_type!r}")
    use_cuda = device_type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        device_id = device if use_cuda else None
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
        else:
            # Single process without a launcher: a one-rank group needs no rendezvous.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout, device_id=device_id)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def barrier() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _process_group(group: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup | None:
    return group.get_group() if isinstance(group, DeviceMesh) else group


def all_reduce_mean(
    values: dict[str, float], group: dist.ProcessGroup | DeviceMesh | None = None,
) -> dict[str, float]:
    """Mean of each metric over the ranks of `group` (a process group, a 1-D device mesh such as
    the data-parallel mesh, or None for the world). Every rank must pass the same keys."""
    if not dist.is_initialized():
        return {k: float(v) for k, v in values.items()}
    pg = _process_group(group)
    keys = sorted(values)  # dict order may differ between ranks; the reduction must not
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" \
        else torch.device("cpu")
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=pg)
    packed /= dist.get_world_size(pg)
    return dict(zip(keys, packed.tolist()))


def gather_rows(values: list[float], group: dist.ProcessGroup | DeviceMesh | None = None,
                ) -> list[list[float]]:
    """Every rank's `values` (the same length on every rank), by rank: one all-gather of a
    small float64 vector. Means, maxima and minima over the ranks all come from one collective."""
    if not dist.is_initialized():
        return [[float(v) for v in values]]
    pg = _process_group(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" \
        else torch.device("cpu")
    mine = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(rows, mine, group=pg)
    return torch.stack(rows).tolist()


NCCL_TRACE_PREFIX = "nccl_trace_rank_"


class HangDumps:
    """Per-rank hang evidence in `folder` (see the module docstring). `heartbeat()` after each unit
    of progress (a training step) re-arms the watchdog; `close()` disarms it."""

    def __init__(self, folder: str | Path, rank: int, after_s: float):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"stacks-rank{rank}.txt"
        self.after_s = after_s
        self._file = open(self.path, "a")
        os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(self.folder / NCCL_TRACE_PREFIX))
        self.heartbeat()

    def heartbeat(self) -> None:
        faulthandler.dump_traceback_later(self.after_s, repeat=False, file=self._file)

    def dump_now(self) -> None:
        faulthandler.dump_traceback(file=self._file, all_threads=True)
        self._file.flush()

    def describe(self) -> str:
        where = f"every rank's Python stacks: {self.folder}/stacks-rank*.txt"
        if dist.is_initialized() and dist.get_backend() == "nccl":
            where += f"; NCCL flight recorder: {self.folder}/{NCCL_TRACE_PREFIX}*"
        return where

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._file.close()


def is_collective_timeout(error: BaseException) -> bool:
    """A collective that a peer never joined: gloo raises 'Timed out waiting ...', NCCL's
    watchdog a DistBackendError."""
    return isinstance(error, dist.DistBackendError) or (
        isinstance(error, RuntimeError) and "timed out" in str(error).lower())


def _norm_of(grads: list[torch.Tensor], foreach: bool | None) -> torch.Tensor:
    """L2 norm of tensors that share one layout, as a plain (replicated) tensor."""
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=foreach)
    # Norms of sharded DTensors are Partial: full_tensor() reduces them over the mesh.
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, foreach: bool | None = None,
) -> torch.Tensor:
    """Clip gradients to a global L2 norm of `max_norm` (<= 0 or inf: measure only) and return the
    global norm before clipping as a 0-d tensor, the same value on every rank (reading it is a host
    sync; the trainer reads it together with the step's losses).

    Parameters may be plain tensors (taken as replicated) or DTensors sharded over any mesh
    (FSDP, TP, both). Gradients are grouped by layout, each group's norm is reduced over its
    mesh, and the groups combine as sqrt(sum of squares)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else ("local", g.device)
        groups[key].append(g)
    norms = [_norm_of(gs, foreach) for gs in groups.values()]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
    if max_norm > 0 and math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total
