"""The data pipeline's entry point: `build_data` turns a `DataConfig` into a tokenizer, a resumable
train loader and validation batches for one data-parallel rank.

Only the main rank does the work that writes files (training the tokenizer, tokenizing and packing
the corpus into data.cache_dir); the other ranks wait in `barrier()` and then read the cache. So
data.cache_dir must be visible to all ranks (on several nodes: a shared file system, or
is_main=True on each node's first rank). If the main rank fails while preparing, it still enters the
barrier before raising, so the others fail too (the cache is missing) instead of hanging.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import DataConfig
from train.data.loader import Batch, TrainLoader, ValSplit
from train.data.prepare import (is_prepared, prepare_tokens, read_meta, tokenizer_cache_path,
                                tokens_cache_dir)
from train.data.sources import Corpus, DataError, open_corpus
from train.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["Batch", "Data", "DataError", "Tokenizer", "TrainLoader", "build_data"]

log = logging.getLogger(__name__)


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TrainLoader
    num_train_sequences: int
    num_val_sequences: int
    seq_len: int
    tokens_dir: Path  # the prepared tokens-<key> folder in data.cache_dir
    _val: ValSplit

    def val_batches(self, n: int) -> list[Batch]:
        """Up to n (inputs, labels) batches of this rank's validation shard; the same list on every
        call, and the same number of batches on every rank."""
        return self._val.batches(n)


def build_data(cfg: DataConfig, *, vocab_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
               is_main: bool = True, barrier: Callable[[], None] | None = None) -> Data:
    """Prepare (main rank, once per cache key) and load the data of `cfg` for data-parallel rank
    `dp_rank` of `dp_world`. `vocab_size` is the model's: a trained tokenizer gets at most that
    many tokens, a given one must fit in it. `seed` orders the train stream (not the split)."""
    cfg.validate()
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} is out of range for dp_world {dp_world}")
    corpus = open_corpus(cfg.source, cfg.text_field)
    cache = Path(cfg.cache_dir)
    given = load_tokenizer(_given_tokenizer(cfg)) if cfg.tokenizer else None
    if given is not None:
        given.check_fits(vocab_size)  # before any expensive work

    if is_main:
        try:
            tokenizer = given or _trained_tokenizer(cfg, corpus, vocab_size, cache)
            folder = tokens_cache_dir(cache, corpus, tokenizer, cfg.seq_len, cfg.max_chars,
                                      cfg.val_fraction)
            prepare_tokens(corpus, tokenizer, folder, seq_len=cfg.seq_len, max_chars=cfg.max_chars,
                           val_fraction=cfg.val_fraction)
        finally:  # also on failure, so the other ranks stop waiting (and then fail: no cache)
            if barrier is not None:
                barrier()
    else:
        if barrier is not None:
            barrier()
        hint = (f"did the main rank fail to prepare data.source={cfg.source}? (data.cache_dir must "
                f"be shared by all ranks)")
        if given is not None:
            tokenizer = given
        else:
            path = tokenizer_cache_path(cache, corpus, vocab_size, cfg.max_chars)
            if not path.is_file():
                raise DataError(f"the trained tokenizer {path} is missing; {hint}")
            tokenizer = load_tokenizer(path)
        folder = tokens_cache_dir(cache, corpus, tokenizer, cfg.seq_len, cfg.max_chars, cfg.val_fraction)
        if not is_prepared(folder):
            raise DataError(f"prepared data {folder} is missing; {hint}")
    tokenizer.check_fits(vocab_size)

    meta = read_meta(folder)
    n_train, n_val = meta["train_sequences"], meta["val_sequences"]
    G = cfg.batch_size * dp_world
    where = (f"data.source={cfg.source} gives {meta['tokens']} tokens = {n_train} train + {n_val} "
             f"validation sequences of data.seq_len+1={cfg.seq_len + 1} tokens")
    if n_train < G:
        raise DataError(f"{where}; one global batch needs {G} train sequences (data.batch_size="
                        f"{cfg.batch_size} x {dp_world} data-parallel ranks). Use more data "
                        f"(data.max_chars), a shorter data.seq_len or a smaller data.batch_size")
    if n_val < G:
        raise DataError(f"{where}; one validation batch per rank needs {G} (data.batch_size="
                        f"{cfg.batch_size} x {dp_world} data-parallel ranks). Raise data.val_fraction "
                        f"({cfg.val_fraction}), use more data, or a smaller data.batch_size")
    train = TrainLoader(folder / "train.npy", batch_size=cfg.batch_size, dp_rank=dp_rank,
                        dp_world=dp_world, seed=seed, num_workers=cfg.num_workers,
                        pin_memory=torch.cuda.is_available())
    val = ValSplit(folder / "val.npy", batch_size=cfg.batch_size, dp_rank=dp_rank, dp_world=dp_world)
    return Data(tokenizer=tokenizer, train=train, num_train_sequences=n_train,
                num_val_sequences=n_val, seq_len=cfg.seq_len, tokens_dir=folder, _val=val)


def _given_tokenizer(cfg: DataConfig) -> Path:
    path = Path(cfg.tokenizer).expanduser()
    if not path.is_file():
        raise DataError(f"data.tokenizer: {path} does not exist (a sentencepiece tokenizer.model, "
                        f"or null to train one on the corpus)")
    return path


def _trained_tokenizer(cfg: DataConfig, corpus: Corpus, vocab_size: int, cache: Path) -> Tokenizer:
    path = tokenizer_cache_path(cache, corpus, vocab_size, cfg.max_chars)
    if path.is_file():
        log.info("using cached tokenizer %s", path)
        return load_tokenizer(path)
    return train_tokenizer(corpus.documents(cfg.max_chars), vocab_size, path,
                           expected_chars=corpus.expected_chars(cfg.max_chars))
