"""The data pipeline: raw text -> prepared token shards (train/data/prepare.py, offline and in
parallel) -> memory-mapped windows in one global, resumable, layout-independent order (build.py,
dataset.py, mixture.py, loader.py; the validation sample: heldout.py).

The names below are imported on first use (PEP 562): `python -m train.data.prepare` and its worker
processes import this package but need neither torch nor the loader, and so start fast and small.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Batch", "Data", "DataError", "Tokenizer", "TrainLoader", "build_data"]

_WHERE = {"Batch": "loader", "TrainLoader": "loader", "Data": "build", "build_data": "build",
          "DataError": "sources", "Tokenizer": "tokenizer"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
