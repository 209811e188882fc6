"""A tiny line-plot rasteriser and PNG encoder (no plotting dependency): the loss curves of
``GET /fine-tunes/{job_id}/loss.png``."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

TRAIN_COLOR = (31, 119, 180)
VAL_COLOR = (255, 127, 14)
_AXIS_COLOR = (0, 0, 0)
_GRID_COLOR = (225, 225, 225)
_BACKGROUND = (255, 255, 255)


class Canvas:
    """RGB pixels, row-major, origin top-left."""

    def __init__(self, width: int, height: int, color=_BACKGROUND):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(color) * (width * height))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def get(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return tuple(self.pixels[i : i + 3])

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, width: int = 1) -> None:
        """Bresenham; ``width`` > 1 draws a square brush."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        lo, hi = -((width - 1) // 2), width // 2
        while True:
            if width == 1:
                self.set(x0, y0, color)
            else:
                self.rect(x0 + lo, y0 + lo, x0 + hi, y0 + hi, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def png(self) -> bytes:
        row = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * row : (y + 1) * row]) for y in range(self.height))
        return encode_png(self.width, self.height, raw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, raw: bytes) -> bytes:
    """8-bit RGB PNG from filtered scanlines (each row: filter byte 0 + ``3 * width`` bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def plot_png(
    series: Sequence[tuple[Sequence[tuple[float, float]], tuple[int, int, int]]],
    width: int = 640,
    height: int = 360,
) -> bytes:
    """Line plot of ``(points, color)`` series on shared axes (x: step, y: loss), light grid;
    no text. Empty (or all non-finite) series give empty axes."""
    left, right, top, bottom = 40, 16, 16, 32
    x_lo, x_hi, y_lo, y_hi = left, width - 1 - right, top, height - 1 - bottom
    canvas = Canvas(width, height)
    for i in range(1, 5):  # grid
        y = y_lo + (y_hi - y_lo) * i // 5
        canvas.line(x_lo, y, x_hi, y, _GRID_COLOR)
        x = x_lo + (x_hi - x_lo) * i // 5
        canvas.line(x, y_lo, x, y_hi, _GRID_COLOR)
    points = [
        [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)] for pts, _ in series
    ]
    every = [p for pts in points for p in pts]
    if every:
        xmin, xmax = min(x for x, _ in every), max(x for x, _ in every)
        ymin, ymax = min(y for _, y in every), max(y for _, y in every)
        if xmax == xmin:
            xmin, xmax = xmin - 1, xmax + 1
        pad = (ymax - ymin) * 0.05 or max(abs(ymax) * 0.05, 0.5)
        ymin, ymax = ymin - pad, ymax + pad

        def px(x: float, y: float) -> tuple[int, int]:
            return (
                round(x_lo + (x - xmin) / (xmax - xmin) * (x_hi - x_lo)),
                round(y_hi - (y - ymin) / (ymax - ymin) * (y_hi - y_lo)),
            )

        for pts, (_, color) in zip(points, series, strict=True):
            coords = [px(x, y) for x, y in pts]
            for (a, b), (c, d) in zip(coords, coords[1:], strict=False):
                canvas.line(a, b, c, d, color, width=2)
            if len(coords) == 1:
                canvas.rect(coords[0][0] - 2, coords[0][1] - 2, coords[0][0] + 2, coords[0][1] + 2, color)
    canvas.line(x_lo, y_lo, x_lo, y_hi, _AXIS_COLOR, width=2)  # axes over the curves' edges
    canvas.line(x_lo, y_hi, x_hi, y_hi, _AXIS_COLOR, width=2)
    for i in range(6):  # ticks
        x = x_lo + (x_hi - x_lo) * i // 5
        canvas.line(x, y_hi, x, y_hi + 5, _AXIS_COLOR)
        y = y_lo + (y_hi - y_lo) * i // 5
        canvas.line(x_lo - 5, y, x_lo, y, _AXIS_COLOR)
    for i, (_, color) in enumerate(series):  # legend: a swatch per series that has points
        if points[i]:
            canvas.rect(x_hi - 14 - 20 * i, y_lo + 4, x_hi - 4 - 20 * i, y_lo + 14, color)
    return canvas.png()
