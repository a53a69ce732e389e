"""Read what a W&B run recorded offline: the history rows (step -> keys) of `run-<id>.wandb` files.

The file is the LevelDB log format wandb writes (a 7-byte ':W&B' header, then 32 KiB blocks of
checksummed, possibly fragmented records), each record one `wandb_internal_pb2.Record`. Only the
test reads it, to check that a resumed run continues the same run's history.
"""
from __future__ import annotations

from pathlib import Path

_BLOCK = 32768
_HEADER = 7  # ':W&B', a 2-byte magic, a version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, out = _HEADER, b"", []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
    return [Record.FromString(c) for c in out]


def history(path: Path) -> dict[int, set[str]]:
    """step -> the keys logged at that step."""
    rows: dict[int, set[str]] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.setdefault(r.history.step.num, set()).update(i.key or "/".join(i.nested_key)
                                                              for i in r.history.item)
    return rows


def run_id(path: Path) -> str:
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            return r.run.run_id
    raise AssertionError(f"{path} holds no run record")
