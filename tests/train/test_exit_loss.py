"""The chunked early-exit loss equals the naive full-logits loss (values and every gradient), trains
the true final output, keeps at most one chunk of logits alive, and lines labels up with the
sequence-parallel layout under tensor parallelism."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from train.layerskip.exit_loss import make_exit_loss

IMPLS = ["fused", "checkpoint"]


def _model(cfg, n_layers=None, vocab=None):
    from dataclasses import replace

    from train.model import build_model, init_model
    cfg = replace(cfg, n_layers=n_layers or cfg.n_layers, vocab_size=vocab or cfg.vocab_size)
    return init_model(build_model(cfg, "cpu"), "cpu", seed=0)


def _data(vocab, batch=3, seq=16):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :5] = -100  # ignored positions
    labels[2, 7] = -100
    return tokens, labels


def _reference_loss(model, tokens, labels, weights):
    """Naive: run the blocks by hand, take exit l after block l (l + 1 blocks), full logits."""
    h = model.tok_embeddings(tokens)
    per_layer = {}
    for l in range(model.n_layers):
        h = model.layers[str(l)](h, model.freqs_cis, attention_masks=None)
        if l in weights:
            per_layer[l] = F.cross_entropy(model.unembed(h).flatten(0, 1), labels.flatten(), ignore_index=-100)
    return sum(weights[l] * per_layer[l] for l in weights), per_layer


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_loss_equals_full_logits_loss(tiny_model_cfg, impl):
    model = _model(tiny_model_cfg)
    tokens, labels = _data(tiny_model_cfg.vocab_size)
    weights = {0: 0.1, 1: 0.0, 2: 0.3, 3: 0.6}  # exit 1 has weight 0: logged, no gradient

    ref_total, ref_layers = _reference_loss(model, tokens, labels, weights)
    (ref_total / 3).backward()  # as with gradient accumulation: the incoming gradient is not 1
    ref = _grads(model)

    out = model(tokens, capture=[0, 1, 2], loss_fn=make_exit_loss(labels, weights, chunk_tokens=7, impl=impl))
    (out.loss / 3).backward()
    got = _grads(model)

    torch.testing.assert_close(out.loss, ref_total.detach())
    for l in weights:
        torch.testing.assert_close(out.per_layer[l], ref_layers[l].detach())
        assert not out.per_layer[l].requires_grad
    assert got.keys() == ref.keys()
    for n in ref:  # output.weight, norm.weight, every block, the embedding
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7, msg=n)

    with torch.no_grad():  # evaluation takes the forward-only path
        ev = model(tokens, capture=[0, 1, 2], loss_fn=make_exit_loss(labels, weights, 7, impl=impl))
    torch.testing.assert_close(ev.loss, out.loss.detach())


def test_fused_loss_in_bfloat16_tracks_fp32(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    tokens, labels = _data(tiny_model_cfg.vocab_size)
    weights = {1: 0.4, 3: 0.6}
    fn = make_exit_loss(labels, weights, 10, impl="fused")
    ref = model(tokens, capture=[1], loss_fn=fn)
    ref.loss.backward()
    ref_grads = _grads(model)
    for p in model.parameters():  # not model.to(): that would cast the complex RoPE buffer to real
        p.data = p.data.to(torch.bfloat16)
    out = model(tokens, capture=[1], loss_fn=fn)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=2e-2, atol=0)
    for n in ("output.weight", "norm.weight", "layers.3.feed_forward.w2.weight"):
        g, r = model.get_parameter(n).grad.float(), ref_grads[n]
        assert (g - r).norm() < 0.05 * r.norm(), n


def test_final_block_is_trained_when_exits_are_on(tiny_model_cfg):
    """A public recipe captured hidden states *before* each block, so with exits on the last
    block's output never reached the loss. Here the last exit is the model's own output."""
    model = _model(tiny_model_cfg)
    tokens, labels = _data(tiny_model_cfg.vocab_size)
    out = model(tokens, capture=[0, 1], loss_fn=make_exit_loss(labels, {0: 0.2, 1: 0.3, 3: 0.5}, 16))
    out.loss.backward()
    for p in model.layers["3"].parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    with torch.no_grad():
        plain = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.per_layer[3], plain)


def _peak_allocated_bytes(fn) -> int:
    """Peak of bytes allocated on the CPU while `fn` runs, from the profiler's allocation events
    (allocations attributed to each op, frees as [memory] events), replayed in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("impl", IMPLS)
def test_at_most_one_chunk_of_logits_is_alive(tiny_model_cfg, impl):
    n_layers, vocab, chunk, batch, seq, dim = 5, 4096, 64, 2, 256, 32
    from dataclasses import replace
    model = _model(replace(tiny_model_cfg, dim=dim), n_layers=n_layers, vocab=vocab)
    labels = torch.randint(0, vocab, (batch, seq))
    hidden = {l: torch.randn(batch, seq, dim, requires_grad=True) for l in range(n_layers)}
    weights = {l: 1.0 / n_layers for l in range(n_layers)}  # 5 exits, all with gradient
    loss_fn = make_exit_loss(labels, weights, chunk, impl=impl)
    h_last, captured = hidden[n_layers - 1], {l: h for l, h in hidden.items() if l < n_layers - 1}

    def chunked():
        loss_fn(model, h_last, captured).loss.backward()

    def naive():
        sum(w * F.cross_entropy(model.unembed(hidden[l]).flatten(0, 1), labels.flatten())
            for l, w in weights.items()).backward()

    one_exit_logits = batch * seq * vocab * 4
    one_chunk = chunk * vocab * 4
    # Small things besides logits: hidden-state-sized tensors per exit and head-sized gradients.
    other = 4 * n_layers * batch * seq * dim * 4 + 3 * vocab * dim * 4
    assert _peak_allocated_bytes(naive) > n_layers * one_exit_logits  # the meter sees logits
    model.zero_grad(set_to_none=True)
    peak = _peak_allocated_bytes(chunked)
    assert peak < 3 * one_chunk + other, (peak, one_chunk, other)
    assert 3 * one_chunk + other < one_exit_logits  # the bound is tight enough to mean something


def test_missing_capture_is_reported(tiny_model_cfg):
    model = _model(tiny_model_cfg)
    tokens, labels = _data(tiny_model_cfg.vocab_size)
    with pytest.raises(ValueError, match=r"capture=\[1, 2\]"):
        model(tokens, capture=[1], loss_fn=make_exit_loss(labels, {1: 0.2, 2: 0.2, 3: 0.6}, 16))


# ----------------------------------------------------------------- tensor parallel (2 gloo ranks)

def _tp_worker(rank: int, world_size: int, cfg) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel
    from torchtitan.models.llama3.infra.parallelize import apply_tp

    from train.model import build_model

    reference = _model(cfg)
    mesh = init_device_mesh("cpu", (world_size,))
    model = build_model(cfg, "meta")
    apply_tp(model, mesh, loss_parallel=True, enable_float8_tensorwise_tp=False)
    model.to_empty(device="cpu")
    full = reference.state_dict()
    with torch.no_grad():  # the reference's weights, sharded (DTensor init is not layout-invariant on CPU)
        for name, p in model.named_parameters():
            p.to_local().copy_(distribute_tensor(full[name], mesh, p.placements).to_local())
        model.freqs_cis.copy_(reference.freqs_cis)
    tokens, labels = _data(cfg.vocab_size, batch=3, seq=16)
    weights = {1: 0.4, 3: 0.6}
    # chunk_tokens 7 -> one local position per chunk: the chunk order really matters.
    with loss_parallel():
        out = model(tokens, capture=[1], loss_fn=make_exit_loss(labels, weights, 7, tp_degree=world_size))
        out.loss.backward()
    assert isinstance(model.output.weight, DTensor)
    return {"loss": out.loss.detach(), "per_layer": out.per_layer,
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()}}


def test_tensor_parallel_loss_matches_single_process(tiny_model_cfg):
    from tests.parallel._mp import run_distributed

    model = _model(tiny_model_cfg)
    tokens, labels = _data(tiny_model_cfg.vocab_size, batch=3, seq=16)
    weights = {1: 0.4, 3: 0.6}
    ref_total, ref_layers = _reference_loss(model, tokens, labels, weights)
    ref_total.backward()
    ref = _grads(model)
    for res in run_distributed(_tp_worker, world_size=2, args=(tiny_model_cfg,), timeout_s=180):
        torch.testing.assert_close(res["loss"], ref_total.detach())
        for l in weights:
            torch.testing.assert_close(res["per_layer"][l], ref_layers[l].detach())
        for n in ref:
            torch.testing.assert_close(res["grads"][n], ref[n], rtol=1e-4, atol=1e-7, msg=n)
