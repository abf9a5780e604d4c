"""A FAKE of the few TensorRT calls controlrt makes. It is not TensorRT and verifies nothing about it.

It lets CPU tests exercise controlrt's own control flow around TensorRT: tensor names and
directions, profile selection, set_input_shape before runs, buffer binding by address, CUDA-graph
capture per shape signature, refit bookkeeping and engine-cache invalidation. A "plan" is a small
JSON document naming an ONNX file; "execution" reads the bound input buffers (CPU memory, by
address), runs that ONNX with onnxruntime and writes the outputs into the bound output buffers.
Whether real engines compute the right thing is what the GPU tests (marked tensorrt) check.

Install it with ``install(monkeypatch)``, which puts it in ``sys.modules["tensorrt"]``.
"""

from __future__ import annotations

import base64
import ctypes
import enum
import json
from pathlib import Path
from typing import ClassVar

import numpy as np

__version__ = "10.99.0-fake"


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = 2

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


ILogger = Logger


def make_plan(onnx_path: str | Path, stripped: bool = False, **flags) -> bytes:
    """A fake serialized engine: the graph's structure (its ONNX path), its weights (the ONNX
    bytes, left out of a weight-stripped plan) and the build flags."""
    model = "" if stripped else base64.b64encode(Path(onnx_path).read_bytes()).decode()
    return json.dumps(
        {"fake_tensorrt_plan": 1, "onnx": str(onnx_path), "model": model, "stripped": stripped, **flags}
    ).encode()


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes):
        try:
            data = json.loads(bytes(plan))
        except ValueError:
            return None
        if data.get("fake_tensorrt_plan") != 1:
            return None
        return ICudaEngine(data)


class ICudaEngine:
    def __init__(self, plan: dict) -> None:
        import onnxruntime as ort

        self.plan = dict(plan)
        structure = ort.InferenceSession(self.plan["onnx"], providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in structure.get_inputs()]
        self.outputs = [o.name for o in structure.get_outputs()]
        types = {i.name: i.type for i in (*structure.get_inputs(), *structure.get_outputs())}
        self.types = {n: _TYPES[t] for n, t in types.items()}
        self.session = self._load(self.plan["model"])
        self.streamable_weights_size = 1 << 20 if self.plan.get("weight_streaming") else 0
        self.weight_streaming_budget_v2 = self.streamable_weights_size
        self.contexts: list[IExecutionContext] = []
        self.refits = 0

    @staticmethod
    def _load(model: str):
        import onnxruntime as ort

        if not model:  # weight-stripped and not refitted: nothing to run
            return None
        return ort.InferenceSession(base64.b64decode(model), providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index: int) -> str:
        return [*self.inputs, *self.outputs][index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        if name in self.inputs:
            return TensorIOMode.INPUT
        return TensorIOMode.OUTPUT if name in self.outputs else TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.types[name]

    def create_execution_context(self) -> IExecutionContext:
        context = IExecutionContext(self)
        self.contexts.append(context)
        return context

    def serialize(self) -> bytes:
        return json.dumps(self.plan).encode()


_TYPES = {
    "tensor(float)": DataType.FLOAT,
    "tensor(float16)": DataType.HALF,
    "tensor(int64)": DataType.INT64,
    "tensor(int32)": DataType.INT32,
}


class IExecutionContext:
    """Records every call in ``calls`` so tests can check the order controlrt makes them in."""

    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.calls: list[tuple] = []
        self.profile = 0
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.calls.append(("set_optimization_profile_async", index))
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.calls.append(("set_input_shape", name, tuple(shape)))
        if name not in self.engine.inputs:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.calls.append(("set_tensor_address", name, address))
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self._output_shapes and self.engine.session is not None:  # learn them on zeros
            feeds = {n: np.zeros(s, _numpy(self.engine.types[n])) for n, s in self.shapes.items()}
            outs = self.engine.session.run(self.engine.outputs, feeds)
            self._output_shapes[key] = {n: o.shape for n, o in zip(self.engine.outputs, outs, strict=True)}
        return self._output_shapes.get(key, {}).get(name, (-1,))

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append(("execute_async_v3", stream))
        if self.engine.session is None:
            return False
        feeds = {}
        for name in self.engine.inputs:
            shape, dtype = self.shapes[name], _numpy(self.engine.types[name])
            feeds[name] = _view(self.addresses[name], shape, dtype).copy()
        outputs = self.engine.session.run(self.engine.outputs, feeds)
        for name, value in zip(self.engine.outputs, outputs, strict=True):
            target = _view(self.addresses[name], value.shape, value.dtype)
            target[...] = value
        return True


class Refitter:
    def __init__(self, engine: ICudaEngine, logger: Logger) -> None:
        self.engine = engine
        self.pending: str | None = None

    def refit_cuda_engine(self) -> bool:
        if self.pending is None or not (self.engine.plan.get("refittable") or self.engine.plan.get("stripped")):
            return False
        self.engine.plan["model"] = base64.b64encode(Path(self.pending).read_bytes()).decode()
        self.engine.session = self.engine._load(self.engine.plan["model"])
        self.engine.refits += 1
        return True

    def get_missing_weights(self) -> list[str]:
        return []


class OnnxParserRefitter:
    def __init__(self, refitter: Refitter, logger: Logger) -> None:
        self.refitter = refitter
        self.num_errors = 0

    def refit_from_file(self, path: str) -> bool:
        self.refitter.pending = path
        return True

    def get_error(self, index: int) -> str:
        return ""


def _numpy(dtype: DataType) -> np.dtype:
    return np.dtype(dtype.value)


def _view(address: int, shape, dtype) -> np.ndarray:
    """A numpy array over ``prod(shape)`` elements of memory at ``address`` (CPU tensors only)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) if len(shape) else 1
    buffer = (ctypes.c_byte * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def install(monkeypatch) -> object:
    """Make ``import tensorrt`` give this fake for the duration of a test."""
    import sys

    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


class FakeGraph:
    """Stands in for a captured CUDA graph: replay runs the captured callable again."""

    captured: ClassVar[list[FakeGraph]] = []

    def __init__(self, fn, device) -> None:
        self.fn = fn
        self.replays = 0
        FakeGraph.captured.append(self)

    def replay(self) -> None:
        self.replays += 1
        self.fn()
