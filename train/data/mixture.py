"""The global order of train windows over one or several weighted sources.

Slots: the train stream is an infinite sequence of sample slots 0, 1, 2, ...; global batch k is
slots [k * G, (k + 1) * G) with G = batch_size * dp_world, and data-parallel rank r takes rows
[r * batch_size, (r + 1) * batch_size) of it. Everything below is a pure function of (sources,
weights, seed, slot), so the state of the whole stream is one integer, the global position, the
same on every rank and valid for any data-parallel layout.

Which source fills a slot: the weights are turned into integer counts n_i per period of P = 10,000
slots (largest remainders, so they sum to P exactly) and one period is laid out by smooth weighted
round-robin (each slot goes to the source furthest behind its share). Every source then gets its
exact share in every period, spread evenly through it, and slot s's source and its index within
that source (k * n_i + the source's count before s within the period) are table look-ups: no
simulation from slot 0 on resume.

Which window: a source's j-th sample is window perm_i(e)[j mod N_i] of its N_i train windows, with
epoch e = j // N_i and perm_i(e) a permutation seeded by (seed, i, e): each source runs through its
own epochs at its own pace. One source is the special case of one weight (P = 1).
"""
from __future__ import annotations

import numpy as np

PERIOD = 10_000


def slot_table(weights: list[float], period: int = PERIOD) -> np.ndarray:
    """One period of source indices (length `period`, or 1 for a single source)."""
    if len(weights) == 1:
        return np.zeros(1, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    exact = w * period
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[:period - counts.sum()]:
        counts[i] += 1
    table = np.empty(period, dtype=np.int64)
    current = np.zeros(len(w))
    for s in range(period):  # smooth weighted round-robin over the integer counts
        current += counts
        i = int(np.argmax(current))
        current[i] -= period
        table[s] = i
    return table


class MixtureOrder:
    """slot -> (source index, window index within that source's train split)."""

    def __init__(self, weights: list[float], num_windows: list[int], seed: int) -> None:
        self.table = slot_table(weights)
        self.period = len(self.table)
        self.num_windows = list(num_windows)
        self.seed = seed
        n = len(num_windows)
        # before[s, i]: slots of source i in table[:s]; per_period[i] = before[period, i]
        self.before = np.zeros((self.period + 1, n), dtype=np.int64)
        self.before[1:] = np.cumsum(np.eye(n, dtype=np.int64)[self.table], axis=0)
        self.per_period = self.before[-1]
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def consumed(self, position: int) -> list[int]:
        """Samples taken from each source by slots [0, position)."""
        k, r = divmod(position, self.period)
        return (k * self.per_period + self.before[r]).tolist()

    def sample(self, slot: int) -> tuple[int, int]:
        k, r = divmod(slot, self.period)
        i = int(self.table[r])
        j = k * int(self.per_period[i]) + int(self.before[r, i])
        epoch, offset = divmod(j, self.num_windows[i])
        return i, int(self._perm(i, epoch)[offset])

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            # A batch spans at most a few epochs per source; forget the ones already passed.
            self._perms = {(i, e): p for (i, e), p in self._perms.items() if i != source or e >= epoch - 1}
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, source, epoch])))
            self._perms[key] = rng.permutation(self.num_windows[source])
        return self._perms[key]
