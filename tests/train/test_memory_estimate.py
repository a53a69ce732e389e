"""The dry run's activation count per block is what torchtitan's block really saves for backward.

No AC: every tensor the block's forward saves (read with saved-tensor hooks, parameters
excluded). Selective AC: the block input plus the outputs of the ops the selective policy of
parallel/parallelize.py keeps (read with a dispatch mode on a plain forward).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.parallelize import _SAVE_OPS
from train.config import Config, ModelConfig
from train.memory_estimate import block_elements_per_token
from train.model import build_model, init_model

MODEL = ModelConfig(dim=128, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32,
                    max_seq_len=64)
B, S = 4, 64


def _block_and_input():
    model = init_model(build_model(MODEL, "cpu"), "cpu", seed=0)
    h = torch.randn(B, S, MODEL.dim, requires_grad=True)
    return model, h


def _elements(ac: str) -> int:
    cfg = Config(model=MODEL)
    cfg.parallel.ac = ac
    return block_elements_per_token(cfg)[0] * B * S


def test_no_ac_counts_every_saved_tensor():
    model, h = _block_and_input()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers["0"](h, model.freqs_cis, attention_masks=None)
    measured = sum(saved.values())
    expected = _elements("none") * 4  # fp32
    # The estimate leaves out only the per-token statistics (norm rstd, attention log-sum-exp).
    assert expected <= measured <= expected * 1.01, (measured, expected)


class _KeptOutputs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _SAVE_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.elements += first.numel()  # the activation; attention's extra outputs are per-token stats
        return out


def test_selective_ac_counts_what_the_policy_keeps():
    model, h = _block_and_input()
    with _KeptOutputs() as kept:
        model.layers["0"](h, model.freqs_cis, attention_masks=None)
    assert kept.elements + h.numel() == _elements("selective")
