"""Lets torchtitan 0.2.2 run on a CPU (for the GPU suite's --dry-run only), imported before torchtitan.

Only what is needed for the trainer to run on CPU with gloo; no change to the training maths:
  * device type "cpu" (torchtitan's tools/utils picks `_get_available_device_type() or "cuda"`),
  * torch.cpu stand-ins for the DeviceMemoryMonitor calls (peak RSS as "memory"),
  * current_device() -> 0 (set_pg_timeouts passes it to barrier(device_ids=[...])),
  * FSDP2 gradient reduction forced to SUM (gloo has no PREMUL_SUM; torchtitan sets the
    divide factor to 1.0 and divides the loss by the global token count itself, so SUM is the
    same maths).
"""
import resource
import types

import torch
import torch._utils

_orig = torch._utils._get_available_device_type
torch._utils._get_available_device_type = lambda: "cpu"

cpu = torch.cpu


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


cpu.get_device_name = lambda *a, **k: "cpu"
cpu.get_device_properties = lambda *a, **k: types.SimpleNamespace(total_memory=128 * 2**30, name="cpu")
cpu.current_device = lambda: 0
cpu.memory_stats = lambda *a, **k: {"active_bytes.all.peak": _rss_bytes(),
                                    "reserved_bytes.all.peak": _rss_bytes(),
                                    "num_alloc_retries": 0, "num_ooms": 0}
cpu.reset_peak_memory_stats = lambda *a, **k: None
cpu.empty_cache = lambda *a, **k: None
if not hasattr(cpu, "set_device"):
    cpu.set_device = lambda *a, **k: None

# gloo: no PREMUL_SUM. torchtitan 0.2.2 calls set_gradient_divide_factor(1.0) on every FSDP
# module; force SUM reduction there (post-factor 1.0 -> no division: identical maths).
from torch.distributed.fsdp import FSDPModule  # noqa: E402

_orig_sgdf = FSDPModule.set_gradient_divide_factor


def _sgdf(self, factor):
    _orig_sgdf(self, factor)
    self.set_force_sum_reduction_for_comms(True)


FSDPModule.set_gradient_divide_factor = _sgdf
