"""Flux (FLUX.1): a double- and single-stream transformer (FluxTransformer2DModel) with Flux
ControlNets (FluxControlNetModel), CLIP and T5 text encoders and SD3's kind of VAE.

As diffusers' FluxControlNetPipeline computes it:
- text: CLIP's pooled output is the pooled projection; T5's last hidden states (512 tokens, the
  pipeline's max_sequence_length) the prompt embedding. No negative prompt, no classifier-free
  batch: FLUX.1-dev takes the guidance scale as an input (its guidance embedding); a transformer
  without one (FLUX.1-schnell) takes no guidance at all.
- latents: drawn [1, 16, h, w] and packed 2 x 2 into tokens; controlrt's graphs take them unpacked
  and pack (and make the rotary position ids) inside, so the loop, the scheduler step and the VAE
  see latents as for every other family.
- control: each control image is VAE-encoded (a sample drawn from the request's generator, in
  ControlNet order, before the noise) and scaled ``(z - shift) * scaling``, as SD3's; an XLabs-style
  ControlNet (an input hint block, ``conditioning_embedding_channels``) takes the image itself in
  [-1, 1] and embeds it in its graph.
- residuals: one per ControlNet double-stream block (``block_res_i``), then one per single-stream
  block (``single_block_res_i``), [batch, height/16, width/16, width] each, summed over ControlNets
  and added by the transformer to its blocks by diffusers' interval rule (block i takes residual
  i // ceil(N / n)), or, for XLabs-style ControlNets, in turn (block i takes residual i mod n:
  diffusers' ``controlnet_blocks_repeat``).
- timesteps: sigmas linspace(1, 1/steps) shifted by mu, the image token count's linear shift
  (the scheduler's use_dynamic_shifting), as the pipeline sets them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from controlrt.errors import InputError, ModelError
from controlrt.families.base import BATCH, ControlNetSource, Family, ModuleFactory, image_axes
from controlrt.families.info import ModelInfo
from controlrt.families.sd3 import POOLED, StableDiffusion3
from controlrt.specs import BLOCK_RESIDUAL, SINGLE_BLOCK_RESIDUAL, GraphKind, GraphSpec, TensorSpec

TRANSFORMER_CLASS = "FluxTransformer2DModel"
T5_SEQUENCE_LENGTH = 512  # FluxControlNetPipeline's max_sequence_length default
GUIDANCE = "guidance"
CONTROL_MODE = "control_mode"  # a Flux ControlNet-Union's input
CLIP_SEQUENCE_LENGTH = 77  # the pipeline's tokenizer_max_length without a tokenizer config


class Flux(StableDiffusion3):
    """Shares SD3's VAE (shift and scaling), control latents, uniform-only control and T5 in fp32."""

    name = "flux"
    title = "Flux"
    lora_pipeline = "FluxPipeline"
    text_layer = "pooled"
    default_guidance = 7.0  # diffusers' FluxControlNetPipeline
    controlnet_classes = ("FluxControlNetModel",)
    text_components = ("text_encoder", "text_encoder_2")
    tokenizer_components = ("tokenizer", "tokenizer_2")
    # InstantX's and Shakker-Labs' Flux ControlNet-Union modes
    union_types: ClassVar[dict[str, int]] = dict(canny=0, tile=1, depth=2, blur=3, pose=4, openpose=4, gray=5, lq=6)
    negative_prompts = False  # only with true CFG
    true_cfg = True
    controls_draw_first = True  # the pipeline samples control latents from the request's generator
    image_tasks = ("img2img", "inpaint")  # FluxControlNetImg2ImgPipeline, FluxControlNetInpaintPipeline

    @classmethod
    def claims(cls, info: ModelInfo) -> bool:
        return info.denoiser_class == TRANSFORMER_CLASS

    @classmethod
    def recognises(cls, configs: dict[str, dict[str, Any]]) -> bool:
        return configs.get("transformer", {}).get("_class_name") == TRANSFORMER_CLASS

    @classmethod
    def read_info(cls, configs: dict[str, dict[str, Any]]) -> ModelInfo:
        """The transformer's, VAE's and text encoders' facts; ModelError if they do not fit."""
        transformer, vae = configs["transformer"], configs["vae"]
        clip, t5 = configs["text_encoder"], configs["text_encoder_2"]
        if vae.get("_class_name") != "AutoencoderKL":
            raise ModelError(f"base model: the vae is a {vae.get('_class_name')}, expected AutoencoderKL")
        latent = int(vae.get("latent_channels", 16))
        packed = int(transformer["in_channels"])
        if packed != 4 * latent or int(transformer.get("out_channels") or packed) != packed:
            raise ModelError(
                f"base model: the transformer takes {packed} channels; the VAE's {latent}, packed 2 x 2, "
                f"make {4 * latent}"
            )
        if int(transformer.get("patch_size", 1)) != 1:
            raise ModelError(f"base model: the transformer's patch_size is {transformer['patch_size']}, Flux's is 1")
        joint = int(transformer["joint_attention_dim"])
        if int(t5["d_model"]) != joint:
            raise ModelError(f"base model: T5 is {t5['d_model']} wide, the transformer's joint_attention_dim {joint}")
        pooled = int(clip["hidden_size"])
        if pooled != int(transformer["pooled_projection_dim"]):
            raise ModelError(
                f"base model: CLIP's pooled output is {pooled} wide, the transformer's pooled projection takes "
                f"{transformer['pooled_projection_dim']}"
            )
        length = int(configs["tokenizer"].get("model_max_length") or CLIP_SEQUENCE_LENGTH)
        length = min(length, int(clip["max_position_embeddings"]))
        return ModelInfo(
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=latent,
            unet_out_channels=latent,
            cross_attention_dim=joint,
            sequence_length=length,
            vocab_size=min(int(clip["vocab_size"]), int(t5["vocab_size"])),
            sample_size=(128, 128),  # the pipeline's default_sample_size: 1024 px
            scaling_factor=float(vae.get("scaling_factor", 0.3611)),
            image_channels=int(vae["out_channels"]),
            num_train_timesteps=int(configs["scheduler"].get("num_train_timesteps", 1000)),
            residuals=(),
            text_hidden_sizes=(pooled,),
            pooled_dim=pooled,
            vae_class="AutoencoderKL",
            vae_tile_size=int(vae.get("sample_size") or 0),
            denoiser_class=TRANSFORMER_CLASS,
            patch_size=2,  # the 2 x 2 packing: one token per 16 x 16 pixels
            transformer_width=int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]),
            transformer_layers=int(transformer["num_layers"]),
            transformer_single_layers=int(transformer["num_single_layers"]),
            guidance_input=bool(transformer.get("guidance_embeds")),
            shift_factor=float(vae.get("shift_factor") or 0.0),
            t5_sequence_length=T5_SEQUENCE_LENGTH,
            t5_width=joint,
        )

    # --- graphs -------------------------------------------------------------------------------

    def graph_specs(self, controlnets: Sequence[ControlNetSource]) -> list[GraphSpec]:
        """Text encoders, ControlNets, the transformer (taking as many residuals as the ControlNets
        have blocks of each kind), VAE decoder and encoder."""
        hinted = {takes_pixels(cn.config) for cn in controlnets}
        if len(hinted) > 1:
            raise ModelError(
                "some ControlNets take control images through an input hint block (XLabs-style) and some as VAE "
                "latents (InstantX-style); diffusers runs a multi-ControlNet as its first ControlNet's kind, so a "
                "build's must be of one kind"
            )
        counts = {(int(cn.config["num_layers"]), int(cn.config["num_single_layers"])) for cn in controlnets}
        if len(counts) > 1:
            raise ModelError(
                f"the ControlNets have {sorted(counts)} (double, single) blocks; Flux ControlNets are summed block "
                "by block, so every ControlNet of a build must have the same numbers"
            )
        guided = {bool(cn.config.get("guidance_embeds")) for cn in controlnets}
        if len(guided) > 1:
            raise ModelError(
                "some ControlNets take the guidance scale and some do not; diffusers gives every ControlNet of "
                "a multi-ControlNet what the first takes, so a build's must agree"
            )
        doubles, singles = counts.pop() if counts else (0, 0)
        return [
            *self.text_encoder_specs(),
            *(self.flux_controlnet_spec(k, cn, doubles, singles) for k, cn in enumerate(controlnets)),
            self.flux_transformer_spec(doubles, singles, repeat=hinted == {True}),
            self.vae_decoder_spec(),
            self.vae_encoder_spec(),
        ]

    def text_encoder_specs(self) -> list[GraphSpec]:
        return [self.text_encoder_spec(k) for k in range(2)]

    def text_encoder_spec(self, index: int = 0) -> GraphSpec:
        """CLIP (index 0): input_ids [batch, 77] -> pooler_output [batch, width]; T5 (index 1):
        input_ids [batch, 512] -> last_hidden_state [batch, 512, width]."""
        info = self.info
        if index == 0:
            inputs = [TensorSpec("input_ids", "int64", (BATCH, info.sequence_length), (0, info.vocab_size))]
            outputs = [TensorSpec("pooler_output", "float32", (BATCH, info.pooled_dim))]
            return self._spec("text_encoder", GraphKind.TEXT_ENCODER, inputs, outputs, index=0, layer="pooled")
        inputs = [TensorSpec("input_ids", "int64", (BATCH, info.t5_sequence_length), (0, info.vocab_size))]
        outputs = [TensorSpec("last_hidden_state", "float32", (BATCH, info.t5_sequence_length, info.t5_width))]
        return self._spec("text_encoder_2", GraphKind.TEXT_ENCODER, inputs, outputs, index=1, layer="last")

    def added_conditions(self) -> list[TensorSpec]:
        """pooled_projections [batch, width] (CLIP's pooled output) and, for a transformer with a
        guidance embedding, guidance [batch] (the scale itself)."""
        pooled = [TensorSpec(POOLED, "float32", (BATCH, self.info.pooled_dim))]
        return pooled + ([self._guidance_spec()] if self.info.guidance_input else [])

    def _guidance_spec(self) -> TensorSpec:
        return TensorSpec(GUIDANCE, "float32", (BATCH,), (0.0, 20.0))

    def denoiser_inputs(self) -> list[TensorSpec]:
        """sample [batch, 16, height/8, width/8] (unpacked), timestep (sigma x 1000),
        encoder_hidden_states [batch, 512, width] (T5's), then the added conditions."""
        info = self.info
        return [
            TensorSpec("sample", "float32", (BATCH, info.latent_channels, *image_axes(info.vae_scale_factor))),
            TensorSpec("timestep", "float32", (BATCH,), (0.0, float(info.num_train_timesteps))),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, info.t5_sequence_length, info.cross_attention_dim)),
            *self.added_conditions(),
        ]

    def flux_residual_specs(self, doubles: int, singles: int) -> tuple[TensorSpec, ...]:
        """block_res_0 … then single_block_res_0 …: [batch, height/16, width/16, width] each."""
        info = self.info
        grid = image_axes(info.vae_scale_factor * info.patch_size)
        names = [f"{BLOCK_RESIDUAL}{i}" for i in range(doubles)]
        names += [f"{SINGLE_BLOCK_RESIDUAL}{i}" for i in range(singles)]
        return tuple(TensorSpec(n, "float32", (BATCH, *grid, info.transformer_width)) for n in names)

    def flux_controlnet_spec(self, index: int, controlnet: ControlNetSource, doubles: int, singles: int) -> GraphSpec:
        """The denoiser inputs (guidance only if the ControlNet has a guidance embedding),
        controlnet_cond [batch, 16, height/8, width/8] (the control image's latents, scaled as the
        transformer's; for an XLabs-style ControlNet the image [batch, 3, height, width] in [-1, 1])
        and, for a ControlNet-Union (num_mode), control_mode int64 [batch, 1] (the image's type: one
        pass per image, summed as diffusers' multi-ControlNet does) -> its residuals, unscaled."""
        info = self.info
        inputs = [t for t in self.denoiser_inputs() if t.name != GUIDANCE]
        if controlnet.config.get("guidance_embeds"):
            inputs.append(self._guidance_spec())
        channels = controlnet.conditioning_channels
        if takes_pixels(controlnet.config):  # the image itself, in [-1, 1]
            inputs.append(TensorSpec("controlnet_cond", "float32", (BATCH, channels, *image_axes(1)), (-1.0, 1.0)))
        else:
            latents = (BATCH, channels, *image_axes(info.vae_scale_factor))
            inputs.append(TensorSpec("controlnet_cond", "float32", latents))
        modes = int(controlnet.config.get("num_mode") or 0)  # a ControlNet-Union: each image's type
        if modes:
            inputs.append(TensorSpec(CONTROL_MODE, "int64", (BATCH, 1), (0, modes)))
        return self._spec(
            f"controlnet_{index}",
            GraphKind.CONTROLNET,
            inputs,
            self.flux_residual_specs(doubles, singles),
            index=index,
            source_name=controlnet.name,
            control_types=modes,
        )

    def flux_transformer_spec(self, doubles: int, singles: int, repeat: bool = False) -> GraphSpec:
        """The transformer: the denoiser inputs and the residuals -> noise_pred (unpacked); with
        ``repeat`` (XLabs-style ControlNets) it adds them to its blocks in turn."""
        info = self.info
        out = TensorSpec("noise_pred", "float32", (BATCH, info.unet_out_channels, *image_axes(info.vae_scale_factor)))
        inputs = [*self.denoiser_inputs(), *self.flux_residual_specs(doubles, singles)]
        return self._spec(self.denoiser, GraphKind.UNET, inputs, [out], blocks_repeat=repeat)

    def controlnet_spec(self, index: int, source_name: str, conditioning_channels: int, blocks: int = 0) -> GraphSpec:
        raise ModelError("a Flux build's ControlNet graphs depend on their configs: see graph_specs")

    def transformer_spec(self, blocks: int) -> GraphSpec:
        raise ModelError("a Flux build's transformer takes its ControlNets' blocks: see graph_specs")

    # --- the torch modules behind the graphs ----------------------------------------------------

    def module_factories(self) -> dict[GraphKind, ModuleFactory]:
        return {**super().module_factories(), GraphKind.UNET: self.transformer_module}

    def controlnet_graph(self, folder: ControlNetSource, meta: bool = False, base: Any = None):
        from controlrt.graphs import FluxControlNetGraph

        return FluxControlNetGraph(folder.load(meta))

    def transformer_module(self, spec, base, controlnets, meta):
        from controlrt.graphs import FluxTransformerGraph

        doubles = sum(1 for t in spec.residual_inputs if t.name.startswith(BLOCK_RESIDUAL))
        return FluxTransformerGraph(base.load_unet(meta), doubles, repeat=spec.blocks_repeat)

    def kept_in_fp32(self) -> dict[str, str]:
        return {**Family.kept_in_fp32(self), "text_encoder_2": "T5's activations overflow fp16"}

    def gate(self, precision, quantizer=None):
        """fp16: the transformer is held to 5e-2 / 8e-2 (the UNets' 8e-3 / 1.2e-2). Its guidance
        enters as ``guidance x 1000`` in the graph's precision, as in diffusers' own fp16 and bf16
        runs (19000 is 16 apart in fp16), so the guidance embedding's fast sines are noise there:
        measured on the small Flux set (tests/runtime/test_flux.py's build), fp16 transformer rel L2 on
        seeded inputs 0.005 at guidance 0, 0.0085 at 3.5, 0.03 at 19; on parity's held-out inputs
        (guidance 7) 0.022-0.028, max_abs 0.05-0.076; the image 56.4 dB."""
        from dataclasses import replace

        from controlrt.compare import Tolerance
        from controlrt.precision import Precision

        gate = super().gate(precision, quantizer)
        if Precision.parse(precision) is not Precision.FP16:
            return gate
        tolerances = {**gate.tolerances, GraphKind.UNET: Tolerance(rel_l2=5e-2, max_rel=8e-2)}
        return replace(gate, tolerances=tolerances, measured=gate.measured + "; Flux's transformer: see Flux.gate")

    # --- guidance and control -----------------------------------------------------------------

    def branches(self, guidance: float, mode="uniform", true_cfg: float = 1.0):
        """No classifier-free batch for the guidance scale: it is an input (or, without a guidance
        embedding, not taken), as in diffusers' Flux pipelines. True CFG (``true_cfg`` above 1, with a
        negative prompt) runs the transformer on [negative, prompt] and the ControlNets once, on the
        prompt, both halves taking their residuals, as FluxControlNetPipeline does."""
        from controlrt.control import Branches

        if true_cfg > 1.0:
            return Branches(cfg=True, shared_control=True)
        return Branches.of(guidance, mode, cfg_batch=False)

    def cfg_scale(self, guidance: float, true_cfg: float = 1.0) -> float:
        return true_cfg

    def batches(self, kind: GraphKind) -> tuple[int, ...]:
        """One image; the text encoders and the transformer take two with true CFG."""
        return (1, 2) if kind in (GraphKind.TEXT_ENCODER, GraphKind.UNET) else (1,)

    def schedule(self, steps: int, latent_hw: tuple[int, int], scheduler_config: dict[str, Any]) -> dict[str, Any]:
        """FluxControlNetPipeline's timesteps: sigmas linspace(1, 1/steps, steps) and, for a
        scheduler with use_dynamic_shifting, mu from the image token count (calculate_shift)."""
        import numpy as np

        settings: dict[str, Any] = {"sigmas": np.linspace(1.0, 1 / steps, steps)}
        if scheduler_config.get("use_dynamic_shifting"):
            tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            base_len = scheduler_config.get("base_image_seq_len", 256)
            max_len = scheduler_config.get("max_image_seq_len", 4096)
            base_shift = scheduler_config.get("base_shift", 0.5)
            max_shift = scheduler_config.get("max_shift", 1.15)
            slope = (max_shift - base_shift) / (max_len - base_len)
            settings["mu"] = tokens * slope + (base_shift - slope * base_len)
        return settings

    def control_channels(self, spec: GraphSpec) -> int:
        return int(spec.tensor("controlnet_cond").shape[1]) if pixels_graph(spec) else self.info.image_channels  # type: ignore[arg-type]

    def control_condition(self, images, encode, spec):
        """SD3's latents, or for an XLabs-style ControlNet's graph the images in [-1, 1], as diffusers'
        FluxControlNetPipeline gives its input hint block."""
        return images * 2.0 - 1.0 if pixels_graph(spec) else super().control_condition(images, encode, spec)

    def check_controlnet(self, config: dict[str, Any], what: str) -> None:
        info = self.info
        if takes_pixels(config):
            hint, patch = int(config["conditioning_embedding_channels"]), int(config.get("patch_size") or 1)
            if hint * patch * patch != 4 * info.latent_channels:
                raise ModelError(
                    f"{what}: its input hint block makes {hint} channels, packed {patch} x {patch} into "
                    f"{hint * patch * patch}; the transformer's tokens have {4 * info.latent_channels}"
                )
        checks = (
            ("in_channels", 4 * info.latent_channels),
            ("joint_attention_dim", info.cross_attention_dim),
            ("pooled_projection_dim", info.pooled_dim),
        )
        for key, want in checks:
            if int(config.get(key) or 0) != want:
                raise ModelError(f"{what}: its {key} is {config.get(key)}, the base's {want}")
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        if width != info.transformer_width:
            raise ModelError(f"{what}: its blocks are {width} wide, the transformer's {info.transformer_width}")
        limits = (("num_layers", info.transformer_layers), ("num_single_layers", info.transformer_single_layers))
        for key, most in limits:
            if not 0 <= int(config.get(key) or 0) <= most:
                raise ModelError(f"{what}: its {key} is {config.get(key)}, the transformer has {most}")

    # --- prompts and requests -----------------------------------------------------------------

    def conditioning(self, outputs, request, zeros, height, width, task):
        """T5's hidden states as the prompt embedding; CLIP's pooled output and, for a transformer
        with a guidance embedding, the guidance scale as added conditions."""
        import torch

        added = {POOLED: outputs[0][0]}
        if self.info.guidance_input:
            guidance = self.default_guidance if request.guidance is None else float(request.guidance)
            added[GUIDANCE] = torch.full((outputs[1][0].shape[0],), guidance, dtype=torch.float32)
        return outputs[1][0], added

    def check_request(self, request: Any) -> None:
        super().check_request(request)
        true_cfg = request.true_cfg > 1.0
        if request.negative_prompt is not None and not true_cfg:
            raise InputError(
                "a Flux model's guidance is distilled: a negative prompt takes effect with true CFG only "
                "(--true-cfg above 1, diffusers' true_cfg_scale)"
            )
        if true_cfg and request.negative_prompt is None:
            raise InputError("true CFG needs a negative prompt (--negative-prompt), as diffusers' true_cfg_scale")
        if request.scheduler is not None:
            raise InputError("Flux builds run the model's own flow-matching scheduler; drop --scheduler")


def takes_pixels(config: dict[str, Any]) -> bool:
    """Whether a Flux ControlNet with ``config`` embeds control images itself (an input hint block,
    XLabs-style) instead of taking their VAE latents (InstantX-style)."""
    return config.get("conditioning_embedding_channels") is not None


def pixels_graph(spec: GraphSpec) -> bool:
    """Whether ControlNet graph ``spec`` takes control images as pixels (its controlnet_cond at the
    image's own size) rather than latents."""
    return spec.tensor("controlnet_cond").shape[-1].divisor == 1  # type: ignore[union-attr]
