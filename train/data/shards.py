"""What one prepare shard reads: the shard plan, the held-out choice, and the units of text.

Shard plan (`plan_shards`): a pure function of the corpus' files (relative paths, sizes),
prepare.shard_bytes and data.max_chars, so every worker, task and rerun computes the same plan and
the output never depends on how the work was divided.
- Files are taken in corpus order. data.max_chars becomes a cap on input bytes: files are taken
  whole until the cap; the file that crosses it is cut there (.jsonl: after the line the cap falls
  in; plain text: at the cap, backed off to a whole UTF-8 character). The cut text is a document.
- A .jsonl or plain-text file (.txt, stdlib .py) larger than shard_bytes is split into byte ranges
  [k * shard_bytes, (k + 1) * shard_bytes) read by seeking. A .jsonl range owns the lines that
  *start* inside it; a plain-text range owns the units (below) that start inside it.
- A compressed file (.jsonl.gz/.zst) or a .parquet file cannot be entered in the middle: one shard.
- Consecutive small files are grouped into one shard of up to shard_bytes.

Documents: a .jsonl record or .parquet row is one document, and so is a plain-text file. Empty
documents are left out. Every document is stored as BOS + the ids the tokenizer gives for its whole
text + EOS (exactly those ids, except at counted fallback cuts, below).

Units: the pieces of text that are tokenized and held out. A .jsonl record or .parquet row is one
unit. A plain-text document is cut into units at its block cuts c_k, one per block of UNIT_BYTES:
- Candidates are the points before a run of whitespace ("word| next", "word|\n"), after a
  newline ("\n|next"), and before and after the sentence punctuation of scripts written without
  spaces (。、，！？；：and the Devanagari danda): found in the bytes, always between characters.
- c_k is the first candidate in [k * UNIT_BYTES, k * UNIT_BYTES + CUT_SEARCH_BYTES) that the
  tokenizer confirms as exact (train/data/tokenizer_base.py: encoding the text before it and
  continuing from it gives the ids of the text across it, checked on CUT_WINDOW_BYTES each side),
  trying at most MAX_CUT_TRIES candidates; the document's end if it comes first; else (a stretch
  with no exact cut point, one huge "word") the *fallback* cut: the first character start at or
  after k * UNIT_BYTES. There the ids are not exactly those of the whole text (the text still is:
  it decodes back exactly); prepare counts these cuts in the manifest ("fallback_cuts") and prints
  them.
- The units are [c_k, next larger c), so no unit is longer than MAX_UNIT_BYTES = UNIT_BYTES +
  CUT_SEARCH_BYTES, and c_k depends only on the text near k * UNIT_BYTES: any range, worker or
  task finds the same units, reading a bounded window of the file at a time.
Where a text document's units go to both splits, each maximal run of consecutive units of one
split is stored as its own document, BOS ... EOS: a train sequence never jumps over held-out text,
and a held-out run never runs into another without a boundary. The document index of a shard lists
where each stored unit's tokens end.

Held-out units: unit u of file f is validation iff hash(f's path relative to the corpus root, u's
key) / 2^64 < val_fraction, where the key is the line's byte offset (.jsonl), the row number
(.parquet) or the unit's start offset // UNIT_BYTES (text): a pure function of the text,
independent of workers, tasks, shard sizes, seeds and seq_len. A single text file of any language
thus holds out about val_fraction of its units.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.data.sources import COMPRESSED, Corpus, DataError, open_binary, parse_record, read_parquet_rows
from train.data.tokenizer_base import CUT_WINDOW_BYTES, Tokenizer

log = logging.getLogger(__name__)

UNIT_BYTES = 4096  # plain text: one block cut per this many bytes (see the docstring)
CUT_SEARCH_BYTES = 4096  # how far past a block's start an exact cut point is looked for
MAX_CUT_TRIES = 16  # candidates checked per block (bounds the cost of text the tokenizer never splits)
MAX_UNIT_BYTES = UNIT_BYTES + CUT_SEARCH_BYTES  # the longest plain-text unit
_CHUNK_BYTES = 4 << 20  # plain text is read about this many bytes at a time
# The sentence punctuation of scripts without spaces: 。、，！？；：「」 and the Devanagari danda.
_PUNCT = b"|".join(re.escape(c.encode()) for c in "。、，！？；：「」।")
_CANDIDATE = re.compile(rb"(?<=[^ \t\n\r\f\v])(?=[ \t\n\r\f\v])|(?<=\n)(?=[^ \t\n\r\f\v])|(?=" + _PUNCT
                        + rb")|(?<=" + _PUNCT + rb")")


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
    fallback: bool = False  # starts at a fallback cut (not an exact one; see the docstring)


def splittable(path: Path) -> bool:
    return not path.name.endswith((*COMPRESSED, ".parquet"))


def is_text(path: Path) -> bool:
    return not path.name.endswith((".jsonl", *COMPRESSED, ".parquet"))


def plan_shards(corpus: Corpus, sizes: list[int], shard_bytes: int, max_chars: int | None) -> list[list[Piece]]:
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


def read_units(corpus: Corpus, piece: Piece, val_fraction: float, tok: Tokenizer) -> Iterator[Unit]:
    """The units of one piece, in file order; `tok` decides the exact cut points of plain text."""
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
        text = _TextFile(fh, piece.stop, tok)
        if corpus.is_stdlib:  # a source file we cannot decode is skipped: the user cannot fix it
            try:  # (standard-library files are small and never split)
                text.read(0, text.end).decode("utf-8")
            except UnicodeDecodeError as e:
                log.warning("skipping %s: not UTF-8 (%s)", path, e.reason)
                return
        yield from _text_units(path, rel, text, piece, val_fraction)


def _text_units(path: Path, rel: str, text: _TextFile, piece: Piece, val_fraction: float) -> Iterator[Unit]:
    """The units of a plain-text piece: [a, b) from the piece's first unit start to its end, each
    held out by block a // UNIT_BYTES; BOS where a run of one split starts (the document's start,
    or after a unit of the other split), EOS where it ends (the document's end, or before one)."""
    E = text.end
    # a range starts at the cut point of the first block at or after its first byte (so its units
    # are the ones of the whole document, whatever the shard size)
    begin = 0 if piece.start == 0 else text.block_cut(-(-piece.start // UNIT_BYTES))[0]
    end = E if piece.last else text.block_cut(-(-piece.end // UNIT_BYTES))[0]
    if begin >= end:
        return

    def held(offset: int) -> bool:  # the split of the unit that starts at this offset
        return is_held_out(rel, offset // UNIT_BYTES, val_fraction)

    before = held(text.unit_before(begin)) if begin > 0 else None  # the previous unit's split
    a, fallback = begin, begin > 0 and text.block_cut(-(-piece.start // UNIT_BYTES))[1]
    while a < end:
        b, next_fallback = text.block_cut(a // UNIT_BYTES + 1)  # (<= end: cuts are monotone in k)
        b = min(b, end)
        val = held(a)
        after = held(b) if b < E else None
        yield _text_unit(path, a, text.read(a, b), val, val != before, val != after, a > 0, fallback)
        before, a, fallback = val, b, next_fallback


class _TextFile:
    """A plain-text file's text (bytes [0, end)) read forward through a bounded buffer, with its
    cut points (see the module docstring). `end` is the file's size, or the max_chars cap backed
    off to a whole character; `tok` decides which candidate cut points are exact."""

    def __init__(self, fh, stop: int, tok: Tokenizer) -> None:
        self.fh, self.tok = fh, tok
        self.base, self.buf = 0, b""  # the buffer holds bytes [base, base + len(buf))
        self.size = size = fh.seek(0, 2)
        end = size if stop < 0 else min(stop, size)
        if end < size:  # a cap: not inside a UTF-8 character
            end = self._char_start(end, forward=False, limit=size)
        self.end = end
        self._cuts: dict[int, tuple[int, bool]] = {}  # block -> its cut (the last few asked)

    def _char_start(self, x: int, forward: bool, limit: int | None = None) -> int:
        """x if a UTF-8 character starts there (or x is the text's end), else the start of the next
        character (forward) or of the one x is inside (continuation bytes are 10xxxxxx)."""
        limit = self.end if limit is None else limit
        if x >= limit:
            return x
        lo = x if forward else max(0, x - 3)
        self._cover(lo, min(limit, x + 4))
        k = x
        while 0 < k < limit and self.buf[k - self.base] & 0xC0 == 0x80:
            k += 1 if forward else -1
        return k

    def _cover(self, lo: int, hi: int) -> None:
        """Make the buffer hold [lo, min(hi, size)); when it must read, it reads a chunk at least
        (appending copies the buffer: once per chunk, not per unit)."""
        hi = min(hi, self.size)
        if self.base <= lo and hi <= self.base + len(self.buf):
            return
        if not self.base <= lo <= self.base + len(self.buf):
            self.base, self.buf = lo, b""
        have = self.base + len(self.buf)
        self.fh.seek(have)
        self.buf += self.fh.read(max(hi, have + _CHUNK_BYTES) - have)

    def block_cut(self, k: int) -> tuple[int, bool]:
        """(c_k, whether it is a fallback cut): the first exact cut point in [k * UNIT_BYTES,
        k * UNIT_BYTES + CUT_SEARCH_BYTES) among the first MAX_CUT_TRIES candidates there; the
        text's end if that comes first; else the first character start at or after k * UNIT_BYTES."""
        if k in self._cuts:
            return self._cuts[k]
        x = k * UNIT_BYTES
        if x <= 0 or x >= self.end:
            cut = (max(0, min(x, self.end)), False)
        else:
            limit = min(self.end, x + CUT_SEARCH_BYTES)
            self._cover(max(0, x - CUT_WINDOW_BYTES), limit + CUT_WINDOW_BYTES)
            cut = None
            for n, m in enumerate(_CANDIDATE.finditer(self.buf, x - self.base, limit - self.base)):
                if n == MAX_CUT_TRIES:
                    break
                if self._is_exact(self.base + m.start()):
                    cut = (self.base + m.start(), False)
                    break
            if cut is None:
                cut = (self.end, False) if limit == self.end else (self._char_start(x, forward=True), True)
        if len(self._cuts) > 64:
            self._cuts.clear()
        self._cuts[k] = cut
        return cut

    def _is_exact(self, p: int) -> bool:
        """Whether the tokenizer splits the text at p: on CUT_WINDOW_BYTES each side (whole
        characters, within the text)."""
        lo = self._char_start(max(0, p - CUT_WINDOW_BYTES), forward=True)
        hi = self._char_start(min(self.end, p + CUT_WINDOW_BYTES), forward=False)
        self._cover(lo, hi)
        try:
            left = self.buf[lo - self.base:p - self.base].decode("utf-8")
            right = self.buf[p - self.base:hi - self.base].decode("utf-8")
        except UnicodeDecodeError:
            return False  # not text: the unit's decoding reports where
        return self.tok.is_exact_cut(left, right)

    def unit_before(self, x: int) -> int:
        """The start of the unit that ends at the cut point x > 0: the last block cut before x."""
        k = -(-x // UNIT_BYTES) - 1
        while self.block_cut(k)[0] >= x:  # (c_k < x once k * UNIT_BYTES + CUT_SEARCH_BYTES <= x)
            k -= 1
        return self.block_cut(k)[0]

    def read(self, a: int, b: int) -> bytes:
        """Bytes [a, b). Reading is forward: once a chunk's worth lies before a, it is dropped."""
        self._cover(a, b)
        data = self.buf[a - self.base:b - self.base]
        keep = a - 2 * CUT_SEARCH_BYTES  # (cut points still look back a little)
        if keep - self.base >= _CHUNK_BYTES:  # (not per unit: each drop copies the rest)
            self.buf, self.base = self.buf[keep - self.base:], keep
        return data


def _text_unit(path: Path, offset: int, raw: bytes, val: bool, bos: bool, eos: bool,
               continues: bool, fallback: bool) -> Unit:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {offset + e.start}: {e.reason})") from None
    return Unit(text, val, bos, eos, continues, fallback)


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
