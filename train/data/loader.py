"""Batches for training and validation, with a global order that does not depend on the layout.

The train stream is one infinite sequence of sample slots cut into global batches of
G = batch_size * dp_world slots: global batch k = slots [k*G, (k+1)*G), and data-parallel rank r
gets rows [r*batch_size, (r+1)*batch_size) of it. Which window of which source fills a slot is a
pure function of (sources, weights, seed, slot) (train/data/mixture.py), so one rank with batch 8
sees exactly the concatenation of what two ranks with batch 4 see.

The loader's state is a single global position in that stream (slots consumed by all ranks
together), the same on every rank, plus the fingerprints of the prepared folders it refers to. A run
can therefore resume with another data-parallel layout: the new layout continues the same stream
from the same position. Resuming on changed data is refused, naming the folder that changed.

Fetching runs in torchdata's StatefulDataLoader (worker processes when num_workers > 0); this
module keeps the position itself, because the loader's own state is per rank and per worker count.
Its workers ignore the job's preemption signals and die with their rank (train/process_lifetime.py).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from train.data.dataset import TokenStream
from train.data.mixture import MixtureOrder
from train.process_lifetime import loader_worker_init

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), LongTensor [batch_size, seq_len] each


class GlobalOrderBatchSampler:
    """Yields this rank's (source, window) pairs of the global batches starting at `position`.

    Stateful (state = the global position of the next batch it will produce), so the
    StatefulDataLoader could also checkpoint it on its own.
    """

    def __init__(self, order: MixtureOrder, *, batch_size: int, dp_rank: int, dp_world: int,
                 position: int = 0) -> None:
        self.order = order
        self.batch_size = batch_size
        self.global_batch_size = batch_size * dp_world
        self.offset = dp_rank * batch_size  # this rank's first row in a global batch
        self.position = position

    def indices(self, position: int) -> list[tuple[int, int]]:
        """This rank's rows of the global batch that starts at stream position `position`."""
        first = position + self.offset
        return [self.order.sample(s) for s in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            batch = self.indices(self.position)
            self.position += self.global_batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class SourceWindows(torch.utils.data.Dataset):
    """Windows of seq_len + 1 tokens of several token streams, addressed by (source, window).
    Worker processes map the shard files themselves (nothing large is pickled)."""

    def __init__(self, streams: list[TokenStream], window: int) -> None:
        self.streams = streams
        self.window = window

    def __len__(self) -> int:
        return sum(s.num_windows(self.window) for s in self.streams)

    def __getitem__(self, key: tuple[int, int]) -> np.ndarray:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> np.ndarray:
        rows = np.empty((len(keys), self.window), dtype=np.int64)
        for r, (i, w) in enumerate(keys):
            rows[r] = self.streams[i].tokens(w * self.window, (w + 1) * self.window)
        return rows


def to_batch(rows: np.ndarray) -> Batch:
    """[B, seq_len + 1] token windows -> (inputs, labels), labels shifted by one."""
    t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TrainLoader:
    """Infinite iterator over this rank's (inputs, labels) train batches in the global order.

    `state_dict()` is {"position", "seed", "sources": {folder: fingerprint}, "weights",
    "seq_len"}: the global stream position after the last batch handed out, identical on all
    ranks; `load_state_dict` continues from there, with this loader's batch size and layout.
    Iterating (`iter(loader)`) never rewinds.
    """

    def __init__(self, streams: list[TokenStream], *, seq_len: int, weights: list[float],
                 fingerprints: dict[str, str], batch_size: int, dp_rank: int, dp_world: int,
                 seed: int, num_workers: int = 0, pin_memory: bool = False) -> None:
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} is out of range for dp_world {dp_world}")
        self.dataset = SourceWindows(streams, seq_len + 1)
        self.num_windows = [s.num_windows(seq_len + 1) for s in streams]
        self.order = MixtureOrder(weights, self.num_windows, seed)
        self.seq_len = seq_len
        self.weights = list(weights)
        self.fingerprints = dict(fingerprints)
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
    def num_sequences(self) -> int:
        return sum(self.num_windows)

    @property
    def epoch(self) -> float:
        """Passes over the train split so far (fractional; of the first source in a mixture)."""
        return self.order.consumed(self.position)[0] / self.num_windows[0]

    def consumed(self) -> list[int]:
        """Windows taken from each source so far, by all ranks together."""
        return self.order.consumed(self.position)

    def _start(self) -> Iterator[Batch]:
        sampler = GlobalOrderBatchSampler(self.order, batch_size=self.batch_size, dp_rank=self.dp_rank,
                                          dp_world=self.dp_world, position=self.position)
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which newer torch deprecates: noise, not ours.
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = StatefulDataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=to_batch,
                num_workers=self.num_workers, pin_memory=self.pin_memory,
                # workers ignore the job's signals (the trainer saves) and die with their rank
                worker_init_fn=loader_worker_init if self.num_workers > 0 else None)
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = self._start()
        batch = next(self._batches)
        self.position += self.global_batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "sources": dict(self.fingerprints),
                "weights": list(self.weights), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("sources")
        if saved is None:
            raise ValueError("data loader state is from an older version (no data fingerprints): "
                             "it cannot be restored on prepared data; start a new run")
        for folder, fp in saved.items():
            if folder in self.fingerprints and self.fingerprints[folder] != fp:
                raise ValueError(f"the data in {folder} changed since the checkpoint (fingerprint {fp}, "
                                 f"now {self.fingerprints[folder]}): its position cannot be restored")
        if list(saved) != list(self.fingerprints) or list(state["weights"]) != self.weights:
            raise ValueError(f"data loader state is for sources {list(saved)} with weights "
                             f"{state['weights']}, this run reads {list(self.fingerprints)} with weights "
                             f"{self.weights} (data.source / data.mixture changed): its position cannot "
                             f"be restored")
        if int(state["seq_len"]) != self.seq_len:
            raise ValueError(f"data loader state was saved with data.seq_len={state['seq_len']}, this run "
                             f"uses {self.seq_len}: the windows differ, so its position cannot be restored")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"data loader state was saved with seed {state['seed']}, this run uses "
                             f"{self.seed}: the stream order differs, so its position cannot be restored")
        self.position = int(state["position"])
        self._batches = None  # restart fetching (and workers) from the restored position

