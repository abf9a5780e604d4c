"""TensorRT optimization profiles derived from the graph specs.

A profile gives every input a (min, opt, max) shape. They come from the spec's symbolic axes
(batch, height/f, width/f ...) evaluated at the ProfileSettings' sizes, so the profile can never
disagree with what the loop feeds. Batches are counted in images per request; a graph's batch is
that times the number of branches it runs: classifier-free guidance doubles the text encoder and
the UNet, and the ControlNets see both halves (uniform modes) or only the conditional one
(conditional-only modes); the VAE decodes each image once.

Static settings give one min = opt = max profile per graph batch the loop can use (a ControlNet
gets two: B and 2B), the shapes CUDA graphs need and the fastest engines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from controlrt.control import Branches
from controlrt.errors import InputError
from controlrt.specs import GraphSpec, check_image_size

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """One input's shapes in one profile."""

    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for s, lo, hi in zip(shape, self.min, self.max, strict=True)
        )

    @property
    def static(self) -> bool:
        return self.min == self.max


Profile = dict[str, ShapeRange]


@dataclass(frozen=True)
class ProfileSettings:
    """Image sizes (height, width in pixels) and images per request that the engines accept.

    Attributes:
        min_size, opt_size, max_size: Smallest, tuned-for and largest image size; None means the
            model's native size for opt, half of it for min and twice it for max.
        min_batch, opt_batch, max_batch: Images per request.
        static: One fixed shape per profile (opt_size, opt_batch): needed for CUDA graphs.
    """

    min_size: tuple[int, int] | None = None
    opt_size: tuple[int, int] | None = None
    max_size: tuple[int, int] | None = None
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    static: bool = False

    def sizes(self, spec: GraphSpec) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) image sizes for ``spec``, checked against its size multiple."""
        m = spec.size_multiple
        native = spec.default_size
        opt = self.opt_size or native
        if self.static:
            low = high = opt
        else:
            low = self.min_size or (max(m, native[0] // 2 // m * m), max(m, native[1] // 2 // m * m))
            high = self.max_size or (native[0] * 2, native[1] * 2)
        for label, (h, w) in (("min", low), ("opt", opt), ("max", high)):
            check_image_size(h, w, m, f"{label} size: ")
        if not (low[0] <= opt[0] <= high[0] and low[1] <= opt[1] <= high[1]):
            raise InputError(
                f"sizes must satisfy min <= opt <= max per side: {low[0]}x{low[1]}, "
                f"{opt[0]}x{opt[1]}, {high[0]}x{high[1]}"
            )
        return low, opt, high

    def batches(self) -> tuple[int, int, int]:
        if self.static:
            if self.opt_batch < 1:
                raise InputError(f"batch {self.opt_batch} must be at least 1")
            return self.opt_batch, self.opt_batch, self.opt_batch
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(
                f"batches must satisfy 1 <= min <= opt <= max: {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        return self.min_batch, self.opt_batch, self.max_batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def derive_profiles(
    spec: GraphSpec, settings: ProfileSettings, branches: tuple[int, ...] | None = None
) -> list[Profile]:
    """The optimization profiles of one graph's engine.

    Dynamic: one profile spanning every batch and size the settings allow, tuned at the opt size
    with CFG (the common case); a union ControlNet's number of condition images from 1 to its
    number of types, tuned at 2. Static: one fixed profile per graph batch the loop can use (and
    for a union ControlNet per 1 and 2 condition images). ``branches``: the graph's per-image
    batches, as its family says (Family.batches; default Branches.possible).
    """
    low, opt, high = settings.sizes(spec)
    b_min, b_opt, b_max = settings.batches()
    branches = branches or Branches.possible(spec.kind)
    counts = (1, 2, max(2, spec.control_types))  # union condition images
    if settings.static:
        images = counts[:2] if spec.uses("controls") else counts[:1]
        return [_fixed(spec, b_opt * n, opt, c) for n in branches for c in images]
    lo = spec.sizes(b_min * min(branches), *low, controls=counts[0])
    op = spec.sizes(b_opt * max(branches), *opt, controls=counts[1])
    hi = spec.sizes(b_max * max(branches), *high, controls=counts[2])
    return [{t.name: ShapeRange(t.concrete_shape(lo), t.concrete_shape(op), t.concrete_shape(hi)) for t in spec.inputs}]


def _fixed(spec: GraphSpec, batch: int, size: tuple[int, int], controls: int) -> Profile:
    sizes = spec.sizes(batch, *size, controls=controls)
    return {t.name: ShapeRange(*(t.concrete_shape(sizes),) * 3) for t in spec.inputs}


def profile_index(profiles: list[Profile], shapes: Mapping[str, Shape]) -> int | None:
    """Index of the first profile that admits every input shape, or None."""
    for index, profile in enumerate(profiles):
        if all(profile[name].contains(tuple(shape)) for name, shape in shapes.items() if name in profile):
            return index
    return None


def admits(profiles: list[Profile], spec: GraphSpec, sizes: Mapping[str, int]) -> bool:
    """Whether some profile admits the spec's inputs at ``sizes`` (batch, height, width)."""
    return profile_index(profiles, spec.input_shapes(sizes)) is not None


def profile_sizes(profiles: list[Profile], spec: GraphSpec) -> list[dict[str, int]]:
    """The sizes of each profile's opt shapes (then its min and max, where they differ), once each."""
    out: list[dict[str, int]] = []
    for which in ("opt", "min", "max"):
        for profile in profiles:
            shapes = {name: getattr(r, which) for name, r in profile.items()}
            sizes = spec.sizes_from_shapes(shapes)
            full = {"batch": 1, "height": spec.default_size[0], "width": spec.default_size[1], **sizes}
            if full not in out:
                out.append(full)
    return out


def select_profile(profiles: list[Profile], shapes: Mapping[str, Shape]) -> int:
    """Index of the first profile that admits every input shape; InputError naming the ranges if none."""
    index = profile_index(profiles, shapes)
    if index is not None:
        return index
    first = profiles[0]
    name, shape = next(
        ((n, s) for n, s in shapes.items() if n in first and not first[n].contains(tuple(s))),
        next(iter(shapes.items())),
    )
    ranges = "; ".join(f"{p[name].min}..{p[name].max}" for p in profiles if name in p)
    raise InputError(
        f"input {name} of shape {tuple(shape)} is outside the engine's profiles ({ranges}); "
        "rebuild with controlrt build --min-size/--max-size/--max-batch (or without --static)"
    )


def profiles_to_json(profiles: list[Profile]) -> list[dict[str, dict[str, list[int]]]]:
    return [
        {name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for name, r in p.items()} for p in profiles
    ]


def profiles_from_json(data: list[Mapping[str, Mapping[str, list[int]]]]) -> list[Profile]:
    return [
        {name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in p.items()} for p in data
    ]
