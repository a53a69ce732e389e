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


def sentencepiece_model(folder, text: str, vocab_size: int = 400):
    """A small BPE sentencepiece model trained on `text` (bos 1, eos 2, pad 3): folder/sp.model."""
    import sentencepiece as spm
    (folder / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), model_type="bpe",
        vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, minloglevel=2)
    return folder / "sp.model"


def exported_random_model(out, cfg: ModelConfig, text: str, tokenizer=None, seed: int = 0):
    """random_model(cfg, seed) exported as a Hugging Face folder at `out` (fp32), with `text` as its
    heldout.txt. With `tokenizer` (a sentencepiece .model) the export converts it for
    transformers; without, tokenizer.model is missing (the caller may copy one in)."""
    from train.hf import export_hf
    return export_hf(random_model(cfg, seed).state_dict(), cfg, out, None if tokenizer is None else str(tokenizer),
                     torch.float32, heldout_text=text)
