"""Offline preparation into token shards, prepared folders as training data, weighted mixtures.

Tiny corpora in temporary folders; one small tokenizer trained once for the module.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import random
import shutil
import signal
from collections import Counter
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from tests._launch import train_env
from train.config import ConfigError, DataConfig, MixtureSource
from train.data import DataError, build_data
from train.data import prepare as prep
from train.data.sources import open_corpus
from train.data.tokenizer import load_tokenizer, temp_suffix, train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega def return class "
         "import while for if else print value index count total self None True False").split()
SHARD = 1 << 16  # small shards, so the big text file is split into several byte ranges


def _lines(rng: random.Random, n: int, words: list[str] = WORDS) -> list[str]:
    return [f"{' '.join(rng.choice(words) for _ in range(rng.randrange(3, 12)))} {rng.randrange(999)}"
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One text file of ~250 KB (4 ranges), .jsonl, .jsonl.gz, .jsonl.zst and two small .txt."""
    root = tmp_path_factory.mktemp("raw")
    rng = random.Random(0)
    (root / "big.txt").write_text("\n".join(_lines(rng, 5000)) + "\n")
    records = [json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(_lines(rng, 300))]
    (root / "a.jsonl").write_text("".join(records[:100]))
    with gzip.open(root / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(records[100:200]))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("".join(records[200:]).encode()))
    for i in range(2):
        (root / "small" / f"s{i}.txt").parent.mkdir(exist_ok=True)
        (root / "small" / f"s{i}.txt").write_text("\n".join(_lines(rng, 20)) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(open_corpus(str(corpus)).documents(), 300, path, expected_chars=400_000).path


def _prepare(corpus: Path, tok: Path, out: Path, **kw) -> prep.Prepared:
    return prep.prepare_dataset(open_corpus(str(corpus)), tok, out, val_fraction=0.1, max_chars=None,
                                shard_bytes=SHARD, **kw)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _killed_prepare(corpus: Path, tok: Path, out: Path) -> None:
    """A prepare that dies by SIGKILL while writing its third shard (nothing gets to clean up)."""
    real = prep.read_units

    def dying(corpus_, piece, val_fraction, tok):
        for n, unit in enumerate(real(corpus_, piece, val_fraction, tok)):
            if corpus_.files[piece.file].name == "big.txt" and piece.start >= 2 * SHARD and n == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            yield unit
    prep.read_units = dying
    _prepare(corpus, tok, out)


def test_prepare_is_byte_identical_whatever_workers_tasks_or_interruption(corpus, tokenizer_path, tmp_path):
    ref = _prepare(corpus, tokenizer_path, tmp_path / "one")
    assert ref.manifest is not None and ref.shards_total >= 6
    reference = _tree(tmp_path / "one")

    # The CLI with two worker processes (it reads the same Hydra keys as training).
    out = tmp_path / "two"
    done = subprocess.run(
        [sys.executable, "-m", "train.data.prepare", f"data.source={corpus}", f"data.tokenizer={tokenizer_path}",
         "model.vocab_size=300", "data.max_chars=null", "data.val_fraction=0.1", f"prepare.out={out}",
         "prepare.workers=2", f"prepare.shard_bytes={SHARD}", "prepare.progress=false"],
        cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"data.source={out}" in done.stdout
    assert _tree(out) == reference

    # Two tasks: the first to finish leaves no manifest, the last one writes it.
    tasks = tmp_path / "tasks"
    assert _prepare(corpus, tokenizer_path, tasks, num_tasks=2, task_id=1).manifest is None
    assert not prep.is_prepared(tasks)
    with pytest.raises(DataError, match=r"shards are not done \(first: shards/000000\)"):
        prep.finalize(tasks)
    assert _prepare(corpus, tokenizer_path, tasks, num_tasks=2, task_id=0).manifest is not None
    assert _tree(tasks) == reference

    # Killed midway: nothing looks complete; the rerun redoes only what is missing.
    killed = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(target=_killed_prepare,
                                                       args=(corpus, tokenizer_path, killed))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert not prep.is_prepared(killed)
    done_before = sorted(p.name for p in (killed / "shards").glob("*.done.json"))
    assert 0 < len(done_before) < ref.shards_total
    left = sorted(p.name for p in (killed / "shards").glob(".*.tmp*"))
    assert left, "the killed prepare left no temporary file: the rerun's clean-up is not tested"
    # a live concurrent task's temporaries (this process, or any on another host) are kept
    live = [killed / "shards" / f".000001.train.bin.tmp{temp_suffix()}",
            killed / "shards" / ".000001.val.bin.tmp-1@another-host"]
    for path in live:
        path.write_bytes(b"in progress")
    rerun = _prepare(corpus, tokenizer_path, killed)
    assert rerun.shards_done == ref.shards_total - len(done_before) and rerun.stale_removed == len(left)
    assert all(path.read_bytes() == b"in progress" for path in live)
    for path in live:
        path.unlink()
    assert _tree(killed) == reference  # byte-identical, and no temporary file of the dead run left

    # Other inputs into the same folder are refused, naming what differs.
    with pytest.raises(DataError, match="other inputs or settings .*val_fraction"):
        prep.prepare_dataset(open_corpus(str(corpus)), tokenizer_path, killed, val_fraction=0.2,
                             max_chars=None, shard_bytes=SHARD)


def test_prepared_tokens_match_the_documents(corpus, tokenizer_path, tmp_path):
    """Every record of every format is one BOS..EOS unit; the text files are stored as BOS..EOS
    stretches of their text (a whole file, or the runs of units between held-out ones); the
    manifest counts what the shards hold."""
    _prepare(corpus, tokenizer_path, tmp_path / "p")
    data = build_data(DataConfig(source=str(tmp_path / "p"), seq_len=16, batch_size=2), vocab_size=300, seed=0)
    tok = load_tokenizer(tokenizer_path)
    m = data.sources[0].manifest
    assert m["tokenizer"]["digest"] == tok.digest and m["dtype"] == "uint16"
    assert data.tokenizer.path == tmp_path / "p" / "tokenizer.model"  # the folder's own copy
    units = {"train": [], "val": []}
    for split in units:
        stream = data.sources[0].splits[split]
        tokens = stream.tokens(0, stream.num_tokens)
        ends = np.concatenate([np.fromfile(tmp_path / "p" / "shards" / f"{r['id']:06d}.{split}.idx", np.int64)
                               + stream.starts[k] for k, r in enumerate(r for r in m["shards"] if r[split]["tokens"])])
        assert ends[-1] == stream.num_tokens == m[split]["tokens"] and len(ends) == m[split]["units"]
        units[split] = [tokens[a:b].tolist() for a, b in zip([0, *ends[:-1]], ends)]
    docs = []  # stored documents: each split's units up to the next EOS (BOS ... EOS each)
    for split in units:
        doc = []
        for u in units[split]:
            doc += u
            if u[-1] == tok.eos_id:
                assert doc[0] == tok.bos_id and tok.bos_id not in doc[1:] and tok.eos_id not in doc[:-1]
                docs.append(tok.decode(doc[1:-1]))
                doc = []
        assert not doc
    records = [json.loads(l)["text"] for l in (corpus / "a.jsonl").read_text().splitlines()]
    assert set(records) <= set(docs)
    texts = [p.read_text() for p in (corpus / "big.txt", corpus / "small" / "s0.txt", corpus / "small" / "s1.txt")]
    parts = [d for d in docs if "\n" in d or not d.endswith(tuple("0123456789"))]  # not a one-line record
    assert all(any(p in t for t in texts) for p in parts)  # contiguous stretches of the text files
    assert sum(map(len, parts)) == sum(map(len, texts))  # that add up to them
    assert 0.05 < m["val"]["units"] / (m["train"]["units"] + m["val"]["units"]) < 0.2  # val_fraction 0.1


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tokenizer_path) -> dict[str, Path]:
    """Two prepared sources of different sizes and disjoint words (a window shows its source)."""
    folders = {}
    for name, n, words in (("web", 1500, WORDS[:14]), ("code", 100, WORDS[14:])):
        raw = tmp_path_factory.mktemp(f"raw-{name}")
        (raw / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                             for t in _lines(random.Random(name), n, words)))
        folders[name] = tmp_path_factory.mktemp("prepared") / name
        _prepare(raw, tokenizer_path, folders[name])
    return folders


def _mix_cfg(mixture, weights=(0.7, 0.3), **kw) -> DataConfig:
    entries = [MixtureSource(path=str(p), weight=w) for p, w in zip(mixture.values(), weights)]
    return DataConfig(**{"mixture": entries, "seq_len": 16, "batch_size": 6, **kw})


def test_mixture_order_proportions_ranks_and_resume(mixture):
    one = build_data(_mix_cfg(mixture), vocab_size=300, seed=1)
    windows = [Counter(map(tuple, s.splits["train"].windows(list(range(s.splits["train"].num_windows(17))), 17)
                           .tolist())) for s in one.sources]
    assert not set(windows[0]) & set(windows[1])
    steps = 160
    batches = [next(one.train) for _ in range(steps)]
    rows = [tuple(r) for x, y in batches for r in torch.cat([x, y[:, -1:]], 1).tolist()]
    # Exact-proportion interleaving: every prefix is within one sample of 70/30.
    sources = [0 if r in windows[0] else 1 for r in rows]
    assert all(r in windows[s] for r, s in zip(rows, sources))
    for n in range(1, len(rows) + 1):
        assert abs(sources[:n].count(1) - 0.3 * n) <= 1
    assert one.train.consumed() == [sources.count(0), sources.count(1)]
    assert one.train_tokens_by_source() == {"data/tokens/web": 16 * sources.count(0),
                                            "data/tokens/code": 16 * sources.count(1)}
    # Each source goes through its own epochs: no window twice within an epoch (code: 1.x epochs).
    for s in (0, 1):
        seen = [r for r, k in zip(rows, sources) if k == s]
        n = sum(windows[s].values())
        assert all(Counter(seen[e:e + n]) <= windows[s] for e in range(0, len(seen), n))
    assert sources.count(1) > sum(windows[1].values())

    # The union of 3 data-parallel ranks (batch 2) is the global order, no sample twice.
    ranks = [build_data(_mix_cfg(mixture, batch_size=2), vocab_size=300, seed=1, dp_rank=r, dp_world=3)
             for r in range(3)]
    half = steps // 2
    for k in range(half):
        parts = [next(d.train) for d in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), batches[k][0])
    # Resume after half the steps, on 2 ranks of batch 3: the rest of the straight run.
    state = ranks[0].train.state_dict()
    resumed = [build_data(_mix_cfg(mixture, batch_size=3), vocab_size=300, seed=1, dp_rank=r, dp_world=2)
               for r in range(2)]
    for d in resumed:
        d.train.load_state_dict(state)
    for k in range(half, steps):
        parts = [next(d.train) for d in resumed]
        assert torch.equal(torch.cat([p[0] for p in parts]), batches[k][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), batches[k][1])
    # Validation: the blend and each source's own batches.
    assert len(one.val_batches(2)) == 2
    assert {k: len(v) for k, v in one.source_val_batches(1).items()} == {"web": 1, "code": 1}


def test_bad_data_fails_naming_the_file_or_key(mixture, corpus, tokenizer_path, tmp_path):
    web = mixture["web"]
    with pytest.raises(ConfigError, match=r"data.mixture\[1\].weight must be positive, got 0.0"):
        _mix_cfg(mixture, weights=(1.0, 0.0)).validate()
    with pytest.raises(DataError, match=rf"data.mixture\[0\].path: {tmp_path}.* is not a prepared dataset"):
        build_data(DataConfig(mixture=[MixtureSource(path=str(tmp_path))], seq_len=16), vocab_size=300, seed=0)
    with pytest.raises(DataError, match=rf"{mixture['code']} has \d+ train tokens: no window of "
                                        rf"data.seq_len\+1=4097 tokens \(an empty source"):
        build_data(_mix_cfg(mixture, seq_len=4096), vocab_size=300, seed=0)

    # A raw source over the start-up limit: refused with the exact command to run instead.
    with pytest.raises(DataError, match=r"more than data.max_auto_prepare_bytes=1000 .*\n  python -m "
                                        rf"train.data.prepare data.source={corpus} data.text_field=text "
                                        rf"data.tokenizer={tokenizer_path} .*prepare.out="):
        build_data(DataConfig(source=str(corpus), tokenizer=str(tokenizer_path), max_auto_prepare_bytes=1000,
                              cache_dir=str(tmp_path)), vocab_size=300, seed=0)

    # Another tokenizer than the one the folder was prepared with.
    other = train_tokenizer(iter(["zzz yyy xxx " * 50]), 280, tmp_path / "other.model", expected_chars=600)
    with pytest.raises(DataError, match=rf"data.tokenizer {other.path} .* is not the tokenizer {web} was prepared"):
        build_data(DataConfig(source=str(web), tokenizer=str(other.path), seq_len=16), vocab_size=300, seed=0)

    # Damaged and missing shards, a changed folder on resume.
    damaged = tmp_path / "damaged"
    _prepare(corpus, tokenizer_path, damaged)
    state = build_data(DataConfig(source=str(damaged), seq_len=16, batch_size=2), vocab_size=300, seed=0
                       ).train.state_dict()
    shard = damaged / "shards" / "000001.train.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=f"prepared shard {shard} is damaged: {len(data) - 2} bytes"):
        build_data(DataConfig(source=str(damaged), seq_len=16), vocab_size=300, seed=0)
    shard.unlink()
    with pytest.raises(DataError, match=f"prepared shard {shard} is missing"):
        build_data(DataConfig(source=str(damaged), seq_len=16), vocab_size=300, seed=0)
    shutil.rmtree(damaged)
    prep.prepare_dataset(open_corpus(str(corpus)), tokenizer_path, damaged, val_fraction=0.2,
                         max_chars=None, shard_bytes=SHARD)  # the same folder, other data
    changed = build_data(DataConfig(source=str(damaged), seq_len=16, batch_size=2), vocab_size=300, seed=0)
    with pytest.raises(ValueError, match=f"the data in {damaged} changed since the checkpoint"):
        changed.train.load_state_dict(state)



def _train_cfg(mixture: dict[str, Path], run_dir: Path, steps: int):
    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    register_schemas()
    mix = "[" + ", ".join(f"{{path: {p}, weight: {w}}}" for p, w in zip(mixture.values(), (0.7, 0.3))) + "]"
    overrides = [f"data.mixture={mix}", f"run_dir={run_dir}", "model.dim=32", "model.n_layers=2",
                 "model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=320", "model.multiple_of=16",
                 "model.max_seq_len=32", "data.seq_len=16", "data.batch_size=4", f"train.steps={steps}",
                 "optim.warmup_steps=1", "logging.every=1", "eval.every=2", "eval.batches=1",
                 "checkpoint.interval=2", "checkpoint.keep=5", "logging.tensorboard=false"]
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).parents[2] / "recipes")):
        return load_config(compose("train", overrides=overrides))


def test_training_on_a_mixture_logs_sources_and_resumes_exactly(mixture, tmp_path):
    """Through the trainer: tokens per source and each source's validation loss are logged;
    4 straight steps equal 2 steps + resume + 2 steps."""
    from train.trainer import run
    straight = run(_train_cfg(mixture, tmp_path / "straight", 4))
    records = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    val = [r for r in records if "val/loss" in r]
    assert train[4]["data/tokens/web"] + train[4]["data/tokens/code"] == 4 * 4 * 16
    assert train[4]["data/tokens/code"] == round(0.3 * 16) * 16  # 16 samples: 5 of code (slot table)
    assert {"val/loss/source/web", "val/loss/source/code"} <= set(val[-1])

    resumed = tmp_path / "resumed"  # the straight run as it was when stopped after step 2
    shutil.copytree(straight / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    run(_train_cfg(mixture, resumed, 4))
    again = {r["step"]: r["loss"] for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    assert [again[s] for s in (3, 4)] == [train[s]["loss"] for s in (3, 4)]


def test_task_slot_defaults_from_slurm_array_then_torchrun(monkeypatch):
    for k in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    assert prep.task_slot(None, None) == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    assert prep.task_slot(None, None) == (8, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")  # --array=5-8
    assert prep.task_slot(None, None) == (4, 2)
    assert prep.task_slot(2, 1) == (2, 1)  # the keys win


def test_text_read_in_chunks_gives_the_same_units(corpus, tokenizer_path, monkeypatch):
    """Plain text is read a few MiB at a time; neither chunk edges nor range edges change a unit,
    and BOS/EOS mark exactly the starts and ends of runs of one split."""
    from train.data import shards
    raw = open_corpus(str(corpus))
    tok = load_tokenizer(tokenizer_path)
    big = raw.files.index(corpus / "big.txt")
    size = (corpus / "big.txt").stat().st_size

    def units(*cuts: int) -> list:
        edges = [0, *cuts, size]
        pieces = [shards.Piece(big, a, b, b == size, size) for a, b in zip(edges, edges[1:])]
        return [u for p in pieces for u in shards.read_units(raw, p, 0.3, tok)]

    whole = units()
    for chunk in (1000, 4099, 65_536):
        monkeypatch.setattr(shards, "_CHUNK_BYTES", chunk)
        assert units(70_000) == units(65_536, 131_072) == whole, chunk
    assert "".join(u.text for u in whole) == (corpus / "big.txt").read_text()
    assert len({u.val for u in whole}) == 2 and all(u.continues == (k > 0) for k, u in enumerate(whole))
    for k, u in enumerate(whole):
        assert u.bos == (k == 0 or whole[k - 1].val != u.val)
        assert u.eos == (k == len(whole) - 1 or whole[k + 1].val != u.val)


def test_a_mixture_source_too_small_to_validate_is_named(mixture):
    with pytest.raises(DataError, match=rf"{mixture['code']} has \d+ held-out sequences .*needs 40"):
        build_data(_mix_cfg(mixture, batch_size=40), vocab_size=300, seed=0)


def test_epoch_permutation_is_a_bijection_evaluated_per_index():
    from train.data.mixture import Permutation
    for n in (1, 2, 3, 17, 1000, 4097):
        assert sorted(Permutation(n, [0, 1, 2])[i] for i in range(n)) == list(range(n))
    orders = {tuple(Permutation(50, [7, 0, e])[i] for i in range(50)) for e in range(3)}
    assert len(orders) == 3 and tuple(range(50)) not in orders  # shuffled, another order per epoch
    with pytest.raises(IndexError):
        Permutation(5, [0])[5]
