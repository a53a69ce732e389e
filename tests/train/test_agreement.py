"""Exit agreement (val/agree/layer_XX): chunked top-1 comparison == a direct computation."""
from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
from train.layerskip.agreement import exit_agreement
from tests.train._models import one_thread, random_model  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)


def _direct(model, tokens: torch.Tensor) -> dict[int, float]:
    """Full logits of every exit at once (fine for a tiny model): share of tokens whose argmax
    equals the final layer's."""
    _, hidden = model(tokens, capture=range(CFG.n_layers))
    final = model(tokens).argmax(-1)
    return {l: (model.unembed(hidden[l]).argmax(-1) == final).double().mean().item() for l in range(CFG.n_layers)}


@torch.no_grad()
def test_chunked_agreement_equals_direct_computation():
    model = random_model(CFG)
    tokens = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    want = _direct(model, tokens)
    h_last, hidden = model(tokens, capture=range(CFG.n_layers - 1))
    for chunk in (7, 4096):  # uneven chunks of the sequence; one chunk
        counts, total = exit_agreement(model, h_last, hidden, chunk_tokens=chunk)
        assert int(total) == tokens.numel()
        assert {l: int(c) / tokens.numel() for l, c in counts.items()} == pytest.approx(want, abs=0)
    assert want[CFG.n_layers - 1] == 1.0
    assert any(0 < want[l] < 1 for l in range(CFG.n_layers - 1))  # the exits really differ


def test_validation_logs_agreement_of_every_exit():
    """The trainer's validation (one process): val/agree/layer_XX over several batches equals the
    direct computation over the same batches, and is 1.0 for the last layer."""
    from train.validation import evaluate
    model = random_model(CFG)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, CFG.vocab_size, (2, 16), generator=gen),) * 2 for _ in range(3)]
    vals = evaluate(model, batches, CFG.n_layers, per_layer=True, chunk_tokens=5, tp=1, dp_group=None)
    direct = [_direct(model, inputs) for inputs, _ in batches]
    for l in range(CFG.n_layers):
        assert vals[f"val/agree/layer_{l:02d}"] == pytest.approx(sum(d[l] for d in direct) / len(direct), abs=1e-12)
    assert vals[f"val/agree/layer_{CFG.n_layers - 1:02d}"] == 1.0
    only_final = evaluate(model, batches, CFG.n_layers, per_layer=False, chunk_tokens=5, tp=1, dp_group=None)
    assert not [k for k in only_final if k.startswith("val/agree/")]
