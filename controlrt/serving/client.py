"""A small client for ``controlrt serve``, on the standard library only.

from controlrt.serving.client import generate
image = generate("http://127.0.0.1:8000", "a house", controls=["edges.png"], steps=20, seed=1)
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from controlrt.errors import BackendError, InputError


def generate(
    url: str, prompt: str, controls: Sequence[str | Path | Image.Image] = (), timeout: float = 600, **settings: Any
) -> Image.Image:
    """POST a generation to ``url`` (the server's root) and return the image (settings in its info).

    ``settings`` are the request's fields (controlrt.serving.protocol); ``image`` and ``mask`` may
    be paths or PIL images, like the controls.

    Raises InputError for a 4xx answer (with the server's message), BackendError otherwise.
    """
    from controlrt.serving.protocol import encode_control

    def encoded(source: str | Path | Image.Image) -> str:
        return encode_control(source if isinstance(source, Image.Image) else Image.open(source))

    for key in ("image", "mask"):  # the init image and mask travel as base64 PNGs, as controls do
        if settings.get(key) is not None:
            settings[key] = encoded(settings[key])
    body = json.dumps({"prompt": prompt, "controls": [encoded(c) for c in controls], **settings}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/generate", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            data = answer.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        error = InputError if 400 <= exc.code < 500 else BackendError
        raise error(f"server answered {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise BackendError(f"cannot reach {url}: {exc.reason}") from None
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
