"""TensorRT on a real GPU: build, parity at fp32/fp16/int8, refit, CUDA graphs, weight streaming.

These run wherever tensorrt imports and torch sees a CUDA GPU, and are skipped elsewhere with the
reason. ``python benchmarks/gpu_check.py`` runs them on a lent GPU machine.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from controlrt.builtin import TINY, sample_control_images, write_builtin_models


def _why_not() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        return f"needs TensorRT (import tensorrt failed: {str(exc).splitlines()[0] if str(exc) else exc!r})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU visible to torch"
    return None


REASON = _why_not()
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def gpu_build(tiny_build, tmp_path_factory):
    """The tiny build with fp16 and int8 graphs, copied so engines can be written into it."""
    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build
    from controlrt.export.fp16 import convert_build

    build = shutil.copytree(tiny_build, tmp_path_factory.mktemp("trt") / "build")
    convert_build(build, "fp16")
    calibrate_build(build, settings=CalibrationSettings("onnxruntime", None, samples=2, steps=3))
    return build


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_match_torch(gpu_build, precision):
    from controlrt.engine.builder import build_engines
    from controlrt.parity import run_parity

    results = build_engines(gpu_build, precision)
    assert all(r.plan_bytes > 0 for r in results)
    assert {r.status for r in build_engines(gpu_build, precision)} == {"current"}  # cached
    report = run_parity(gpu_build, backend="tensorrt", precision=precision, steps=4)
    assert report.passed, report.table()


def test_cuda_graphs_replay_the_same_image(gpu_build):
    from controlrt.engine.builder import build_engines
    from controlrt.engine.profiles import ProfileSettings
    from controlrt.runtime.pipeline import Pipeline

    build_engines(gpu_build, "fp16", ProfileSettings(static=True), force=True)
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 5, "seed": 3}
    with Pipeline.load(gpu_build, backend="tensorrt", precision="fp16") as plain:
        expected = np.asarray(plain("a red circle", **settings))
    with Pipeline.load(gpu_build, backend="tensorrt", precision="fp16", cuda_graphs=True) as graphs:
        got = np.asarray(graphs("a red circle", **settings))
        assert graphs.sessions["unet"].captures == 1
    assert expected.std() > 0 and np.array_equal(expected, got)


def test_refit_swaps_the_controlnet(gpu_build, tmp_path):
    from controlrt.compare import psnr
    from controlrt.engine.builder import build_engines
    from controlrt.engine.cache import BuildOptions
    from controlrt.engine.refit import refit_controlnet
    from controlrt.runtime.pipeline import Pipeline

    build = shutil.copytree(gpu_build, tmp_path / "build")
    build_engines(build, "fp32", options=BuildOptions(refittable=True))
    new = write_builtin_models(tmp_path / "other", TINY, seed=8).controlnets[0]
    refit_controlnet(build, "controlnet_0", new)
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 4, "seed": 1}
    with Pipeline.load(build, backend="tensorrt") as trt, Pipeline.load(build, backend="torch") as ref:
        assert psnr(np.asarray(ref("a house", **settings)), np.asarray(trt("a house", **settings))) >= 40


def test_lora_change_refits_unet_and_text_encoder(gpu_build, tiny_models, tmp_path):
    """controlrt lora on real engines: base + LoRA A, then base + LoRA B (never A and B blended)."""
    from lora_files import write_diffusers_lora

    from controlrt.compare import psnr
    from controlrt.engine.builder import build_engines
    from controlrt.engine.cache import BuildOptions
    from controlrt.export.loras import set_loras
    from controlrt.lora import Lora
    from controlrt.runtime.pipeline import Pipeline

    build = shutil.copytree(gpu_build, tmp_path / "build")
    build_engines(build, "fp32", options=BuildOptions(refittable=True))
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 4, "seed": 1}
    for seed in (1, 2):
        lora = write_diffusers_lora(tiny_models.base, tmp_path / f"lora{seed}", seed=seed)
        change = set_loras(build, [Lora(lora, 0.8)])
        assert {"unet fp32", "text_encoder fp32"} <= set(change.refitted)
        with Pipeline.load(build, backend="tensorrt") as trt, Pipeline.load(build, backend="torch") as ref:
            assert psnr(np.asarray(ref("a house", **settings)), np.asarray(trt("a house", **settings))) >= 40


def test_weight_streaming_budget(gpu_build):
    from controlrt.engine.builder import build_engines
    from controlrt.engine.cache import BuildOptions
    from controlrt.runtime.pipeline import Pipeline

    build_engines(gpu_build, "fp16", options=BuildOptions(weight_streaming=True), force=True)
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 3, "seed": 2}
    with Pipeline.load(gpu_build, backend="tensorrt", precision="fp16") as full:
        expected = np.asarray(full("a house", **settings))
    with Pipeline.load(gpu_build, backend="tensorrt", precision="fp16", weight_streaming_budget=0) as streamed:
        got = np.asarray(streamed("a house", **settings))
    assert np.array_equal(expected, got)
