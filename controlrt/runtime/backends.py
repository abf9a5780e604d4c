"""Opening a build's graphs on a backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controlrt.errors import BuildError, InputError, ModelError
from controlrt.manifest import Build, Manifest
from controlrt.models import BaseModel, ControlNetModelFolder, source_differences
from controlrt.precision import Precision, variant_for
from controlrt.runtime.session import Session

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class BackendOptions:
    """Which backend runs the graphs, and where.

    Attributes:
        backend: "torch" (the diffusers modules, the reference), "onnxruntime" or "tensorrt"
            (the engines of controlrt build).
        providers: onnxruntime execution providers (cpu, cuda, tensorrt or full names).
        device: torch device; default "cpu" for torch, "cuda" for tensorrt (onnxruntime follows
            its providers).
        precision: Which graph variants run (fp32, fp16, int8); the torch backend is fp32 only.
        cuda_graphs: tensorrt: capture and replay CUDA graphs per input-shape signature.
        weight_streaming_budget: tensorrt: bytes of weights per engine kept on the GPU (engines
            built with --weight-streaming); None keeps them all.
        threads: onnxruntime: intra-op threads per session (default: one per physical core); set it
            when several pipelines share a machine's cores.
    """

    backend: str = "onnxruntime"
    providers: tuple[str, ...] | None = None
    device: str | None = None
    precision: Precision = Precision.FP32
    cuda_graphs: bool = False
    weight_streaming_budget: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.device is None:
            object.__setattr__(self, "device", "cuda" if self.backend == "tensorrt" else "cpu")
        if self.backend != "tensorrt" and (self.cuda_graphs or self.weight_streaming_budget is not None):
            raise InputError("CUDA graphs and weight streaming are options of --backend tensorrt")
        if self.backend == "torch" and self.precision is not Precision.FP32:
            raise InputError(
                f"the torch backend is the fp32 reference; --precision {self.precision} "
                "needs --backend onnxruntime or tensorrt"
            )


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
        base = BaseModel.open(sources["base"]["path"])
        controlnets = [ControlNetModelFolder.open(s["path"]) for s in sources["controlnets"]]
    except ModelError as exc:
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

    def _profiles(self, name: str):
        """The optimization profiles of the engine this factory would open, or None (any shape)."""
        if self.options.backend != "tensorrt":
            return None
        from controlrt.engine.cache import EngineStore

        spec = self.build.manifest.spec(name)
        variants = set(self.build.manifest.graphs[name].variants)
        record = EngineStore(self.build).record(name, variant_for(spec.kind, self.options.precision, variants))
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

    def open(self, name: str) -> Session:
        spec = self.build.manifest.spec(name)
        if self.options.backend == "torch":
            from controlrt.graphs import load_graph_module
            from controlrt.runtime.torch_backend import TorchSession

            if self._sources is None:
                self._sources = open_sources(self.build.manifest)
            module = load_graph_module(spec, *self._sources)
            return TorchSession(module, spec, self.options.device or "cpu")
        variants = set(self.build.manifest.graphs[name].variants)
        precision = variant_for(spec.kind, self.options.precision, variants)
        if self.options.backend == "tensorrt":
            from controlrt.runtime.trt_backend import open_engine_session

            return open_engine_session(
                self.build,
                name,
                precision,
                cuda_graphs=self.options.cuda_graphs,
                weight_streaming_budget=self.options.weight_streaming_budget,
                device=self.options.device or "cuda",
            )
        from controlrt.runtime.ort_backend import OrtSession

        return OrtSession(
            self.build.graph_path(name, precision), spec, self.options.providers, threads=self.options.threads
        )


def open_sessions(build: Build, options: BackendOptions, names: Sequence[str] | None = None) -> dict[str, Session]:
    factory = SessionFactory(build, options)
    return {name: factory.open(name) for name in (names or list(build.manifest.graphs))}
