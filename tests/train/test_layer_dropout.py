"""Layer dropout: the paper's rates, deterministic decisions, per-rank balance and layout
invariance, and that subset compute equals the masked definition in values and gradients."""
import inspect

import pytest
import torch

from train.config import DropoutConfig
from train.layerskip.dropout import LayerDropout, layer_rates, time_scale
from train.model import build_model, init_model


def test_mean_rates_match_the_paper():
    for L, p_max, mean in ((32, 0.1, 0.0445), (16, 0.2, 0.0893)):
        rates = layer_rates(DropoutConfig(p_max=p_max), L, step=0, total_steps=100)
        assert sum(rates) / L == pytest.approx(mean, abs=5e-5)
        assert rates[0] == 0.0 and rates[-1] == pytest.approx(p_max)


def test_time_scale_and_explicit_rates():
    T = 401  # t / (T-1) = 0, 1/4, 1/2, 1
    assert [round(time_scale("exp", t, T), 2) for t in (0, 100, 200, 400)] == [0.0, 0.19, 0.41, 1.0]
    assert time_scale("linear", 200, T) == 0.5 and time_scale("constant", 0, T) == 1.0
    cfg = DropoutConfig(time="exp", rates=[0.5, 0.0, 0.2])
    assert layer_rates(cfg, 3, 200, T) == pytest.approx([0.5 * 2 ** 0.5 - 0.5, 0.0, 0.2 * (2 ** 0.5 - 1)])
    # Degenerate sizes: no division by zero; the only layer / step is the last one.
    assert layer_rates(DropoutConfig(p_max=0.3, time="exp"), 1, 0, 1) == [pytest.approx(0.3)]


def test_decisions_are_a_pure_function_of_seed_step_micro():
    cfg = DropoutConfig(p_max=0.5, depth="uniform")
    a = LayerDropout(cfg, 6, 100, seed=7).dropped_mask(3, 1, 16)
    assert torch.equal(a, LayerDropout(cfg, 6, 100, seed=7).dropped_mask(3, 1, 16))
    for other in (LayerDropout(cfg, 6, 100, seed=8).dropped_mask(3, 1, 16),
                  LayerDropout(cfg, 6, 100, seed=7).dropped_mask(4, 1, 16),
                  LayerDropout(cfg, 6, 100, seed=7).dropped_mask(3, 0, 16)):
        assert not torch.equal(a, other)
    # Tensor-parallel ranks must decide identically: the TP rank is not an input at all.
    assert not any("tp" in name for name in inspect.signature(LayerDropout).parameters)


def test_balanced_mode_drops_the_same_count_on_every_dp_rank():
    cfg = DropoutConfig(p_max=0.5, depth="uniform", mode="balanced")
    for step in range(20):
        masks = [LayerDropout(cfg, 8, 100, seed=1, dp_rank=r, dp_degree=4).dropped_mask(step, 0, 8)
                 for r in range(4)]
        counts = [m.sum(dim=1) for m in masks]
        assert all(torch.equal(counts[0], c) for c in counts[1:])
    assert not torch.equal(masks[0], masks[1])  # which samples differs per rank


def test_global_mode_is_independent_of_the_data_parallel_layout():
    cfg = DropoutConfig(p_max=0.6, depth="linear", mode="global")
    for step in range(5):
        whole = LayerDropout(cfg, 6, 50, seed=3).dropped_mask(step, 2, 8)
        halves = [LayerDropout(cfg, 6, 50, seed=3, dp_rank=r, dp_degree=2).dropped_mask(step, 2, 4)
                  for r in range(2)]
        assert torch.equal(whole, torch.cat(halves, dim=1))


@pytest.mark.parametrize("mode", ["balanced", "global"])
def test_realised_rate_matches_p(mode):
    cfg = DropoutConfig(p_max=0.4, depth="linear", mode=mode)
    drop = LayerDropout(cfg, 5, 1000, seed=0, dp_rank=1, dp_degree=2)
    frac = torch.stack([drop.dropped_mask(t, 0, 8).double().mean(dim=1) for t in range(600)]).mean(dim=0)
    assert frac.tolist() == pytest.approx(drop.rates(0), abs=0.02)  # 4800 draws per layer: sd <= 0.007


def test_plan_indices_fractions_and_state():
    cfg = DropoutConfig(p_max=0.7, depth="linear")
    drop = LayerDropout(cfg, 4, 10, seed=5)
    for step in range(10):
        plan = drop.plan(step, 0, 6)
        mask = drop.dropped_mask(step, 0, 6)
        assert plan.keep[0] is None  # rate 0 at the first layer: block runs on all samples
        for l, keep in enumerate(plan.keep):
            kept = (~mask[l]).nonzero().flatten()
            if keep is None:
                assert len(kept) == 6
            else:
                assert keep.dtype == torch.long and torch.equal(keep, kept)
            assert plan.kept_fraction[l] == len(kept) / 6
        assert plan.saved_fraction == pytest.approx(mask.double().mean().item())
    drop.load_state_dict(drop.state_dict())
    with pytest.raises(ValueError, match="seed"):
        LayerDropout(cfg, 4, 10, seed=6).load_state_dict(drop.state_dict())


def test_subset_compute_equals_masked_reference(tiny_model_cfg):
    """model(keep=...) runs each block on the kept samples only; by definition that is
    h <- where(kept, block(h), h) over the full batch. Outputs and every gradient must agree."""
    torch.manual_seed(0)
    model = init_model(build_model(tiny_model_cfg), "cpu", seed=0)
    B, L = 5, tiny_model_cfg.n_layers
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (B, 16))
    plan = LayerDropout(DropoutConfig(p_max=0.8, depth="uniform"), L, 10, seed=2).plan(1, 0, B)
    keep = list(plan.keep)
    keep[1] = torch.tensor([], dtype=torch.long)  # every sample dropped (block still runs, times 0)
    keep[2] = torch.tensor([4, 0, 2])
    assert any(k is not None and 0 < len(k) < B for k in keep)

    out = model(tokens, keep=keep)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    h = model.tok_embeddings(tokens)
    for l in range(L):
        mask = torch.ones(B, dtype=torch.bool)
        if keep[l] is not None:
            mask = torch.zeros(B, dtype=torch.bool).index_fill_(0, keep[l], True)
        full = model.layers[str(l)](h, model.freqs_cis, attention_masks=None)
        h = torch.where(mask[:, None, None], full, h)
    ref = model.unembed(h)
    ref.square().mean().backward()

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert grads["layers.1.attention.wq.weight"].abs().max() == 0  # fully dropped block: no gradient
