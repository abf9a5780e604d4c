"""The OpenVINO backend: the build's ONNX graphs compiled for the CPU by OpenVINO.

OpenVINO reads controlrt's graphs as they are (residual inputs, fp16 graphs, int8 Q/DQ graphs, whose
quantized convolutions and matrix multiplies it runs as int8 kernels) and computes in the
inference precision it is given: ``f32``, or ``bf16`` on CPUs with bf16 instructions (AVX-512 BF16,
AMX), where its matrix multiplies run at two to three times the fp32 rate.

Each graph is compiled once per process, with a latency hint and an optional thread count.
Compiled blobs are cached in the build (``BUILD/openvino/<key>/``), under a key made of the graph
files' sha256, the OpenVINO version, the CPU's instruction features and the inference precision: a
blob made for other graphs, another OpenVINO or another CPU is never found, so never used. A build
that cannot be written is compiled without a cache.

On x86 CPUs without VNNI (``controlrt.cpu.int8_sums_saturate``) OpenVINO's int8 kernels add u8 x s8
products in 16-bit sums that saturate (oneDNN's "int8 computation aspects"; NNCF's overflow fix halves
weights for it): there the low-precision transformations are off, so the Q/DQ layers compute in
float, which is the graph's own math, at float speed.

Tensors are exchanged without copies: inputs are shared with OpenVINO from torch's CPU memory, and
outputs are torch tensors allocated here that OpenVINO writes into.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import numpy as np
import torch

from controlrt.cpu import cpu_features, cpu_name, int8_sums_saturate
from controlrt.errors import BackendError, BuildError, InputError
from controlrt.session import Session
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

CACHE_FOLDER = "openvino"
INSTALL_HINT = "pip install openvino"
# OpenVINO's names for the inference precisions controlrt asks for
INFERENCE_PRECISIONS = ("f32", "bf16")


def import_openvino():
    """The openvino module; BackendError saying what to install when it is missing."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendError(f"the openvino backend needs OpenVINO ({exc}): {INSTALL_HINT}") from None
    return openvino


@cache
def core():
    """One OpenVINO Core per process."""
    return import_openvino().Core()


def supports_bf16() -> bool:
    """Whether OpenVINO computes in bf16 on this CPU (AVX-512 BF16 or AMX)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_inference_precision(precision: str) -> None:
    """InputError unless OpenVINO can compute in ``precision`` here."""
    if precision not in INFERENCE_PRECISIONS:
        raise InputError(f"unknown OpenVINO inference precision {precision!r}; choose f32 or bf16")
    if precision == "bf16" and not supports_bf16():
        raise InputError(
            f"this CPU ({cpu_name()}) has no bf16 instructions (AVX-512 BF16 or AMX): "
            "use --precision fp32, fp16 or int8"
        )


def cache_key(files: tuple[tuple[str, str], ...], inference_precision: str, threads: int | None) -> str:
    """The folder a compiled graph is cached under: what the blob depends on, hashed."""
    import openvino

    text = json.dumps(
        {
            "graph": [list(f) for f in files],
            "openvino": openvino.__version__,
            "cpu": cpu_features(),
            "inference_precision": inference_precision,
            "threads": threads,
            "int8_fused": LOW_PRECISION_TRANSFORMS not in compile_config(inference_precision),
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# OpenVINO's runtime layer types that hold a graph's multiply-accumulate work
_COMPUTE_LAYERS = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
_KERNEL_PRECISIONS = ("f32", "bf16", "f16", "u8", "i8")
_TYPES = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
}


LOW_PRECISION_TRANSFORMS = "LP_TRANSFORMS_MODE"  # the CPU plugin's switch for its int8 fusion


@cache
def _int8_unfused() -> dict[str, str]:
    """The setting that keeps Q/DQ layers in float, where this OpenVINO takes it (it is not among
    the CPU plugin's listed properties: tried once on a one-node model); else nothing, said once."""
    import openvino.opset13 as ops

    openvino = import_openvino()
    param = ops.parameter([1], openvino.Type.f32)
    model = openvino.Model([ops.relu(param)], [param])
    try:
        core().compile_model(model, "CPU", {LOW_PRECISION_TRANSFORMS: "NO"})
    except RuntimeError:
        logger.warning(
            "%s has no VNNI and this OpenVINO cannot keep int8 graphs in float: its int8 kernels may "
            "saturate here (check with controlrt parity --backend openvino --precision int8)",
            cpu_name(),
        )
        return {}
    logger.info(
        "%s has no VNNI: OpenVINO's int8 kernels would saturate here, so int8 graphs run dequantized "
        "(their exact math, at float speed)",
        cpu_name(),
    )
    return {LOW_PRECISION_TRANSFORMS: "NO"}


def compile_config(
    inference_precision: str = "f32", threads: int | None = None, cache_dir: Path | None = None
) -> dict[str, str | int]:
    """The CPU plugin's settings the openvino backend compiles every graph with (on a CPU whose int8
    kernels saturate, int8 fusion off)."""
    check_inference_precision(inference_precision)
    config: dict[str, str | int] = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    if int8_sums_saturate():
        config.update(_int8_unfused())
    return config


class OpenVinoSession(Session):
    """Runs one ONNX graph compiled by OpenVINO for the CPU.

    Args:
        path: The ONNX file.
        spec: Its graph spec.
        inference_precision: "f32" or "bf16" (OpenVINO's INFERENCE_PRECISION_HINT).
        threads: Threads for this graph (default: OpenVINO's choice, one per core).
        cache_dir: Where compiled blobs are cached (None: not cached).
    """

    backend = "openvino"

    def __init__(
        self,
        path: str | Path,
        spec: GraphSpec,
        inference_precision: str = "f32",
        threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(spec)
        config = compile_config(inference_precision, threads, cache_dir)
        try:
            compiled = core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with long messages
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise BuildError(f"OpenVINO cannot compile {Path(path).name}: {first}") from None
        # a port may carry several tensor names: the spec's must be among them, in spec order
        inputs = [p.get_names() for p in compiled.inputs]
        outputs = [p.get_names() for p in compiled.outputs]
        matches = len(inputs) == len(spec.input_names) and len(outputs) == len(spec.output_names)
        if not matches or not all(
            name in names
            for name, names in zip([*spec.input_names, *spec.output_names], [*inputs, *outputs], strict=True)
        ):
            raise BuildError(
                f"{path} does not match its spec {spec.name} (graph inputs {inputs}, outputs {outputs}); "
                "re-run controlrt export"
            )
        self.inference_precision = inference_precision
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._output_types = {
            name: _TYPES[p.get_element_type().get_type_name()]
            for name, p in zip(spec.output_names, compiled.outputs, strict=True)
        }

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import openvino

        request = self._request
        shapes = self.spec.output_shapes(self.spec.bind(feeds))
        keep = []  # the shared buffers must outlive the run
        for index, name in enumerate(self.spec.input_names):
            array = np.ascontiguousarray(feeds[name].detach().cpu().numpy())
            keep.append(array)
            request.set_input_tensor(index, openvino.Tensor(array, shared_memory=True))
        outputs = {}
        for index, name in enumerate(self.spec.output_names):
            out = torch.empty(shapes[name], dtype=self._output_types[name])
            outputs[name] = out
            request.set_output_tensor(index, openvino.Tensor(out.numpy(), shared_memory=True))
        try:
            request.infer()
        except Exception as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise BackendError(f"OpenVINO failed on {self.spec.name}: {first}") from None
        return {name: t if t.dtype == torch.float32 else t.float() for name, t in outputs.items()}

    def kernel_precisions(self) -> dict[str, int]:
        """How many of the compiled graph's convolutions and matrix multiplies run in each
        precision (OpenVINO's runtime model): ``{"int8": 92, "bf16": 29}``, say. An int8 Q/DQ
        graph's quantized layers show as int8 (u8 or i8 kernels) where OpenVINO fused them. The
        precision is the kernel's (``primitiveType``, "jit_avx2_I8", "undef_f32"): a layer whose
        weights are stored int8 but computed in float counts as float."""
        counts: dict[str, int] = {}
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) not in _COMPUTE_LAYERS:
                continue
            kernel = info["primitiveType"].astype(str).rsplit("_", 1)[-1].lower()
            precision = kernel if kernel in _KERNEL_PRECISIONS else info["runtimePrecision"].astype(str)
            precision = "int8" if precision in ("u8", "i8") else precision
            counts[precision] = counts.get(precision, 0) + 1
        return counts

    def close(self) -> None:
        self._request = None
        self._compiled = None
