"""Test helpers shared by the inference and Hugging Face tests."""
import pytest
import torch

from train.config import ModelConfig
from train.model import build_model, init_model


def random_model(cfg: ModelConfig, seed: int = 0):
    """Random weights large enough that every block changes the prediction (at torchtitan's init
    the embeddings dominate and every exit predicts the same tokens: speculation would be trivial)."""
    model = init_model(build_model(cfg), "cpu", seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "tok_embeddings" not in name:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    return model


@pytest.fixture
def one_thread():
    """Tiny ops: extra threads only spin (and slow everything down on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
