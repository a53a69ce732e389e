"""KV-cache inference, self-speculative decoding (== greedy) and the decode CLI end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from train.config import ModelConfig
from train.inference import CachedLlama, greedy_generate, self_speculative_generate
from tests.train._models import exported_random_model, one_thread, random_model, sentencepiece_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=96)


@torch.no_grad()
def test_kv_cache_forward_equals_full_forward_position_by_position():
    model = random_model(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    _, hidden = model(tokens, capture=range(CFG.n_layers))
    engine = CachedLlama(model)
    engine.reset(2, 13)
    # Chunks of 5, 1 and 7 new positions, each attending to the cached ones.
    h = torch.cat([engine.forward_cached(tokens[:, a:b], a) for a, b in ((0, 5), (5, 6), (6, 13))], dim=1)
    torch.testing.assert_close(engine.logits_at_exit(h), model(tokens), atol=1e-5, rtol=0)
    # A block range: the first 2 blocks, then the rest from their output, equals the exit at block 1.
    engine.reset(2, 13)
    h2 = engine.forward_cached(tokens, 0, (0, 2))
    torch.testing.assert_close(h2, hidden[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(engine.forward_cached(h2, 0, (2, 4)), hidden[3], atol=1e-5, rtol=0)
    # Rolling back and writing other tokens at the same positions forgets the old ones.
    engine.truncate(8)
    other = tokens.clone()
    other[:, 8:] = (other[:, 8:] + 1) % CFG.vocab_size
    h3 = engine.forward_cached(other[:, 8:], 8, (0, 2))
    torch.testing.assert_close(h3, model(other, capture=[1])[1][1][:, 8:], atol=1e-5, rtol=0)


def test_self_speculative_output_is_identical_to_greedy():
    nontrivial = 0
    for seed in (0, 1):
        model = random_model(CFG, seed=seed)
        for prompt_len in (1, 7):
            prompt = torch.randint(0, CFG.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
            greedy = greedy_generate(model, prompt, 30)
            assert len(greedy.tokens) == 30
            eos = greedy.tokens[10]  # a token greedy decoding really emits, so it stops early
            greedy_eos = greedy_generate(model, prompt, 30, eos_id=eos)
            assert greedy_eos.tokens == greedy.tokens[:greedy.tokens.index(eos) + 1]
            for E, d in ((1, 1), (1, 4), (2, 3), (3, 6)):
                spec = self_speculative_generate(model, prompt, 30, exit_layer=E, draft_len=d)
                assert spec.tokens == greedy.tokens, (seed, prompt_len, E, d)
                assert self_speculative_generate(model, prompt, 30, E, d, eos_id=eos).tokens == greedy_eos.tokens
                assert 0 <= spec.accepted <= spec.drafted
                # Each verify pass yields the accepted drafts plus one token (after the prompt's).
                assert spec.accepted + spec.verify_passes == len(spec.tokens) - 1
                nontrivial += 0 < spec.acceptance_rate < 1
    assert nontrivial > 0  # the drafts really came from the early exit, not the full model
    with pytest.raises(ValueError, match="exit_layer"):
        self_speculative_generate(model, [1], 5, exit_layer=CFG.n_layers, draft_len=2)


def test_decode_cli_end_to_end(tmp_path):
    pytest.importorskip("safetensors")
    from train.decode import main
    text = Path(ROOT, "train/inference.py").read_text() + Path(ROOT, "train/model.py").read_text()
    sp_model = sentencepiece_model(tmp_path, text)
    run = tmp_path / "run"
    # No tokenizer conversion (that needs transformers): the CLI itself only reads tokenizer.model.
    exported_random_model(run / "hf", CFG, text)
    shutil.copy(sp_model, run / "hf" / "tokenizer.model")

    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    main(["--model", str(run), "--json", str(out_json), "--plot", str(out_png), "--exits", "1,3",
          "--draft", "2,3", "--prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "12",
          "--max-tokens", "256", "--seq-len", "32", "--device", "cpu"])
    report = json.loads(out_json.read_text())
    layers = report["perplexity"]["layers"]
    assert [r["exit"] for r in layers] == [1, 2, 3, 4] and report["perplexity"]["tokens"] == 256
    assert all(r["perplexity"] > 1 for r in layers)
    runs = report["speculative"]["runs"]
    assert [(r["exit"], r["draft"]) for r in runs] == [(1, 2), (1, 3), (3, 2), (3, 3)]
    assert all(r["identical"] and r["speedup"] > 0 for r in runs)
    # Hugging Face's generate(assistant_early_exit=E) on the same prompts and (E, d): its greedy
    # output is ours, and its self-speculative output its own greedy output.
    hf = report["hf"]
    assert [(r["exit"], r["draft"]) for r in hf["runs"]] == [(1, 2), (1, 3), (3, 2), (3, 3)]
    assert hf["greedy"]["identical_to_ours"] and all(r["identical"] and r["tokens_per_s"] > 0 for r in hf["runs"])
    calls = {(r["exit"], r["draft"]): r["model_calls"] for r in hf["runs"]}
    assert calls[(1, 3)] > calls[(1, 2)] and calls[(3, 3)] > calls[(3, 2)]  # d really drafts d tokens a round
    from PIL import Image
    with Image.open(out_png) as im:  # a real PNG with four panels' worth of width, not blank
        assert im.format == "PNG" and im.width > 2 * im.height and len(im.convert("L").getcolors(1 << 16)) > 10

    with pytest.raises(SystemExit, match="train.export"):
        main(["--model", str(tmp_path / "nowhere")])
