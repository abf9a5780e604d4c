"""SD3 with SD3 ControlNets against diffusers' StableDiffusion3ControlNetPipeline.

A small SD3 set made in code (tests/sd3_files.py): three text encoders, a patch-2 transformer, a
16-channel VAE with a shift, a flow-matching scheduler. Two InstantX-style ControlNets summed block
by block, one that takes the pooled projection and shifted latents, and one as SD3.5-Large's (the
transformer's position embedding, no text) must match diffusers at the fp32 gate on every CPU
backend; the controls must change the image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sd3_files import NAMES, SIZE

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr
from controlrt.errors import InputError, ModelError

GATE = end_to_end_gate("fp32")
PROMPT = "a red house beside a tree"
BACKENDS = ["torch", "onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def pipelines(sd3):
    from controlrt.runtime.pipeline import Pipeline

    opened = {(b, k): Pipeline.load(sd3 / k, backend=b) for b in BACKENDS for k in ("multi", "single", "borrowed")}
    yield opened
    for pipe in opened.values():
        pipe.close()


def _reference(root, names, seed: int, **settings):
    """diffusers' image; torch's global generator seeded with ``seed`` first, since the pipeline
    samples the control images' latents from it (controlrt: from a generator seeded so)."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.controlnets import SD3MultiControlNetModel

    nets = [SD3ControlNetModel.from_pretrained(root / n) for n in names]
    controlnet = SD3MultiControlNetModel(nets) if len(nets) > 1 else nets[0]
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(root / "base", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    return np.asarray(pipe(PROMPT, generator=generator, height=SIZE, width=SIZE, **settings).images[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_sd3_controlnets_match_diffusers(backend, sd3, pipelines):
    images = sample_control_images(2, SIZE, SIZE)
    expected = _reference(
        sd3,
        NAMES[:2],
        seed=5,
        control_image=images,
        controlnet_conditioning_scale=[0.9, 0.7],
        control_guidance_end=[1.0, 0.5],
        num_inference_steps=4,
        guidance_scale=5.0,
        negative_prompt="blurry",
    )
    pipe = pipelines[(backend, "multi")]
    ours = {"steps": 4, "guidance": 5.0, "seed": 5, "negative_prompt": "blurry", "height": SIZE, "width": SIZE}
    got = np.asarray(pipe(PROMPT, controls=images, scales=[0.9, 0.7], end=[1.0, 0.5], **ours))
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    plain = np.asarray(pipe(PROMPT, **ours))  # the ControlNets steer the image, so the comparison can fail
    assert psnr(got, plain) < 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_controlnet_that_takes_the_pooled_projection_matches_diffusers(backend, sd3, pipelines):
    image = sample_control_images(3, SIZE, SIZE)[2]
    settings = {"num_inference_steps": 3, "guidance_scale": 4.0}
    expected = _reference(sd3, NAMES[2:3], seed=2, control_image=image, controlnet_conditioning_scale=0.8, **settings)
    pipe = pipelines[(backend, "single")]
    got = np.asarray(pipe(PROMPT, controls=[image], scales=0.8, steps=3, guidance=4.0, seed=2))
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    other = np.asarray(pipe(PROMPT, controls=[image], scales=0.8, steps=3, guidance=4.0, seed=3))
    assert psnr(got, other) < 40  # the seed draws the control latents and the noise


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_sd35_large_controlnet_matches_diffusers(backend, sd3, pipelines):
    """SD3.5-Large's ControlNets have no position embedding of their own (diffusers' pipeline gives
    them the transformer's) and take no text: their graph has the transformer's patch embedding
    inside and no encoder_hidden_states input."""
    from controlrt.manifest import Build

    spec = Build.open(sd3 / "borrowed").manifest.graphs["controlnet_0"].spec
    assert "encoder_hidden_states" not in spec.input_names
    image = sample_control_images(4, SIZE, SIZE)[3]
    settings = {"num_inference_steps": 3, "guidance_scale": 4.5}
    expected = _reference(
        sd3,
        NAMES[3:],
        seed=3,
        control_image=image,
        controlnet_conditioning_scale=0.9,
        control_guidance_end=0.7,
        **settings,
    )
    pipe = pipelines[(backend, "borrowed")]
    ours = {"steps": 3, "guidance": 4.5, "seed": 3}
    got = np.asarray(pipe(PROMPT, controls=[image], scales=0.9, end=0.7, **ours))
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    plain = np.asarray(pipe(PROMPT, **ours))
    assert psnr(got, plain) < 40  # the ControlNet steers the image


def test_sd3_builds_say_what_they_do_not_take(sd3, pipelines, tiny_models, tmp_path):
    from controlrt.export.build import export_build
    from controlrt.runtime.request import GenerationRequest

    pipe = pipelines[("torch", "multi")]
    image = sample_control_images(1, SIZE, SIZE)[0]
    assert pipe.generate(GenerationRequest(PROMPT, steps=1)).settings["guidance"] == 7.0  # diffusers' SD3 default
    with pytest.raises(InputError, match="blocks of a SD3 transformer share one"):
        pipe(PROMPT, controls=[image], control_mode="cfg-rw", steps=1)
    with pytest.raises(InputError, match="image-to-image with SD3 models is not supported yet"):
        pipe(PROMPT, controls=[image], image=image, steps=1)
    with pytest.raises(InputError, match="inpainting with SD3 models is not supported yet"):
        pipe(PROMPT, controls=[image], image=image, mask=image, steps=1)
    with pytest.raises(ModelError, match="it is a ControlNetModel and the base is a SD3 model"):
        export_build(sd3 / "base", [tiny_models.controlnets[0]], tmp_path / "out")
    with pytest.raises(ModelError, match=r"it is a SD3ControlNetModel and the base is a SD 1\.x/2\.x model"):
        export_build(tiny_models.base, [sd3 / "canny"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sd3_fp16_and_int8_builds_pass_parity(sd3, tmp_path):
    """convert and calibrate on an SD3 build: the T5 encoder stays fp32 in fp16 builds (its
    activations overflow fp16); the transformer and the ControlNets are quantized; every graph and
    the image pass the precision's gate."""
    import shutil

    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build
    from controlrt.export.fp16 import convert_build
    from controlrt.manifest import Build
    from controlrt.parity import run_parity

    build = shutil.copytree(sd3 / "multi", tmp_path / "build")
    convert_build(build)
    calibrate_build(build, settings=CalibrationSettings(samples=2, steps=2))
    manifest = Build.open(build).manifest
    assert manifest.graphs["text_encoder_3"].variants["fp16"].settings["text_encoder_3"].startswith("kept in fp32")
    assert {n for n, g in manifest.graphs.items() if "int8" in g.variants} == {
        "controlnet_0",
        "controlnet_1",
        "transformer",
    }
    for precision in ("fp16", "int8"):
        report = run_parity(build, precision=precision, steps=2)
        assert report.passed, report.table()


def test_the_readmes_sd3_commands_run(sd3, tmp_path, monkeypatch):
    """README, "SD3 and SD3.5 ControlNets": its commands as written, on the small set's folders."""
    import re
    import shlex
    from pathlib import Path

    from click.testing import CliRunner

    from controlrt.cli import cli

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## SD3 and SD3\.5 ControlNets\n\n```bash\n(.*?)```", readme, re.S)[1]
    for k, image in enumerate(sample_control_images(2, SIZE, SIZE)):
        image.save(tmp_path / ("edges.png", "depth.png")[k])
    folders = {"sd3-medium": "base", "sd3-controlnet-canny": "canny", "sd3-controlnet-depth": "depth"}
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        argv = [str(sd3 / folders[a]) if a in folders else a for a in shlex.split(line)]
        result = CliRunner().invoke(cli, argv[1:])
        assert result.exit_code == 0, f"{line}:\n{result.output}"
    with Image.open(tmp_path / "house.png") as image:
        assert image.size == (SIZE, SIZE) and json.loads(image.info["controlrt"])["guidance"] == 7.0


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_the_small_sets_run_in_diffusers_at_a_larger_scale(kind, tmp_path):
    """controlrt.smallsets at scale 2 (the benchmarks take scale 4): every part's widths still fit
    together, so diffusers' ControlNet pipeline runs the set."""
    import diffusers

    from controlrt import smallsets

    build, pipeline = {
        "sd3": (smallsets.build_sd3, diffusers.StableDiffusion3ControlNetPipeline),
        "flux": (smallsets.build_flux, diffusers.FluxControlNetPipeline),
    }[kind]
    components, controlnets = build(tmp_path, seed=0, scale=2)
    pipe = pipeline(**components, controlnet=controlnets[0])
    pipe.set_progress_bar_config(disable=True)
    image = sample_control_images(1, SIZE, SIZE)[0]
    out = pipe(PROMPT, control_image=image, num_inference_steps=1, height=SIZE, width=SIZE, output_type="np")
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()
