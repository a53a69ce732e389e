"""`build_data`: a `DataConfig` -> the tokenizer, a resumable train loader and validation batches
for one data-parallel rank, read from prepared dataset folders (train/data/prepare.py).

Where the data comes from:
- `data.mixture=[{path, weight}, ...]`: prepared folders, blended by weight (train/data/mixture.py);
- `data.source=DIR` where DIR holds a manifest.json: that prepared folder;
- `data.source=<raw files or stdlib>`: prepared automatically into data.cache_dir/prepared-<key>
  (key: the files' paths, sizes and times, the tokenizer, max_chars, val_fraction), by the same
  code as `python -m train.data.prepare`, in the main rank's process with all its cores. Only for
  sources up to data.max_auto_prepare_bytes of input: a larger one is refused with the exact
  prepare command to run instead. The other ranks do not wait in a collective (which would time out
  after parallel.timeout_s): they poll the file system for the folder's manifest for up to
  data.prepare_wait_s, and stop early with the main rank's error if it failed. So data.cache_dir
  must be visible to all ranks (on several nodes: a shared file system).
Opening prepared folders only reads their manifests and maps their shards: no rank tokenizes
anything and the start-up time does not depend on the corpus size.

Tokenizer: data.tokenizer if given (its sha256 must be the one every folder was prepared with), else
the copy inside the (first) prepared folder; on a raw source without data.tokenizer, one is trained
on the corpus first (cached in data.cache_dir, as before).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import DataConfig, PrepareConfig
from train.data.dataset import PreparedDataset
from train.data.heldout import HeldOutSample
from train.data.loader import Batch, TrainLoader
from train.data.prepare import (FORMAT_VERSION, cache_key, is_prepared, prepare_command,
                                prepare_dataset, tokenizer_cache_path)
from train.data.shards import plan_shards
from train.data.sources import Corpus, DataError, open_corpus
from train.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

_POLL_S = 0.5
_SHOW_UP_S = 120.0  # the main rank marks that it is preparing within this (or the cache is not shared)


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TrainLoader
    sources: list[PreparedDataset]
    names: list[str]  # one per source: the metric labels
    num_train_sequences: int
    num_val_sequences: int
    seq_len: int
    _val: HeldOutSample
    _source_val: list[HeldOutSample]

    def val_batches(self, n: int) -> list[Batch]:
        """Up to n (inputs, labels) batches of this rank's rows of the validation sample (spread over
        the whole held-out set; a mixture: blended by weight; train/data/heldout.py); the same list
        on every call, and the same number of batches on every rank."""
        return self._val.batches(n)

    def source_val_batches(self, n: int) -> dict[str, list[Batch]]:
        """Each source's own validation batches (mixtures of several sources only, else {})."""
        return {name: v.batches(n) for name, v in zip(self.names, self._source_val)}

    def train_tokens_by_source(self) -> dict[str, int]:
        """Tokens read from each source so far by all ranks: {"data/tokens/<name>": n}."""
        return {f"data/tokens/{name}": n * self.seq_len
                for name, n in zip(self.names, self.train.consumed())}


def build_data(cfg: DataConfig, *, vocab_size: int, seed: int, dp_rank: int = 0, dp_world: int = 1,
               is_main: bool = True) -> Data:
    """Open (preparing a small raw source first, on the main rank) the data of `cfg` for
    data-parallel rank `dp_rank` of `dp_world`. `vocab_size` is the model's: a trained tokenizer
    gets at most that many tokens, a given one must fit in it. `seed` orders the train stream."""
    cfg.validate()
    if not 0 <= dp_rank < dp_world:
        raise ValueError(f"dp_rank {dp_rank} is out of range for dp_world {dp_world}")
    given = None
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if not path.is_file():
            raise DataError(f"data.tokenizer: {path} does not exist (a tokenizer file, or null to use "
                            f"the prepared data's or train one on the corpus)")
        given = load_tokenizer(path)
        given.check_fits(vocab_size)  # before any expensive work
    if cfg.mixture:
        entries = []
        for i, m in enumerate(cfg.mixture):
            folder = Path(m.path).expanduser()
            if not is_prepared(folder):
                raise DataError(f"data.mixture[{i}].path: {folder} is not a prepared dataset (no "
                                f"manifest.json); prepare it first: python -m train.data.prepare "
                                f"data.source=<raw files> ... prepare.out={folder}")
            entries.append((m.name or folder.name, folder, m.weight))
    elif is_prepared(Path(cfg.source).expanduser()):
        folder = Path(cfg.source).expanduser()
        entries = [(folder.name, folder, 1.0)]
    else:
        entries = [(Path(cfg.source).name, _auto_prepared(cfg, vocab_size, given, is_main), 1.0)]
    names, folders, weights = zip(*entries)
    if len(set(names)) < len(names):
        raise DataError(f"data.mixture: two sources share the name {sorted(names)}; set "
                        f"data.mixture[i].name to tell them apart")
    sources = [PreparedDataset(f) for f in folders]
    tokenizer = _run_tokenizer(sources, given)
    tokenizer.check_fits(vocab_size)

    W, G = cfg.seq_len + 1, cfg.batch_size * dp_world
    label = f"data.source={cfg.source}" if not cfg.mixture else "data.mixture"
    train_streams = [s.splits["train"] for s in sources]
    val_streams = [s.splits["val"] for s in sources]
    for src, stream in zip(sources, train_streams):
        if stream.num_windows(W) == 0:
            raise DataError(f"{src.folder} has {stream.num_tokens} train tokens: no window of "
                            f"data.seq_len+1={W} tokens (an empty source, or data.seq_len too long)")
    fingerprints = {str(s.folder): s.fingerprint for s in sources}
    train = TrainLoader(train_streams, seq_len=cfg.seq_len, weights=list(weights),
                        fingerprints=fingerprints, batch_size=cfg.batch_size, dp_rank=dp_rank,
                        dp_world=dp_world, seed=seed, num_workers=cfg.num_workers,
                        pin_memory=torch.cuda.is_available())
    if min(train.order.per_period) == 0:
        starved = names[int(train.order.per_period.argmin())]
        raise DataError(f"data.mixture: weights {list(weights)} give source {starved} no sample in "
                        f"{len(train.order.table)}; raise its weight")
    val = HeldOutSample(val_streams, seq_len=cfg.seq_len, weights=list(weights), batch_size=cfg.batch_size,
                   dp_rank=dp_rank, dp_world=dp_world)
    n_train = train.num_sequences
    n_val = sum(s.num_windows(W) for s in val_streams)
    val_fraction = sources[0].manifest["val_fraction"]
    where = (f"{label} gives {sum(s.num_tokens for s in train_streams)} train tokens = "
             f"{n_train} train + {n_val} validation sequences of data.seq_len+1={W} tokens")
    if n_train < G:
        raise DataError(f"{where}; one global batch needs {G} train sequences (data.batch_size="
                        f"{cfg.batch_size} x {dp_world} data-parallel ranks). Use more data "
                        f"(data.max_chars), a shorter data.seq_len or a smaller data.batch_size")
    source_val = []
    if len(sources) > 1:
        source_val = [HeldOutSample([s], seq_len=cfg.seq_len, weights=[1.0], batch_size=cfg.batch_size,
                               dp_rank=dp_rank, dp_world=dp_world) for s in val_streams]
        for src, v in zip(sources, source_val):
            if v.num_batches(1) < 1:
                raise DataError(f"{src.folder} has {len(v.keys(G))} held-out sequences of "
                                f"data.seq_len+1={W} tokens; its own validation batch needs {G} (data.batch_size x "
                                f"data-parallel ranks): prepare it with a larger data.val_fraction")
    if val.num_batches(1) < 1:
        raise DataError(f"{where}; one validation batch per rank needs {G} (data.batch_size="
                        f"{cfg.batch_size} x {dp_world} data-parallel ranks) from every source. Prepare "
                        f"with a larger data.val_fraction ({val_fraction}), use more data, or a smaller "
                        f"data.batch_size")
    log.info("data: %s", ", ".join(f"{n} ({s.folder}, weight {w:g}, {s.splits['train'].num_tokens:,} "
                                   f"train tokens)" for n, s, w in zip(names, sources, weights)))
    return Data(tokenizer=tokenizer, train=train, sources=sources, names=list(names),
                num_train_sequences=n_train, num_val_sequences=n_val, seq_len=cfg.seq_len, _val=val,
                _source_val=source_val)


def _run_tokenizer(sources: list[PreparedDataset], given: Tokenizer | None) -> Tokenizer:
    tokenizer = given or load_tokenizer(sources[0].tokenizer_path)
    for s in sources:
        if s.tokenizer_digest != tokenizer.digest:
            what = f"data.tokenizer {tokenizer.path}" if given else f"the tokenizer of {sources[0].folder}"
            raise DataError(f"{what} (sha256 {tokenizer.digest[:12]}) is not the tokenizer {s.folder} was "
                            f"prepared with ({s.manifest['tokenizer']['file']}, sha256 "
                            f"{s.tokenizer_digest[:12]}): use that tokenizer or prepare the data again")
    return tokenizer


def _auto_prepared(cfg: DataConfig, vocab_size: int, given: Tokenizer | None, is_main: bool) -> Path:
    """The cache folder of a small raw source, prepared by the main rank (see the docstring)."""
    corpus = open_corpus(cfg.source, cfg.text_field)
    shard_bytes = PrepareConfig().shard_bytes
    sizes = [f.stat().st_size for f in corpus.files]
    planned = sum(p.end - p.start for shard in plan_shards(corpus, sizes, shard_bytes, cfg.max_chars)
                  for p in shard)
    if planned > cfg.max_auto_prepare_bytes:
        raise DataError(
            f"data.source={cfg.source} is {planned / 1e9:.2f} GB of raw input, more than "
            f"data.max_auto_prepare_bytes={cfg.max_auto_prepare_bytes} prepares at start-up. Prepare it "
            f"once, in parallel, and train on the result:\n  "
            f"{prepare_command(cfg.source, cfg, vocab_size)}\nthen set data.source=<that prepare.out>")
    folder = auto_prepared_dir(cfg, corpus, given, vocab_size)
    failed = folder.with_name(folder.name + ".failed")
    started = folder.with_name(folder.name + ".preparing")
    if is_main:
        if not is_prepared(folder):
            failed.unlink(missing_ok=True)
            started.parent.mkdir(parents=True, exist_ok=True)
            started.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
            try:
                tok_path = given.path if given else _trained_tokenizer(cfg, corpus, vocab_size)
                log.info("preparing data.source=%s (%d files, %.1f MB) into %s", cfg.source,
                         len(corpus.files), planned / 1e6, folder)
                done = prepare_dataset(corpus, tok_path, folder, val_fraction=cfg.val_fraction,
                                       max_chars=cfg.max_chars, shard_bytes=shard_bytes, workers=1,
                                       threads=len(os.sched_getaffinity(0)))
                log.info("prepared %s tokens in %.1f s", f"{done.tokens:,}", done.seconds)
            except BaseException as e:  # tell the waiting ranks at once
                failed.write_text(f"{_attempt()}\n{type(e).__name__}: {e}")
                raise
            finally:
                started.unlink(missing_ok=True)
        return folder
    t0 = time.time()
    while not is_prepared(folder):
        failure = _failure(failed, t0)
        if failure is not None:
            raise DataError(f"the main rank failed to prepare data.source={cfg.source} into {folder}: "
                            f"{failure}")
        waited = time.time() - t0
        if waited > min(cfg.prepare_wait_s, _SHOW_UP_S) and not started.is_file():
            earlier = f" (an earlier attempt failed: {_read_failure(failed)[1]})" if failed.is_file() else ""
            raise DataError(f"after {waited:.0f} s the main rank has neither prepared nor started to "
                            f"prepare data.source={cfg.source} in {folder} as this rank sees it: "
                            f"data.cache_dir must be one folder shared by all ranks (on several "
                            f"nodes: a shared file system){earlier}")
        if waited > cfg.prepare_wait_s:
            raise DataError(f"waited {cfg.prepare_wait_s:.0f} s (data.prepare_wait_s) for the main rank to "
                            f"prepare data.source={cfg.source} into {folder}; data.cache_dir must be shared "
                            f"by all ranks. Or prepare it beforehand: "
                            f"{prepare_command(cfg.source, cfg, vocab_size)}")
        time.sleep(_POLL_S)
    return folder


def _attempt() -> str:
    """This launch of the job as all its ranks see it: the launcher's run id and restart count
    (torchrun's elastic agent, Slurm), or "" where no launcher says."""
    keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")
    return " ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ)


def _read_failure(path: Path) -> tuple[str, str]:
    """(the attempt that wrote a .failed marker, its error)."""
    attempt, _, error = path.read_text().partition("\n")
    return attempt, error


def _failure(failed: Path, t0: float) -> str | None:
    """The main rank's error if its .failed marker is this attempt's: written by this launch (the
    same launcher attempt id). A marker an earlier attempt left (an elastic restart) is not: the
    main rank removes it and prepares again. Without a launcher's attempt id, a marker younger than
    60 s counts (the hosts' clocks may differ by a little)."""
    try:
        attempt, error = _read_failure(failed)
        mtime = failed.stat().st_mtime
    except FileNotFoundError:  # none, or removed by the main rank just now
        return None
    mine = _attempt()
    if mine:
        return error if attempt == mine else None
    return error if mtime >= t0 - 60 else None


def auto_prepared_dir(cfg: DataConfig, corpus: Corpus, given: Tokenizer | None, vocab_size: int) -> Path:
    """The cache folder of raw source `corpus`: its files (paths, sizes, times), the tokenizer (the
    given file's digest, or "trained with vocab_size"), max_chars and val_fraction."""
    tok_key = given.digest if given else ["trained", vocab_size]
    key = cache_key("prepared", FORMAT_VERSION, corpus.identity(), tok_key, cfg.max_chars,
                  cfg.val_fraction, PrepareConfig().shard_bytes)
    return Path(cfg.cache_dir) / f"prepared-{key}"


def _trained_tokenizer(cfg: DataConfig, corpus, vocab_size: int) -> Path:
    path = tokenizer_cache_path(Path(cfg.cache_dir), corpus, vocab_size, cfg.max_chars)
    if path.is_file():
        log.info("using cached tokenizer %s", path)
        return path
    return train_tokenizer(corpus.documents(cfg.max_chars), vocab_size, path,
                           expected_chars=corpus.expected_chars(cfg.max_chars)).path

