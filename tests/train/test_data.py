"""The data pipeline: tokenizer, sources, packing, split, global batch order and exact resume.

Small synthetic corpora in temporary folders; one tokenizer is trained once for the module.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train.config import DataConfig
from train.data import DataError, Tokenizer, build_data
from train.data.build import auto_prepared_dir
from train.data import shards
from train.data.shards import is_held_out
from train.data.sources import open_corpus
from train.data.tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega def return class "
         "import while for if else print value index count total self None True False").split()
VOCAB = 400  # the synthetic tokenizer's target size


def _text(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        indent = " " * (4 * rng.randrange(3))
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 9)))
        lines.append(f"{indent}{words} = {rng.randrange(10_000)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of 30 .txt documents (about 60 KB; a few span several units)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(_text(rng, 40 if i % 6 else 200))
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    docs = open_corpus(str(corpus)).documents()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(docs, VOCAB, path, expected_chars=100_000)


def _cfg(corpus: Path, tok: Tokenizer, cache: Path, **kw) -> DataConfig:
    base = dict(source=str(corpus), tokenizer=str(tok.path), cache_dir=str(cache), max_chars=None,
                seq_len=16, batch_size=4, val_fraction=0.1)
    return DataConfig(**{**base, **kw})


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


# --------------------------------------------------------------------------- tokenizer

def test_trained_tokenizer_is_llama_like_and_exact(tokenizer, corpus, tmp_path):
    assert 300 <= tokenizer.vocab_size <= VOCAB
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    text = "    def value(self):\n\treturn 'é→ü' + 987654321  # ✓\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text  # byte fallback + no normalisation: exact round trip
    assert len(tokenizer.encode("987654321")) == 9  # digits are split
    assert tokenizer.encode_batch([text, "alpha"]) == [ids, tokenizer.encode("alpha")]
    # Training is reproducible to the byte (concurrent runs may race to write the same file).
    again = train_tokenizer(open_corpus(str(corpus)).documents(), VOCAB, tmp_path / "again.model",
                            expected_chars=100_000)
    assert again.path.read_bytes() == tokenizer.path.read_bytes()

    # An existing .model is used as is: same ids, nothing trained into the cache.
    data = build_data(_cfg(corpus, tokenizer, tmp_path / "cache"), vocab_size=512, seed=0)
    assert data.tokenizer.path == tokenizer.path
    assert data.tokenizer.encode(text) == ids
    assert not list((tmp_path / "cache").glob("tokenizer-*.model"))


def test_build_data_trains_and_caches_a_tokenizer(corpus, tmp_path):
    cfg = DataConfig(source=str(corpus), cache_dir=str(tmp_path), max_chars=None, seq_len=16,
                     batch_size=4, val_fraction=0.1)
    data = build_data(cfg, vocab_size=VOCAB, seed=0)
    (trained,) = tmp_path.glob("tokenizer-*.model")
    # The run reads the copy inside the prepared folder: the same file.
    assert data.tokenizer.path.read_bytes() == trained.read_bytes() and data.tokenizer.vocab_size <= VOCAB
    stamp = trained.stat().st_mtime_ns
    again = build_data(cfg, vocab_size=VOCAB, seed=0)  # warm: reuses tokenizer and tokens
    assert trained.stat().st_mtime_ns == stamp and again.sources[0].folder == data.sources[0].folder
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary leftovers
    # Another vocabulary size is another tokenizer (and another token cache).
    build_data(cfg, vocab_size=VOCAB - 50, seed=0)
    assert len(list(tmp_path.glob("tokenizer-*.model"))) == 2


def test_tokenizer_larger_than_model_vocab_is_refused(corpus, tokenizer, tmp_path):
    with pytest.raises(DataError) as e:
        build_data(_cfg(corpus, tokenizer, tmp_path), vocab_size=300, seed=0)
    msg = str(e.value)
    assert str(tokenizer.vocab_size) in msg and "300" in msg and str(tokenizer.path) in msg
    assert not list(tmp_path.iterdir())  # refused before any work
    with pytest.raises(DataError, match="data.tokenizer: .*nope.model does not exist"):
        build_data(_cfg(corpus, tokenizer, tmp_path, tokenizer=str(tmp_path / "nope.model")),
                   vocab_size=512, seed=0)


# --------------------------------------------------------------------------- sources

def test_sources_read_txt_jsonl_in_sorted_order_with_char_cap(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zzz")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "c.txt").write_text("")  # empty documents are skipped
    corpus = open_corpus(str(tmp_path))
    assert [f.relative_to(tmp_path).as_posix() for f in corpus.files] == ["a.jsonl", "b/z.txt", "c.txt"]
    assert list(corpus.documents()) == ["one", "two", "zzz"]
    assert list(corpus.documents(max_chars=7)) == ["one", "two", "z"]
    assert list(open_corpus(str(tmp_path / "a.jsonl")).documents()) == ["one", "two"]


def test_source_errors_name_the_file_and_line(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.source: .*missing does not exist"):
        open_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files under folder .*empty"):
        open_corpus(str(tmp_path / "empty"))

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8"):
        list(open_corpus(str(bad)).documents())

    lines = tmp_path / "d.jsonl"
    lines.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        list(open_corpus(str(lines)).documents())
    lines.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: no field 'text' .*found: body"):
        list(open_corpus(str(lines)).documents())
    with pytest.raises(DataError, match=r"d.jsonl:1: no field 'content'"):
        list(open_corpus(str(lines), text_field="content").documents())

    table = tmp_path / "t.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), table)
        assert list(open_corpus(str(table)).documents()) == ["p1", "p2"]
    except ImportError:
        table.write_bytes(b"PAR1")
    # Without pyarrow: a clear message naming the file and what to install.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"t.parquet: reading .parquet files needs pyarrow"):
        list(open_corpus(str(table)).documents())


def test_stdlib_source_finds_the_standard_library():
    corpus = open_corpus("stdlib")
    names = [str(f) for f in corpus.files]
    assert names == sorted(names) and not any("site-packages" in n for n in names)
    assert any(n.endswith("/json/decoder.py") for n in names)
    assert corpus.total_bytes > 5_000_000
    assert sum(len(d) for d in corpus.documents(max_chars=1_500_000)) == 1_500_000


# --------------------------------------------------------------------------- packing and split

def _windows(data, split: str) -> np.ndarray:
    stream = data.sources[0].splits[split]
    W = data.seq_len + 1
    return stream.windows(list(range(stream.num_windows(W))), W)


def test_packing_and_split_against_a_reference(corpus, tokenizer, tmp_path):
    cfg = _cfg(corpus, tokenizer, tmp_path)
    data = build_data(cfg, vocab_size=512, seed=0)
    # Reference: a .txt file is one document, cut into units at 0 and at each block's cut c_k: the
    # first of (at most MAX_CUT_TRIES) candidates in [k U, k U + CUT_SEARCH_BYTES) where encoding the
    # whole text before it and continuing from it gives the whole document's ids (no window: the
    # whole text); the document's end if the search reaches it; a unit is held out iff the hash of
    # (file, its start // U) is below val_fraction; each run of units of one split is stored BOS
    # text EOS, and each split's runs are concatenated in corpus order and cut into
    # non-overlapping windows of seq_len + 1. The units' ids together are the ids of the whole document.
    W = cfg.seq_len + 1
    U, S = shards.UNIT_BYTES, shards.CUT_SEARCH_BYTES
    streams = {"train": [], "val": []}
    multi = 0
    for path in open_corpus(str(corpus)).files:
        raw = path.read_bytes()
        whole = tokenizer.encode(raw.decode())

        def exact(p: int) -> bool:
            return tokenizer.encode(raw[:p].decode()) + tokenizer.encode_continuation(raw[p:].decode()) == whole

        cuts = set()
        for k in range(1, -(-len(raw) // U)):
            limit = min(len(raw), k * U + S)
            candidates = [m.start() for m in shards._CANDIDATE.finditer(raw, k * U, limit)][:shards.MAX_CUT_TRIES]
            cut = next((p for p in candidates if exact(p)), None)
            assert cut is not None or limit == len(raw), "a fallback cut in plain code"
            cuts.add(len(raw) if cut is None else cut)
        starts = sorted({0} | cuts - {len(raw)})
        multi += len(starts) > 1
        units = [raw[a:b].decode() for a, b in zip(starts, starts[1:] + [len(raw)])]
        splits = ["val" if is_held_out(path.name, a // U, cfg.val_fraction) else "train" for a in starts]
        for n, (unit, split) in enumerate(zip(units, splits)):
            ids = tokenizer.encode_continuation(unit) if n else tokenizer.encode(unit)
            first, last = n == 0 or splits[n - 1] != split, n == len(units) - 1 or splits[n + 1] != split
            streams[split] += [tokenizer.bos_id] * first + ids + [tokenizer.eos_id] * last
    assert multi >= 3  # documents of several units
    for split in ("train", "val"):
        ref = np.array(streams[split][:len(streams[split]) // W * W]).reshape(-1, W)
        assert np.array_equal(_windows(data, split), ref), split
    assert 0 < len(streams["val"]) < len(streams["train"])
    assert data.num_val_sequences == len(streams["val"]) // W

    inputs, labels = next(data.train)
    assert inputs.shape == labels.shape == (4, 16) and inputs.dtype == labels.dtype == torch.long
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are inputs shifted by one
    rows = {tuple(r) for r in _windows(data, "train").tolist()}
    for x, y in zip(inputs.tolist(), labels.tolist()):
        assert tuple(x + y[-1:]) in rows

    # The split depends on the data only: another seed, another cache folder, same windows.
    other = build_data(_cfg(corpus, tokenizer, tmp_path / "again"), vocab_size=512, seed=7)
    assert np.array_equal(_windows(other, "val"), _windows(data, "val"))
    for (a, b), (c, d) in zip(data.val_batches(3), other.val_batches(3)):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_too_little_data_is_a_clear_error(corpus, tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"data.source=.*corpus.*data.seq_len\+1=17 .*needs 5000 train "
                                        r"sequences .*data.batch_size=5000"):
        build_data(_cfg(corpus, tokenizer, tmp_path, batch_size=5000), vocab_size=512, seed=0)
    with pytest.raises(DataError, match=r"validation sequences.*one validation batch per rank "
                                        r"needs 16 .*data.val_fraction \(0.01\)"):
        build_data(_cfg(corpus, tokenizer, tmp_path, val_fraction=0.01), vocab_size=512, seed=0,
                   dp_world=4, dp_rank=1)


def test_other_ranks_wait_for_the_main_rank(corpus, tokenizer, tmp_path):
    """No collective: the other ranks poll for the manifest, with a deadline and a clear error."""
    cfg = _cfg(corpus, tokenizer, tmp_path, prepare_wait_s=0.5)
    with pytest.raises(DataError, match=r"main rank has neither prepared nor started to prepare .*"
                                        r"data.cache_dir must be one folder shared by all ranks"):
        build_data(cfg, vocab_size=512, seed=0, dp_rank=1, dp_world=2, is_main=False)
    # The main rank has started (its marker is there) but is slow: wait up to data.prepare_wait_s.
    folder = auto_prepared_dir(cfg, open_corpus(str(corpus)), tokenizer, 512)
    Path(f"{folder}.preparing").write_text("another host")
    with pytest.raises(DataError, match=r"waited 0 s \(data.prepare_wait_s\) for the main rank .*"
                                        r"Or prepare it beforehand: python -m train.data.prepare data.source="):
        build_data(cfg, vocab_size=512, seed=0, dp_rank=1, dp_world=2, is_main=False)
    main = build_data(cfg, vocab_size=512, seed=0, dp_world=2)
    data = build_data(cfg, vocab_size=512, seed=0, dp_rank=1, dp_world=2, is_main=False)
    assert data.sources[0].folder == main.sources[0].folder and data.num_train_sequences > 0
    # A main rank that fails tells the waiting ranks at once (its error, not a timeout).
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    bad = _cfg(tmp_path / "latin1", tokenizer, tmp_path, prepare_wait_s=30)
    with pytest.raises(DataError, match="a.txt: not UTF-8"):
        build_data(bad, vocab_size=512, seed=0)
    with pytest.raises(DataError, match="the main rank failed to prepare"):
        build_data(bad, vocab_size=512, seed=0, dp_rank=1, dp_world=2, is_main=False)


def test_an_earlier_attempts_failure_does_not_stop_an_elastic_restart(corpus, tokenizer, tmp_path, monkeypatch):
    """torchrun restarted the job (restart count 1) seconds after the main rank failed to prepare
    (count 0): the other ranks wait for this attempt's main rank instead of failing at once on the
    marker the earlier attempt left; a failure of this attempt still stops them at once."""
    import threading
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    cfg = _cfg(corpus, tokenizer, tmp_path, prepare_wait_s=60)
    failed = Path(f"{auto_prepared_dir(cfg, open_corpus(str(corpus)), tokenizer, 512)}.failed")
    failed.parent.mkdir(parents=True, exist_ok=True)
    failed.write_text("TORCHELASTIC_RUN_ID=job7 TORCHELASTIC_RESTART_COUNT=0\nOSError: disk full")
    with pytest.raises(DataError, match="the main rank failed to prepare .*disk full"):  # this attempt's
        build_data(cfg, vocab_size=512, seed=0, dp_rank=1, dp_world=2, is_main=False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    main = threading.Timer(1.0, lambda: build_data(cfg, vocab_size=512, seed=0, dp_world=2))
    main.start()  # the restarted main rank starts a second after the others
    try:
        data = build_data(cfg, vocab_size=512, seed=0, dp_rank=1, dp_world=2, is_main=False)
    finally:
        main.join()
    assert data.num_train_sequences > 0 and not failed.exists()


# --------------------------------------------------------------------------- global order and resume

def _ranks(cfg: DataConfig, world: int, seed: int = 0):
    return [build_data(cfg, vocab_size=512, seed=seed, dp_rank=r, dp_world=world) for r in range(world)]


def test_global_batch_order_does_not_depend_on_the_layout(corpus, tokenizer, tmp_path):
    (one,) = _ranks(_cfg(corpus, tokenizer, tmp_path, batch_size=4), 1)
    two = _ranks(_cfg(corpus, tokenizer, tmp_path, batch_size=2), 2)
    n_train = one.num_train_sequences
    steps = 2 * n_train // 4 + 3  # past two epoch boundaries
    whole = _take(one.train, steps)
    halves = [_take(d.train, steps) for d in two]
    for k in range(steps):
        assert torch.equal(whole[k][0], torch.cat([halves[0][k][0], halves[1][k][0]]))
        assert torch.equal(whole[k][1], torch.cat([halves[0][k][1], halves[1][k][1]]))

    # Each epoch is a permutation of the train split; epochs are reshuffled.
    rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in whole])
    train = torch.from_numpy(_windows(one, "train").astype(np.int64))
    epoch0, epoch1 = rows[:n_train], rows[n_train:2 * n_train]
    key = lambda t: sorted(map(tuple, t.tolist()))
    assert key(epoch0) == key(epoch1) == key(train)
    assert not torch.equal(epoch0, epoch1)
    # A different seed is a different order; validation shards also concatenate.
    (reseeded,) = _ranks(_cfg(corpus, tokenizer, tmp_path, batch_size=4), 1, seed=1)
    assert not torch.equal(next(reseeded.train)[0], whole[0][0])
    v1, v2 = one.val_batches(2), [d.val_batches(2) for d in two]
    assert len(v1) == len(v2[0]) == len(v2[1]) == 2
    for k in range(2):
        assert torch.equal(v1[k][0], torch.cat([v2[0][k][0], v2[1][k][0]]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one.val_batches(2), v1))  # same every call


def test_resume_continues_exactly_and_across_layouts(corpus, tokenizer, tmp_path):
    cfg = _cfg(corpus, tokenizer, tmp_path, batch_size=4)
    data = build_data(cfg, vocab_size=512, seed=3)
    _take(data.train, 5)
    state = data.train.state_dict()
    expected = _take(data.train, 40)  # crosses an epoch boundary
    assert state["position"] == 20 and state["seed"] == 3 and state["seq_len"] == 16
    assert state["sources"] == {str(data.sources[0].folder): data.sources[0].fingerprint}

    fresh = build_data(cfg, vocab_size=512, seed=3).train
    fresh.load_state_dict(state)
    got = _take(iter(fresh), 40)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))

    # Worker processes give the same stream.
    workers = build_data(_cfg(corpus, tokenizer, tmp_path, batch_size=4, num_workers=2),
                         vocab_size=512, seed=3).train
    workers.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected[:6], _take(workers, 6)))

    # The state is global: two ranks of batch 2 resume the same stream from the same position.
    halves = []
    for r in range(2):
        loader = build_data(_cfg(corpus, tokenizer, tmp_path, batch_size=2), vocab_size=512, seed=3,
                            dp_rank=r, dp_world=2).train
        loader.load_state_dict(state)
        halves.append(_take(loader, 3))
    for k in range(3):
        assert torch.equal(expected[k][0], torch.cat([halves[0][k][0], halves[1][k][0]]))

    with pytest.raises(ValueError, match="seed 3, this run uses 4"):
        build_data(cfg, vocab_size=512, seed=4).train.load_state_dict(state)
    with pytest.raises(ValueError, match="data.seq_len=16, this run uses 8"):
        build_data(_cfg(corpus, tokenizer, tmp_path, seq_len=8), vocab_size=512, seed=3).train.load_state_dict(state)
