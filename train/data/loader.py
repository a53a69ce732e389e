"""Batches for training and validation, with a global order that does not depend on the layout.

The train stream is one infinite sequence of window indices: epoch e is a permutation of all train
windows seeded by (seed, e), and epochs follow each other. It is cut into global batches of
G = batch_size * dp_world windows: global batch k = stream[k*G : (k+1)*G], and data-parallel rank r
gets rows [r*batch_size, (r+1)*batch_size) of it. So global batch k depends on (seed, k, G) only:
one rank with batch 8 sees exactly the concatenation of what two ranks with batch 4 see.

The loader's state is a single global position in that stream (windows consumed by all ranks
together), the same on every rank. A run can therefore resume with another data-parallel layout:
the new layout continues the same stream from the same position (if G changed, the batches from
there on are cut at different points, but no window is skipped or repeated within the epoch).

Fetching runs in torchdata's StatefulDataLoader (worker processes when num_workers > 0); this
module keeps the position itself, because the loader's own state is per rank and per worker count.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), LongTensor [batch_size, seq_len] each


def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the train windows in `epoch` (a pure function of its arguments)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_sequences)


class GlobalOrderBatchSampler:
    """Yields this rank's window indices of global batches position/G, position/G + 1, ...

    Stateful (state = the global position of the next batch it will produce), so the
    StatefulDataLoader could also checkpoint it on its own.
    """

    def __init__(self, num_sequences: int, *, batch_size: int, dp_rank: int, dp_world: int,
                 seed: int, position: int = 0) -> None:
        self.num_sequences = num_sequences
        self.batch_size = batch_size
        self.global_batch_size = batch_size * dp_world
        self.offset = dp_rank * batch_size  # this rank's first row in a global batch
        self.seed = seed
        self.position = position
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, position: int) -> list[int]:
        """This rank's rows of the global batch that starts at stream position `position`."""
        stream = np.arange(self.batch_size) + position + self.offset
        epochs, offsets = np.divmod(stream, self.num_sequences)
        return [int(self._perm(e)[o]) for e, o in zip(epochs.tolist(), offsets.tolist())]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A batch spans at most a few epochs; forget the ones already passed.
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = epoch_permutation(self.num_sequences, self.seed, epoch)
        return self._perms[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            batch = self.indices(self.position)
            self.position += self.global_batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class PackedSequences(torch.utils.data.Dataset):
    """Rows of a [N, seq_len + 1] .npy file, opened lazily as a memory map in each process (so
    worker processes share the page cache instead of pickling the data)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: np.ndarray | None = None
        self.shape = self._open().shape

    def _open(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.load(self.path, mmap_mode="r")
        return self._rows

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        return self._open()[i]

    def __getitems__(self, indices: list[int]) -> np.ndarray:
        return self._open()[indices]  # one gather for the whole batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rows": None}


def to_batch(rows: np.ndarray) -> Batch:
    """[B, seq_len + 1] token windows -> (inputs, labels), labels shifted by one."""
    t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TrainLoader:
    """Infinite iterator over this rank's (inputs, labels) train batches in the global order.

    `state_dict()` is {"position", "seed", "num_sequences"}: the global stream position after the
    last batch handed out, identical on all ranks; `load_state_dict` continues from there, with
    this loader's batch size and layout. Iterating (`iter(loader)`) never rewinds.
    """

    def __init__(self, path: Path, *, batch_size: int, dp_rank: int, dp_world: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is out of range for dp_world {dp_world}")
        self.dataset = PackedSequences(path)
        self.num_sequences = len(self.dataset)
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.global_batch_size = batch_size * dp_world
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.position = 0  # global windows consumed, by all ranks together
        self._batches: Iterator[Batch] | None = None

    @property
    def epoch(self) -> float:
        """Passes over the train split so far (fractional)."""
        return self.position / self.num_sequences

    def _start(self) -> Iterator[Batch]:
        sampler = GlobalOrderBatchSampler(
            self.num_sequences, batch_size=self.batch_size, dp_rank=self.dp_rank,
            dp_world=self.dp_world, seed=self.seed, position=self.position)
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which newer torch deprecates: noise, not ours.
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = StatefulDataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=to_batch,
                num_workers=self.num_workers, pin_memory=self.pin_memory)
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        self.position += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_sequences"]) != self.num_sequences:
            raise ValueError(
                f"data loader state is for {state['num_sequences']} train sequences, this data has "
                f"{self.num_sequences}: the data (data.source, seq_len, tokenizer, ...) changed since "
                f"the checkpoint, so its position cannot be restored")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data loader state was saved with seed {state['seed']}, this run uses "
                             f"{self.seed}: the stream order differs, so its position cannot be restored")
        self.position = int(state["position"])
        self._batches = None  # restart fetching (and workers) from the restored position


class ValSplit:
    """The validation windows, sharded like the train stream but in one fixed order."""

    def __init__(self, path: Path, *, batch_size: int, dp_rank: int, dp_world: int) -> None:
        self.rows = np.load(path, mmap_mode="r")
        self.batch_size = batch_size
        self.offset = dp_rank * batch_size
        self.global_batch_size = batch_size * dp_world

    def __len__(self) -> int:
        return self.rows.shape[0]

    def batches(self, n: int) -> list[Batch]:
        """This rank's rows of the first min(n, len // G) global validation batches. Every rank gets
        the same number of batches, so per-batch collectives line up."""
        count = min(n, len(self) // self.global_batch_size)
        out = []
        for k in range(count):
            start = k * self.global_batch_size + self.offset
            out.append(to_batch(self.rows[start:start + self.batch_size]))
        return out
