"""LCM-distilled UNets (time_cond_proj_dim) against diffusers' StableDiffusionControlNetPipeline.

Such a UNet takes guidance as an embedding (timestep_cond) instead of a classifier-free-guidance
batch: one branch, the negative prompt unused, the embedding fed to the UNet and never to the
ControlNets, and LCMScheduler drawing fresh noise from the pipeline's generator between steps.
The base is the tiny set's with its UNet given a seeded guidance projection (from_unet refuses such
a UNet, so the ControlNets are the tiny set's, made for the same shapes).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr
from controlrt.control import guidance_embedding

GATE = end_to_end_gate("fp32")
PROMPT = "a red circle on a blue square"


def make_lcm_base(base, out, dim: int = 32, seed: int = 5):
    """``base`` with an LCM-distilled-style UNet (a guidance projection of width ``dim``) and LCMScheduler."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    out = shutil.copytree(base, out)
    original = UNet2DConditionModel.from_pretrained(base / "unet")
    unet = UNet2DConditionModel.from_config({**original.config, "time_cond_proj_dim": dim})
    missing, unexpected = unet.load_state_dict(original.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        weight = unet.time_embedding.cond_proj.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 4 / dim**0.5)  # guidance matters
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet")
    LCMScheduler.from_config(original_scheduler(base)).save_pretrained(out / "scheduler")
    index = json.loads((out / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def original_scheduler(base) -> dict:
    return json.loads((base / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def lcm(tiny_models, tmp_path_factory):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from controlrt.export.build import export_build
    from controlrt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("lcm")
    base = make_lcm_base(tiny_models.base, root / "base")
    export_build(base, tiny_models.controlnets, root / "build")
    nets = [ControlNetModel.from_pretrained(p) for p in tiny_models.controlnets]
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=nets, safety_checker=None, requires_safety_checker=False
    )
    reference.set_progress_bar_config(disable=True)
    pipes = {b: Pipeline.load(root / "build", backend=b) for b in ("torch", "onnxruntime", "openvino")}
    yield {"root": root, "reference": reference, "pipes": pipes}
    for pipe in pipes.values():
        pipe.close()


def test_guidance_embedding_is_diffusers(lcm):
    reference = lcm["reference"]
    for guidance in (1.0, 1.5, 8.0):
        want = reference.get_guidance_scale_embedding(torch.tensor([guidance - 1.0]), embedding_dim=32)
        torch.testing.assert_close(guidance_embedding(guidance, 32), want, rtol=0, atol=1e-6)
    odd = guidance_embedding(2.0, 33)
    assert odd.shape == (1, 33) and odd[0, -1] == 0


def test_the_unet_graph_takes_the_embedding(lcm):
    from controlrt.manifest import Build

    manifest = Build.open(lcm["root"] / "build").manifest
    assert manifest.info.guidance_embedding_dim == 32
    assert "timestep_cond" in manifest.spec("unet").input_names
    controlnets = [g.spec for n, g in manifest.graphs.items() if n.startswith("controlnet")]
    assert controlnets and all("timestep_cond" not in s.input_names for s in controlnets)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
@pytest.mark.parametrize(
    ("scheduler", "guidance", "scales"),
    [("LCMScheduler", 1.5, [1.0, 0.6]), ("LCMScheduler", 8.0, [0.7, 1.0]), ("TCDScheduler", 2.0, [1.0, 1.0])],
    ids=["lcm-1.5", "lcm-8", "tcd"],
)
def test_matches_diffusers(lcm, backend, scheduler, guidance, scales):
    import diffusers

    reference = lcm["reference"]
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    images = sample_control_images(2, 64, 64)
    expected = reference(
        PROMPT,
        image=images,
        controlnet_conditioning_scale=scales,
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(9),
        height=64,
        width=64,
    ).images[0]
    pipe = lcm["pipes"][backend]
    short = {"LCMScheduler": "lcm", "TCDScheduler": "tcd"}[scheduler]
    settings = {"steps": 4, "guidance": guidance, "seed": 9, "scheduler": short, "height": 64, "width": 64}
    got = pipe(PROMPT, controls=images, scales=scales, **settings)
    expected = np.asarray(expected)
    assert expected.std() > 5
    assert psnr(expected, np.asarray(got)) >= GATE
    # the guidance embedding and the controls both change the image, so the comparison can fail
    other = pipe(PROMPT, controls=images, scales=scales, **{**settings, "guidance": 1.0})
    assert psnr(np.asarray(got), np.asarray(other)) < 45
    plain = pipe(PROMPT, **settings)
    assert psnr(np.asarray(got), np.asarray(plain)) < 40


def test_no_cfg_batch_and_the_negative_prompt_is_unused(lcm):
    pipe = lcm["pipes"]["onnxruntime"]
    calls = []
    unet = pipe.sessions["unet"]
    original = unet.infer

    def logged(feeds):
        calls.append(feeds["sample"].shape[0])
        return original(feeds)

    unet.infer = logged
    try:
        settings = {"steps": 2, "guidance": 4.0, "seed": 1, "scheduler": "lcm"}
        a = pipe(PROMPT, controls=sample_control_images(1, 64, 64), **settings)
        b = pipe(PROMPT, controls=sample_control_images(1, 64, 64), negative_prompt="blurry", **settings)
    finally:
        unet.infer = original
    assert set(calls) == {1}
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_parity_on_an_lcm_build(lcm):
    from controlrt.parity import run_parity

    report = run_parity(lcm["root"] / "build", backend="onnxruntime", steps=2)
    assert report.passed, report.table()


def test_sdxl_lcm_unet_matches_diffusers(xl_models, tmp_path):
    """An LCM-distilled SDXL UNet: the embedding beside text_embeds and time_ids, no CFG batch."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from controlrt.export.build import export_build
    from controlrt.runtime.pipeline import Pipeline

    base = make_lcm_base(xl_models.base, tmp_path / "base", dim=16)
    export_build(base, xl_models.controlnets[:1], tmp_path / "build")
    net = ControlNetModel.from_pretrained(xl_models.controlnets[0])
    reference = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=net)
    reference.set_progress_bar_config(disable=True)
    image = sample_control_images(1, 64, 64)[0]
    expected = reference(
        PROMPT,
        image=image,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator("cpu").manual_seed(2),
        height=64,
        width=64,
    ).images[0]
    with Pipeline.load(tmp_path / "build", backend="onnxruntime") as pipe:
        got = pipe(PROMPT, controls=[image], steps=3, guidance=3.0, seed=2, scheduler="lcm")
    expected = np.asarray(expected)
    assert expected.std() > 5
    assert psnr(expected, np.asarray(got)) >= GATE
