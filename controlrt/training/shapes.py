"""The synthetic shapes data set: images, captions and their control maps, generated in code.

Each sample is drawn from its own seed (``sample(seed)``), so the set is unbounded, the same seed
always gives the same sample, and held-out samples are simply seeds from another range
(``HELD_OUT``). A scene is one to three shapes (circle, square, triangle, line) in named colours
on a plain or striped background of another colour, with a caption such as "a red circle and a
blue square on a striped gray background". Its conditions:

- ``canny``: controlrt's own canny preprocessor (cv2.Canny, 100/200) on the image, the map users
  will feed at inference;
- ``seg``: a segmentation-like map, each shape filled with its class colour (``SEG_COLOURS``) on
  black, later shapes over earlier ones like in the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from controlrt.runtime.preprocess import canny

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "line")
SEG_COLOURS = {"circle": (255, 60, 60), "square": (60, 255, 60), "triangle": (60, 60, 255), "line": (255, 255, 60)}
CONDITIONS = ("canny", "seg")
# Words the captions use, for the generated tokenizer.
VOCABULARY = " ".join(["a", "an", "and", "on", "plain", "striped", "background", *COLOURS, *SHAPES])
# Seeds at or above this are never drawn in training: the held-out scenes fidelity is measured on.
HELD_OUT = 1 << 40


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    caption: str
    conditions: dict[str, Image.Image]


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_box(rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    radius = rng.uniform(0.12, 0.28) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    return cx, cy, radius


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill, width: int
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8), fill=fill)
    elif shape == "triangle":
        points = [
            (cx + r * np.cos(angle + k * 2 * np.pi / 3), cy + r * np.sin(angle + k * 2 * np.pi / 3)) for k in range(3)
        ]
        draw.polygon(points, fill=fill)
    else:  # a thick straight line through the centre
        dx, dy = r * np.cos(angle), r * np.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=width)


def sample(seed: int, size: int = 64) -> Sample:
    """The scene, caption and conditions of one seed."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    striped = bool(rng.random() < 0.3)
    base = np.array(COLOURS[background], dtype=np.float64)
    pixels = np.broadcast_to(base, (size, size, 3)).copy()
    if striped:  # low-contrast stripes: texture that canny at 100/200 does not see
        period = int(rng.integers(4, 9))
        stripes = ((np.arange(size)[:, None] + np.arange(size)[None, :]) // period) % 2
        pixels += np.where(stripes[..., None] == 1, 14.0, -14.0) * (1 if _luma(COLOURS[background]) < 128 else -1) * 0.5
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    seg = Image.new("RGB", (size, size), "black")
    draw, seg_draw = ImageDraw.Draw(image), ImageDraw.Draw(seg)
    phrases = []
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = names[rng.integers(len(names))]
        while abs(_luma(COLOURS[colour]) - _luma(COLOURS[background])) < 40:  # visible to canny
            colour = names[rng.integers(len(names))]
        cx, cy, r = _shape_box(rng, size)
        angle = rng.uniform(0, 2 * np.pi)
        width = max(3, size // 12)
        _draw(draw, shape, cx, cy, r, angle, COLOURS[colour], width)
        _draw(seg_draw, shape, cx, cy, r, angle, SEG_COLOURS[shape], width)
        phrases.append(f"{_article(colour)} {colour} {shape}")
    style = "striped " if striped else ""
    caption = " and ".join(phrases) + f" on {_article(style or background)} {style}{background} background"
    return Sample(image, caption, {"canny": canny(image), "seg": seg})
