"""Sentencepiece `.model` tokenizers (Llama 2's, or one trained here: train/data/tokenizer.py)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_model

from train.data.sources import DataError
from train.data.tokenizer_base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model.

    Continuations: a model with a dummy prefix (Llama 2's) puts a "▁" before every text it encodes;
    a text that continues a document from a cut point must not get one, so continuations are
    encoded by a copy of the model with add_dummy_prefix off. Where a cut is exact is then decided
    by encoding, as for any tokenizer (train/data/tokenizer_base.py): before a space (a BPE model
    encodes each whitespace-separated word on its own) it always is; elsewhere it is where the
    window check finds that no piece straddles the point."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"tokenizer {self.path} is not a sentencepiece model ({e}); a Llama 3 "
                            f"folder's tokenizer is its tokenizer.json") from None
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"tokenizer {self.path} defines no BOS/EOS token "
                            f"(bos_id={self.bos_id}, eos_id={self.eos_id}); documents need both")
        proto = spm_model.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        self._continuation = self._sp
        if proto.normalizer_spec.add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self._continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """-1 when the model has none (Llama 2's)."""
        return self._sp.pad_id()

    @property
    def digest(self) -> str:
        """sha256 of the .model file's content."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts at once (sentencepiece's own threads; default: all cores)."""
        return self._sp.encode(texts, num_threads=num_threads or os.cpu_count() or 1)

    def encode_continuation(self, text: str) -> list[int]:
        return self._continuation.encode(text)

    def encode_continuations(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self._continuation.encode(texts, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])
