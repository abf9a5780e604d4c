"""int8 quantizers behind one interface; all write explicit, symmetric int8 Q/DQ graphs.

TensorRT 10/11 builds int8 from QuantizeLinear/DequantizeLinear pairs in the ONNX file (its
implicit calibrators are gone), so every quantizer produces symmetric int8 Q/DQ (zero point 0),
per-channel for weights, per-tensor for activations. Layers that are sensitive and cheap stay
unquantized (EXCLUDE_PATTERNS): the timestep embedding and its per-block projections, the first
and last convolutions, shortcut convolutions and the attention blocks' output projections.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controlrt.errors import BackendError, InputError
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

EXCLUDE_PATTERNS = (
    "time_proj",
    "time_embedding",
    "time_emb_proj",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "proj_out",
)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def excluded(name: str, float_layers: Sequence[str] = ()) -> bool:
    """Whether a layer (module path or ONNX node name) stays unquantized.

    ``float_layers`` are module paths (``unet.up_blocks.3.resnets.2.conv1``), matched against module
    paths and against the scope of ONNX node names (``/unet/up_blocks.3/resnets.2/conv1/Conv``), which
    lack the graph wrapper's attribute where the wrapper calls a method of it (the VAE's
    ``/post_quant_conv/Conv`` for ``vae.post_quant_conv``).
    """
    if any(p in name for p in EXCLUDE_PATTERNS):
        return True
    path = name.strip("/").replace("/", ".") + "."
    return any(path.startswith(layer + ".") or path.startswith(layer.partition(".")[2] + ".") for layer in float_layers)


def excluded_nodes(model, float_layers: Sequence[str]) -> list[str]:
    """Names of the ONNX graph's Conv/MatMul/Gemm nodes that stay float.

    Raises BackendError if a layer of ``float_layers`` names no node (the graph's node names do
    not carry module scopes, so it could not be kept float).
    """
    nodes = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    for layer in float_layers:
        if not any(excluded(n, [layer]) and not excluded(n) for n in nodes):
            raise BackendError(f"no node of the ONNX graph belongs to layer {layer}; it cannot be kept float")
    return [n for n in nodes if excluded(n, float_layers)]


class Quantizer(ABC):
    """Turns an fp32 graph plus captured inputs into an int8 Q/DQ graph."""

    name = ""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The settings, as recorded in the manifest."""

    @abstractmethod
    def quantize(
        self,
        spec: GraphSpec,
        fp32_onnx: Path,
        samples: Sequence[dict[str, np.ndarray]],
        target: Path,
        module=None,
        float_layers: Sequence[str] = (),
    ) -> list[Path]:
        """Write the int8 graph to ``target``; return the files written, the .onnx first.

        Args:
            spec: The graph's spec.
            fp32_onnx: The build's fp32 graph.
            samples: Captured feeds, one dict per call.
            target: Where to write the int8 .onnx.
            module: A callable returning the graph's torch module (for quantizers that need it).
            float_layers: Module paths left unquantized besides EXCLUDE_PATTERNS (sensitivity.py).
        """


class OnnxRuntimeQuantizer(Quantizer):
    """onnxruntime's quantize_static: QDQ, symmetric QInt8, per-channel weights."""

    name = "onnxruntime"

    def __init__(self, calibration: str = "percentile", percentile: float = 99.999) -> None:
        if calibration not in ("entropy", "percentile", "minmax"):
            raise InputError(f"unknown onnxruntime calibration {calibration!r}; use entropy, percentile or minmax")
        self.calibration = calibration
        self.percentile = percentile

    def describe(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "format": "QDQ",
            "activations": "int8 symmetric per-tensor",
            "weights": "int8 symmetric per-channel",
            "calibration": self.calibration,
            "percentile": self.percentile if self.calibration == "percentile" else None,
            "ops": list(QUANTIZED_OPS),
            "excluded": list(EXCLUDE_PATTERNS),
        }

    def quantize(self, spec, fp32_onnx, samples, target, module=None, float_layers=()) -> list[Path]:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            """Serves the samples in ranges, so the calibrator holds one call's activations at a time."""

            def __init__(self) -> None:
                self.set_range(0, len(samples))

            def __len__(self) -> int:
                return len(samples)

            def set_range(self, start_index: int, end_index: int) -> None:
                self._it: Iterator = iter(samples[start_index:end_index])

            def get_next(self):
                return next(self._it, None)

        model = onnx.load(str(fp32_onnx), load_external_data=False)
        large = fp32_onnx.with_name(fp32_onnx.name + ".data").exists()
        skip = excluded_nodes(model, float_layers)
        method = {
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
            "minmax": CalibrationMethod.MinMax,
        }[self.calibration]
        quantize_static(
            str(fp32_onnx),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=method,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=skip,
            use_external_data_format=large,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,  # TensorRT takes int8 Q/DQ only; biases stay fp32
                "CalibPercentile": self.percentile,
                "CalibTensorRangeSymmetric": True,
                "CalibStridedMinMax": 1,  # one call at a time: bounded memory, any range method
            },
            calibration_providers=["CPUExecutionProvider"],
        )
        return [target, *sorted(p for p in target.parent.glob(target.name + "*") if p != target)]
