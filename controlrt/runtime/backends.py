"""Opening a build's graphs on a backend."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from controlrt.errors import BuildError, InputError, ModelError
from controlrt.lora import Lora
from controlrt.manifest import Build, Manifest
from controlrt.models import BaseModel, ControlNetModelFolder, source_differences
from controlrt.precision import Precision
from controlrt.session import Session

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
# The precisions each backend computes (bf16: the fp32 graphs computed in bf16).
PRECISIONS = {
    "torch": (Precision.FP32, Precision.BF16),
    "onnxruntime": (Precision.FP32, Precision.FP16, Precision.INT8),
    "openvino": (Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8),
    "tensorrt": (Precision.FP32, Precision.FP16, Precision.INT8),
}


@dataclass(frozen=True)
class BackendOptions:
    """Which backend runs the graphs, and where.

    Attributes:
        backend: "torch" (the diffusers modules, the reference), "onnxruntime", "openvino" (the
            CPU engine: bf16 and int8 kernels) or "tensorrt" (the engines of controlrt build).
        providers: onnxruntime execution providers (cpu, cuda, tensorrt or full names).
        device: torch device; default "cpu" for torch, "cuda" for tensorrt (onnxruntime follows
            its providers).
        precision: Which graph variants run (fp32, fp16, int8), or bf16: the fp32 graphs
            computed in bf16 (openvino, torch).
        cuda_graphs: tensorrt: capture and replay CUDA graphs per input-shape signature.
        weight_streaming_budget: tensorrt: bytes of weights per engine kept on the GPU (engines
            built with --weight-streaming); None keeps them all.
        threads: onnxruntime and openvino: threads per session (default: one per physical core);
            set it when several pipelines share a machine's cores.
        float_precision: openvino int8 pipelines: what the float layers and float graphs compute
            in, fp32 or bf16 (default: bf16 where the CPU computes bf16, as OpenVINO does; which is
            faster differs between CPUs, and ``--precision auto`` measures both).
    """

    backend: str = "onnxruntime"
    providers: tuple[str, ...] | None = None
    device: str | None = None
    precision: Precision = Precision.FP32
    cuda_graphs: bool = False
    weight_streaming_budget: int | None = None
    threads: int | None = None
    float_precision: Precision | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if self.backend == "tensorrt" else "cpu")
        if self.backend != "tensorrt" and (self.cuda_graphs or self.weight_streaming_budget is not None):
            raise InputError("CUDA graphs and weight streaming are options of --backend tensorrt")
        if self.precision not in PRECISIONS[self.backend]:
            able = [b for b, precisions in PRECISIONS.items() if self.precision in precisions]
            raise InputError(
                f"the {self.backend} backend does not compute in {self.precision}; "
                f"--precision {self.precision} needs --backend {' or '.join(able)}"
            )
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise InputError(f"threads {self.threads!r} must be at least 1")
        if self.float_precision is not None:
            object.__setattr__(self, "float_precision", Precision.parse(self.float_precision))
            if self.backend != "openvino" or self.precision is not Precision.INT8:
                raise InputError("the float layers' precision is an option of openvino int8 pipelines")
            if self.float_precision not in (Precision.FP32, Precision.BF16):
                raise InputError(f"float layers compute in fp32 or bf16, not {self.float_precision}")


def open_sources(manifest: Manifest) -> tuple[BaseModel, list[ControlNetModelFolder]]:
    """The source folders a build was exported from, refused if they changed since."""
    sources = manifest.sources
    refitted = [s["path"] for s in sources["controlnets"] if s.get("onnx")]
    if refitted:
        raise BuildError(
            f"the torch reference needs diffusers folders, but a ControlNet was refitted from {refitted[0]}; "
            "refit from a ControlNet folder to compare against torch"
        )
    try:
        base = BaseModel.open(sources["base"]["path"]).with_vae(sources["base"].get("vae"))
        base = base.with_loras([Lora.from_record(r) for r in sources["base"].get("loras", [])])
        controlnets = [ControlNetModelFolder.open(s["path"]) for s in sources["controlnets"]]
    except (ModelError, InputError) as exc:
        raise BuildError(f"the torch reference needs the build's source models: {exc}") from None
    for folder, recorded in ((base, sources["base"]), *zip(controlnets, sources["controlnets"], strict=True)):
        changed = source_differences(recorded, folder.source_record())
        if changed:
            raise BuildError(
                f"source model {folder.path} changed since it was exported ({', '.join(changed[:3])} "
                "differ from the manifest); the torch reference would use other weights than the graphs: "
                "re-run controlrt export"
            )
    return base, controlnets


class SessionFactory:
    """Opens sessions for one build and backend; the torch sources are opened once."""

    def __init__(self, build: Build, options: BackendOptions) -> None:
        self.build = build
        self.options = options
        self._sources: tuple[BaseModel, list[ControlNetModelFolder]] | None = None

    def computes(self, name: str) -> Precision:
        """The precision graph ``name`` computes in: its variant's, or bf16 where the backend
        computes a float graph in bf16 (bf16 pipelines; an int8 pipeline's float graphs on OpenVINO
        on a bf16 CPU). Parity judges each graph by this precision's gate."""
        variant = self.build.manifest.graphs[name].runs_in(self.options.precision)
        if self.options.precision is Precision.BF16:
            return Precision.BF16
        if self.options.backend == "openvino" and variant is not Precision.INT8:
            return Precision.BF16 if inference_precision(self.options) == "bf16" else variant
        return variant

    def _profiles(self, name: str):
        """The optimization profiles of the engine this factory would open, or None (any shape)."""
        if self.options.backend != "tensorrt":
            return None
        from controlrt.engine.cache import EngineStore

        record = EngineStore(self.build).record(name, self.build.manifest.graphs[name].runs_in(self.options.precision))
        return None if record is None else record.key.profiles  # no engine: open() says so

    def admits(self, name: str, sizes: Mapping[str, int]) -> bool:
        """Whether the session this factory opens for ``name`` accepts inputs at ``sizes``."""
        from controlrt.engine.profiles import admits

        profiles = self._profiles(name)
        return profiles is None or admits(profiles, self.build.manifest.spec(name), sizes)

    def own_sizes(self, name: str) -> list[dict[str, int]]:
        """Sizes the session is made for (an engine's profile shapes); empty when it takes any."""
        from controlrt.engine.profiles import profile_sizes

        profiles = self._profiles(name)
        return [] if profiles is None else profile_sizes(profiles, self.build.manifest.spec(name))

    def accepted_sizes(self, name: str, candidates: Sequence[Mapping[str, int]]) -> list[dict[str, int]]:
        """The candidates the session accepts, topped up with its own sizes to as many as were asked."""
        wanted = max(1, len(candidates))
        out = [dict(s) for s in candidates if self.admits(name, s)]
        out += [s for s in self.own_sizes(name) if s not in out]
        return out[:wanted]

    def _open_openvino(self, name: str, variant: Precision) -> Session:
        """The graph compiled by OpenVINO, its blob cached in the build where it can be written."""
        from controlrt.runtime.ov_backend import CACHE_FOLDER, OpenVinoSession, cache_key

        hint = inference_precision(self.options)
        files = tuple((f.path, f.sha256) for f in self.build.variant(name, variant).files)
        cache_dir: Path | None = self.build.path / CACHE_FOLDER / cache_key(files, hint, self.options.threads)
        if not _writable(cache_dir):
            logger.info("not caching compiled graphs: %s cannot be written", cache_dir)
            cache_dir = None
        spec = self.build.manifest.spec(name)
        return OpenVinoSession(self.build.graph_path(name, variant), spec, hint, self.options.threads, cache_dir)

    def open(self, name: str) -> Session:
        spec = self.build.manifest.spec(name)
        if self.options.backend == "torch":
            from controlrt.families import load_graph_module
            from controlrt.runtime.torch_backend import TorchSession

            if self._sources is None:
                self._sources = open_sources(self.build.manifest)
            module = load_graph_module(spec, *self._sources)
            dtype = torch.bfloat16 if self.options.precision is Precision.BF16 else torch.float32
            return TorchSession(module, spec, self.options.device or "cpu", dtype)
        precision = self.build.manifest.graphs[name].runs_in(self.options.precision)
        if self.options.backend == "tensorrt":
            from controlrt.engine.session import open_engine_session

            return open_engine_session(
                self.build,
                name,
                precision,
                cuda_graphs=self.options.cuda_graphs,
                weight_streaming_budget=self.options.weight_streaming_budget,
                device=self.options.device or "cuda",
            )
        if self.options.backend == "openvino":
            return self._open_openvino(name, precision)
        from controlrt.ort_session import OrtSession

        return OrtSession(
            self.build.graph_path(name, precision), spec, self.options.providers, threads=self.options.threads
        )


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".controlrt-probe-", dir=folder):
            return True
    except OSError:
        return False


def inference_precision(options: BackendOptions) -> str:
    """OpenVINO's inference precision for a pipeline's options.

    bf16 computes in bf16. int8 graphs run their quantized layers as int8 kernels (VNNI, AMX) and
    the others in ``options.float_precision``: by default bf16 where OpenVINO computes bf16 on this
    CPU (its own default there), else f32; which is faster is measured by ``--precision auto``, not
    assumed. fp32 and fp16 graphs compute in f32 (OpenVINO's default on bf16 CPUs would be bf16: it
    is always set explicitly).
    """
    if options.precision is Precision.BF16:
        return "bf16"
    if options.precision is Precision.INT8:
        if options.float_precision is None:
            from controlrt.runtime.ov_backend import supports_bf16

            return "bf16" if supports_bf16() else "f32"
        return "bf16" if options.float_precision is Precision.BF16 else "f32"
    return "f32"


def open_sessions(build: Build, options: BackendOptions, names: Sequence[str] | None = None) -> dict[str, Session]:
    factory = SessionFactory(build, options)
    return {name: factory.open(name) for name in (names or list(build.manifest.graphs))}
