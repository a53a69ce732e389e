"""Shared fixtures. Tests run on CPU in fp32 with few threads (2-core machine)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_model_cfg():
    from train.config import ModelConfig
    return ModelConfig(name="test", dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256,
                       multiple_of=16, max_seq_len=64)
