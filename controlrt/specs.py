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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from controlrt.errors import InputError

if TYPE_CHECKING:
    import torch

    from controlrt.models import ModelInfo

SYMBOLS = ("batch", "height", "width", "controls")  # controls: a union ControlNet's condition images
MID_BLOCK_RESIDUAL = "mid_block_res"
DOWN_BLOCK_RESIDUAL = "down_block_res_"


def is_residual(name: str) -> bool:
    """Whether a tensor name is a control residual (a ControlNet output, a UNet input)."""
    return name == MID_BLOCK_RESIDUAL or name.startswith(DOWN_BLOCK_RESIDUAL)


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
    UNET = "unet"
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
    """

    name: str
    kind: GraphKind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    size_multiple: int
    default_size: tuple[int, int]
    attributes: Mapping[str, Any] = field(default_factory=dict)

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
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphSpec:
        return cls(
            name=data["name"],
            kind=GraphKind(data["kind"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            size_multiple=int(data["size_multiple"]),
            default_size=(int(data["default_size"][0]), int(data["default_size"][1])),
            attributes=dict(data.get("attributes", {})),
        )


def _sizes_text(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items()) or "no sizes bound yet"


# --- specs derived from a model's configuration -------------------------------------------------

BATCH = Axis("batch")


def _image_axes(divisor: int) -> tuple[Axis, Axis]:
    return Axis("height", divisor), Axis("width", divisor)


def residual_specs(info: ModelInfo) -> tuple[TensorSpec, ...]:
    """The control residuals in UNet order: down_block_res_0 … then mid_block_res.

    Shapes follow the UNet config: residual i has ``channels`` and sits ``level`` downsamplers
    below the latent, so its spatial axes are ``height / (vae_factor * 2**level)``.
    """
    specs = []
    for i, res in enumerate(info.residuals):
        name = MID_BLOCK_RESIDUAL if i == len(info.residuals) - 1 else f"{DOWN_BLOCK_RESIDUAL}{i}"
        divisor = info.vae_scale_factor * 2**res.level
        specs.append(TensorSpec(name, "float32", (BATCH, res.channels, *_image_axes(divisor))))
    return tuple(specs)


# SDXL's added conditions, inputs of the UNet and the ControlNets after encoder_hidden_states
ADDED_CONDITIONS = ("text_embeds", "time_ids")
GUIDANCE_EMBEDDING = "timestep_cond"  # the UNet's only: ControlNets never take it
# An inpainting UNet's own inputs, concatenated to the latents inside the graph as diffusers does
INPAINT_INPUTS = ("mask", "masked_image_latents")


def _denoiser_inputs(info: ModelInfo) -> tuple[TensorSpec, ...]:
    """sample, timestep, encoder_hidden_states, and for SDXL text_embeds [batch, pooled] (the second
    text encoder's projection) and time_ids [batch, 6] (original size, crop offsets, target size)."""
    latent = _image_axes(info.vae_scale_factor)
    inputs = [
        TensorSpec("sample", "float32", (BATCH, info.latent_channels, *latent)),
        TensorSpec("timestep", "float32", (BATCH,), (0.0, float(info.num_train_timesteps))),
        TensorSpec(
            "encoder_hidden_states",
            "float32",
            (BATCH, info.sequence_length, info.cross_attention_dim),
        ),
    ]
    if info.sdxl:
        inputs.append(TensorSpec("text_embeds", "float32", (BATCH, info.pooled_dim)))
        inputs.append(TensorSpec("time_ids", "float32", (BATCH, info.time_ids), (0.0, 2048.0)))
    return tuple(inputs)


def added_condition_names(spec: GraphSpec) -> list[str]:
    """The SDXL added-condition inputs a UNet or ControlNet graph takes (none for SD 1.x/2.x)."""
    return [name for name in ADDED_CONDITIONS if name in spec.input_names]


def _spec(info: ModelInfo, name: str, kind: GraphKind, inputs, outputs, **attributes) -> GraphSpec:
    return GraphSpec(
        name=name,
        kind=kind,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        size_multiple=info.size_multiple,
        default_size=info.default_size,
        attributes=attributes,
    )


def text_encoder_spec(info: ModelInfo, index: int = 0) -> GraphSpec:
    """The ``index``-th text encoder: input_ids int64 [batch, seq] (and attention_mask int64 [batch,
    seq] of 0/1, for text encoders whose config sets use_attention_mask, as diffusers passes it) ->

    - SD 1.x/2.x: last_hidden_state float32 [batch, seq, dim];
    - SDXL: hidden_states [batch, seq, width], the penultimate layer's, as diffusers takes them, and
      for the second encoder also text_embeds [batch, pooled], its pooled projection.
    """
    inputs = [TensorSpec("input_ids", "int64", (BATCH, info.sequence_length), (0, info.vocab_size))]
    if info.text_attention_mask:
        inputs.append(TensorSpec("attention_mask", "int64", (BATCH, info.sequence_length), (1, 2)))
    name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
    if not info.sdxl:
        outputs = [TensorSpec("last_hidden_state", "float32", (BATCH, info.sequence_length, info.cross_attention_dim))]
        return _spec(info, name, GraphKind.TEXT_ENCODER, inputs, outputs, text_encoder_index=index, layer="last")
    width = info.text_hidden_sizes[index]
    outputs = [TensorSpec("hidden_states", "float32", (BATCH, info.sequence_length, width))]
    if index == len(info.text_hidden_sizes) - 1:
        outputs.append(TensorSpec("text_embeds", "float32", (BATCH, info.pooled_dim)))
    return _spec(info, name, GraphKind.TEXT_ENCODER, inputs, outputs, text_encoder_index=index, layer="penultimate")


def text_encoder_specs(info: ModelInfo) -> list[GraphSpec]:
    return [text_encoder_spec(info, k) for k in range(info.text_encoders)]


def controlnet_spec(info: ModelInfo, index: int, source_name: str, conditioning_channels: int) -> GraphSpec:
    """The ``index``-th ControlNet of a build.

    sample, timestep, encoder_hidden_states, controlnet_cond [batch, C, height, width] in [0, 1]
    -> the unscaled residuals, named as the UNet's residual inputs.
    """
    cond = TensorSpec(
        "controlnet_cond",
        "float32",
        (BATCH, conditioning_channels, *_image_axes(1)),
        (0.0, 1.0),
    )
    return _spec(
        info,
        f"controlnet_{index}",
        GraphKind.CONTROLNET,
        [*_denoiser_inputs(info), cond],
        residual_specs(info),
        controlnet_index=index,
        controlnet_name=source_name,
    )


CONTROLS = Axis("controls")


def union_controlnet_spec(
    info: ModelInfo, index: int, source_name: str, conditioning_channels: int, num_control_type: int
) -> GraphSpec:
    """The ``index``-th ControlNet of a build, a ControlNet-Union (diffusers' ControlNetUnionModel).

    Inputs: the denoiser inputs (with SDXL's added conditions), then controlnet_cond [batch,
    controls, C, height, width] in [0, 1] (one image per condition), control_type [batch, types]
    (the multi-hot vector of the types given, as diffusers builds it), control_type_idx int64
    [controls] (each image's type) and conditioning_scale [controls] (with two or more images each
    image's scale times its window's keep, applied inside the model as diffusers does; with one
    image 1, the scale applied to the outputs). Outputs: the residuals, as any ControlNet's.
    """
    inputs = [
        *_denoiser_inputs(info),
        TensorSpec("controlnet_cond", "float32", (BATCH, CONTROLS, conditioning_channels, *_image_axes(1)), (0.0, 1.0)),
        TensorSpec("control_type", "float32", (BATCH, num_control_type), (0.0, 2.0)),
        TensorSpec("control_type_idx", "int64", (CONTROLS,), (0, num_control_type)),
        TensorSpec("conditioning_scale", "float32", (CONTROLS,), (0.0, 2.0)),
    ]
    return _spec(
        info,
        f"controlnet_{index}",
        GraphKind.CONTROLNET,
        inputs,
        residual_specs(info),
        controlnet_index=index,
        controlnet_name=source_name,
        union=True,
        num_control_type=num_control_type,
    )


def unet_spec(info: ModelInfo) -> GraphSpec:
    """sample, timestep, encoder_hidden_states (SDXL: text_embeds, time_ids; LCM-distilled UNets:
    timestep_cond [batch, dim], the guidance embedding; inpainting UNets: mask [batch, 1, h, w] in
    {0, 1} and masked_image_latents [batch, C, h, w], concatenated to the latents inside the graph)
    and every control residual -> noise_pred."""
    latent = _image_axes(info.vae_scale_factor)
    out = TensorSpec("noise_pred", "float32", (BATCH, info.unet_out_channels, *latent))
    guidance = (
        [TensorSpec(GUIDANCE_EMBEDDING, "float32", (BATCH, info.guidance_embedding_dim), (-1.0, 1.0))]
        if info.embedded_guidance
        else []
    )
    inpaint = (
        [
            TensorSpec(INPAINT_INPUTS[0], "float32", (BATCH, info.mask_channels, *latent), (0.0, 1.0)),
            TensorSpec(INPAINT_INPUTS[1], "float32", (BATCH, info.latent_channels, *latent)),
        ]
        if info.inpainting_unet
        else []
    )
    return _spec(
        info,
        "unet",
        GraphKind.UNET,
        [*_denoiser_inputs(info), *guidance, *inpaint, *residual_specs(info)],
        [out],
    )


def vae_decoder_spec(info: ModelInfo) -> GraphSpec:
    """latent [batch, C, height/f, width/f] (denoised, still scaled) -> image in [-1, 1]."""
    return _spec(
        info,
        "vae_decoder",
        GraphKind.VAE_DECODER,
        [
            TensorSpec(
                "latent",
                "float32",
                (BATCH, info.latent_channels, *_image_axes(info.vae_scale_factor)),
            )
        ],
        [TensorSpec("image", "float32", (BATCH, info.image_channels, *_image_axes(1)))],
    )


def vae_encoder_spec(info: ModelInfo) -> GraphSpec:
    """image [batch, C, height, width] in [-1, 1] -> latent_mean [batch, latent, height/f, width/f]
    and, for a VAE that encodes to a distribution (AutoencoderKL), latent_logvar, as the encoder
    computes them (not clamped, not sampled, not scaled: the loop samples with the request's
    generator, clamping the log-variance to [-30, 20] as diffusers does, and scales). A tiny VAE
    (AutoencoderTiny) gives its latents as latent_mean alone."""
    latent = (BATCH, info.latent_channels, *_image_axes(info.vae_scale_factor))
    outputs = [TensorSpec("latent_mean", "float32", latent)]
    if info.vae_samples:
        outputs.append(TensorSpec("latent_logvar", "float32", latent))
    return _spec(
        info,
        "vae_encoder",
        GraphKind.VAE_ENCODER,
        [TensorSpec("image", "float32", (BATCH, info.image_channels, *_image_axes(1)), (-1.0, 1.0))],
        outputs,
    )
