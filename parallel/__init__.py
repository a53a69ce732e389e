"""Meshes and sharding, independent of LayerSkip's maths.

- `parallel.dims`: `ParallelDims` -- the (dp_replicate, dp_shard, tp) layout, its checks and device mesh.
- `parallel.parallelize`: TP -> AC -> compile -> FSDP2 (or DDP) on a meta-device model, and
  `load_full_state_dict` to give every layout the same weights.
- `parallel.distributed`: process group setup with a timeout, global gradient clipping, metric
  means, barrier, teardown.
"""
