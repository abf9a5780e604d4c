"""The quantizer registry: a method's name -> its Quantizer (the heavy ones import on first use)."""

from __future__ import annotations

from controlrt.calibration.quantize import OnnxRuntimeQuantizer, Quantizer
from controlrt.errors import InputError

METHODS = ("onnxruntime", "modelopt", "nncf")


def make_quantizer(method: str, calibration: str | None = None) -> Quantizer:
    """The quantizer of ``method`` with its range ``calibration`` (default: the method's own)."""
    if method == "onnxruntime":
        return OnnxRuntimeQuantizer(calibration or "percentile")
    if method == "modelopt":
        from controlrt.calibration.modelopt_quantizer import ModelOptQuantizer

        return ModelOptQuantizer(calibration or "percentile")
    if method == "nncf":
        from controlrt.calibration.nncf_quantizer import NncfQuantizer

        return NncfQuantizer(calibration or "minmax")
    raise InputError(f"unknown quantizer {method!r}; choose one of {', '.join(METHODS)}")
