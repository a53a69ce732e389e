"""How the world's ranks are laid out: a 3-D mesh (dp_replicate, dp_shard, tp), as torchtitan's.

Data parallelism has two dimensions. `dp_shard` ranks hold 1/dp_shard of every parameter (FSDP2);
`dp_replicate` groups of them each hold a whole copy and average gradients with an all-reduce:
HSDP when both are > 1 (shard within a node, replicate across nodes), plain DDP when dp_shard is
1. Every data-parallel rank, of either dimension, sees different data: the data-parallel rank is
(replicate rank, shard rank) in row-major order, out of dp_replicate x dp_shard. The `tp` ranks of
one group see the same data and split every matrix (tensor + sequence parallelism).

Ranks are laid out with tp innermost, so a TP group is made of neighbouring ranks (one node's
fast links), and dp_replicate outermost, so the replicas' all-reduce is the only collective that
crosses between shard groups. Every dimension always exists; a dimension of size 1 costs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import ConfigError, ModelConfig, ParallelConfig, ffn_hidden_dim

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    dp_shard: int  # -1: whatever dp_replicate and tp leave of the world
    tp: int
    world_size: int
    dp_replicate: int = 1
    mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _dp_mesh_flat: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world_size}")
        if self.tp < 1:
            raise ConfigError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.dp_replicate < 1:
            raise ConfigError(f"parallel.dp_replicate must be >= 1, got {self.dp_replicate}")
        if self.dp_shard == -1:
            rest = self.tp * self.dp_replicate
            if self.world_size % rest:
                what = (f"parallel.tp={self.tp}" if self.dp_replicate == 1 else
                        f"parallel.dp_replicate={self.dp_replicate} x parallel.tp={self.tp} = {rest}")
                raise ConfigError(f"{what} does not divide the world size {self.world_size}")
            self.dp_shard = self.world_size // rest
        if self.dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1, got {self.dp_shard}")
        if self.dp_replicate * self.dp_shard * self.tp != self.world_size:
            replicas = f"parallel.dp_replicate={self.dp_replicate} x " if self.dp_replicate > 1 else ""
            raise ConfigError(
                f"{replicas}parallel.dp_shard={self.dp_shard} x parallel.tp={self.tp} = "
                f"{self.dp_replicate * self.dp_shard * self.tp}, but the world size is {self.world_size}")

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        return cls(dp_shard=cfg.dp_shard, tp=cfg.tp, world_size=world_size,
                   dp_replicate=cfg.dp_replicate)

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
        """Create the (dp_replicate, dp_shard, tp) mesh over the default process group (must
        exist), and the flattened data-parallel mesh that metrics are averaged over."""
        self.mesh = init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=MESH_DIMS)
        # torchtitan's way to get one group over two mesh dimensions (DeviceMesh._flatten).
        self._dp_mesh_flat = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return self.mesh

    def _built(self) -> DeviceMesh:
        if self.mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() must be called first")
        return self.mesh

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """What FSDP2 shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP."""
        if self.dp_replicate > 1:
            return self._built()["dp_replicate", "dp_shard"]
        return self._built()["dp_shard"]

    @property
    def dp_replicate_mesh(self) -> DeviceMesh:
        return self._built()["dp_replicate"]

    @property
    def dp_mesh(self) -> DeviceMesh:
        """Every data-parallel rank of this TP rank's position (1-D, dp_replicate x dp_shard):
        the group that metrics and validation losses are averaged over."""
        self._built()
        return self._dp_mesh_flat

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._built()["tp"]

    @property
    def dp_rank(self) -> int:
        return self.dp_mesh.get_local_rank()

    @property
    def dp_world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def tp_rank(self) -> int:
        return self.tp_mesh.get_local_rank()

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1
