"""Stable Diffusion 3 / 3.5: a joint-attention transformer (SD3Transformer2DModel) with SD3
ControlNets (SD3ControlNetModel), three text encoders and a 16-channel VAE with a shift.

As diffusers' StableDiffusion3ControlNetPipeline computes it:
- text: two CLIP encoders with projection (penultimate hidden states, pooled text_embeds) and T5
  (last hidden states, max_sequence_length tokens). The prompt embedding is the two CLIP states
  concatenated on the width, zero-padded to T5's width, then T5's states after them on the
  sequence; the pooled projection is the two pooled embeddings concatenated.
- control: each control image is VAE-encoded (a sample of the latent distribution, for each CFG
  half, drawn in ControlNet order) and scaled as the latents are, ``(z - shift) * scaling``. A
  ControlNet that force_zeros_for_pooled_projection (InstantX's) takes zeros as its pooled
  projection and latents without the shift, as diffusers feeds it; its graph does both inside.
- residuals: one per ControlNet block, [batch, height/16, width/16, width] (the block's tokens
  laid out on the latent's patch grid), summed over ControlNets and added by the transformer to its
  blocks by diffusers' interval rule. Every ControlNet of a build has the same block count.
- the scheduler is the model's (FlowMatchEulerDiscreteScheduler): no input scaling, no initial
  noise sigma.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from controlrt.control import ControlMode, block_weights
from controlrt.errors import InputError, ModelError
from controlrt.families.base import BATCH, ControlNetSource, Family, ModelSource, ModuleFactory, image_axes
from controlrt.families.info import ModelInfo
from controlrt.specs import BLOCK_RESIDUAL, GraphKind, GraphSpec, TensorSpec

if TYPE_CHECKING:
    import torch

POOLED = "pooled_projections"
TRANSFORMER_CLASS = "SD3Transformer2DModel"
T5_SEQUENCE_LENGTH = 256  # the pipelines' max_sequence_length default


class StableDiffusion3(Family):
    name = "sd3"
    title = "SD3"
    lora_pipeline = "StableDiffusion3Pipeline"
    text_layer = "penultimate"
    default_guidance = 7.0  # diffusers' StableDiffusion3ControlNetPipeline
    denoiser = "transformer"
    denoiser_component = "transformer"
    controlnet_classes = ("SD3ControlNetModel",)
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_components = ("tokenizer", "tokenizer_2", "tokenizer_3")

    @classmethod
    def claims(cls, info: ModelInfo) -> bool:
        return info.patch_size > 0 and info.denoiser_class in ("", TRANSFORMER_CLASS)  # "": builds of 0.17.0

    @classmethod
    def recognises(cls, configs: dict[str, dict[str, Any]]) -> bool:
        return configs.get("transformer", {}).get("_class_name") == TRANSFORMER_CLASS

    @classmethod
    def read_info(cls, configs: dict[str, dict[str, Any]]) -> ModelInfo:
        """The transformer's, VAE's and three text encoders' facts; ModelError if they do not fit."""
        transformer, vae = configs["transformer"], configs["vae"]
        clip = [configs["text_encoder"], configs["text_encoder_2"]]
        t5 = configs["text_encoder_3"]
        if vae.get("_class_name") != "AutoencoderKL":
            raise ModelError(f"base model: the vae is a {vae.get('_class_name')}, expected AutoencoderKL")
        latent = int(vae.get("latent_channels", 16))
        if transformer["in_channels"] != latent or transformer.get("out_channels", latent) != latent:
            raise ModelError(
                f"base model: the transformer takes {transformer['in_channels']} channels, the VAE has {latent}"
            )
        joint = int(transformer["joint_attention_dim"])
        widths = tuple(int(c["hidden_size"]) for c in clip)
        projections = tuple(int(c.get("projection_dim") or 0) for c in clip)
        pooled = sum(projections)
        if pooled != int(transformer["pooled_projection_dim"]):
            raise ModelError(
                f"base model: the CLIP encoders' projections add up to {pooled}, the transformer's pooled "
                f"projection takes {transformer['pooled_projection_dim']}"
            )
        if sum(widths) > joint or int(t5["d_model"]) != joint:
            raise ModelError(
                f"base model: the text widths (CLIP {list(widths)}, T5 {t5['d_model']}) do not fit the "
                f"transformer's joint_attention_dim {joint}"
            )
        tokenizers = [configs["tokenizer"], configs["tokenizer_2"]]
        lengths = [int(t.get("model_max_length", 77)) for t in tokenizers]
        lengths += [int(c["max_position_embeddings"]) for c in clip]
        sample = int(transformer["sample_size"])
        return ModelInfo(
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=latent,
            unet_out_channels=int(transformer.get("out_channels", latent)),
            cross_attention_dim=joint,
            sequence_length=min(lengths),
            vocab_size=min(int(c["vocab_size"]) for c in [*clip, t5]),
            sample_size=(sample, sample),
            scaling_factor=float(vae.get("scaling_factor", 1.5305)),
            image_channels=int(vae["out_channels"]),
            num_train_timesteps=int(configs["scheduler"].get("num_train_timesteps", 1000)),
            residuals=(),
            text_hidden_sizes=widths,
            pooled_dim=pooled,
            vae_class="AutoencoderKL",
            vae_tile_size=int(vae.get("sample_size") or 0),
            denoiser_class=TRANSFORMER_CLASS,
            patch_size=int(transformer["patch_size"]),
            transformer_width=int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]),
            transformer_layers=int(transformer["num_layers"]),
            shift_factor=float(vae.get("shift_factor") or 0.0),
            t5_sequence_length=T5_SEQUENCE_LENGTH,
            t5_width=int(t5["d_model"]),
            text_projection_dims=projections,
        )

    # --- graphs -------------------------------------------------------------------------------

    def graph_specs(self, controlnets: Sequence[ControlNetSource]) -> list[GraphSpec]:
        """Text encoders, ControlNets, the transformer (taking as many residuals as the ControlNets
        have blocks), VAE decoder and encoder."""
        counts = {int(cn.config["num_layers"]) for cn in controlnets}
        if len(counts) > 1:
            raise ModelError(
                f"the ControlNets have {sorted(counts)} blocks; SD3 ControlNets are summed block by block, so "
                "every ControlNet of a build must have the same number"
            )
        blocks = counts.pop() if counts else 0
        return [
            *self.text_encoder_specs(),
            *(
                self.controlnet_spec(k, cn.name, cn.conditioning_channels, blocks, takes_text(cn.config))
                for k, cn in enumerate(controlnets)
            ),
            self.transformer_spec(blocks),
            self.vae_decoder_spec(),
            self.vae_encoder_spec(),
        ]

    def text_encoder_spec(self, index: int = 0) -> GraphSpec:
        """CLIP (index 0, 1) as SDXL's second encoder: input_ids [batch, 77] -> penultimate
        hidden_states and pooled text_embeds; T5 (index 2): input_ids [batch, 256] ->
        last_hidden_state [batch, 256, width]."""
        if index < 2:
            return super().text_encoder_spec(index)
        info = self.info
        inputs = [TensorSpec("input_ids", "int64", (BATCH, info.t5_sequence_length), (0, info.vocab_size))]
        outputs = [TensorSpec("last_hidden_state", "float32", (BATCH, info.t5_sequence_length, info.t5_width))]
        return self._spec("text_encoder_3", GraphKind.TEXT_ENCODER, inputs, outputs, index=index, layer="last")

    def text_encoder_specs(self) -> list[GraphSpec]:
        return [self.text_encoder_spec(k) for k in range(3)]

    def text_encoder_outputs(self, index: int) -> list[TensorSpec]:
        info = self.info
        pooled = info.text_projection_dims[index]
        return [
            TensorSpec("hidden_states", "float32", (BATCH, info.sequence_length, info.text_hidden_sizes[index])),
            TensorSpec("text_embeds", "float32", (BATCH, pooled)),
        ]

    def added_conditions(self) -> list[TensorSpec]:
        """pooled_projections [batch, pooled]: both CLIP encoders' pooled embeddings."""
        return [TensorSpec(POOLED, "float32", (BATCH, self.info.pooled_dim))]

    def denoiser_inputs(self) -> list[TensorSpec]:
        """sample, timestep (the flow-matching scheduler's, sigma x 1000), encoder_hidden_states
        [batch, 77 + 256, width] (CLIP's tokens, then T5's), pooled_projections."""
        info = self.info
        tokens = info.sequence_length + info.t5_sequence_length
        return [
            TensorSpec("sample", "float32", (BATCH, info.latent_channels, *image_axes(info.vae_scale_factor))),
            TensorSpec("timestep", "float32", (BATCH,), (0.0, float(info.num_train_timesteps))),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, tokens, info.cross_attention_dim)),
            *self.added_conditions(),
        ]

    def block_residual_specs(self, blocks: int) -> tuple[TensorSpec, ...]:
        """block_res_0 … : [batch, height/16, width/16, width] each (one token per latent patch)."""
        info = self.info
        grid = image_axes(info.vae_scale_factor * info.patch_size)
        return tuple(
            TensorSpec(f"{BLOCK_RESIDUAL}{i}", "float32", (BATCH, *grid, info.transformer_width)) for i in range(blocks)
        )

    def residual_specs(self) -> tuple[TensorSpec, ...]:
        raise ModelError("an SD3 build's residuals are its ControlNets' blocks: see graph_specs")

    def controlnet_spec(
        self, index: int, source_name: str, conditioning_channels: int, blocks: int = 0, text: bool = True
    ) -> GraphSpec:
        """The denoiser inputs (without encoder_hidden_states for a ControlNet that takes no text:
        SD3.5-Large's) and controlnet_cond [batch, C, height/8, width/8] (the control image's latents,
        scaled as the transformer's) -> one residual per block (``blocks``), unscaled."""
        info = self.info
        cond = TensorSpec(
            "controlnet_cond", "float32", (BATCH, conditioning_channels, *image_axes(info.vae_scale_factor))
        )
        inputs = [t for t in self.denoiser_inputs() if text or t.name != "encoder_hidden_states"]
        return self._spec(
            f"controlnet_{index}",
            GraphKind.CONTROLNET,
            [*inputs, cond],
            self.block_residual_specs(blocks),
            index=index,
            source_name=source_name,
        )

    def transformer_spec(self, blocks: int) -> GraphSpec:
        info = self.info
        out = TensorSpec("noise_pred", "float32", (BATCH, info.unet_out_channels, *image_axes(info.vae_scale_factor)))
        inputs = [*self.denoiser_inputs(), *self.block_residual_specs(blocks)]
        return self._spec(self.denoiser, GraphKind.UNET, inputs, [out])

    def unet_spec(self) -> GraphSpec:
        raise ModelError("an SD3 build's transformer takes its ControlNets' blocks: see graph_specs")

    # --- the torch modules behind the graphs ----------------------------------------------------

    def module_factories(self) -> dict[GraphKind, ModuleFactory]:
        return {**super().module_factories(), GraphKind.UNET: self.transformer_module}

    def controlnet_graph(self, folder: ControlNetSource, meta: bool = False, base: Any = None):
        """An SD3 ControlNet's graph module; one that borrows the transformer's position embedding
        (SD3.5-Large's, use_pos_embed false) gets it from ``base``, as diffusers' pipeline gives it."""
        from controlrt.graphs import SD3ControlNetGraph

        controlnet = folder.load(meta)
        if not folder.config.get("use_pos_embed", True):
            if base is None:
                raise ModelError(
                    f"ControlNet {folder.name} borrows the base transformer's position embedding; export the "
                    "build again with it instead"
                )
            controlnet.pos_embed = self.transformer_pos_embed(base, meta)
        return SD3ControlNetGraph(controlnet, self.info.shift_factor * self.info.scaling_factor)

    def transformer_pos_embed(self, base: ModelSource, meta: bool = False):
        """The base transformer's patch and position embedding (diffusers' PatchEmbed, as
        SD3ControlNetModel._get_pos_embed_from_transformer makes it), its weights read alone."""
        import contextlib

        import torch
        from diffusers.models.embeddings import PatchEmbed

        config = base.configs[self.denoiser_component]
        with torch.device("meta") if meta else contextlib.nullcontext():
            embed = PatchEmbed(
                height=int(config["sample_size"]),
                width=int(config["sample_size"]),
                patch_size=int(config["patch_size"]),
                in_channels=int(config["in_channels"]),
                embed_dim=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                pos_embed_max_size=config.get("pos_embed_max_size"),
            )
        if not meta:
            embed.load_state_dict(base.load_denoiser_weights("pos_embed."), strict=True)
        return embed.eval()

    def transformer_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import SD3TransformerGraph

        return SD3TransformerGraph(base.load_unet(meta))

    def vae_decoder_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import VaeDecoderGraph

        return VaeDecoderGraph(base.load_vae(meta), self.info.scaling_factor, self.info.shift_factor)

    def kept_in_fp32(self) -> dict[str, str]:
        """T5 as well: its activations overflow fp16 (transformers keeps T5's wo layers in fp32)."""
        return {**super().kept_in_fp32(), "text_encoder_3": "T5's activations overflow fp16"}

    # --- guidance and control -----------------------------------------------------------------

    def control_weights(self, mode: ControlMode, denoiser: GraphSpec | None = None) -> torch.Tensor:
        """Uniform: one weight per block residual of the build's transformer (``denoiser``); the
        other modes are refused by check_request."""
        blocks = len(denoiser.residual_inputs) if denoiser is not None else 0
        return block_weights(ControlMode.UNIFORM, [1] * blocks)

    def batches(self, kind: GraphKind) -> tuple[int, ...]:
        """The VAE encoder also encodes control images, at the ControlNets' batch."""
        if kind is GraphKind.VAE_ENCODER:
            return tuple(sorted({*super().batches(kind), *super().batches(GraphKind.CONTROLNET)}))
        return super().batches(kind)

    def check_controlnet(self, config: dict[str, Any], what: str) -> None:
        info = self.info
        if int(config.get("extra_conditioning_channels") or 0):
            raise ModelError(f"{what}: it takes extra conditioning channels (an SD3 inpainting ControlNet): not yet")
        checks = (
            ("in_channels", info.latent_channels),
            ("patch_size", info.patch_size),
            *((("joint_attention_dim", info.cross_attention_dim),) if takes_text(config) else ()),
            ("pooled_projection_dim", info.pooled_dim),
        )
        for key, want in checks:
            if int(config.get(key) or 0) != want:
                raise ModelError(f"{what}: its {key} is {config.get(key)}, the base's {want}")
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        if width != info.transformer_width:
            raise ModelError(f"{what}: its blocks are {width} wide, the transformer's {info.transformer_width}")
        if not 0 < int(config["num_layers"]) <= info.transformer_layers:
            raise ModelError(f"{what}: it has {config['num_layers']} blocks, the transformer {info.transformer_layers}")

    # --- prompts and requests -----------------------------------------------------------------

    def conditioning(self, outputs, request, zeros, height, width, task):
        """The prompt embedding [batch, 77 + 256, width] and pooled_projections, as diffusers'
        SD3 encode_prompt joins the three encoders' outputs."""
        import torch

        clip = torch.cat([outputs[0][0], outputs[1][0]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.info.cross_attention_dim - clip.shape[-1]))
        hidden = torch.cat([clip, outputs[2][0]], dim=-2)
        pooled = torch.cat([outputs[0][1], outputs[1][1]], dim=-1)
        return hidden, {POOLED: pooled}

    # the image-conditioned tasks a diffusers ControlNet pipeline of the family runs ("img2img",
    # "inpaint"); SD3 has none (StableDiffusion3ControlNetInpaintingPipeline takes inpainting ControlNets)
    image_tasks: ClassVar[tuple[str, ...]] = ()

    def check_request(self, request: Any) -> None:
        super().check_request(request)
        task = "inpaint" if request.mask is not None else "img2img"
        if request.image is not None and task not in self.image_tasks:
            what = "inpainting" if task == "inpaint" else "image-to-image"
            raise InputError(f"{what} with {self.title} models is not supported yet")
        if ControlMode.parse(request.control_mode) is not ControlMode.UNIFORM:
            raise InputError(
                f"control mode {request.control_mode} weighs a UNet's residuals by their resolution; the "
                f"blocks of a {self.title} transformer share one: use uniform"
            )

    def default_scale(self, request: Any) -> float:
        return 1.0

    def first_step(self, steps: int, strength: float) -> int:
        """As diffusers' SD3 and Flux img2img pipelines cut the schedule: ``int(steps - steps * strength)``
        (SD's pipelines round the kept count down instead, so the two can keep a different number)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def default_strength(self, request: Any) -> float:
        """0.6 for image to image and inpainting, as FluxControlNetImg2ImgPipeline and
        FluxControlNetInpaintPipeline (and SD3's img2img pipeline) default it."""
        return 0.6

    def control_channels(self, spec: GraphSpec) -> int:
        return self.info.image_channels

    def control_condition(self, images, encode, spec):
        """Control images [batch, C, H, W] in [0, 1] -> their latents, as diffusers' SD3 ControlNet
        pipeline makes them: a sample of each row's encoding from [-1, 1], ``(z - shift) * scaling``."""
        return (encode(images * 2.0 - 1.0) - self.info.shift_factor) * self.info.scaling_factor


def takes_text(config: dict[str, Any]) -> bool:
    """Whether an SD3 ControlNet with ``config`` takes the prompt embedding (a context embedder and
    joint blocks); SD3.5-Large's ControlNets (joint_attention_dim null) take none."""
    return config.get("joint_attention_dim") is not None
