"""Hugging Face `tokenizer.json` tokenizers (Llama 3's byte-level BPE, 128,256 ids), read with the
`tokenizers` library as torchtitan does.

Cut points: a byte-level `tokenizer.json` adds nothing at the start of a text (no dummy prefix), so
a continuation is encoded as any text, and the window check of train/data/tokenizer_base.py, with
the tokenizer's own pre-tokenizer (`is_exact_cut`), finds where it splits.
(A tokenizer.json that prepends a "▁" to every text, as Llama 2's converted one does, finds no
exact cut point: prepare then cuts at its bounded fallback points, counted; prefer the .model.)

The file alone does not say which tokens are BOS and EOS: as in `transformers`, they are named by
`tokenizer_config.json` (or `special_tokens_map.json`) next to it. Those files therefore belong to
the tokenizer: its digest covers the ids they choose, and they travel with it (run directory,
export). Encoding adds no special tokens (packing puts BOS/EOS around each document) and reads
special-token strings in the text as text (`<|end_of_text|>` quoted in a web page is characters,
not an EOS), as Meta's reference tokenizer and torchtune do when preparing data: exactly
`AutoTokenizer(..., split_special_tokens=True).encode(text, add_special_tokens=False)`. (Plain
`add_special_tokens=False` only stops the post-processor; the added-token matcher still turns
those strings into special ids, so we set the library's `encode_special_tokens`.)
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizers

from train.data.sources import DataError
from train.data.tokenizer_base import Tokenizer

# Files next to tokenizer.json that decide its special tokens, in the order transformers reads them.
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _token_name(entry) -> str | None:
    """A special token as the config files spell it: a string or {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class HFTokenizer(Tokenizer):
    """A `tokenizer.json`. `path` is that file; its BOS/EOS come from the config files beside it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer {self.path} does not exist")
        try:
            self._tok = _Tokenizers.from_file(str(self.path))
        except Exception as e:  # the Rust library raises plain Exception on a malformed file
            raise DataError(f"tokenizer {self.path} is not a Hugging Face tokenizer.json: {e}") from None
        self._tok.encode_special_tokens = True  # special-token strings in text stay text
        self.config_files = [self.path.parent / n for n in SPECIAL_TOKEN_FILES
                             if (self.path.parent / n).is_file()]
        self.bos_id, self.eos_id = self._special_id("bos_token"), self._special_id("eos_token")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # ids index the embedding: the size that matters is the largest id + 1
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0

    def _special_id(self, key: str) -> int:
        """The id of the token named `key` (bos_token / eos_token) by the first config file that
        names one."""
        for f in self.config_files:
            try:
                name = _token_name(json.loads(f.read_text(encoding="utf-8")).get(key))
            except (ValueError, AttributeError) as e:
                raise DataError(f"{f} is not a JSON object: {e}") from None
            if name is None:
                continue
            idx = self._tok.token_to_id(name)
            if idx is None:
                raise DataError(f"{f}: {key} {name!r} is not a token of {self.path}")
            return idx
        where = " or ".join(str(self.path.parent / n) for n in SPECIAL_TOKEN_FILES)
        raise DataError(f"tokenizer {self.path}: no {key} is named in {where}; documents need BOS and "
                        f"EOS (Llama 3: <|begin_of_text|>, <|end_of_text|>). Keep the checkpoint's "
                        f"tokenizer_config.json next to tokenizer.json")

    @property
    def files(self) -> list[Path]:
        """Every file that defines the tokenizer (tokenizer.json first)."""
        return [self.path, *self.config_files]

    @property
    def digest(self) -> str:
        """sha256 of tokenizer.json's content and of the BOS/EOS ids the config files chose (the
        ids packing adds): equal digests mean equal token ids. Other config entries (a chat
        template, say) do not change ids and so do not change the digest."""
        h = hashlib.sha256(self.path.read_bytes())
        h.update(f"\0bos={self.bos_id}\0eos={self.eos_id}".encode())
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts. The `tokenizers` library runs batches on one process-wide thread pool
        (sized by RAYON_NUM_THREADS, default: all cores) that cannot be resized per call, so
        num_threads=1 encodes text by text on the calling thread (for callers that parallelise
        with processes) and any other value uses that pool."""
        if num_threads == 1:
            return [self._tok.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def is_exact_cut(self, left: str, right: str) -> bool:
        """Also asks the pre-tokenizer (where no normaliser moves offsets): a cut must fall between
        two of its pre-tokens, so that the ids of each side are those of whole pre-tokens and do
        not merely happen to coincide on this window."""
        pre = self._tok.pre_tokenizer
        if pre is not None and self._tok.normalizer is None:
            if all(start != len(left) for _, (start, _) in pre.pre_tokenize_str(left + right)):
                return False
        return super().is_exact_cut(left, right)

    def id_to_token(self, idx: int) -> str:
        return self._tok.id_to_token(idx)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Special tokens (BOS, EOS) are no text and decode to nothing, as
        sentencepiece's control symbols do: decoded text encodes back to its ids, never to
        special ids (a special token's string in the text is text, see the module docstring)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
