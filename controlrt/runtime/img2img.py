"""Image-conditioned generation as diffusers' ControlNet img2img and inpainting pipelines do it.

- **Init image**: resized (Lanczos) to the output size and normalised to [-1, 1]
  (``VaeImageProcessor`` defaults); encoded by the VAE encoder graph, sampled with the request's
  generator before the noise is drawn (``retrieve_latents(vae.encode(image), generator)``), and
  scaled (``scaling_factor``, or ``(z - mean) * scaling_factor / std`` where the VAE config has
  latents_mean/std, in img2img only, as diffusers does).
- **Strength**: the scheduler is set for all N steps, then ``init = min(int(N * strength), N)``
  steps are kept from ``t_start = N - init`` on (``set_begin_index``); control windows run over the
  kept steps.
- **Mask** (white = repaint): greyscale, resized to the output size, binarised at 0.5; the masked
  image is ``init * (mask < 0.5)``; its latent-size copy comes from nearest interpolation. A
  4-channel UNet blends ``(1 - m) * add_noise(x0, noise, t_next) + m * latents`` after every step; an
  inpainting UNet takes the mask and the masked image's latents as inputs.
- **Generator order**: img2img draws the init image's sample, then the noise. Inpainting draws
  the init image's sample (4-channel UNets always; inpainting UNets below strength 1), the noise,
  then the masked image's sample. A 4-channel UNet never reads the masked image's latents, so for it
  only that sample's noise is drawn (the generator moves on as diffusers'), and the masked image is
  not encoded: one VAE encode less per image than diffusers.
- **Mask crop** (``padding_mask_crop``): the images are cropped around the mask (with the padding,
  grown to the output's aspect ratio), generated at the output size and pasted back into the
  original image under the mask.
- **Tiled VAE** (diffusers' ``enable_tiling``): images larger than the VAE's tile (its config's
  sample_size) are encoded and decoded in overlapping tiles, blended as AutoencoderKL blends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from controlrt.errors import InputError
from controlrt.runtime.schedulers import init_noise_sigma
from controlrt.session import Session

TILE_OVERLAP = 0.25  # AutoencoderKL's tile_overlap_factor
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


@dataclass(frozen=True)
class MaskBlend:
    """What a 4-channel UNet's inpainting blends back after every step.

    Attributes:
        mask: The latent-size mask [1, 1, h, w], 1 where the image is repainted.
        image_latents: The init image's latents [1, C, h, w] (scaled).
        noise: The noise the latents started from [1, C, h, w].
    """

    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor

    def apply(self, scheduler, latents: torch.Tensor, timesteps: torch.Tensor, step: int) -> torch.Tensor:
        """The latents after step ``step``: the unmasked region re-noised to the next timestep (or
        clean after the last), the masked region as denoised."""
        proper = self.image_latents
        if step < len(timesteps) - 1:
            proper = noised(scheduler, proper, self.noise, timesteps[step + 1 : step + 2])
        return (1 - self.mask) * proper + self.mask * latents


def kept_timesteps(scheduler, steps: int, strength: float, start: int) -> torch.Tensor:
    """The timesteps an image-to-image run keeps of ``steps`` (the scheduler already set for all of
    them), from step ``start`` on (the family's cut at ``strength``: Family.first_step), with the
    scheduler's begin index set, as diffusers' get_timesteps does."""
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    if len(timesteps) == 0:
        raise keeps_no_step(strength, steps)
    return timesteps


def keeps_no_step(strength: float, steps: int) -> InputError:
    """The error for a strength that keeps none of ``steps`` (raised by the request's checks)."""
    return InputError(
        f"strength {strength} keeps no step of {steps}: raise --strength or --steps (at least "
        f"{steps} x strength must be 1 or more)"
    )


def processor(vae_scale_factor: int, kind: str):
    """diffusers' VaeImageProcessor as the pipelines configure it: "image" (RGB, [-1, 1]), "mask"
    (greyscale, binarised) or "control" (RGB, [0, 1])."""
    from diffusers.image_processor import VaeImageProcessor

    options = {
        "image": {"do_convert_rgb": True},
        "mask": {"do_normalize": False, "do_binarize": True, "do_convert_grayscale": True},
        "control": {"do_convert_rgb": True, "do_normalize": False},
    }[kind]
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor, **options)


def preprocess_image(
    image: Any, height: int, width: int, vae_scale_factor: int, crop: tuple | None = None, what: str = "image"
) -> torch.Tensor:
    """An init image as [1, 3, height, width] float32 in [-1, 1] (or a mask as [1, 1, height,
    width] in {0, 1} with ``what="mask"``), resized as diffusers resizes it."""
    kind = "mask" if what == "mask" else "image"
    mode = "fill" if crop is not None else "default"
    try:
        tensor = processor(vae_scale_factor, kind).preprocess(
            image, height=height, width=width, crops_coords=crop, resize_mode=mode
        )
    except (ValueError, TypeError) as exc:
        raise InputError(f"{what} cannot be used: {exc}") from None
    channels = 1 if kind == "mask" else 3
    if tensor.shape[0] != 1 or tensor.shape[1] != channels:
        raise InputError(f"{what} has shape {tuple(tensor.shape)}, expected one {channels}-channel image")
    return tensor.to(torch.float32)


def mask_crop(mask: Any, height: int, width: int, padding: int) -> tuple[int, int, int, int]:
    """diffusers' padding_mask_crop region (x1, y1, x2, y2) of a PIL mask; InputError if the mask
    marks nothing to repaint."""
    import numpy as np
    from PIL import Image

    if not isinstance(mask, Image.Image):
        raise InputError("--mask-crop needs the mask as an image (a file or a PIL image)")
    if not np.asarray(mask.convert("L")).any():
        raise InputError("the mask marks nothing to repaint (it is black everywhere), so there is no region to crop")
    return processor(1, "mask").get_crop_region(mask, width, height, pad=padding)


def overlay(mask: Any, init_image: Any, image: Any, crop: tuple[int, int, int, int]):
    """The generated crop pasted back into the original image under the mask (diffusers'
    apply_overlay)."""
    return processor(1, "image").apply_overlay(mask, init_image, image, crop)


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """``latents`` noised to ``timestep``: a flow-matching scheduler's scale_noise (SD3, Flux), else
    add_noise, as each diffusers pipeline calls its scheduler."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, timestep, noise)
    return scheduler.add_noise(latents, noise, timestep)


def scale_latents(latents: torch.Tensor, scaling_factor: float, mean=(), std=(), shift: float = 0.0) -> torch.Tensor:
    """Encoder latents as the denoiser takes them: ``(z - shift) * scaling_factor`` (a VAE with a
    shift_factor: SD3's, Flux's), or with the VAE's per-channel latents_mean/std."""
    if shift:
        return (latents - shift) * scaling_factor
    if mean and std:
        view = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(view)
        std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(view)
        return (latents - mean_t) * scaling_factor / std_t
    return latents * scaling_factor


def sample_latents(moments: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """A sample of the encoder's latents, drawn from ``generator`` as DiagonalGaussianDistribution
    draws it; a deterministic encoder's latents (no log-variance) as they are, drawing nothing."""
    mean = moments["latent_mean"]
    if "latent_logvar" not in moments:
        return mean
    std = torch.exp(0.5 * moments["latent_logvar"].clamp(*LOGVAR_RANGE))
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + std * noise


def draw_sample_noise(encoder: Session, image: torch.Tensor, generator: torch.Generator) -> None:
    """Move ``generator`` on as ``sample_latents(encode(encoder, image, …), generator)`` would,
    without running the encoder: the noise of the latents' shape is drawn and dropped (nothing is
    drawn for a deterministic encoder). Tiled or not, the moments have the whole image's shape."""
    spec = encoder.spec
    if "latent_logvar" not in spec.output_names:
        return
    shape = spec.output_shapes(spec.bind({"image": image}))["latent_mean"]
    torch.randn(shape, generator=generator, dtype=torch.float32)


def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def tiled(run, x: torch.Tensor, tile_in: int, tile_out: int) -> torch.Tensor:
    """``run`` over overlapping tiles of ``x``, blended as AutoencoderKL's tiled_encode and
    tiled_decode blend them: tiles of ``tile_in`` input pixels every (1 - overlap) tile, each giving
    ``tile_out`` output pixels, of which the rows and columns past ``tile_out - blend`` are cut."""
    step = int(tile_in * (1 - TILE_OVERLAP))
    blend = int(tile_out * TILE_OVERLAP)
    limit = tile_out - blend
    rows = [
        [run(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, blend)
            out_row.append(tile[:, :, :limit, :limit])
        out_rows.append(torch.cat(out_row, dim=3))
    return torch.cat(out_rows, dim=2)


def encode(
    session: Session, image: torch.Tensor, tile: int, vae_scale_factor: int, tiling: bool
) -> dict[str, torch.Tensor]:
    """The VAE encoder graph's outputs for ``image`` [1, 3, H, W]; with ``tiling`` and an image
    larger than ``tile`` pixels, encoded in tiles whose moments are blended (diffusers'
    _tiled_encode)."""
    if not tiling or not tile or (image.shape[-1] <= tile and image.shape[-2] <= tile):
        return session.infer({"image": image})
    names = session.spec.output_names

    def run(part: torch.Tensor) -> torch.Tensor:
        out = session.infer({"image": part.contiguous()})
        return torch.cat([out[n] for n in names], dim=1)

    moments = tiled(run, image, tile, tile // vae_scale_factor)
    return dict(zip(names, moments.chunk(len(names), dim=1), strict=True))


def decode(session: Session, latents: torch.Tensor, tile: int, vae_scale_factor: int, tiling: bool) -> torch.Tensor:
    """The VAE decoder graph's image for ``latents``; with ``tiling`` and latents larger than the
    tile, decoded in tiles and blended (diffusers' tiled_decode). The graph's own unscaling is
    elementwise, so tiling the scaled latents is tiling diffusers' unscaled ones."""
    tile_latent = tile // vae_scale_factor if tile else 0
    if not tiling or not tile_latent or (latents.shape[-1] <= tile_latent and latents.shape[-2] <= tile_latent):
        return session.infer({"latent": latents})["image"]
    return tiled(lambda part: session.infer({"latent": part.contiguous()})["image"], latents, tile_latent, tile)


@dataclass(frozen=True)
class InitImages:
    """A request's init image and mask, preprocessed.

    Attributes:
        image: [1, 3, H, W] in [-1, 1].
        mask: [1, 1, H, W] in {0, 1} (1: repaint), or None for img2img.
    """

    image: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Start:
    """Where the denoise loop starts.

    Attributes:
        timesteps: The timesteps it runs (all of them, or those strength keeps).
        latents: The initial latents at timesteps[0], on the device.
        blend: A 4-channel UNet's inpainting blend, applied after every step.
        unet_inputs: An inpainting UNet's mask and masked-image latents, at the UNet's batch.
    """

    timesteps: torch.Tensor
    latents: torch.Tensor
    blend: MaskBlend | None = None
    unet_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def start(
    scheduler,
    steps: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    *,
    encoder: Session | None = None,
    info=None,
    init: InitImages | None = None,
    strength: float = 1.0,
    unet_batch: int = 1,
    tiling: bool = False,
    schedule: dict | None = None,
    first_step: int | None = None,
) -> Start:
    """The loop's start for text-to-image (noise x init_noise_sigma), img2img or inpainting, drawing
    from ``generator`` in diffusers' order (see the module's docstring).

    Args:
        shape: The latents' shape [1, C, h, w].
        encoder: The VAE encoder graph (img2img and inpainting).
        info: The build's ModelInfo (scaling, an inpainting UNet, the VAE tile).
        init: The preprocessed init image (and mask).
        strength: How much of the schedule runs (img2img and inpainting).
        unet_batch: The UNet's batch per image (2 with classifier-free guidance).
        tiling: Encode in tiles (diffusers' enable_tiling).
        schedule: set_timesteps' arguments (the family's, Family.schedule; default: ``steps``).
        first_step: The first step that runs at ``strength`` (the family's rule, Family.first_step).
    """
    import torch.nn.functional as F

    scheduler.set_timesteps(**(schedule or {"num_inference_steps": steps}), device=device)
    if init is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return Start(scheduler.timesteps, noise.to(device) * init_noise_sigma(scheduler))
    if encoder is None or info is None or first_step is None:
        raise ValueError("an init image needs the VAE encoder graph, the model's info and the first step")
    timesteps = kept_timesteps(scheduler, steps, strength, first_step)
    first = timesteps[:1]
    tile, f = info.vae_tile_size, info.vae_scale_factor

    def latents_of(image: torch.Tensor, mean_std: bool) -> torch.Tensor:
        sample = sample_latents(encode(encoder, image.to(device), tile, f, tiling), generator)
        if mean_std:
            return scale_latents(sample, info.scaling_factor, info.latents_mean, info.latents_std, info.shift_factor)
        return scale_latents(sample, info.scaling_factor, shift=info.shift_factor)

    if init.mask is None:  # img2img: the init image's sample, then the noise
        image_latents = latents_of(init.image, mean_std=True)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        return Start(timesteps, noised(scheduler, image_latents, noise, first))
    # inpainting (no latents_mean shift, as diffusers' inpainting pipelines encode)
    pure_noise = strength == 1.0
    image_latents = latents_of(init.image, mean_std=False) if not info.inpainting_unet or not pure_noise else None
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    latents = noise * init_noise_sigma(scheduler) if pure_noise else noised(scheduler, image_latents, noise, first)
    mask = F.interpolate(init.mask, size=shape[-2:]).to(device)
    if info.inpainting_unet:
        masked_latents = latents_of(init.image * (init.mask < 0.5), mean_std=False)
        inputs = {"mask": mask, "masked_image_latents": masked_latents}
        return Start(timesteps, latents, unet_inputs={k: torch.cat([v] * unet_batch) for k, v in inputs.items()})
    # diffusers encodes and samples the masked image for every UNet; a 4-channel one never reads it:
    # only the sample's draw is made (the generator moves on as diffusers'), the encoder is not run
    draw_sample_noise(encoder, init.image, generator)
    return Start(timesteps, latents, blend=MaskBlend(mask, image_latents, noise))
