"""Validation measures a fixed sample of the held-out documents: spread over the whole held-out
set (both ends of a folder sorted by domain) and every source of a mixture, the same for 1 and 2
data-parallel ranks, and never spanning two documents without their boundary tokens."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from train.config import DataConfig, MixtureSource
from train.data import build_data
from train.data import prepare as prep
from train.data.heldout import spread_order
from train.data.sources import open_corpus
from train.data.tokenizer import load_tokenizer, train_tokenizer

DOMAINS = {"a": "alpha beta gamma delta epsilon zeta theta kappa".split(),
           "b": "import while return class print value index count".split()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """Ten documents of domain a, then ten of domain b (sorted by name): the folder and its texts."""
    root = tmp_path_factory.mktemp("sorted")
    rng = random.Random(0)
    texts = []
    for domain, words in DOMAINS.items():
        for i in range(10):
            text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randrange(3, 9))) + f" {i}"
                             for _ in range(120)) + "\n"
            (root / f"{domain}{i:02d}.txt").write_text(text)
            texts.append(text)
    return root, texts


@pytest.fixture(scope="module")
def tok_path(folder, tmp_path_factory) -> Path:
    root, texts = folder
    return train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "tokenizer.model",
                           expected_chars=sum(map(len, texts))).path


def _cfg(source: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": str(source), "seq_len": 16, "batch_size": 4, **kw})


def _rows(batches) -> list[list[int]]:
    """The windows (seq_len + 1 tokens) of a list of (inputs, labels) batches."""
    return [x + y[-1:] for inputs, labels in batches for x, y in zip(inputs.tolist(), labels.tolist())]


def _domains(tok, rows) -> set[str]:
    return {d for r in rows for d, words in DOMAINS.items() if set(tok.decode(r).split()) & set(words)}


def test_spread_order_is_a_nested_even_permutation():
    for n in (1, 2, 5, 17, 1000):
        order = spread_order(n, n)
        assert sorted(order.tolist()) == list(range(n))
        for k in (1, 2, 3, n // 2, n):
            assert spread_order(n, k).tolist() == order[:k].tolist()  # nested
    first = spread_order(1000, 8)
    assert first.min() == 0 and first.max() >= 800 and np.diff(np.sort(first)).max() <= 2 * 1000 / 8


def test_sample_covers_a_sorted_folder_and_is_the_same_for_any_layout(folder, tok_path, tmp_path):
    root, texts = folder
    out = tmp_path / "p"
    prep.prepare_dataset(open_corpus(str(root)), tok_path, out, val_fraction=0.3, max_chars=None,
                         shard_bytes=1 << 16)
    tok = load_tokenizer(tok_path)
    one = build_data(_cfg(out), vocab_size=300, seed=0)
    sample = _rows(one.val_batches(2))  # 8 of the held-out windows
    assert one.num_val_sequences > 20 * len(sample)  # a small sample of many
    assert _domains(tok, sample) == {"a", "b"}  # not only the first files of the sorted folder
    two = [build_data(_cfg(out, batch_size=2), vocab_size=300, seed=0, dp_rank=r, dp_world=2) for r in range(2)]
    per_rank = [r.val_batches(2) for r in two]
    assert [row for k in range(2) for rank in per_rank for row in _rows(rank[k:k + 1])] == sample
    assert _rows(build_data(_cfg(out), vocab_size=300, seed=7).val_batches(2)) == sample  # not the seed

    # Every window is stored documents, whole or cut by the window's edges, with their BOS/EOS:
    # between boundary tokens it is one contiguous stretch of one source text.
    for row in _rows(one.val_batches(50)):
        segment = []
        for t in row + [tok.bos_id]:
            if t in (tok.bos_id, tok.eos_id):
                assert not segment or any(tok.decode(segment) in text for text in texts), tok.decode(segment)
                segment = []
            else:
                segment.append(t)


def test_mixture_sample_measures_every_source(folder, tok_path, tmp_path):
    root, _ = folder
    folders = []
    for domain in DOMAINS:
        (tmp_path / domain).mkdir()
        for f in root.glob(f"{domain}*.txt"):
            (tmp_path / domain / f.name).write_bytes(f.read_bytes())
        folders.append(tmp_path / f"prepared-{domain}")
        prep.prepare_dataset(open_corpus(str(tmp_path / domain)), tok_path, folders[-1], val_fraction=0.3,
                             max_chars=None, shard_bytes=1 << 16)
    cfg = DataConfig(mixture=[MixtureSource(path=str(f), weight=w) for f, w in zip(folders, (0.8, 0.2))],
                     seq_len=16, batch_size=5)
    data = build_data(cfg, vocab_size=300, seed=0)
    tok = load_tokenizer(tok_path)
    assert _domains(tok, _rows(data.val_batches(1))) == {"a", "b"}  # 4 : 1 rows, by weight
    per_source = data.source_val_batches(2)
    assert {name: _domains(tok, _rows(b)) for name, b in per_source.items()} == {
        "prepared-a": {"a"}, "prepared-b": {"b"}}
