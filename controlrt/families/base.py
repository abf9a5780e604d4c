"""What every model family declares, with the UNet-family defaults (SD 1.x/2.x's).

A :class:`Family` is bound to one model's :class:`~controlrt.models.ModelInfo` (read from its
configs) and answers, for that model: which graphs a build has and their specs; how the text
encoders' outputs become the denoiser's conditioning; how the control residuals are named, shaped
and weighted; which extra inputs a request feeds the UNet; what a request may ask and its
defaults; which diffusers pipeline reads its LoRA files. A family file overrides only what
differs from these defaults (see sdxl.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from controlrt.compare import Gate, Tolerance
from controlrt.compare import gate as default_gate
from controlrt.control import Branches, ControlMode, block_weights, guidance_embedding
from controlrt.errors import InputError, ModelError
from controlrt.precision import Precision
from controlrt.specs import (
    DOWN_BLOCK_RESIDUAL,
    MID_BLOCK_RESIDUAL,
    Axis,
    GraphKind,
    GraphSpec,
    TensorSpec,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from controlrt.families.info import ModelInfo

BATCH = Axis("batch")
CONTROLS = Axis("controls")  # a union ControlNet's condition images
GUIDANCE_EMBEDDING = "timestep_cond"  # the UNet's only: ControlNets never take it
# ControlNet-Union's condition types as diffusers takes them (integers) and xinsir's ProMax names them
UNION_TYPE_NAMES = {
    "openpose": 0,
    "depth": 1,
    "hed": 2,
    "canny": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "repaint": 7,
}
# An inpainting UNet's own inputs, concatenated to the latents inside the graph as diffusers does
INPAINT_INPUTS = ("mask", "masked_image_latents")


class ControlNetSource(Protocol):
    """What a family's graphs need of a ControlNet folder (controlrt.models.ControlNetModelFolder)."""

    @property
    def name(self) -> str: ...
    @property
    def conditioning_channels(self) -> int: ...
    @property
    def union(self) -> bool: ...
    @property
    def num_control_type(self) -> int: ...
    @property
    def config(self) -> dict[str, Any]: ...
    def load(self, meta: bool = False) -> nn.Module: ...


class ModelSource(Protocol):
    """What a family's graph modules need of a base model folder (controlrt.models.BaseModel)."""

    @property
    def text_encoder_names(self) -> list[str]: ...
    def info(self) -> ModelInfo: ...
    def load_text_encoder(self, component: str, meta: bool = False) -> nn.Module: ...
    def load_unet(self, meta: bool = False) -> nn.Module: ...
    def load_vae(self, meta: bool = False) -> nn.Module: ...
    @property
    def configs(self) -> dict[str, dict[str, Any]]: ...
    def load_denoiser_weights(self, prefix: str) -> dict[str, torch.Tensor]: ...


ModuleFactory = Callable[[GraphSpec, ModelSource, Sequence[ControlNetSource], bool], "nn.Module"]


def image_axes(divisor: int) -> tuple[Axis, Axis]:
    return Axis("height", divisor), Axis("width", divisor)


class Family:
    """A UNet model family (SD 1.x/2.x unless a subclass says otherwise), bound to one model."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # as the family is named in messages: "SD 1.x/2.x"
    lora_pipeline: ClassVar[str] = ""  # the diffusers pipeline class whose lora_state_dict reads its LoRA files
    text_layer: ClassVar[str] = "last"  # which hidden states of the text encoders condition the UNet
    denoiser: ClassVar[str] = "unet"  # the denoiser graph's name in a build (GraphKind.UNET)
    denoiser_component: ClassVar[str] = "unet"  # its folder in the base model
    controlnet_classes: ClassVar[tuple[str, ...]] = ("ControlNetModel", "ControlNetUnionModel")

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @classmethod
    def claims(cls, info: ModelInfo) -> bool:
        """Whether the model ``info`` describes is of this family."""
        raise NotImplementedError

    # --- reading a model folder's configs ------------------------------------------------------

    text_components: ClassVar[tuple[str, ...]] = ("text_encoder",)  # in order
    tokenizer_components: ClassVar[tuple[str, ...]] = ("tokenizer",)  # one per text encoder

    @classmethod
    def recognises(cls, configs: dict[str, dict[str, Any]]) -> bool:
        """Whether a model folder with these component configs (unet, vae, text_encoder, …) is of
        this family."""
        raise NotImplementedError

    @classmethod
    def read_info(cls, configs: dict[str, dict[str, Any]]) -> ModelInfo:
        """The ModelInfo of a model whose denoiser is not a UNet (``denoiser_component`` other than
        unet), read from its configs; UNet models are read by controlrt.models.model_info."""
        raise NotImplementedError

    @classmethod
    def read_conditions(cls, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """ModelInfo fields of this family's text conditioning (``text_hidden_sizes``, …) from the
        configs; ModelError if they do not fit together. None here: one text encoder."""
        return {}

    # --- graphs -------------------------------------------------------------------------------

    def graph_specs(self, controlnets: Sequence[ControlNetSource]) -> list[GraphSpec]:
        """Every graph of a build, in export order: text encoder(s), ControlNets, UNet, VAE
        decoder, VAE encoder."""
        return [
            *self.text_encoder_specs(),
            *(
                self.union_controlnet_spec(k, cn.name, cn.conditioning_channels, cn.num_control_type)
                if cn.union
                else self.controlnet_spec(k, cn.name, cn.conditioning_channels)
                for k, cn in enumerate(controlnets)
            ),
            self.unet_spec(),
            self.vae_decoder_spec(),
            self.vae_encoder_spec(),
        ]

    def _spec(self, name: str, kind: GraphKind, inputs, outputs, **facts: Any) -> GraphSpec:
        return GraphSpec(
            name=name,
            kind=kind,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            size_multiple=self.info.size_multiple,
            default_size=self.info.default_size,
            **facts,
        )

    def text_encoder_specs(self) -> list[GraphSpec]:
        return [self.text_encoder_spec(k) for k in range(self.info.text_encoders)]

    def text_encoder_spec(self, index: int = 0) -> GraphSpec:
        """The ``index``-th text encoder: input_ids int64 [batch, seq] (and attention_mask int64
        [batch, seq] of 0/1, for text encoders whose config sets use_attention_mask, as diffusers
        passes it) -> :meth:`text_encoder_outputs`."""
        info = self.info
        inputs = [TensorSpec("input_ids", "int64", (BATCH, info.sequence_length), (0, info.vocab_size))]
        if info.text_attention_mask:
            inputs.append(TensorSpec("attention_mask", "int64", (BATCH, info.sequence_length), (1, 2)))
        name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        outputs = self.text_encoder_outputs(index)
        return self._spec(name, GraphKind.TEXT_ENCODER, inputs, outputs, index=index, layer=self.text_layer)

    def text_encoder_outputs(self, index: int) -> list[TensorSpec]:
        """last_hidden_state float32 [batch, seq, dim]."""
        info = self.info
        return [TensorSpec("last_hidden_state", "float32", (BATCH, info.sequence_length, info.cross_attention_dim))]

    def added_conditions(self) -> list[TensorSpec]:
        """Inputs the UNet and the ControlNets take after encoder_hidden_states (none here)."""
        return []

    @property
    def added_condition_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.added_conditions())

    def denoiser_inputs(self) -> list[TensorSpec]:
        """sample, timestep, encoder_hidden_states, then :meth:`added_conditions`."""
        info = self.info
        return [
            TensorSpec("sample", "float32", (BATCH, info.latent_channels, *image_axes(info.vae_scale_factor))),
            TensorSpec("timestep", "float32", (BATCH,), (0.0, float(info.num_train_timesteps))),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, info.sequence_length, info.cross_attention_dim)),
            *self.added_conditions(),
        ]

    def residual_specs(self) -> tuple[TensorSpec, ...]:
        """The control residuals in UNet order: down_block_res_0 … then mid_block_res.

        Residual i has ``channels`` and sits ``level`` downsamplers below the latent, so its spatial
        axes are ``height / (vae_factor * 2**level)``.
        """
        info = self.info
        specs = []
        for i, res in enumerate(info.residuals):
            name = MID_BLOCK_RESIDUAL if i == len(info.residuals) - 1 else f"{DOWN_BLOCK_RESIDUAL}{i}"
            divisor = info.vae_scale_factor * 2**res.level
            specs.append(TensorSpec(name, "float32", (BATCH, res.channels, *image_axes(divisor))))
        return tuple(specs)

    def controlnet_spec(self, index: int, source_name: str, conditioning_channels: int) -> GraphSpec:
        """The ``index``-th ControlNet of a build: the denoiser inputs and controlnet_cond [batch, C,
        height, width] in [0, 1] -> the unscaled residuals, named as the UNet's residual inputs."""
        cond = TensorSpec("controlnet_cond", "float32", (BATCH, conditioning_channels, *image_axes(1)), (0.0, 1.0))
        return self._spec(
            f"controlnet_{index}",
            GraphKind.CONTROLNET,
            [*self.denoiser_inputs(), cond],
            self.residual_specs(),
            index=index,
            source_name=source_name,
        )

    def union_controlnet_spec(
        self, index: int, source_name: str, conditioning_channels: int, num_control_type: int
    ) -> GraphSpec:
        """The ``index``-th ControlNet of a build, a ControlNet-Union (diffusers' ControlNetUnionModel).

        Inputs: the denoiser inputs, then controlnet_cond [batch, controls, C, height, width] in [0, 1]
        (one image per condition), control_type [batch, types] (the multi-hot vector of the types
        given, as diffusers builds it), control_type_idx int64 [controls] (each image's type) and
        conditioning_scale [controls] (with two or more images each image's scale times its window's
        keep, applied inside the model as diffusers does; with one image 1, the scale applied to the
        outputs). Outputs: the residuals, as any ControlNet's.
        """
        inputs = [
            *self.denoiser_inputs(),
            TensorSpec(
                "controlnet_cond", "float32", (BATCH, CONTROLS, conditioning_channels, *image_axes(1)), (0.0, 1.0)
            ),
            TensorSpec("control_type", "float32", (BATCH, num_control_type), (0.0, 2.0)),
            TensorSpec("control_type_idx", "int64", (CONTROLS,), (0, num_control_type)),
            TensorSpec("conditioning_scale", "float32", (CONTROLS,), (0.0, 2.0)),
        ]
        return self._spec(
            f"controlnet_{index}",
            GraphKind.CONTROLNET,
            inputs,
            self.residual_specs(),
            index=index,
            source_name=source_name,
            control_types=num_control_type,
        )

    def unet_spec(self) -> GraphSpec:
        """The denoiser inputs (LCM-distilled UNets: timestep_cond [batch, dim], the guidance
        embedding; inpainting UNets: mask [batch, 1, h, w] in {0, 1} and masked_image_latents
        [batch, C, h, w], concatenated to the latents inside the graph) and every control residual
        -> noise_pred."""
        info = self.info
        latent = image_axes(info.vae_scale_factor)
        out = TensorSpec("noise_pred", "float32", (BATCH, info.unet_out_channels, *latent))
        guidance = (
            [TensorSpec(GUIDANCE_EMBEDDING, "float32", (BATCH, info.guidance_embedding_dim), (-1.0, 1.0))]
            if self.embedded_guidance
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
        inputs = [*self.denoiser_inputs(), *guidance, *inpaint, *self.residual_specs()]
        return self._spec(self.denoiser, GraphKind.UNET, inputs, [out])

    def vae_decoder_spec(self) -> GraphSpec:
        """latent [batch, C, height/f, width/f] (denoised, still scaled) -> image in [-1, 1]."""
        info = self.info
        latent = TensorSpec("latent", "float32", (BATCH, info.latent_channels, *image_axes(info.vae_scale_factor)))
        image = TensorSpec("image", "float32", (BATCH, info.image_channels, *image_axes(1)))
        return self._spec("vae_decoder", GraphKind.VAE_DECODER, [latent], [image])

    def vae_encoder_spec(self) -> GraphSpec:
        """image [batch, C, height, width] in [-1, 1] -> latent_mean [batch, latent, height/f, width/f]
        and, for a VAE that encodes to a distribution (AutoencoderKL), latent_logvar, as the encoder
        computes them (not clamped, not sampled, not scaled: the loop samples with the request's
        generator, clamping the log-variance to [-30, 20] as diffusers does, and scales). A tiny VAE
        (AutoencoderTiny) gives its latents as latent_mean alone."""
        info = self.info
        latent = (BATCH, info.latent_channels, *image_axes(info.vae_scale_factor))
        outputs = [TensorSpec("latent_mean", "float32", latent)]
        if info.vae_samples:
            outputs.append(TensorSpec("latent_logvar", "float32", latent))
        image = TensorSpec("image", "float32", (BATCH, info.image_channels, *image_axes(1)), (-1.0, 1.0))
        return self._spec("vae_encoder", GraphKind.VAE_ENCODER, [image], outputs)

    # --- the torch modules behind the graphs ----------------------------------------------------

    def module_factories(self) -> dict[GraphKind, ModuleFactory]:
        """For each kind of graph this family's builds have, what makes its torch module (in
        controlrt.graphs) from the source folders: with ``meta``, the architecture alone on the
        meta device (no weights: for counting its work). A family with other graphs (a
        transformer) adds its kinds here."""
        return {
            GraphKind.TEXT_ENCODER: self.text_encoder_module,
            GraphKind.CONTROLNET: self.controlnet_module,
            GraphKind.UNET: self.unet_module,
            GraphKind.VAE_DECODER: self.vae_decoder_module,
            GraphKind.VAE_ENCODER: self.vae_encoder_module,
        }

    def graph_module(
        self, spec: GraphSpec, base: ModelSource, controlnets: Sequence[ControlNetSource], meta: bool = False
    ) -> nn.Module:
        """The torch module that computes ``spec`` (in eval mode), loaded from the source folders."""
        factory = self.module_factories().get(spec.kind)
        if factory is None:
            raise ModelError(f"graph {spec.name}: {self.title} models have no {spec.kind} graph")
        return factory(spec, base, controlnets, meta).eval()

    def text_encoder_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import TextEncoderGraph

        encoder = base.load_text_encoder(base.text_encoder_names[spec.index], meta)
        return TextEncoderGraph(encoder, spec.layer, pooled="text_embeds" in spec.output_names)

    def controlnet_module(self, spec, base, controlnets, meta):
        return self.controlnet_graph(controlnets[spec.index], meta, base)

    def controlnet_graph(self, folder: ControlNetSource, meta: bool = False, base: Any = None) -> nn.Module:
        """The ControlNet graph's module around ``folder``'s model (a build's, or one swapped in);
        ``base``, the base model, for ControlNets that borrow its weights (SD3.5-Large's)."""
        from controlrt.graphs import ControlNetGraph, UnionControlNetGraph

        graph = UnionControlNetGraph if folder.union else ControlNetGraph
        return graph(folder.load(meta), self.added_condition_names)

    def unet_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import UNetGraph

        inputs = spec.input_names
        guidance, inpainting = GUIDANCE_EMBEDDING in inputs, INPAINT_INPUTS[0] in inputs
        return UNetGraph(base.load_unet(meta), self.added_condition_names, guidance, inpainting)

    def vae_decoder_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import VaeDecoderGraph

        return VaeDecoderGraph(base.load_vae(meta), self.info.scaling_factor)

    def vae_encoder_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import VaeEncoderGraph

        return VaeEncoderGraph(base.load_vae(meta))

    # --- tolerances --------------------------------------------------------------------------

    def kept_in_fp32(self) -> dict[str, str]:
        """Graphs whose fp16 variant is their fp32 graph, with the reason: the VAE of a model whose
        config sets force_upcast, as diffusers' SDXL pipelines encode and decode in fp32."""
        if not self.info.vae_force_upcast:
            return {}
        return {name: "its config sets force_upcast" for name in ("vae_decoder", "vae_encoder")}

    def gate(self, precision: Precision | str, quantizer: str | None = None) -> Gate:
        """What this family's graphs and images are judged by in ``precision`` (int8: per
        quantizer), wherever a graph is checked: export, convert, calibrate, LoRA fusing, refit,
        parity and ``--precision auto``. The defaults are controlrt.compare's gates, measured on
        SD 1.x/2.x and SDXL; a family whose numerics differ (a transformer in fp16) returns its
        own, with what it measured."""
        return default_gate(precision, quantizer)

    def tolerance(self, precision: Precision | str, kind: GraphKind, quantizer: str | None = None) -> Tolerance:
        return self.gate(precision, quantizer).tolerances[kind]

    # --- guidance and control -----------------------------------------------------------------

    @property
    def embedded_guidance(self) -> bool:
        """Whether the UNet takes guidance as an embedding (LCM-distilled): no CFG batch."""
        return self.info.guidance_embedding_dim > 0

    def branches(
        self, guidance: float, mode: ControlMode | str = ControlMode.UNIFORM, true_cfg: float = 1.0
    ) -> Branches:
        """Which CFG branches each graph runs for ``guidance`` and ``mode``: an LCM-distilled UNet
        takes guidance as an embedding, so there is no CFG batch whatever the scale, as in diffusers.
        ``true_cfg``: diffusers' true_cfg_scale, for families with ``true_cfg`` (the request refuses it
        elsewhere)."""
        return Branches.of(guidance, mode, cfg_batch=not self.embedded_guidance)

    def cfg_scale(self, guidance: float, true_cfg: float = 1.0) -> float:
        """The scale the loop combines the CFG branches with: the guidance (Flux: true_cfg)."""
        return guidance

    def batches(self, kind: GraphKind) -> tuple[int, ...]:
        """Every per-image batch a graph of ``kind`` may run with (engine profiles)."""
        return Branches.possible(kind)

    def unet_extras(self, guidance: float) -> dict[str, torch.Tensor]:
        """Inputs only the UNet takes, per request: an LCM-distilled UNet's guidance embedding."""
        if not self.embedded_guidance:
            return {}
        return {GUIDANCE_EMBEDDING: guidance_embedding(guidance, self.info.guidance_embedding_dim)}

    def control_weights(self, mode: ControlMode, denoiser: GraphSpec | None = None) -> torch.Tensor:
        """Per-residual weights for ``mode`` (CFG-RW's 64 / h_i, guess mode's curve), in the order
        the build's denoiser graph (``denoiser``) takes its residuals."""
        info = self.info
        return block_weights(mode, [info.vae_scale_factor * 2**r.level for r in info.residuals])

    def control_channels(self, spec: GraphSpec) -> int:
        """The channels a control image of ControlNet graph ``spec`` is read with (preprocessing):
        those of its controlnet_cond here; a family that encodes control images, the image's."""
        return int(spec.tensor("controlnet_cond").shape[1])  # type: ignore[arg-type]

    def control_condition(self, images: torch.Tensor, encode: Callable, spec: GraphSpec) -> torch.Tensor:
        """What ControlNet graph ``spec``'s controlnet_cond gets from control images [batch, C, H, W]
        in [0, 1]: the images themselves here. A family whose ControlNets take latents (SD3) encodes
        them with ``encode`` (image in [-1, 1] -> a sample of the VAE's latents, unscaled)."""
        return images

    def check_controlnet_class(self, config: dict[str, Any], what: str) -> None:
        """ModelError unless a ControlNet with ``config`` is of a class this family's builds take."""
        if config.get("_class_name") not in self.controlnet_classes:
            raise ModelError(f"{what}: it is a {config.get('_class_name')} and the base is a {self.title} model")

    def check_controlnet(self, config: dict[str, Any], what: str) -> None:
        """ModelError unless a ControlNet with ``config`` was made for this family (``what`` names
        it and says it does not fit), after its class (check_controlnet_class) and, for a UNet
        family, its residual layout (controlrt.models)."""
        if config.get("addition_embed_type") == "text_time":
            raise ModelError(f"{what}: it is a SDXL ControlNet and the base is a Stable Diffusion 1.x/2.x model")

    # --- prompts and requests -----------------------------------------------------------------

    def conditioning(
        self,
        outputs: list[list[torch.Tensor]],
        request: Any,
        zeros: bool,
        height: int,
        width: int,
        task: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prompt embedding and the added conditions (none here) from each text encoder's
        outputs for [uncond, cond] (or [cond]); ``zeros``: the unconditional branch is zeros
        (prepended here), as for models with force_zeros_for_empty_prompt."""
        import torch

        hidden = torch.cat([o[0] for o in outputs], dim=-1)
        if zeros:
            hidden = torch.cat([torch.zeros_like(hidden), hidden])
        return hidden, {}

    def check_request(self, request: Any) -> None:
        """InputError for settings this family does not take (SDXL's size conditions here)."""
        for label in ("original_size", "crops_coords_top_left", "target_size"):
            if getattr(request, label) is not None:
                raise InputError(f"{label} applies to SDXL models; this build's model is not one")

    def default_scale(self, request: Any) -> float:
        """The controls' scale when none is given, as diffusers' ControlNet pipelines default it:
        1.0 for text-to-image, 0.8 for img2img, 0.5 for inpainting."""
        if request.image is None:
            return 1.0
        return 0.8 if request.mask is None else 0.5

    default_guidance: ClassVar[float] = 7.5  # the guidance scale when none is given, as diffusers' pipelines
    # A union ControlNet's condition types by name (xinsir's ProMax names; numbers are taken as well)
    union_types: ClassVar[dict[str, int]] = UNION_TYPE_NAMES
    negative_prompts: ClassVar[bool] = True  # whether requests may give one (guidance-distilled: with true CFG only)
    # Whether requests may give diffusers' true_cfg_scale (Flux's CFG batch with a negative prompt)
    true_cfg: ClassVar[bool] = False
    # Whether control images' latents are drawn from the request's generator before the noise (Flux's
    # pipeline), rather than from a generator of their own seeded with the request's seed
    controls_draw_first: ClassVar[bool] = False

    def schedule(self, steps: int, latent_hw: tuple[int, int], scheduler_config: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's set_timesteps arguments for ``steps`` steps at a latent size, as the
        family's diffusers pipeline sets them: the step count here."""
        return {"num_inference_steps": steps}

    def default_strength(self, request: Any) -> float:
        """Image-to-image strength when none is given: diffusers' 1.0 for inpainting, 0.8 for img2img."""
        return 1.0 if request.mask is not None else 0.8

    def first_step(self, steps: int, strength: float) -> int:
        """The first of ``steps`` that an image-to-image run at ``strength`` runs, as the family's
        diffusers pipelines cut the schedule: SD's ``steps - min(int(steps * strength), steps)``."""
        return max(steps - min(int(steps * strength), steps), 0)


def check_size_condition(label: str, value: Any) -> None:
    """InputError unless ``value`` is two whole numbers in the range SDXL's size conditions take."""
    low = 0 if label == "crops_coords_top_left" else 1
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= 16384 for v in value)
    ):
        raise InputError(f"{label} {value!r} must be two whole numbers from {low} to 16384")
