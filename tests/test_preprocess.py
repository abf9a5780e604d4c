"""Preprocessors against OpenCV called directly, and KIND:PATH controls."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from controlrt.errors import InputError
from controlrt.runtime.preprocess import load_control, preprocess, split_control


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A synthetic photo: shapes and a straight bar on a gradient, with some noise."""
    rng = np.random.default_rng(0)
    base = np.linspace(40, 200, 128, dtype=np.float32)[None, :, None].repeat(96, 0).repeat(3, 2)
    image = Image.fromarray(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill=(220, 30, 30))
    draw.rectangle((60, 20, 110, 70), fill=(20, 40, 200))
    draw.line((5, 85, 120, 80), fill=(250, 250, 250), width=3)
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    image.save(path)
    return path


def test_canny_is_cv2_canny_on_grayscale(photo):
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    expected = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 50, 150)
    got = np.asarray(preprocess("canny", photo, low=50, high=150))
    assert got.shape == (*expected.shape, 3)
    assert expected.any() and all(np.array_equal(got[:, :, c], expected) for c in range(3))


def test_mlsd_draws_the_detected_segments(photo):
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    lines = cv2.createLineSegmentDetector().detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))[0].reshape(-1, 4)
    long_lines = [seg for seg in lines if np.hypot(seg[2] - seg[0], seg[3] - seg[1]) >= 16]
    got = np.asarray(preprocess("mlsd", photo, min_length=16))[:, :, 0]
    assert long_lines and got.max() == 255
    for x1, y1, x2, y2 in long_lines:  # every long segment's midpoint is drawn
        assert got[round((y1 + y2) / 2), round((x1 + x2) / 2)] > 0
    assert (got > 0).mean() < 0.3  # lines, not a filled image


@pytest.mark.parametrize("background", [255, 0])
def test_scribble_is_white_strokes_on_black(background, tmp_path):
    sketch = Image.new("L", (64, 64), background)
    ImageDraw.Draw(sketch).line((5, 5, 60, 40), fill=255 - background, width=2)
    got = np.asarray(preprocess("scribble", sketch, thickness=1))[:, :, 0]
    stroke = np.asarray(sketch) != background
    assert np.array_equal(got > 0, stroke)


def test_passthrough_keeps_the_map_and_kind_prefix_parsing(tmp_path):
    depth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    path = tmp_path / "depth.png"
    Image.fromarray(depth).save(path)
    got = np.asarray(load_control(f"depth:{path}"))
    assert got.shape == (16, 32, 3) and np.array_equal(got[:, :, 1], depth)
    assert split_control("canny:a.png") == ("canny", "a.png")
    assert split_control("C:/maps/a.png") == (None, "C:/maps/a.png")  # not a kind: a path
    with pytest.raises(InputError, match=r"unknown preprocessor 'sobel' in control 'sobel:x\.png'"):
        split_control("sobel:x.png")


def test_a_file_whose_name_has_a_colon_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save("notakind:x.png")
    assert split_control("notakind:x.png") == (None, "notakind:x.png")


def test_bad_preprocessor_input(photo, tmp_path):
    with pytest.raises(InputError, match="unknown preprocessor"):
        preprocess("sobel", photo)
    with pytest.raises(InputError, match="thresholds"):
        preprocess("canny", photo, low=200, high=100)
    with pytest.raises(InputError, match="does not exist"):
        load_control(f"canny:{tmp_path / 'missing.png'}")
    with pytest.raises(InputError, match=r"controlnet-aux|annotator"):
        preprocess("depth", photo, annotators=tmp_path)
