"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states condition the UNet,
no added conditions. Every default of :class:`~controlrt.families.base.Family` is this family's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controlrt.families.base import Family

if TYPE_CHECKING:
    from controlrt.families.info import ModelInfo


class StableDiffusion(Family):
    name = "sd"
    title = "SD 1.x/2.x"
    lora_pipeline = "StableDiffusionPipeline"

    @classmethod
    def claims(cls, info: ModelInfo) -> bool:
        return True  # asked last: every UNet model not claimed by a more specific family

    @classmethod
    def recognises(cls, configs: dict[str, dict[str, Any]]) -> bool:
        return True  # likewise
