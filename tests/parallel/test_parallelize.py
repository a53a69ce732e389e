"""Parallel layouts compute what one process computes.

Reference: the tiny model in one process, fp32, on the whole batch. Each layout (FSDP 2, TP 2,
FSDP 2 x TP 2) runs one forward/backward with per-block `keep` subsets -- including a block that
keeps no sample on one data-parallel rank and a block that keeps none anywhere -- then clips the
gradient norm. Loss, gradient norm, each block's gradient norm (train/grad_norms.py) and every
clipped gradient must match the reference. A tied model (one matrix for embedding and head) does
the same under FSDP2 x TP2.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from parallel.dims import ParallelDims
from parallel.parallelize import apply_ac, apply_compile, canonical_name, wrapper_of
from tests.parallel._mp import run_distributed
from train.config import ModelConfig, ParallelConfig
from train.model import build_model, init_model

CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                  max_seq_len=64)
TIED = dataclasses.replace(CFG, tie_embeddings=True)
BATCH, SEQ, SEED = 8, 16, 0
# Global sample indices each block runs on. With 2 data-parallel ranks (rows 0-3 and 4-7),
# block 1 keeps nothing on rank 0 and block 3 keeps nothing anywhere.
KEEP = [None, [5, 6], [0, 2, 3, 7], []]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)
    return tokens, targets


def _keep(lo: int, hi: int) -> list[torch.Tensor | None]:
    """KEEP restricted to rows [lo, hi), as indices local to those rows."""
    return [None if k is None else torch.tensor([i - lo for i in k if lo <= i < hi], dtype=torch.long)
            for k in KEEP]


def _reference(max_norm_fraction: float, keep: bool, cfg: ModelConfig = CFG) -> dict:
    model = init_model(build_model(cfg, "cpu"), "cpu", SEED)
    tokens, targets = _data()
    logits = model(tokens, keep=_keep(0, BATCH) if keep else None)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    blocks = [float(torch.nn.utils.get_total_norm([p.grad for p in b.parameters()])) for b in model.layers.values()]
    max_norm = max_norm_fraction * norm
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return dict(loss=loss.item(), norm=norm, max_norm=max_norm, blocks=blocks,
                grads={n: p.grad.clone() for n, p in model.named_parameters()},
                state_dict={k: v.clone() for k, v in model.state_dict().items()})


def _step_worker(rank: int, world: int, pcfg: ParallelConfig, full_sd: dict, max_norm: float,
                 keep: bool, cfg: ModelConfig = CFG) -> dict:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel

    from parallel.distributed import all_reduce_mean, clip_grad_norm_
    from parallel.parallelize import load_full_state_dict, parallelize
    from train.grad_norms import block_grad_norms

    dims = ParallelDims.from_config(pcfg, world)
    dims.check_model(cfg, SEQ)
    dims.build_mesh("cpu")
    model = parallelize(build_model(cfg), dims, pcfg, param_dtype=torch.float32,
                        reduce_dtype=torch.float32, compile_backend="aot_eager")  # no C++ build
    init_model(model, "cpu", SEED)
    load_full_state_dict(model, full_sd if rank == 0 else None)

    tokens, targets = _data()
    rows = BATCH // dims.dp_world
    lo, hi = dims.dp_rank * rows, (dims.dp_rank + 1) * rows
    logits = model(tokens[lo:hi], keep=_keep(lo, hi) if keep else None)
    with loss_parallel():  # logits are vocabulary-sharded under TP; a no-op on plain tensors
        loss = F.cross_entropy(logits.flatten(0, 1), targets[lo:hi].flatten())
        loss.backward()
    local_loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
    mean_loss = all_reduce_mean({"loss": local_loss.item()}, dims.dp_mesh)["loss"]
    blocks = block_grad_norms(model)  # before clipping, as the trainer measures them
    norm = float(clip_grad_norm_(model.parameters(), max_norm))
    grads = {canonical_name(n): p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in model.named_parameters()}
    if cfg.tie_embeddings:  # one DTensor for both uses, in the root's FSDP unit
        from torch.distributed.fsdp import FSDPModule
        assert model.output.weight is model.tok_embeddings.weight
        assert not isinstance(model.tok_embeddings, FSDPModule)
    return dict(loss=mean_loss, norm=norm, blocks=blocks, grads=grads if rank == 0 else None, wrapper=wrapper_of(model))


@pytest.fixture(scope="module")
def reference() -> dict:
    return _reference(max_norm_fraction=0.5, keep=True)  # clipping is active


@pytest.fixture(scope="module")
def reference_no_dropout() -> dict:
    return _reference(max_norm_fraction=0.5, keep=False)


@pytest.mark.parametrize("world,pcfg,wrapper", [
    (2, ParallelConfig(dp_shard=2, tp=1, ac="none", reshard_after_forward=True), "fsdp"),
    (2, ParallelConfig(dp_shard=1, tp=2, ac="none"), "fsdp"),
    (4, ParallelConfig(dp_shard=-1, tp=2, ac="full", reshard_after_forward=False), "fsdp"),
    (2, ParallelConfig(dp_replicate=2, dp_shard=1, ac="none"), "ddp"),
    (4, ParallelConfig(dp_replicate=2, dp_shard=2, ac="selective"), "fsdp"),
    (4, ParallelConfig(dp_replicate=2, dp_shard=1, tp=2, ac="none"), "fsdp"),
], ids=["fsdp2", "tp2", "fsdp2xtp2-full-ac", "ddp2", "hsdp2x2", "replicate2xtp2"])
def test_layout_matches_single_process(reference: dict, world: int, pcfg: ParallelConfig, wrapper: str) -> None:
    """Including the block that keeps no sample anywhere: DDP's buckets must still complete."""
    out = run_distributed(_step_worker, world, timeout_s=150,
                          args=(pcfg, reference["state_dict"], reference["max_norm"], True))
    assert {r["wrapper"] for r in out} == {wrapper}
    _check(out, reference)


def test_tied_embeddings_under_fsdp_and_tp_match_single_process() -> None:
    """The shared matrix's gradient (embedding use + head use) is the one-process gradient."""
    ref = _reference(max_norm_fraction=0.5, keep=True, cfg=TIED)
    assert set(ref["grads"]) == set(ref["state_dict"]) and "output.weight" not in ref["grads"]
    pcfg = ParallelConfig(dp_shard=2, tp=2, ac="none")
    out = run_distributed(_step_worker, 4, timeout_s=150,
                          args=(pcfg, ref["state_dict"], ref["max_norm"], True, TIED))
    _check(out, ref)


def test_compiled_tp_matches_single_process(reference_no_dropout: dict) -> None:
    # Compiled blocks under TP once left the embedding without gradient (see apply_compile).
    # All samples kept: one graph per block keeps this test's compile time down.
    pcfg = ParallelConfig(dp_shard=1, tp=2, ac="selective", compile=True)
    ref = reference_no_dropout
    out = run_distributed(_step_worker, 2, timeout_s=150,
                          args=(pcfg, ref["state_dict"], ref["max_norm"], False))
    _check(out, ref)


def _check(out: list[dict], reference: dict) -> None:
    for r in out:  # every rank reports the same global numbers
        assert r["loss"] == pytest.approx(reference["loss"], abs=1e-5)
        assert r["norm"] == pytest.approx(reference["norm"], abs=1e-5)
        assert r["blocks"] == pytest.approx(reference["blocks"], abs=1e-5)
    grads = out[0]["grads"]
    assert set(grads) == set(reference["grads"])
    for name, g in reference["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def _loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    tokens, targets = _data()
    logits = model(tokens, keep=_keep(0, BATCH))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.item(), {canonical_name(n): p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_gradients() -> None:
    base_loss, base = _loss_and_grads(init_model(build_model(CFG, "cpu"), "cpu", SEED))
    for mode in ("selective", "full"):
        model = init_model(build_model(CFG, "cpu"), "cpu", SEED)
        apply_ac(model, mode)
        assert type(model.layers["0"]).__name__ == "CheckpointWrapper"
        loss, grads = _loss_and_grads(model)
        assert loss == base_loss
        assert set(grads) == set(base)
        for name, g in base.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=f"{mode}: {name}")


def test_compiled_blocks_do_not_recompile_per_kept_count() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = init_model(build_model(CFG, "cpu"), "cpu", SEED)
    model = init_model(build_model(CFG, "cpu"), "cpu", SEED)
    counter = CompileCounterWithBackend("aot_eager")
    apply_compile(model, backend=counter)
    tokens, _ = _data()

    def keep_count(n: int) -> list[torch.Tensor]:
        return [torch.arange(BATCH - n, BATCH) for _ in range(CFG.n_layers)]

    with torch.no_grad():
        model(tokens)  # all samples (a static batch of 8)
        model(tokens, keep=keep_count(4))  # first subset: the batch dimension becomes dynamic
        warm = counter.frame_count
        for n in (3, 5, 6, 7):
            torch.testing.assert_close(model(tokens, keep=keep_count(n)),
                                       eager(tokens, keep=keep_count(n)), atol=1e-5, rtol=1e-5)
    assert warm <= 3, f"{warm} graphs for two batch sizes"
    assert counter.frame_count == warm, "a new kept count recompiled the blocks"
    # Gradients through the compiled blocks match eager ones.
    loss, grads = _loss_and_grads(model)
    eager_loss, eager_grads = _loss_and_grads(eager)
    assert loss == pytest.approx(eager_loss, abs=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_full_ac_with_compile_and_tp_is_refused_early() -> None:
    from parallel.parallelize import parallelize
    from train.config import ConfigError

    dims = ParallelDims(dp_shard=1, tp=2, world_size=2)  # no mesh needed: refused before use
    with pytest.raises(ConfigError, match="parallel.ac=full cannot be compiled with parallel.tp > 1"):
        parallelize(build_model(CFG), dims, ParallelConfig(tp=2, ac="full", compile=True),
                    param_dtype=torch.float32, reduce_dtype=torch.float32)


def _single_rank_worker(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from parallel.parallelize import parallelize
    dims = ParallelDims.from_config(ParallelConfig(), world)
    dims.build_mesh("cpu")
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = parallelize(build_model(CFG), dims, ParallelConfig(), param_dtype=dtype, reduce_dtype=torch.float32)
        init_model(model, "cpu", SEED)
        tokens, _ = _data()
        out[name] = dict(fsdp=isinstance(model, FSDPModule), dtensor=any(isinstance(p, DTensor) for p in model.parameters()),
                         logits_dtype=str(model(tokens).dtype))
    return out


def test_one_process_in_fp32_is_a_plain_module() -> None:
    """FSDP2 on one rank in fp32 would only copy (parallel.parallelize.data_parallel_wrapper): the model
    stays plain; with mixed precision FSDP2 casts for compute, so it is applied."""
    (out,) = run_distributed(_single_rank_worker, 1, timeout_s=120)
    assert out["fp32"] == dict(fsdp=False, dtensor=False, logits_dtype="torch.float32")
    assert out["bf16"] == dict(fsdp=True, dtensor=True, logits_dtype="torch.bfloat16")
