"""Hugging Face interchange: our exits equal transformers' LlamaForCausalLM, import/export is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from train.config import ConfigError, ModelConfig, RopeScalingConfig  # noqa: E402
from train.hf import (check_hf_config, export_hf, ffn_hidden_dim, hf_config_dict,  # noqa: E402
                      load_hf_state_dict, load_into_model, read_hf_config)
from tests.train._models import one_thread, random_model  # noqa: E402,F401
from train.model import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A ~300-piece BPE sentencepiece model with the project's settings, trained on our own source."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(Path(__file__).read_text() + Path(ROOT, "train/model.py").read_text())
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    return str(d / "sp.model")


@pytest.mark.parametrize("rope_scaling", [None, RopeScalingConfig()])  # Llama 2, Llama 3.1
def test_export_runs_in_transformers_with_equal_logits_and_exits(tmp_path, sp_model, rope_scaling):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**CFG.__dict__, "rope_scaling": rope_scaling,
                         "rope_theta": 500000.0 if rope_scaling else 10000.0})
    model = random_model(cfg)
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", sp_model, torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        ours = model(tokens)
        _, hidden = model(tokens, capture=range(cfg.n_layers))
        torch.testing.assert_close(ref.logits, ours, atol=1e-4, rtol=0)
        for E in range(1, cfg.n_layers):  # HF's hidden_states[E]: after E blocks, before the norm
            hf_exit = hf.lm_head(hf.model.norm(ref.hidden_states[E]))
            torch.testing.assert_close(hf_exit, model.unembed(hidden[E - 1]), atol=1e-4, rtol=0)
    # The tokenizer loads offline and encodes like sentencepiece itself.
    import sentencepiece as spm
    text = Path(ROOT, "train/model.py").read_text()[:2000] + "\n  Ünïcödé 12345\ttab"
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.encode(text, add_special_tokens=False) == spm.SentencePieceProcessor(model_file=sp_model).encode(text)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) == (hf.config.bos_token_id, hf.config.eos_token_id)


def test_import_export_round_trip_is_exact_and_sharded(tmp_path):
    model = random_model(CFG)
    sd = model.state_dict()
    # fp32, forced into several shards: import gives back the very same tensors.
    a = export_hf(sd, CFG, tmp_path / "a", None, torch.float32, max_shard_bytes=100_000)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    fresh = random_model(CFG, seed=1)
    load_into_model(fresh, a, CFG)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # bf16: export -> import -> export reproduces the files' tensors bit for bit.
    b = export_hf(sd, CFG, tmp_path / "b", None, torch.bfloat16)
    again = export_hf(load_hf_state_dict(b, CFG), CFG, tmp_path / "c", None, torch.bfloat16)
    first, second = load_file(b / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    # Re-exporting over an existing folder replaces it and leaves no temporary folders behind.
    export_hf(sd, CFG, tmp_path / "b", None, torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_tied_embeddings_are_untied_on_import(tmp_path):
    model = random_model(CFG)
    out = export_hf(model.state_dict(), CFG, tmp_path / "hf", None, torch.float32)
    tensors = load_file(out / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    sd = load_hf_state_dict(out, CFG)
    assert torch.equal(sd["output.weight"], model.state_dict()["tok_embeddings.weight"])


def test_shape_mismatch_on_import_names_the_setting(tmp_path):
    out = export_hf(random_model(CFG).state_dict(), CFG, tmp_path / "hf", None, torch.float32)
    wrong = ModelConfig(**{**CFG.__dict__, "dim": 128, "n_layers": 3})
    with pytest.raises(ConfigError, match=r"model\.dim = 128 but .*has 64.*model\.n_layers = 3 but .*has 4"):
        load_into_model(random_model(wrong), out, wrong)
    narrow = ModelConfig(**{**CFG.__dict__, "multiple_of": 256})
    with pytest.raises(ConfigError, match="feed-forward width 256"):
        check_hf_config(narrow, out)


@pytest.mark.parametrize("dim,multiple_of,mult", [(64, 32, None), (4096, 1024, 1.3), (2048, 256, 1.5), (96, 7, 0.5)])
def test_config_width_matches_the_model_and_reads_back(tmp_path, dim, multiple_of, mult):
    cfg = ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                      multiple_of=multiple_of, ffn_dim_multiplier=mult)
    width = build_model(cfg).layers["0"].feed_forward.w1.weight.shape[0]
    conf = hf_config_dict(cfg)
    assert conf["intermediate_size"] == width
    (tmp_path / "config.json").write_text(json.dumps(conf))
    back = read_hf_config(tmp_path)
    assert ffn_hidden_dim(dim, back["multiple_of"], back["ffn_dim_multiplier"]) == width
    check_hf_config(cfg, tmp_path)  # no error on a match
