"""What one prepare shard reads: the shard plan, the held-out choice, and the units of text.

Shard plan (`plan_shards`): a pure function of the corpus' files (relative paths, sizes),
prepare.shard_bytes and data.max_chars, so every worker, task and rerun computes the same plan and
the output never depends on how the work was divided.
- Files are taken in corpus order. data.max_chars becomes a cap on input bytes: files are taken
  whole until the cap, the file that crosses it is cut there (at a line).
- A plain file (.txt, .jsonl, stdlib .py) larger than shard_bytes is split into byte ranges
  [k * shard_bytes, (k + 1) * shard_bytes): a range owns the lines that *start* inside it, so ranges
  are read independently, by seeking, and every line is read exactly once.
- A compressed file (.jsonl.gz/.zst) or a .parquet file cannot be entered in the middle: one shard.
- Consecutive small files are grouped into one shard of up to shard_bytes.

Units: the pieces of text that are tokenized and held out. A .jsonl record or .parquet row is one
unit and one document: BOS + tokens + EOS. A plain-text file (.txt, .py) is one document whose lines
are grouped into units by aligned blocks of `UNIT_BYTES` = 1 KiB (the lines starting in block j form
unit j; small, so that even a corpus of one small file holds out a few of them): BOS precedes its
first unit and EOS follows its last, so its train units concatenate back into the file's tokens, and
a single large text file still gives held-out text from all over it. The document index of a shard
lists where each unit's tokens end.

Held-out units: unit u of file f is validation iff hash(f's path relative to the corpus root, u's
key) / 2^64 < val_fraction, where the key is the line's byte offset (.jsonl), the row number
(.parquet) or the block number (text): independent of workers, tasks, seeds and seq_len.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.data.sources import COMPRESSED, Corpus, DataError, open_binary, parse_record, read_parquet_rows

log = logging.getLogger(__name__)

UNIT_BYTES = 1024  # plain text: lines starting in one aligned block of this many bytes form a unit
_CHUNK_BYTES = 4 << 20  # plain text is read this many bytes at a time


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of corpus file number `file` (whole files: 0, size)."""
    file: int
    start: int
    end: int
    last: bool  # the piece ends its file (or the max_chars cap): a text document's EOS goes here


@dataclass(frozen=True)
class Unit:
    text: str
    val: bool
    bos: bool
    eos: bool


def splittable(path: Path) -> bool:
    return not path.name.endswith((*COMPRESSED, ".parquet"))


def is_text(path: Path) -> bool:
    return not path.name.endswith((".jsonl", *COMPRESSED, ".parquet"))


def plan_shards(corpus: Corpus, sizes: list[int], shard_bytes: int,
                max_chars: int | None) -> list[list[Piece]]:
    """The shards (each a list of pieces), in order; see the module docstring."""
    shards: list[list[Piece]] = []
    group: list[Piece] = []
    group_bytes = 0
    budget = max_chars if max_chars is not None else -1
    for i, (path, size) in enumerate(zip(corpus.files, sizes)):
        if budget == 0:
            break
        end, cut = size, False
        if budget > 0 and splittable(path) and size > budget:
            end, cut = budget, True
        budget = max(0, budget - size) if budget > 0 else budget
        if end > shard_bytes and splittable(path):
            if group:
                shards.append(group)
                group, group_bytes = [], 0
            for start in range(0, end, shard_bytes):
                stop = min(end, start + shard_bytes)
                shards.append([Piece(i, start, stop, last=stop == end)])
            continue
        if group and group_bytes + end > shard_bytes:
            shards.append(group)
            group, group_bytes = [], 0
        group.append(Piece(i, 0, end, last=True))
        group_bytes += end
        if cut:
            break
    if group:
        shards.append(group)
    return shards


def is_held_out(rel_path: str, key: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{rel_path}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0 ** 64


def read_units(corpus: Corpus, piece: Piece, val_fraction: float) -> Iterator[Unit]:
    """The units of one piece, in file order."""
    path = corpus.files[piece.file]
    rel = path.relative_to(corpus.root).as_posix() if path != corpus.root else path.name
    if path.name.endswith(".parquet"):
        for row, text in read_parquet_rows(path, corpus.text_field):
            if text:
                yield Unit(text, is_held_out(rel, row, val_fraction), True, True)
        return
    if not is_text(path):
        for offset, raw in _lines(path, piece):
            text = parse_record(raw, corpus.text_field, f"{path}: line at byte {offset}")
            if text:
                yield Unit(text, is_held_out(rel, offset, val_fraction), True, True)
        return
    chunks = _text_chunks(path, piece)
    if corpus.is_stdlib:  # a source file we cannot decode is skipped: the user cannot fix it
        chunks = list(chunks)  # (standard-library files are small)
        try:
            for _, data, _ in chunks:
                data.decode("utf-8")
        except UnicodeDecodeError as e:
            log.warning("skipping %s: not UTF-8 (%s)", path, e.reason)
            return
    for base, data, final in chunks:
        # Unit boundaries: the first line start at or after each block boundary (one search per
        # unit, not a Python step per line).
        a, n = 0, len(data)
        while a < n:
            block = (base + a) // UNIT_BYTES
            nl = data.find(b"\n", (block + 1) * UNIT_BYTES - base - 1)
            b = n if nl < 0 else nl + 1
            yield _text_unit(path, rel, block, data[a:b], val_fraction, base + a == 0,
                             b == n and final and piece.last)
            a = b


def _text_chunks(path: Path, piece: Piece) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, bytes, final) of the lines starting in [piece.start, piece.end), read _CHUNK_BYTES
    at a time (bounded memory), each chunk but the last ending at a unit boundary. A piece starting
    inside a line leaves that line to the previous piece; one ending inside a line (the next range,
    or the max_chars cap) finishes it (never half a UTF-8 character)."""
    with open(path, "rb") as fh:
        start = piece.start
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                start += len(fh.readline())
        offset, pos, carry = start, start, b""
        while pos < piece.end:
            data = fh.read(min(_CHUNK_BYTES, piece.end - pos))
            if not data:  # the file shrank since planning
                buf = carry
                break
            pos += len(data)
            buf = carry + data
            if pos >= piece.end:
                break
            # cut at the first line start at or after the last block boundary inside buf
            boundary = (offset + len(buf)) // UNIT_BYTES * UNIT_BYTES
            nl = buf.find(b"\n", boundary - offset - 1) if boundary > offset else -1
            cut = nl + 1 if nl >= 0 else 0
            if cut:
                yield offset, buf[:cut], False
            offset, carry = offset + cut, buf[cut:]
        else:
            buf = carry
        if buf and not buf.endswith(b"\n"):
            buf += fh.readline()
        if buf:
            yield offset, buf, True


def _text_unit(path: Path, rel: str, block: int, raw: bytes, val_fraction: float,
               bos: bool, eos: bool) -> Unit:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {block * UNIT_BYTES + e.start}: {e.reason})") from None
    return Unit(text, is_held_out(rel, block, val_fraction), bos, eos)


def _lines(path: Path, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the lines starting in [piece.start, piece.end), whole (a max_chars cap
    inside a line takes that line whole: never half a UTF-8 character)."""
    end = piece.end if splittable(path) else float("inf")  # compressed: piece.end is not in text bytes
    with open_binary(path) as fh:
        offset = piece.start
        if offset > 0:
            fh.seek(offset - 1)
            if fh.read(1) != b"\n":  # inside a line: it belongs to the previous range
                offset += len(fh.readline())
        while offset < end:
            raw = fh.readline()
            if not raw:
                return
            yield offset, raw
            offset += len(raw)
