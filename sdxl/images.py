"""Image grids for validation samples and contact sheets."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw, ImageFont, ImageOps


def fit_in_square(image: Image.Image, size: int) -> Image.Image:
    """The image scaled to fit a size x size white square, centred: its aspect ratio is kept."""
    return ImageOps.pad(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC, "white")


def image_boxes(sizes: list[tuple[int, int]], cols: int, cell_h: int) -> list[tuple[int, ...]]:
    """Where make_grid puts each image of `sizes` ((width, height) each): (left, top, right,
    bottom), in cells of the largest width, centred at the top of its cell. The report cuts
    the images out of a grid with the same boxes."""
    w = max(width for width, _ in sizes)
    boxes = []
    for i, (width, height) in enumerate(sizes):
        x, y = (i % cols) * w + (w - width) // 2, (i // cols) * cell_h
        boxes.append((x, y, x + width, y + height))
    return boxes


def make_grid(
    images: list[Image.Image], captions: list[str] | None = None, cols: int | None = None,
    caption_lines: int = 2,
) -> Image.Image:  # fmt: skip
    """Tile images in cells of the largest width and height, captions underneath.

    Each image keeps its size (centred at the top of its cell), so samples of other aspect
    ratios stay as drawn; images of one size tile edge to edge.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = max(im.width for im in images), max(im.height for im in images)
    font = ImageFont.load_default()
    line_h = 12 if captions else 0
    cell_h = h + line_h * caption_lines
    grid = Image.new("RGB", (cols * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, w // 6)
    boxes = image_boxes([im.size for im in images], cols, cell_h)
    for i, (image, box) in enumerate(zip(images, boxes, strict=True)):
        grid.paste(image.convert("RGB"), box[:2])
        if captions:
            x, y = (i % cols) * w, (i // cols) * cell_h
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for k, line in enumerate(lines):
                draw.text((x + 2, y + h + k * line_h), line, fill="black", font=font)
    return grid
