"""The drift heat map: a PNG that decodes, terminal text of the right shape, and refusals of bad input."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from fleet.drift import heatmap


def _decode(data: bytes) -> tuple[int, int, np.ndarray]:
    """Parse a PNG by hand: check signature, chunk CRCs, IHDR and filter bytes; return width, height and RGB pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, color_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color_type, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert np.all(rows[:, 0] == 0)
    return width, height, rows[:, 1:].reshape(height, width, 3)


def test_the_png_decodes_with_valid_chunks_and_the_right_size() -> None:
    values = np.linspace(-1.0, 1.0, 12)
    width, height, pixels = _decode(heatmap.png(values, (3, 4), scale=5))
    assert (width, height) == (4 * 5, 3 * 5)
    assert pixels.shape == (15, 20, 3)


def test_a_zero_cell_is_white_the_top_positive_red_and_the_most_negative_blue() -> None:
    values = [0.0, 0.042, -0.03, 0.01]
    scale = 4
    _, _, pixels = _decode(heatmap.png(values, (2, 2), scale=scale))

    def cell(row: int, col: int) -> tuple[int, ...]:
        block = pixels[row * scale : (row + 1) * scale, col * scale : (col + 1) * scale]
        assert np.all(block == block[0, 0])
        return tuple(int(c) for c in block[0, 0])

    assert cell(0, 0) == (255, 255, 255)
    assert cell(0, 1) == (255, 0, 0)
    red, green, blue = cell(1, 0)
    assert blue == 255 and red == green and red < 255
    weak = cell(1, 1)
    assert weak[0] == 255 and 0 < weak[1] < 255


def test_the_default_scale_is_32_pixels_per_cell() -> None:
    width, height, _ = _decode(heatmap.png(np.zeros(64), (8, 8)))
    assert (width, height) == (256, 256)


def test_all_zero_values_draw_white_and_text_of_spaces() -> None:
    _, _, pixels = _decode(heatmap.png([0.0] * 4, (2, 2), scale=2))
    assert np.all(pixels == 255)
    assert heatmap.terminal([0.0] * 4, (2, 2), color=False) == "    \n    "
    assert heatmap.legend([0.0] * 4) == "blue: moved down, red: moved up; max |shift| 0"


def test_plain_terminal_output_has_one_line_per_row_two_characters_per_cell_and_no_escapes() -> None:
    values = np.linspace(-0.05, 0.05, 64)
    text = heatmap.terminal(values, (8, 8), color=False)
    lines = text.split("\n")
    assert len(lines) == 8
    assert all(len(line) == 16 for line in lines)
    assert "\x1b" not in text
    assert lines[0][:2] == "@-" and lines[-1][-2:] == "@+"


def test_colour_terminal_output_has_one_background_per_cell_and_resets_every_line() -> None:
    values = np.linspace(-1.0, 1.0, 6)
    text = heatmap.terminal(values, (2, 3))
    lines = text.split("\n")
    assert len(lines) == 2
    for line in lines:
        assert line.count("\x1b[48;2;") == 3
        assert line.endswith("\x1b[0m")
    assert "\x1b[48;2;0;0;255m" in lines[0] and "\x1b[48;2;255;0;0m" in lines[1]
    assert not text.endswith("\n")


def test_grid_lays_values_out_row_major() -> None:
    assert heatmap.grid(range(6), (2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("call", [heatmap.grid, heatmap.png, heatmap.terminal])
def test_a_length_that_does_not_fill_the_grid_raises_value_error(call: object) -> None:
    with pytest.raises(ValueError):
        call([0.1] * 63, (8, 8))  # type: ignore[operator]


def test_the_legend_names_the_colours_and_the_largest_shift() -> None:
    assert heatmap.legend([0.01, -0.042, 0.0]) == "blue: moved down, red: moved up; max |shift| 0.042"


def test_non_finite_values_are_grey_and_do_not_set_the_scale() -> None:
    values = [float("nan"), 0.5, -0.25, 0.0]
    _, _, pixels = _decode(heatmap.png(values, (2, 2), scale=1))
    assert tuple(pixels[0, 0]) == heatmap.GREY
    assert tuple(pixels[0, 1]) == (255, 0, 0)
    assert heatmap.terminal(values, (2, 2), color=False).split("\n")[0] == "??@+"
