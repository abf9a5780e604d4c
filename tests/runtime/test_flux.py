"""Flux with Flux ControlNets against diffusers' FluxControlNetPipeline.

A small Flux set made in code (tests/flux_files.py): CLIP and T5, a transformer with double- and
single-stream blocks taking packed latents, the distilled guidance embedding and rotary ids, a
16-channel VAE with a shift, a flow-matching scheduler with dynamic shifting. Two ControlNets
summed block by block, one with no single-stream blocks and no guidance embedding, a ControlNet-Union
and an XLabs-style ControlNet (an input hint block, blocks taken in turn) must match
diffusers at the fp32 gate on every CPU backend, at a non-square size; the controls, the guidance
and the seed must change the image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flux_files import NAMES, SIZE
from PIL import Image

from controlrt.builtin import sample_control_images, sample_init_image
from controlrt.compare import end_to_end_gate, psnr
from controlrt.errors import InputError, ModelError
from controlrt.runtime.request import GenerationRequest

GATE = end_to_end_gate("fp32")
PROMPT = "a red house beside a tree"
BACKENDS = ["torch", "onnxruntime", "openvino"]
HEIGHT, WIDTH = SIZE, SIZE + 32  # not square: the packed token grid is 4 x 6


@pytest.fixture(scope="module")
def pipelines(flux):
    from controlrt.runtime.pipeline import Pipeline

    opened = {(b, k): Pipeline.load(flux / k, backend=b) for b in BACKENDS for k in ("multi", "single", "hinted")}
    yield opened
    for pipe in opened.values():
        pipe.close()


def _reference(root, names, seed: int, controlnet=None, pipeline=None, **settings):
    """diffusers' image at ``seed``: FluxControlNetPipeline, or ``pipeline`` (its img2img or inpaint
    class), over the ControlNets ``names`` (a multi-ControlNet for several)."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from diffusers.models.controlnets import FluxMultiControlNetModel

    if controlnet is None:
        nets = [FluxControlNetModel.from_pretrained(root / n) for n in names]
        controlnet = FluxMultiControlNetModel(nets) if len(nets) > 1 else nets[0]
    pipe = (pipeline or FluxControlNetPipeline).from_pretrained(root / "base", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(PROMPT, generator=generator, height=HEIGHT, width=WIDTH, **settings).images[0]
    return np.asarray(image)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_flux_controlnets_match_diffusers(backend, flux, pipelines):
    images = sample_control_images(2, HEIGHT, WIDTH)
    expected = _reference(
        flux,
        NAMES[:2],
        seed=5,
        control_image=images,
        controlnet_conditioning_scale=[0.9, 0.7],
        control_guidance_end=[1.0, 0.5],
        num_inference_steps=4,
        guidance_scale=3.5,
    )
    pipe = pipelines[(backend, "multi")]
    ours = {"steps": 4, "guidance": 3.5, "seed": 5, "height": HEIGHT, "width": WIDTH}
    got = np.asarray(pipe(PROMPT, controls=images, scales=[0.9, 0.7], end=[1.0, 0.5], **ours))
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    plain = np.asarray(pipe(PROMPT, **ours))  # the ControlNets steer the image, so the comparison can fail
    assert psnr(got, plain) < 40
    other = np.asarray(pipe(PROMPT, controls=images, scales=[0.9, 0.7], end=[1.0, 0.5], **{**ours, "guidance": 6.0}))
    assert psnr(got, other) < 40  # the guidance scale is the transformer's input, not a CFG batch


@pytest.mark.parametrize(("strength", "backend"), [*((None, b) for b in BACKENDS), (0.4, "torch")])
def test_flux_img2img_matches_diffusers(backend, strength, flux, pipelines):
    """FluxControlNetImg2ImgPipeline: the init image's latents sampled after the control latents,
    ``(z - shift) * scaling``, noised by the flow-matching scheduler's scale_noise at the first kept
    step, the schedule cut as SD3's and Flux's pipelines cut it (of 4 steps, diffusers' default
    strength 0.6 keeps 3 and 0.4 keeps 2, where SD's rule keeps 2 and 1)."""
    from diffusers import FluxControlNetImg2ImgPipeline

    init, images = sample_init_image(HEIGHT, WIDTH), sample_control_images(2, HEIGHT, WIDTH)
    theirs = {} if strength is None else {"strength": strength}
    expected = _reference(
        flux,
        NAMES[:2],
        5,
        pipeline=FluxControlNetImg2ImgPipeline,
        image=init,
        control_image=images,
        controlnet_conditioning_scale=[0.9, 0.7],
        control_guidance_end=[1.0, 0.5],
        control_mode=[None, None],  # diffusers 0.42's img2img pipeline runs no ControlNet of a multi without
        num_inference_steps=4,
        guidance_scale=3.5,
        **theirs,
    )
    pipe = pipelines[(backend, "multi")]
    ours = {"steps": 4, "guidance": 3.5, "seed": 5, "height": HEIGHT, "width": WIDTH, "scales": [0.9, 0.7]}
    ours |= {"end": [1.0, 0.5], "strength": strength}
    result = pipe.generate(GenerationRequest(PROMPT, images, image=init, **ours))
    got = np.asarray(result.image)
    assert result.settings["strength"] == (0.6 if strength is None else strength)
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    plain = {k: v for k, v in ours.items() if k != "strength"}
    assert psnr(got, np.asarray(pipe(PROMPT, controls=images, **plain))) < 40  # it starts from the init image
    other = pipe.generate(GenerationRequest(PROMPT, images, image=sample_init_image(HEIGHT, WIDTH, seed=9), **ours))
    # another init image changes it (the small random VAE encodes images to nearby latents: 42 dB measured)
    assert psnr(got, np.asarray(other.image)) < 60


@pytest.mark.parametrize(("strength", "backend"), [*((None, b) for b in BACKENDS), (1.0, "torch")])
def test_flux_inpainting_matches_diffusers(backend, strength, flux, pipelines):
    """FluxControlNetInpaintPipeline: as image to image, then after every step the unmasked region
    re-noised to the next step's sigma from the init image's latents (scale_noise) and the masked
    image's latents drawn (unused by the transformer, as in diffusers); default strength 0.6, and 1.0
    (pure noise at the first sigma). The unmasked latents end as the init image's."""
    from diffusers import FluxControlNetInpaintPipeline

    from controlrt.builtin import sample_mask

    init, mask = sample_init_image(HEIGHT, WIDTH), sample_mask(HEIGHT, WIDTH)
    images = sample_control_images(2, HEIGHT, WIDTH)
    theirs = {} if strength is None else {"strength": strength}
    expected = _reference(
        flux,
        NAMES[:2],
        6,
        pipeline=FluxControlNetInpaintPipeline,
        image=init,
        mask_image=mask,
        control_image=images,
        controlnet_conditioning_scale=[0.9, 0.7],
        control_guidance_start=[0.0, 0.3],
        control_mode=[None, None],  # diffusers 0.42's inpaint pipeline runs no ControlNet of a multi without
        num_inference_steps=4,
        guidance_scale=3.5,
        **theirs,
    )
    pipe = pipelines[(backend, "multi")]
    ours = {"steps": 4, "guidance": 3.5, "seed": 6, "height": HEIGHT, "width": WIDTH, "scales": [0.9, 0.7]}
    ours |= {"start": [0.0, 0.3], "strength": strength}
    result = pipe.generate(GenerationRequest(PROMPT, images, image=init, mask=mask, **ours))
    got = np.asarray(result.image)
    assert result.settings["strength"] == (0.6 if strength is None else strength)
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    img2img = pipe.generate(GenerationRequest(PROMPT, images, image=init, **ours))
    assert psnr(got, np.asarray(img2img.image)) < 40  # the mask keeps the init image outside it
    # outside the mask the latents end as the init image's, whatever the prompt: equal across prompts
    other = pipe.generate(GenerationRequest("a blue cat", images, image=init, mask=mask, **ours))
    keep = 1 - torch.nn.functional.interpolate(
        torch.from_numpy(np.asarray(mask.convert("L")) >= 128).float()[None, None], size=result.latents.shape[-2:]
    )
    assert keep.sum() > 0 and (1 - keep).sum() > 0
    assert torch.equal(result.latents * keep, other.latents * keep)
    assert not torch.allclose(result.latents * (1 - keep), other.latents * (1 - keep), atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_true_cfg_matches_diffusers(backend, flux, pipelines):
    """diffusers' true_cfg_scale: the transformer on the negative prompt and the prompt, the
    ControlNets once on the prompt, both transformer runs taking their residuals."""
    images = sample_control_images(2, HEIGHT, WIDTH)
    settings = {"num_inference_steps": 3, "guidance_scale": 3.5, "controlnet_conditioning_scale": [0.9, 0.7]}
    expected = _reference(
        flux, NAMES[:2], seed=4, control_image=images, negative_prompt="blurry", true_cfg_scale=4.0, **settings
    )
    pipe = pipelines[(backend, "multi")]
    ours = {"steps": 3, "guidance": 3.5, "seed": 4, "height": HEIGHT, "width": WIDTH, "scales": [0.9, 0.7]}
    result = pipe.generate(GenerationRequest(PROMPT, images, negative_prompt="blurry", true_cfg=4.0, **ours))
    got = np.asarray(result.image)
    assert result.settings["true_cfg"] == 4.0
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    plain = np.asarray(pipe(PROMPT, controls=images, **ours))  # without true CFG the image differs
    assert psnr(got, plain) < 40
    other = np.asarray(pipe(PROMPT, controls=images, negative_prompt="a cat", true_cfg=4.0, **ours))
    assert psnr(got, other) < 40  # the negative prompt steers it


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_controlnet_without_single_blocks_or_guidance_matches_diffusers(backend, flux, pipelines):
    image = sample_control_images(3, HEIGHT, WIDTH)[2]
    settings = {"num_inference_steps": 3, "guidance_scale": 4.0}
    expected = _reference(flux, NAMES[2:3], seed=2, control_image=image, controlnet_conditioning_scale=0.8, **settings)
    pipe = pipelines[(backend, "single")]
    ours = {"scales": 0.8, "steps": 3, "guidance": 4.0, "height": HEIGHT, "width": WIDTH}
    got = np.asarray(pipe(PROMPT, controls=[image], seed=2, **ours))
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    other = np.asarray(pipe(PROMPT, controls=[image], seed=3, **ours))
    assert psnr(got, other) < 40  # the seed draws the control latents and the noise


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flux_controlnet_union_matches_diffusers(backend, flux, pipelines):
    """The union ControlNet takes each typed image in a pass of its own with its mode (canny 0, depth
    2: InstantX's names), summed as diffusers' multi-ControlNet sums them; beside a plain ControlNet."""
    from diffusers import FluxControlNetModel
    from diffusers.models.controlnets import FluxMultiControlNetModel

    images = sample_control_images(3, HEIGHT, WIDTH)
    pipe = pipelines[(backend, "single")]
    ours = {"steps": 3, "guidance": 4.0, "seed": 4, "height": HEIGHT, "width": WIDTH}
    settings = {"num_inference_steps": 3, "guidance_scale": 4.0}
    union = FluxMultiControlNetModel([FluxControlNetModel.from_pretrained(flux / NAMES[3])])
    expected = _reference(
        flux,
        [],
        seed=4,
        controlnet=union,
        control_image=images[:2],
        control_mode=[0, 2],
        controlnet_conditioning_scale=[0.9, 0.6],
        control_guidance_end=[1.0, 0.6],
        **settings,
    )
    got = np.asarray(
        pipe(PROMPT, controls=images[:2], control_types=["canny", "depth"], scales=[0.9, 0.6], end=[1.0, 0.6], **ours)
    )
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    swapped = np.asarray(pipe(PROMPT, controls=images[:2], control_types=[2, 0], scales=[0.9, 0.6], **ours))
    assert psnr(got, swapped) < 40  # the modes steer the ControlNet
    expected = _reference(
        flux,
        NAMES[2:4],
        seed=4,
        control_image=[images[2], images[0]],
        control_mode=[None, 4],
        controlnet_conditioning_scale=[1.0, 1.0],
        **settings,
    )
    got = np.asarray(pipe(PROMPT, controls=[images[2], images[0]], control_types=[None, "pose"], **ours))
    assert psnr(expected, got) >= GATE


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_xlabs_controlnet_matches_diffusers(backend, flux, pipelines):
    """An XLabs-style ControlNet embeds the control image's pixels (in [-1, 1]) with its input hint
    block, and the transformer's blocks take its residuals in turn (diffusers'
    controlnet_blocks_repeat): the build's transformer graph is made so."""
    from controlrt.manifest import Build

    assert Build.open(flux / "hinted").manifest.graphs["transformer"].spec.blocks_repeat
    assert not Build.open(flux / "multi").manifest.graphs["transformer"].spec.blocks_repeat
    image = sample_control_images(2, HEIGHT, WIDTH)[1]
    settings = {"num_inference_steps": 4, "guidance_scale": 3.5}
    expected = _reference(
        flux,
        NAMES[4:],
        seed=6,
        control_image=image,
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.25,
        **settings,
    )
    pipe = pipelines[(backend, "hinted")]
    ours = {"steps": 4, "guidance": 3.5, "seed": 6, "height": HEIGHT, "width": WIDTH}
    got = np.asarray(pipe(PROMPT, controls=[image], scales=0.7, start=0.25, **ours))
    assert expected.std() > 5
    assert psnr(expected, got) >= GATE
    plain = np.asarray(pipe(PROMPT, **ours))
    assert psnr(got, plain) < 40  # the ControlNet steers the image


def test_flux_builds_say_what_they_do_not_take(flux, pipelines, tiny_models, tmp_path):
    import shutil

    from controlrt.export.build import export_build

    pipe = pipelines[("torch", "multi")]
    image = sample_control_images(1, SIZE, SIZE)[0]
    small = {"steps": 1, "height": SIZE, "width": SIZE}
    assert pipe.generate(GenerationRequest(PROMPT, **small)).settings["guidance"] == 7.0  # diffusers' default
    with pytest.raises(InputError, match="a negative prompt takes effect with true CFG only"):
        pipe(PROMPT, negative_prompt="blurry", **small)
    with pytest.raises(InputError, match="true CFG needs a negative prompt"):
        pipe(PROMPT, true_cfg=3.0, **small)
    with pytest.raises(InputError, match="must be finite and at least 1"):
        pipe(PROMPT, negative_prompt="blurry", true_cfg=0.5, **small)
    with pytest.raises(InputError, match="drop --scheduler"):
        pipe(PROMPT, scheduler="ddim", **small)
    with pytest.raises(InputError, match="blocks of a Flux transformer share one"):
        pipe(PROMPT, controls=[image], control_mode="cfg-rw", **small)
    with pytest.raises(InputError, match="strength 0 must be"):
        pipe(PROMPT, controls=[image], image=image, strength=0, **small)
    with pytest.raises(ModelError, match="it is a ControlNetModel and the base is a Flux model"):
        export_build(flux / "base", [tiny_models.controlnets[0]], tmp_path / "out")
    with pytest.raises(ModelError, match=r"it is a FluxControlNetModel and the base is a SD 1\.x/2\.x model"):
        export_build(tiny_models.base, [flux / "canny"], tmp_path / "out")
    with pytest.raises(ModelError, match="same numbers"):
        export_build(flux / "base", [flux / "canny", flux / "blur"], tmp_path / "out")
    with pytest.raises(ModelError, match=r"some as VAE latents \(InstantX-style\); diffusers runs"):
        export_build(flux / "base", [flux / "blur", flux / "xlabs"], tmp_path / "out")
    for key, value, words in (
        ("conditioning_embedding_channels", 16, "its input hint block makes 16 channels, packed 1 x 1 into 16"),
        ("num_single_layers", 9, "the transformer has 4"),
    ):
        other = shutil.copytree(flux / "canny", tmp_path / key)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ModelError, match=words):
            export_build(flux / "base", [other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flux_fp16_and_int8_builds_pass_parity(flux, tmp_path):
    """convert and calibrate on a Flux build: T5 stays fp32 in fp16 builds; the transformer and the
    ControlNets are quantized; every graph and the image pass the precision's gate."""
    import shutil

    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build
    from controlrt.export.fp16 import convert_build
    from controlrt.manifest import Build
    from controlrt.parity import run_parity

    build = shutil.copytree(flux / "multi", tmp_path / "build")
    convert_build(build)
    calibrate_build(build, settings=CalibrationSettings(samples=2, steps=2, height=SIZE, width=SIZE))
    manifest = Build.open(build).manifest
    assert manifest.graphs["text_encoder_2"].variants["fp16"].settings["text_encoder_2"].startswith("kept in fp32")
    assert {n for n, g in manifest.graphs.items() if "int8" in g.variants} == {
        "controlnet_0",
        "controlnet_1",
        "transformer",
    }
    for precision in ("fp16", "int8"):
        report = run_parity(build, precision=precision, steps=2, height=SIZE, width=SIZE)
        assert report.passed, report.table()


def test_the_readmes_flux_commands_run(flux, tmp_path, monkeypatch):
    """README, "Flux ControlNets": its commands as written, on the small set's folders."""
    import re
    import shlex
    from pathlib import Path

    from click.testing import CliRunner

    from controlrt.cli import cli

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Flux ControlNets\n\n```bash\n(.*?)```", readme, re.S)[1]
    for k, image in enumerate(sample_control_images(2, SIZE, SIZE)):
        image.save(tmp_path / ("edges.png", "depth.png")[k])
    folders = {"FLUX.1-dev": "base", "flux-controlnet-canny": "canny", "flux-controlnet-depth": "depth"}
    sizes = {"1024": str(SIZE)}  # the README's full-size image, at the small set's size
    monkeypatch.chdir(tmp_path)
    for line in block.strip().splitlines():
        argv = [str(flux / folders[a]) if a in folders else sizes.get(a, a) for a in shlex.split(line)]
        result = CliRunner().invoke(cli, argv[1:])
        assert result.exit_code == 0, f"{line}:\n{result.output}"
    with Image.open(tmp_path / "house.png") as image:
        assert image.size == (SIZE, SIZE) and json.loads(image.info["controlrt"])["guidance"] == 3.5
