"""A FAKE of the few TensorRT calls controlrt makes. It is not TensorRT and verifies nothing about it.

It lets CPU tests exercise controlrt's own code around TensorRT, the builder included: parsing,
the builder configuration (flags, optimization level, memory pools, one optimization profile per
entry, the timing cache), tensor names and directions, profile selection, set_input_shape before
runs, buffer binding by address, CUDA-graph capture per shape signature, refit bookkeeping and
engine-cache invalidation. It is honest where a real GPU would be strict:

- a shape outside the selected profile is refused by ``set_input_shape``, a profile index outside
  the engine's by ``set_optimization_profile_async``, and a run with an input shape or address
  unset fails;
- a captured CUDA graph replays with the tensor addresses and shapes it was captured with, not with
  whatever is bound when it replays;
- the builder refuses a profile that leaves a network input out or whose min <= opt <= max fails,
  and a network that is not strongly typed.

A "plan" is a small JSON document holding an ONNX graph's tensors, its bytes (its "weights", left
out of a weight-stripped plan), the build flags and the profiles; it reads no file once made, as a
real plan does not. "Execution" reads the bound input
buffers (CPU memory, by address), runs the ONNX with onnxruntime and writes the outputs into the
bound output buffers. Whether real engines compute the right thing is what the GPU tests (marked
tensorrt) check.

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


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 5


class BuilderFlag(enum.Enum):
    FP16 = "FP16"
    INT8 = "INT8"
    TF32 = "TF32"
    REFIT = "REFIT"
    REFIT_IDENTICAL = "REFIT_IDENTICAL"
    STRIP_PLAN = "STRIP_PLAN"
    WEIGHT_STREAMING = "WEIGHT_STREAMING"


class MemoryPoolType(enum.Enum):
    WORKSPACE = "WORKSPACE"


class Logger:
    WARNING = 2

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


ILogger = Logger


def make_plan(onnx_path: str | Path, stripped: bool = False, profiles=None, **flags) -> bytes:
    """A fake serialized engine: the graph's structure (its ONNX path), its weights (the ONNX
    bytes, left out of a weight-stripped plan), the build flags and the optimization profiles
    ([{input: [min, opt, max]}], none: any shape)."""
    import onnxruntime as ort

    structure = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tensors = {
        "inputs": [i.name for i in structure.get_inputs()],
        "outputs": [o.name for o in structure.get_outputs()],
        "types": {t.name: t.type for t in (*structure.get_inputs(), *structure.get_outputs())},
    }
    model = "" if stripped else base64.b64encode(Path(onnx_path).read_bytes()).decode()
    return json.dumps(
        {
            "fake_tensorrt_plan": 1,
            "onnx": str(onnx_path),
            "tensors": tensors,
            "model": model,
            "stripped": stripped,
            "profiles": profiles,
            **flags,
        }
    ).encode()


# --- building ------------------------------------------------------------------------------------


class INetworkDefinition:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: str | None = None
        self.inputs: list[str] = []

    @property
    def strongly_typed(self) -> bool:
        return bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        import onnxruntime as ort

        try:
            structure = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:
            self.errors.append(f"cannot read {path}: {exc}")
            return False
        self.network.onnx = path
        self.network.inputs = [i.name for i in structure.get_inputs()]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class IOptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, min, opt, max) -> None:
        self.shapes[name] = [list(min), list(opt), list(max)]


class ITimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries = json.loads(data)["entries"] if data else 0

    def serialize(self) -> bytes:
        return json.dumps({"fake_timing_cache": 1, "entries": self.entries}).encode()


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # TensorRT's default
        self.builder_optimization_level = 3
        self.pools: dict[str, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: BuilderFlag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: BuilderFlag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool.value] = int(size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> ITimingCache:
        return ITimingCache(bytes(data))

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self.timing_cache


class Builder:
    builds: ClassVar[list[dict]] = []  # the configuration of every build, for tests to read

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if network.onnx is None or not network.strongly_typed:
            return None  # nothing parsed, or a network whose precision TensorRT 11 would not know
        profiles = []
        for profile in config.profiles:
            if set(profile.shapes) != set(network.inputs):
                return None
            for low, opt, high in profile.shapes.values():
                if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                    return None
            profiles.append(profile.shapes)
        if config.timing_cache is not None:
            config.timing_cache.entries += 1
        flags = sorted(f.value for f in config.flags)
        Builder.builds.append(
            {
                "onnx": network.onnx,
                "flags": flags,
                "optimization_level": config.builder_optimization_level,
                "pools": dict(config.pools),
                "profiles": profiles,
            }
        )
        return make_plan(
            network.onnx,
            stripped=BuilderFlag.STRIP_PLAN in config.flags,
            profiles=profiles or None,
            refittable=BuilderFlag.REFIT in config.flags or BuilderFlag.REFIT_IDENTICAL in config.flags,
            weight_streaming=BuilderFlag.WEIGHT_STREAMING in config.flags,
            flags=flags,
        )


# --- running -------------------------------------------------------------------------------------


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
        self.plan = dict(plan)
        tensors = self.plan["tensors"]  # a plan stands alone, as a real one does: no ONNX is read
        self.inputs = list(tensors["inputs"])
        self.outputs = list(tensors["outputs"])
        self.types = {n: _TYPES[t] for n, t in tensors["types"].items()}
        self.profiles = self.plan.get("profiles") or None
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

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles) if self.profiles else 1

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

# Launches recorded while a FakeGraph captures (None: not capturing).
_capturing: list | None = None


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
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        self.shapes = {}  # a new profile: every input shape must be set again
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.calls.append(("set_input_shape", name, tuple(shape)))
        if name not in self.engine.inputs:
            return False
        if self.engine.profiles is not None:
            low, _, high = self.engine.profiles[self.profile][name]
            if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True)):
                return False  # TensorRT refuses a shape outside the selected profile
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
        if set(self.shapes) != set(self.engine.inputs) or not set(self.engine.inputs + self.engine.outputs) <= set(
            self.addresses
        ):
            return False  # an input shape or a tensor address was never set
        if _capturing is not None:  # captured, not run: replays use these addresses and shapes
            _capturing.append((self, dict(self.addresses), dict(self.shapes)))
            return True
        self._run(self.addresses, self.shapes)
        return True

    def _run(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
        feeds = {}
        for name in self.engine.inputs:
            feeds[name] = _view(addresses[name], shapes[name], _numpy(self.engine.types[name])).copy()
        outputs = self.engine.session.run(self.engine.outputs, feeds)
        for name, value in zip(self.engine.outputs, outputs, strict=True):
            target = _view(addresses[name], value.shape, value.dtype)
            target[...] = value


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
    Builder.builds.clear()
    return module


class FakeGraph:
    """Stands in for a captured CUDA graph, as a real one behaves: capturing records the engine
    launches of the callable (with the tensor addresses and shapes bound at that moment) without
    running them; replay runs those launches on those addresses, whatever is bound later."""

    captured: ClassVar[list[FakeGraph]] = []

    def __init__(self, fn, device) -> None:
        global _capturing
        self.launches: list = []
        self.replays = 0
        _capturing = self.launches
        try:
            fn()
        finally:
            _capturing = None
        FakeGraph.captured.append(self)

    def replay(self) -> None:
        self.replays += 1
        for context, addresses, shapes in self.launches:
            context._run(addresses, shapes)
