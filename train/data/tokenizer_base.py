"""`Tokenizer`: what the data pipeline, training, export and decoding use of a tokenizer, whichever
backend (train/data/sp_tokenizer.py, train/data/hf_tokenizer.py). A module of its own so that the
backends build on it without importing each other or the loader (train/data/tokenizer.py).

Cut points (train/data/shards.py encodes a large plain-text document in parts): a document may be
cut at a point p only where encoding the text before p (`encode`) followed by encoding the text
from p (`encode_continuation`: no dummy prefix or other start-of-text marker) gives exactly the
ids of the whole. Which points those are is the tokenizer's own business (its normaliser,
pre-tokenizer and vocabulary), so it is asked, not a list of known tokenizers: `is_exact_cut`
encodes a window of text on each side of a candidate and compares. Each of them sees at least
`CUT_WINDOW_BYTES` of text (or the document's end): the pre-tokenizers of real tokenizers look
at most a few characters ahead or behind, so a split that holds on the window holds in the
whole document.
"""
from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path

from train.data.sources import DataError

CUT_WINDOW_BYTES = 48  # text checked on each side of a candidate cut point (backed off to whole characters)


class Tokenizer(abc.ABC):
    """`path` (the file opened), `files` (every file that defines it), `digest`, `vocab_size`,
    `bos_id`, `eos_id`, `encode` (adds no BOS/EOS: packing adds them around each document; text
    is always text: a special token's string in it is not that token), `encode_batch`, `decode`,
    `check_fits`, and for prepare's cutting of large documents `encode_continuation(s)` and
    `is_exact_cut` (see the module docstring). Open one with train.data.tokenizer.load_tokenizer."""

    path: Path
    vocab_size: int
    bos_id: int
    eos_id: int

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    @abc.abstractmethod
    def digest(self) -> str:
        """sha256 of what maps text to ids: what prepared data and checkpoints record to know that
        two runs map text to the same ids."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_continuation(self, text: str) -> list[int]:
        """The ids of `text` where it continues a document (no start-of-text marker added)."""
        return self.encode(text)

    def encode_continuations(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.encode_batch(texts, num_threads)

    def is_exact_cut(self, left: str, right: str) -> bool:
        """Whether encoding `left` and continuing with `right` gives the ids of `left + right`:
        `left` ends at a candidate cut point and `right` starts there."""
        return self.encode(left + right) == self.encode(left) + self.encode_continuation(right)

    def check_fits(self, model_vocab_size: int) -> None:
        """Every token id must index the model's embedding."""
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"tokenizer {self.path} has {self.vocab_size} tokens but the model's vocabulary "
                f"(model.vocab_size) has only {model_vocab_size}; set model.vocab_size >= "
                f"{self.vocab_size} or use another tokenizer (data.tokenizer)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"
