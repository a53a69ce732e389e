"""Tokenizers: the one interface (`Tokenizer`, train/data/tokenizer_base.py, opened with
`load_tokenizer`) with two backends, and the one place that decides which tokenizer a run uses
(`resolve_tokenizer_path`).

Backends: a sentencepiece `.model` (Llama 2's, or one trained here; train/data/sp_tokenizer.py) and
a Hugging Face `tokenizer.json` (Llama 3's or SmolLM2's byte-level BPE, or any other;
train/data/hf_tokenizer.py). They build on tokenizer_base.py and do not import each other or this
module. A folder stands for the tokenizer it holds: tokenizer.model if present, else tokenizer.json.

A trained tokenizer is sentencepiece and Llama-2-like: BPE with byte fallback (no unknown
characters: anything outside the vocabulary is spelled in bytes, so decode(encode(text)) == text),
digits split one by one, ids unk=0, bos=1, eos=2, pad=3. Unlike Llama 2 it keeps text verbatim (no
normalisation, no dummy leading space, runs of spaces kept) because the default corpus is source
code, where whitespace is meaning. Training sees a sample of the corpus (`sample_chars`), so it
takes seconds whatever the corpus size. A tokenizer is trained only when nothing was given and no
model was imported: an imported model's ids mean its own tokenizer's tokens.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from train.config import ConfigError, DataConfig, ModelConfig
from train.data.hf_tokenizer import HFTokenizer
from train.data.sources import DataError
from train.data.sp_tokenizer import SentencePieceTokenizer
from train.data.tokenizer_base import Tokenizer

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "copy_tokenizer", "find_tokenizer_file",
           "load_tokenizer", "resolve_tokenizer_path", "temp_suffix", "train_tokenizer", "write_atomic"]

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# What a folder is searched for, in this order (a Llama 2 folder has both: sentencepiece wins).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# Training input is cut into pieces of this many characters and a random subset of pieces is kept,
# so a corpus of one huge document is sampled as evenly as one of many small files.
_PIECE_CHARS = 16_384


def find_tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The tokenizer file `path` stands for: itself if it is a file; in a folder, the first of
    TOKENIZER_FILES it holds; None if there is none."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        return next((p / n for n in TOKENIZER_FILES if (p / n).is_file()), None)
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The one way to open a tokenizer: a sentencepiece .model, a Hugging Face tokenizer.json, or a
    folder holding one (see find_tokenizer_file)."""
    p = Path(path).expanduser()
    file = find_tokenizer_file(p)
    if file is None:
        what = "holds no tokenizer.model or tokenizer.json" if p.is_dir() else "does not exist"
        raise DataError(f"tokenizer {p} {what}")
    if file.suffix == ".json":
        return HFTokenizer(file)
    return SentencePieceTokenizer(file)


def resolve_tokenizer_path(data_cfg: DataConfig, model_cfg: ModelConfig) -> Path | None:
    """The tokenizer file a run uses, decided here and nowhere else:
    1. data.tokenizer (a file, or a folder holding one), else
    2. model.init_from's own tokenizer (tokenizer.model or tokenizer.json), else
    3. None: nothing was imported and nothing given, so one is trained on the corpus.
    An imported model without a tokenizer and no data.tokenizer is a ConfigError naming both keys
    (training a new tokenizer would silently give the imported weights ids of other tokens). With
    model.init_from, the tokenizer's BOS/EOS must be the ids its config.json names."""
    if data_cfg.tokenizer is not None:
        path = find_tokenizer_file(data_cfg.tokenizer)
        if path is None:
            raise DataError(f"data.tokenizer: {data_cfg.tokenizer} is neither a tokenizer file (a "
                            f"sentencepiece .model or a tokenizer.json) nor a folder holding "
                            f"tokenizer.model or tokenizer.json; null uses model.init_from's or trains one")
    elif model_cfg.init_from is not None:
        path = find_tokenizer_file(model_cfg.init_from) if Path(model_cfg.init_from).is_dir() else None
        if path is None:
            raise ConfigError(
                f"model.init_from={model_cfg.init_from} holds no tokenizer (tokenizer.model or "
                f"tokenizer.json) and data.tokenizer is not set: the imported weights need the "
                f"tokenizer they were trained with. Set data.tokenizer to it (a file or a folder)")
    else:
        return None
    if model_cfg.init_from is not None:
        check_special_ids(load_tokenizer(path), Path(model_cfg.init_from))
    return path


def check_special_ids(tok: Tokenizer, hf_dir: Path) -> None:
    """The tokenizer's BOS/EOS must be those of the imported checkpoint's config.json (where it
    names them; an id list, as Llama 3 Instruct's eos_token_id, must contain ours)."""
    config = hf_dir / "config.json"
    if not config.is_file():
        return  # not a checkpoint folder: the import itself reports that
    c = json.loads(config.read_text())
    for name, key, ours in (("BOS", "bos_token_id", tok.bos_id), ("EOS", "eos_token_id", tok.eos_id)):
        theirs = c.get(key)
        if theirs is not None and ours not in (theirs if isinstance(theirs, list) else [theirs]):
            raise ConfigError(
                f"tokenizer {tok.path} has {name} id {ours} but the imported "
                f"model.init_from={hf_dir} has {key}={theirs} in config.json: the ids would mean "
                f"other tokens. Use the checkpoint's own tokenizer (data.tokenizer=null)")


def copy_tokenizer(tok: Tokenizer, folder: Path) -> list[Path]:
    """Copy the files that define `tok` into `folder` (each written atomically) under the names a
    folder is read by: tokenizer.model, or tokenizer.json with its config files. The other kind's
    file is removed, so `load_tokenizer(folder)` opens this tokenizer."""
    folder = Path(folder)
    main = "tokenizer.json" if tok.path.suffix == ".json" else "tokenizer.model"
    for name in TOKENIZER_FILES:  # first: a folder is read by the first of them it holds
        if name != main:
            (folder / name).unlink(missing_ok=True)
    written = []
    # The main file last: a concurrent reader (another prepare task) finds the tokenizer by it, so
    # the config files naming its BOS/EOS must already be there when it appears.
    for i, src in reversed(list(enumerate(tok.files))):
        dst = folder / (main if i == 0 else src.name)
        write_atomic(dst, src.read_bytes())
        written.insert(0, dst)
    return written


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_path: Path, *,
                    expected_chars: int, sample_chars: int = 8_000_000, seed: int = 0) -> SentencePieceTokenizer:
    """Train a BPE tokenizer of at most `vocab_size` tokens on a sample of `documents` and write it
    to `out_path` atomically (a temporary file renamed into place).

    `expected_chars` (an estimate of the corpus size) sets the fraction of the corpus sampled, so
    the sample of about `sample_chars` characters is spread over the whole corpus. On a corpus too
    small for `vocab_size` the vocabulary ends up smaller (it still fits the model).
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    keep = min(1.0, sample_chars / max(1, expected_chars))
    rng = random.Random(seed)
    lines: list[str] = []  # sentencepiece learns from lines; a newline itself becomes a byte token
    n_chars = 0
    for doc in documents:
        for start in range(0, len(doc), _PIECE_CHARS):
            if rng.random() < keep:
                piece = [line for line in doc[start:start + _PIECE_CHARS].split("\n") if line.strip()]
                lines += piece
                n_chars += sum(map(len, piece))
        if n_chars >= sample_chars:
            break
    if not lines:
        raise DataError("the corpus has no text to train a tokenizer on")
    log.info("training a %d-token BPE tokenizer on %.1fM characters (%d lines) of the corpus",
             vocab_size, n_chars / 1e6, len(lines))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        # In-memory input and output: no paths end up inside the model, so the same corpus gives
        # the same file, byte for byte.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, hard_vocab_limit=False,  # small corpora: fewer tokens is fine
            byte_fallback=True, split_digits=True, character_coverage=0.9995,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            max_sentence_length=16_384, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"training a tokenizer with vocab_size={vocab_size} failed: {e}") from None
    write_atomic(out_path, model.getvalue())
    tok = SentencePieceTokenizer(out_path)
    log.info("tokenizer %s: %d tokens, trained in %.1f s", out_path, tok.vocab_size,
             time.perf_counter() - t0)
    return tok


def temp_suffix() -> str:
    """What ends the name of a temporary file: -<pid>@<host>, so that a later run can tell a dead
    writer's leftovers (its process gone from this host) from a live one's
    (train/data/prepare.py's remove_dead_temporaries)."""
    return f"-{os.getpid()}@{socket.gethostname()}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and one rename, so a
    reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", suffix=temp_suffix(), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users of the cache
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
