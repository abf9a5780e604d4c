"""A generation request and its validation, shared by the API, the CLI and the demo."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controlrt.control import ControlMode
from controlrt.errors import InputError
from controlrt.families import Family, family_of
from controlrt.families.base import UNION_TYPE_NAMES as UNION_TYPES
from controlrt.runtime.images import ControlImage
from controlrt.runtime.limits import Limits
from controlrt.specs import check_image_size

if TYPE_CHECKING:
    from controlrt.families.info import ModelInfo

logger = logging.getLogger(__name__)

FloatOrList = float | Sequence[float]


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Defaults follow diffusers' StableDiffusionControlNetPipeline.

    The k-th control image, scale, start and end go to the build's k-th ControlNet; a single
    scale, start or end applies to every control. ``height``/``width`` default, as in diffusers,
    to the first control image's size (rounded down to the model's size multiple), else to the
    model's native size.
    """

    prompt: str
    controls: Sequence[ControlImage] = ()
    scales: FloatOrList | None = None  # default as diffusers' pipeline for the task: see Family.default_scale
    start: FloatOrList = 0.0
    end: FloatOrList = 1.0
    negative_prompt: str | None = None
    control_mode: ControlMode | str = ControlMode.UNIFORM
    steps: int = 50
    guidance: float | None = None  # default as diffusers' pipeline for the model: see Family.default_guidance
    # Flux: diffusers' true_cfg_scale, classifier-free guidance with the negative prompt on top of the
    # distilled guidance (above 1: the transformer runs twice per step)
    true_cfg: float = 1.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    # SDXL's micro-conditioning, as diffusers' SDXL pipelines take it: (height, width), (top, left),
    # (height, width); default the image size, (0, 0), the image size
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    # the k-th control's condition type for a union ControlNet (an integer as diffusers takes it, or
    # a name: openpose, depth, hed, canny, normal, segment, tile, repaint); None for a plain one's
    control_types: Sequence[int | str | None] | None = None
    # image-conditioned generation, as diffusers' ControlNet img2img and inpainting pipelines: the
    # init image, the mask (white = repaint), the share of the schedule that runs (default 0.8 for
    # img2img, 1.0 for inpainting, 0.9999 for SDXL inpainting), diffusers' padding_mask_crop, a tiled
    # VAE (enable_tiling), and SDXL's aesthetic scores (models with requires_aesthetics_score)
    image: ControlImage | None = None
    mask: ControlImage | None = None
    strength: float | None = None
    mask_crop: int | None = None
    vae_tiling: bool = False
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def settings(self) -> dict[str, Any]:
        """The request as plain JSON-able values (for reports and image metadata); the images (init
        image, mask, controls) are named by the pipeline that reads them."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("controls", "image", "mask")}
        out["control_mode"] = str(self.control_mode)  # as given: ResolvedRequest.settings has the parsed mode
        for key in ("scales", "start", "end"):
            out[key] = list(out[key]) if isinstance(out[key], Sequence) else out[key]
        if out["scales"] is None:
            out.pop("scales")  # the pipeline records the scales that ran
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
    types: list[int | None] = field(default_factory=list)  # per control: a union condition type, or None
    # per ControlNet of the build, in order: the indices of the controls it takes (plain: at most one)
    assignment: list[list[int]] = field(default_factory=list)
    strength: float | None = None  # image-to-image: the share of the schedule that runs
    guidance: float = 7.5  # the classifier-free guidance scale that runs
    true_cfg: float = 1.0  # Flux's true CFG scale (1: off)

    def settings(self) -> dict[str, Any]:
        """The request's settings with what resolving it decided: the control mode, the size, the
        scales and the guidance that run."""
        return self.request.settings() | {
            "guidance": self.guidance,
            "control_mode": self.mode.value,
            "height": self.height,
            "width": self.width,
            "scales": self.scales,
        }

    @property
    def task(self) -> str:
        """ "txt2img", "img2img" (an init image) or "inpaint" (an init image and a mask)."""
        if self.request.image is None:
            return "txt2img"
        return "img2img" if self.request.mask is None else "inpaint"


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


def image_size(request: GenerationRequest, info: ModelInfo, control_size: tuple[int, int] | None) -> tuple[int, int]:
    """The image size (height, width) a request asks for.

    As diffusers' ControlNet pipelines: a side not given is the first control image's, rounded
    down (diffusers rounds to the VAE factor; the graphs need the model's size multiple, so it is
    rounded to that, and a note is logged when the two differ); with no control image, the
    model's native size.
    """
    height, width = request.height, request.width
    if control_size is None or (height is not None and width is not None):
        return (info.default_size[0] if height is None else height, info.default_size[1] if width is None else width)
    m = info.size_multiple
    rounded = [max(m, side // m * m) for side in control_size]
    diffusers = [side // info.vae_scale_factor * info.vae_scale_factor for side in control_size]
    if rounded != diffusers:
        logger.info(
            "size from the first control image %dx%d: %dx%d, rounded down to a multiple of %d (diffusers would use "
            "%dx%d, which these graphs cannot take); give --height and --width to choose",
            *control_size,
            *rounded,
            m,
            *diffusers,
        )
    return (rounded[0] if height is None else height, rounded[1] if width is None else width)


def control_type(
    value: int | str | None, num_types: int = len(UNION_TYPES), names: dict[str, int] = UNION_TYPES
) -> int | None:
    """A union ControlNet's condition type from an integer or a name (``names``: the family's, by
    default xinsir's ProMax names); None (or "none") for none."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
        return None
    if isinstance(value, str):
        if value.lower() in names:
            return names[value.lower()]
        if not value.isdigit():
            raise InputError(f"unknown control type {value!r}; choose one of {', '.join(names)} or a number")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_types:
        raise InputError(f"control type {value!r} must be a whole number from 0 to {num_types - 1} (or a name)")
    return value


# The condition types a union ControlNet gets in controlrt's own requests (parity, calibration,
# bench): canny and depth, two images, so that its multi-image path runs.
UNION_SAMPLE_TYPES = (UNION_TYPES["canny"], UNION_TYPES["depth"])


def sample_control_types(controlnet_specs: Sequence) -> list[int | None]:
    """The control types of a request giving every ControlNet of a build its controls: None (one
    untyped image) per plain ControlNet, then UNION_SAMPLE_TYPES for a union one."""
    plain: list[int | None] = [None for s in controlnet_specs if not s.union]
    unions = [s for s in controlnet_specs if s.union]
    return plain + (list(UNION_SAMPLE_TYPES) if unions else [])


def assign_controls(types: list[int | None], controlnets: Sequence[int]) -> list[list[int]]:
    """Which controls each ControlNet takes: plain ControlNets take the untyped controls, one each in
    order; the union ControlNet (at most one per build) takes every typed one.

    Args:
        types: Each control's condition type, None for untyped.
        controlnets: Per ControlNet, 0 for a plain one, its number of condition types for a union.
    """
    plain = [k for k, t in enumerate(controlnets) if not t]
    unions = [k for k, t in enumerate(controlnets) if t]
    untyped = [i for i, t in enumerate(types) if t is None]
    typed = [i for i, t in enumerate(types) if t is not None]
    if len(untyped) > len(plain):
        where = f"{len(plain)} plain ControlNet(s)" if plain else "no plain ControlNet"
        more = "; a union ControlNet's controls need a control type (--control-type)" if unions else ""
        raise InputError(f"{len(untyped)} control images given but the build has {where}{more}")
    if typed and not unions:
        raise InputError("control types are for a union ControlNet, and this build has none")
    for i in typed:
        if types[i] >= controlnets[unions[0]]:  # type: ignore[operator]
            raise InputError(f"control type {types[i]} is not one of the union ControlNet's {controlnets[unions[0]]}")
    assignment: list[list[int]] = [[] for _ in controlnets]
    for k, i in zip(plain, untyped, strict=False):
        assignment[k] = [i]
    if typed:
        assignment[unions[0]] = typed
    return assignment


def resolve(
    request: GenerationRequest,
    controlnets: Sequence[int],
    info: ModelInfo,
    limits: Limits,
    control_size: tuple[int, int] | None = None,
) -> ResolvedRequest:
    """Check a request against a build and its limits; InputError names the first problem.

    Args:
        controlnets: Per ControlNet of the build, 0 for a plain one, its number of condition types
            for a union one.
        control_size: (height, width) of the first control image, for the default size.
    """
    if not isinstance(request.prompt, str):
        raise InputError("prompt must be a string")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise InputError("negative prompt must be a string")
    controls = list(request.controls)
    given = list(request.control_types or [])
    names = family_of(info).union_types
    types = [control_type(t, names=names) for t in given]
    # a tile type with no control image of its own takes the init image (tile upscaling)
    while len(types) > len(controls) and types[len(controls)] == names.get("tile") and request.image is not None:
        controls.append(request.image)
    if len(given) > len(controls):
        raise InputError(
            f"{len(given)} control types given for {len(controls)} control image(s) (a tile type without its "
            "control takes the init image, --image)"
        )
    types += [None] * (len(controls) - len(types))
    assignment = assign_controls(types, controlnets)
    mode = ControlMode.parse(request.control_mode)
    family = family_of(info)
    strength = _image_settings(request, family)
    scale = request.scales if request.scales is not None else family.default_scale(request)
    scales = _per_control(scale, len(controls), "scale")
    starts = _per_control(request.start, len(controls), "start")
    ends = _per_control(request.end, len(controls), "end")
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if not 0.0 <= s < e <= 1.0:
            raise InputError(f"control {k}: start {s} and end {e} must satisfy 0 <= start < end <= 1")
    if (
        isinstance(request.steps, bool)
        or not isinstance(request.steps, int)
        or not 1 <= request.steps <= limits.max_steps
    ):
        raise InputError(f"steps must be a whole number from 1 to {limits.max_steps}, got {request.steps!r}")
    if strength is not None and family.first_step(request.steps, strength) >= request.steps:
        from controlrt.runtime.img2img import keeps_no_step

        raise keeps_no_step(strength, request.steps)
    guidance = family.default_guidance if request.guidance is None else request.guidance
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise InputError(f"guidance {guidance!r} is not a number")
    if not math.isfinite(float(guidance)) or guidance < 0:
        raise InputError(f"guidance {guidance} must be finite and non-negative")
    true_cfg = request.true_cfg
    if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float)):
        raise InputError(f"true CFG scale {true_cfg!r} is not a number")
    if not math.isfinite(float(true_cfg)) or true_cfg < 1:
        raise InputError(f"true CFG scale {true_cfg} must be finite and at least 1 (1: off)")
    if true_cfg != 1 and not family.true_cfg:
        raise InputError(
            "true CFG (diffusers' true_cfg_scale) is for Flux models; this build's model runs classifier-free "
            "guidance at --guidance"
        )
    if isinstance(request.seed, bool) or not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
        raise InputError(f"seed must be a whole number in [0, 2**63), got {request.seed!r}")
    family.check_request(request)
    height, width = image_size(request, info, control_size)
    check_image_size(height, width, info.size_multiple)
    if height * width > limits.max_pixels:
        raise InputError(
            f"{height}x{width} is {height * width} pixels; at most {limits.max_pixels} are allowed "
            f"(about {math.isqrt(limits.max_pixels)} px square; the max_pixels limit raises it: --max-pixels on "
            "the command line, Pipeline.load(..., max_pixels=N) in Python)"
        )
    return ResolvedRequest(
        request,
        mode,
        scales,
        starts,
        ends,
        height,
        width,
        controls,
        types,
        assignment,
        strength,
        float(guidance),
        float(true_cfg),
    )


MAX_MASK_CROP = 8192


def _image_settings(request: GenerationRequest, family: Family) -> float | None:
    """Check the image-to-image settings; the strength that runs (None for text-to-image)."""
    if request.mask is not None and request.image is None:
        raise InputError("a mask needs the image it masks: give the init image too (--image)")
    if family.info.inpainting_unet and request.mask is None:
        raise InputError("this build's UNet is an inpainting UNet: give an init image and a mask (--image, --mask)")
    if request.image is None:
        for label in ("strength", "mask_crop"):
            if getattr(request, label) is not None:
                raise InputError(f"{label} applies to image-to-image generation: give an init image (--image)")
        return None
    if request.mask_crop is not None and (
        request.mask is None
        or isinstance(request.mask_crop, bool)
        or not isinstance(request.mask_crop, int)
        or not 0 <= request.mask_crop <= MAX_MASK_CROP
    ):
        raise InputError(
            f"mask crop {request.mask_crop!r} must be a whole number of pixels from 0 to {MAX_MASK_CROP}, with a mask"
        )
    for label in ("aesthetic_score", "negative_aesthetic_score"):
        value = getattr(request, label)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{label} {value!r} must be a finite number")
    if not isinstance(request.vae_tiling, bool):
        raise InputError(f"vae_tiling {request.vae_tiling!r} must be true or false")
    strength = request.strength
    if strength is None:
        return family.default_strength(request)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise InputError(f"strength {strength!r} must be a number in (0, 1]")
    return float(strength)
