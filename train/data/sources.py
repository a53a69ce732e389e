"""Where the text comes from: a corpus is a sorted list of files read as a stream of documents.

`data.source` is either `stdlib` (the embedded default: the running Python's standard-library
`.py` sources, present on every machine) or a path to a `.txt`, `.jsonl` or `.parquet` file, or to a
folder searched recursively for them. Everything is sorted, so the same files always give the same
documents in the same order. Document boundaries:
- `.txt`: the whole file is one document;
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one document per line, the string in field `data.text_field`
  (blank lines are skipped; .zst needs the zstandard package);
- `.parquet`: one document per row, column `data.text_field` (needs pyarrow);
- stdlib: one document per `.py` file (site-packages and test folders excluded).

Bad input fails early with the file (and line) in the message. `max_chars` caps the characters read
in total: the document that crosses the cap is cut there and reading stops.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STDLIB = "stdlib"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
COMPRESSED = (".jsonl.gz", ".jsonl.zst")
# Folders of the standard library that are not its own source, or are test data (deliberately
# broken encodings, generated files) rather than representative code.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class DataError(ValueError):
    """Unusable data or tokenizer; the message names the setting or the file (and line)."""


@dataclass(frozen=True)
class Corpus:
    """The files of one `data.source`, in reading order."""
    name: str  # data.source as given
    root: Path  # the folder (or file) the source resolves to
    files: tuple[Path, ...]
    text_field: str
    is_stdlib: bool

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def expected_chars(self, max_chars: int | None) -> int:
        """About how many characters `documents(max_chars)` yields (bytes ~ characters), for
        sampling and progress reports."""
        total = self.total_bytes
        return max(1, min(max_chars, total) if max_chars is not None else total)

    def identity(self) -> str:
        """A digest that changes when the corpus does: kind, root, text field and every file's
        relative path, size and modification time (cheap: no file is read). Every rank computes it,
        so the cache folder must show all ranks the same files with the same times."""
        h = hashlib.sha256()
        h.update(json.dumps([self.is_stdlib, str(self.root), self.text_field]).encode())
        for f in self.files:
            st = f.stat()
            h.update(json.dumps([str(f.relative_to(self.root)) if f != self.root else f.name,
                                 st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()

    def documents(self, max_chars: int | None = None) -> Iterator[str]:
        """Non-empty documents in order, at most `max_chars` characters in total."""
        left = max_chars if max_chars is not None else -1
        for f in self.files:
            for doc in _read_file(f, self.text_field, left, lenient=self.is_stdlib):
                if not doc:
                    continue
                if left >= 0:
                    doc = doc[:left]
                    left -= len(doc)
                yield doc
                if left == 0:
                    return


def open_corpus(source: str, text_field: str = "text") -> Corpus:
    """Resolve `data.source` into a `Corpus`; raise `DataError` if it names nothing readable."""
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, (".py",), skip=_STDLIB_SKIP_DIRS)
        if not files:
            raise DataError(f"data.source=stdlib: no .py files found under {root}")
        return Corpus(STDLIB, root, files, text_field, is_stdlib=True)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: {path} does not exist (use 'stdlib' for the embedded corpus, "
                        f"or a .txt/.jsonl/.parquet file or folder)")
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise DataError(f"data.source: {path} is not a {'/'.join(SUFFIXES)} file")
        return Corpus(source, path.resolve(), (path.resolve(),), text_field, is_stdlib=False)
    files = _walk(path.resolve(), SUFFIXES, skip={"__pycache__"})
    if not files:
        raise DataError(f"data.source: no {'/'.join(SUFFIXES)} files under folder {path}")
    return Corpus(source, path.resolve(), files, text_field, is_stdlib=False)


def _walk(root: Path, suffixes: tuple[str, ...], skip: set[str]) -> tuple[Path, ...]:
    """Files under `root` with one of `suffixes`, recursively, sorted by relative path; hidden
    files and folders (names starting with '.') are left out."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        found += [Path(folder) / n for n in names if n.endswith(suffixes) and not n.startswith(".")]
    return tuple(sorted(found, key=lambda p: p.relative_to(root).as_posix()))


def _read_file(path: Path, field: str, left: int, *, lenient: bool) -> Iterator[str]:
    if path.name.endswith((".jsonl", *COMPRESSED)):
        yield from _read_jsonl(path, field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, field)
    else:  # .txt, or a stdlib .py file: the whole file is one document
        try:
            with open(path, encoding="utf-8", newline="") as fh:  # CRLF kept: the text as prepared
                # Read no more than the cap needs: a huge file must not be loaded for a small cap.
                yield fh.read(left) if left >= 0 else fh.read()
        except UnicodeDecodeError as e:
            if lenient:  # a stdlib file we cannot decode is skipped: the user cannot fix it
                log.warning("skipping %s: not UTF-8 (%s)", path, e.reason)
                return
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def open_binary(path: Path) -> io.BufferedIOBase:
    """`path` opened for reading bytes, decompressed on the fly (.gz, .zst): a stream, never the
    whole file in memory."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst files needs the zstandard package "
                            f"(pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def parse_record(raw: bytes, field: str, where: str) -> str | None:
    """The text of one .jsonl line (None for a blank line); `where` ("file:line") names it in errors."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no field '{field}' (data.text_field); found: {keys}")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' is {type(text).__name__}, not a string")
    return text


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            text = parse_record(raw, field, f"{path}:{lineno}")
            if text is not None:
                yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    yield from (text for _, text in read_parquet_rows(path, field))


def read_parquet_rows(path: Path, field: str) -> Iterator[tuple[int, str]]:
    """(row number, text) of every row, read in batches (bounded memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow, which is not installed "
                        f"(pip install pyarrow), or convert the data to .jsonl") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column '{field}' (data.text_field); found: {', '.join(names)}")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column '{field}' is "
                                f"{type(text).__name__}, not a string")
            yield row, text
            row += 1
