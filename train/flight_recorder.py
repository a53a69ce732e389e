"""NCCL's flight recorder, configured by the trainer itself (before the process group exists).

The flight recorder keeps the last collectives each rank issued and, when a collective times
out, dumps them (with HangDumps' Python stacks, RUN_DIR/dumps/): the record of which rank never
joined which collective. torch reads these variables when the NCCL process group is created, so
`python -m train` sets them before joining it, whatever launched it; a value already in the
environment wins (a launcher or a user chose it). The buffer holds `buffer_size` entries per rank
(torchtitan's default, 20,000: enough for several steps of a large model's per-block collectives);
0 leaves the recorder off.
"""
from __future__ import annotations

import os

# The older and the newer (torch >= 2.7) name of the buffer size; torch reads either.
_BUFFER_VARS = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE")


def configure_flight_recorder(buffer_size: int) -> dict[str, str]:
    """Set the flight recorder's variables that are not set yet; returns the values in effect."""
    if buffer_size > 0 and not any(v in os.environ for v in _BUFFER_VARS):
        os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] = str(buffer_size)
    if buffer_size > 0 or any(v in os.environ for v in _BUFFER_VARS):
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    return {k: os.environ[k] for k in (*_BUFFER_VARS, "TORCH_NCCL_DUMP_ON_TIMEOUT") if k in os.environ}
