"""A tiny dependency-free line-plot renderer writing PNG files (zlib + struct only).

Enough for the decoding report: side-by-side panels, each with axes, tick marks labelled with
numbers (a 3x5 pixel font), optionally a log y axis and a dashed reference line, and one coloured
line with points per series. No titles or legends: the caller prints what the panels and colours mean.
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
COLOR_NAMES = ["blue", "red", "green", "purple", "orange", "cyan"]
_FONT = {  # 3x5 glyphs, rows top to bottom, '#' = ink
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###",
    "3": "###,..#,###,..#,###", "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###", "7": "###,..#,..#,..#,..#", "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###", ".": "...,...,...,...,.#.", "-": "...,...,###,...,...",
    "e": "...,###,#.#,##.,###"}


@dataclass
class Panel:
    series: list[tuple[list[float], list[float]]]  # (xs, ys) per line, coloured by COLORS order
    log_y: bool = False
    hline: float | None = None  # dashed reference line, e.g. speedup 1.0
    xticks: list[float] = field(default_factory=list)  # default: every x of the first series


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int], r: int = 0) -> None:
        for yy in range(y - r, y + r + 1):
            for xx in range(x - r, x + r + 1):
                if 0 <= xx < self.w and 0 <= yy < self.h:
                    i = 3 * (yy * self.w + xx)
                    self.px[i:i + 3] = bytes(c)

    def line(self, x0: int, y0: int, x1: int, y1: int, c, dash: int = 0) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(n + 1):
            if not dash or (s // dash) % 2 == 0:
                self.dot(round(x0 + (x1 - x0) * s / n), round(y0 + (y1 - y0) * s / n), c)

    def text(self, x: int, y: int, s: str, c=(0, 0, 0)) -> None:
        for k, ch in enumerate(s):
            for r, row in enumerate(_FONT.get(ch, "...,...,...,...,...").split(",")):
                for q, bit in enumerate(row):
                    if bit == "#":
                        self.dot(x + 4 * k + q, y + r, c)

    def png(self) -> bytes:
        stride = 3 * self.w  # each row: filter byte 0 (none), then RGB bytes
        raw = b"".join(b"\x00" + bytes(self.px[y * stride:(y + 1) * stride]) for y in range(self.h))
        chunk = lambda tag, data: (struct.pack(">I", len(data)) + tag + data  # noqa: E731
                                   + struct.pack(">I", zlib.crc32(tag + data)))
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _label(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _yticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:  # lo, hi are log10 values; ticks at 1, 2, 5 x 10^k, or only 10^k if that is plenty
        ticks = [m * 10.0 ** k for k in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
                 if lo <= k + math.log10(m) <= hi]
        if len(ticks) < 2:  # less than a decade: plain ticks between the data values
            return _yticks(10.0 ** lo, 10.0 ** hi, False)
        return [t for t in ticks if f"{t:.0e}"[0] == "1"] if len(ticks) > 6 else ticks
    step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1.0))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (m * step) <= 5)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _draw_panel(cv: _Canvas, p: Panel, x0: int, width: int) -> None:
    left, right, top, bottom = x0 + 44, x0 + width - 12, 12, cv.h - 22
    f = (lambda v: math.log10(max(v, 1e-30))) if p.log_y else (lambda v: v)
    xs = [x for s in p.series for x in s[0]]
    ys = [f(y) for s in p.series for y in s[1] if math.isfinite(y)] + ([f(p.hline)] if p.hline else [])
    if not xs or not ys:
        return
    (xlo, xhi), (ylo, yhi) = (min(xs), max(max(xs), min(xs) + 1e-9)), (min(ys), max(ys))
    pad = (yhi - ylo) * 0.08 or 0.5
    ylo, yhi = ylo - pad, yhi + pad
    X = lambda x: round(left + 8 + (x - xlo) / (xhi - xlo) * (right - left - 16))  # noqa: E731
    Y = lambda y: round(bottom - (f(y) - ylo) / (yhi - ylo) * (bottom - top))  # noqa: E731
    cv.line(left, top, left, bottom, (0, 0, 0))
    cv.line(left, bottom, right, bottom, (0, 0, 0))
    for x in p.xticks or sorted(set(p.series[0][0])):
        cv.line(X(x), bottom, X(x), bottom + 4, (0, 0, 0))
        cv.text(X(x) - 2 * len(_label(x)), bottom + 8, _label(x))
    for t in _yticks(ylo, yhi, p.log_y):  # data values, on either scale
        cv.line(left - 4, Y(t), left, Y(t), (0, 0, 0))
        cv.text(left - 6 - 4 * len(_label(t)), Y(t) - 2, _label(t))
    if p.hline is not None:
        cv.line(left, Y(p.hline), right, Y(p.hline), (128, 128, 128), dash=4)
    for i, (sx, sy) in enumerate(p.series):
        c = COLORS[i % len(COLORS)]
        pts = [(X(x), Y(y)) for x, y in zip(sx, sy) if math.isfinite(y)]
        for (a, b), (cc, d) in zip(pts, pts[1:]):
            cv.line(a, b, cc, d, c)
        for a, b in pts:
            cv.dot(a, b, c, r=2)


def write_png(path: str, panels: list[Panel], panel_width: int = 360, height: int = 260) -> None:
    """Render `panels` side by side into a PNG file at `path`."""
    cv = _Canvas(panel_width * max(1, len(panels)), height)
    for i, p in enumerate(panels):
        _draw_panel(cv, p, i * panel_width, panel_width)
    with open(path, "wb") as fh:
        fh.write(cv.png())
