"""Control image loading and pre/post-processing, as diffusers' pipelines do them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from controlrt.errors import InputError

ControlImage = Image.Image | np.ndarray | torch.Tensor | str | Path


def load_image(source: ControlImage) -> Image.Image | np.ndarray | torch.Tensor:
    """Open a path as a PIL image (InputError if unreadable); pass images and arrays through."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"control image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"control image {path} is not a readable image ({exc.__class__.__name__})") from None


def preprocess_control(image: Any, height: int, width: int, vae_scale_factor: int, channels: int) -> torch.Tensor:
    """[1, channels, height, width] float32 in [0, 1], resized like diffusers' control images.

    The same VaeImageProcessor settings as StableDiffusionControlNetPipeline (RGB conversion,
    Lanczos resize to the output size, no normalisation).
    """
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(
        vae_scale_factor=vae_scale_factor,
        do_convert_rgb=channels == 3,
        do_convert_grayscale=channels == 1,
        do_normalize=False,
    )
    try:
        tensor = processor.preprocess(image, height=height, width=width).to(torch.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(f"control image cannot be used: {exc}") from None
    if tensor.shape[0] != 1 or tensor.shape[1] != channels:
        raise InputError(f"control image has shape {tuple(tensor.shape)}, expected one {channels}-channel image")
    return tensor


def postprocess(image: torch.Tensor, vae_scale_factor: int) -> Image.Image:
    """A decoded image in [-1, 1] ([1, 3, H, W]) -> PIL, rounded as diffusers rounds it."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True)
    return processor.postprocess(image.float().cpu(), output_type="pil")[0]


def check_image_path(path: Path) -> str:
    """The PIL format for an output path; InputError if the extension is unknown or it is a folder."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {path}: unknown image extension {path.suffix!r}; use .png")
    if path.is_dir():
        raise InputError(f"output {path} is a folder")
    return fmt


def encode_png(image: Image.Image, settings: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of ``image`` with ``settings`` as JSON in a "controlrt" text chunk."""
    return _encode(image, "PNG", settings)


def _encode(image: Image.Image, fmt: str, settings: dict[str, Any] | None) -> bytes:
    import io
    import json

    from PIL.PngImagePlugin import PngInfo

    kwargs: dict[str, Any] = {}
    if fmt == "PNG" and settings is not None:
        info = PngInfo()
        info.add_text("controlrt", json.dumps(settings, default=str))
        kwargs["pnginfo"] = info
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | Path, settings: dict[str, Any] | None = None) -> None:
    """Write ``image`` atomically; PNGs carry ``settings`` as JSON in a "controlrt" text chunk."""
    from controlrt.io import atomic_write_bytes

    path = Path(path)
    fmt = check_image_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _encode(image, fmt, settings))
