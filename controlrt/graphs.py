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
    added_condition_names,
    controlnet_spec,
    text_encoder_specs,
    unet_spec,
    vae_decoder_spec,
)


class TextEncoderGraph(nn.Module):
    """A text encoder as diffusers' encode_prompt uses it.

    SD 1.x/2.x (``layer="last"``): input_ids [B, S] int64 (and, where the config asks for it,
    attention_mask [B, S] int64) -> last_hidden_state [B, S, D]. SDXL (``layer="penultimate"``):
    input_ids -> the penultimate layer's hidden states [B, S, D] and, with ``pooled``, the
    projection's text_embeds [B, P] (CLIPTextModelWithProjection).
    """

    def __init__(self, text_encoder: nn.Module, layer: str = "last", pooled: bool = False) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.layer = layer
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if self.layer == "last":
            return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[0]
        out = self.text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


def _added(names: tuple[str, ...], values) -> dict[str, torch.Tensor] | None:
    return dict(zip(names, values, strict=True)) if names else None


class ControlNetGraph(nn.Module):
    """One ControlNet with unit conditioning scale: returns its residuals unscaled.

    Inputs: sample, timestep, encoder_hidden_states, the added conditions ``added`` names (SDXL:
    text_embeds, time_ids), controlnet_cond.
    """

    def __init__(self, controlnet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added = tuple(added)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        *conditions, controlnet_cond = rest
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs=_added(self.added, conditions),
            return_dict=False,
        )
        return (*down, mid)


class UNetGraph(nn.Module):
    """The UNet with every control residual as an explicit input (zeros mean no control).

    Inputs: sample, timestep, encoder_hidden_states, the added conditions ``added`` names (SDXL:
    text_embeds, time_ids), then the residuals.
    """

    def __init__(self, unet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.unet = unet
        self.added = tuple(added)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        conditions, residuals = rest[: len(self.added)], rest[len(self.added) :]
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            added_cond_kwargs=_added(self.added, conditions),
            return_dict=False,
        )[0]


class VaeDecoderGraph(nn.Module):
    """Denoised latents (still scaled) -> image in [-1, 1].

    Unscaled as diffusers does: by the scaling factor, or, for VAEs whose config has
    latents_mean and latents_std, ``latent * std / scaling_factor + mean``.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        config = getattr(vae, "config", None)
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        self.latents_mean = None if mean is None else torch.tensor(mean).view(1, -1, 1, 1)
        self.latents_std = None if std is None else torch.tensor(std).view(1, -1, 1, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None and self.latents_std is not None:
            mean, std = self.latents_mean.to(latent), self.latents_std.to(latent)
            return self.vae.decode(latent * std / self.scaling_factor + mean, return_dict=False)[0]
        return self.vae.decode(latent / self.scaling_factor, return_dict=False)[0]


def graph_specs(info: ModelInfo, controlnets: list[ControlNetModelFolder]) -> list[GraphSpec]:
    """Every graph of a build, in export order: text encoder(s), ControlNets, UNet, VAE decoder."""
    return [
        *text_encoder_specs(info),
        *(controlnet_spec(info, k, cn.name, cn.conditioning_channels) for k, cn in enumerate(controlnets)),
        unet_spec(info),
        vae_decoder_spec(info),
    ]


def load_graph_module(spec: GraphSpec, base: BaseModel, controlnets: list[ControlNetModelFolder]) -> nn.Module:
    """The PyTorch module that computes ``spec``, loaded from the source folders."""
    kind = spec.kind
    added = tuple(added_condition_names(spec))
    if kind is GraphKind.TEXT_ENCODER:
        component = base.text_encoder_names[int(spec.attributes.get("text_encoder_index", 0))]
        layer = str(spec.attributes.get("layer", "last"))
        pooled = "text_embeds" in spec.output_names
        module: nn.Module = TextEncoderGraph(base.load_text_encoder(component), layer, pooled)
    elif kind is GraphKind.UNET:
        module = UNetGraph(base.load_unet(), added)
    elif kind is GraphKind.VAE_DECODER:
        module = VaeDecoderGraph(base.load_vae(), base.info().scaling_factor)
    else:
        module = ControlNetGraph(controlnets[int(spec.attributes["controlnet_index"])].load(), added)
    return module.eval()
