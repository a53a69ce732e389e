"""torchtitan 0.2.2's own entry point, `torchtitan.train.main(Trainer)`, for the GPU suite's baseline.

Two wrappers, both outside the training maths: the metrics torchtitan logs are also appended to a
JSON-lines file (its loggers are the only place they exist as numbers), and on a one-GPU FSDP2 mesh
mixed precision comes from FSDP2's policy rather than from torch.autocast (as in torchtitan 0.3).

Env:
  BENCH_METRICS_JSONL  path; rank 0 appends every metrics dict torchtitan logs (tps, mfu,
                       memory/max_active(GiB), memory/max_reserved(GiB), loss, ...)
  BENCH_FSDP1=1        (default) apply FSDP2 even on 1 GPU and disable torch.autocast
                       (matches torchtitan 0.3.0 semantics); 0 = stock 0.2.2 single-device AMP path
  BENCH_CPU_SHIM=1     only for a dry run without a GPU: device "cpu", gloo-friendly FSDP (cpu_shim.py)
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

if os.environ.get("BENCH_CPU_SHIM") == "1":
    import cpu_shim  # noqa: F401  (must precede torchtitan imports)

import contextlib  # noqa: E402

import torch  # noqa: E402

import torchtitan.components.metrics as tt_metrics  # noqa: E402
import torchtitan.distributed.utils as tt_dist_utils  # noqa: E402
from torchtitan.train import main, Trainer  # noqa: E402

# 1) capture metrics dicts (rank 0 only logs to loggers; BaseLogger is used when TB is off)
_out = os.environ.get("BENCH_METRICS_JSONL")


def _wrap(cls):
    orig = cls.log

    def log(self, metrics, step):
        if _out and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            rec = {"step": step}
            rec.update({k: (float(v) if isinstance(v, (int, float)) else str(v))
                        for k, v in metrics.items()})
            if torch.cuda.is_available():
                rec["cuda_max_allocated_gib_since_last_log"] = torch.cuda.max_memory_allocated() / 2**30
            with open(_out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return orig(self, metrics, step)

    cls.log = log


_wrap(tt_metrics.BaseLogger)
_wrap(tt_metrics.LoggerContainer)

# 2) with FSDP on 1 GPU, mixed precision comes from fully_shard -> no autocast
if os.environ.get("BENCH_FSDP1", "1") == "1":
    _orig_amp = tt_dist_utils.maybe_enable_amp

    def _maybe_enable_amp(parallel_dims, mixed_precision_param, device_type):
        if (not parallel_dims.fsdp_enabled and not parallel_dims.tp_enabled
                and not parallel_dims.pp_enabled and not parallel_dims.dp_replicate_enabled):
            return contextlib.nullcontext()
        return _orig_amp(parallel_dims, mixed_precision_param, device_type)

    tt_dist_utils.maybe_enable_amp = _maybe_enable_amp

if __name__ == "__main__":
    main(Trainer)
