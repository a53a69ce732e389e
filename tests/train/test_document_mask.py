"""Document masking (model.attention=block_causal): a document packed among others computes what
it computes alone, at every exit, under per-sample layer dropout, in one process and under
FSDP2 x TP2.

"Alone" is the document as its own sequence through the plain causal model (what decoding and
the Hugging Face export run), with the same layer-dropout decisions as its packed row: block l
runs on it iff block l keeps that row. Windows hold whole documents, a document cut by the
window's end, and a window that opens inside a document (its tail, no BOS).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.parallel._mp import run_distributed
from train.config import ConfigError, ModelConfig
from train.document_mask import (IGNORE_INDEX, DocumentBoundaries, DocumentMask, block_mask, dense_mask,
                                 document_ids)
from train.model import build_model, init_model

# tp=2 divides heads 4, kv heads 2, the FFN width and SEQ; 4 layers so that exits differ.
CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                  max_seq_len=64, attention="block_causal")
BOS, EOS = 1, 2
DOCS = DocumentBoundaries(BOS, EOS)
SEQ, SEED = 32, 0
# Each window as (length, starts with BOS, ends with EOS) segments; every window sums to SEQ.
WINDOWS = [
    [(5, True, True), (12, True, True), (15, True, False)],  # the last document runs on
    [(32, True, True)],  # one document: the mask is plain causal
    [(6, False, True), (10, True, True), (16, True, True)],  # opens inside a document
    [(3, True, True), (13, True, True), (16, True, False)],
]
# Global rows each block runs on (None: all). With 2 data-parallel ranks (rows 0-1, 2-3): block 1
# keeps nothing on rank 0, block 3 keeps nothing anywhere.
KEEP = [None, [2, 3], [0, 1, 3], []]


def _windows() -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Token ids [4, SEQ] and the documents as (row, offset, length)."""
    g = torch.Generator().manual_seed(3)
    rows, docs = [], []
    for r, segments in enumerate(WINDOWS):
        row = []
        for n, bos, eos in segments:
            body = torch.randint(4, CFG.vocab_size, (n - bos - eos,), generator=g).tolist()
            docs.append((r, len(row), n))
            row += [BOS] * bos + body + [EOS] * eos
        assert len(row) == SEQ
        rows.append(row)
    return torch.tensor(rows), docs


def _keep(lo: int, hi: int) -> list[torch.Tensor | None]:
    return [None if k is None else torch.tensor([i - lo for i in k if lo <= i < hi], dtype=torch.long)
            for k in KEEP]


def _all_exit_logits(model, h_last, hidden) -> dict[int, torch.Tensor]:
    """A loss fn that returns every exit's logits (full, also when TP shards the vocabulary),
    computed inside the root forward as the exit losses are."""
    from torch.distributed.tensor import DTensor
    out = {}
    for l, h in hidden.items():
        logits = model.unembed(h)
        out[l] = (logits.full_tensor() if isinstance(logits, DTensor) else logits).detach()
    return out


def _alone_reference(state_dict: dict) -> tuple[dict, list]:
    """Every document's logits at every exit, computed alone by the causal model."""
    causal = build_model(ModelConfig(**{**CFG.__dict__, "attention": "causal"}), "cpu")
    causal.load_state_dict(state_dict)
    tokens, docs = _windows()
    alone = {}
    with torch.no_grad():
        for r, off, n in docs:
            keep = [None if k is None else torch.tensor([0] if r in k else [], dtype=torch.long) for k in KEEP]
            alone[(r, off)] = causal(tokens[r:r + 1, off:off + n], keep=keep, capture=range(CFG.n_layers),
                                     loss_fn=_all_exit_logits)
    return alone, docs


def _check_packed(packed: dict[int, torch.Tensor], alone: dict, docs: list, rows: range) -> None:
    """packed: {exit: logits [len(rows), SEQ, V]} of those global rows."""
    assert sorted(packed) == list(range(CFG.n_layers))
    for r, off, n in docs:
        if r not in rows:
            continue
        for l in range(CFG.n_layers):
            torch.testing.assert_close(packed[l][r - rows.start, off:off + n], alone[(r, off)][l][0],
                                       atol=2e-5, rtol=1e-4, msg=f"row {r} document at {off}, exit E={l + 1}")


@pytest.fixture(scope="module")
def weights() -> dict:
    return {k: v.clone() for k, v in init_model(build_model(CFG, "cpu"), "cpu", SEED).state_dict().items()}


@pytest.fixture(scope="module")
def alone(weights) -> tuple[dict, list]:
    return _alone_reference(weights)


def test_documents_start_at_a_bos_after_an_eos() -> None:
    tokens = torch.tensor([[7, 2, 1, 5, 2, 1, 1, 6, 2],  # a tail, then documents; a BOS inside one
                           [0, 5, 0, 0, 6, 6, 0, 0, 7]])  # BOS = EOS = 0 (GPT-2 style)
    assert document_ids(tokens[:1], 1, 2).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2, 2]]
    assert document_ids(tokens[1:], 0, 0).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2]]
    mask = dense_mask(document_ids(tokens[:1], 1, 2))[0, 0]
    assert mask[3].tolist() == [False, False, True, True] + [False] * 5  # own document, causal
    assert mask[8].tolist() == [False] * 5 + [True] * 4


def test_packed_document_equals_alone_at_every_exit_with_layer_dropout(weights, alone) -> None:
    model = build_model(CFG, "cpu", documents=DOCS)
    model.load_state_dict(weights)
    tokens, _ = _windows()
    with torch.no_grad():
        packed = model(tokens, keep=_keep(0, len(WINDOWS)), capture=range(CFG.n_layers), loss_fn=_all_exit_logits)
    _check_packed(packed, *alone, rows=range(len(WINDOWS)))
    # Without the mask, documents after the first of a window do see the ones before them.
    causal = build_model(ModelConfig(**{**CFG.__dict__, "attention": "causal"}), "cpu")
    causal.load_state_dict(weights)
    with torch.no_grad():
        mixed = causal(tokens, keep=_keep(0, len(WINDOWS)), capture=range(CFG.n_layers), loss_fn=_all_exit_logits)
    with pytest.raises(AssertionError, match="row 0 document at 5"):
        _check_packed(mixed, *alone, rows=range(len(WINDOWS)))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_block_mask_rows_match_the_dense_mask() -> None:
    """The FlexAttention form (GPU) of a subset of rows attends as the dense form (CPU) does; run
    with flex_attention's eager reference, as FlexAttention has no CPU backward to train with."""
    from torch.nn.attention.flex_attention import flex_attention
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 50, (4, 200), generator=g)  # two 128-token blocks a row
    for r, cut in ((0, 5), (0, 140), (1, 60), (3, 127)):
        tokens[r, cut - 1], tokens[r, cut] = EOS, BOS
    ids = document_ids(tokens, BOS, EOS)
    flex, dense = DocumentMask(ids, block_mask(ids, compiled=False)), DocumentMask(ids, dense_mask(ids))
    q, k, v = (torch.randn(4, h, 200, 16, generator=g) for h in (4, 2, 2))
    for keep in (None, torch.tensor([1, 3]), torch.tensor([3, 0]), torch.tensor([2])):
        qs, ks, vs = (x if keep is None else x[keep] for x in (q, k, v))
        got = flex_attention(qs, ks, vs, block_mask=flex.rows(keep), enable_gqa=True)
        want = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=dense.rows(keep), enable_gqa=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"rows {keep}")


def test_compiled_masked_blocks_match_eager(weights) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    from parallel.parallelize import apply_ac, apply_compile
    torch._dynamo.reset()
    eager = build_model(CFG, "cpu", documents=DOCS)
    eager.load_state_dict(weights)
    model = build_model(CFG, "cpu", documents=DOCS)
    model.load_state_dict(weights)
    apply_ac(model, "selective")
    counter = CompileCounterWithBackend("aot_eager")
    apply_compile(model, backend=counter)
    tokens, _ = _windows()
    targets = torch.randint(0, CFG.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for m in (model, eager):
        loss = F.cross_entropy(m(tokens, keep=_keep(0, len(WINDOWS))).flatten(0, 1), targets.flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append({n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): p.grad
                      for n, p in m.named_parameters()})
    assert counter.frame_count > 0
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-5, rtol=1e-4, msg=name)


def _fsdp_tp_worker(rank: int, world: int, state_dict: dict) -> dict:
    from parallel.dims import ParallelDims
    from parallel.parallelize import load_full_state_dict, parallelize
    from train.config import ParallelConfig

    pcfg = ParallelConfig(dp_shard=2, tp=2, ac="full")
    dims = ParallelDims.from_config(pcfg, world)
    dims.check_model(CFG, SEQ)
    dims.build_mesh("cpu")
    model = parallelize(build_model(CFG, documents=DOCS), dims, pcfg, param_dtype=torch.float32,
                        reduce_dtype=torch.float32)
    init_model(model, "cpu", SEED)
    load_full_state_dict(model, state_dict if rank == 0 else None)
    tokens, _ = _windows()
    rows = len(WINDOWS) // dims.dp_world
    lo, hi = dims.dp_rank * rows, (dims.dp_rank + 1) * rows
    with torch.no_grad():
        packed = model(tokens[lo:hi], keep=_keep(lo, hi), capture=range(CFG.n_layers), loss_fn=_all_exit_logits)
    return dict(lo=lo, hi=hi, packed=packed)


def test_packed_document_equals_alone_under_fsdp2_x_tp2(weights, alone) -> None:
    out = run_distributed(_fsdp_tp_worker, 4, args=(weights,), timeout_s=150)
    assert sorted((r["lo"], r["hi"]) for r in out) == [(0, 2), (0, 2), (2, 4), (2, 4)]
    for r in out:
        _check_packed(r["packed"], *alone, rows=range(r["lo"], r["hi"]))


def test_no_loss_across_documents() -> None:
    from types import SimpleNamespace

    from train.config import Config, DataConfig
    from train.trainer import targets
    inputs = torch.tensor([[5, 2, 1, 6, 7, 2]])
    labels = torch.tensor([[2, 1, 6, 7, 2, 1]])  # the window's last target is the next BOS too
    tok = SimpleNamespace(bos_id=BOS, eos_id=EOS)
    on = Config(data=DataConfig(loss_across_documents=True))
    off = Config(data=DataConfig(loss_across_documents=False))
    assert targets(on, tok, inputs, labels)[1].tolist() == labels.tolist()
    X = IGNORE_INDEX
    assert targets(off, tok, inputs, labels)[1].tolist() == [[2, X, 6, 7, 2, X]]


def test_attention_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="model.attention must be causal|block_causal"):
        ModelConfig(attention="document").validate()
