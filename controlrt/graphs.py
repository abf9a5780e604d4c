"""The PyTorch modules behind each graph, with the graph spec's inputs and outputs.

Each wrapper takes its inputs positionally in spec order and returns its outputs in spec order.
Export traces exactly these modules, and the torch backend runs them, so the reference and the
exported graph compute the same thing by construction.
"""

from __future__ import annotations

import torch
from torch import nn

from controlrt.models import BaseModel, ControlNetModelFolder, ModelInfo
from controlrt.specs import (
    GraphKind,
    GraphSpec,
    controlnet_spec,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
)


class TextEncoderGraph(nn.Module):
    """input_ids [B, S] int64 (and, where the config asks for it, attention_mask [B, S] int64) ->
    last_hidden_state [B, S, D], as diffusers' encode_prompt uses it."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[0]


class ControlNetGraph(nn.Module):
    """One ControlNet with unit conditioning scale: returns its residuals unscaled."""

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            guess_mode=False,
            return_dict=False,
        )
        return (*down, mid)


class UNetGraph(nn.Module):
    """The UNet with every control residual as an explicit input (zeros mean no control)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class VaeDecoderGraph(nn.Module):
    """Denoised latents (still multiplied by the VAE scaling factor) -> image in [-1, 1]."""

    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


def graph_specs(info: ModelInfo, controlnets: list[ControlNetModelFolder]) -> list[GraphSpec]:
    """Every graph of a build, in export order: text encoder, ControlNets, UNet, VAE decoder."""
    return [
        text_encoder_spec(info),
        *(controlnet_spec(info, k, cn.name, cn.conditioning_channels) for k, cn in enumerate(controlnets)),
        unet_spec(info),
        vae_decoder_spec(info),
    ]


def load_graph_module(spec: GraphSpec, base: BaseModel, controlnets: list[ControlNetModelFolder]) -> nn.Module:
    """The PyTorch module that computes ``spec``, loaded from the source folders."""
    kind = spec.kind
    if kind is GraphKind.TEXT_ENCODER:
        module: nn.Module = TextEncoderGraph(base.load_text_encoder())
    elif kind is GraphKind.UNET:
        module = UNetGraph(base.load_unet())
    elif kind is GraphKind.VAE_DECODER:
        module = VaeDecoderGraph(base.load_vae(), base.info().scaling_factor)
    else:
        module = ControlNetGraph(controlnets[int(spec.attributes["controlnet_index"])].load())
    return module.eval()
