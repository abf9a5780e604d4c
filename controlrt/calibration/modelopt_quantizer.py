"""NVIDIA ModelOpt int8, as TensorRT's Stable Diffusion demo does it.

SmoothQuant (alpha 0.8) on the Linear layers, per-channel weight quantizers, per-tensor input
quantizers; with ``calibration="percentile"`` the Conv layers' input ranges are the mean over
calibration calls of each call's 99.99th percentile of |x| instead of the plain maximum. The
layers in EXCLUDE_PATTERNS stay unquantized. Export uses the TorchScript exporter (dynamo fails on
ModelOpt's fake-quant ops), which writes its quantizers as QuantizeLinear/DequantizeLinear.

Needs ``pip install nvidia-modelopt`` (runs on the CPU for small models).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlrt.calibration.quantize import EXCLUDE_PATTERNS, Quantizer, excluded
from controlrt.calibration.sensitivity import PERCENTILE, abs_percentile
from controlrt.errors import BackendError, InputError

logger = logging.getLogger(__name__)

SMOOTHQUANT_ALPHA = 0.8


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise BackendError("the modelopt quantizer needs NVIDIA ModelOpt: pip install nvidia-modelopt") from None
    return mtq


def _config(mtq, float_layers: Sequence[str] = ()) -> dict[str, Any]:
    config = copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG)
    config["algorithm"] = {"method": "smoothquant", "alpha": SMOOTHQUANT_ALPHA}
    rules = config["quant_cfg"]
    patterns = [f"*{p}*" for p in EXCLUDE_PATTERNS] + [f"{layer}.*" for layer in float_layers]
    if isinstance(rules, list):  # ModelOpt >= 0.40: a list of rules, later ones win
        rules += [{"quantizer_name": p, "enable": False} for p in patterns]
    else:  # older releases: a dict of wildcard -> settings
        rules.update({p: {"enable": False} for p in patterns})
    return config


class ModelOptQuantizer(Quantizer):
    name = "modelopt"

    def __init__(self, calibration: str = "percentile") -> None:
        if calibration not in ("percentile", "max"):
            raise InputError(f"unknown modelopt calibration {calibration!r}; use percentile or max")
        self.calibration = calibration

    def describe(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "format": "QDQ",
            "algorithm": f"smoothquant alpha {SMOOTHQUANT_ALPHA} on Linear layers",
            "activations": "int8 symmetric per-tensor",
            "weights": "int8 symmetric per-channel",
            "calibration": self.calibration
            + (f" ({PERCENTILE}th percentile of |x| on Conv inputs)" if self.calibration == "percentile" else ""),
            "excluded": list(EXCLUDE_PATTERNS),
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        }

    def quantize(self, spec, fp32_onnx, samples, target, module=None, float_layers=()) -> list[Path]:
        from controlrt.export.onnx_export import ExportSettings, export_onnx

        if module is None:
            raise InputError("the modelopt quantizer needs the graph's torch module (the build's sources)")
        mtq = _modelopt()
        model = module()
        missing = set(float_layers) - {name for name, _ in model.named_modules()}
        if missing:
            raise BackendError(f"the graph has no layer {sorted(missing)[0]}; it cannot be kept float")
        names = spec.input_names

        def forward_loop(m) -> None:
            with torch.no_grad():
                for feeds in samples:
                    m(*[torch.from_numpy(np.asarray(feeds[n])) for n in names])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-layer notes about excluded layers
            model = mtq.quantize(model, _config(mtq, float_layers), forward_loop=forward_loop)
        if self.calibration == "percentile":
            self._percentile_conv_inputs(model, forward_loop)
        return export_onnx(model, spec, target, ExportSettings())

    @staticmethod
    def _percentile_conv_inputs(model: torch.nn.Module, forward_loop) -> None:
        per_call: dict[str, list[float]] = {}
        hooks = []
        for name, layer in model.named_modules():
            quantizer = getattr(layer, "input_quantizer", None)
            if isinstance(layer, torch.nn.Conv2d) and quantizer is not None and quantizer.is_enabled:
                if excluded(name):
                    continue
                values = per_call.setdefault(name, [])
                hooks.append(
                    layer.register_forward_pre_hook(lambda _m, args, v=values: v.append(abs_percentile(args[0])))
                )
        try:
            forward_loop(model)
        finally:
            for hook in hooks:
                hook.remove()
        layers = dict(model.named_modules())
        for name, values in per_call.items():
            if values:
                layers[name].input_quantizer.amax = torch.tensor(float(np.mean(values)))
        logger.info("percentile ranges for %d Conv inputs", len(per_call))
