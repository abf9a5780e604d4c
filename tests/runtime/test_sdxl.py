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
        "unet",
        "vae_decoder",
    ]
    unet = manifest.spec("unet")
    assert unet.input_names[:5] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert len(unet.residual_inputs) == 7  # conv_in, 2 + 1 downsampler, 2 in the last block, mid
    assert manifest.spec("text_encoder_2").output_names == ["hidden_states", "text_embeds"]
    assert manifest.info.sdxl and manifest.info.force_zeros_for_empty_prompt
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
