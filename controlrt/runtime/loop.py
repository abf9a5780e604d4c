"""The backend-agnostic denoise loop: ControlNets, residual sums, CFG and the scheduler.

Tensors live on the UNet session's device; every graph runs through the Session interface.
The loop follows diffusers' StableDiffusionControlNetPipeline step by step (CFG batch order
[uncond, cond]), so the torch backend reproduces it and other backends can be compared to it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from controlrt.control import Branches, control_active
from controlrt.progress import progress_bar
from controlrt.runtime.schedulers import init_noise_sigma
from controlrt.session import Session
from controlrt.specs import GraphKind

if TYPE_CHECKING:
    from controlrt.runtime.img2img import Start


@dataclass(frozen=True)
class ControlPlan:
    """One ControlNet's control as the loop uses it.

    Attributes:
        session: The ControlNet graph.
        image: Control image [batch, C, H, W] in [0, 1] (a union ControlNet's: [batch, N, C, H, W],
            one per condition), already at the ControlNets' batch size.
        weights: Per-residual weight times the control's scale, float32 [num_residuals] (a union
            ControlNet's with two or more images: without the scales, which it applies inside).
        start, end: Window as fractions of the schedule (diffusers' control_guidance_start/end).
        union: A union ControlNet's other inputs.
        extra: Other inputs of this control's own, constant over the steps (a Flux ControlNet-Union's
            control_mode: one plan per image, each with its type).
    """

    session: Session
    image: torch.Tensor
    weights: torch.Tensor
    start: float
    end: float
    union: UnionInputs | None = None
    extra: dict[str, torch.Tensor] | None = None

    def feeds(self, step: int, num_steps: int) -> dict[str, torch.Tensor] | None:
        """This control's own inputs at ``step``, or None when it does not run then.

        A union ControlNet with two or more images always runs, as in diffusers: an image outside
        its window gets scale 0 inside the model, which does not switch the model off.
        """
        union = self.union
        if union is None or len(union.scales) == 1:
            if not control_active(step, num_steps, self.start, self.end):
                return None
            if union is None:
                return {"controlnet_cond": self.image, **(self.extra or {})}
            scales = union.ones
        else:
            keeps = [control_active(step, num_steps, a, b) for a, b in union.windows]
            scales = torch.tensor([s if keep else 0.0 for s, keep in zip(union.scales, keeps, strict=True)])
        return {
            "controlnet_cond": self.image,
            "control_type": union.control_type,
            "control_type_idx": union.type_idx,
            "conditioning_scale": scales.to(self.image.device),
        }


@dataclass(frozen=True)
class UnionInputs:
    """A union ControlNet's inputs besides its images.

    Attributes:
        control_type: The multi-hot vector of the types given [batch, types], as diffusers builds it.
        type_idx: Each image's type, int64 [N].
        scales: Each image's scale (applied inside the model when N >= 2).
        windows: Each image's (start, end).
    """

    control_type: torch.Tensor
    type_idx: torch.Tensor
    scales: tuple[float, ...]
    windows: tuple[tuple[float, float], ...]

    @property
    def ones(self) -> torch.Tensor:
        return torch.ones(len(self.scales))


def step_kwargs(scheduler, generator: torch.Generator, eta: float = 0.0) -> dict:
    """The optional arguments diffusers passes to scheduler.step (eta, generator)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _summed_residuals(
    controls: Sequence[ControlPlan],
    step: int,
    num_steps: int,
    feeds: dict[str, torch.Tensor],
    names: Sequence[str],
) -> dict[str, torch.Tensor] | None:
    """Σ_k w_i * scale_k * residual_{k,i} over the controls active at ``step``; None if none is."""
    total: dict[str, torch.Tensor] | None = None
    for control in controls:
        own = control.feeds(step, num_steps)
        if own is None:
            continue
        spec = control.session.spec  # a ControlNet takes the added conditions its config asks for
        out = control.session.infer({n: v for n, v in {**feeds, **own}.items() if n in spec.input_names})
        weighted = {name: out[name] * control.weights[i] for i, name in enumerate(names)}
        total = weighted if total is None else {n: total[n] + weighted[n] for n in names}
    return total


def denoise(
    unet: Session,
    controls: Sequence[ControlPlan],
    scheduler,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    branches: Branches,
    generator: torch.Generator,
    progress: bool = False,
    added: dict[str, torch.Tensor] | None = None,
    unet_only: dict[str, torch.Tensor] | None = None,
    start: Start | None = None,
) -> torch.Tensor:
    """Run the schedule and return the final latents.

    Args:
        unet: The UNet graph (residual inputs after sample, timestep, encoder_hidden_states).
        controls: The controls in ControlNet order (inactive ones are skipped, not run).
        scheduler: A fresh diffusers scheduler.
        prompt_embeds: [2B, S, D] as [uncond, cond] when guidance > 1, else [B, S, D].
        noise: Initial standard-normal latents [B, C, h, w]; scaled here by the scheduler's
            init_noise_sigma, which depends on the timesteps just set (as in diffusers).
        steps: Number of inference steps.
        guidance: Classifier-free guidance scale (Flux's true_cfg_scale: Family.cfg_scale).
        branches: Which CFG branches run (Branches.of(guidance, mode)): with ``conditional_only``
            the unconditional half gets zero residuals and the ControlNets run on the other; with
            ``shared_control`` both halves get the residuals of the ControlNets' one run.
        generator: The generator the latents were drawn from (stochastic schedulers continue it).
        progress: Show a progress bar on stderr.
        added: SDXL's added conditions (text_embeds, time_ids) in prompt_embeds' batch order; the
            UNet gets them whole, the ControlNets the branches they run on.
        unet_only: Inputs of the UNet alone, constant over the steps (an LCM-distilled UNet's
            guidance embedding, timestep_cond), at the UNet's batch.
        start: Where to start instead (controlrt.runtime.img2img.start: the timesteps strength keeps,
            the init image's noised latents, an inpainting blend or UNet inputs); ``noise`` and
            ``steps`` are then unused, and control windows run over the kept timesteps.
    """
    device = unet.device
    cfg = branches.cfg
    if start is None:
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        latents = noise.to(device) * init_noise_sigma(scheduler)
    else:
        timesteps, latents = start.timesteps, start.latents.to(device)
        unet_only = {**(unet_only or {}), **start.unet_inputs}
    half = latents.shape[0]
    batch = half * branches.per_image(GraphKind.UNET)
    cond_slice = slice(batch - half * branches.per_image(GraphKind.CONTROLNET), batch)
    names = [t.name for t in unet.spec.residual_inputs]
    zero_residuals = _zero_residuals(unet, batch, latents.shape[2:], device)
    # Conditional-only control: the uncond half of this buffer stays zero, the cond half is
    # overwritten each step (allocated once, not per step); shared control overwrites both halves.
    padded = _zero_residuals(unet, batch, latents.shape[2:], device) if cond_slice.start else {}
    filled = (slice(0, cond_slice.start), cond_slice) if branches.shared_control else (cond_slice,)
    extra = step_kwargs(scheduler, generator)
    scale_input = getattr(scheduler, "scale_model_input", None)  # flow-matching schedulers have none
    cn_embeds = prompt_embeds[cond_slice]
    added = {name: value.to(device) for name, value in (added or {}).items()}
    cn_added = {name: value[cond_slice] for name, value in added.items()}
    unet_only = {name: value.to(device) for name, value in (unet_only or {}).items()}
    # timesteps as the graphs take them, made on the device once (no host sync per step)
    t_inputs = timesteps.to(device=device, dtype=torch.float32)
    for i, t in enumerate(progress_bar(timesteps, progress, "denoise", "step")):
        model_input = torch.cat([latents] * 2) if cfg else latents
        if scale_input is not None:
            model_input = scale_input(model_input, t)
        cn_input = model_input[cond_slice]
        cn_feeds = {
            "sample": cn_input,
            "timestep": t_inputs[i].repeat(cn_input.shape[0]),
            "encoder_hidden_states": cn_embeds,
            **cn_added,
        }
        summed = _summed_residuals(controls, i, len(timesteps), cn_feeds, names)
        if summed is None:
            residuals = zero_residuals
        elif cond_slice.start:
            for n, r in summed.items():
                for part in filled:
                    padded[n][part].copy_(r)
            residuals = padded
        else:
            residuals = summed
        noise = unet.infer(
            {
                "sample": model_input,
                "timestep": t_inputs[i].repeat(batch),
                "encoder_hidden_states": prompt_embeds,
                **added,
                **unet_only,
                **residuals,
            }
        )["noise_pred"].to(device)
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        if start is not None and start.blend is not None:
            latents = start.blend.apply(scheduler, latents, timesteps, i)
    return latents


def _zero_residuals(unet: Session, batch: int, latent_hw: Sequence[int], device) -> dict[str, torch.Tensor]:
    """Zero residual inputs ("no control") for a batch at a latent size."""
    spec = unet.spec
    sample = spec.tensor("sample").shape  # (batch, channels, height/f, width/f)
    sizes = {
        "batch": batch,
        "height": latent_hw[0] * sample[2].divisor,
        "width": latent_hw[1] * sample[3].divisor,
    }
    return {t.name: torch.zeros(t.concrete_shape(sizes), device=device) for t in spec.residual_inputs}
