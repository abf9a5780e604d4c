"""Test helper: write diffusers models as original-format (LDM / ControlNet 1.x) single files.

The community ships Stable Diffusion 1.x as one checkpoint with ``model.diffusion_model.*``,
``first_stage_model.*`` and ``cond_stage_model.transformer.*`` keys, and ControlNets with
``control_model.*`` keys (input_blocks, zero_convs, input_hint_block, middle_block_out). Tests need
such files for small random models; these functions rename a diffusers state dict into that
layout for any number of blocks and layers. The tests check the result by converting it back.
"""

from __future__ import annotations

import re

import torch

RESNET_UNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
]
RESNET_VAE = [("conv_shortcut.", "nin_shortcut.")]
ATTENTION_VAE = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _rename(key: str, blocks: list[tuple[str, str]], inner: dict[str, list[tuple[str, str]]]) -> str:
    for new, old in sorted(blocks, key=lambda r: -len(r[0])):
        if key.startswith(new):
            rest = key[len(new) :]
            for marker, rules in inner.items():
                if marker in new:
                    for a, b in rules:
                        if rest.startswith(a):
                            rest = b + rest[len(a) :]
                            break
            return old + rest
    raise KeyError(f"no original name for {key}")


def _encoder_blocks(config: dict, with_up: bool) -> list[tuple[str, str]]:
    """diffusers -> LDM prefixes for the UNet (or a ControlNet's copy of its encoder)."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    rules = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's text_time conditions
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i in range(n):
        for j in range(layers):
            k = (layers + 1) * i + j + 1
            rules += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0."),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."),
            ]
        if i < n - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
        if not with_up:
            continue
        for j in range(layers + 1):
            k = (layers + 1) * i + j
            rules += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0."),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."),
            ]
        if i < n - 1:
            attention = "CrossAttn" in config["up_block_types"][i]
            rules.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(layers + 1) * i + layers}.{2 if attention else 1}.")
            )
    if with_up:
        rules += [("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    return rules


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    rules = _encoder_blocks(config, with_up=True)
    return {"model.diffusion_model." + _rename(k, rules, {"resnets": RESNET_UNET}): v for k, v in state.items()}


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    rules = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in."),
            (f"{part}.conv_out.", f"{part}.conv_out."),
            (f"{part}.conv_norm_out.", f"{part}.norm_out."),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
        ]
    for i in range(n):
        for j in range(config["layers_per_block"] + 1):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."))
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv."))
    out = {}
    for key, value in state.items():
        name = _rename(key, rules, {"resnets": RESNET_VAE, "attentions": ATTENTION_VAE})
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        out["first_stage_model." + name] = value
    return out


def text_encoder_to_original(
    state: dict[str, torch.Tensor], prefix: str = "cond_stage_model.transformer."
) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
]


def open_clip_to_original(
    state: dict[str, torch.Tensor], prefix: str = "conditioner.embedders.1.model."
) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's names (SDXL's second text encoder): fused q/k/v
    projections, a transposed text projection."""
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    for i in layers:
        name = f"text_model.encoder.layers.{i}."
        for part in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{part}"] = torch.cat(
                [state[f"{name}self_attn.{p}_proj.{part}"] for p in "qkv"]
            )
        for key, value in state.items():
            if key.startswith(name):
                rest = key[len(name) :]
                for new, old in OPEN_CLIP_LAYER:
                    if rest.startswith(new):
                        out[f"transformer.resblocks.{i}.{old}{rest[len(new) :]}"] = value
    return {prefix + k: v for k, v in out.items()}


def controlnet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    rules = _encoder_blocks(config, with_up=False)
    hint = len(config["conditioning_embedding_out_channels"]) - 1
    rules.append(("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))
    for b in range(2 * hint):
        rules.append((f"controlnet_cond_embedding.blocks.{b}.", f"input_hint_block.{2 * (b + 1)}."))
    rules.append(("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (2 * hint + 1)}."))
    n_zero = 1 + len(config["block_out_channels"]) * (config["layers_per_block"] + 1) - 1
    for i in range(n_zero):
        rules.append((f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0."))
    rules.append(("controlnet_mid_block.", "middle_block_out.0."))
    return {"control_model." + _rename(k, rules, {"resnets": RESNET_UNET}): v for k, v in state.items()}
