"""The dry run (`python -m train parallel.dry_run=WORLD`): the real parallelize on a fake world.

- Every paper layout of docs/parallelism.md (bench/layout_table.py) completes in well under a minute and
  stores parameter count x 4 bytes / (dp_shard x tp) per rank; docs/parallelism.md shows its command.
- An impossible layout fails with the error a real launch gives, naming the setting.
- On a real 2-rank gloo run (FSDP 2 with an odd vocabulary, so the two shards differ; and TP 2),
  every rank's parameter, gradient and AdamW-state bytes equal the dry run's for that rank.
"""
from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.parallel._mp import run_distributed
from train.config import Config, ConfigError, ModelConfig, ParallelConfig

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("layout_table", ROOT / "bench" / "layout_table.py")
layout_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout_table)


@pytest.mark.parametrize("setting,gpus,overrides", layout_table.LAYOUTS, ids=[r[0] for r in layout_table.LAYOUTS])
def test_paper_layout(setting, gpus, overrides):
    cfg, report, seconds = layout_table.run_row(overrides)
    shards = report.dp_shard * report.tp
    assert report.world_size == cfg.parallel.dry_run == shards
    assert report.param_bytes_per_rank * shards == report.param_count * 4  # fp32 master weights
    assert report.grad_bytes_per_rank == report.param_bytes_per_rank
    assert report.fits, f"{setting}: {report.total_bytes_per_rank / 2**30:.1f} GiB per rank"
    assert seconds < 60
    assert f"`python -m train {overrides}`" in (ROOT / "docs" / "parallelism.md").read_text(), \
        "docs/parallelism.md's layout table is out of date: python bench/layout_table.py"


def test_hsdp_shards_within_a_replica_only():
    """8 replicas x 8 shards: each rank holds 1/8 of the model (what one replica's shard group
    splits), and the report names the replicas."""
    cfg, report, _ = layout_table.run_row(
        "experiment=continual_llama3_2_1b parallel.dry_run=64 parallel.dp_replicate=8 parallel.ac=selective")
    assert (report.dp_replicate, report.dp_shard, report.tp) == (8, 8, 1)
    assert report.param_bytes_per_rank * 8 == report.param_count * 4


@pytest.mark.parametrize("overrides,message", [
    ("experiment=continual_llama2_7b parallel.dry_run=64 parallel.tp=3",
     "parallel.tp=3 does not divide the world size 64"),
    ("experiment=continual_llama2_7b parallel.dry_run=96 parallel.tp=3",
     "parallel.tp=3 does not divide model.n_heads=32"),
    ("experiment=continual_llama2_7b parallel.dry_run=64 parallel.dp_shard=16 parallel.tp=2",
     "parallel.dp_shard=16 x parallel.tp=2 = 32, but the world size is 64"),
    ("experiment=continual_llama2_7b parallel.dry_run=64 parallel.tp=2 parallel.ac=full parallel.compile=true",
     "parallel.ac=full cannot be compiled with parallel.tp > 1"),
])
def test_impossible_layout_fails_like_a_launch(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        layout_table.run_row(overrides)


# ------------------------------------------------------------- against a real 2-rank run

FSDP_MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, multiple_of=16,
                         max_seq_len=32)  # 257 rows: rank 0 holds 129, rank 1 holds 128
TP_MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=258, multiple_of=16,
                       max_seq_len=32)


def _config(model: ModelConfig, dp_shard: int, tp: int) -> Config:
    cfg = Config(model=model, parallel=ParallelConfig(dp_shard=dp_shard, tp=tp, ac="selective"))
    cfg.data.seq_len, cfg.data.batch_size, cfg.train.dtype = 16, 2, "float32"
    return cfg


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _measure(rank: int, world: int, layouts: list[Config]) -> list[dict[str, int]]:
    """One AdamW step of each layout on real gloo ranks; the bytes each rank holds."""
    from torch.distributed.tensor.parallel import loss_parallel

    from parallel.dims import ParallelDims
    from parallel.parallelize import parallelize
    from train.model import build_model, init_model
    from train.optim import build_optimizer
    out = []
    for cfg in layouts:
        dims = ParallelDims.from_config(cfg.parallel, world)
        dims.build_mesh("cpu")
        model = build_model(cfg.model)
        parallelize(model, dims, cfg.parallel, param_dtype=torch.float32, reduce_dtype=torch.float32)
        init_model(model, "cpu", seed=0)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))
        with loss_parallel() if dims.tp_enabled else contextlib.nullcontext():
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        out.append({
            "param": sum(_bytes(p) for p in model.parameters()),
            "grad": sum(_bytes(p.grad) for p in model.parameters()),
            "optimizer": sum(_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor)),
        })
    return out


def test_dry_run_bytes_equal_a_real_2_rank_run():
    from train.memory_estimate import estimate
    layouts = [_config(FSDP_MODEL, dp_shard=2, tp=1), _config(TP_MODEL, dp_shard=1, tp=2)]
    measured = run_distributed(_measure, world_size=2, args=(layouts,), timeout_s=180)
    for i, cfg in enumerate(layouts):
        for rank in range(2):
            r = estimate(cfg, world_size=2, rank=rank)
            got = {"param": r.param_bytes_per_rank, "grad": r.grad_bytes_per_rank,
                   "optimizer": r.optimizer_bytes_per_rank}
            assert got == measured[rank][i], (cfg.parallel, rank)
    # the odd vocabulary does split unevenly: the two FSDP ranks differ
    assert measured[0][0]["param"] != measured[1][0]["param"]
