"""Tokenize a corpus once, pack it into fixed-length sequences, split train/validation, cache it.

Packing: every document becomes BOS + tokens + EOS; the documents are concatenated in corpus order
and cut into consecutive, non-overlapping windows of seq_len + 1 tokens (inputs = window[:-1],
labels = window[1:]). Consecutive windows share no token, so no token of a held-out window is
ever seen in training; the price is that the step from one window to the next is never a target
(1 token in seq_len + 1). The tail that does not fill a window is dropped.

Split: a fixed-seed permutation of the window indices puts round(val_fraction * N) windows (at
least 1) in validation, stored in that random order, and the rest in train, stored in corpus order.
It depends only on the cached data, never on the run's seed or the number of ranks, so every run
on the same data validates on the same windows. (Splitting by window rather than by document also
works for a corpus that is one big document.)

Cache: a folder `tokens-<key>` in data.cache_dir with train.npy and val.npy ([N, seq_len + 1],
uint16 when the vocabulary allows, else uint32; loaded as memory maps) and meta.json. The key
hashes the corpus identity, the tokenizer file's content, seq_len, max_chars and val_fraction.
The folder is built under a temporary name and renamed into place in one step, so a killed or
concurrent run never leaves a half-written cache; whoever renames first wins.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from train.data.sources import Corpus, DataError
from train.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the packing or split changes: old caches are then ignored
SPLIT_SEED = 20240416  # fixed: the validation windows do not depend on the run's seed
_ENCODE_CHARS = 2_000_000  # characters handed to the tokenizer per call (and per progress step)
_COPY_ROWS = 65_536  # windows copied per block when writing the train split


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def tokenizer_cache_path(cache_dir: Path, corpus: Corpus, vocab_size: int,
                         max_chars: int | None) -> Path:
    """Where the tokenizer trained for this corpus and vocabulary size is kept."""
    key = _digest("tokenizer", corpus.identity(), vocab_size, max_chars)
    return Path(cache_dir) / f"tokenizer-{key}.model"


def tokens_cache_dir(cache_dir: Path, corpus: Corpus, tokenizer: Tokenizer, seq_len: int,
                     max_chars: int | None, val_fraction: float) -> Path:
    tok_digest = tokenizer.digest
    key = _digest("tokens", FORMAT_VERSION, corpus.identity(), tok_digest, seq_len, max_chars, val_fraction)
    return Path(cache_dir) / f"tokens-{key}"


def is_prepared(out_dir: Path) -> bool:
    return (Path(out_dir) / "meta.json").is_file()


def read_meta(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "meta.json").read_text())


def prepare_tokens(corpus: Corpus, tokenizer: Tokenizer, out_dir: Path, *, seq_len: int,
                   max_chars: int | None, val_fraction: float) -> dict:
    """Build the cache folder `out_dir` (see the module docstring) unless it exists; return its meta."""
    out_dir = Path(out_dir)
    if is_prepared(out_dir):
        return read_meta(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        meta = _write_splits(corpus, tokenizer, tmp, seq_len=seq_len, max_chars=max_chars,
                             val_fraction=val_fraction)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_prepared(out_dir):  # not a lost race: a real failure
                raise
            log.info("another run prepared %s first; using it", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left if the rename happened
    return read_meta(out_dir)


def _write_splits(corpus: Corpus, tokenizer: Tokenizer, folder: Path, *, seq_len: int,
                  max_chars: int | None, val_fraction: float) -> dict:
    t0 = time.perf_counter()
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    expected = corpus.expected_chars(max_chars)
    log.info("preparing data.source=%s (%d files, %.1f MB) with %s -> %s", corpus.name,
             len(corpus.files), corpus.total_bytes / 1e6, tokenizer.path.name, folder.parent)

    # 1. Tokenize in chunks, streaming the token ids to disk (the corpus may not fit in memory).
    stream_path = folder / "stream.bin"
    n_docs = n_chars = n_tokens = 0
    next_report = 0.1
    with open(stream_path, "wb") as stream:
        def flush(batch: list[str]) -> None:
            nonlocal n_tokens
            for ids in tokenizer.encode_batch(batch):
                doc = np.empty(len(ids) + 2, dtype=dtype)
                doc[0], doc[1:-1], doc[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
                stream.write(doc.tobytes())
                n_tokens += len(doc)

        batch: list[str] = []
        batch_chars = 0
        for doc in corpus.documents(max_chars):
            batch.append(doc)
            batch_chars += len(doc)
            n_docs += 1
            n_chars += len(doc)
            if batch_chars >= _ENCODE_CHARS:
                flush(batch)
                batch, batch_chars = [], 0
                if n_chars / expected >= next_report:
                    log.info("tokenized %.1fM / ~%.1fM characters (%d%%): %d documents, %.2fM tokens",
                             n_chars / 1e6, expected / 1e6, min(100, round(100 * n_chars / expected)),
                             n_docs, n_tokens / 1e6)
                    next_report = n_chars / expected + 0.1
        flush(batch)
    if n_chars == 0:
        raise DataError(f"data.source={corpus.name}: the corpus has no text")

    # 2. Pack into windows and split.
    window = seq_len + 1
    n_seq = n_tokens // window
    if n_seq < 2:
        raise DataError(
            f"data.source={corpus.name} gives {n_tokens} tokens, too few for a train and a validation "
            f"sequence of data.seq_len+1={window} tokens; use more data or a shorter data.seq_len")
    seqs = np.memmap(stream_path, dtype=dtype, mode="r", shape=(n_seq, window))
    n_val = min(n_seq - 1, max(1, round(val_fraction * n_seq)))
    val_idx = np.random.default_rng(SPLIT_SEED).permutation(n_seq)[:n_val]
    np.save(folder / "val.npy", np.asarray(seqs[val_idx]))
    is_val = np.zeros(n_seq, dtype=bool)
    is_val[val_idx] = True
    train = np.lib.format.open_memmap(folder / "train.npy", mode="w+", dtype=dtype,
                                      shape=(n_seq - n_val, window))
    row = 0
    for start in range(0, n_seq, _COPY_ROWS):
        block = np.asarray(seqs[start:start + _COPY_ROWS])[~is_val[start:start + _COPY_ROWS]]
        train[row:row + len(block)] = block
        row += len(block)
    train.flush()
    del train, seqs
    stream_path.unlink()

    meta = {
        "format": FORMAT_VERSION, "source": corpus.name, "tokenizer": str(tokenizer.path),
        "vocab_size": tokenizer.vocab_size, "seq_len": seq_len, "dtype": np.dtype(dtype).name,
        "documents": n_docs, "characters": n_chars, "tokens": n_tokens,
        "dropped_tail_tokens": n_tokens - n_seq * window,
        "train_sequences": n_seq - n_val, "val_sequences": n_val,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("prepared %d train + %d validation sequences of %d tokens from %d documents "
             "(%.1fM characters, %.2fM tokens, %.1f chars/token) in %.1f s",
             n_seq - n_val, n_val, window, n_docs, n_chars / 1e6, n_tokens / 1e6,
             n_chars / max(1, n_tokens), time.perf_counter() - t0)
    return meta
