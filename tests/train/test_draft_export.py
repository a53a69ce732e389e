"""The draft folder of `python -m train.export --draft-exit E` (a plain Llama of the first E blocks,
loadable by transformers and any server taking a draft model), `python -m train.decode` on a run
directory, and the transformers snippets of docs/decoding.md, run as written there."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from train.config import CheckpointConfig, Config, DataConfig, ModelConfig, to_dict
from train.inference import greedy_generate
from tests.train._models import one_thread, random_model, sentencepiece_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(dim=64, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=96)
E = 4  # as docs/decoding.md's snippets


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as the trainer leaves it (config.yaml, one checkpoint, its tokenizer and
    held-out text), holding a random model with decisive blocks (`random_model`)."""
    pytest.importorskip("transformers")
    from omegaconf import OmegaConf

    from train.checkpoint import CheckpointManager
    tmp = tmp_path_factory.mktemp("draft")
    text = Path(ROOT, "train/inference.py").read_text() + Path(ROOT, "train/hf.py").read_text()
    run = tmp / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(sentencepiece_model(tmp, text).read_bytes())
    (run / "heldout.txt").write_text(text[:6000])
    cfg = Config(model=CFG, data=DataConfig(seq_len=32))
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    model = random_model(CFG, seed=3)
    CheckpointManager(run / "checkpoints", CheckpointConfig(), model_cfg=CFG).save(1, model, None, {}, blocking=True)
    return run, model


def test_draft_folder_is_exit_e_and_drafts_for_hugging_face(run_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from train.export import export_run, main as export
    run, model = run_dir
    draft_dir, full_dir = tmp_path / "draft", tmp_path / "hf"
    export(["--run", str(run), "--out", str(draft_dir), "--draft-exit", str(E), "--dtype", "float32"])
    export_run(run, full_dir, dtype=torch.float32)
    config = json.loads((draft_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == E and config["architectures"] == ["LlamaForCausalLM"]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in draft_dir.iterdir()}

    draft = LlamaForCausalLM.from_pretrained(str(draft_dir)).eval()
    full = LlamaForCausalLM.from_pretrained(str(full_dir)).eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exit_e = model.unembed(model(tokens, capture=[E - 1])[1][E - 1])
        torch.testing.assert_close(draft(tokens).logits, exit_e, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(full(tokens).logits, exit_e, atol=1e-2)  # a real cut, not the full model
    assert AutoTokenizer.from_pretrained(str(draft_dir)).encode("def f():") == \
        AutoTokenizer.from_pretrained(str(full_dir)).encode("def f():")

    # Hugging Face assisted generation with the draft: the full model's greedy output, which is ours.
    for n in (1, 9):
        prompt = tokens[0, :n].tolist()
        ids = torch.tensor([prompt])
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=None,
                  pad_token_id=0)
        with torch.no_grad():
            plain = full.generate(ids, **kw)[0, n:].tolist()
            assisted = full.generate(ids, assistant_model=draft, **kw)[0, n:].tolist()
        assert assisted == plain == greedy_generate(model, prompt, 16).tokens

    # The same draft cut from the Hugging Face folder instead of the run.
    export(["--hf", str(full_dir), "--out", str(tmp_path / "draft2"), "--draft-exit", str(E)])
    from safetensors.torch import load_file
    a, b = load_file(draft_dir / "model.safetensors"), load_file(tmp_path / "draft2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        export(["--run", str(run), "--out", str(tmp_path / "bad"), "--draft-exit", str(CFG.n_layers)])


def test_decode_reads_a_run_directory_sampled_and_batched(run_dir, tmp_path):
    """`python -m train.decode --model RUN_DIR` exports the checkpoint on the fly and reads the
    run's held-out text by default; sampling and batches go through the same sweep."""
    from train.decode import main
    run, _ = run_dir
    report = main(["--model", str(run), "--exits", "1", "--draft", "3", "--prompts", "4", "--prompt-tokens", "6",
                   "--max-new-tokens", "10", "--max-tokens", "64", "--seq-len", "32", "--batch-size", "2",
                   "--temperature", "0.8", "--top-k", "50", "--top-p", "0.95", "--no-hf", "--device", "cpu",
                   "--ignore-eos", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    spec = report["speculative"]
    assert report["text_tokens"] > 100 and [r["exit"] for r in report["perplexity"]["layers"]] == list(range(1, 9))
    assert spec["batch_size"] == 2 and "greedy" not in spec and spec["sampled"]["tokens"] == 40
    (run_,) = spec["runs"]
    assert run_["tokens"] == 40 and run_["identical"] is None and 0 < run_["acceptance_rate"] < 1
    assert (tmp_path / "r.png").stat().st_size > 10_000  # the plot reads the sampled baseline
    with pytest.raises(SystemExit, match="--top-p"):
        main(["--model", str(run), "--temperature", "1", "--top-p", "0"])
    with pytest.raises(SystemExit, match="train.export"):
        main(["--model", str(tmp_path / "nowhere")])


def _doc_snippet(name: str) -> str:
    """The python block of docs/decoding.md that follows the marker `<!-- snippet: name -->`."""
    text = (ROOT / "docs" / "decoding.md").read_text()
    found = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"docs/decoding.md has no snippet {name}"
    return found.group(1)


def test_docs_transformers_snippets_run_as_written(run_dir, tmp_path):
    """docs/decoding.md's transformers code, with only the folder names replaced: early-exit
    self-speculation (`assistant_early_exit`) and a draft folder (`assistant_model`) both print
    the model's own greedy continuation."""
    from train.export import export_run
    run, _ = run_dir
    export_run(run, tmp_path / "hf", dtype=torch.float32)
    export_run(run, tmp_path / "draft", dtype=torch.float32, draft_exit=E)
    for name in ("early_exit", "draft_model"):
        code = _doc_snippet(name)
        code = code.replace('"outputs/my_run/hf"', repr(str(tmp_path / "hf")))
        code = code.replace('"outputs/my_run/draft"', repr(str(tmp_path / "draft")))
        assert str(tmp_path) in code
        printed: list[str] = []
        scope: dict = {"print": lambda *a: printed.append(" ".join(map(str, a)))}
        exec(compile(code, f"docs/decoding.md:{name}", "exec"), scope)
        model, tokenizer, inputs = scope["model"], scope["tokenizer"], scope["inputs"]
        with torch.no_grad():
            greedy = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        assert printed == [tokenizer.decode(greedy[0], skip_special_tokens=True)], name
        assert greedy.shape[1] > inputs["input_ids"].shape[1] + 5
