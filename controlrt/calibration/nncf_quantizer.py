"""NNCF (OpenVINO's quantizer) on the build's ONNX graphs, from controlrt's own captures.

``nncf.quantize`` on the fp32 ONNX graph, as OpenVINO's Stable Diffusion notebooks quantize their
UNets: the transformer model type (SmoothQuant on the MatMuls, NNCF's patterns that keep softmax
and normalisation paths in float), the CPU target (Q/DQ where OpenVINO's CPU plugin fuses them into
int8 kernels), bias correction off. The performance preset makes every quantizer symmetric int8
(zero point 0), the same Q/DQ form the other quantizers write and TensorRT builds from; the layers
in EXCLUDE_PATTERNS stay unquantized by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlrt.calibration.quantize import EXCLUDE_PATTERNS, Quantizer, excluded_nodes
from controlrt.errors import BackendError, InputError

SUBSET_SIZE = 300  # NNCF's default; the captures hold fewer calls, so every one is used


def _nncf():
    try:
        import nncf
    except ImportError:
        raise BackendError("the nncf quantizer needs NNCF: pip install nncf") from None
    return nncf


class NncfQuantizer(Quantizer):
    name = "nncf"

    def __init__(self, calibration: str = "minmax") -> None:
        if calibration != "minmax":
            raise InputError(f"unknown nncf calibration {calibration!r}; nncf takes minmax (its own range estimator)")
        self.calibration = calibration

    def describe(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "format": "QDQ",
            "algorithm": "nncf.quantize, model type transformer (SmoothQuant on MatMuls), target CPU, "
            "bias correction off",
            "activations": "int8 symmetric per-tensor",
            "weights": "int8 symmetric per-channel",
            "calibration": "nncf's min/max range estimators",
            "excluded": list(EXCLUDE_PATTERNS),
        }

    def quantize(self, spec, fp32_onnx, samples, target, module=None, float_layers=()) -> list[Path]:
        import onnx

        nncf = _nncf()
        from nncf.onnx.quantization.backend_parameters import BackendParameters
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        model = onnx.load(str(fp32_onnx), load_external_data=False)
        large = fp32_onnx.with_name(fp32_onnx.name + ".data").exists()
        skip = excluded_nodes(model, float_layers)
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(samples)),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            target_device=nncf.TargetDevice.CPU,
            subset_size=min(SUBSET_SIZE, len(samples)),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(names=skip, validate=False),
            advanced_parameters=AdvancedQuantizationParameters(
                disable_bias_correction=True,
                backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(fp32_onnx.parent.resolve())},
            ),
        )
        if large:
            data = target.name + ".data"
            onnx.save(quantized, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
            return [target, target.with_name(data)]
        onnx.save(quantized, str(target))
        return [target]
