"""Control image loading and pre/post-processing, as diffusers' pipelines do them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from controlrt.errors import InputError

ControlImage = Image.Image | np.ndarray | torch.Tensor | str | Path


# Control images are read whole before they are resized: refuse ones larger than this (8k x 8k).
MAX_CONTROL_PIXELS = 8192 * 8192


def _open(path: Path, what: str = "control image") -> Image.Image:
    """A lazily opened image (header read, pixels not decoded); InputError if unreadable or too large."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"{what} {path} is not a readable image ({exc.__class__.__name__})") from None
    width, height = image.size
    if width * height > MAX_CONTROL_PIXELS:
        image.close()
        raise InputError(f"{what} {path} is {width}x{height}; at most {MAX_CONTROL_PIXELS} pixels are read")
    return image


def _open_array(path: Path, what: str) -> np.ndarray:
    """A control saved as a NumPy array (``.npy``: an inpaint condition with its -1 pixels), memory
    mapped; InputError unless it is HxWx3 float32 within MAX_CONTROL_PIXELS."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path} is not a readable .npy array ({exc.__class__.__name__})") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.float32:
        raise InputError(f"{what} {path} holds a {array.dtype} array of shape {array.shape}; expected HxWx3 float32")
    if array.shape[0] * array.shape[1] > MAX_CONTROL_PIXELS:
        raise InputError(
            f"{what} {path} is {array.shape[1]}x{array.shape[0]}; at most {MAX_CONTROL_PIXELS} pixels are read"
        )
    return array


def peek_size(source: Any, what: str = "control image") -> tuple[int, int]:
    """(height, width) of an image (a path, PIL image, HxW[xC] array or [B,]CxHxW tensor) without
    decoding it (a control given as ``KIND:PATH``: runtime.preprocess.peek_control_size)."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.suffix.lower() == ".npy":
            shape = _open_array(path, what).shape
            return int(shape[0]), int(shape[1])
        with _open(path, what) as image:
            return image.size[1], image.size[0]
    if isinstance(source, Image.Image):
        return source.size[1], source.size[0]
    shape = tuple(getattr(source, "shape", ()))
    if isinstance(source, np.ndarray) and len(shape) in (2, 3):
        return shape[0], shape[1]
    if isinstance(source, torch.Tensor) and len(shape) in (3, 4):
        return shape[-2], shape[-1]
    raise InputError(
        f"a control must be an image path, a PIL image, an HxW(xC) array or a CxHxW tensor, not {type(source).__name__}"
    )


def load_image(source: ControlImage, what: str = "control image") -> Image.Image | np.ndarray | torch.Tensor:
    """Open a path as a PIL image (a ``.npy`` path as its array; InputError if unreadable); pass
    images and arrays through."""
    if not isinstance(source, (str, Path)):
        return source
    path = Path(source).expanduser()
    if path.suffix.lower() == ".npy":
        return np.array(_open_array(path, what))
    with _open(path, what) as image:
        try:
            image.load()
        except (Image.DecompressionBombError, OSError, ValueError) as exc:
            raise InputError(f"{what} {path} is not a readable image ({exc.__class__.__name__})") from None
        return image.copy()


def describe_control(source: Any, loaded: Any, digest: bool = False) -> str:
    """How an image's settings name a control: a path as given (``canny:photo.jpg`` included; with
    ``digest`` followed by its pixels' sha256, as for the init image and the mask); an image or
    array given in memory by its size and the sha256 of its pixels (first 16 hex digits), so that
    the same image can be recognised later."""
    if isinstance(source, (str, Path)):
        return f"{source} {_pixels(loaded)[1]}" if digest else str(source)
    return " ".join(_pixels(loaded))


def _pixels(loaded: Any) -> tuple[str, str]:
    """An image's or array's size in words, and ``sha256:`` with the first 16 hex digits of its pixels."""
    import hashlib

    if isinstance(loaded, Image.Image):
        what, pixels = f"image {loaded.width}x{loaded.height} {loaded.mode}", loaded.tobytes()
    else:
        array = loaded.detach().cpu().numpy() if isinstance(loaded, torch.Tensor) else np.asarray(loaded)
        what, pixels = f"array {'x'.join(map(str, array.shape))} {array.dtype}", np.ascontiguousarray(array).tobytes()
    return what, f"sha256:{hashlib.sha256(pixels).hexdigest()[:16]}"


def preprocess_control(
    image: Any, height: int, width: int, vae_scale_factor: int, channels: int, crop: tuple | None = None
) -> torch.Tensor:
    """[1, channels, height, width] float32 in [0, 1], resized like diffusers' control images.

    The same VaeImageProcessor settings as StableDiffusionControlNetPipeline (RGB conversion,
    Lanczos resize to the output size, no normalisation); with ``crop`` (an inpainting mask crop)
    cropped to it and resized to fill, as the inpainting pipelines do.
    """
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(
        vae_scale_factor=vae_scale_factor,
        do_convert_rgb=channels == 3,
        do_convert_grayscale=channels == 1,
        do_normalize=False,
    )
    try:
        mode = "fill" if crop is not None else "default"
        tensor = processor.preprocess(image, height=height, width=width, crops_coords=crop, resize_mode=mode)
        tensor = tensor.to(torch.float32)
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


# Formats whose files carry the settings: PNG in a text chunk, JPEG in a comment segment.
SETTINGS_FORMATS = {"PNG", "JPEG"}
SETTINGS_KEY = "controlrt"


def check_image_path(path: Path) -> str:
    """The PIL format for an output path; InputError if it is not PNG or JPEG, or is a folder."""
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give an image file name such as {path / 'image.png'}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in SETTINGS_FORMATS:
        what = f"{path.suffix!r} is not" if path.suffix else "a name without an extension is not"
        raise InputError(
            f"output {path}: {what} an image format that keeps the generation settings; use .png (or .jpg)"
        )
    return fmt


def with_settings(image: Image.Image, settings: dict[str, Any]) -> Image.Image:
    """``image`` with ``settings`` as JSON in ``image.info["controlrt"]`` (kept when it is saved)."""
    import json

    image.info[SETTINGS_KEY] = json.dumps(settings, default=str)
    return image


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings a PNG or JPEG written by controlrt carries; InputError if it carries none."""
    import json

    with Image.open(path) as image:
        text = image.info.get(SETTINGS_KEY) or image.info.get("comment")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        raise InputError(f"{path} carries no controlrt settings") from None


def encode_png(image: Image.Image, settings: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of ``image`` with ``settings`` as JSON in a "controlrt" text chunk."""
    return _encode(image, "PNG", settings)


def _encode(image: Image.Image, fmt: str, settings: dict[str, Any] | None) -> bytes:
    import io
    import json

    from PIL.PngImagePlugin import PngInfo

    kwargs: dict[str, Any] = {}
    if settings is not None:
        text = json.dumps(settings, default=str)
        if fmt == "PNG":
            info = PngInfo()
            info.add_text(SETTINGS_KEY, text)
            kwargs["pnginfo"] = info
        elif fmt == "JPEG":
            kwargs.update(comment=text.encode("utf-8"), quality=95)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def save_image(
    image: Image.Image, path: str | Path, settings: dict[str, Any] | None = None, force: bool = False
) -> None:
    """Write ``image`` atomically, with ``settings`` as JSON: PNGs in a "controlrt" text chunk,
    JPEGs in a comment segment. An existing file is replaced only with ``force``; InputError where
    the file exists (without ``force``) or the folder is missing or cannot be written."""
    from controlrt.io import write_output_file

    path = Path(path)
    fmt = check_image_path(path)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist")
    write_output_file(path, _encode(image, fmt, settings), force)
