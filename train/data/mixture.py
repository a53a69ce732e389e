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
own epochs at its own pace. One source is the special case of one weight (P = 1). The permutation
is evaluated one index at a time (`Permutation`: a keyed Feistel network), never materialised, so
neither the start-up time nor the memory of a rank grows with the number of windows (the paper's
839B tokens are 205M windows of 4096: a materialised permutation would take 1.6 GB and seconds on
every rank).
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
        self._perms: dict[tuple[int, int], Permutation] = {}

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

    def _perm(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._perms:
            # A batch spans at most a few epochs per source; forget the ones already passed.
            self._perms = {(i, e): p for (i, e), p in self._perms.items() if i != source or e >= epoch - 1}
            self._perms[key] = Permutation(self.num_windows[source], [self.seed, source, epoch])
        return self._perms[key]


_M64 = (1 << 64) - 1


def _mix(x: int, key: int) -> int:
    """splitmix64's finaliser of x + key: a well-spread 64-bit hash."""
    x = (x + key + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random permutation of range(n) keyed by `seed` (a list of ints), evaluated per index
    in O(1) time and memory: a 6-round balanced Feistel network over the smallest domain of 2^(2h)
    >= n values (a bijection of that domain), walking the cycle until the value falls below n (the
    domain is < 4n, so about 2 steps on average)."""

    def __init__(self, n: int, seed: list[int]) -> None:
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.SeedSequence(seed).generate_state(6, np.uint64)]

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is out of range for a permutation of {self.n}")
        x, h, mask = i, self.half, self.mask
        while True:
            left, right = x >> h, x & mask
            for k in self.keys:
                left, right = right, left ^ (_mix(right, k) & mask)
            x = (left << h) | right
            if x < self.n:
                return x
