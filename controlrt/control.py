"""Control modes: per-residual weights, which CFG branch gets control, and step windows.

For residual i of N (down-block residuals in UNet order, the mid-block residual last):

==================  ==============================  =========================================
mode                branches given control          weight w_i
==================  ==============================  =========================================
uniform             both (diffusers' default)       1
guess               conditional only                torch.logspace(-1, 0, N)[i] (diffusers'
                                                    guess_mode; the mid block gets 1.0)
cfg-rw              conditional only                h_max / h_i, the paper's 64 / h_i at
                                                    512 px: 1 at full latent size, 2, 4, 8 deeper
cfg-rw-normalized   conditional only                (h_max / h_i) / max_j (h_max / h_j)
==================  ==============================  =========================================

lllyasviel/ControlNet's soft injection, ``0.825 ** (12 - i)``, is the guess curve
(0.825 ≈ 10 ** (-1 / 12)). In the conditional-only modes the unconditional half of the CFG batch
gets zero residuals, so the ControlNets run on the conditional half only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch

from controlrt.errors import InputError
from controlrt.specs import Axis, GraphKind, GraphSpec


class ControlMode(StrEnum):
    UNIFORM = "uniform"
    GUESS = "guess"
    CFG_RW = "cfg-rw"
    CFG_RW_NORMALIZED = "cfg-rw-normalized"

    @classmethod
    def parse(cls, value: str | ControlMode) -> ControlMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise InputError(f"unknown control mode {value!r}; choose one of {choices}") from None

    @property
    def conditional_only(self) -> bool:
        """Whether only the conditional branch of classifier-free guidance gets control."""
        return self is not ControlMode.UNIFORM


@dataclass(frozen=True)
class Branches:
    """Which classifier-free-guidance branches each graph runs: the one place this is decided.

    With CFG (guidance above 1) the text encoder and the UNet run both halves of the batch,
    [uncond, cond]; the ControlNets run both in uniform mode and only the conditional half in the
    conditional-only modes (the unconditional half then gets no control); the VAE decodes each image
    once. With ``shared_control`` (Flux's true CFG, as diffusers' Flux pipelines run it) the ControlNets
    run once, on the conditional half, and both halves get their residuals.
    """

    cfg: bool
    conditional_only: bool = False
    shared_control: bool = False

    @classmethod
    def of(cls, guidance: float, mode: ControlMode | str = ControlMode.UNIFORM, cfg_batch: bool = True) -> Branches:
        """``cfg_batch`` False: the model takes guidance otherwise than as a CFG batch (its family
        says how, see Family.branches), so there is none whatever the scale, as in diffusers."""
        cfg = guidance > 1.0 and cfg_batch
        return cls(cfg, cfg and ControlMode.parse(mode).conditional_only)

    def per_image(self, kind: GraphKind) -> int:
        """The graph's batch for one image."""
        if kind in (GraphKind.VAE_DECODER, GraphKind.VAE_ENCODER) or not self.cfg:
            return 1
        return 1 if kind is GraphKind.CONTROLNET and (self.conditional_only or self.shared_control) else 2

    @staticmethod
    def possible(kind: GraphKind) -> tuple[int, ...]:
        """Every per-image batch the graph may run with, over all guidance settings and modes."""
        plans = (Branches(False), Branches(True), Branches(True, True))
        return tuple(sorted({b.per_image(kind) for b in plans}))


def guidance_embedding(guidance: float, dim: int, batch: int = 1) -> torch.Tensor:
    """An LCM-distilled UNet's timestep_cond [batch, dim]: sin/cos of (guidance - 1) * 1000 at
    log-spaced frequencies, as diffusers' get_guidance_scale_embedding computes it."""
    w = torch.full((batch,), float(guidance) - 1.0) * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(embedding, (0, 1)) if dim % 2 else embedding


def residual_divisors(unet: GraphSpec) -> list[int]:
    """Each residual input's spatial divisor (image size / residual size), in UNet order."""
    divisors = []
    for t in unet.residual_inputs:
        axis = t.shape[2]
        if not isinstance(axis, Axis):
            raise ValueError(f"{unet.name}: residual {t.name} has no symbolic height")
        divisors.append(axis.divisor)
    return divisors


def block_weights(mode: ControlMode, divisors: Sequence[int]) -> torch.Tensor:
    """Per-residual weights w_i (float32, one per residual) for ``mode``.

    ``divisors`` are the residuals' spatial divisors, so h_max / h_i = divisor_i / min(divisor).
    """
    n = len(divisors)
    if mode is ControlMode.UNIFORM:
        return torch.ones(n)
    if mode is ControlMode.GUESS:
        return torch.logspace(-1, 0, n)
    weights = torch.tensor([d / min(divisors) for d in divisors], dtype=torch.float32)
    if mode is ControlMode.CFG_RW_NORMALIZED:
        weights = weights / weights.max()
    return weights


def control_active(step: int, num_steps: int, start: float, end: float) -> bool:
    """Whether a control with window [start, end] runs at ``step`` of ``num_steps``.

    As diffusers defines control_guidance_start/end: off if step/T < start or (step+1)/T > end.
    """
    return not (step / num_steps < start or (step + 1) / num_steps > end)
