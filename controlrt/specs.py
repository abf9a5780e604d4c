"""Graph specs: the one description of every exported graph's inputs and outputs.

A :class:`GraphSpec` lists a graph's tensors in order, with dtypes and symbolic axes. Export's
dynamic axes, dummy and parity inputs, runtime input checks and (later) TensorRT profiles are all
derived from it, so a shape is written down once.

Symbolic axes are written in image pixels: ``height/8`` is the latent height of a VAE with scale
factor 8, ``height/16`` the latent height after one UNet downsampler. Three symbols exist:
``batch``, ``height`` and ``width``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from controlrt.errors import InputError

if TYPE_CHECKING:
    import torch

SYMBOLS = ("batch", "height", "width", "controls")  # controls: a union ControlNet's condition images
MID_BLOCK_RESIDUAL = "mid_block_res"
DOWN_BLOCK_RESIDUAL = "down_block_res_"
BLOCK_RESIDUAL = "block_res_"  # a transformer's (SD3, Flux's double-stream blocks): one per ControlNet block
SINGLE_BLOCK_RESIDUAL = "single_block_res_"  # Flux's single-stream blocks


def is_residual(name: str) -> bool:
    """Whether a tensor name is a control residual (a ControlNet output, a denoiser input)."""
    return name == MID_BLOCK_RESIDUAL or name.startswith((DOWN_BLOCK_RESIDUAL, BLOCK_RESIDUAL, SINGLE_BLOCK_RESIDUAL))


def check_image_size(height: Any, width: Any, multiple: int, what: str = "") -> None:
    """InputError unless height and width are positive whole multiples of ``multiple`` pixels."""
    for label, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise InputError(
                f"{what}{label} {value!r} must be a positive multiple of {multiple} for this model "
                "(the VAE factor times the UNet's downsampling)"
            )


@dataclass(frozen=True)
class Axis:
    """A symbolic dimension: the size of ``symbol`` divided by ``divisor``."""

    symbol: str
    divisor: int = 1

    @property
    def name(self) -> str:
        return self.symbol if self.divisor == 1 else f"{self.symbol}/{self.divisor}"

    def resolve(self, sizes: Mapping[str, int]) -> int:
        return sizes[self.symbol] // self.divisor

    @classmethod
    def parse(cls, text: str) -> Axis:
        symbol, _, divisor = text.partition("/")
        return cls(symbol, int(divisor) if divisor else 1)


Dim = int | Axis


class GraphKind(StrEnum):
    TEXT_ENCODER = "text_encoder"
    CONTROLNET = "controlnet"
    UNET = "unet"  # the denoiser: a UNet, or a transformer (SD3's graph "transformer")
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor.

    Attributes:
        name: Tensor name in the ONNX graph and in the runtime's feeds.
        dtype: numpy-style dtype name ("float32", "int64", ...).
        shape: Fixed sizes and symbolic :class:`Axis` entries.
        value_range: For inputs, the half-open range that meaningful values lie in (used to draw
            dummy and parity inputs); ``None`` means standard-normal values.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    value_range: tuple[float, float] | None = None

    def concrete_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d.resolve(sizes) for d in self.shape)

    def shape_text(self) -> str:
        return "(" + ", ".join(str(d) if isinstance(d, int) else d.name for d in self.shape) + ")"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d if isinstance(d, int) else d.name for d in self.shape],
        }
        if self.value_range is not None:
            out["value_range"] = list(self.value_range)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else Axis.parse(d) for d in data["shape"])
        value_range = data.get("value_range")
        return cls(data["name"], data["dtype"], shape, tuple(value_range) if value_range else None)


@dataclass(frozen=True)
class GraphSpec:
    """Ordered inputs and outputs of one graph.

    Attributes:
        name: Graph name in the build ("unet", "controlnet_0", ...).
        kind: What the graph computes.
        inputs: Input tensors in call order.
        outputs: Output tensors in return order.
        size_multiple: Image height and width must be multiples of this many pixels.
        default_size: The model's native image size (height, width) in pixels.
        index: Which text encoder or ControlNet of the build this graph is (0 for the others).
        source_name: A ControlNet's source (its folder's name), to match controls and refits to it.
        layer: A text encoder's output layer: "last", or "penultimate" (SDXL).
        control_types: A ControlNet-Union's number of condition types (0: not a union).
        blocks_repeat: A Flux transformer that adds its ControlNet residuals to its blocks in turn
            (block i takes residual i mod n, diffusers' controlnet_blocks_repeat for XLabs-style
            ControlNets) instead of by the interval rule (block i takes residual i // ceil(N / n)).
    """

    name: str
    kind: GraphKind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    size_multiple: int
    default_size: tuple[int, int]
    index: int = 0
    source_name: str = ""
    layer: str = ""
    control_types: int = 0
    blocks_repeat: bool = False

    @property
    def union(self) -> bool:
        """Whether this is a ControlNet-Union graph (several condition images, typed)."""
        return self.control_types > 0

    @property
    def residual_inputs(self) -> tuple[TensorSpec, ...]:
        """The control residuals among the inputs (a UNet's), in UNet order."""
        return tuple(t for t in self.inputs if is_residual(t.name))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor named {name!r}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Symbolic axes per tensor, in the form ``torch.onnx.export`` takes."""
        return {
            t.name: {i: d.name for i, d in enumerate(t.shape) if isinstance(d, Axis)}
            for t in (*self.inputs, *self.outputs)
            if any(isinstance(d, Axis) for d in t.shape)
        }

    def sizes(self, batch: int, height: int | None = None, width: int | None = None, controls: int = 2) -> dict:
        """Symbol sizes for a batch and an image size (default: the native size); ``controls`` is a
        union ControlNet's number of condition images."""
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        check_image_size(height, width, self.size_multiple)
        if batch < 1:
            raise InputError(f"batch {batch} must be at least 1")
        sizes = {"batch": batch, "height": height, "width": width}
        if self.uses("controls"):
            if controls < 1:
                raise InputError(f"{controls} condition images: a union ControlNet takes at least 1")
            sizes["controls"] = controls
        return sizes

    def uses(self, symbol: str) -> bool:
        """Whether some input has an axis of ``symbol``."""
        return any(isinstance(d, Axis) and d.symbol == symbol for t in self.inputs for d in t.shape)

    def input_shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete_shape(sizes) for t in self.inputs}

    def output_shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.concrete_shape(sizes) for t in self.outputs}

    def dummy_inputs(self, sizes: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded random inputs of the spec's shapes and dtypes, inside each value range."""
        import torch

        generator = torch.Generator("cpu").manual_seed(seed)
        feeds = {}
        for t in self.inputs:
            shape = t.concrete_shape(sizes)
            dtype = getattr(torch, t.dtype)
            if dtype.is_floating_point:
                if t.value_range is None:
                    value = torch.randn(shape, generator=generator)
                else:
                    low, high = t.value_range
                    value = torch.rand(shape, generator=generator) * (high - low) + low
            else:
                low, high = t.value_range or (0, 2)
                value = torch.randint(int(low), int(high), shape, generator=generator)
            feeds[t.name] = value.to(dtype)
        return feeds

    def bind(self, feeds: Mapping[str, Any]) -> dict[str, int]:
        """Check feeds against the inputs and return the symbol sizes they imply.

        Feeds may be torch tensors or numpy arrays. Raises InputError naming the first
        missing, unexpected, mistyped or misshapen input.
        """
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise InputError(f"{self.name}: {'; '.join(parts)} (inputs: {self.input_names})")
        for t in self.inputs:
            dtype = str(feeds[t.name].dtype).removeprefix("torch.")
            if dtype != t.dtype:
                raise InputError(f"{self.name}: input {t.name!r} has dtype {dtype}, expected {t.dtype}")
        return self.sizes_from_shapes({name: tuple(feeds[name].shape) for name in self.input_names})

    def sizes_from_shapes(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """The symbol sizes that input shapes imply; InputError naming the first misshapen input."""
        sizes: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(shapes[t.name])
            if len(shape) != len(t.shape):
                raise InputError(f"{self.name}: input {t.name!r} has shape {shape}, expected {t.shape_text()}")
            for size, dim in zip(shape, t.shape, strict=True):
                if isinstance(dim, int):
                    ok = size == dim
                else:
                    full = sizes.setdefault(dim.symbol, size * dim.divisor)
                    ok = full == size * dim.divisor
                if not ok:
                    raise InputError(
                        f"{self.name}: input {t.name!r} has shape {shape}, expected "
                        f"{t.shape_text()} with {_sizes_text(sizes)}"
                    )
        return sizes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "size_multiple": self.size_multiple,
            "default_size": list(self.default_size),
            "attributes": self._attributes(),
        }

    def _attributes(self) -> dict[str, Any]:
        """The per-graph facts as manifests store them (the keys every build since 0.1 has)."""
        if self.kind is GraphKind.TEXT_ENCODER:
            return {"text_encoder_index": self.index, "layer": self.layer}
        if self.kind is GraphKind.CONTROLNET:
            out: dict[str, Any] = {"controlnet_index": self.index, "controlnet_name": self.source_name}
            if self.union:
                out |= {"union": True, "num_control_type": self.control_types}
            return out
        if self.blocks_repeat:
            return {"controlnet_blocks_repeat": True}
        return {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphSpec:
        facts = data.get("attributes", {})
        return cls(
            name=data["name"],
            kind=GraphKind(data["kind"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            size_multiple=int(data["size_multiple"]),
            default_size=(int(data["default_size"][0]), int(data["default_size"][1])),
            index=int(facts.get("text_encoder_index", facts.get("controlnet_index", 0))),
            source_name=str(facts.get("controlnet_name", "")),
            layer=str(facts.get("layer", "last" if data["kind"] == GraphKind.TEXT_ENCODER else "")),
            control_types=int(facts.get("num_control_type", 0)) if facts.get("union") else 0,
            blocks_repeat=bool(facts.get("controlnet_blocks_repeat", False)),
        )


def _sizes_text(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items()) or "no sizes bound yet"
