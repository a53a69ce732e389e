"""What one prepare shard reads: the shard plan, the held-out choice, and the units of text.

Shard plan (`plan_shards`): a pure function of the corpus' files (relative paths, sizes),
prepare.shard_bytes, data.max_chars and whether the tokenizer can cut documents, so every worker,
task and rerun computes the same plan and the output never depends on how the work was divided.
- Files are taken in corpus order. data.max_chars becomes a cap on input bytes: files are taken
  whole until the cap; the file that crosses it is cut there (.jsonl: after the line the cap falls
  in; plain text: at the cap, backed off to a whole UTF-8 character). The cut text is a document.
- A .jsonl file larger than shard_bytes is split into byte ranges [k * shard_bytes, (k + 1) *
  shard_bytes): a range owns the lines that *start* inside it (read by seeking).
- A plain-text file (.txt, stdlib .py) larger than shard_bytes is split the same way when the
  tokenizer `can_cut` (train/data/tokenizer.py), at cut points instead of lines: a range owns the
  text from the first cut point at or after its start to the first at or after its end.
- A compressed file (.jsonl.gz/.zst), a .parquet file, or a plain-text file under a tokenizer that
  cannot cut cannot be entered in the middle: one shard.
- Consecutive small files are grouped into one shard of up to shard_bytes.

Documents: a .jsonl record or .parquet row is one document, and so is a plain-text file. Empty
documents are left out. Every document is stored as BOS + exactly the ids the tokenizer gives for
its whole text + EOS.

Cut points: a space between two ASCII letters ("a| b"; found in the bytes: ASCII never occurs
inside a multi-byte UTF-8 character). A tokenizer that `can_cut` gives a document's ids as those of
its text before a cut point followed by those of the text from it, so a plain-text document may be
encoded in parts that meet at cut points (a text without any is one part).

Units: the pieces of text that are tokenized and held out. A .jsonl record or .parquet row is one
unit. A plain-text document is cut into units at the first cut point at or after each multiple of
`UNIT_BYTES` (when the tokenizer can cut; else it is one unit): small, so that even a corpus of one
small file holds out a few of them, and a single large text file gives held-out text from all over
it. Where a text document's units go to both splits, each maximal run of consecutive units of one
split is stored as its own document, BOS ... EOS: a train sequence never jumps over held-out text,
and a held-out run never runs into another without a boundary. The document index of a shard lists
where each stored unit's tokens end.

Held-out units: unit u of file f is validation iff hash(f's path relative to the corpus root, u's
key) / 2^64 < val_fraction, where the key is the line's byte offset (.jsonl), the row number
(.parquet) or the unit's start offset // UNIT_BYTES (text: the block its first cut point is in): a
pure function of the text, independent of workers, tasks, shard sizes, seeds and seq_len.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.data.sources import COMPRESSED, Corpus, DataError, open_binary, parse_record, read_parquet_rows

log = logging.getLogger(__name__)

UNIT_BYTES = 1024  # plain text: a unit starts at the first cut point at or after each multiple of this
_CHUNK_BYTES = 4 << 20  # plain text is read about this many bytes at a time
_CUT = re.compile(rb"(?<=[A-Za-z]) (?=[A-Za-z])")  # a cut point: the space of "a| b"


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of corpus file number `file` (whole files: 0, size)."""
    file: int
    start: int
    end: int
    last: bool  # the piece ends its file's text (the file, or the max_chars cap)
    stop: int = -1  # a plain-text file's text ends here (its size, or the max_chars cap); -1: size


@dataclass(frozen=True)
class Unit:
    text: str
    val: bool
    bos: bool
    eos: bool
    continues: bool = False  # continues a document from a cut point (encode_continuations)


def splittable(path: Path) -> bool:
    return not path.name.endswith((*COMPRESSED, ".parquet"))


def is_text(path: Path) -> bool:
    return not path.name.endswith((".jsonl", *COMPRESSED, ".parquet"))


def plan_shards(corpus: Corpus, sizes: list[int], shard_bytes: int, max_chars: int | None,
                can_cut: bool = True) -> list[list[Piece]]:
    """The shards (each a list of pieces), in order; see the module docstring. `can_cut`: the
    tokenizer's (plain text is split into ranges only if it can cut documents)."""
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
        if end > shard_bytes and splittable(path) and (can_cut or not is_text(path)):
            if group:
                shards.append(group)
                group, group_bytes = [], 0
            for start in range(0, end, shard_bytes):
                stop = min(end, start + shard_bytes)
                shards.append([Piece(i, start, stop, last=stop == end, stop=end)])
            continue
        if group and group_bytes + end > shard_bytes:
            shards.append(group)
            group, group_bytes = [], 0
        group.append(Piece(i, 0, end, last=True, stop=end))
        group_bytes += end
        if cut:
            break
    if group:
        shards.append(group)
    return shards


def is_held_out(rel_path: str, key: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{rel_path}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < val_fraction * 2.0 ** 64


def read_units(corpus: Corpus, piece: Piece, val_fraction: float, *, can_cut: bool) -> Iterator[Unit]:
    """The units of one piece, in file order; `can_cut`: the tokenizer's (see the docstring)."""
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
    with open(path, "rb") as fh:
        text = _TextFile(fh, piece.stop)
        if corpus.is_stdlib:  # a source file we cannot decode is skipped: the user cannot fix it
            try:  # (standard-library files are small and never split)
                text.read(0, text.end).decode("utf-8")
            except UnicodeDecodeError as e:
                log.warning("skipping %s: not UTF-8 (%s)", path, e.reason)
                return
        yield from _text_units(path, rel, text, piece, val_fraction, can_cut)


def _text_units(path: Path, rel: str, text: _TextFile, piece: Piece, val_fraction: float,
                can_cut: bool) -> Iterator[Unit]:
    """The units of a plain-text piece: [a, b) from the piece's first unit start to its end, each
    held out by block a // UNIT_BYTES; BOS where a run of one split starts (the document's start,
    or after a unit of the other split), EOS where it ends (the document's end, or before one)."""
    E = text.end
    if not can_cut:  # one unit: the whole document
        if piece.start == 0 and E > 0:
            yield _text_unit(path, 0, text.read(0, E), is_held_out(rel, 0, val_fraction), True, True, False)
        return
    # a range starts at the first unit start at or after its first byte (so its units are the
    # ones of the whole document, whatever the shard size)
    begin = 0 if piece.start == 0 else text.cut_at_or_after(-(-piece.start // UNIT_BYTES) * UNIT_BYTES)
    end = E if piece.last else text.cut_at_or_after(-(-piece.end // UNIT_BYTES) * UNIT_BYTES)
    if begin >= end:
        return

    def held(offset: int) -> bool:  # the split of the unit that starts at this offset
        return is_held_out(rel, offset // UNIT_BYTES, val_fraction)

    before = held(text.cut_before(begin)) if begin > 0 else None  # the previous unit's split
    a = begin
    while a < end:
        boundary = (a // UNIT_BYTES + 1) * UNIT_BYTES
        b = min(end, text.cut_at_or_after(boundary)) if boundary < end else end
        val = held(a)
        after = held(b) if b < E else None
        yield _text_unit(path, a, text.read(a, b), val, val != before, val != after, a > 0)
        before, a = val, b


class _TextFile:
    """A plain-text file's text (bytes [0, end)) read forward through a bounded buffer, with its
    cut points. `end` is the file's size, or the max_chars cap backed off to a whole character."""

    def __init__(self, fh, stop: int) -> None:
        self.fh = fh
        size = fh.seek(0, 2)
        end = size if stop < 0 else min(stop, size)
        if end < size:  # a cap: not inside a UTF-8 character (continuation bytes are 10xxxxxx)
            fh.seek(max(0, end - 3))
            head = fh.read(end - max(0, end - 3) + 1)
            k = len(head) - 1
            while k > 0 and head[k] & 0xC0 == 0x80:
                k -= 1
            end = max(0, end - 3) + k
        self.end = end
        self.base, self.buf = 0, b""  # the buffer holds bytes [base, base + len(buf))

    def _cover(self, lo: int, hi: int) -> None:
        """Make the buffer hold [lo, min(hi, end)); when it must read, it reads a chunk at least
        (appending copies the buffer: once per chunk, not per unit)."""
        hi = min(hi, self.end)
        if self.base <= lo and hi <= self.base + len(self.buf):
            return
        if not self.base <= lo <= self.base + len(self.buf):
            self.base, self.buf = lo, b""
        have = self.base + len(self.buf)
        self.fh.seek(have)
        self.buf += self.fh.read(min(self.end, max(hi, have + _CHUNK_BYTES)) - have)

    def cut_at_or_after(self, x: int) -> int:
        """The first cut point p >= x (text[p - 1] and text[p + 1] inside the text), else `end`."""
        pos = x
        while pos < self.end:
            self._cover(max(0, pos - 1), pos + 2)
            m = _CUT.search(self.buf, pos - self.base)
            if m:
                return self.base + m.start()
            if self.base + len(self.buf) >= self.end:
                break
            pos = self.base + len(self.buf) - 1  # its right neighbour was not read yet
        return self.end

    def cut_before(self, x: int) -> int:
        """The last cut point < x, or 0 (the document's start)."""
        hi, width = x, 4 * UNIT_BYTES
        while hi > 0:
            lo, width = max(0, hi - width), min(2 * width, _CHUNK_BYTES)
            self.fh.seek(lo)
            window = self.fh.read(min(hi + 1, self.end) - lo)
            found = [m.start() for m in _CUT.finditer(window) if m.start() < hi - lo]
            if found:
                return lo + found[-1]
            hi = lo + 1 if lo > 0 else 0
        return 0

    def read(self, a: int, b: int) -> bytes:
        """Bytes [a, b). Reading is forward: once a chunk's worth lies before b - 1, it is dropped."""
        self._cover(a, b)
        data = self.buf[a - self.base:b - self.base]
        if b - 1 - self.base >= _CHUNK_BYTES:  # (not per unit: each drop copies the rest)
            self.buf, self.base = self.buf[b - 1 - self.base:], b - 1
        return data


def _text_unit(path: Path, offset: int, raw: bytes, val: bool, bos: bool, eos: bool,
               continues: bool) -> Unit:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {offset + e.start}: {e.reason})") from None
    return Unit(text, val, bos, eos, continues)


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
