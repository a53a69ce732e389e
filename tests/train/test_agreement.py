"""Validation of exits (val/loss/exit_EE, val/agree/exit_EE, E = blocks run): the chunked one-pass
loss and top-1 comparison == a direct computation on full logits; eval.at_exits picks the exits."""
from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
import torch.nn.functional as F

from train.config import ConfigError
from train.layerskip.agreement import exit_scores
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
def test_chunked_scores_equal_direct_computation():
    model = random_model(CFG)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (3, 20), generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (3, 20), generator=gen)
    labels[0, :5] = -100  # ignored positions count for agreement, not for the loss
    want = _direct(model, tokens)
    _, all_hidden = model(tokens, capture=range(CFG.n_layers))
    want_loss = {l: F.cross_entropy(model.unembed(h).flatten(0, 1), labels.flatten(), reduction="sum").item()
                 for l, h in all_hidden.items()}
    h_last, hidden = model(tokens, capture=range(CFG.n_layers - 1))
    for chunk in (7, 4096):  # uneven chunks of the tokens; one chunk
        got = exit_scores(model, h_last, hidden, labels, chunk_tokens=chunk)
        assert int(got.tokens) == tokens.numel() and int(got.valid) == tokens.numel() - 5
        assert {l: int(c) / tokens.numel() for l, c in got.agree.items()} == pytest.approx(want, abs=0)
        assert {l: float(v) for l, v in got.loss_sum.items()} == pytest.approx(want_loss, rel=1e-5)
    assert want[CFG.n_layers - 1] == 1.0
    assert any(0 < want[l] < 1 for l in range(CFG.n_layers - 1))  # the exits really differ


def test_validation_logs_agreement_of_every_exit():
    """The trainer's validation (one process): val/agree/exit_EE over several batches equals the
    direct computation over the same batches (exit E is the output of block E - 1), and is 1.0 for
    the full model E = L."""
    from train.validation import evaluate
    model = random_model(CFG)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, CFG.vocab_size, (2, 16), generator=gen),) * 2 for _ in range(3)]
    L = CFG.n_layers
    vals = evaluate(model, batches, list(range(1, L + 1)), chunk_tokens=5, tp=1, dp_group=None)
    direct = [_direct(model, inputs) for inputs, _ in batches]
    for e in range(1, L + 1):
        assert vals[f"val/agree/exit_{e:02d}"] == pytest.approx(sum(d[e - 1] for d in direct) / len(direct), abs=1e-12)
    assert vals[f"val/agree/exit_{L:02d}"] == 1.0
    only_final = evaluate(model, batches, [], chunk_tokens=5, tp=1, dp_group=None)
    assert not [k for k in only_final if k.startswith("val/agree/")]
    assert only_final["val/loss/final"] == vals["val/loss/final"] == vals[f"val/loss/exit_{L:02d}"]
    some = evaluate(model, batches, [1, 3], chunk_tokens=5, tp=1, dp_group=None)  # + the full model
    assert sorted(k for k in some if k.startswith("val/loss/exit_")) == [
        "val/loss/exit_01", "val/loss/exit_03", "val/loss/exit_04"]
    for k, v in some.items():
        assert v == pytest.approx(vals[k], rel=1e-6), k


def test_eval_at_exits_setting():
    """eval.at_exits takes layerskip.exit.exits' form (exits E = blocks run, 1..L); the full model
    E = L is always validated."""
    from tests._launch import compose_config
    base = ["model=tiny", "model.n_layers=8"]
    assert compose_config(base).eval.exit_list(8) == list(range(1, 9))
    assert compose_config([*base, "eval.at_exits=4::4"]).eval.exit_list(8) == [4, 8]
    assert compose_config([*base, "eval.at_exits=::3"]).eval.exit_list(8) == [3, 6, 8]  # 0 runs no block
    assert compose_config([*base, "eval.at_exits=[1,-2]"]).eval.exit_list(8) == [1, 7, 8]
    assert compose_config([*base, "eval.at_exits=[]"]).eval.exit_list(8) == [8]
    assert compose_config([*base, "eval.at_exits=1::4", "eval.per_layer=false"]).eval.exit_list(8) == [8]
    for bad in ("[9]", "0"):  # exit 0 would run no block
        with pytest.raises(ConfigError, match=r"eval\.at_exits: exit (9|0) is out of range: exits count blocks run, "
                                              r"1\.\.8"):
            compose_config([*base, f"eval.at_exits={bad}"])
    with pytest.raises(ConfigError, match=r"eval\.at_exits: 'a:b' is not a slice string"):
        compose_config([*base, "eval.at_exits=a:b"])


def _tp_worker(rank: int, world: int, state_dict: dict, batches: list) -> dict:
    from parallel.dims import ParallelDims
    from parallel.parallelize import load_full_state_dict, parallelize
    from train.config import ParallelConfig
    from train.model import build_model, init_model
    from train.validation import evaluate
    pcfg = ParallelConfig(dp_shard=1, tp=2)
    dims = ParallelDims.from_config(pcfg, world)
    dims.build_mesh("cpu")
    model = parallelize(build_model(CFG), dims, pcfg, param_dtype=torch.float32, reduce_dtype=torch.float32)
    init_model(model, "cpu", 0)
    load_full_state_dict(model, state_dict if rank == 0 else None)
    return evaluate(model, batches, list(range(1, CFG.n_layers + 1)), chunk_tokens=5, tp=2,
                    dp_group=dims.dp_mesh.get_group())


def test_validation_under_tensor_parallel_equals_one_process():
    """The sharded path (vocabulary-sharded logits, gathered sequence) gives one process's losses
    and agreements."""
    from tests.parallel._mp import run_distributed
    from train.validation import evaluate
    model = random_model(CFG)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, CFG.vocab_size, (2, 16), generator=gen),
                torch.randint(0, CFG.vocab_size, (2, 16), generator=gen)) for _ in range(2)]
    want = evaluate(model, batches, list(range(1, CFG.n_layers + 1)), chunk_tokens=5, tp=1, dp_group=None)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for got in run_distributed(_tp_worker, 2, args=(sd, batches), timeout_s=120):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
