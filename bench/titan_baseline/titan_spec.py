"""The torchtitan 0.2.2 configuration of the GPU suite's baseline: a TrainSpec for an offline run.

Imported by torchtitan via `--experimental.custom_import titan_spec` (bench/titan_baseline/run.sh).
Registers TrainSpec "llama3_bench" = stock llama3 spec with
  * extra flavors: "1B" (Llama-3.2-1B shapes, untied embeddings, ~1.50B params),
    "cmp" (the shape from CMP_* variables, to match our trainer's model) and "tiny" (CPU),
  * a synthetic (random-token) StatefulDataLoader -> no dataset, no tokenizer, no internet,
  * a parallelize_fn that always applies FSDP2 (mesh of size world_size, also 1 GPU),
    mirroring torchtitan 0.3.0 which always runs apply_fsdp_to_decoder (bf16 params,
    fp32 reduce via MixedPrecisionPolicy) instead of torch.autocast.
"""
import dataclasses
import os

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.models.llama3 import get_train_spec as _llama3_spec
from torchtitan.models.llama3.infra.parallelize import apply_fsdp, parallelize_llama
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.protocols.train_spec import register_train_spec
from torchtitan.tools.logging import logger

BENCH_ARGS = {
    # Llama-3.2-1B shapes (HF: hidden 2048, 16 layers, 32 heads, 8 kv heads,
    # intermediate 8192, vocab 128256). torchtitan 0.2.2 has no weight tying.
    "1B": TransformerModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
        ffn_dim_multiplier=1.5, multiple_of=256, rope_theta=500000,
    ),
    # Llama-3.2-3B shapes, for a second anchor if wanted.
    "3B": TransformerModelArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
        ffn_dim_multiplier=1.0, multiple_of=256, rope_theta=500000,
    ),
    # Same-shape comparisons: the shape comes from the environment (CMP_DIM, CMP_LAYERS, CMP_HEADS,
    # CMP_VOCAB) so that another trainer can build the identical Llama (n_kv_heads = n_heads, multiple_of 256, no ffn mult).
    "cmp": TransformerModelArgs(
        dim=int(os.environ.get("CMP_DIM", 256)), n_layers=int(os.environ.get("CMP_LAYERS", 6)),
        n_heads=int(os.environ.get("CMP_HEADS", 8)), n_kv_heads=int(os.environ.get("CMP_HEADS", 8)),
        vocab_size=int(os.environ.get("CMP_VOCAB", 8192)), multiple_of=256,
        ffn_dim_multiplier=None, rope_theta=10000.0,
    ),
    # same as torchtitan's "debugmodel"; for a CPU dry run
    "tiny": TransformerModelArgs(
        dim=256, n_layers=6, n_heads=16, vocab_size=2048, rope_theta=500000
    ),
}


class SyntheticTokens(IterableDataset, Stateful):
    """Infinite random tokens; labels = inputs shifted by one (random, so loss ~ ln V)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed, self.n = vocab_size, seq_len, seed, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            t = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
            self.n += 1
            yield {"input": t[:-1]}, t[1:]

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def build_synthetic_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=True):
    flavor = job_config.model.flavor
    vocab = BENCH_ARGS[flavor].vocab_size
    ds = SyntheticTokens(vocab, job_config.training.seq_len, seed=1234 + dp_rank)
    kwargs = {**dataclasses.asdict(job_config.training.dataloader),
              "batch_size": job_config.training.local_batch_size}
    return ParallelAwareDataloader(ds, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)


def parallelize_always_fsdp(model, parallel_dims, job_config):
    model = parallelize_llama(model, parallel_dims, job_config)
    if parallel_dims.fsdp_enabled or os.environ.get("BENCH_FSDP1", "1") != "1":
        return model
    if parallel_dims.tp_enabled or parallel_dims.pp_enabled or parallel_dims.dp_replicate_enabled:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.tools.utils import device_type

    mesh = init_device_mesh(device_type, (parallel_dims.world_size,), mesh_dim_names=("fsdp",))
    apply_fsdp(
        model, mesh,
        param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
        pp_enabled=False,
        cpu_offload=job_config.training.enable_cpu_offload,
        reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
    )
    logger.info("[bench] Applied FSDP2 on a %d-rank mesh (bf16 params via MixedPrecisionPolicy)",
                parallel_dims.world_size)
    return model


_base = _llama3_spec()
register_train_spec(
    "llama3_bench",
    dataclasses.replace(
        _base,
        model_args=BENCH_ARGS,
        parallelize_fn=parallelize_always_fsdp,
        build_dataloader_fn=build_synthetic_dataloader,
        build_tokenizer_fn=None,
        build_validator_fn=None,
    ),
)
