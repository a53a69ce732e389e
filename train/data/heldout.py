"""Which held-out windows validation measures: a fixed sample, spread over the whole held-out set
and every source, the same whatever the data-parallel layout.

Windows: a source's held-out stream (its val split, train/data/dataset.py) is cut into windows of
W = seq_len + 1 tokens like the train stream. Held-out text is stored as whole documents, BOS ...
EOS each (train/data/shards.py), so a window that reaches from one document into the next holds
the EOS and BOS between them: it never splices two texts silently.

Spread: source i's N_i windows are visited in bit-reversed order (0, N/2, N/4, 3N/4, N/8, ...,
skipping indices >= N_i): for every k, the first k windows are spread evenly over the whole
stream, which is in corpus order, so a folder sorted by domain is measured in every domain, and
the first k are a prefix of the first k + 1 (a larger sample only adds windows).

Blend: slot s of the validation sequence takes the next window of source table[s mod P], the
slot table of the train weights (train/data/mixture.py), so every source of a mixture is measured
in proportion; a source that runs out ends the sequence (its windows are never repeated).

Layout: global validation batch k is slots [k * G, (k + 1) * G) with G = batch_size * dp_world,
and data-parallel rank r takes rows [r * batch_size, (r + 1) * batch_size) of it, so n batches
measure the same windows for any layout of the same global batch (one rank of 8 rows or two of 4),
and a larger global batch measures a superset.
"""
from __future__ import annotations

import numpy as np

from train.data.dataset import TokenStream
from train.data.loader import Batch, SourceWindows, to_batch
from train.data.mixture import slot_table


def spread_order(n: int, k: int) -> np.ndarray:
    """The first min(k, n) indices of range(n) in bit-reversed order (see the docstring)."""
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    bits = max(1, (n - 1).bit_length())
    found, start = [], 0
    while sum(map(len, found)) < k:  # about half of the 2^bits candidates are < n
        i = np.arange(start, min(start + 2 * k + 64, 1 << bits), dtype=np.int64)
        start += len(i)
        rev = np.zeros_like(i)
        for b in range(bits):
            rev |= ((i >> b) & 1) << (bits - 1 - b)
        found.append(rev[rev < n])
    return np.concatenate(found)[:k]


class HeldOutSample:
    """The validation windows of one rank: `batches(n)`, the same list on every call."""

    def __init__(self, streams: list[TokenStream], *, seq_len: int, weights: list[float],
                 batch_size: int, dp_rank: int, dp_world: int) -> None:
        self.dataset = SourceWindows(streams, seq_len + 1)
        self.num_windows = [s.num_windows(seq_len + 1) for s in streams]
        self.table = slot_table(weights)
        self.batch_size = batch_size
        self.offset = dp_rank * batch_size
        self.global_batch_size = batch_size * dp_world

    def keys(self, limit: int) -> list[tuple[int, int]]:
        """The first `limit` (source, window) slots of the blended sample, fewer when a source runs
        out."""
        sources, taken = [], [0] * len(self.num_windows)
        for s in range(limit):
            i = int(self.table[s % len(self.table)])
            if taken[i] == self.num_windows[i]:
                break
            sources.append(i)
            taken[i] += 1
        orders = [spread_order(n, k) for n, k in zip(self.num_windows, taken)]
        nth = [0] * len(self.num_windows)
        keys = []
        for i in sources:
            keys.append((i, int(orders[i][nth[i]])))
            nth[i] += 1
        return keys

    def num_batches(self, n: int) -> int:
        """How many of the first n global validation batches exist."""
        return len(self.keys(n * self.global_batch_size)) // self.global_batch_size

    def batches(self, n: int) -> list[Batch]:
        """This rank's rows of the first min(n, available) global validation batches. Every rank
        gets the same number of batches, so per-batch collectives line up."""
        keys = self.keys(n * self.global_batch_size)
        out = []
        for k in range(len(keys) // self.global_batch_size):
            first = k * self.global_batch_size + self.offset
            out.append(to_batch(self.dataset.__getitems__(keys[first:first + self.batch_size])))
        return out
