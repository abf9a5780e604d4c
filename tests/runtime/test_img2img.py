"""Image-conditioned generation against diffusers' ControlNet img2img and inpainting pipelines.

The small seeded models of the other tests: img2img at two strengths (control windows over the
steps strength keeps), inpainting with a 4-channel UNet at strength 1.0 and 0.7 and with a
9-channel inpainting UNet, a mask crop, the inpaint ControlNet's -1 condition, a tiled VAE, SDXL
img2img and inpainting, a ControlNet-Union with a tile type (its control the init image) and a
repaint type, and a tiny VAE (AutoencoderTiny): every image at the fp32 end-to-end gate, on torch,
onnxruntime and (for the SD cases) OpenVINO. Checks that the init image and the mask change the
result, and that an inpainting's unmasked latents are the init image's exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import controlrt
from controlrt.builtin import sample_control_images, sample_init_image, sample_mask
from controlrt.compare import end_to_end_gate, psnr
from controlrt.errors import BuildError, InputError

GATE = end_to_end_gate("fp32")
STEPS = 6
PROMPT = "a red circle and a blue square"
BACKENDS = ["torch", "onnxruntime", "openvino"]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _pipe(cls, base, controlnets, **extra):
    from diffusers import ControlNetModel

    nets = [ControlNetModel.from_pretrained(p) for p in controlnets]
    pipe = cls.from_pretrained(base, controlnet=nets if len(nets) > 1 else nets[0], **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_reference(tiny_models):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline

    none = {"safety_checker": None, "requires_safety_checker": False}
    return {
        "img2img": _pipe(StableDiffusionControlNetImg2ImgPipeline, tiny_models.base, tiny_models.controlnets, **none),
        "inpaint": _pipe(StableDiffusionControlNetInpaintPipeline, tiny_models.base, tiny_models.controlnets, **none),
    }


def _close(expected, got, gate: float = GATE) -> float:
    expected, got = np.asarray(expected), np.asarray(got)
    assert expected.std() > 10, "the reference image is flat: the comparison would prove nothing"
    value = psnr(expected, got)
    assert value >= gate, f"PSNR {value:.1f} dB"
    return value


IMG2IMG = {
    "strength-0.5-windows": (
        {"strength": 0.5, "controlnet_conditioning_scale": [0.8, 1.2], "control_guidance_end": [1.0, 0.5]},
        {"strength": 0.5, "scales": [0.8, 1.2], "end": [1.0, 0.5]},
    ),
    "default-strength-and-scale": ({}, {}),  # diffusers' 0.8 and 0.8
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(IMG2IMG))
def test_img2img_matches_diffusers(case, backend, sd_reference, pipelines):
    theirs, ours = IMG2IMG[case]
    init, controls = sample_init_image(64, 64), sample_control_images(2, 64, 64)
    expected = sd_reference["img2img"](
        PROMPT, image=init, control_image=controls, num_inference_steps=STEPS, generator=_seeded(3), **theirs
    ).images[0]
    pipe = pipelines("tiny", backend)
    got = pipe.generate(controlrt.GenerationRequest(PROMPT, controls, image=init, steps=STEPS, seed=3, **ours))
    _close(expected, got.image)
    # the init image steers the result (on the random-weight VAE, most visibly in the latents)
    other = pipe.generate(
        controlrt.GenerationRequest(
            PROMPT, controls, image=sample_init_image(64, 64, seed=9), steps=STEPS, seed=3, **ours
        )
    )
    assert _rel(got.latents, other.latents) > 0.01  # measured 0.066 (ignored: 0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


INPAINT = {"strength-1": 1.0, "strength-0.7": 0.7}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INPAINT))
def test_inpainting_matches_diffusers(case, backend, sd_reference, pipelines):
    strength = INPAINT[case]
    init, mask, controls = sample_init_image(64, 64), sample_mask(64, 64), sample_control_images(2, 64, 64)
    expected = sd_reference["inpaint"](
        PROMPT,
        image=init,
        mask_image=mask,
        control_image=controls,
        strength=strength,
        num_inference_steps=STEPS,
        generator=_seeded(4),
        negative_prompt="blurry",
    ).images[0]
    pipe = pipelines("tiny", backend)
    common = {"controls": controls, "image": init, "strength": strength, "steps": STEPS, "seed": 4}
    got = pipe.generate(controlrt.GenerationRequest(PROMPT, mask=mask, negative_prompt="blurry", **common))
    _close(expected, got.image)
    other_mask = sample_mask(64, 64, (0.0, 0.0, 0.4, 0.4))
    other = pipe.generate(controlrt.GenerationRequest(PROMPT, mask=other_mask, negative_prompt="blurry", **common))
    assert _rel(got.latents, other.latents) > 0.01  # the mask steers it (ignored: 0)


def test_unmasked_latents_are_the_init_images(pipelines):
    """After a 4-channel UNet's last blend the unmasked latents are the init image's, exactly."""
    import torch.nn.functional as F

    from controlrt.runtime.img2img import encode, preprocess_image, sample_latents, scale_latents

    pipe = pipelines("tiny", "onnxruntime")
    init, mask = sample_init_image(64, 64), sample_mask(64, 64)
    result = pipe.generate(
        controlrt.GenerationRequest(PROMPT, image=init, mask=mask, strength=0.7, steps=STEPS, seed=5)
    )
    image = preprocess_image(init, 64, 64, pipe.info.vae_scale_factor)
    moments = encode(pipe.session("vae_encoder"), image, 0, pipe.info.vae_scale_factor, False)
    image_latents = scale_latents(sample_latents(moments, _seeded(5)), pipe.info.scaling_factor)  # the first draw
    keep = 1 - F.interpolate(preprocess_image(mask, 64, 64, 2, what="mask"), size=result.latents.shape[-2:])
    assert keep.sum() > 0 and (1 - keep).sum() > 0
    assert torch.equal(result.latents * keep, image_latents * keep)
    assert not torch.allclose(result.latents * (1 - keep), image_latents * (1 - keep), atol=1e-2)


def test_a_4_channel_inpainting_encodes_once_and_draws_as_diffusers(sd_reference, pipelines):
    """A 4-channel UNet never reads the masked image's latents: controlrt runs the VAE encoder once
    per image (diffusers twice) and only draws that sample's noise, so a stochastic scheduler, which
    goes on drawing from the generator, still gives diffusers' image."""
    import diffusers

    from controlrt.runtime.schedulers import SCHEDULERS

    init, mask, controls = sample_init_image(64, 64), sample_mask(64, 64), sample_control_images(2, 64, 64)
    reference = sd_reference["inpaint"]
    original = reference.scheduler
    reference.scheduler = getattr(diffusers, SCHEDULERS["euler-ancestral"]).from_config(original.config)
    try:
        kwargs = {"image": init, "mask_image": mask, "control_image": controls, "strength": 0.7}
        expected = reference(PROMPT, num_inference_steps=STEPS, generator=_seeded(6), **kwargs).images[0]
    finally:
        reference.scheduler = original
    pipe = pipelines("tiny", "onnxruntime")
    encoder = pipe.session("vae_encoder")
    calls = []
    real = encoder.infer
    encoder.infer = lambda feeds: calls.append(1) or real(feeds)
    try:
        common = {"controls": controls, "image": init, "mask": mask, "strength": 0.7, "steps": STEPS, "seed": 6}
        request = controlrt.GenerationRequest(PROMPT, scheduler="euler-ancestral", **common)
        got = pipe.generate(request)
    finally:
        del encoder.infer
    assert len(calls) == 1
    _close(expected, got.image)


@pytest.mark.parametrize("tiling", [False, True])
def test_drawing_a_samples_noise_moves_the_generator_as_sampling_does(pipelines, tiling):
    from controlrt.runtime.img2img import draw_sample_noise, encode, preprocess_image, sample_latents

    pipe = pipelines("tiny", "onnxruntime")
    encoder, info = pipe.session("vae_encoder"), pipe.info
    image = preprocess_image(sample_init_image(64, 96), 64, 96, info.vae_scale_factor)
    assert not tiling or max(image.shape[-2:]) > info.vae_tile_size  # tiled for real
    sampled, drawn = _seeded(8), _seeded(8)
    sample_latents(encode(encoder, image, info.vae_tile_size, info.vae_scale_factor, tiling), sampled)
    draw_sample_noise(encoder, image, drawn)
    assert torch.equal(sampled.get_state(), drawn.get_state())
    assert not torch.equal(drawn.get_state(), _seeded(8).get_state())


@pytest.fixture(scope="module")
def inpainting_unet_models(tiny_models, tmp_path_factory):
    """The tiny base with a 9-channel inpainting UNet (seeded), and its build."""
    import shutil

    from diffusers import UNet2DConditionModel

    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("inpainting-unet")
    base = shutil.copytree(tiny_models.base, root / "base")
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config["in_channels"] = 9
    torch.manual_seed(11)
    unet = UNet2DConditionModel.from_config(config)
    shutil.rmtree(base / "unet")
    unet.save_pretrained(base / "unet")
    export_build(base, tiny_models.controlnets[:1], root / "build")
    return base, root / "build"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_unet_matches_diffusers(strength, backend, inpainting_unet_models, tiny_models):
    from diffusers import StableDiffusionControlNetInpaintPipeline

    base, build = inpainting_unet_models
    reference = _pipe(
        StableDiffusionControlNetInpaintPipeline,
        base,
        tiny_models.controlnets[:1],
        safety_checker=None,
        requires_safety_checker=False,
    )
    init, mask, controls = sample_init_image(64, 64, 2), sample_mask(64, 64), sample_control_images(1, 64, 64)
    expected = reference(
        PROMPT,
        image=init,
        mask_image=mask,
        control_image=controls[0],
        strength=strength,
        num_inference_steps=STEPS,
        generator=_seeded(6),
    ).images[0]
    with controlrt.Pipeline.load(build, backend=backend) as pipe:
        assert pipe.unet_spec.input_names[3:5] == ["mask", "masked_image_latents"]
        got = pipe(PROMPT, controls=controls, image=init, mask=mask, strength=strength, steps=STEPS, seed=6)
        _close(expected, got)
        with pytest.raises(InputError, match="inpainting UNet: give an init image and a mask"):
            pipe(PROMPT, controls=controls, steps=STEPS)


def test_mask_crop_matches_padding_mask_crop(tiny_models, pipelines):
    """diffusers takes padding_mask_crop with one ControlNet: the build's first gets the control."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    reference = _pipe(
        StableDiffusionControlNetInpaintPipeline,
        tiny_models.base,
        tiny_models.controlnets[:1],
        safety_checker=None,
        requires_safety_checker=False,
    )
    init, control = sample_init_image(96, 128, 1), sample_control_images(1, 96, 128)[0]
    mask = sample_mask(96, 128, (0.3, 0.3, 0.5, 0.55))
    expected = reference(
        PROMPT,
        image=init,
        mask_image=mask,
        control_image=control,
        padding_mask_crop=8,
        num_inference_steps=STEPS,
        generator=_seeded(7),
        height=64,
        width=64,
    ).images[0]
    got = pipelines("tiny", "onnxruntime")(
        PROMPT, controls=[control], image=init, mask=mask, mask_crop=8, steps=STEPS, seed=7, height=64, width=64
    )
    assert got.size == init.size == expected.size  # pasted back into the whole init image
    _close(expected, got)
    outside = np.asarray(sample_mask(96, 128, (0.2, 0.2, 0.6, 0.65))) == 0
    assert np.array_equal(np.asarray(got)[outside], np.asarray(init)[outside])  # untouched far from the mask


def test_inpaint_controlnet_condition(sd_reference, pipelines, tmp_path):
    """``inpaint:IMAGE`` is control_v11p_sd15_inpaint's condition: the image, -1 where masked."""
    from controlrt.runtime.preprocess import inpaint

    init, mask = sample_init_image(64, 64, 3), sample_mask(64, 64)
    condition = inpaint(init, mask)
    assert condition.dtype == np.float32 and (condition == -1).any() and condition.max() <= 1
    tensor = torch.from_numpy(condition).permute(2, 0, 1)[None]  # diffusers' make_inpaint_condition
    expected = sd_reference["inpaint"](
        PROMPT,
        image=init,
        mask_image=mask,
        control_image=[tensor, sample_control_images(2, 64, 64)[1]],
        num_inference_steps=STEPS,
        generator=_seeded(8),
    ).images[0]
    init.save(tmp_path / "init.png")
    got = pipelines("tiny", "onnxruntime")(
        PROMPT,
        controls=[f"inpaint:{tmp_path / 'init.png'}", sample_control_images(2, 64, 64)[1]],
        image=init,
        mask=mask,
        steps=STEPS,
        seed=8,
    )
    _close(expected, got)


def test_tiled_vae_matches_diffusers_enable_tiling(sd_reference, pipelines):
    """At 64x96 (the tiny VAE's tile is 64 px) both the encode and the decode run in tiles."""
    reference = sd_reference["img2img"]
    init, controls = sample_init_image(64, 96, 4), sample_control_images(2, 64, 96)
    reference.vae.enable_tiling()
    try:
        expected = reference(PROMPT, image=init, control_image=controls, num_inference_steps=4, generator=_seeded(9))
    finally:
        reference.vae.disable_tiling()
    pipe = pipelines("tiny", "onnxruntime")
    got = pipe.generate(controlrt.GenerationRequest(PROMPT, controls, image=init, steps=4, seed=9, vae_tiling=True))
    _close(expected.images[0], got.image)
    untiled = pipe.generate(controlrt.GenerationRequest(PROMPT, controls, image=init, steps=4, seed=9))
    assert _rel(got.latents, untiled.latents) > 1e-3  # the tiles are really there (encoded in tiles)


def test_bad_image_requests_are_one_line(pipelines, tmp_path):
    pipe = pipelines("tiny", "onnxruntime")
    init, mask = sample_init_image(64, 64), sample_mask(64, 64)
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ({"mask": mask}, "a mask needs the image it masks"),
        ({"image": init, "strength": 0.0}, r"strength 0.0 must be a number in \(0, 1\]"),
        ({"image": init, "strength": 1.5}, r"strength 1.5 must be a number in \(0, 1\]"),
        ({"strength": 0.5}, "strength applies to image-to-image"),
        ({"image": init, "mask": str(tmp_path / "notes.png")}, "mask .* is not a readable image"),
        ({"image": str(tmp_path / "none.png")}, "init image .* does not exist"),
        ({"image": init, "mask_crop": 4}, "mask crop 4 must be"),
        ({"image": init, "mask": Image.new("L", (64, 64)), "mask_crop": 4}, "marks nothing to repaint"),
        ({"image": init, "strength": 0.1, "steps": 4}, "keeps no step of 4"),
        ({"controls": ["inpaint:" + str(tmp_path / "notes.png")], "image": init}, "made from the request's mask"),
    ]
    for settings, message in cases:
        settings = {"steps": 2, **settings}
        with pytest.raises(InputError, match=message):
            pipe(PROMPT, **settings)


def test_a_build_without_a_vae_encoder_says_to_export_again(tiny_build, tmp_path):
    import json
    import shutil

    build = shutil.copytree(tiny_build, tmp_path / "old")
    manifest = json.loads((build / "manifest.json").read_text())
    del manifest["graphs"]["vae_encoder"]
    (build / "manifest.json").write_text(json.dumps(manifest))
    with controlrt.Pipeline.load(build) as pipe:
        assert np.asarray(pipe(PROMPT, steps=2)).std() > 0  # text-to-image as before
        with pytest.raises(BuildError, match=r"no VAE encoder graph .* export it again"):
            pipe(PROMPT, image=sample_init_image(64, 64), steps=2)


# --- SDXL --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_reference(xl_models):
    from diffusers import (
        ControlNetUnionModel,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLControlNetUnionImg2ImgPipeline,
        StableDiffusionXLControlNetUnionInpaintPipeline,
    )

    def union(cls):
        pipe = cls.from_pretrained(xl_models.base, controlnet=ControlNetUnionModel.from_pretrained(xl_models.unions[0]))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return {
        "img2img": _pipe(StableDiffusionXLControlNetImg2ImgPipeline, xl_models.base, xl_models.controlnets),
        "inpaint": _pipe(StableDiffusionXLControlNetInpaintPipeline, xl_models.base, xl_models.controlnets),
        "union-img2img": union(StableDiffusionXLControlNetUnionImg2ImgPipeline),
        "union-inpaint": union(StableDiffusionXLControlNetUnionInpaintPipeline),
    }


@pytest.fixture(scope="module")
def xl_pipes(xl_build):
    pipes = {backend: controlrt.Pipeline.load(xl_build, backend=backend) for backend in ("torch", "onnxruntime")}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_sdxl_img2img_and_inpainting_match_diffusers(backend, xl_reference, xl_pipes):
    init, mask, controls = sample_init_image(64, 64, 5), sample_mask(64, 64), sample_control_images(2, 64, 64)
    pipe = xl_pipes[backend]
    common = {"num_inference_steps": STEPS, "negative_prompt": "blurry", "guidance_scale": 5.0}
    ours = {"steps": STEPS, "negative_prompt": "blurry", "guidance": 5.0}
    expected = xl_reference["img2img"](
        PROMPT, image=init, control_image=controls, strength=0.6, generator=_seeded(1), **common
    ).images[0]
    _close(expected, pipe(PROMPT, controls=controls, image=init, strength=0.6, seed=1, **ours))
    expected = xl_reference["inpaint"](
        PROMPT, image=init, mask_image=mask, control_image=controls, generator=_seeded(2), **common
    ).images[0]  # SDXL inpainting's default strength, 0.9999
    _close(expected, pipe(PROMPT, controls=controls, image=init, mask=mask, seed=2, **ours))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_union_tile_and_repaint_match_diffusers(backend, xl_reference, xl_pipes):
    """A tile type with no control of its own takes the init image (tile upscaling's recipe); the
    repaint type conditions inpainting on the masked image, as the union inpaint pipeline does."""
    small = sample_init_image(32, 32, 6)
    upscaled = small.resize((64, 64), Image.LANCZOS)  # diffusers resizes the control to the output size too
    pipe = xl_pipes[backend]
    expected = xl_reference["union-img2img"](
        PROMPT,
        image=small,
        control_image=[small],
        control_mode=[6],
        strength=0.7,
        num_inference_steps=STEPS,
        generator=_seeded(3),
        height=64,
        width=64,
        guidance_scale=5.0,
    ).images[0]
    got = pipe(
        PROMPT,
        image=small,
        control_types=["tile"],
        strength=0.7,
        steps=STEPS,
        seed=3,
        height=64,
        width=64,
        guidance=5.0,
    )
    assert got.size == (64, 64) and upscaled.size == got.size
    _close(expected, got)
    init, mask = sample_init_image(64, 64, 7), sample_mask(64, 64)
    masked = np.asarray(init).copy()
    masked[np.asarray(mask) > 0] = 0
    control = Image.fromarray(masked)
    expected = xl_reference["union-inpaint"](
        PROMPT,
        image=init,
        mask_image=mask,
        control_image=[control],
        control_mode=[7],
        num_inference_steps=STEPS,
        generator=_seeded(4),
        guidance_scale=5.0,
    ).images[0]
    got = pipe(
        PROMPT, image=init, mask=mask, controls=[control], control_types=["repaint"], steps=STEPS, seed=4, guidance=5.0
    )
    _close(expected, got)


# --- the tiny VAE (AutoencoderTiny, TAESD) -------------------------------------------------------


@pytest.fixture(scope="module")
def taesd(tiny_models, tmp_path_factory):
    """A seeded random AutoencoderTiny of the tiny model's factor (2) and a build that uses it."""
    from diffusers import AutoencoderTiny

    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(12)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    vae.save_pretrained(root / "taesd")
    export_build(tiny_models.base, tiny_models.controlnets, root / "build", vae_dir=root / "taesd")
    return root / "taesd", root / "build"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_tiny_vae_matches_diffusers_with_autoencoder_tiny(backend, taesd, sd_reference):
    from diffusers import AutoencoderTiny

    folder, build = taesd
    with controlrt.Pipeline.load(build, backend=backend) as pipe:
        assert pipe.build.manifest.spec("vae_encoder").output_names == ["latent_mean"]  # no distribution to sample
        assert pipe.info.vae_class == "AutoencoderTiny" and pipe.info.vae_scale_factor == 2
        reference = sd_reference["img2img"]
        kl = reference.vae
        reference.vae = AutoencoderTiny.from_pretrained(folder)
        try:
            init, controls = sample_init_image(64, 64, 8), sample_control_images(2, 64, 64)
            expected = reference(
                PROMPT, image=init, control_image=controls, num_inference_steps=STEPS, generator=_seeded(5)
            ).images[0]
        finally:
            reference.vae = kl
        _close(expected, pipe(PROMPT, controls=controls, image=init, steps=STEPS, seed=5))


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path):
    sample_init_image(64, 64).save(tmp_path / "init.png")
    sample_mask(64, 64).save(tmp_path / "mask.png")
    sample_control_images(1, 64, 64)[0].save(tmp_path / "edges.png")
    (tmp_path / "notes.png").write_text("not an image")
    return tmp_path


def test_generate_from_an_image_and_a_mask(tiny_build, files):
    import json

    from test_cli import run

    out = files / "out.png"
    args = ["generate", tiny_build, "--prompt", "x", "--steps", 3, "--control", files / "edges.png"]
    result = run(*args, "--image", files / "init.png", "--mask", files / "mask.png", "--strength", 0.7, "--out", out)
    assert result.exit_code == 0, result.output
    settings = json.loads(Image.open(out).text["controlrt"])
    assert settings["image"].startswith(f"{files / 'init.png'} sha256:") and settings["strength"] == 0.7
    assert settings["mask"].startswith(f"{files / 'mask.png'} sha256:") and settings["scales"] == [0.5]


BAD_CLI = {
    "mask without image": (["--mask", "{mask}"], "a mask needs the image it masks"),
    "strength": (["--image", "{init}", "--strength", "2"], r"strength 2.0 must be a number in (0, 1]"),
    "not a mask": (["--image", "{init}", "--mask", "{notes}"], "is not a readable image"),
    "missing image": (["--image", "{root}/none.png"], "does not exist"),
    "out is the init image": (["--image", "{init}", "--out", "{init}", "--force"], "is one of this command's inputs"),
    "mask crop without mask": (["--image", "{init}", "--mask-crop", "8"], "mask crop 8 must be"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_image_options_are_one_line(case, tiny_build, files):
    from test_cli import assert_clean_error, run

    extra, fragment = BAD_CLI[case]
    names = {"init": files / "init.png", "mask": files / "mask.png", "notes": files / "notes.png", "root": files}
    extra = [a.format(**names) for a in extra]
    before = (files / "init.png").read_bytes()
    result = run("generate", tiny_build, "--prompt", "x", "--steps", 2, "--out", files / "o.png", *extra)
    assert_clean_error(result, fragment)
    assert not (files / "o.png").exists() and (files / "init.png").read_bytes() == before


def test_preprocess_inpaint_writes_the_condition_as_an_array(files, pipelines):
    from test_cli import assert_clean_error, run

    out = files / "cond.npy"
    result = run("preprocess", "inpaint", files / "init.png", "--mask", files / "mask.png", "--out", out)
    assert result.exit_code == 0, result.output
    condition = np.load(out)
    assert condition.shape == (64, 64, 3) and condition.dtype == np.float32
    masked = np.asarray(Image.open(files / "mask.png")) > 127
    assert (condition[masked] == -1).all() and (condition[~masked] >= 0).all()
    assert_clean_error(run("preprocess", "inpaint", files / "init.png", "--out", files / "c2.npy"), "--mask")
    png = run("preprocess", "inpaint", files / "init.png", "--mask", files / "mask.png", "--out", files / "c.png")
    assert_clean_error(png, "write it as a .npy array")
    # the array is a control as it stands, the same as inpaint:IMAGE made from the request's mask
    pipe = pipelines("tiny", "onnxruntime")
    common = {"image": str(files / "init.png"), "mask": str(files / "mask.png"), "steps": 2, "seed": 1}
    from_file = pipe("x", controls=[str(out)], **common)
    inline = pipe("x", controls=[f"inpaint:{files / 'init.png'}"], **common)
    assert np.array_equal(np.asarray(from_file), np.asarray(inline))


@pytest.fixture(scope="module")
def aesthetic_xl(xl_models, tmp_path_factory):
    """The SDXL set as a refiner-style model: a UNet (and ControlNet) with five time ids, the last
    an aesthetic score, and model_index.json's requires_aesthetics_score; with its build."""
    import json
    import shutil

    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlrt.builtin import _give_zero_convs_weights
    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("aesthetic")
    base = shutil.copytree(xl_models.base, root / "base")
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    config["projection_class_embeddings_input_dim"] = pooled + 5 * config["addition_time_embed_dim"]
    torch.manual_seed(13)
    unet = UNet2DConditionModel.from_config(config)
    shutil.rmtree(base / "unet")
    unet.save_pretrained(base / "unet")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    _give_zero_convs_weights(controlnet, 14)
    controlnet.save_pretrained(root / "controlnet")
    export_build(base, [root / "controlnet"], root / "build")
    return base, root / "controlnet", root / "build"


def test_sdxl_aesthetic_scores_match_diffusers(aesthetic_xl):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline

    base, controlnet, build = aesthetic_xl
    init, mask, control = sample_init_image(64, 64, 9), sample_mask(64, 64), sample_control_images(1, 64, 64)[0]
    scores = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}
    # original_size given: diffusers 0.42's XL img2img adds the score to the control image's torch.Size otherwise
    common = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "negative_prompt": "blurry", **scores}
    common["original_size"] = (64, 64)
    ours = {"steps": STEPS, "guidance": 5.0, "negative_prompt": "blurry", **scores}
    with controlrt.Pipeline.load(build, backend="onnxruntime") as pipe:
        assert pipe.info.requires_aesthetics_score and pipe.info.time_ids == 5
        for cls, extra in (
            (StableDiffusionXLControlNetImg2ImgPipeline, {"crops_coords_top_left": (4, 8)}),
            (StableDiffusionXLControlNetInpaintPipeline, {"mask_image": mask, "crops_coords_top_left": (4, 8)}),
        ):
            reference = _pipe(cls, base, [controlnet], requires_aesthetics_score=True)
            expected = reference(PROMPT, image=init, control_image=control, generator=_seeded(6), **common, **extra)
            mine = {"mask": mask} if "mask_image" in extra else {}
            got = pipe(PROMPT, controls=[control], image=init, seed=6, crops_coords_top_left=(4, 8), **mine, **ours)
            _close(expected.images[0], got)
        other = pipe(PROMPT, controls=[control], image=init, seed=6, **{**ours, "aesthetic_score": 1.0})
        assert psnr(np.asarray(got), np.asarray(other)) < 60  # the score is an input that counts
