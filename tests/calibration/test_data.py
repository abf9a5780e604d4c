"""Calibration data sets and the capture cache."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlrt.calibration.capture import CaptureSettings, capture
from controlrt.calibration.data import KINDS, CalibrationData
from controlrt.errors import InputError
from controlrt.manifest import Build


def test_builtin_data_is_seeded_and_varied():
    a = CalibrationData.builtin(len(KINDS), 2, 64, 64, seed=3)
    b = CalibrationData.builtin(len(KINDS), 2, 64, 64, seed=3)
    assert a.digest == b.digest
    for x, y in zip(a.samples, b.samples, strict=True):
        assert x.prompt == y.prompt
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(x.controls, y.controls, strict=True))
    assert len({s.prompt for s in a.samples}) == len(KINDS)
    assert all(np.asarray(c).std() > 0 for s in a.samples for c in s.controls)
    assert CalibrationData.builtin(len(KINDS), 2, 64, 64, seed=4).digest != a.digest


def test_user_folder(tmp_path):
    for k in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(tmp_path / f"map{k}.png")
    (tmp_path / "prompts.txt").write_text("a house\n\na tree\n")
    data = CalibrationData.from_folder(tmp_path, 4, 2)
    assert [s.prompt for s in data.samples] == ["a house", "a tree", "a house", "a tree"]
    assert all(len(s.controls) == 2 for s in data.samples)
    digest = data.digest
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(tmp_path / "map0.png")
    assert CalibrationData.from_folder(tmp_path, 4, 2).digest != digest
    (tmp_path / "prompts.txt").unlink()
    with pytest.raises(InputError, match=r"no prompts\.txt"):
        CalibrationData.from_folder(tmp_path, 4, 2)
    with pytest.raises(InputError, match="does not exist"):
        CalibrationData.from_folder(tmp_path / "nope", 4, 2)


def test_captures_are_cached(tiny_build, tmp_path, monkeypatch):
    import shutil

    build_path = tmp_path / "b"
    shutil.copytree(tiny_build, build_path)
    build = Build.open(build_path)
    data = CalibrationData.builtin(1, 2, 64, 64)
    settings = CaptureSettings(steps=2, height=64, width=64)
    first = capture(build, data, settings)
    assert len(first["unet"]) == 2 and len(first["controlnet_0"]) == 2 and len(first["text_encoder"]) == 1
    assert first["unet"][0]["sample"].shape == (2, 4, 32, 32)

    from controlrt.runtime import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("captures should come from the cache")

    monkeypatch.setattr(pipeline.Pipeline, "from_build", refuse)
    second = capture(build, data, settings)
    for name in first:
        for x, y in zip(first[name], second[name], strict=True):
            assert all(np.array_equal(x[k], y[k]) for k in x)
