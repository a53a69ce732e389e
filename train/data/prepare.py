"""`python -m train.data.prepare`: tokenize a corpus once, in parallel, into a prepared dataset.

    python -m train.data.prepare data=files data.source=/corpus data.tokenizer=/llama2/tokenizer.model \\
        model.vocab_size=32000 prepare.out=/data/corpus-llama2 [prepare.workers=N]
        [prepare.num_tasks=T prepare.task_id=K]

It reads the same Hydra config as training (data.source, data.text_field, data.tokenizer,
data.val_fraction, data.max_chars, model.vocab_size), so a run finds what was prepared with the
`data.source=OUT` override printed at the end. Nothing here depends on data.seq_len: windows are cut
when the data is opened (train/data/dataset.py), so one prepared folder serves every seq_len.

A prepared folder holds:
- `tokenizer.model`, or `tokenizer.json` with the config files naming its BOS/EOS: a copy of the
  tokenizer, so training on the folder needs no data.tokenizer;
- `plan.json`: the shard plan's key, written first; a rerun with other inputs is refused;
- `shards/NNNNNN.{train,val}.bin`: the tokens of each shard's train/held-out units, concatenated
  (uint16 when the vocabulary fits, else uint32), and `shards/NNNNNN.{train,val}.idx`: int64 end
  offsets of the units (the document index);
- `shards/NNNNNN.done.json`: written last for a shard (after its files were renamed into place):
  a shard without it is redone by a rerun, so a killed prepare leaves nothing that looks complete;
- `manifest.json`: written when every shard is done, by whichever task finishes last (or by
  `prepare.finalize=true`); its presence makes the folder usable. It records the format version,
  the tokenizer (file, sha256 digest, vocabulary size, BOS/EOS), dtype, val_fraction, the inputs
  (relative path, size, mtime), every shard's token and unit counts, and the number of fallback
  cuts (train/data/shards.py: where a long stretch of text had no exact cut point).
No file holds a time, a host or a worker count: the folder is byte-identical whatever the number of
workers or tasks and whether it was interrupted (see train/data/shards.py for the plan and units).
Every file is written under a temporary name ending in -<pid>@<host> and renamed into place; a
rerun first removes the temporaries of dead prepares of its host (`remove_dead_temporaries`).

Parallelism: on one machine, a pool of `prepare.workers` processes (default: all cores), each
encoding its shards with one tokenizer thread. Several machines split the shards by task: task K of
T takes shards K, K + T, K + 2T, ... (T and K default from a Slurm array, SLURM_ARRAY_TASK_COUNT /
SLURM_ARRAY_TASK_ID, else from torchrun's WORLD_SIZE / RANK). The engine is the launcher (a Slurm
array or torchrun): no scheduler of ours, no network between tasks, only the shared folder.
"""
from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from train.data.shards import MAX_UNIT_BYTES, Piece, plan_shards, read_units
from train.data.sources import Corpus, DataError
from train.data.tokenizer import (copy_tokenizer, find_tokenizer_file, load_tokenizer, temp_suffix,
                                  write_atomic)
from train.process_lifetime import pid_alive, pool_worker_init

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the layout or the meaning of a prepared folder changes
MANIFEST = "manifest.json"
_ENCODE_CHARS = 1_000_000  # characters handed to the tokenizer per call (bounds memory)
SPLITS = ("train", "val")
_TEMP = re.compile(r"\.tmp.*-(?P<pid>\d+)@(?P<host>[^@]+)$")  # a temporary file's name (temp_suffix)


def is_prepared(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_cache_path(cache_dir: Path, corpus: Corpus, vocab_size: int,
                         max_chars: int | None) -> Path:
    """Where the tokenizer trained for this corpus and vocabulary size is kept."""
    key = cache_key("tokenizer", corpus.identity(), vocab_size, max_chars)
    return Path(cache_dir) / f"tokenizer-{key}.model"


def cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs for one shard (the tokenizer is re-opened by path)."""
    corpus: Corpus
    pieces: tuple[Piece, ...]
    shard: int
    out: Path
    tokenizer_path: Path
    val_fraction: float
    threads: int


_TOKENIZERS: dict[Path, object] = {}  # per process: opened once, by path (never pickled)
_PROGRESS = None  # per worker process: the queue progress goes to (set by the pool's initializer)


def _set_progress_queue(queue) -> None:
    global _PROGRESS
    _PROGRESS = queue


def write_shard(job: ShardJob, report: Callable[[tuple[int, int, int]], None] | None = None) -> dict:
    """Tokenize one shard into its files and mark it done; return its counts. After every encoded
    batch, `report` (default: the worker's progress queue, if any) gets (input bytes, documents,
    tokens) done since the last report; input bytes are estimated by characters, capped by the
    shard's size, and made exact when the shard is done."""
    report = report or (_PROGRESS.put if _PROGRESS is not None else None)
    shard_bytes = sum(p.end - p.start for p in job.pieces)
    reported = 0
    tok = _TOKENIZERS.get(job.tokenizer_path)
    if tok is None:
        tok = _TOKENIZERS[job.tokenizer_path] = load_tokenizer(job.tokenizer_path)
    typecode = "H" if token_dtype(tok.vocab_size).itemsize == 2 else "I"  # uint16 / uint32
    folder = job.out / "shards"
    name = f"{job.shard:06d}"
    tmp = {s: folder / f".{name}.{s}.bin.tmp{temp_suffix()}" for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}
    ends: dict[str, list[int]] = {s: [] for s in SPLITS}
    counts = {s: {"tokens": 0, "units": 0, "characters": 0} for s in SPLITS}
    batch, batch_chars = [], 0
    fallback_cuts = 0

    def flush() -> None:
        nonlocal reported
        # a document's first unit as it is; a unit continuing it from a cut point by the tokenizer's
        # continuation encoding (no dummy prefix): together, the ids of the whole document
        encoded: list = [None] * len(batch)
        for continues, encode in ((False, tok.encode_batch), (True, tok.encode_continuations)):
            ks = [k for k, u in enumerate(batch) if u.continues == continues]
            if ks:
                for k, ids in zip(ks, encode([batch[k].text for k in ks], num_threads=job.threads)):
                    encoded[k] = ids
        rows = {s: array.array(typecode) for s in SPLITS}  # extended in C, written as one buffer
        for unit, ids in zip(batch, encoded):
            split = "val" if unit.val else "train"
            row = rows[split]
            if unit.bos:
                row.append(tok.bos_id)
            row.extend(ids)
            if unit.eos:
                row.append(tok.eos_id)
            c = counts[split]
            c["units"] += 1
            c["characters"] += len(unit.text)
            ends[split].append(c["tokens"] + len(row))
        for split, row in rows.items():
            files[split].write(row)
            counts[split]["tokens"] += len(row)
        if report is not None:
            done = min(shard_bytes, sum(c["characters"] for c in counts.values()))
            report((done - reported, len(batch), sum(map(len, rows.values()))))
            reported = done
        batch.clear()

    try:
        for piece in job.pieces:
            for unit in read_units(job.corpus, piece, job.val_fraction, tok):
                batch.append(unit)
                batch_chars += len(unit.text)
                fallback_cuts += unit.fallback
                if batch_chars >= _ENCODE_CHARS:
                    flush()
                    batch_chars = 0
        flush()
        for s in SPLITS:
            files[s].close()
            idx = folder / f".{name}.{s}.idx.tmp{temp_suffix()}"
            np.asarray(ends[s], dtype=np.int64).tofile(idx)
            os.replace(idx, folder / f"{name}.{s}.idx")
            os.replace(tmp[s], folder / f"{name}.{s}.bin")
    finally:
        for s in SPLITS:
            files[s].close()
            tmp[s].unlink(missing_ok=True)
    record = {"id": job.shard, "bytes": shard_bytes, "fallback_cuts": fallback_cuts, **counts}
    write_atomic(folder / f"{name}.done.json", json.dumps(record, sort_keys=True).encode())
    if report is not None:
        report((shard_bytes - reported, 0, 0))
    return record


@dataclass
class Prepared:
    """What one call of `prepare_dataset` did; `manifest` is None while other tasks still work."""
    manifest: dict | None
    shards_done: int  # by this call
    shards_total: int
    tokens: int  # written by this call
    seconds: float
    fallback_cuts: int = 0  # by this call (see train/data/shards.py)
    stale_removed: int = 0  # temporary files of dead earlier prepares removed


def prepare_dataset(corpus: Corpus, tokenizer_path: Path, out: Path, *, val_fraction: float,
                    max_chars: int | None, shard_bytes: int, workers: int = 1, threads: int = 1,
                    num_tasks: int = 1, task_id: int = 0, progress: bool = False) -> Prepared:
    """Prepare this task's shards of `corpus` into `out` (skipping those already done) with
    `workers` processes of `threads` tokenizer threads each; write the manifest if every shard
    is now done."""
    t0 = time.perf_counter()
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    stale = remove_dead_temporaries(out)
    tok = load_tokenizer(tokenizer_path)
    local_tok = _install_tokenizer(tok, out)
    sizes = [f.stat().st_size for f in corpus.files]
    shards = plan_shards(corpus, sizes, shard_bytes, max_chars)
    if not shards:
        raise DataError(f"data.source={corpus.name}: nothing to prepare (data.max_chars={max_chars})")
    planned = sum(p.end - p.start for shard in shards for p in shard)
    if planned < sum(sizes):
        log.warning("data.max_chars=%s: preparing only the first %.1f MB of %.1f MB of input (set "
                    "data.max_chars=null, or data=files, for all of it)", max_chars, planned / 1e6,
                    sum(sizes) / 1e6)
    _check_plan(out, corpus, sizes, len(shards), tok, local_tok.name, val_fraction, max_chars, shard_bytes)
    mine = [k for k in range(task_id, len(shards), num_tasks) if not _done(out, k)]
    jobs = [ShardJob(corpus, tuple(shards[k]), k, out, local_tok, val_fraction, threads) for k in mine]
    total_bytes = sum(p.end - p.start for j in jobs for p in j.pieces)
    log.info("prepare %s -> %s: %d shards (%d of them for task %d/%d, %d left to do, %.1f MB), "
             "%d workers", corpus.name, out, len(shards), len(range(task_id, len(shards), num_tasks)),
             task_id, num_tasks, len(jobs), total_bytes / 1e6, workers)
    bar = _Progress(total_bytes, t0) if progress else None
    tokens = fallback_cuts = 0
    pool = None
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                record = write_shard(job, bar.add if bar else None)
                tokens += record["train"]["tokens"] + record["val"]["tokens"]
                fallback_cuts += record["fallback_cuts"]
        else:  # spawn: workers start clean (no inherited threads); they import no torch
            ctx = get_context("spawn")
            queue = ctx.Queue() if bar else None
            pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx,  # workers die with us
                                       initializer=pool_worker_init, initargs=(_set_progress_queue, queue))
            pending = {pool.submit(write_shard, j) for j in jobs}
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    record = future.result()
                    tokens += record["train"]["tokens"] + record["val"]["tokens"]
                    fallback_cuts += record["fallback_cuts"]
                while bar is not None and not queue.empty():
                    bar.add(queue.get())
            while bar is not None and bar.bar.n < total_bytes:  # reports still in flight
                bar.add(queue.get(timeout=10))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    manifest = finalize(out, required=False)
    if fallback_cuts:
        log.warning("%d fallback cuts: stretches of over %d bytes of text without an exact cut point "
                    "were cut where the ids are not exactly the whole text's (see train/data/shards.py)",
                    fallback_cuts, MAX_UNIT_BYTES)
    return Prepared(manifest, len(jobs), len(shards), tokens, time.perf_counter() - t0, fallback_cuts, stale)


def finalize(out: Path, *, required: bool = True) -> dict | None:
    """Write `out`'s manifest from its plan and shard markers if every shard is done. With
    `required`, a shard still missing is an error naming it; without, None is returned."""
    out = Path(out)
    if not (out / "plan.json").is_file():
        raise DataError(f"prepare.out={out} holds no prepare (no plan.json): run the prepare tasks first")
    plan = json.loads((out / "plan.json").read_text())
    missing = [k for k in range(plan["shards"]) if not _done(out, k)]
    if missing:
        if required:
            raise DataError(f"prepare.out={out}: {len(missing)} of {plan['shards']} shards are not done "
                            f"(first: shards/{missing[0]:06d}); run the missing tasks first")
        return None
    records = [json.loads((out / "shards" / f"{k:06d}.done.json").read_text()) for k in range(plan["shards"])]
    manifest = {**plan["manifest"], "shards": records,
                "fallback_cuts": sum(r["fallback_cuts"] for r in records),
                **{s: {key: sum(r[s][key] for r in records) for key in ("tokens", "units", "characters")}
                   for s in SPLITS}}
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if not (out / MANIFEST).is_file() or (out / MANIFEST).read_bytes() != text:
        write_atomic(out / MANIFEST, text)  # several last finishers write the same bytes
    return manifest


def remove_dead_temporaries(out: Path) -> int:
    """Remove the temporary files in `out` (and out/shards) of prepares that died (killed, preempted)
    before renaming them into place; return how many. Only files of this host whose process is gone:
    a temporary's name ends with the writer's pid@host (temp_suffix), and a live prepare on this or
    another host (several tasks share one folder) is never touched."""
    removed = 0
    host = socket.gethostname()
    for folder in (out, out / "shards"):
        for path in folder.glob(".*tmp*"):
            m = _TEMP.search(path.name)
            if m and m["host"] == host and not pid_alive(int(m["pid"])):
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d temporary files of earlier prepares that died", removed)
    return removed


def _done(out: Path, shard: int) -> bool:
    return (out / "shards" / f"{shard:06d}.done.json").is_file()


def _install_tokenizer(tok, out: Path) -> Path:
    """Copy the files that define `tok` into `out` (tokenizer.model, or tokenizer.json with the
    config files that name its BOS/EOS), or check the copy already there; return its main file."""
    local = find_tokenizer_file(out)
    if local is not None:
        if load_tokenizer(local).digest != tok.digest:
            raise DataError(f"prepare.out={out} was prepared with another tokenizer ({local}); use a "
                            f"new prepare.out or the same data.tokenizer")
        return local
    return copy_tokenizer(tok, out)[0]


def _check_plan(out: Path, corpus: Corpus, sizes: list[int], n_shards: int, tok, tok_file: str,
                val_fraction: float, max_chars: int | None, shard_bytes: int) -> None:
    """Write plan.json (the manifest's fixed part) or check that a rerun plans the same work."""
    inputs = [{"path": f.relative_to(corpus.root).as_posix() if f != corpus.root else f.name,
               "size": size, "mtime_ns": f.stat().st_mtime_ns} for f, size in zip(corpus.files, sizes)]
    manifest = {
        "format": FORMAT_VERSION, "source": corpus.name, "root": str(corpus.root),
        "text_field": corpus.text_field, "max_chars": max_chars, "val_fraction": val_fraction,
        "shard_bytes": shard_bytes, "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer": {"file": tok_file, "digest": tok.digest, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "inputs": inputs,
    }
    plan = {"shards": n_shards, "manifest": manifest}
    text = json.dumps(plan, indent=1, sort_keys=True).encode()
    path = out / "plan.json"
    if path.is_file():
        if path.read_bytes() != text:
            old = json.loads(path.read_text())
            changed = [k for k in manifest if old["manifest"].get(k) != manifest[k]]
            raise DataError(f"prepare.out={out} holds (part of) a prepare of other inputs or settings "
                            f"(differs in: {', '.join(changed) or 'shard plan'}); use a new prepare.out "
                            f"or delete the folder")
        return
    write_atomic(path, text)


class _Progress:
    """tqdm over input bytes (its ETA), with documents, tokens and tokens/s after it."""

    def __init__(self, total_bytes: int, t0: float) -> None:
        from tqdm import tqdm
        self.t0, self.docs, self.tokens = t0, 0, 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                        mininterval=1.0, file=sys.stderr, dynamic_ncols=True)

    def add(self, delta: tuple[int, int, int]) -> None:
        n_bytes, docs, tokens = delta
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens / 1e6:,.1f}M tokens, "
                                 f"{rate / 1e3:,.0f}k tok/s", refresh=False)
        self.bar.update(n_bytes)

    def close(self) -> None:
        self.bar.close()


def task_slot(num_tasks: int | None, task_id: int | None) -> tuple[int, int]:
    """(number of tasks, this task's index): the prepare.* keys, else a Slurm array's, else
    torchrun's WORLD_SIZE/RANK, else one task."""
    env = os.environ
    if num_tasks is None:
        if "SLURM_ARRAY_TASK_COUNT" in env:
            num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
        else:
            num_tasks = int(env.get("WORLD_SIZE", "1"))
    if task_id is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            task_id = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        else:
            task_id = int(env.get("RANK", "0"))
    return num_tasks, task_id


def prepare_command(source: str, cfg, vocab_size: int) -> str:
    """The exact command that prepares `source` with the data settings of `cfg` (a DataConfig)."""
    parts = ["python -m train.data.prepare", f"data.source={source}",
             f"data.text_field={cfg.text_field}"]
    if cfg.tokenizer:
        parts.append(f"data.tokenizer={cfg.tokenizer}")
    parts += [f"model.vocab_size={vocab_size}",
              f"data.max_chars={'null' if cfg.max_chars is None else cfg.max_chars}",
              f"data.val_fraction={cfg.val_fraction}",
              f"prepare.out=/path/to/prepared/{Path(source).name or 'data'}"]
    return " ".join(parts)


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from train.config import ConfigError, load_config, register_schemas

    recipes = str(Path(__file__).resolve().parents[2] / "recipes")  # not train.__main__: it imports torch

    @hydra.main(version_base="1.3", config_path=recipes, config_name="train")
    def _main(raw: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", force=True)
        try:
            from train.hub import resolve_hub_ids
            cfg = resolve_hub_ids(load_config(raw))  # Hub ids -> local folders
            _run_cli(cfg)
        except ConfigError as e:
            log.error("invalid configuration: %s", e)
            sys.exit(2)
        except DataError as e:
            log.error("%s", e)
            sys.exit(1)

    register_schemas()
    _main()


def _run_cli(cfg) -> None:
    from train.config import ConfigError
    from train.data.sources import open_corpus
    from train.data.tokenizer import resolve_tokenizer_path, train_tokenizer
    p, d = cfg.prepare, cfg.data
    if not p.out:
        raise ConfigError("prepare.out is missing: the folder to write the prepared dataset to")
    out = Path(p.out).expanduser()
    if p.finalize:
        finalize(out)
        log.info("wrote %s", out / MANIFEST)
        print(f"train on it with: data.source={out.resolve()}")
        return
    num_tasks, task_id = task_slot(p.num_tasks, p.task_id)
    if not 0 <= task_id < num_tasks:
        raise ConfigError(f"prepare.task_id={task_id} is not in [0, prepare.num_tasks={num_tasks})")
    corpus = open_corpus(d.source, d.text_field)
    if cfg.model.unset_shape_keys:  # model=hf: the vocabulary is model.init_from's config.json
        from train.hf import resolve_model_shape
        cfg = resolve_model_shape(cfg)
    # the tokenizer training would use: data.tokenizer, else model.init_from's, else one trained here
    tok_path = resolve_tokenizer_path(d, cfg.model)
    if tok_path is None:  # trained on the corpus: the same bytes in every task (training is reproducible)
        tok_path = out / "tokenizer.model"
        if not tok_path.is_file():
            train_tokenizer(corpus.documents(d.max_chars), cfg.model.vocab_size, tok_path,
                            expected_chars=corpus.expected_chars(d.max_chars))
    load_tokenizer(tok_path).check_fits(cfg.model.vocab_size)
    workers = p.workers or len(os.sched_getaffinity(0))
    done = prepare_dataset(corpus, tok_path, out, val_fraction=d.val_fraction, max_chars=d.max_chars,
                           shard_bytes=p.shard_bytes, workers=workers, threads=1,
                           num_tasks=num_tasks, task_id=task_id, progress=p.progress)
    rate = done.tokens / max(done.seconds, 1e-9)
    print(f"task {task_id}/{num_tasks}: {done.shards_done} shards, {done.tokens:,} tokens in "
          f"{done.seconds:.1f} s ({rate:,.0f} tokens/s, {workers} workers)")
    if done.manifest is None:
        print(f"other tasks' shards are not all done yet: the last task to finish (or "
              f"`python -m train.data.prepare prepare.out={out} prepare.finalize=true`) writes the manifest")
        return
    m = done.manifest
    units = m['train']['units'] + m['val']['units']
    print(f"{out}: {m['train']['tokens']:,} train + {m['val']['tokens']:,} held-out tokens from "
          f"{units:,} units ({m['val']['units']:,} held out, {len(m['shards'])} shards), "
          f"{m['fallback_cuts']:,} fallback cuts (where the ids are not exact; see train/data/shards.py)")
    print(f"train on it with: data.source={out.resolve()}")


if __name__ == "__main__":
    main()
