"""The TensorRT backend: one deserialized engine per graph, run on torch CUDA tensors.

Each session binds torch tensors with ``set_tensor_address`` and runs ``execute_async_v3`` on the
current torch CUDA stream, so its outputs are ordinary CUDA tensors, ordered with the loop's own
torch arithmetic (residual sums, guidance, the scheduler) and never copied to the host between
steps. Before every run the session selects the optimization profile that admits the input
shapes and calls ``set_input_shape`` for each input.

With ``cuda_graphs`` the first run at a new input-shape signature is captured into a CUDA graph
(after one warm-up run) with input and output buffers owned by the session; later runs with that
signature copy the inputs in and replay it. A new signature is captured anew (up to
``MAX_CAPTURED`` signatures are kept, the oldest dropped first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from controlrt.engine.profiles import Profile, admits, select_profile
from controlrt.engine.trt import import_tensorrt
from controlrt.errors import BackendError, BuildError
from controlrt.session import Session
from controlrt.specs import GraphSpec

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)

MAX_CAPTURED = 8
Signature = tuple[tuple[int, ...], ...]


def torch_dtype(dtype: trt.DataType) -> torch.dtype:
    """The torch dtype of a TensorRT DataType."""
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise BackendError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class CudaGraph:
    """A captured CUDA graph of one callable (torch.cuda.CUDAGraph)."""

    def __init__(self, fn: Callable[[], None], device: torch.device) -> None:
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(self._graph):
            fn()

    def replay(self) -> None:
        self._graph.replay()


def refit_from_onnx(engine: trt.ICudaEngine, onnx_path: Path, trt_logger: trt.ILogger) -> None:
    """Load the weights of ``onnx_path`` into a refittable or weight-stripped engine."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, trt_logger)
    parser = trt.OnnxParserRefitter(refitter, trt_logger)
    if not parser.refit_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"cannot refit from {onnx_path.name}: {'; '.join(errors) or 'the parser refused it'}")
    if not refitter.refit_cuda_engine():
        missing = refitter.get_missing_weights()
        detail = f" ({len(missing)} weights missing, e.g. {missing[0]})" if missing else ""
        raise BuildError(f"refitting the engine from {onnx_path.name} failed{detail}")


class TensorRTSession(Session):
    """Runs one TensorRT engine on torch tensors of ``device``.

    Args:
        plan: The serialized engine.
        spec: Its graph spec; the engine's tensor names and directions must match it.
        profiles: The engine's optimization profiles, in engine order (from its record).
        refit_onnx: For weight-stripped plans: the ONNX file whose weights are loaded at open.
        cuda_graphs: Capture and replay CUDA graphs per input-shape signature.
        weight_streaming_budget: Bytes of weights kept on the GPU (engines built with weight
            streaming); None keeps them all.
        device: Where the tensors live (a CUDA device).
        graph_factory: Makes the captured graphs (default CudaGraph; tests substitute their own).
    """

    backend = "tensorrt"

    def __init__(
        self,
        plan: bytes,
        spec: GraphSpec,
        profiles: list[Profile],
        *,
        refit_onnx: Path | None = None,
        cuda_graphs: bool = False,
        weight_streaming_budget: int | None = None,
        device: str | torch.device = "cuda",
        graph_factory: Callable[[Callable[[], None], torch.device], Any] | None = None,
    ) -> None:
        super().__init__(spec)
        import_tensorrt()  # one clear error where TensorRT is missing
        import tensorrt as trt

        self._device = torch.device(device)
        self._logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
        self._runtime: trt.Runtime | None = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BuildError(f"TensorRT could not deserialize the {spec.name} engine; rebuild it with controlrt build")
        self._engine: trt.ICudaEngine | None = engine
        if refit_onnx is not None:
            refit_from_onnx(engine, refit_onnx, self._logger)
        if weight_streaming_budget is not None:
            if not engine.streamable_weights_size:
                raise BackendError(
                    f"the {spec.name} engine was not built for weight streaming; rebuild with --weight-streaming"
                )
            engine.weight_streaming_budget_v2 = int(weight_streaming_budget)
        self._check_io(engine)
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for {spec.name} (out of GPU memory?)")
        self._context: trt.IExecutionContext | None = context
        self._profiles = profiles
        self._profile = -1  # none selected yet
        names = (*spec.input_names, *spec.output_names)
        self._dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._cuda_graphs = cuda_graphs
        self._graph_factory = graph_factory or CudaGraph
        self._captured: OrderedDict[Signature, tuple[dict[str, torch.Tensor], Any]] = OrderedDict()
        self._bound: Signature | None = None  # signature whose buffers the context holds
        self.captures = 0  # CUDA graphs captured so far (for reports and tests)

    @property
    def device(self) -> torch.device:
        return self._device

    def admits(self, sizes: Mapping[str, int]) -> bool:
        return admits(self._profiles, self.spec, sizes)

    def _check_io(self, engine: trt.ICudaEngine) -> None:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(self.spec.input_names) or sorted(outputs) != sorted(self.spec.output_names):
            raise BuildError(
                f"the {self.spec.name} engine's tensors (inputs {inputs}, outputs {outputs}) do not match "
                "its graph spec; rebuild it with controlrt build"
            )

    @property
    def context(self) -> trt.IExecutionContext:
        if self._context is None:
            raise BackendError(f"the {self.spec.name} TensorRT session is closed")
        return self._context

    def _stream(self) -> int:
        return torch.cuda.current_stream(self._device).cuda_stream if self._device.type == "cuda" else 0

    def _set_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        index = select_profile(self._profiles, shapes)
        if index != self._profile:
            if not self.context.set_optimization_profile_async(index, self._stream()):
                raise BackendError(f"TensorRT refused optimization profile {index} of {self.spec.name}")
            self._profile = index
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise BackendError(f"TensorRT refused shape {shape} for {self.spec.name} input {name}")

    def _allocate_outputs(self) -> dict[str, torch.Tensor]:
        outputs = {}
        for name in self.spec.output_names:
            dims = self.context.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            if any(d < 0 for d in shape):
                raise BackendError(f"TensorRT could not infer the shape of {self.spec.name} output {name}")
            outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
        return outputs

    def _bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise BackendError(f"TensorRT refused the buffer for {self.spec.name} tensor {name}")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream()):
            raise BackendError(f"TensorRT failed to run {self.spec.name}")

    def _inputs(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: feeds[name].to(self._device, self._dtypes[name], non_blocking=True).contiguous()
            for name in self.spec.input_names
        }

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self._inputs(feeds)
        shapes = {name: tuple(t.shape) for name, t in inputs.items()}
        if not self._cuda_graphs:
            self._set_shapes(shapes)
            self._bound = None
            outputs = self._allocate_outputs()
            self._bind({**inputs, **outputs})
            self._execute()
            return outputs
        signature: Signature = tuple(shapes[name] for name in self.spec.input_names)
        if signature not in self._captured:
            self._capture(signature, inputs)
        self._captured.move_to_end(signature)
        buffers, graph = self._captured[signature]
        if self._bound != signature:  # keep the context's shapes and addresses those of the graph
            self._set_shapes(shapes)
            self._bind(buffers)
            self._bound = signature
        for name in self.spec.input_names:
            buffers[name].copy_(inputs[name], non_blocking=True)
        graph.replay()
        return {name: buffers[name].clone() for name in self.spec.output_names}

    def _capture(self, signature: Signature, inputs: Mapping[str, torch.Tensor]) -> None:
        """Static buffers for this signature, one warm-up run, then the captured graph."""
        while len(self._captured) >= MAX_CAPTURED:
            self._captured.popitem(last=False)
        shapes = dict(zip(self.spec.input_names, signature, strict=True))
        self._set_shapes(shapes)
        buffers = {name: inputs[name].clone() for name in self.spec.input_names}
        buffers.update(self._allocate_outputs())
        self._bind(buffers)
        self._execute()  # warm-up: TensorRT may allocate or initialise lazily on the first run

        graph = self._graph_factory(self._execute, self._device)
        self._captured[signature] = (buffers, graph)
        self._bound = signature
        self.captures += 1
        logger.debug("captured a CUDA graph of %s for shapes %s", self.spec.name, signature)

    def close(self) -> None:
        self._captured.clear()
        self._context = None
        self._engine = None
        self._runtime = None


def open_engine_session(
    build: Any,
    name: str,
    precision: Any,
    *,
    cuda_graphs: bool = False,
    weight_streaming_budget: int | None = None,
    device: str | torch.device = "cuda",
    verify: bool = True,
) -> TensorRTSession:
    """Open the build's engine for graph ``name`` at ``precision``, refusing a stale one.

    Weight-stripped plans are refitted from the build's ONNX graph as they load.
    """
    from controlrt.engine.cache import EngineStore, Gpu

    import_tensorrt()
    import tensorrt as trt

    device = torch.device(device)
    store = EngineStore(build)
    record = store.check_runnable(name, precision, str(trt.__version__), Gpu.current(device.index or 0), verify)
    refit = build.graph_path(name, precision) if record.key.options.weight_stripped else None
    return TensorRTSession(
        store.read_plan(record),
        build.manifest.spec(name),
        record.key.profiles,
        refit_onnx=refit,
        cuda_graphs=cuda_graphs,
        weight_streaming_budget=weight_streaming_budget,
        device=device,
    )
