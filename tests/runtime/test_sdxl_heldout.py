"""SDXL on a model set that controlrt's own builder never makes, against diffusers.

Built here with diffusers and transformers directly, unlike the built-in sets: three UNet blocks with
transformer depths 1, 2 and 3 and per-block head counts, a VAE with factor 4, text encoders 24 and 40
wide whose hidden sizes add up to the cross-attention width, a 16-wide pooled projection, 4-wide time
ids, ControlNets and a union (six control types, its own conditioning widths) made with from_unet,
and a multistep scheduler. Two ControlNets and a union with two control types must match
StableDiffusionXLControlNetPipeline and StableDiffusionXLControlNetUnionPipeline at the fp32 gate on
both backends.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr

GATE = end_to_end_gate("fp32")
SIZE = 48
PROMPT = "a blue square beside a red circle"


def _weigh(module, seed: int) -> None:
    """Give a ControlNet's zero-initialised layers weights, so that control changes the image."""
    generator = torch.Generator("cpu").manual_seed(seed)
    layers = [*module.controlnet_down_blocks, module.controlnet_mid_block, module.controlnet_cond_embedding.conv_out]
    if hasattr(module, "spatial_ch_projs"):
        layers.append(module.spatial_ch_projs)
    with torch.no_grad():
        for layer in layers:
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / fan_in**0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def heldout(xl_models, tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        ControlNetUnionModel,
        DPMSolverMultistepScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("heldout-xl")
    tokenizers = [CLIPTokenizer.from_pretrained(xl_models.base / n) for n in ("tokenizer", "tokenizer_2")]
    vocab = len(tokenizers[0])
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        block_out_channels=(16, 32, 48),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 6),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    encoders = []
    for k, (width, cls) in enumerate(((24, CLIPTextModel), (40, CLIPTextModelWithProjection))):
        torch.manual_seed(12 + k)
        config = CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=width * 3,
            projection_dim=16 if k else width,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=tokenizers[0].model_max_length,
            bos_token_id=tokenizers[0].bos_token_id,
            eos_token_id=tokenizers[0].eos_token_id,
            pad_token_id=tokenizers[0].pad_token_id,
        )
        encoders.append(cls(config))
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(root / "base")
    nets = []
    for k in range(2):
        torch.manual_seed(20 + k)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 24))
        _weigh(net, 30 + k)
        net.save_pretrained(root / f"cn{k}")
        nets.append(net)
    torch.manual_seed(40)
    # from_unet fixes the union's condition transformer at SDXL's 320 channels: size it to this UNet
    template = ControlNetUnionModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 12, 16), load_weights_from_unet=False
    )
    config = {k: v for k, v in template.config.items() if k != "_use_default_values"}
    config.update(num_trans_channel=16, num_proj_channel=16, num_trans_head=4)  # six control types
    union = ControlNetUnionModel.from_config(config)
    for part in ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding"):
        getattr(union, part).load_state_dict(getattr(unet, part).state_dict())
    union.down_blocks.load_state_dict(unet.down_blocks.state_dict(), strict=False)
    union.mid_block.load_state_dict(unet.mid_block.state_dict(), strict=False)
    _weigh(union, 41)
    union.save_pretrained(root / "union")
    export_build(root / "base", [root / "cn0", root / "cn1", root / "union"], root / "build")
    return {"root": root, "nets": nets, "union": union}


@pytest.fixture(scope="module")
def heldout_pipelines(heldout):
    from controlrt.runtime.pipeline import Pipeline

    pipes = {b: Pipeline.load(heldout["root"] / "build", backend=b) for b in ("torch", "onnxruntime")}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


def _settings() -> dict:
    return {"num_inference_steps": 4, "guidance_scale": 6.0, "height": SIZE, "width": SIZE}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_two_controlnets_match_diffusers(backend, heldout, heldout_pipelines):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    root = heldout["root"]
    nets = [ControlNetModel.from_pretrained(root / f"cn{k}") for k in range(2)]
    reference = StableDiffusionXLControlNetPipeline.from_pretrained(root / "base", controlnet=nets)
    reference.set_progress_bar_config(disable=True)
    images = sample_control_images(2, SIZE, SIZE)
    scales = [0.9, 0.6]
    expected = reference(
        PROMPT,
        image=images,
        controlnet_conditioning_scale=scales,
        negative_prompt="blurry",
        generator=torch.Generator("cpu").manual_seed(4),
        **_settings(),
    ).images[0]
    pipe = heldout_pipelines[backend]
    ours = {"steps": 4, "guidance": 6.0, "seed": 4, "height": SIZE, "width": SIZE, "negative_prompt": "blurry"}
    got = pipe(PROMPT, controls=images, control_types=[None, None], scales=scales, **ours)
    expected = np.asarray(expected)
    assert expected.std() > 5
    assert psnr(expected, np.asarray(got)) >= GATE
    plain = pipe(PROMPT, **ours)  # the ControlNets steer the image, so the comparison can fail
    assert psnr(np.asarray(got), np.asarray(plain)) < 40


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_union_with_two_control_types_matches_diffusers(backend, heldout, heldout_pipelines):
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

    from controlrt.runtime.request import control_type

    root = heldout["root"]
    union = ControlNetUnionModel.from_pretrained(root / "union")
    reference = StableDiffusionXLControlNetUnionPipeline.from_pretrained(root / "base", controlnet=union)
    reference.set_progress_bar_config(disable=True)
    images = sample_control_images(2, SIZE, SIZE)
    types, scales = ["depth", "canny"], [1.0, 0.7]
    expected = reference(
        PROMPT,
        control_image=images,
        control_mode=[control_type(t) for t in types],
        controlnet_conditioning_scale=scales,
        generator=torch.Generator("cpu").manual_seed(6),
        **_settings(),
    ).images[0]
    pipe = heldout_pipelines[backend]
    ours = {"steps": 4, "guidance": 6.0, "seed": 6, "height": SIZE, "width": SIZE}
    got = pipe(PROMPT, controls=images, control_types=types, scales=scales, **ours)
    expected = np.asarray(expected)
    assert expected.std() > 5
    assert psnr(expected, np.asarray(got)) >= GATE
    plain = pipe(PROMPT, **ours)
    assert psnr(np.asarray(got), np.asarray(plain)) < 40
