"""A generation request and its validation, shared by the API, the CLI and the demo."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from controlrt.errors import InputError
from controlrt.runtime.control import ControlMode
from controlrt.runtime.images import ControlImage

FloatOrList = float | Sequence[float]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Defaults follow diffusers' StableDiffusionControlNetPipeline.

    The k-th control image, scale, start and end go to the build's k-th ControlNet; a single
    scale, start or end applies to every control. ``height``/``width`` default to the model's
    native size.
    """

    prompt: str
    controls: Sequence[ControlImage] = ()
    scales: FloatOrList = 1.0
    start: FloatOrList = 0.0
    end: FloatOrList = 1.0
    negative_prompt: str | None = None
    control_mode: ControlMode | str = ControlMode.UNIFORM
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None

    def settings(self) -> dict[str, Any]:
        """The request as plain JSON-able values (for reports and image metadata)."""
        out = {k: v for k, v in self.__dict__.items() if k != "controls"}
        out["control_mode"] = ControlMode.parse(self.control_mode).value
        for key in ("scales", "start", "end"):
            out[key] = list(out[key]) if isinstance(out[key], Sequence) else out[key]
        return out


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with one scale/start/end per control and a concrete size."""

    request: GenerationRequest
    mode: ControlMode
    scales: list[float]
    starts: list[float]
    ends: list[float]
    height: int
    width: int
    controls: list[ControlImage] = field(default_factory=list)


def _per_control(value: FloatOrList, count: int, label: str) -> list[float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if len(values) == 1:
        values = values * count
    elif len(values) != count:
        raise InputError(f"{len(values)} {label} values given for {count} control(s); give one or one per control")
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{label} {v!r} is not a number") from None
        if not math.isfinite(v):
            raise InputError(f"{label} {v} is not finite")
        out.append(v)
    return out


def resolve(
    request: GenerationRequest, num_controlnets: int, size_multiple: int, default_size: tuple[int, int]
) -> ResolvedRequest:
    """Check a request against a build; InputError names the first problem."""
    if not isinstance(request.prompt, str):
        raise InputError("prompt must be a string")
    controls = list(request.controls)
    if len(controls) > num_controlnets:
        raise InputError(f"{len(controls)} control images given but the build has {num_controlnets} ControlNet(s)")
    mode = ControlMode.parse(request.control_mode)
    scales = _per_control(request.scales, len(controls), "scale")
    starts = _per_control(request.start, len(controls), "start")
    ends = _per_control(request.end, len(controls), "end")
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if not 0.0 <= s < e <= 1.0:
            raise InputError(f"control {k}: start {s} and end {e} must satisfy 0 <= start < end <= 1")
    if isinstance(request.steps, bool) or not isinstance(request.steps, int) or request.steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, got {request.steps!r}")
    if not math.isfinite(float(request.guidance)) or request.guidance < 0:
        raise InputError(f"guidance {request.guidance} must be finite and non-negative")
    if not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
        raise InputError(f"seed must be a whole number in [0, 2**63), got {request.seed!r}")
    height = default_size[0] if request.height is None else request.height
    width = default_size[1] if request.width is None else request.width
    for label, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % size_multiple:
            raise InputError(
                f"{label} {value} must be a positive multiple of {size_multiple} for this model "
                "(the VAE factor times the UNet's downsampling)"
            )
    return ResolvedRequest(request, mode, scales, starts, ends, height, width, controls)
