"""How the world's ranks are laid out: a 2-D mesh (dp_shard, tp).

`dp_shard` ranks each see different data and hold 1/dp_shard of every parameter (FSDP2); the `tp`
ranks of one group see the same data and split every matrix (tensor + sequence parallelism).
Ranks are laid out with tp innermost, so a TP group is made of neighbouring ranks (one node's
fast links). Both dimensions always exist; a dimension of size 1 costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import ConfigError, ModelConfig, ParallelConfig, ffn_hidden_dim

MESH_DIMS = ("dp_shard", "tp")


@dataclass
class ParallelDims:
    dp_shard: int  # -1: whatever tp leaves of the world
    tp: int
    world_size: int
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world_size}")
        if self.tp < 1:
            raise ConfigError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.dp_shard == -1:
            if self.world_size % self.tp:
                raise ConfigError(
                    f"parallel.tp={self.tp} does not divide the world size {self.world_size}")
            self.dp_shard = self.world_size // self.tp
        if self.dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1, got {self.dp_shard}")
        if self.dp_shard * self.tp != self.world_size:
            raise ConfigError(
                f"parallel.dp_shard={self.dp_shard} x parallel.tp={self.tp} = "
                f"{self.dp_shard * self.tp}, but the world size is {self.world_size}")

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        return cls(dp_shard=cfg.dp_shard, tp=cfg.tp, world_size=world_size)

    def check_model(self, model_cfg: ModelConfig, seq_len: int | None = None) -> None:
        """Tensor parallelism splits heads, FFN width and vocabulary over tp ranks, and sequence
        parallelism splits the sequence: each must divide evenly."""
        if self.tp == 1:
            return
        widths = {
            "model.n_heads": model_cfg.n_heads,
            "model.n_kv_heads": model_cfg.n_kv_heads or model_cfg.n_heads,
            "the FFN hidden width": ffn_hidden_dim(
                model_cfg.dim, model_cfg.multiple_of, model_cfg.ffn_dim_multiplier),
            "model.vocab_size": model_cfg.vocab_size,
        }
        if seq_len is not None:
            widths["data.seq_len"] = seq_len
        for name, n in widths.items():
            if n % self.tp:
                raise ConfigError(f"parallel.tp={self.tp} does not divide {name}={n}")

    # ----------------------------------------------------------------------------- the mesh

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the (dp_shard, tp) mesh over the default process group (must exist)."""
        self.mesh = init_device_mesh(
            device_type, (self.dp_shard, self.tp), mesh_dim_names=MESH_DIMS)
        return self.mesh

    def _built(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must be called first")
        return self.mesh

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self._built()["dp_shard"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._built()["tp"]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_world(self) -> int:
        return self.dp_shard

    @property
    def tp_rank(self) -> int:
        return self.tp_mesh.get_local_rank()

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1
