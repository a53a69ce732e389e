"""One tokenizer interface, two backends: a Hugging Face tokenizer.json encodes exactly as
transformers' AutoTokenizer does, and which tokenizer a run uses is decided in one place (never a
silently retrained one for an imported model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.config import ConfigError, DataConfig, ModelConfig
from train.data.sources import DataError
from train.data.tokenizer import copy_tokenizer, load_tokenizer, resolve_tokenizer_path
from tests.train._llama3 import BOS, EOS, write_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXT = Path(ROOT, "train/model.py").read_text() + Path(ROOT, "train/hf.py").read_text()
SAMPLE = Path(ROOT, "train/inference.py").read_text()[:3000] + f"\n  Ünïcödé 12345\ttab {BOS} x"


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_tok")
    write_bpe_tokenizer(folder, TEXT)
    return folder


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory) -> Path:
    from train.data.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_tokenizer([TEXT], 600, out, expected_chars=len(TEXT))
    return out


def test_tokenizer_json_encodes_like_autotokenizer(hf_tok):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(hf_tok)  # the folder stands for its tokenizer.json
    assert tok.path == hf_tok / "tokenizer.json"
    assert load_tokenizer(hf_tok / "tokenizer.json").digest == tok.digest
    # special-token strings in the text are text (as Meta's and torchtune's data preparation)
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_tok), local_files_only=True, split_special_tokens=True)
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (400, 401)
    assert tok.vocab_size == 402
    ids = tok.encode(SAMPLE)  # no BOS added (Llama 3's post-processor would add one)
    assert ids == ref.encode(SAMPLE, add_special_tokens=False)
    assert BOS in SAMPLE and tok.bos_id not in ids  # the literal special token stayed text
    assert tok.decode(ids) == SAMPLE
    parts = SAMPLE.split("\n")
    assert tok.encode_batch(parts) == tok.encode_batch(parts, num_threads=1) == [tok.encode(p) for p in parts]
    tok.check_fits(402)
    with pytest.raises(DataError, match="model.vocab_size"):
        tok.check_fits(401)


def test_special_tokens_come_from_the_config_files_and_change_the_digest(hf_tok, tmp_path):
    folder = tmp_path / "t"
    copy_tokenizer(load_tokenizer(hf_tok), folder)
    before = load_tokenizer(folder).digest
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "chat_template": "x"}))
    assert load_tokenizer(folder).digest == before  # same ids, same prepared data
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": EOS}, "eos_token": EOS}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id) == (401, 401) and tok.digest != before  # other packed ids
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(DataError, match="bos_token"):
        load_tokenizer(folder)  # no guessing: BOS/EOS must be named
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    assert (load_tokenizer(folder).bos_id, load_tokenizer(folder).eos_id) == (400, 401)
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": EOS}))
    with pytest.raises(DataError, match="'<s>' is not a token"):
        load_tokenizer(folder)
    with pytest.raises(DataError, match="holds no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)


def test_copy_tokenizer_makes_the_folder_open_that_tokenizer(hf_tok, sp_file, tmp_path):
    run_dir = tmp_path / "run"
    copy_tokenizer(load_tokenizer(sp_file), run_dir)
    assert load_tokenizer(run_dir).digest == load_tokenizer(sp_file).digest  # sentencepiece: as before
    written = copy_tokenizer(load_tokenizer(hf_tok), run_dir)  # a stale tokenizer.model is removed
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    assert not (run_dir / "tokenizer.model").exists()
    assert load_tokenizer(run_dir).digest == load_tokenizer(hf_tok).digest


def test_a_concurrent_reader_never_sees_tokenizer_json_without_its_config(hf_tok, tmp_path, monkeypatch):
    """Several prepare tasks install the tokenizer into one folder at once: whenever tokenizer.json
    is there, the config naming its BOS/EOS is too (it is renamed into place last)."""
    from train.data import tokenizer as tk
    real, seen = tk.write_atomic, []

    def write_and_look(path, data):
        real(path, data)
        if (path.parent / "tokenizer.json").is_file():  # what another task would open now
            seen.append(load_tokenizer(path.parent).digest)
    monkeypatch.setattr(tk, "write_atomic", write_and_look)
    copy_tokenizer(load_tokenizer(hf_tok), tmp_path / "out")
    assert seen == [load_tokenizer(hf_tok).digest]


def test_resolve_tokenizer_order_and_an_import_without_one_stops(hf_tok, sp_file, tmp_path):
    model_dir = tmp_path / "model"  # an imported checkpoint: config.json and its tokenizer
    copy_tokenizer(load_tokenizer(hf_tok), model_dir)
    (model_dir / "config.json").write_text(json.dumps({"bos_token_id": 400, "eos_token_id": [401, 7]}))
    imported = ModelConfig(init_from=str(model_dir))
    assert resolve_tokenizer_path(DataConfig(), ModelConfig()) is None  # nothing given: train one
    assert resolve_tokenizer_path(DataConfig(), imported) == model_dir / "tokenizer.json"
    assert resolve_tokenizer_path(DataConfig(tokenizer=str(hf_tok)), imported) == hf_tok / "tokenizer.json"
    assert resolve_tokenizer_path(DataConfig(tokenizer=str(sp_file)), ModelConfig()) == sp_file
    # data.tokenizer wins, but its special ids must be the imported model's
    with pytest.raises(ConfigError, match=r"BOS id 1 .*bos_token_id=400"):
        resolve_tokenizer_path(DataConfig(tokenizer=str(sp_file)), imported)
    with pytest.raises(DataError, match="data.tokenizer"):
        resolve_tokenizer_path(DataConfig(tokenizer=str(tmp_path / "nowhere")), imported)
    # A checkpoint folder without a tokenizer is refused, naming both keys.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    with pytest.raises(ConfigError, match=r"model\.init_from=.* holds no tokenizer.*data\.tokenizer"):
        resolve_tokenizer_path(DataConfig(), imported)
