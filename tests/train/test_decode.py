"""KV-cache inference, self-speculative decoding (== greedy; sampled: the full model's
distribution), batches, and the decode CLI end to end."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from train.config import ModelConfig
from train.inference import CachedLlama, Sampling, greedy_generate, self_speculative_generate
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


def test_batches_decode_every_row_as_batch_one():
    """Eight prompts of different lengths decoded together (rows accept different numbers of drafts
    and finish at different times) give, row by row, plain greedy decoding's output at batch 1."""
    model = random_model(CFG, seed=2)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in (1, 5, 9, 3, 12, 7, 2, 6)]
    alone = [greedy_generate(model, p, 24) for p in prompts]
    eos = alone[3].tokens[6]  # stops some rows early
    alone_eos = [greedy_generate(model, p, 24, eos_id=eos) for p in prompts]
    assert len({len(g.tokens) for g in alone_eos}) > 1
    assert [g.tokens for g in greedy_generate(model, prompts, 24)] == [g.tokens for g in alone]
    for E, d in ((1, 3), (2, 5)):
        spec = self_speculative_generate(model, prompts, 24, E, d)
        assert [g.tokens for g in spec] == [g.tokens for g in alone], (E, d)
        assert len({tuple(g.rounds) for g in spec}) > 1  # the rows really accepted differently
        spec_eos = self_speculative_generate(model, prompts, 24, E, d, eos_id=eos)
        assert [g.tokens for g in spec_eos] == [g.tokens for g in alone_eos], (E, d)


@torch.no_grad()
def test_bfloat16_batches_greedy_and_sampled():
    """The engine in bfloat16 (as on a GPU; `--dtype bfloat16`). bfloat16 rounds differently in a
    batch, a chunk or one token at a time, so near-ties may resolve differently from plain greedy
    decoding; every token of a self-speculative batch must still be the full model's argmax up to
    bfloat16 rounding, given the tokens before it. Sampling gives in-vocabulary tokens."""
    model = random_model(CFG, seed=4)
    freqs = model.freqs_cis
    model.freqs_cis = None  # Module.to(dtype) would cast the complex RoPE table to real
    model.to(torch.bfloat16)
    model.freqs_cis = freqs
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=gen).tolist() for n in (3, 8, 5, 1)]
    spec = self_speculative_generate(model, prompts, 16, 2, 3)
    for prompt, g in zip(prompts, spec):
        assert len(g.tokens) == 16
        logits = model(torch.tensor([prompt + g.tokens]))[0, len(prompt) - 1:-1].float()
        chosen = logits.gather(-1, torch.tensor(g.tokens)[:, None]).squeeze(-1)
        best = logits.max(-1).values
        assert (chosen >= best - 0.02 * best.abs().clamp_min(1)).all(), (best - chosen).tolist()
    sampled = self_speculative_generate(model, prompts, 16, 2, 3, sampling=Sampling(1.0, top_p=0.9, seed=0))
    assert all(len(g.tokens) == 16 and all(0 <= t < CFG.vocab_size for t in g.tokens) for g in sampled)


SMALL_VOCAB = ModelConfig(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=8, multiple_of=32, max_seq_len=32)


@torch.no_grad()
def _exact_distribution(model, prompt: list[int], n: int, probs, blocks: int | None = None) -> torch.Tensor:
    """P(next n tokens = s) for every s in vocab^n (lexicographic order), sampling each token from
    `probs(logits)` of the first `blocks` blocks (None: the full model): every continuation at once."""
    V = model.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=n)))
    x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    if blocks is None:
        logits = model(x)
    else:
        logits = model.unembed(model(x, capture=[blocks - 1])[1][blocks - 1])
    p = probs(logits)[:, len(prompt) - 1:-1]  # the distribution of each of the n tokens
    return p.gather(-1, seqs[..., None]).squeeze(-1).prod(-1).double()


def _chi_square_p(samples: list[list[int]], expected: torch.Tensor, V: int) -> float:
    """p-value of Pearson's chi-square test of `samples` against `expected`, pooling the cells
    expected fewer than 5 times into one."""
    from scipy.stats import chi2
    n = len(samples[0])
    index = torch.tensor([sum(t * V ** (n - 1 - j) for j, t in enumerate(s)) for s in samples])
    observed = torch.bincount(index, minlength=V ** n).double()
    expected = expected * len(samples)
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(chi2.sf(((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1))


@pytest.mark.parametrize("sampling, exit_layer, draft_len", [
    (Sampling(temperature=1.0, seed=0), 1, 3),
    (Sampling(temperature=0.7, top_k=5, top_p=0.9, seed=1), 2, 2)], ids=["plain", "warped"])
def test_self_speculative_sampling_has_the_full_models_distribution(sampling, exit_layer, draft_len):
    """10,000 samples of the next four tokens (one batch of 10,000 rows): self-speculative
    sampling matches the full model's exact joint distribution (chi-square), and is told apart
    from the draft's own (exit E sampled alone), so the test can see a wrong acceptance rule."""
    pytest.importorskip("scipy")
    model = random_model(SMALL_VOCAB, seed=0)
    prompt, n, N = [1, 5, 3, 2], 4, 10_000
    runs = self_speculative_generate(model, [prompt] * N, n, exit_layer, draft_len, sampling=sampling)
    samples = [r.tokens for r in runs]
    accepted, drafted = sum(r.accepted for r in runs), sum(r.drafted for r in runs)
    assert 0.1 < accepted / drafted < 0.9  # real rejections and real acceptances
    full = _exact_distribution(model, prompt, n, sampling.probs)
    draft = _exact_distribution(model, prompt, n, sampling.probs, blocks=exit_layer)
    assert full.sum().item() == pytest.approx(1.0)
    assert _chi_square_p(samples, full, SMALL_VOCAB.vocab_size) > 1e-3
    assert _chi_square_p(samples, draft, SMALL_VOCAB.vocab_size) < 1e-6
    # The seed fixes every draw.
    twice = [[r.tokens for r in self_speculative_generate(model, [prompt] * 50, n, exit_layer, draft_len,
                                                           sampling=sampling)] for _ in range(2)]
    assert twice[0] == twice[1] and len({tuple(t) for t in twice[0]}) > 1


def test_sampling_warps_like_hugging_face():
    """Temperature, top-k and top-p keep the tokens Hugging Face's logits processors keep."""
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    s = Sampling(temperature=0.8, top_k=20, top_p=0.85)
    hf = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.85)])
    torch.testing.assert_close(s.probs(logits), hf(None, logits.clone()).softmax(-1))
    assert transformers is not None
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0)


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
