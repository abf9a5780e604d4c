"""Calibration data: prompts with control images, built in or from a user's folder.

The built-in set draws prompts about simple scenes and control maps of the kinds the ControlNet
paper uses: edge maps, straight-line drawings, scribbles, flat segmentation-like regions and
depth-like gradients, all from a seeded generator. A user folder holds images (each one control
map; the k-th ControlNet of a sample takes the next image in name order) and ``prompts.txt``
(one prompt a line, cycled).
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from controlrt.errors import InputError

COLORS = ["red", "green", "blue", "yellow", "white", "orange", "purple", "gray", "pink", "brown"]
SHAPES = ["circle", "square", "triangle", "line", "house", "tree", "car", "cat", "dog", "mountain"]
SCENES = ["a photo of", "a drawing of", "a painting of", "a picture of", "a simple scene with"]
BACKGROUNDS = ["", " on a dark background", " in the city", " by a river", " under the sky", " in a room"]
KINDS = ("edges", "lines", "scribble", "segmentation", "depth")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Sample:
    prompt: str
    controls: tuple[Image.Image, ...]


def _prompt(rng: random.Random) -> str:
    a, b = rng.sample(SHAPES, 2)
    return f"{rng.choice(SCENES)} a {rng.choice(COLORS)} {a} and a {rng.choice(COLORS)} {b}{rng.choice(BACKGROUNDS)}"


def control_map(kind: str, rng: random.Random, height: int, width: int) -> Image.Image:
    """One seeded control map of ``kind`` (see KINDS)."""
    if kind == "depth":
        y, x = np.mgrid[0:height, 0:width]
        cx, cy = rng.uniform(0, width), rng.uniform(height * 0.5, height * 1.5)
        far = 1.0 - np.hypot((x - cx) / width, (y - cy) / height)
        image = Image.fromarray((np.clip(far, 0, 1) * rng.uniform(120, 200)).astype("uint8")).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            box = (
                sorted([rng.uniform(0, width), rng.uniform(0, width)]),
                sorted([rng.uniform(0, height), rng.uniform(0, height)]),
            )
            draw.ellipse((box[0][0], box[1][0], box[0][1], box[1][1]), fill=(rng.randint(200, 255),) * 3)
        return image
    background = "black"
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)

    def point():
        return rng.uniform(0, width), rng.uniform(0, height)

    def box():
        (x0, y0), (x1, y1) = point(), point()
        return min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2

    if kind == "edges":
        for _ in range(rng.randint(2, 5)):
            shape = rng.choice([draw.ellipse, draw.rectangle])
            shape(box(), outline="white", width=1)
    elif kind == "lines":
        for _ in range(rng.randint(4, 10)):
            draw.line([point(), point()], fill="white", width=1)
    elif kind == "scribble":
        for _ in range(rng.randint(1, 3)):
            draw.line([point() for _ in range(rng.randint(3, 6))], fill="white", width=max(2, width // 32))
    elif kind == "segmentation":
        palette = [(120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (204, 5, 255)]
        image.paste(rng.choice(palette), (0, 0, width, height))
        for _ in range(rng.randint(2, 5)):
            draw.rectangle(box(), fill=rng.choice(palette))
            draw.ellipse(box(), fill=rng.choice(palette))
    else:
        raise ValueError(f"unknown control kind {kind!r}")
    return image


@dataclass(frozen=True)
class CalibrationData:
    """A list of samples and a digest that identifies them."""

    samples: tuple[Sample, ...]
    digest: str
    source: str

    @classmethod
    def builtin(cls, count: int, num_controls: int, height: int, width: int, seed: int = 0) -> CalibrationData:
        rng = random.Random(seed)
        samples = []
        for i in range(count):
            kinds = [KINDS[(i + k) % len(KINDS)] for k in range(num_controls)]
            samples.append(Sample(_prompt(rng), tuple(control_map(k, rng, height, width) for k in kinds)))
        key = f"builtin:{count}:{num_controls}:{height}x{width}:{seed}"
        return cls(tuple(samples), hashlib.sha256(key.encode()).hexdigest(), key)

    @classmethod
    def from_folder(cls, folder: str | Path, count: int, num_controls: int) -> CalibrationData:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise InputError(f"calibration data folder {folder} does not exist")
        prompts_file = folder / "prompts.txt"
        if not prompts_file.is_file():
            raise InputError(f"calibration data folder {folder} has no prompts.txt (one prompt a line)")
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not prompts or not paths:
            raise InputError(f"calibration data folder {folder} needs prompts in prompts.txt and images")
        digest = hashlib.sha256()
        images = []
        for path in paths:
            data = path.read_bytes()
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(data).digest())
            try:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError) as exc:
                raise InputError(f"calibration image {path} is not a readable image ({exc})") from None
        digest.update("\n".join(prompts).encode())
        samples = []
        for i in range(count):
            controls = tuple(images[(i * num_controls + k) % len(images)] for k in range(num_controls))
            samples.append(Sample(prompts[i % len(prompts)], controls))
        digest.update(f":{count}:{num_controls}".encode())
        return cls(tuple(samples), digest.hexdigest(), str(folder.resolve()))

    def __len__(self) -> int:
        return len(self.samples)

    def controls(self) -> Sequence[tuple[Image.Image, ...]]:
        return [s.controls for s in self.samples]
