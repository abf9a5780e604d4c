"""Numeric precision of a build's graphs: one enum, and which variant each graph uses.

fp16 graphs exist for every graph; int8 (explicit QuantizeLinear/DequantizeLinear) graphs for the
UNet and the ControlNets only. In an int8 pipeline the text encoder and VAE decoder run in fp16
where the build has it, else fp32. bf16 has no graphs of its own: the fp32 graphs are computed in
bf16 by the backend (OpenVINO's inference precision, or the torch modules in bf16).
"""

from __future__ import annotations

from enum import StrEnum

from controlrt.errors import InputError
from controlrt.specs import GraphKind


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @classmethod
    def parse(cls, value: str | Precision, also: tuple[str, ...] = ()) -> Precision:
        """The precision ``value`` names; InputError listing the choices (and ``also``, the other
        words the caller takes, such as "auto") when it names none."""
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join([*also, *(p.value for p in cls)])
            raise InputError(f"unknown precision {value!r}; choose one of {choices}") from None

    @property
    def command(self) -> str:
        """The command that adds this precision to a build."""
        return {
            Precision.FP32: "controlrt export",
            Precision.FP16: "controlrt convert BUILD --precision fp16",
            Precision.BF16: "controlrt export (bf16 computes the fp32 graphs in bf16)",
            Precision.INT8: "controlrt calibrate BUILD",
        }[self]

    @property
    def graphs(self) -> Precision:
        """The graph variants this precision runs: bf16 computes the fp32 graphs."""
        return Precision.FP32 if self is Precision.BF16 else self


INT8_KINDS = frozenset({GraphKind.UNET, GraphKind.CONTROLNET})
# Quantized only when asked (controlrt calibrate --vae); otherwise fp16 (or fp32) in an int8 pipeline.
OPTIONAL_INT8_KINDS = frozenset({GraphKind.VAE_DECODER})


def variant_for(kind: GraphKind, precision: Precision, available: set[str]) -> Precision:
    """The variant a graph of ``kind`` runs in a ``precision`` pipeline, given those it has."""
    if precision is Precision.INT8 and kind not in INT8_KINDS:
        if kind in OPTIONAL_INT8_KINDS and Precision.INT8 in available:
            return Precision.INT8
        return Precision.FP16 if Precision.FP16 in available else Precision.FP32
    return precision.graphs
