"""Regenerate the bundled example dataset: `python examples/make_example_dataset.py`.

Writes 32 images of simple coloured shapes (circle, square, triangle, star in red, blue,
green, yellow) on plain or gradient backgrounds to examples/shapes/, each with a caption such
as "a red circle on a white background", plus examples/prompts.txt (16 prompts in the same
style). Deterministic: a fixed seed and PIL only, so the same files come out every time.
Something a LoRA visibly learns in a few hundred steps, small enough to ship (~250 KB).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 80, 215),
    "green": (35, 160, 70),
    "yellow": (240, 200, 30),
}
# name -> (top colour, bottom colour); plain backgrounds have both the same.
BACKGROUNDS = {
    "white": ((255, 255, 255), (255, 255, 255)),
    "black": ((15, 15, 15), (15, 15, 15)),
    "gray gradient": ((235, 235, 235), (120, 120, 120)),
    "purple gradient": ((225, 200, 245), (110, 60, 150)),
}
SUPERSAMPLE = 4  # draw large, then downscale: antialiased edges with PIL alone


def background(size: tuple[int, int], top: tuple, bottom: tuple) -> Image.Image:
    """A vertical linear gradient from `top` to `bottom` (plain when they are equal)."""
    mask = Image.linear_gradient("L").resize(size)  # 0 at the top, 255 at the bottom
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)


def shape_points(shape: str, cx: float, cy: float, r: float, turn: float) -> list:
    """Polygon vertices (or the bounding box for a circle) of one shape."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    corners = {"square": 4, "triangle": 3, "star": 10}[shape]
    start = -math.pi / 2 + turn + (math.pi / 4 if shape == "square" else 0.0)
    points = []
    for k in range(corners):
        radius = r * (0.45 if shape == "star" and k % 2 else 1.0)
        angle = start + 2 * math.pi * k / corners
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_image(shape: str, colour: str, bg: str, size: tuple[int, int], rng: random.Random):
    """One picture: the shape at a jittered position, size and rotation."""
    big = (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE)
    image = background(big, *BACKGROUNDS[bg])
    short = min(big)
    r = short * rng.uniform(0.26, 0.36)
    cx = big[0] / 2 + rng.uniform(-0.12, 0.12) * short
    cy = big[1] / 2 + rng.uniform(-0.12, 0.12) * short
    turn = rng.uniform(-0.2, 0.2)
    points = shape_points(shape, cx, cy, r, turn)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(points, fill=COLOURS[colour])
    else:
        draw.polygon(points, fill=COLOURS[colour])
    return image.resize(size, Image.Resampling.LANCZOS)


def caption(shape: str, colour: str, bg: str) -> str:
    return f"a {colour} {shape} on a {bg} background"


def write_dataset(out_dir: Path, seed: int) -> None:
    """32 images: every shape x colour twice, 8 of them non-square, PNG and JPEG mixed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = list(itertools.product(SHAPES, COLOURS)) * 2
    for index, (shape, colour) in enumerate(combos):
        bg = list(BACKGROUNDS)[(index + index // 4 + index // 16) % len(BACKGROUNDS)]
        size = {3: (384, 256), 7: (256, 384)}.get(index % 8, (256, 256))
        image = draw_image(shape, colour, bg, size, rng)
        stem = out_dir / f"{index:02d}_{colour}_{shape}"
        if index % 2:
            image.save(stem.with_suffix(".jpg"), quality=90)
        else:
            image.save(stem.with_suffix(".png"), optimize=True)
        stem.with_suffix(".txt").write_text(caption(shape, colour, bg) + "\n", encoding="utf-8")


def write_prompts(path: Path) -> None:
    """16 prompts in the captions' style; half pair a shape and background never seen together."""
    backgrounds = list(BACKGROUNDS)
    lines = [
        caption(shape, colour, backgrounds[(s + c + 2 * (c % 2)) % len(backgrounds)])
        for (s, shape), (c, colour) in itertools.product(enumerate(SHAPES), enumerate(COLOURS))
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE / "shapes")
    parser.add_argument("--prompts", type=Path, default=HERE / "prompts.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_dataset(args.out_dir, args.seed)
    write_prompts(args.prompts)


if __name__ == "__main__":
    main()
