"""Stable Diffusion XL: two CLIP text encoders (their penultimate hidden states concatenated, the
second's pooled projection) and "text_time" added conditions (pooled text_embeds and six time ids),
taken by the UNet and by every ControlNet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controlrt.errors import ModelError
from controlrt.families.base import BATCH, Family, check_size_condition
from controlrt.specs import TensorSpec

if TYPE_CHECKING:
    import torch

    from controlrt.families.info import ModelInfo

ADDED_CONDITIONS = ("text_embeds", "time_ids")


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "SDXL"
    lora_pipeline = "StableDiffusionXLPipeline"
    text_layer = "penultimate"
    default_guidance = 5.0  # diffusers' SDXL ControlNet pipelines

    @classmethod
    def claims(cls, info: ModelInfo) -> bool:
        return info.pooled_dim > 0  # the UNet takes the pooled text embedding: "text_time" conditions

    text_components = ("text_encoder", "text_encoder_2")
    tokenizer_components = ("tokenizer", "tokenizer_2")

    @classmethod
    def recognises(cls, configs: dict[str, dict[str, Any]]) -> bool:
        return configs["unet"].get("addition_embed_type") == "text_time"

    @classmethod
    def read_conditions(cls, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Both encoders' widths, the pooled projection's, the number of time ids (from the UNet's
        added embedding), and model_index's and the VAE's SDXL switches."""
        unet = configs["unet"]
        if "text_encoder_2" not in configs:
            raise ModelError(
                "base model: the UNet takes SDXL's added conditions but model_index.json lists no text_encoder_2"
            )
        first, second = configs["text_encoder"], configs["text_encoder_2"]
        pooled = int(second.get("projection_dim") or 0)
        time_dim = int(unet.get("addition_time_embed_dim") or 0)
        added = int(unet.get("projection_class_embeddings_input_dim") or 0)
        if not pooled or not time_dim or (added - pooled) % time_dim or added <= pooled:
            raise ModelError(
                f"base model: the UNet's added embedding ({added}) is not text_encoder_2's projection ({pooled}) "
                f"plus time ids of {time_dim} each"
            )
        index = configs.get("model_index", {})
        return {
            "text_hidden_sizes": (int(first["hidden_size"]), int(second["hidden_size"])),
            "pooled_dim": pooled,
            "time_ids": (added - pooled) // time_dim,
            "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
            "vae_force_upcast": bool(configs["vae"].get("force_upcast", True)),
        }

    def text_encoder_outputs(self, index: int) -> list[TensorSpec]:
        """hidden_states [batch, seq, width], the penultimate layer's, as diffusers takes them, and
        for the second encoder also text_embeds [batch, pooled], its pooled projection."""
        info = self.info
        outputs = [TensorSpec("hidden_states", "float32", (BATCH, info.sequence_length, info.text_hidden_sizes[index]))]
        if index == len(info.text_hidden_sizes) - 1:
            outputs.append(TensorSpec("text_embeds", "float32", (BATCH, info.pooled_dim)))
        return outputs

    def added_conditions(self) -> list[TensorSpec]:
        """text_embeds [batch, pooled] (the second text encoder's projection) and time_ids [batch, 6]
        (original size, crop offsets, target size)."""
        return [
            TensorSpec(ADDED_CONDITIONS[0], "float32", (BATCH, self.info.pooled_dim)),
            TensorSpec(ADDED_CONDITIONS[1], "float32", (BATCH, self.info.time_ids), (0.0, 2048.0)),
        ]

    def check_controlnet(self, config: dict[str, Any], what: str) -> None:
        if config.get("addition_embed_type") != "text_time":
            raise ModelError(f"{what}: it is a SD 1.x/2.x ControlNet and the base is an SDXL model")
        info = self.info
        added = int(config.get("projection_class_embeddings_input_dim") or 0)
        time_dim = int(config.get("addition_time_embed_dim") or 0)
        if added != info.pooled_dim + info.time_ids * time_dim:
            raise ModelError(
                f"{what}: its added embedding takes {added} values, the base gives {info.pooled_dim} pooled "
                f"and {info.time_ids} time ids"
            )

    def conditioning(
        self,
        outputs: list[list[torch.Tensor]],
        request: Any,
        zeros: bool,
        height: int,
        width: int,
        task: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prompt embedding, and the pooled embedding and time ids in the same batch order.

        Time ids are original size, crop offsets and target size, by default (height, width),
        (0, 0), (height, width), the same for both branches. For img2img and inpainting (``task``)
        with a model that requires_aesthetics_score, the target size is the aesthetic score instead
        (negative_aesthetic_score for the unconditional branch, whose crop offsets are (0, 0) in
        img2img and the request's in inpainting).
        """
        import torch

        hidden, _ = super().conditioning(outputs, request, zeros, height, width, task)
        pooled = outputs[-1][1]
        if zeros:
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        original = [*(request.original_size or (height, width))]
        crops = [*(request.crops_coords_top_left or (0, 0))]
        if task != "txt2img" and self.info.requires_aesthetics_score:
            cond = [*original, *crops, float(request.aesthetic_score)]
            uncond = [*original, *(crops if task == "inpaint" else (0, 0)), float(request.negative_aesthetic_score)]
        else:
            cond = uncond = [*original, *crops, *(request.target_size or (height, width))]
        rows = [uncond, cond] if hidden.shape[0] == 2 else [cond]
        ids = torch.tensor(rows, dtype=torch.float32)
        return hidden, {ADDED_CONDITIONS[0]: pooled, ADDED_CONDITIONS[1]: ids}

    def check_request(self, request: Any) -> None:
        for label in ("original_size", "crops_coords_top_left", "target_size"):
            value = getattr(request, label)
            if value is not None:
                check_size_condition(label, value)

    def default_scale(self, request: Any) -> float:
        """As diffusers' SDXL ControlNet pipelines: 1.0 for text-to-image and inpainting, 0.8 for img2img."""
        return 0.8 if request.image is not None and request.mask is None else 1.0

    def default_strength(self, request: Any) -> float:
        """diffusers' SDXL inpainting default 0.9999; 0.8 for img2img."""
        return 0.9999 if request.mask is not None else 0.8
