"""Model families: each kind of base model declares, in one file, what the toolchain needs of it.

A family (:class:`~controlrt.families.base.Family`) declares its graphs (their specs, and which
torch module of :mod:`controlrt.graphs` computes each, around which loaded model), how prompts
become text conditioning, how control residuals are named, shaped and weighted, its request
extras (SDXL's time ids, an LCM-distilled UNet's guidance embedding) and which LoRA format it
reads. Export, the engines, the runtime, parity, bench and serve ask the family instead of testing
what the model is.

Adding a family is adding one file here and its entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from controlrt.families.base import ControlNetSource, Family
from controlrt.families.flux import Flux
from controlrt.families.sd import StableDiffusion
from controlrt.families.sd3 import StableDiffusion3
from controlrt.families.sdxl import StableDiffusionXL

if TYPE_CHECKING:
    from torch import nn

    from controlrt.families.base import ModelSource
    from controlrt.families.info import ModelInfo
    from controlrt.specs import GraphSpec

# Asked in order; the first that claims a model's description is its family.
FAMILIES: tuple[type[Family], ...] = (Flux, StableDiffusion3, StableDiffusionXL, StableDiffusion)


def family_of(info: ModelInfo) -> Family:
    """The family of the model ``info`` describes."""
    for family in FAMILIES:
        if family.claims(info):
            return family(info)
    raise AssertionError("StableDiffusion claims every UNet model")  # pragma: no cover


def family_for(configs: dict[str, dict[str, Any]]) -> type[Family]:
    """The family of a model folder with these component configs (before its ModelInfo exists)."""
    for family in FAMILIES:
        if family.recognises(configs):
            return family
    raise AssertionError("StableDiffusion recognises every UNet model")  # pragma: no cover


def load_graph_module(
    spec: GraphSpec, base: ModelSource, controlnets: Sequence[ControlNetSource], meta: bool = False
) -> nn.Module:
    """The torch module that computes graph ``spec`` of a build of ``base`` and ``controlnets``
    (BaseModel, ControlNetModelFolder), as the base's family declares it; with ``meta`` its
    architecture alone, on the meta device (no weights: for counting its work)."""
    return family_of(base.info()).graph_module(spec, base, controlnets, meta)


__all__ = [
    "FAMILIES",
    "Family",
    "Flux",
    "StableDiffusion",
    "StableDiffusion3",
    "StableDiffusionXL",
    "family_for",
    "family_of",
    "load_graph_module",
]
