"""Checkpoints: atomic, verified, reshardable saves of model + optimizer + training state.

Model and optimizer go through torch.distributed.checkpoint (DCP) via `get_state_dict` /
`set_state_dict`, so the same code serves a plain single-process module, FSDP2 and tensor-parallel
DTensor models, and a checkpoint saved on one data-/tensor-parallel layout loads on another (DCP
reshards on load). Everything else (`extra`: step counters, data position, LayerSkip schedule
state, RNG state) is JSON. Nothing is unpickled from our own files; DCP's own `.metadata` file is
read by DCP, and every file is checked against the manifest before DCP opens it.

On-disk format (FORMAT_VERSION 1), under `<run_dir>/checkpoints/`:

    step-0000012/                 one complete checkpoint (the name carries the step, 7+ digits)
        .metadata                 DCP metadata (written by DCP's coordinator, rank 0)
        __<rank>_<i>.distcp       DCP tensor data, one file per saving rank; keys "model.<fqn>"
                                  and "optim.state.<fqn>.<exp_avg|exp_avg_sq|step>",
                                  "optim.param_groups.<fqn>.<lr|betas|...>"
        meta.json                 {"format_version", "step", "torch_version", "created",
                                   "layout": {"world_size", "mesh": {dim name: size}},
                                   "model": fingerprint {dim, n_layers, n_heads, n_kv_heads,
                                            vocab_size, ffn_hidden_dim},
                                   "model_config": the full ModelConfig (informational),
                                   "extra": the trainer's JSON state}
        manifest.json             {"format_version", "algorithm": "crc32",
                                   "files": {relative path: {"size": bytes, "crc32": "8 hex"}}}
                                  covering every file above
        COMPLETE                  marker, written last; contains the step
    step-0000012.tmp-<nonce>/     a save in progress (or one that died); never loaded
    step-0000012.old-<nonce>/     a checkpoint being replaced by a new save of the same step
    superseded-<time>-<nonce>/    checkpoints a resume abandoned (resume=none: all; resume=<step>
                                  or a damaged newest one: those after the step resumed)

A save writes into the `.tmp-` folder; when every rank has written, each rank checksums the files
it wrote (CRC32, streaming: cheap next to the write, and it catches truncation and bit rot, which
is what a manifest is for), rank 0 writes the manifest, fsyncs, writes COMPLETE last and renames
the folder into place (atomic on POSIX). Only a folder named `step-<digits>` holding COMPLETE
counts as a checkpoint, so a crash at any moment leaves nothing that looks complete. Older
complete checkpoints beyond `keep` and leftover `.tmp-`/`.old-` folders are deleted only after the
new checkpoint is in place. On resume rank 0 lists the folder and chooses, the other ranks follow
(a stale listing on one rank cannot make ranks load different steps); every file is checked against the manifest (sizes by every
rank, checksums shared out over the ranks); a damaged checkpoint is skipped with a warning in
favour of the previous one (`resume=latest`) or refused (`resume=<step>`).

Before writing, a save checks the free space of the checkpoint folder against the size of the
last complete checkpoint (the first save: against the bytes of the state to be written) and stops
with a message naming the folder and both sizes; a save that fails for lack of space anyway says
so. Either way the previous checkpoints are untouched (only a complete new one retires them).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from train.config import CheckpointConfig, ModelConfig

log = logging.getLogger("train.checkpoint")

FORMAT_VERSION = 1
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DISTCP_RANK = re.compile(r"^__(\d+)_\d+\.distcp$")
_CHUNK = 8 << 20

# DCP warns on every single-process save/load that it "assumes a single process", even when told
# so with no_dist=True (async saves warn from their worker thread, so a scoped filter cannot help).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, damaged or for another model."""


# --------------------------------------------------------------------------- names and files

def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_step_dirs(root: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, has COMPLETE marker) for every `step-<digits>` folder, by increasing step."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p, (p / MARKER).is_file()))
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    return [(s, p) for s, p, done in list_step_dirs(root) if done]


def file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_owner(name: str, world: int) -> int:
    """Which rank checksums a file: the rank that wrote a DCP shard (its pages are likely still in
    that rank's cache), rank 0 for the rest. Modulo `world`, so it works on any layout."""
    m = _DISTCP_RANK.match(Path(name).name)
    return int(m.group(1)) % world if m else 0


def free_bytes(path: Path) -> int:
    """Free bytes for this user on the file system that holds `path` (or its nearest existing
    parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _is_out_of_space(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain, or the torch serializer's short-write error."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(error) or "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _state_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict that this rank holds."""
    total = 0
    for v in state.values():
        if isinstance(v, dict):
            total += _state_bytes(v)
        elif isinstance(v, DTensor):
            total += v.to_local().nbytes
        elif isinstance(v, torch.Tensor):
            total += v.nbytes
    return total


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(folder: Path) -> dict[str, dict]:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"format version {manifest['format_version']} is newer than this code's "
                         f"{FORMAT_VERSION}")
    return manifest["files"]


def verify_files(folder: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems found in `folder` against its manifest: every file's presence and size, and the
    checksums of the files `rank` owns (all of them when world == 1). Empty list: intact."""
    try:
        files = read_manifest(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} unreadable ({e})"]
    problems = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {entry['size']}")
        elif checksum_owner(name, world) == rank and file_crc32(path) != entry["crc32"]:
            problems.append(f"{name} fails its checksum")
    return problems


# --------------------------------------------------------------------------- model identity

def model_fingerprint(cfg: ModelConfig) -> dict[str, int]:
    """The settings that decide parameter shapes. Two configs with equal fingerprints can load
    each other's weights."""
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads or cfg.n_heads, "vocab_size": cfg.vocab_size,
            "ffn_hidden_dim": cfg.ffn_hidden_dim, "tie_embeddings": bool(cfg.tie_embeddings)}


_FINGERPRINT_KEYS = {"ffn_hidden_dim": "feed-forward width (from model.dim, model.multiple_of, "
                                       "model.ffn_dim_multiplier)"}
_FINGERPRINT_DEFAULTS = {"tie_embeddings": False}  # checkpoints written before the key existed


def check_compatible(meta: dict, cfg: ModelConfig, folder: Path) -> None:
    """Refuse a checkpoint saved for another model shape, naming each differing setting."""
    saved, current = meta.get("model", {}), model_fingerprint(cfg)
    diffs = [f"{_FINGERPRINT_KEYS.get(k, 'model.' + k)}: checkpoint {saved.get(k)!r}, config {v!r}"
             for k, v in current.items() if saved.get(k, _FINGERPRINT_DEFAULTS.get(k)) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {folder} was saved for a different model shape; "
                              + "; ".join(diffs)
                              + ". Use the model settings it was saved with, or checkpoint.resume=none.")


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / META).read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder / META}: format version {meta['format_version']} is newer "
                              f"than this code understands ({FORMAT_VERSION})")
    return meta


def model_layout(model: nn.Module, world: int) -> dict[str, Any]:
    """The parallel layout a model's parameters are sharded on, from their DTensor meshes."""
    mesh = None
    for p in model.parameters():
        if isinstance(p, DTensor) and (mesh is None or p.device_mesh.ndim > mesh.ndim):
            mesh = p.device_mesh
    dims = {}
    if mesh is not None:
        names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
        dims = dict(zip(names, mesh.shape))
    return {"world_size": world, "mesh": dims}


# --------------------------------------------------------------------------- choosing what to load

def select_checkpoint(root: Path, resume: str, verify: Callable[[Path], list[str]],
                      warn: bool = True, steps: list[tuple[int, Path, bool]] | None = None) -> Path | None:
    """The checkpoint `resume` asks for: "latest" -> the newest intact complete one (damaged ones
    are skipped with a warning; None when there is none at all); "<step>" -> exactly that one,
    intact, or CheckpointError. `verify(folder)` returns the problems found in a folder; `warn`
    says whether this process logs the warnings (rank 0 only, in a distributed job); `steps` is
    the listing of `root` to choose from (default: list it here)."""
    resume = str(resume)
    steps = list_step_dirs(root) if steps is None else steps
    if resume == "latest":
        candidates = [p for _, p, done in reversed(steps) if done]
        newest = max((s for s, _, done in steps if done), default=-1)
        for s, p, done in steps:
            if warn and not done and s > newest:
                log.warning("ignoring %s: no %s marker (a save that did not finish)", p, MARKER)
        if not candidates:
            return None
    else:
        want = int(resume)
        match = [(p, done) for s, p, done in steps if s == want]
        if not match:
            have = ", ".join(str(s) for s, _, done in steps if done) or "none"
            raise CheckpointError(f"checkpoint.resume={resume}: {root / step_dir_name(want)} does not "
                                  f"exist (complete checkpoints in {root}: {have})")
        path, done = match[0]
        if not done:
            raise CheckpointError(f"checkpoint.resume={resume}: {path} is incomplete (no {MARKER} "
                                  f"marker: its save did not finish)")
        candidates = [path]
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path
        message = f"checkpoint {path} is damaged: " + "; ".join(problems[:5])
        if resume != "latest":
            raise CheckpointError(message)
        if warn:
            log.warning("%s; falling back to the previous checkpoint", message)
    raise CheckpointError(f"every checkpoint in {root} is damaged (see the warnings above); remove "
                          f"them or set checkpoint.resume=none to start fresh")


# --------------------------------------------------------------------------- the manager

@dataclasses.dataclass
class _PendingSave:
    step: int
    tmp: Path
    final: Path
    started: float
    future: Any = None  # the async upload; None for a synchronous save


class CheckpointManager:
    """Saves and restores one run's checkpoints. Every method except `should_save` is collective
    when torch.distributed is initialised: every rank calls it, in the same order."""

    def __init__(self, root: str | Path, cfg: CheckpointConfig, *, rank: int = 0, world: int = 1,
                 model_cfg: ModelConfig, timeout_s: float = 1800.0):
        self.root = Path(root)
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.model_cfg = model_cfg
        self.folder: Path | None = None  # the checkpoint `load` restored
        self.step_on_disk: int | None = None  # the step of the last checkpoint loaded or completed
        self._pending: _PendingSave | None = None
        self._pg = None
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != world or dist.get_rank() != rank:
                raise ValueError(f"CheckpointManager: rank {rank} / world {world} disagree with "
                                 f"torch.distributed ({dist.get_rank()} / {dist.get_world_size()})")
            # A group of our own, on gloo: async saves run their collectives in a background
            # thread, which must not interleave with the training collectives on the default group,
            # and gloo carries the small CPU objects (plans, checksums) whatever the device.
            self._pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        elif world > 1:
            raise ValueError(f"CheckpointManager: world={world} needs torch.distributed initialised")
        nonce = [uuid.uuid4().hex[:8]]
        if self._pg is not None:
            dist.broadcast_object_list(nonce, src=0, group=self._pg)
        self._nonce = nonce[0]

    # ---- collectives on our group (no-ops single-process)

    def _barrier(self) -> None:
        if self._pg is not None:
            dist.barrier(group=self._pg)

    def _all_gather(self, obj: Any) -> list[Any]:
        if self._pg is None:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if self._pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    def _dcp_kwargs(self) -> dict:
        return {"process_group": self._pg} if self._pg is not None else {"no_dist": True}

    # ---- saving

    def should_save(self, step: int, last: bool) -> bool:
        periodic = self.cfg.interval > 0 and step % self.cfg.interval == 0
        return periodic or (last and self.cfg.save_final)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             extra: dict, blocking: bool = False) -> None:
        """Save model + optimizer (DCP) and `extra` (JSON) as checkpoint `step`. With
        checkpoint.async (and not `blocking`) the write continues in the background and is
        completed by the next `save` or `wait`; `extra` is serialised now, so later changes to it
        do not leak in. Raises CheckpointError, before writing, when the disk is too full."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = final.with_name(f"{final.name}.tmp-{self._nonce}")
        meta = {"format_version": FORMAT_VERSION, "step": step, "torch_version": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "layout": model_layout(model, self.world),
                "model": model_fingerprint(self.model_cfg),
                "model_config": dataclasses.asdict(self.model_cfg), "extra": extra}
        text = json.dumps(meta, indent=1)  # fails here, loudly, on a non-JSON value in `extra`
        state = self._state_dict(model, optimizer)
        self._check_space(step, _state_bytes(state) + len(text))
        pending = _PendingSave(step, tmp, final, time.perf_counter())
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                _write_durably(tmp / META, text)
            if self.cfg.async_save and not blocking:
                response = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(tmp),
                                          **self._dcp_kwargs())
                pending.future = getattr(response, "upload_completion", response)
                self._pending = pending
            else:
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), **self._dcp_kwargs())
                self._finalise(pending)
        except Exception as e:
            self._raise_if_out_of_space(e, pending)
            raise

    def _check_space(self, step: int, local_bytes: int) -> None:
        """Collective: every rank stops, with the same message, when the checkpoint folder has
        less free space than the last complete checkpoint took (no checkpoint yet: than the
        state all ranks are about to write)."""
        total = sum(self._all_gather(local_bytes))
        problem = None
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            complete = complete_checkpoints(self.root)
            need, what = total, "the state to save"
            if complete:
                last = complete[-1][1]
                try:
                    need = sum(e["size"] for e in read_manifest(last).values())
                    what = f"the last checkpoint ({last.name})"
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            free = free_bytes(self.root)
            if free < need:
                problem = (f"not enough free space to save checkpoint step {step}: {self.root} has "
                           f"{_human(free)} free, {what} takes {_human(need)}. Free some space "
                           f"(or lower checkpoint.keep, or give run_dir on a larger disk) and rerun: "
                           f"the run resumes from its last complete checkpoint, which is intact.")
        problem = self._broadcast(problem)
        if problem:
            raise CheckpointError(problem)

    def _raise_if_out_of_space(self, error: BaseException, p: _PendingSave) -> None:
        """A write that failed because the disk filled up: drop the partial folder (it is never
        loaded anyway) and say what happened instead of the serializer's riddle."""
        if not _is_out_of_space(error):
            return
        shutil.rmtree(p.tmp, ignore_errors=True)
        raise CheckpointError(f"the disk filled up while saving checkpoint step {p.step} in "
                              f"{self.root} ({_human(free_bytes(self.root))} free now): {error}. "
                              f"The previous checkpoints are intact; free some space and rerun "
                              f"to resume from the last one.") from error

    def wait(self) -> None:
        """Complete a pending asynchronous save: wait for its writes, then manifest, marker,
        rename and clean-up. A no-op when nothing is pending."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
            self._finalise(pending)
        except Exception as e:
            self._raise_if_out_of_space(e, pending)
            raise

    def _finalise(self, p: _PendingSave) -> None:
        self._barrier()  # every rank's files are written
        names = None
        if self.rank == 0:
            names = sorted(str(f.relative_to(p.tmp)) for f in p.tmp.rglob("*") if f.is_file())
        names = self._broadcast(names)
        mine = {n: {"size": (p.tmp / n).stat().st_size, "crc32": file_crc32(p.tmp / n)}
                for n in names if checksum_owner(n, self.world) == self.rank}
        entries = self._all_gather(mine)
        if self.rank == 0:
            files = {k: v for part in entries for k, v in part.items()}
            manifest = {"format_version": FORMAT_VERSION, "algorithm": "crc32", "files": files}
            _write_durably(p.tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            _write_durably(p.tmp / MARKER, f"{p.step}\n")
            _fsync_dir(p.tmp)
            if p.final.exists():  # the same step saved again (after resuming from an earlier one)
                os.replace(p.final, p.final.with_name(f"{p.final.name}.old-{self._nonce}"))
            os.replace(p.tmp, p.final)
            _fsync_dir(self.root)
            self._clean_up()
            size = sum(v["size"] for v in files.values())
            how = "in the background, completed" if p.future is not None else "in"
            log.info("saved checkpoint %s (%.1f MB %s %.1f s)", p.final, size / 1e6, how,
                     time.perf_counter() - p.started)
        self._barrier()  # nobody moves on before the checkpoint is in place
        self.step_on_disk = p.step

    def _clean_up(self) -> None:
        """Rank 0, after a checkpoint completed: drop complete checkpoints beyond `keep` and the
        leftovers of interrupted saves (no save is in flight at this point)."""
        complete = complete_checkpoints(self.root)
        for _, path in complete[:-self.cfg.keep]:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed old checkpoint %s", path)
        for path in self.root.iterdir():
            if path.is_dir() and _STEP_DIR.match(path.name.split(".")[0]) and (
                    ".tmp-" in path.name or ".old-" in path.name):
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed leftover %s", path)

    # ---- loading

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict | None:
        """Restore model + optimizer in place from the checkpoint checkpoint.resume names and
        return its `extra`; None for a fresh start (resume=none, or no checkpoint yet).

        Complete checkpoints newer than the one restored (all of them for resume=none; with
        resume=<step>, or damaged ones skipped by resume=latest) belong to a history this run
        abandons: they are moved to `superseded-<time>/`, so that keep-last-k and a later
        resume=latest see only this run's own checkpoints."""
        self.folder = None
        resume = str(self.cfg.resume)
        if resume == "none":
            self._set_aside(after_step=-1, reason="checkpoint.resume=none: starting fresh")
            return None
        # Rank 0 lists the folder and decides; the others follow, whatever their own (possibly
        # stale, on a network file system) listing says: every rank then verifies the same
        # candidates in the same order, and loads the same step with the same collectives.
        listing = self._broadcast(list_step_dirs(self.root) if self.rank == 0 else None)
        path = select_checkpoint(self.root, resume, self._verify, warn=self.rank == 0, steps=listing)
        if path is None:
            if self.rank == 0:
                log.info("no checkpoint in %s: starting fresh", self.root)
            return None
        meta = self._read_meta_on_rank0(path)
        check_compatible(meta, self.model_cfg, path)
        saved_layout, layout = meta.get("layout"), model_layout(model, self.world)
        if self.rank == 0 and saved_layout != layout:
            log.info("checkpoint %s was saved on layout %s; resharding onto %s", path, saved_layout, layout)
        state = self._state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=path, **self._dcp_kwargs())
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        self._set_aside(after_step=meta["step"], reason=f"resuming from {path.name}")
        self.folder = path
        self.step_on_disk = meta["step"]
        return meta["extra"]

    def _read_meta_on_rank0(self, folder: Path) -> dict:
        """meta.json as rank 0 reads it; an unreadable one fails on every rank alike."""
        found: tuple[dict | None, str | None] = (None, None)
        if self.rank == 0:
            try:
                found = (read_meta(folder), None)
            except (OSError, ValueError, CheckpointError) as e:
                found = (None, f"checkpoint {folder}: {META} unreadable ({e})")
        meta, error = self._broadcast(found)
        if error:
            raise CheckpointError(error)
        return meta

    def _verify(self, folder: Path) -> list[str]:
        """verify_files with the checksums shared out over the ranks; every rank gets the same
        answer, so every rank picks the same checkpoint."""
        found = self._all_gather(verify_files(folder, self.rank, self.world))
        return sorted({problem for part in found for problem in part})

    def _set_aside(self, after_step: int, reason: str) -> None:
        """Move the complete checkpoints with a step above `after_step` into superseded-<time>/."""
        newer = [p for s, p in complete_checkpoints(self.root) if s > after_step]
        if newer and self.rank == 0:
            dest = self.root / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
            dest.mkdir()
            for path in newer:
                os.replace(path, dest / path.name)
            log.warning("%s; %d newer checkpoint(s) (%s) moved to %s", reason, len(newer),
                        ", ".join(p.name for p in newer), dest)
        self._barrier()

    @staticmethod
    def _state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd}
