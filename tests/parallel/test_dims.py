"""Mesh layout: settings that cannot work fail early with the offending number named, and the
mesh puts TP groups on neighbouring ranks."""
from __future__ import annotations

import pytest

from parallel.dims import ParallelDims, ffn_hidden_dim
from tests.parallel._mp import run_distributed
from train.config import ConfigError, ModelConfig

TINY = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                   max_seq_len=64)


def test_dp_shard_resolves_to_the_rest_of_the_world() -> None:
    assert ParallelDims(dp_shard=-1, tp=2, world_size=8).dp_shard == 4
    assert ParallelDims(dp_shard=-1, tp=1, world_size=1).dp_shard == 1
    hsdp = ParallelDims(dp_shard=-1, tp=2, world_size=16, dp_replicate=2)
    assert (hsdp.dp_shard, hsdp.dp_world) == (4, 8)


@pytest.mark.parametrize("dp_shard,tp,world,replicate,message", [
    (-1, 2, 3, 1, "parallel.tp=2 does not divide the world size 3"),
    (2, 2, 8, 1, "parallel.dp_shard=2 x parallel.tp=2 = 4, but the world size is 8"),
    (0, 1, 1, 1, "parallel.dp_shard must be >= 1 or -1"),
    (-1, 2, 6, 2, "parallel.dp_replicate=2 x parallel.tp=2 = 4 does not divide the world size 6"),
    (1, 1, 4, 2, r"parallel.dp_replicate=2 x parallel.dp_shard=1 x parallel.tp=1 = 2, but the world size is 4"),
    (1, 1, 4, 0, "parallel.dp_replicate must be >= 1"),
])
def test_layout_must_fill_the_world(dp_shard: int, tp: int, world: int, replicate: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelDims(dp_shard=dp_shard, tp=tp, world_size=world, dp_replicate=replicate)


def test_ffn_width_is_torchtitans() -> None:
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert ffn_hidden_dim(64, 16, None) == 176  # the tiny test model


@pytest.mark.parametrize("changes,message", [
    (dict(dim=96, n_heads=3, n_kv_heads=3), "parallel.tp=2 does not divide model.n_heads=3"),
    (dict(n_kv_heads=1), "parallel.tp=2 does not divide model.n_kv_heads=1"),
    (dict(vocab_size=255), "parallel.tp=2 does not divide model.vocab_size=255"),
    (dict(dim=44, n_heads=2, n_kv_heads=2, multiple_of=1), "parallel.tp=2 does not divide the FFN hidden width=117"),
])
def test_tp_must_divide_the_model(changes: dict, message: str) -> None:
    cfg = ModelConfig(**{**TINY.__dict__, **changes})
    with pytest.raises(ConfigError, match=message):
        ParallelDims(dp_shard=1, tp=2, world_size=2).check_model(cfg)
    ParallelDims(dp_shard=2, tp=1, world_size=2).check_model(cfg)  # no TP: nothing to split


def test_tp_must_divide_heads_and_sequence() -> None:
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide model.n_heads=8"):
        ParallelDims(dp_shard=1, tp=3, world_size=3).check_model(ModelConfig(dim=96, n_heads=8, n_kv_heads=8))
    with pytest.raises(ConfigError, match="parallel.tp=2 does not divide data.seq_len=15"):
        ParallelDims(dp_shard=1, tp=2, world_size=2).check_model(TINY, seq_len=15)


def _mesh_worker(rank: int, world: int) -> list[tuple]:
    out = []
    for replicate, tp in ((1, 2), (2, 1), (2, 2)):
        dims = ParallelDims(dp_shard=-1, tp=tp, world_size=world, dp_replicate=replicate)
        dims.build_mesh("cpu")
        out.append((dims.dp_rank, dims.dp_world, dims.tp_rank, dims.dp_mesh.size(), dims.fsdp_mesh.ndim))
    return out


def test_mesh_puts_tp_innermost_and_replicas_outermost() -> None:
    by_rank = run_distributed(_mesh_worker, 4, timeout_s=90)
    tp2, replicate2, replicate2_tp2 = zip(*by_rank)
    # TP 2: ranks 0,1 form TP group 0 (data rank 0), ranks 2,3 TP group 1 (data rank 1)
    assert tp2 == ((0, 2, 0, 2, 1), (0, 2, 1, 2, 1), (1, 2, 0, 2, 1), (1, 2, 1, 2, 1))
    # 2 replicas x 2 shards (HSDP): every rank its own data, in rank order; FSDP2 gets a 2-D mesh
    assert replicate2 == ((0, 4, 0, 4, 2), (1, 4, 0, 4, 2), (2, 4, 0, 4, 2), (3, 4, 0, 4, 2))
    # 2 replicas x TP 2 (no sharding): the TP pairs see the data of their replica
    assert replicate2_tp2 == ((0, 2, 0, 2, 2), (0, 2, 1, 2, 2), (1, 2, 0, 2, 2), (1, 2, 1, 2, 2))
