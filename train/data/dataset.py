"""Open a prepared dataset folder (train/data/prepare.py) and cut its token streams into windows.

Opening reads manifest.json, checks its format version and that every shard file is there with the
size the manifest implies (a stat per file, no reading), and memory-maps the shards lazily: the
cost does not grow with the number of tokens, so a run starts as fast on a terabyte as on a
megabyte. The tokenizer and vocabulary checks against the run are in train/data/build.py.

Windows: a split's shards, in shard order, form one token stream (train units in corpus order,
each document BOS ... EOS); window i is tokens [i * W, (i + 1) * W) with W = seq_len + 1 (inputs =
window[:-1], labels = window[1:]); the tail that does not fill a window is not used. Consecutive
windows share no token, and held-out units are in their own stream, so no held-out token is ever
a training input or target.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from train.data.prepare import FORMAT_VERSION, MANIFEST, SPLITS
from train.data.sources import DataError


class PreparedDataset:
    """A prepared folder: its manifest, fingerprint and the token streams of both splits."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().resolve()
        path = self.folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{self.folder} is not a prepared dataset: {MANIFEST} is missing (prepare "
                            f"it with python -m train.data.prepare ... prepare.out={self.folder})")
        raw = path.read_bytes()
        try:
            self.manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is damaged (not JSON: {e.msg})") from None
        version = self.manifest.get("format")
        if version != FORMAT_VERSION:
            raise DataError(f"{self.folder} was prepared in format {version}; this version reads format "
                            f"{FORMAT_VERSION}: prepare it again (python -m train.data.prepare ...)")
        self.fingerprint = hashlib.sha256(raw).hexdigest()[:16]
        self.dtype = np.dtype(self.manifest["dtype"])
        tok = self.manifest["tokenizer"]
        self.tokenizer_path = self.folder / tok["file"]
        self.tokenizer_digest = tok["digest"]
        self.vocab_size = int(tok["vocab_size"])
        self.splits = {s: TokenStream(self.folder, self.manifest["shards"], s, self.dtype) for s in SPLITS}

    @property
    def name(self) -> str:
        return self.folder.name


class TokenStream:
    """One split's tokens over all shards, as one virtual array (shards memory-mapped on first use)."""

    def __init__(self, folder: Path, shards: list[dict], split: str, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.paths: list[Path] = []
        sizes = []
        for record in shards:
            n = int(record[split]["tokens"])
            if n == 0:
                continue
            path = folder / "shards" / f"{record['id']:06d}.{split}.bin"
            idx = folder / "shards" / f"{record['id']:06d}.{split}.idx"
            for f, expected in ((path, n * dtype.itemsize), (idx, 8 * int(record[split]["units"]))):
                if not f.is_file():
                    raise DataError(f"prepared shard {f} is missing (the manifest lists it): prepare "
                                    f"{folder} again")
                if f.stat().st_size != expected:
                    raise DataError(f"prepared shard {f} is damaged: {f.stat().st_size} bytes, the "
                                    f"manifest says {expected}; prepare {folder} again")
            self.paths.append(path)
            sizes.append(n)
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.starts[-1])
        self._maps: list[np.ndarray | None] = [None] * len(self.paths)

    def num_windows(self, window: int) -> int:
        return self.num_tokens // window

    def _map(self, k: int) -> np.ndarray:
        m = self._maps[k]
        if m is None:
            m = self._maps[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r")
        return m

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (across shard boundaries)."""
        out = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            base = int(self.starts[k])
            out.append(self._map(k)[start - base:end - base])
            start, k = end, k + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def windows(self, indices: list[int], window: int) -> np.ndarray:
        """[len(indices), window] array of the windows with these indices."""
        rows = np.empty((len(indices), window), dtype=self.dtype)
        for r, i in enumerate(indices):
            rows[r] = self.tokens(i * window, (i + 1) * window)
        return rows

    def __getstate__(self) -> dict[str, Any]:  # worker processes map the files themselves
        return {**self.__dict__, "_maps": [None] * len(self.paths)}
