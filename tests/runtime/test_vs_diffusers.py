"""End to end against diffusers' StableDiffusionControlNetPipeline at the same seed.

Both backends, both architectures, one and two ControlNets, uniform and guess modes, start/end
windows and negative prompts, the default size, an SD2-style text encoder that takes the attention
mask: the image must match at the fp32 end-to-end gate (controlrt.compare).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr
from controlrt.runtime.request import GenerationRequest

END_TO_END_PSNR_DB = end_to_end_gate("fp32")

CASES = {
    "one-uniform": dict(n=1, mode="uniform", scales=[0.8], start=0.0, end=1.0, negative=None),
    "two-uniform-windows": dict(
        n=2, mode="uniform", scales=[0.8, 1.3], start=[0.0, 0.25], end=[1.0, 0.75], negative="blurry"
    ),
    "two-guess": dict(n=2, mode="guess", scales=[1.0, 0.6], start=0.0, end=1.0, negative="ugly"),
    "one-guess-window": dict(n=1, mode="guess", scales=[1.2], start=0.5, end=1.0, negative=None),
}
STEPS = 6


@pytest.fixture(scope="module")
def diffusers_pipes(models):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    cache = {}

    def get(arch: str, n: int, scheduler: str | None = None):
        key = (arch, n, scheduler)
        if key not in cache:
            m = models[arch]
            nets = [ControlNetModel.from_pretrained(p) for p in m.controlnets[:n]]
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                m.base,
                controlnet=nets if n > 1 else nets[0],
                safety_checker=None,
                requires_safety_checker=False,
            )
            if scheduler is not None:
                import diffusers

                from controlrt.runtime.schedulers import SCHEDULERS

                cls = getattr(diffusers, SCHEDULERS[scheduler])
                pipe.scheduler = cls.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            cache[key] = pipe
        return cache[key]

    return get


def _diffusers_image(pipe, case, images, seed, height, width):
    n = case["n"]
    result = pipe(
        prompt="a red circle and a blue square",
        negative_prompt=case["negative"],
        image=images if n > 1 else images[0],
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
        height=height,
        width=width,
        controlnet_conditioning_scale=case["scales"] if n > 1 else case["scales"][0],
        guess_mode=case["mode"] == "guess",
        control_guidance_start=case["start"],
        control_guidance_end=case["end"],
    )
    return np.asarray(result.images[0])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("arch", ["tiny", "other"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_diffusers(case_name, arch, backend, pipelines, diffusers_pipes):
    case = CASES[case_name]
    pipe = pipelines(arch, backend)
    height, width = pipe.info.default_size
    images = sample_control_images(case["n"], height, width)
    expected = _diffusers_image(diffusers_pipes(arch, case["n"]), case, images, 11, height, width)
    got = pipe(
        "a red circle and a blue square",
        controls=images,
        scales=case["scales"],
        start=case["start"],
        end=case["end"],
        control_mode=case["mode"],
        steps=STEPS,
        guidance=7.5,
        seed=11,
        negative_prompt=case["negative"],
    )
    assert expected.std() > 10, "the reference image is flat: the comparison would prove nothing"
    value = psnr(expected, np.asarray(got))
    assert value >= END_TO_END_PSNR_DB, f"PSNR {value:.1f} dB"


@pytest.mark.parametrize("scheduler", ["euler-ancestral", "dpm++", "pndm"])
def test_other_schedulers_match_diffusers(scheduler, pipelines, diffusers_pipes):
    """--scheduler swaps the class like diffusers' from_config; stochastic ones share the generator."""
    case = CASES["one-uniform"]
    pipe = pipelines("tiny", "onnxruntime")
    height, width = 48, 80  # not the native size
    images = sample_control_images(1, height, width)
    expected = _diffusers_image(diffusers_pipes("tiny", 1, scheduler), case, images, 5, height, width)
    got = pipe(
        "a red circle and a blue square",
        controls=images,
        scales=case["scales"],
        steps=STEPS,
        seed=5,
        height=height,
        width=width,
        scheduler=scheduler,
    )
    value = psnr(expected, np.asarray(got))
    assert value >= END_TO_END_PSNR_DB, f"PSNR {value:.1f} dB"


def test_control_changes_the_image(pipelines):
    """The ControlNets have real weights: switching control off changes the image a lot."""
    pipe = pipelines("tiny", "onnxruntime")
    images = sample_control_images(2, *pipe.info.default_size)
    on = np.asarray(pipe("a cat", controls=images, steps=4, seed=2))
    off = np.asarray(pipe("a cat", controls=images, scales=0.0, steps=4, seed=2))
    none = np.asarray(pipe("a cat", steps=4, seed=2))
    assert psnr(on, off) < 30
    assert psnr(off, none) == float("inf"), "scale 0 must equal no control at all"


def test_no_guidance_runs_without_cfg(pipelines, diffusers_pipes):
    """guidance <= 1 turns classifier-free guidance off in both."""
    case = CASES["one-uniform"]
    pipe = pipelines("tiny", "torch")
    height, width = pipe.info.default_size
    images = sample_control_images(1, height, width)
    reference = diffusers_pipes("tiny", 1)
    expected = np.asarray(
        reference(
            prompt="a dog",
            image=images[0],
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(3),
            height=height,
            width=width,
            controlnet_conditioning_scale=case["scales"][0],
        ).images[0]
    )
    got = np.asarray(pipe("a dog", controls=images, scales=case["scales"], steps=4, guidance=1.0, seed=3))
    assert psnr(expected, got) >= END_TO_END_PSNR_DB


def test_size_defaults_to_the_control_images_as_in_diffusers(pipelines, diffusers_pipes, caplog):
    """No height or width: the first control image's size, as diffusers takes it."""
    import logging

    case = CASES["one-uniform"]
    pipe = pipelines("tiny", "onnxruntime")
    images = sample_control_images(1, 48, 80)
    reference = diffusers_pipes("tiny", 1)
    expected = _diffusers_image(reference, case, images, 4, None, None)
    result = pipe.generate(GenerationRequest("a red circle and a blue square", images, scales=0.8, steps=STEPS, seed=4))
    assert result.image.size == (80, 48) == expected.shape[1::-1]
    assert psnr(expected, np.asarray(result.image)) >= END_TO_END_PSNR_DB
    # a size the graphs cannot take is rounded down to the size multiple, and the difference said
    m = pipe.info.size_multiple
    odd = sample_control_images(1, 48 + m // 2, 80 + m // 2)
    with caplog.at_level(logging.INFO, logger="controlrt.runtime.request"):
        result = pipe.generate(GenerationRequest("x", odd, steps=1))
    assert result.image.size == (80, 48)
    assert "rounded down to a multiple of" in caplog.text


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """The tiny model with a text encoder whose config asks for the attention mask (SD2-style)."""
    import json

    from controlrt.builtin import TINY, write_builtin_models
    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("masked")
    models = write_builtin_models(root / "models", TINY, seed=7)
    config = models.base / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_attention_mask": True}))
    export_build(models.base, models.controlnets[:1], root / "build")
    return models, root / "build"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_text_encoder_attention_mask_as_diffusers_passes_it(masked, backend):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from controlrt.manifest import Build
    from controlrt.runtime.pipeline import Pipeline

    models, build = masked
    assert "attention_mask" in Build.open(build).manifest.spec("text_encoder").input_names
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        models.base,
        controlnet=ControlNetModel.from_pretrained(models.controlnets[0]),
        safety_checker=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    images = sample_control_images(1, 64, 64)
    case = {**CASES["one-uniform"], "negative": "blurry"}
    expected = _diffusers_image(reference, case, images, 9, 64, 64)
    with Pipeline.load(build, backend=backend) as pipe:
        got = pipe(
            "a red circle and a blue square", controls=images, scales=0.8, steps=STEPS, seed=9, negative_prompt="blurry"
        )
        tokens = pipe.tokenizer(
            ["blurry"], padding="max_length", max_length=pipe.info.sequence_length, return_tensors="pt"
        )
        session = pipe.sessions["text_encoder"]
        masked_out = session.infer({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        ones = torch.ones_like(tokens.attention_mask)
        unmasked_out = session.infer({"input_ids": tokens.input_ids, "attention_mask": ones})
    # the mask matters (so the comparison can fail), and controlrt applies it as diffusers does
    difference = (masked_out["last_hidden_state"] - unmasked_out["last_hidden_state"]).norm()
    assert difference > 1e-3 * masked_out["last_hidden_state"].norm()
    assert psnr(expected, np.asarray(got)) >= END_TO_END_PSNR_DB


def test_a_prompt_past_the_tokenizers_limit_is_warned_about(pipelines, caplog):
    import logging

    pipe = pipelines("tiny", "onnxruntime")
    long = " ".join(["red circle"] * 60) + " zebra"
    with caplog.at_level(logging.WARNING, logger="controlrt.runtime.pipeline"):
        result = pipe.generate(GenerationRequest(long, steps=1))
    assert "was cut off" in caplog.text and "zebra" in caplog.text
    assert "zebra" in result.settings["truncated"][0]
    assert json.loads(result.image.info["controlrt"])["prompt"] == long
