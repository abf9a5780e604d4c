"""What the toolchain knows about a base model, read from its configs (see controlrt.models).

A :class:`ModelInfo` is plain facts (widths, counts, sizes, flags from the configs); which family
the model is of, and what that means for its graphs and requests, is the family's to say
(:func:`controlrt.families.family_of`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Residual:
    """One control residual: its channel count and how many downsamplers lie above it."""

    channels: int
    level: int


@dataclass(frozen=True)
class ModelInfo:
    """What the toolchain needs to know about a base model, all read from its configs."""

    vae_scale_factor: int
    latent_channels: int
    unet_out_channels: int
    cross_attention_dim: int
    sequence_length: int
    vocab_size: int
    sample_size: tuple[int, int]
    scaling_factor: float
    image_channels: int
    num_train_timesteps: int
    residuals: tuple[Residual, ...]
    text_attention_mask: bool = False  # the text encoder config's use_attention_mask (diffusers passes the mask)
    # SDXL ("text_time" added conditions): each text encoder's width (their penultimate hidden states,
    # concatenated, are the prompt embedding), the pooled projection's width (the second encoder's
    # text_embeds) and the number of time ids (original size, crop offsets, target size).
    text_hidden_sizes: tuple[int, ...] = ()
    pooled_dim: int = 0
    time_ids: int = 0
    force_zeros_for_empty_prompt: bool = False
    vae_force_upcast: bool = False  # SDXL pipelines decode such VAEs in fp32 whatever the rest runs in
    # LCM-distilled UNets (time_cond_proj_dim): the width of the guidance embedding they take as
    # timestep_cond; guidance is then this embedding, not a classifier-free-guidance batch.
    guidance_embedding_dim: int = 0
    # An inpainting UNet (in_channels = 2 x latent + 1) takes the mask and the masked image's latents
    # beside the latents, as diffusers concatenates them.
    inpainting_unet: bool = False
    vae_class: str = "AutoencoderKL"
    # VAEs whose config sets them (SDXL-style): latents are (z - mean) * scaling_factor / std
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    # The VAE config's sample_size: diffusers' tile size in pixels for a tiled encode and decode
    vae_tile_size: int = 0
    # SDXL img2img and inpainting: the time ids end with an aesthetic score instead of the target size
    # (model_index.json's requires_aesthetics_score, as diffusers' SDXL img2img pipelines read it)
    requires_aesthetics_score: bool = False
    # A transformer denoiser (SD3): its patch size (latent pixels per token side), width and block
    # count; residuals is then empty (a ControlNet's block count sets the residuals a build takes).
    patch_size: int = 0
    transformer_width: int = 0
    transformer_layers: int = 0
    # SD3's VAE: latents are (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    # SD3's T5 text encoder: its token count (the pipelines' max_sequence_length) and width
    t5_sequence_length: int = 0
    t5_width: int = 0
    # SD3's CLIP encoders: each one's pooled projection width (pooled_dim is their sum)
    text_projection_dims: tuple[int, ...] = ()
    # The denoiser's class where it is not a UNet (SD3Transformer2DModel, FluxTransformer2DModel)
    denoiser_class: str = ""
    # Flux's transformer: its single-stream block count, and whether it takes the guidance scale as
    # an input (guidance_embeds: FLUX.1-dev's distilled guidance, no classifier-free batch)
    transformer_single_layers: int = 0
    guidance_input: bool = False

    @property
    def vae_samples(self) -> bool:
        """Whether the VAE encodes to a distribution that is sampled (AutoencoderKL), rather than to
        latents directly (AutoencoderTiny)."""
        return self.vae_class == "AutoencoderKL"

    @property
    def mask_channels(self) -> int:
        """The mask channels an inpainting UNet takes (0 for other UNets)."""
        return 1 if self.inpainting_unet else 0

    @property
    def text_encoders(self) -> int:
        return max(1, len(self.text_hidden_sizes)) + (1 if self.t5_width else 0)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE factor times the UNet downsampling (a
        transformer's: times its patch size)."""
        if self.patch_size:
            return self.vae_scale_factor * self.patch_size
        return self.vae_scale_factor * 2 ** max(r.level for r in self.residuals)

    @property
    def default_size(self) -> tuple[int, int]:
        """The native image size (height, width) in pixels."""
        return (
            self.sample_size[0] * self.vae_scale_factor,
            self.sample_size[1] * self.vae_scale_factor,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        data = dict(data)
        data["sample_size"] = tuple(data["sample_size"])
        data["residuals"] = tuple(Residual(**r) for r in data["residuals"])
        for key in ("text_hidden_sizes", "latents_mean", "latents_std", "text_projection_dims"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)
