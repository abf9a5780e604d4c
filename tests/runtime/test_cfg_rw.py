"""CFG resolution weighting against an independent computation written with diffusers modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr, tensor_metrics
from controlrt.runtime.request import GenerationRequest

END_TO_END_PSNR_DB = end_to_end_gate("fp32")

STEPS, SEED, GUIDANCE = 5, 4, 6.0
PROMPT, SCALES = "a blue square", [0.9, 0.5]


def reference_latents(models, images, normalized: bool) -> torch.Tensor:
    """The paper's CFG-RW written plainly: ControlNets see the conditional half only, residual i
    is weighted by h_max / h_i measured on the residual tensors themselves, uncond gets none."""
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from diffusers.image_processor import VaeImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(models.base, safety_checker=None, requires_safety_checker=False)
    nets = [ControlNetModel.from_pretrained(p).eval() for p in models.controlnets]
    f = pipe.vae_scale_factor
    height, width = pipe.unet.config.sample_size * f, pipe.unet.config.sample_size * f
    processor = VaeImageProcessor(vae_scale_factor=f, do_convert_rgb=True, do_normalize=False)
    conds = [processor.preprocess(im, height=height, width=width) for im in images]

    def embed(text):
        ids = pipe.tokenizer(
            text,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        uncond, cond = embed(""), embed(PROMPT)
        generator = torch.Generator("cpu").manual_seed(SEED)
        latents = torch.randn((1, 4, height // f, width // f), generator=generator)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(STEPS)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            total = None
            for net, image, scale in zip(nets, conds, SCALES, strict=True):
                down, mid = net(x, t, encoder_hidden_states=cond, controlnet_cond=image, return_dict=False)
                residuals = [*down, mid]
                h_max = max(r.shape[-2] for r in residuals)
                weights = [h_max / r.shape[-2] for r in residuals]
                if normalized:
                    weights = [w / max(weights) for w in weights]
                weighted = [r * w * scale for r, w in zip(residuals, weights, strict=True)]
                total = weighted if total is None else [a + b for a, b in zip(total, weighted, strict=True)]
            both = [torch.cat([torch.zeros_like(r), r]) for r in total]
            noise = pipe.unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=torch.cat([uncond, cond]),
                down_block_additional_residuals=both[:-1],
                mid_block_additional_residual=both[-1],
            ).sample
            n_uncond, n_cond = noise.chunk(2)
            latents = scheduler.step(n_uncond + GUIDANCE * (n_cond - n_uncond), t, latents).prev_sample
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents, np.asarray(pipe.image_processor.postprocess(image, output_type="pil")[0])


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_cfg_rw_matches_independent_loop(normalized, backend, tiny_models, pipelines):
    pipe = pipelines("tiny", backend)
    images = sample_control_images(2, *pipe.info.default_size)
    latents, expected = reference_latents(tiny_models, images, normalized)
    mode = "cfg-rw-normalized" if normalized else "cfg-rw"
    result = pipe.generate(
        GenerationRequest(PROMPT, images, scales=SCALES, control_mode=mode, steps=STEPS, seed=SEED, guidance=GUIDANCE)
    )
    assert tensor_metrics(latents, result.latents)["rel_l2"] < 1e-4
    assert psnr(expected, np.asarray(result.image)) >= END_TO_END_PSNR_DB


def test_cfg_rw_differs_from_uniform(pipelines):
    pipe = pipelines("tiny", "onnxruntime")
    images = sample_control_images(2, *pipe.info.default_size)
    a = np.asarray(pipe(PROMPT, controls=images, control_mode="cfg-rw", steps=3, seed=1))
    b = np.asarray(pipe(PROMPT, controls=images, control_mode="uniform", steps=3, seed=1))
    c = np.asarray(pipe(PROMPT, controls=images, control_mode="cfg-rw-normalized", steps=3, seed=1))
    assert psnr(a, b) < 35 and psnr(a, c) < 35
