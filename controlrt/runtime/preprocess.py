"""Control-map preprocessors: photos and sketches -> the maps ControlNets are trained on.

Built in, with OpenCV (opencv-python-headless):

- ``canny``: cv2.Canny on the grayscale image (thresholds ``low``/``high``, default 100/200 as in
  the ControlNet examples), white edges on black, three channels.
- ``mlsd``: straight line segments in the spirit of M-LSD, found by OpenCV's line segment detector
  and drawn white on black; segments shorter than ``min_length`` pixels are dropped.
- ``scribble``: a user sketch normalised to white strokes on black (a light background is
  inverted; Otsu's threshold, then strokes dilated to ``thickness``).
- ``inpaint``: an inpaint ControlNet's condition, the image with its masked pixels at -1 (needs the
  mask; an array, since -1 is no pixel value). ``inpaint:PATH`` in a request takes the request's mask.
- pass-through kinds (``depth``, ``normal``, ``pose``, ``seg``, ``hed``, ``lineart``, ``map``): maps
  that neural annotators make, accepted as images and resized like any control. With
  controlnet-aux installed and its annotator weights in a local folder (``annotators=DIR``), the
  kinds it has an annotator for (depth, normal, pose, hed, lineart) run it on a photo instead;
  nothing is downloaded.

A control given as ``KIND:PATH`` (``canny:photo.jpg``) is preprocessed inline; a plain path is used
as it is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from controlrt.errors import InputError
from controlrt.runtime.images import load_image, peek_size

logger = logging.getLogger(__name__)

PASSTHROUGH = ("depth", "normal", "pose", "seg", "hed", "lineart", "map")
# controlnet-aux annotators by kind: (class name, its from_pretrained folder under --annotators)
ANNOTATORS = {
    "depth": ("MidasDetector", "Annotators"),
    "normal": ("NormalBaeDetector", "Annotators"),
    "pose": ("OpenposeDetector", "Annotators"),
    "hed": ("HEDdetector", "Annotators"),
    "lineart": ("LineartDetector", "Annotators"),
}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise InputError("preprocessors need OpenCV: pip install opencv-python-headless") from None
    return cv2


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise InputError(f"expected an RGB uint8 image, got an array of shape {array.shape} and type {array.dtype}")
    return np.ascontiguousarray(array[:, :, :3])


def _gray(image) -> np.ndarray:
    return _cv2().cvtColor(_rgb_array(image), _cv2().COLOR_RGB2GRAY)


def _to_image(single: np.ndarray) -> Image.Image:
    return Image.fromarray(np.stack([single] * 3, axis=-1))


def canny(image, low: int = 100, high: int = 200) -> Image.Image:
    """White Canny edges of the grayscale image on black."""
    if not 0 <= low <= high:
        raise InputError(f"canny thresholds must satisfy 0 <= low <= high (got {low}, {high})")
    return _to_image(_cv2().Canny(_gray(image), low, high))


def mlsd(image, min_length: float = 16.0, thickness: int = 2) -> Image.Image:
    """Straight line segments (OpenCV's line segment detector), drawn white on black."""
    cv2 = _cv2()
    gray = _gray(image)
    detector = cv2.createLineSegmentDetector()
    lines = detector.detect(gray)[0]
    canvas = np.zeros_like(gray)
    for x1, y1, x2, y2 in [] if lines is None else lines.reshape(-1, 4):
        if np.hypot(x2 - x1, y2 - y1) >= min_length:
            cv2.line(canvas, (round(x1), round(y1)), (round(x2), round(y2)), 255, thickness, cv2.LINE_AA)
    return _to_image(canvas)


def scribble(image, thickness: int = 3) -> Image.Image:
    """A sketch as white strokes on black, whatever its background."""
    cv2 = _cv2()
    gray = _gray(image)
    if gray.mean() > 127:  # dark strokes on a light background
        gray = 255 - gray
    _, strokes = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if thickness > 1:
        strokes = cv2.dilate(strokes, np.ones((thickness, thickness), np.uint8))
    return _to_image(strokes)


def inpaint(image, mask) -> np.ndarray:
    """The condition of an inpaint ControlNet (control_v11p_sd15_inpaint): the image's RGB in [0, 1]
    with the masked pixels (mask >= 0.5, white = repaint) set to -1, HxWx3 float32, as diffusers'
    examples make it. -1 has no place in an image file: it is kept as an array (``.npy``)."""
    if mask is None:
        raise InputError("the inpaint condition is made from an image and its mask: give the mask (--mask)")
    rgb = _rgb_array(image).astype(np.float32) / 255.0
    mask = load_image(mask, "mask")
    if not isinstance(mask, Image.Image):
        mask = Image.fromarray(np.asarray(mask))
    mask = mask.convert("L")
    if mask.size != (rgb.shape[1], rgb.shape[0]):
        mask = mask.resize((rgb.shape[1], rgb.shape[0]), Image.NEAREST)
    rgb[np.asarray(mask).astype(np.float32) / 255.0 > 0.5] = -1.0
    return rgb


def passthrough(image) -> Image.Image:
    """A ready map (depth, pose, segmentation …), as an RGB image."""
    return Image.fromarray(_rgb_array(image))


BUILTIN: dict[str, Callable[..., Any]] = {"canny": canny, "mlsd": mlsd, "scribble": scribble, "inpaint": inpaint}
KINDS = (*BUILTIN, *PASSTHROUGH)


def check_kind(kind: str) -> str:
    """The preprocessor's name in lower case; InputError if there is none of that name."""
    if kind.lower() not in KINDS:
        raise InputError(f"unknown preprocessor {kind!r}; choose one of {', '.join(KINDS)}")
    return kind.lower()


def preprocess(kind: str, image, annotators: str | Path | None = None, **options: Any) -> Image.Image | np.ndarray:
    """The control map of ``kind`` for ``image`` (a PIL image, an array or a path): an image, or for
    ``inpaint`` (which takes ``mask=``) an HxWx3 float32 array."""
    kind = check_kind(kind)
    image = load_image(image)
    if kind in BUILTIN:
        try:
            return BUILTIN[kind](image, **options)
        except TypeError as exc:
            raise InputError(f"{kind}: {exc}") from None
    if annotators is not None and kind in ANNOTATORS:
        return _annotate(kind, image, Path(annotators))
    how = (
        "controlrt has no annotator for it"
        if kind not in ANNOTATORS
        else "no annotator ran (--annotators DIR with controlnet-aux's weights runs one on a photo)"
    )
    logger.warning("%s: %s; the image is taken as a ready %s map, unchanged", kind, how, kind)
    return passthrough(image)


def _annotate(kind: str, image, folder: Path) -> Image.Image:
    """Run controlnet-aux's annotator for ``kind`` with weights from ``folder`` (never downloads)."""
    import os

    try:
        import controlnet_aux
    except ImportError:
        raise InputError(f"{kind} from a photo needs controlnet-aux (pip install controlnet-aux)") from None
    if not folder.is_dir():
        raise InputError(f"annotator folder {folder} does not exist")
    os.environ["HF_HUB_OFFLINE"] = "1"
    name, _ = ANNOTATORS[kind]
    try:
        detector = getattr(controlnet_aux, name).from_pretrained(str(folder))
    except Exception as exc:  # missing files surface as OSError or the hub's offline errors
        raise InputError(f"cannot load the {kind} annotator from {folder}: {str(exc).splitlines()[0]}") from None
    return detector(Image.fromarray(_rgb_array(image))).convert("RGB")


def split_control(text: str) -> tuple[str | None, str]:
    """``"canny:photo.jpg"`` -> ("canny", "photo.jpg"); a plain path -> (None, path).

    Only a known kind counts as a prefix, so paths that contain a colon still work; a word before
    a colon that is no kind, in a text that is no file either (``sobel:edges.png``), is an
    InputError naming the kinds.
    """
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() in KINDS and rest:
        return kind.lower(), rest
    if sep and rest and _WORD.fullmatch(kind) and not Path(text).expanduser().exists():
        raise InputError(f"unknown preprocessor {kind!r} in control {text!r}; choose one of {', '.join(KINDS)}")
    return None, text


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_+-]+")  # two characters at least: "C:" is a drive, not a kind


def peek_control_size(source: Any) -> tuple[int, int]:
    """(height, width) of a control without decoding it; for ``KIND:PATH``, of the image at PATH."""
    if isinstance(source, str):
        source = split_control(source)[1]
    return peek_size(source)


def load_control(source, annotators: str | Path | None = None):
    """A control as the pipeline uses it: ``KIND:PATH`` strings are preprocessed, the rest loaded."""
    if isinstance(source, str):
        kind, path = split_control(source)
        if kind is not None:
            return preprocess(kind, path, annotators)
    return load_image(source)
