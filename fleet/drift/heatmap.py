"""Per-feature drift as a small heat map, for inputs that are images (the digits model's 64 features are 8x8 pixels).

A table of 64 effect sizes hides what a picture shows at once: a shifted stroke, a brighter corner, a dead pixel
column. ``fleet drift show`` lays the per-feature values (typically the signed effect, Jensen-Shannon times the sign
of the shift) out row-major and draws them as a PNG file or in the terminal.

One diverging colormap serves both: 0 is white, positive (the feature moved up, the pixel got brighter) is red,
negative is blue, saturated at the largest ``|value|`` so the worst feature is always fully coloured. Non-finite
values (a feature with no verdict) are drawn grey and ignored for the scale.

Everything here is pure (numpy and the standard library only; the PNG is written with ``zlib`` and ``struct``), so
the fleet needs no imaging library and the same values always give the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np

#: The floor of the colour scale, so all-zero values draw white instead of dividing by zero.
MIN_SCALE = 1e-9
#: The density ramp of :func:`terminal` without colour, from ``|value| = 0`` to the maximum.
RAMP = " .:-=+*#%@"
#: The colour of a non-finite value (a feature with no verdict).
GREY = (128, 128, 128)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RESET = "\x1b[0m"


def grid(values: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Lay per-feature ``values`` out row-major as a ``shape`` (height, width) float array.

    Raises ``ValueError`` unless ``values`` is one-dimensional with exactly ``height * width`` entries, so a model
    whose features are not the image's pixels is refused rather than drawn scrambled.
    """
    height, width = (int(side) for side in shape)
    if height <= 0 or width <= 0:
        raise ValueError(f"shape must be positive, got {shape}")
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {array.shape}")
    if array.size != height * width:
        raise ValueError(f"{array.size} values do not fill a {height}x{width} grid ({height * width} needed)")
    return array.reshape(height, width).copy()


def _max_abs(array: np.ndarray) -> float:
    finite = np.abs(array[np.isfinite(array)])
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else MIN_SCALE


def _colors(cells: np.ndarray) -> np.ndarray:
    """RGB (uint8, shape + (3,)) of each cell in the diverging colormap: white at 0, red up, blue down."""
    finite = np.isfinite(cells)
    t = np.clip(np.where(finite, cells, 0.0) / _max_abs(cells), -1.0, 1.0)
    fade = np.rint(255.0 * (1.0 - np.abs(t)))
    full = np.full_like(fade, 255.0)
    red = np.where(t < 0, fade, full)
    blue = np.where(t > 0, fade, full)
    rgb = np.stack([red, fade, blue], axis=-1)
    rgb[~finite] = GREY
    return rgb.astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(values: Sequence[float], shape: tuple[int, int], *, scale: int = 32) -> bytes:
    """A PNG (8-bit RGB, each cell ``scale`` x ``scale`` pixels) of ``values`` laid out as :func:`grid` does.

    Written by hand (signature, IHDR, one IDAT with filter type 0 on every row, IEND) because an 8x8 map does not
    justify an imaging dependency.
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    rgb = _colors(grid(values, shape))
    pixels = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    height, width = pixels.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def terminal(values: Sequence[float], shape: tuple[int, int], *, color: bool = True) -> str:
    """The heat map as text: one line per grid row, two characters per cell, lines joined by ``\\n``.

    With ``color``, each cell is two spaces on a 24-bit ANSI background in the PNG's colormap, and every line ends
    with a reset, so nothing bleeds into what is printed next. Without it (a pipe, a log, ``NO_COLOR``), each cell is
    a density character from :data:`RAMP` by ``|value|`` relative to the maximum (any non-zero value gets at least
    ``.``), then a sign marker: ``+`` moved up, ``-`` moved down, a space for exactly zero; a non-finite value is
    ``??``. So ``@+`` is the strongest upward shift, ``.-`` a faint downward one and two spaces no shift at all.
    """
    cells = grid(values, shape)
    if color:
        rgb = _colors(cells)
        return "\n".join("".join(f"\x1b[48;2;{r};{g};{b}m  " for r, g, b in row.tolist()) + _RESET for row in rgb)
    top = _max_abs(cells)
    lines = []
    for row in cells:
        text = []
        for value in row.tolist():
            if not np.isfinite(value):
                text.append("??")
                continue
            level = round(min(abs(value) / top, 1.0) * (len(RAMP) - 1))
            level = max(level, 1) if value != 0 else 0
            sign = "+" if value > 0 else "-" if value < 0 else " "
            text.append(RAMP[level] + sign)
        lines.append("".join(text))
    return "\n".join(lines)


def legend(values: Sequence[float]) -> str:
    """One line explaining the colours and the scale, e.g. ``blue: moved down, red: moved up; max |shift| 0.042``."""
    array = np.asarray(values, dtype=np.float64).ravel()
    finite = np.abs(array[np.isfinite(array)])
    top = float(finite.max()) if finite.size else 0.0
    return f"blue: moved down, red: moved up; max |shift| {top:.3g}"
