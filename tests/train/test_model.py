"""The model is torchtitan's Llama unchanged, and exits are exactly 'block l's output through the
final norm and head'."""
import torch
from torchtitan.models.llama3 import Transformer

from train.model import build_model, flops_per_token, init_model, model_args


def _pair(cfg):
    ours = init_model(build_model(cfg), "cpu", seed=0)
    ref = Transformer(model_args(cfg))
    ref.load_state_dict(ours.state_dict())
    ref.init_weights  # same buffers (freqs_cis) are recomputed in the constructor
    return ours, ref


def test_full_forward_equals_torchtitan(tiny_model_cfg):
    ours, ref = _pair(tiny_model_cfg)
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (3, 16))
    torch.testing.assert_close(ours(tokens), ref(tokens), rtol=0, atol=0)
    assert ours(tokens).shape == (3, 16, tiny_model_cfg.vocab_size)


def test_exit_at_layer_l_is_output_of_block_l(tiny_model_cfg):
    ours, ref = _pair(tiny_model_cfg)
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (2, 16))
    h_last, hidden = ours(tokens, capture=[0, 2])
    assert sorted(hidden) == [0, 2]
    # reference: run the first E = l + 1 blocks by hand, then torchtitan's norm + head
    h = ref.tok_embeddings(tokens)
    for l, block in enumerate(ref.layers.values()):
        h = block(h, ref.freqs_cis, attention_masks=None)
        if l in hidden:
            torch.testing.assert_close(ours.unembed(hidden[l]), ref.output(ref.norm(h)))
    torch.testing.assert_close(ours.unembed(h_last), ref(tokens))


def test_keep_subsets_pass_dropped_samples_through(tiny_model_cfg):
    ours, _ = _pair(tiny_model_cfg)
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (4, 8))
    L = tiny_model_cfg.n_layers
    # block 1 keeps samples {0, 3}; block 2 keeps nothing; others keep all
    keep = [None, torch.tensor([0, 3]), torch.tensor([], dtype=torch.long), None]
    _, hidden = ours(tokens, keep=keep, capture=range(L))
    h0 = hidden[0]
    full1 = ours.layers["1"](h0, ours.freqs_cis, attention_masks=None)
    expect1 = h0.clone()
    expect1[[0, 3]] = full1[[0, 3]]
    torch.testing.assert_close(hidden[1], expect1)
    torch.testing.assert_close(hidden[2], hidden[1])  # all dropped: identity


def test_meta_init_is_seeded(tiny_model_cfg):
    a = init_model(build_model(tiny_model_cfg), "cpu", seed=3)
    b = init_model(build_model(tiny_model_cfg), "cpu", seed=3)
    c = init_model(build_model(tiny_model_cfg), "cpu", seed=4)
    for (k, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), k
    assert not torch.equal(a.output.weight, c.output.weight)


def test_flops_split(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    n, total, per_block = flops_per_token(tiny_model_cfg, model, 32)
    head = 6 * tiny_model_cfg.dim * tiny_model_cfg.vocab_size
    assert abs(per_block * tiny_model_cfg.n_layers + head - total) < 1e-3 * total
    assert n == sum(p.numel() for p in model.parameters())
