"""The onnxruntime backend: CPU everywhere, CUDA or TensorRT providers where onnxruntime-gpu is."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from controlrt.cpu import cpu_name, int8_sums_saturate
from controlrt.errors import BackendError, BuildError
from controlrt.session import Session
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Provider names from aliases (cpu, cuda, tensorrt) or full names; CPU is always last.

    Raises BackendError if a requested provider is not in this onnxruntime build.
    """
    import onnxruntime as ort

    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in (providers or ["cpu"])]
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendError(
            f"onnxruntime provider {', '.join(missing)} is not available in this onnxruntime "
            f"(available: {', '.join(available)}); GPU providers need 'pip install onnxruntime-gpu'"
        )
    return names


_ORT_TYPES = {
    "tensor(float)": (np.float32, torch.float32),
    "tensor(float16)": (np.float16, torch.float16),
    "tensor(int64)": (np.int64, torch.int64),
    "tensor(int32)": (np.int32, torch.int32),
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def provider_entries(names: Sequence[str], stream: int | None) -> list:
    """onnxruntime's providers argument: on the GPU providers, torch's CUDA stream as the one
    onnxruntime computes on (``user_compute_stream``), so the two are ordered by the stream."""
    if stream is None:
        return list(names)
    return [(n, {"user_compute_stream": str(stream)}) if n in GPU_PROVIDERS else n for n in names]


def order_after_torch(device: torch.device, ort_stream: int | None, current_stream=None) -> bool:
    """Before onnxruntime reads tensors torch made on the GPU: if torch's current stream is not the
    one onnxruntime computes on, wait for it (its kernels may still be writing the inputs).

    Returns whether it waited. ``current_stream`` is torch.cuda.current_stream (tests substitute it).
    """
    if device.type != "cuda":
        return False
    stream = (current_stream or torch.cuda.current_stream)(device)
    if ort_stream is not None and stream.cuda_stream == ort_stream:
        return False
    stream.synchronize()
    return True


DISABLE_QDQ_FUSION = "session.disable_quant_qdq"


def session_options(providers: Sequence[str], threads: int | None = None):
    """onnxruntime's session options for a graph on ``providers``.

    On a CPU whose int8 kernels saturate (``controlrt.cpu.int8_sums_saturate``: x86 without VNNI), the
    CPU provider does not fuse Q/DQ pairs into int8 kernels: each quantized layer runs as
    dequantize, float layer, quantize, which is the graph's stated math (what TensorRT and VNNI
    CPUs compute), at float speed. Float graphs have no Q/DQ pairs, so nothing changes for them.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:  # default: one per physical core
        options.intra_op_num_threads = threads
    if providers[0] == "CPUExecutionProvider" and int8_sums_saturate():
        options.add_session_config_entry(DISABLE_QDQ_FUSION, "1")
        _say_int8_unfused()
    return options


@cache
def _say_int8_unfused() -> None:
    logger.info(
        "%s has no VNNI: onnxruntime's int8 kernels would saturate here, so int8 graphs run "
        "dequantized (their exact math, at float speed)",
        cpu_name(),
    )


class OrtSession(Session):
    """Runs one ONNX graph with onnxruntime.

    On the CPU provider, tensors go in and come out on the CPU. With the CUDA or TensorRT
    execution provider the session works on CUDA tensors through IOBinding: inputs are bound
    where they lie on the device, outputs are allocated as torch CUDA tensors of the spec's shapes
    and bound too, so nothing crosses to the host between steps. onnxruntime computes on torch's
    current CUDA stream at creation (``user_compute_stream``); if torch has moved to another
    stream by the time of a run, that stream is waited for first, so onnxruntime never reads
    inputs torch's kernels are still writing. ``io_binding=True`` uses the same path on the CPU.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        spec: GraphSpec,
        providers: Sequence[str] | None = None,
        io_binding: bool | None = None,
        device_id: int = 0,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(spec)
        names = resolve_providers(providers)
        options = session_options(names, threads)
        self._stream = None  # the CUDA stream onnxruntime computes on, when it is torch's
        if names[0] in GPU_PROVIDERS:
            self._stream = torch.cuda.current_stream(torch.device("cuda", device_id)).cuda_stream
        try:
            self._session = ort.InferenceSession(str(path), options, providers=provider_entries(names, self._stream))
        except BackendError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BuildError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
        graph_inputs = [i.name for i in self._session.get_inputs()]
        graph_outputs = [o.name for o in self._session.get_outputs()]
        if graph_inputs != spec.input_names or graph_outputs != spec.output_names:
            raise BuildError(
                f"{path} does not match its spec {spec.name} (graph inputs {graph_inputs}, "
                f"outputs {graph_outputs}); re-run controlrt export"
            )
        logger.debug("onnxruntime session %s on %s", spec.name, self._session.get_providers())
        on_gpu = self._session.get_providers()[0] in GPU_PROVIDERS
        self._device = torch.device("cuda", device_id) if on_gpu else torch.device("cpu")
        self._io_binding = on_gpu if io_binding is None else io_binding
        self._types = {t.name: _ORT_TYPES[t.type] for t in (*self._session.get_inputs(), *self._session.get_outputs())}

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    @property
    def device(self) -> torch.device:
        return self._device

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._io_binding:
            return self._run_bound(feeds)
        arrays = {name: np.ascontiguousarray(feeds[name].detach().cpu().numpy()) for name in self.spec.input_names}
        try:
            outputs = self._session.run(self.spec.output_names, arrays)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed on {self.spec.name}: {str(exc).splitlines()[0]}") from None
        return {name: torch.from_numpy(out) for name, out in zip(self.spec.output_names, outputs, strict=True)}

    def _run_bound(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run with IOBinding on torch tensors of the session's device (no host copies on a GPU)."""
        device = self._device
        kind, index = device.type, device.index or 0
        binding = self._session.io_binding()
        keep = []  # the bound tensors must outlive the run
        for name in self.spec.input_names:
            np_type, torch_type = self._types[name]
            tensor = feeds[name].to(device, torch_type).contiguous()
            keep.append(tensor)
            binding.bind_input(name, kind, index, np_type, tuple(tensor.shape), tensor.data_ptr())
        shapes = self.spec.output_shapes(self.spec.bind(feeds))
        outputs = {}
        for name in self.spec.output_names:
            np_type, torch_type = self._types[name]
            outputs[name] = torch.empty(shapes[name], dtype=torch_type, device=device)
            binding.bind_output(name, kind, index, np_type, shapes[name], outputs[name].data_ptr())
        order_after_torch(device, self._stream)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed on {self.spec.name}: {str(exc).splitlines()[0]}") from None
        return outputs

    def close(self) -> None:
        self._session = None
