"""Hugging Face interchange: our exits equal transformers' LlamaForCausalLM, import/export is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

from train.config import ConfigError, ModelConfig, RopeScalingConfig  # noqa: E402
from train.hf import (check_hf_config, export_hf, ffn_hidden_dim, hf_config_dict,  # noqa: E402
                      load_hf_state_dict, load_into_model, read_hf_config)
from tests.train._models import one_thread, random_model  # noqa: E402,F401
from train.model import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="module", params=[True, False], ids=["dummy_prefix", "no_dummy_prefix"])
def sp_model(tmp_path_factory, request) -> str:
    """A ~300-piece BPE sentencepiece model trained on our own source: with Llama 2's dummy
    prefix (its real setting), and without (the project's own tokenizers)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text(Path(__file__).read_text() + Path(ROOT, "train/model.py").read_text())
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=request.param,
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


# --------------------------------------------------------------------------- Llama 3 / 3.2

@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    """A tiny Llama 3.2-shaped checkpoint: tokenizer.json, tied embeddings, GQA, rope factor 32."""
    pytest.importorskip("transformers")
    from tests.train._llama3 import write_tiny_llama3
    text = Path(ROOT, "train/model.py").read_text() + Path(ROOT, "train/hf.py").read_text()
    return write_tiny_llama3(tmp_path_factory.mktemp("llama3") / "hf", text)


def test_llama3_import_equals_transformers_and_export_round_trip_is_exact(tmp_path, llama3_dir):
    import dataclasses

    import transformers
    from train.data.tokenizer import load_tokenizer
    from train.hf import load_hf_model
    hf = transformers.LlamaForCausalLM.from_pretrained(str(llama3_dir)).eval()
    model, cfg = load_hf_model(llama3_dir)
    assert cfg.rope_scaling == RopeScalingConfig(factor=32.0) and cfg.n_kv_heads == 2
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        _, hidden = model(tokens, capture=range(cfg.n_layers))
        torch.testing.assert_close(model(tokens), ref.logits, atol=1e-4, rtol=0)
        for E in range(1, cfg.n_layers):
            hf_exit = hf.lm_head(hf.model.norm(ref.hidden_states[E]))
            torch.testing.assert_close(model.unembed(hidden[E - 1]), hf_exit, atol=1e-4, rtol=0)
        # Llama 3.1's factor on the same weights is measurably another model (the check can fail).
        other = build_model(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig(factor=8.0)), "cpu")
        other.load_state_dict(model.state_dict())
        assert (other(tokens) - ref.logits).abs().max() > 1e-3
    # Export (with the checkpoint's tokenizer) and back: the same tensors, the same config.
    out = export_hf(model.state_dict(), cfg, tmp_path / "out", llama3_dir, torch.float32)
    original, exported = load_file(llama3_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert cfg.tie_embeddings and "lm_head.weight" not in exported  # tied in, tied out: one matrix
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    assert read_hf_config(out) == read_hf_config(llama3_dir)
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["factor"] == 32.0
    # The export's AutoTokenizer encodes held-out text as training did; its ids are the model's.
    text = Path(ROOT, "train/decode.py").read_text()[:2000]
    auto = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ours = load_tokenizer(llama3_dir)
    assert auto.encode(text, add_special_tokens=False) == ours.encode(text)
    assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_id, ours.eos_id) == (hf.config.bos_token_id, hf.config.eos_token_id)


def test_model_hf_takes_its_shape_from_the_checkpoint(llama3_dir):
    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    from train.hf import resolve_model_shape
    register_schemas()

    def config(*overrides):
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
            return load_config(compose("train", overrides=["model=hf", "data.seq_len=32", *overrides]))
    with pytest.raises(ConfigError, match=r"model\.init_from=HF_DIR"):
        config()
    cfg = resolve_model_shape(config(f"model.init_from={llama3_dir}"))
    assert {k: getattr(cfg.model, k) for k in read_hf_config(llama3_dir)} == read_hf_config(llama3_dir)
    assert cfg.model.name == "hf" and cfg.model.max_seq_len == 16384
    assert resolve_model_shape(config(f"model.init_from={llama3_dir}", "model.max_seq_len=64")).model.max_seq_len == 64
    with pytest.raises(ConfigError, match=r"model\.n_layers = 3 but .*has 4"):
        resolve_model_shape(config(f"model.init_from={llama3_dir}", "model.n_layers=3"))


def test_import_without_a_tokenizer_stops_before_training(tmp_path, llama3_dir):
    """The run must not train a new tokenizer for imported weights: it stops naming both keys."""
    import shutil

    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    from train.hf import resolve_model_shape
    from train.trainer import run
    register_schemas()
    bare = tmp_path / "bare"
    shutil.copytree(llama3_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        cfg = load_config(compose("train", overrides=[
            "model=hf", f"model.init_from={bare}", "data.seq_len=32", f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}"]))
    with pytest.raises(ConfigError, match=r"model\.init_from=.*holds no tokenizer.*data\.tokenizer"):
        run(resolve_model_shape(cfg))
    assert not (tmp_path / "cache").exists()  # stopped before any data work


def test_continual_llama3_from_the_command_line(tmp_path, llama3_dir):
    """`python -m train model=hf model.init_from=...` with plain files, and the paper's Llama 3.2
    recipe with model=hf: both train with the checkpoint's tokenizer and shape, and the run's
    export loads in transformers with that tokenizer."""
    from tests._launch import read_metrics, start, train_cmd, wait_all
    from train.data.tokenizer import load_tokenizer
    from train.export import export_run, load_run_config
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(Path(ROOT, f).read_text() for f in ("train/trainer.py", "train/checkpoint.py")))
    common = ["model=hf", f"model.init_from={llama3_dir}", f"data.source={corpus}", "data.seq_len=32",
              "data.batch_size=2", "data.val_fraction=0.1", "train.steps=2",
              "eval.every=0", "eval.batches=1", "logging.every=1", "logging.tensorboard=false",
              "checkpoint.interval=0", "checkpoint.async=false"]
    runs = {"files": ["data=files"], "recipe": ["experiment=continual_llama3_2_1b", "parallel=default"]}
    launches = [start(train_cmd([*extra, *common, f"run_dir={tmp_path / name}",
                                 f"data.cache_dir={tmp_path / name / 'cache'}"]), tmp_path)
                for name, extra in runs.items()]
    for done in wait_all(launches, timeout_s=180):
        done.check()
    source = load_tokenizer(llama3_dir)
    for name in runs:
        run_dir = tmp_path / name
        assert sorted(read_metrics(run_dir)) == [1, 2]
        cfg = load_run_config(run_dir)
        assert cfg.model.dim == 64 and cfg.model.rope_scaling.factor == 32.0 and cfg.model.vocab_size == 402
        assert load_tokenizer(run_dir).digest == source.digest  # the checkpoint's, not a trained one
    assert load_run_config(tmp_path / "recipe").layerskip.exit.e_scale == 0.1  # the recipe's settings
    assert load_run_config(tmp_path / "recipe").model.attention == "block_causal"  # as Llama 3's pretraining
    assert load_run_config(tmp_path / "files").model.attention == "causal"
    transformers = pytest.importorskip("transformers")
    out = export_run(tmp_path / "files", tmp_path / "export", dtype=torch.float32)
    heldout = (tmp_path / "files" / "heldout.txt").read_text(encoding="utf-8")
    auto = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert auto.encode(heldout, add_special_tokens=False) == source.encode(heldout)
    from train.decode import main as decode  # ... and so does `python -m train.decode`
    report = decode(["--model", str(out), "--exits", "2", "--draft", "2", "--prompts", "1", "--prompt-tokens",
                     "8", "--max-new-tokens", "4", "--max-tokens", "64", "--seq-len", "16", "--device", "cpu"])
    assert report["text_tokens"] == len(source.encode(heldout))


# The published config.json of meta-llama/Llama-3.2-1B and Meta-Llama-3-8B (the keys we read).
_LLAMA3_CONFIGS = {
    "llama3_2_1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "max_position_embeddings": 131072, "tie_word_embeddings": True},
    "llama3_8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": None,
                  "max_position_embeddings": 8192, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("preset", sorted(_LLAMA3_CONFIGS))
def test_llama3_presets_match_the_published_configs_and_model_hf_reads_the_same(tmp_path, preset):
    import dataclasses

    from hydra import compose, initialize_config_dir

    from train.config import load_config, register_schemas
    from train.hf import resolve_model_shape
    register_schemas()
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
        **_LLAMA3_CONFIGS[preset]}))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "recipes")):
        named = load_config(compose("train", overrides=[f"model={preset}"])).model
        from_hf = load_config(compose("train", overrides=["model=hf", f"model.init_from={tmp_path}"]))
    check_hf_config(named, tmp_path)  # the preset is the checkpoint's shape, RoPE scaling included
    resolved = resolve_model_shape(from_hf).model
    assert resolved.ffn_hidden_dim == named.ffn_hidden_dim  # (as another multiple_of/multiplier pair)
    same = dict(name=preset, init_from=None, multiple_of=named.multiple_of, ffn_dim_multiplier=named.ffn_dim_multiplier)
    assert dataclasses.replace(resolved, **same) == named
