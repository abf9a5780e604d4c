"""SDXL with ControlNets against diffusers' StableDiffusionXLControlNetPipeline, on both backends.

A small SDXL-shaped set built here (two CLIP text encoders that pad differently, the second with a
projection; text_time conditions; ControlNets with weighted zero convolutions): prompt encoding,
pooled embeddings, force_zeros_for_empty_prompt, time ids, multi-ControlNet, scales, windows, guess
mode and CFG off must all give diffusers' image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr
from controlrt.errors import InputError
from controlrt.families import family_of

GATE = end_to_end_gate("fp32")
STEPS = 4
CASES = {
    "uniform": ({}, {}),
    "negative-prompt": ({"negative_prompt": "blurry"}, {"negative_prompt": "blurry"}),
    "empty-negative": ({"negative_prompt": ""}, {"negative_prompt": ""}),
    "guess": ({"guess_mode": True}, {"control_mode": "guess"}),
    "windows": (
        {"control_guidance_start": [0.0, 0.25], "control_guidance_end": [1.0, 0.75]},
        {"start": [0.0, 0.25], "end": [1.0, 0.75]},
    ),
    "time-ids": (
        {"original_size": (96, 80), "crops_coords_top_left": (4, 8), "target_size": (64, 72)},
        {"original_size": (96, 80), "crops_coords_top_left": (4, 8), "target_size": (64, 72)},
    ),
    "no-guidance": ({"guidance_scale": 1.0}, {"guidance": 1.0}),
}


@pytest.fixture(scope="module")
def reference(xl_models):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    nets = [ControlNetModel.from_pretrained(p) for p in xl_models.controlnets]
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(xl_models.base, controlnet=nets)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl_pipelines(xl_build):
    from controlrt.runtime.pipeline import Pipeline

    pipes = {backend: Pipeline.load(xl_build, backend=backend) for backend in ("torch", "onnxruntime")}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_sdxl_controlnet_pipeline(case, backend, reference, xl_pipelines):
    theirs, ours = CASES[case]
    images = sample_control_images(2, 64, 64)
    settings = {"guidance_scale": 5.0, **theirs}
    expected = reference(
        "a red circle and a blue square",
        image=images,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(3),
        height=64,
        width=64,
        controlnet_conditioning_scale=[0.8, 1.2],
        **settings,
    ).images[0]
    ours = {"guidance": 5.0, **ours}
    got = xl_pipelines[backend](
        "a red circle and a blue square", controls=images, scales=[0.8, 1.2], steps=STEPS, seed=3, **ours
    )
    expected = np.asarray(expected)
    assert expected.std() > 10, "the reference image is flat: the comparison would prove nothing"
    assert psnr(expected, np.asarray(got)) >= GATE


def test_the_sdxl_build(xl_build):
    from controlrt.manifest import Build

    manifest = Build.open(xl_build).manifest
    assert list(manifest.graphs) == [
        "text_encoder",
        "text_encoder_2",
        "controlnet_0",
        "controlnet_1",
        "controlnet_2",
        "unet",
        "vae_decoder",
        "vae_encoder",
    ]
    union = manifest.spec("controlnet_2")
    assert union.union and union.control_types == 8
    assert union.input_names[-4:] == ["controlnet_cond", "control_type", "control_type_idx", "conditioning_scale"]
    unet = manifest.spec("unet")
    assert unet.input_names[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert len(unet.residual_inputs) == 7  # conv_in, 2 + 1 downsampler, 2 in the last block, mid
    assert manifest.spec("text_encoder_2").output_names == ["hidden_states", "text_embeds"]
    assert family_of(manifest.info).name == "sdxl" and manifest.info.force_zeros_for_empty_prompt
    assert (xl_build / "tokenizer_2" / "tokenizer_config.json").is_file()


def test_sdxl_parity_command(xl_build):
    from controlrt.parity import run_parity

    report = run_parity(xl_build, steps=2)
    assert report.passed, report.table()
    assert all(r.ref_max_abs > 0 for r in report.graphs)


def test_sdxl_conditions_are_refused_for_other_models(pipelines):
    from controlrt.runtime.request import GenerationRequest

    with pytest.raises(InputError, match="original_size applies to SDXL models"):
        pipelines("tiny", "onnxruntime").generate(GenerationRequest("x", original_size=(64, 64), steps=1))


def test_sd_controlnets_do_not_fit_an_sdxl_base(xl_models, tiny_models, tmp_path):
    from controlrt.errors import ModelError
    from controlrt.export.build import export_build

    with pytest.raises(ModelError, match=r"SD 1\.x/2\.x ControlNet and the base is an SDXL model"):
        export_build(xl_models.base, tiny_models.controlnets[:1], tmp_path / "b")


UNION_CASES = {
    "one-image": ([3], [0.8], {}, {}),
    "two-images": ([3, 1], [0.8, 1.2], {}, {}),
    "scale-0-stays-on": ([3, 1], [0.8, 0.0], {}, {}),  # inside a union, scale 0 does not switch it off
    "windows": (
        ["segment", "depth"],
        [1.0, 0.7],
        {"control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]},
        {"start": [0.0, 0.5], "end": [0.5, 1.0]},
    ),
    "negative": ([3, 1], [1.0, 1.0], {"negative_prompt": "blurry"}, {"negative_prompt": "blurry"}),
}


@pytest.fixture(scope="module")
def union_reference(xl_models):
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

    union = ControlNetUnionModel.from_pretrained(xl_models.unions[0])
    pipe = StableDiffusionXLControlNetUnionPipeline.from_pretrained(xl_models.base, controlnet=union)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("case", list(UNION_CASES))
def test_union_matches_diffusers_union_pipeline(case, backend, union_reference, xl_pipelines):
    from controlrt.runtime.request import control_type

    types, scales, theirs, ours = UNION_CASES[case]
    images = sample_control_images(len(types), 64, 64)
    expected = union_reference(
        "a red circle and a blue square",
        control_image=images,
        control_mode=[control_type(t) for t in types],
        controlnet_conditioning_scale=scales if len(types) > 1 else scales[0],
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
        height=64,
        width=64,
        **theirs,
    ).images[0]
    pipe = xl_pipelines[backend]
    window = {k: v for k, v in ours.items() if k in ("start", "end")}
    settings = {"steps": STEPS, "seed": 3, "guidance": 5.0, **{k: v for k, v in ours.items() if k not in window}}
    prompt = "a red circle and a blue square"
    got = pipe(prompt, controls=images, control_types=types, scales=scales, **settings, **window)
    expected = np.asarray(expected)
    assert expected.std() > 10
    assert psnr(expected, np.asarray(got)) >= GATE
    # the union really steers the image (so the comparison can fail)
    plain = pipe("a red circle and a blue square", **settings)
    assert psnr(np.asarray(got), np.asarray(plain)) < 40


def test_union_and_plain_controlnets_in_one_request(xl_pipelines):
    """Untyped controls go to the plain ControlNets in order, typed ones to the union."""
    from controlrt.runtime.request import GenerationRequest

    images = sample_control_images(3, 64, 64)
    request = {"controls": images, "control_types": [None, "canny", "depth"], "steps": 2, "seed": 1}
    torch_image = np.asarray(xl_pipelines["torch"]("a cat", **request))
    ort_image = np.asarray(xl_pipelines["onnxruntime"]("a cat", **request))
    assert psnr(torch_image, ort_image) >= GATE
    assert xl_pipelines["torch"].check(GenerationRequest("a cat", **request)).assignment == [[0], [], [1, 2]]


@pytest.mark.parametrize(
    ("types", "fragment"),
    [
        (["canny", "nope"], "unknown control type 'nope'"),
        ([9, 1], "control type 9 must be a whole number from 0 to 7"),
        (["canny", "depth", "hed"], r"3 control types given for 2 control image\(s\)"),
    ],
)
def test_bad_control_types_are_one_line(xl_pipelines, types, fragment):
    from controlrt.runtime.request import GenerationRequest

    with pytest.raises(InputError, match=fragment):
        xl_pipelines["torch"].check(GenerationRequest("x", sample_control_images(2, 64, 64), control_types=types))


def test_control_types_need_a_union(pipelines):
    from controlrt.runtime.request import GenerationRequest

    request = GenerationRequest("x", sample_control_images(1, 64, 64), control_types=["canny"])
    with pytest.raises(InputError, match="this build has none"):
        pipelines("tiny", "onnxruntime").check(request)


def test_generate_command_with_union_control_types_and_sdxl_conditions(xl_build, tmp_path):
    from click.testing import CliRunner

    from controlrt.cli import cli
    from controlrt.runtime.images import read_settings

    paths = []
    for k, image in enumerate(sample_control_images(2, 64, 64)):
        image.save(tmp_path / f"c{k}.png")
        paths.append(str(tmp_path / f"c{k}.png"))
    out = tmp_path / "out.png"
    args = ["generate", str(xl_build), "--prompt", "a cat", "--steps", "2", "--out", str(out)]
    args += ["--control", paths[0], "--control-type", "canny", "--control", paths[1], "--control-type", "depth"]
    args += ["--original-size", "96x80", "--crops-top-left", "0x4", "--target-size", "64"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    settings = read_settings(out)
    assert settings["control_types"] == ["canny", "depth"] and settings["original_size"] == [96, 80]
    bad = CliRunner().invoke(
        cli, [*args[:7], str(tmp_path / "bad.png"), "--control", paths[0], "--control-type", "sketch"]
    )
    assert bad.exit_code == 2 and bad.output.startswith("error: unknown control type 'sketch'")


@pytest.fixture(scope="module")
def xl_precise(xl_build, tmp_path_factory):
    """A copy of the SDXL build with fp16 graphs and (ModelOpt) int8 graphs."""
    import shutil

    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build
    from controlrt.export.fp16 import convert_build

    path = shutil.copytree(xl_build, tmp_path_factory.mktemp("xl-precise") / "build")
    convert_build(path, "fp16")
    calibrate_build(path, settings=CalibrationSettings(samples=2, steps=2))
    return path


@pytest.mark.parametrize(
    ("backend", "precision"), [("onnxruntime", "fp16"), ("onnxruntime", "int8"), ("openvino", "fp32")]
)
def test_sdxl_precisions_and_backends_pass_parity(xl_precise, backend, precision):
    from controlrt.manifest import Build
    from controlrt.parity import run_parity

    report = run_parity(xl_precise, backend, precision=precision, steps=2)
    assert report.passed, report.table()
    vae = Build.open(xl_precise).manifest.graphs["vae_decoder"].variants["fp16"]
    assert "force_upcast" in vae.settings["vae_decoder"]  # decoded in fp32, as diffusers does for SDXL
    assert {"controlnet_2", "unet"} <= {
        n for n, g in Build.open(xl_precise).manifest.graphs.items() if "int8" in g.variants
    }


def test_sdxl_engines_on_the_fake_tensorrt(xl_build, tmp_path, monkeypatch):
    """Profiles carry the added conditions and the union's images; parity passes on the engines."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
    import fake_tensorrt

    from controlrt.engine import builder
    from controlrt.engine.cache import Gpu
    from controlrt.parity import run_parity

    fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(Gpu, "current", classmethod(lambda cls, device=0: Gpu("Fake GPU", "9.0")))
    monkeypatch.setattr(builder, "require_cuda", lambda: None)
    build = shutil.copytree(xl_build, tmp_path / "build")
    builder.build_engines(build, "fp32")
    profiles = {b["onnx"].split("/")[-1]: b["profiles"][0] for b in fake_tensorrt.Builder.builds}
    assert profiles["unet.onnx"]["time_ids"][1] == [2, 6] and "text_embeds" in profiles["unet.onnx"]
    union = profiles["controlnet_2.onnx"]["controlnet_cond"]
    assert union[0][1] == 1 and union[2][1] >= 2  # one to several condition images
    report = run_parity(build, backend="tensorrt", device="cpu", steps=2)
    assert report.passed, report.table()
