"""The demo's contact sheet: one PNG that shows what the model does, section by section.

    Text -> image      caption | retrieved doc 1 | retrieved doc 2 | generated (parsed ok?)
    Image -> text      image | generated caption | true caption
    Edits              before | instruction | after (the model's) | expected
    VQA                image | question | model's answer | truth

Every section is optional (a stage that did not run leaves its section out). Images are
scaled up with nearest neighbor so each pixel of the 32 px scenes stays visible.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cm3leon_jax import fs

SCALE = 3
GAP = 6
LINE = 12  # pixel height of one text line in PIL's default font
GOOD, BAD = (20, 130, 40), (190, 30, 30)


class _Row:
    """One row of cells: each cell is an image (uint8[h, w, 3]) or text, with a color."""

    def __init__(self, cells: Sequence[tuple[object, tuple[int, int, int]]], text_width: int):
        self.cells, self.text_width = list(cells), text_width


def _cell_size(cell, text_width: int, image_side: int) -> tuple[int, int]:
    if isinstance(cell, np.ndarray):
        return cell.shape[1] * SCALE, cell.shape[0] * SCALE
    lines = textwrap.wrap(str(cell), text_width // 6) or [""]
    return text_width, LINE * min(len(lines), max(1, image_side // LINE))


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, cell, color, x: int, y: int,
               text_width: int, image_side: int, font) -> None:
    if isinstance(cell, np.ndarray):
        big = Image.fromarray(np.ascontiguousarray(cell)).resize(
            (cell.shape[1] * SCALE, cell.shape[0] * SCALE), Image.NEAREST)
        canvas.paste(big, (x, y))
        return
    lines = textwrap.wrap(str(cell), text_width // 6) or [""]
    for j, line in enumerate(lines[:max(1, image_side // LINE)]):
        draw.text((x, y + LINE * j), line, fill=color, font=font)


def section(title: str, header: Sequence[str], rows: Sequence[Sequence], *,
            text_width: int = 210) -> tuple[str, list[str], list[_Row], int]:
    """A titled table; each row is a list of cells: an image, a string, or (string, ok)."""
    built = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, tuple):
                text, ok = cell
                cells.append((text, GOOD if ok else BAD))
            else:
                cells.append((cell, (0, 0, 0)))
        built.append(_Row(cells, text_width))
    return title, list(header), built, text_width


def write(sections: Sequence[tuple], path: str, *, title: str = "") -> str:
    """Stacks the sections into one PNG at `path`; returns the path."""
    font = ImageFont.load_default()
    image_side = 0
    for _, _, rows, _ in sections:
        for row in rows:
            for cell, _ in row.cells:
                if isinstance(cell, np.ndarray):
                    image_side = max(image_side, cell.shape[0] * SCALE)
    image_side = image_side or 4 * LINE
    layout, width, height = [], 0, LINE + 2 * GAP if title else GAP
    for name, header, rows, text_width in sections:
        block = [(name, None, height)]
        height += LINE + GAP + LINE + GAP // 2
        for row in rows:
            sizes = [_cell_size(c, text_width, image_side) for c, _ in row.cells]
            width = max(width, sum(w for w, _ in sizes) + GAP * (len(sizes) + 1))
            block.append((row, sizes, height))
            height += max(h for _, h in sizes) + GAP
        layout.append((header, block))
        height += GAP
    canvas = Image.new("RGB", (max(width, 400), height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, GAP), title, fill=(0, 0, 0), font=font)
    for header, block in layout:
        (name, _, y0), rows = block[0], block[1:]
        draw.text((GAP, y0), name, fill=(0, 0, 120), font=font)
        if rows:
            x = GAP
            for label, (w, _) in zip(header, rows[0][1]):
                draw.text((x, y0 + LINE + GAP), label, fill=(90, 90, 90), font=font)
                x += w + GAP
        for row, sizes, y in rows:
            x = GAP
            for (cell, color), (w, _) in zip(row.cells, sizes):
                _draw_cell(canvas, draw, cell, color, x, y, row.text_width, image_side, font)
                x += w + GAP
    fs.makedirs(os.path.dirname(path) or ".")
    with fs.open(path, "wb") as f:
        canvas.save(f, format="PNG")
    return path
