"""Bounds on what one request or command may ask for, checked before anything is allocated.

Light on imports: the command line reads its defaults for ``--help``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controlrt.errors import InputError

if TYPE_CHECKING:
    from controlrt.families.info import ModelInfo

# The largest attention of a Stable Diffusion UNet, per token pair: two CFG halves, up to 8 heads,
# fp32 scores and their softmax. Memory for it grows with the square of the latent pixel count.
_ATTENTION_BYTES_PER_TOKEN_PAIR = 2 * 8 * 4 * 2
DEFAULT_MAX_IMAGES = 64


def physical_memory() -> int:
    """Bytes of physical memory on this machine."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def default_max_pixels(info: ModelInfo, memory: int | None = None) -> int:
    """The default largest image (height x width pixels): at most four times the native area
    (twice the native size per side, the TensorRT profiles' default), and no more than the UNet's
    largest attention fits in half of this machine's memory; never below the native area."""
    native = info.default_size[0] * info.default_size[1]
    budget = (memory or physical_memory()) // 2
    tokens = math.isqrt(budget // _ATTENTION_BYTES_PER_TOKEN_PAIR)
    by_memory = tokens * info.vae_scale_factor**2
    return max(native, min(4 * native, by_memory))


@dataclass(frozen=True)
class Limits:
    """Bounds every request is checked against before anything is allocated.

    Attributes:
        max_pixels: Largest height x width of an image.
        max_steps: Most denoising steps (the scheduler's training timesteps).
        max_images: Most images one command or request batch may ask for.
    """

    max_pixels: int
    max_steps: int
    max_images: int = DEFAULT_MAX_IMAGES

    @classmethod
    def for_model(
        cls, info: ModelInfo, max_pixels: int | None = None, max_steps: int | None = None, max_images: int | None = None
    ) -> Limits:
        """The defaults for a model, each replaced by the value given; InputError for a bad one."""
        for label, value in (("max pixels", max_pixels), ("max steps", max_steps), ("max images", max_images)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{label} {value!r} must be a whole number of at least 1")
        return cls(
            max_pixels or default_max_pixels(info),
            max_steps or info.num_train_timesteps,
            max_images or DEFAULT_MAX_IMAGES,
        )

    def check_images(self, count: int) -> None:
        if count > self.max_images:
            raise InputError(f"{count} images asked for; at most {self.max_images} per command (--max-images)")
