"""The HTTP API's request format, shared by the Ray Serve app, the Triton model and the client.

``POST /generate`` takes JSON::

    {"prompt": "...", "negative_prompt": "...", "controls": ["<base64 PNG>", ...],
     "scales": [1.0, ...], "start": [0.0, ...], "end": [1.0, ...], "control_mode": "uniform",
     "steps": 20, "guidance": 7.5, "true_cfg": 1.0, "seed": 0, "height": 512, "width": 512,
     "image": "<base64 PNG>", "mask": "<base64 PNG>", "strength": 0.8}

and answers ``image/png`` with the settings in the PNG's "controlrt" text chunk. Only ``prompt`` is
required. Validation is the CLI's: an InputError here is the client's fault (HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from controlrt.errors import InputError
from controlrt.runtime.request import GenerationRequest

FIELDS = {
    "prompt",
    "negative_prompt",
    "controls",
    "scales",
    "start",
    "end",
    "control_mode",
    "steps",
    "guidance",
    "true_cfg",
    "seed",
    "height",
    "width",
    "scheduler",
    "control_types",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "image",
    "mask",
    "strength",
    "mask_crop",
    "vae_tiling",
    "aesthetic_score",
    "negative_aesthetic_score",
}
PAIRS = ("original_size", "crops_coords_top_left", "target_size")


def decode_control(text: Any, index: int | str) -> Image.Image:
    """An image (a control, or with ``index`` a field name, the init image or mask) from base64; its
    size is checked (MAX_CONTROL_PIXELS) before it is decoded."""
    from controlrt.runtime.images import MAX_CONTROL_PIXELS

    where = f"controls[{index}]" if isinstance(index, int) else f"'{index}'"
    if not isinstance(text, str):
        raise InputError(f"{where} must be a base64 PNG string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise InputError(f"{where} is not a readable image") from None
    with image:
        width, height = image.size
        if width * height > MAX_CONTROL_PIXELS:
            raise InputError(f"{where} is {width}x{height}; at most {MAX_CONTROL_PIXELS} pixels are read")
        try:
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError):
            raise InputError(f"{where} is not a readable image") from None
        return image.copy()


def encode_control(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_request(body: Any) -> GenerationRequest:
    """A GenerationRequest from the decoded JSON body; InputError naming the first problem."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    if not isinstance(body.get("prompt"), str):
        raise InputError("'prompt' (a string) is required")
    controls = body.get("controls", [])
    if not isinstance(controls, list):
        raise InputError("'controls' must be a list of base64 PNG strings")
    settings = {k: v for k, v in body.items() if k not in ("prompt", "controls")}
    for key in ("steps", "seed", "height", "width", "mask_crop"):
        if (
            key in settings
            and settings[key] is not None
            and (isinstance(settings[key], bool) or not isinstance(settings[key], int))
        ):
            raise InputError(f"'{key}' must be a whole number")
    for key in ("guidance", "true_cfg", "strength", "aesthetic_score", "negative_aesthetic_score"):
        value = settings.get(key)
        given = key in settings and value is not None
        if given and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"'{key}' must be a number")
    if "vae_tiling" in settings and not isinstance(settings["vae_tiling"], bool):
        raise InputError("'vae_tiling' must be true or false")
    for key in ("image", "mask"):
        if settings.get(key) is not None:
            settings[key] = decode_control(settings[key], key)
    for key in PAIRS:
        if isinstance(settings.get(key), list):
            settings[key] = tuple(settings[key])
    if "control_types" in settings and not isinstance(settings["control_types"], list):
        raise InputError("'control_types' must be a list (one per control: a name, a number or null)")
    images = tuple(decode_control(c, i) for i, c in enumerate(controls))
    return GenerationRequest(body["prompt"], images, **settings)
