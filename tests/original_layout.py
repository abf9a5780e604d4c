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


def _shift_scale(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) modulation halves in the originals' order (shift, scale)."""
    scale, shift = weight.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def _fused(state: dict[str, torch.Tensor], names: list[str], part: str) -> torch.Tensor:
    return torch.cat([state.pop(f"{n}.{part}") for n in names])


def sd3_transformer_to_original(state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model."):
    """An SD3Transformer2DModel in MMDiT's names (Stability AI's single files): q, k, v fused, the
    context stream's last modulation and the output modulation as (shift, scale)."""
    state = dict(state)
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    renames = [
        ("pos_embed.proj.", "x_embedder.proj."),
        ("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
        ("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
        ("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
        ("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
        ("context_embedder.", "context_embedder."),
        ("proj_out.", "final_layer.linear."),
    ]
    layers = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    for i in range(layers):
        new, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        for part in ("weight", "bias"):
            out[f"{x}attn.qkv.{part}"] = _fused(state, [f"{new}attn.to_{p}" for p in "qkv"], part)
            out[f"{c}attn.qkv.{part}"] = _fused(state, [f"{new}attn.add_{p}_proj" for p in "qkv"], part)
            if f"{new}attn2.to_q.{part}" in state:
                out[f"{x}attn2.qkv.{part}"] = _fused(state, [f"{new}attn2.to_{p}" for p in "qkv"], part)
            if i == layers - 1:  # the context stream's last block only modulates
                out[f"{c}adaLN_modulation.1.{part}"] = _shift_scale(state.pop(f"{new}norm1_context.linear.{part}"))
        renames += [
            (f"{new}attn.norm_q.", f"{x}attn.ln_q."),
            (f"{new}attn.norm_k.", f"{x}attn.ln_k."),
            (f"{new}attn.norm_added_q.", f"{c}attn.ln_q."),
            (f"{new}attn.norm_added_k.", f"{c}attn.ln_k."),
            (f"{new}attn2.norm_q.", f"{x}attn2.ln_q."),
            (f"{new}attn2.norm_k.", f"{x}attn2.ln_k."),
            (f"{new}attn.to_out.0.", f"{x}attn.proj."),
            (f"{new}attn.to_add_out.", f"{c}attn.proj."),
            (f"{new}attn2.to_out.0.", f"{x}attn2.proj."),
            (f"{new}norm1.linear.", f"{x}adaLN_modulation.1."),
            (f"{new}norm1_context.linear.", f"{c}adaLN_modulation.1."),
            (f"{new}ff.net.0.proj.", f"{x}mlp.fc1."),
            (f"{new}ff.net.2.", f"{x}mlp.fc2."),
            (f"{new}ff_context.net.0.proj.", f"{c}mlp.fc1."),
            (f"{new}ff_context.net.2.", f"{c}mlp.fc2."),
        ]
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = _shift_scale(state.pop(f"norm_out.linear.{part}"))
    for key, value in state.items():
        new, old = next((n, o) for n, o in renames if key.startswith(n))
        out[old + key[len(new) :]] = value
    return {prefix + k: v for k, v in out.items()}


def flux_transformer_to_original(state: dict[str, torch.Tensor], prefix: str = ""):
    """A FluxTransformer2DModel in Black Forest Labs' names: double blocks with q, k, v fused, single
    blocks with q, k, v and the MLP's input fused in linear1, the output modulation as (shift, scale)."""
    state = dict(state)
    out = {}
    renames = [
        ("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer."),
        ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer."),
        ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer."),
        ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer."),
        ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer."),
        ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer."),
        ("context_embedder.", "txt_in."),
        ("x_embedder.", "img_in."),
        ("proj_out.", "final_layer.linear."),
    ]
    doubles = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    singles = len({k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")})
    for i in range(doubles):
        new, old = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{old}img_attn.qkv.{part}"] = _fused(state, [f"{new}attn.to_{p}" for p in "qkv"], part)
            out[f"{old}txt_attn.qkv.{part}"] = _fused(state, [f"{new}attn.add_{p}_proj" for p in "qkv"], part)
        renames += [
            (f"{new}norm1.linear.", f"{old}img_mod.lin."),
            (f"{new}norm1_context.linear.", f"{old}txt_mod.lin."),
            (f"{new}attn.norm_q.weight", f"{old}img_attn.norm.query_norm.scale"),
            (f"{new}attn.norm_k.weight", f"{old}img_attn.norm.key_norm.scale"),
            (f"{new}attn.norm_added_q.weight", f"{old}txt_attn.norm.query_norm.scale"),
            (f"{new}attn.norm_added_k.weight", f"{old}txt_attn.norm.key_norm.scale"),
            (f"{new}ff.net.0.proj.", f"{old}img_mlp.0."),
            (f"{new}ff.net.2.", f"{old}img_mlp.2."),
            (f"{new}ff_context.net.0.proj.", f"{old}txt_mlp.0."),
            (f"{new}ff_context.net.2.", f"{old}txt_mlp.2."),
            (f"{new}attn.to_out.0.", f"{old}img_attn.proj."),
            (f"{new}attn.to_add_out.", f"{old}txt_attn.proj."),
        ]
    for i in range(singles):
        new, old = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for part in ("weight", "bias"):
            names = [f"{new}attn.to_{p}" for p in "qkv"] + [f"{new}proj_mlp"]
            out[f"{old}linear1.{part}"] = _fused(state, names, part)
        renames += [
            (f"{new}norm.linear.", f"{old}modulation.lin."),
            (f"{new}attn.norm_q.weight", f"{old}norm.query_norm.scale"),
            (f"{new}attn.norm_k.weight", f"{old}norm.key_norm.scale"),
            (f"{new}proj_out.", f"{old}linear2."),
        ]
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = _shift_scale(state.pop(f"norm_out.linear.{part}"))
    for key, value in state.items():
        new, old = next((n, o) for n, o in sorted(renames, key=lambda r: -len(r[0])) if key.startswith(n))
        out[old + key[len(new) :]] = value
    return {prefix + k: v for k, v in out.items()}
