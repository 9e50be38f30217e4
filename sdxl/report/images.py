"""PNG pieces of the report, composed with PIL: validation over time and page thumbnails."""

from __future__ import annotations

import base64
import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from sdxl.images import image_boxes
from sdxl.report.readers import spread

MAX_CELL = 192  # px: a validation cell is shown at most this large
MIN_COLUMN = 96  # px: room for a prompt header above small cells
GAP = 4  # px of white between cells
MAX_ROWS = 12  # snapshots shown; more are thinned out evenly (first and last kept)
LABEL_W, LINE_H = 96, 15
HEADER_LINES = 3
GREY = (235, 235, 235)


def _font(size: int = 12):
    return ImageFont.load_default(size=size)


def grid_cells(grid: Image.Image, count: int, size: int | None,
               sizes: Sequence[tuple[int, int]] = ()) -> list[Image.Image]:  # fmt: skip
    """The `count` images of a make_grid() tile, captions cut off.

    make_grid puts `cols` images per row in cells of the largest width and height, each image
    centred at the top of its cell above its caption. With each image's (width, height)
    (`sizes`) every image is cut out exactly; else the columns are found from the image size
    when it divides the width, else make_grid's own default.
    """
    if len(sizes) == count and count:
        cols = max(grid.width // max(s[0] for s in sizes), 1)
        cell_h = grid.height // math.ceil(count / cols)
        return [grid.crop(box) for box in image_boxes(list(sizes), cols, cell_h)]
    divides = size and grid.width % size == 0
    cols = grid.width // size if divides else math.ceil(math.sqrt(count))
    w = grid.width // cols
    cell_h = grid.height // math.ceil(count / cols)
    h = min(size or w, cell_h)
    return [grid.crop(((i % cols) * w, (i // cols) * cell_h, (i % cols) * w + w,
                       (i // cols) * cell_h + h)) for i in range(count)]  # fmt: skip


def _missing_cell(cell: int, text: str) -> Image.Image:
    image = Image.new("RGB", (cell, cell), GREY)
    ImageDraw.Draw(image).text((6, cell // 2 - 6), text, fill="black", font=_font())
    return image


def _snapshot_cells(folder: Path, grid: dict, prompts: Sequence[str], size, cell: int,
                    sizes: Sequence[tuple[int, int]] = ()):  # fmt: skip
    """One snapshot's images, scaled to fit `cell` x `cell`; a grey cell where the PNG cannot be
    read."""
    try:
        with Image.open(folder / str(grid.get("file", ""))) as image:
            cells = grid_cells(image.convert("RGB"), len(prompts), size, sizes)
    except (OSError, ValueError):
        return [_missing_cell(cell, "grid missing")] * len(prompts)
    return [c.resize((max(cell * c.width // max(c.width, c.height, 1), 1),
                      max(cell * c.height // max(c.width, c.height, 1), 1))) for c in cells]  # fmt: skip


def _wrap(text: str, width_px: int, lines: int) -> list[str]:
    wrapped = textwrap.wrap(text, max(8, width_px // 7)) or [""]
    if len(wrapped) > lines:
        wrapped = [*wrapped[: lines - 1], wrapped[lines - 1][:-1] + "…"]
    return wrapped


def _draw_headers(draw: ImageDraw.ImageDraw, prompts: Sequence[str], column: int) -> None:
    """Each prompt, wrapped, above its column."""
    for col, prompt in enumerate(prompts):
        x = LABEL_W + col * (column + GAP) + 3
        for k, line in enumerate(_wrap(prompt, column - 6, HEADER_LINES)):
            draw.text((x, 4 + k * LINE_H), line, fill="black", font=_font())


def validation_over_time(index: dict, folder: Path) -> Image.Image:
    """Rows: snapshot steps; columns: prompts (the same prompt and seed down each column)."""
    prompts = [str(p) for p in index.get("prompts", [])]
    grids = list(index.get("grids") or [])
    if not grids or not prompts:
        return validation_off()
    size = int(index.get("size") or 0) or None
    samples = index.get("samples") or []
    sizes = [(int(s["width"]), int(s["height"])) for s in samples if "width" in s]
    cell = min(max([size or 0, *(max(s) for s in sizes)]) or MAX_CELL, MAX_CELL)
    column, pitch = max(cell, MIN_COLUMN), cell + GAP  # column width, row height
    shown = [grids[k] for k in spread(len(grids), MAX_ROWS)]
    header_h = LINE_H * HEADER_LINES + 8
    footer_h = LINE_H + 8 if len(shown) < len(grids) else 0
    width = LABEL_W + (column + GAP) * len(prompts)
    height = header_h + pitch * len(shown) + footer_h
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    _draw_headers(draw, prompts, column)
    for row, grid in enumerate(shown):
        y = header_h + row * pitch
        label = f"step {grid.get('step', '?')}"
        draw.text((6, y + cell // 2 - 7), label, fill="black", font=_font(13))
        for col, image in enumerate(_snapshot_cells(folder, grid, prompts, size, cell, sizes)):
            sheet.paste(image, (LABEL_W + col * (column + GAP) + (column - cell) // 2, y))
    if footer_h:
        note = f"{len(shown)} of {len(grids)} snapshots shown, evenly spaced"
        draw.text((6, sheet.height - footer_h + 4), note, fill="black", font=_font())
    return sheet


def validation_off() -> Image.Image:
    """A small PNG saying there are no validation grids, and how to get them."""
    lines = ["Validation is off for this run: no grids were made.",
             "To see fixed-seed samples during training, set in config.yaml:",
             "  train.validation_prompts: a list of prompts",
             "  train.validation_interval: every how many steps (0 is off)"]  # fmt: skip
    image = Image.new("RGB", (560, 24 + LINE_H * len(lines) + 12), "white")
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(lines):
        draw.text((12, 12 + k * (LINE_H + 4)), line, fill="black", font=_font(13))
    return image


def thumbnail_uri(path: str | Path, size: int = 192) -> str | None:
    """A JPEG thumbnail as a data: URI (pages stay self-contained), None if unreadable."""
    try:
        with Image.open(path) as image:
            thumb = image.convert("RGB")
    except (OSError, ValueError):
        return None
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
