"""``controlrt build``: one strongly typed TensorRT engine per graph.

Precision lives in the ONNX file (TensorRT 11 removed the builder's FP16/INT8 flags and implicit
int8 calibration): fp16 engines are built from the fp16 graphs of ``controlrt convert``, int8 from
the Q/DQ graphs of ``controlrt calibrate``; networks are parsed strongly typed on TensorRT 10 and
11 alike. In an int8 build the text encoder and VAE decoder use their fp16 (else fp32) graphs.

Refittable engines (``--refittable``) apply to the ControlNets, whose weights are meant to be
swapped (``controlrt refit``), and to the UNet and text encoders, whose weights change with the
build's LoRAs (``controlrt lora``); not to the VAE decoder. Weight-stripped plans
(``--weight-stripped``) apply to every graph and are refitted from the build's ONNX when loaded
(REFIT_IDENTICAL: the same weights they were built with).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from controlrt.engine.cache import BuildOptions, EngineKey, EngineStore, Gpu, TimingCache, onnx_identity
from controlrt.engine.profiles import Profile, ProfileSettings, derive_profiles
from controlrt.engine.trt import import_tensorrt, require_cuda
from controlrt.errors import BuildError, InputError
from controlrt.families import family_of
from controlrt.manifest import Build
from controlrt.precision import Precision
from controlrt.progress import progress_bar
from controlrt.specs import GraphKind, GraphSpec

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    """What ``build_engines`` did for one graph."""

    graph: str
    precision: str
    status: str  # "built" or "current" (an existing engine with the same key was kept)
    seconds: float
    plan_bytes: int


def options_for(spec: GraphSpec, options: BuildOptions) -> BuildOptions:
    """The build options one graph gets: the VAE decoder and encoder, whose weights nothing changes,
    are never built refittable."""
    if spec.kind in (GraphKind.VAE_DECODER, GraphKind.VAE_ENCODER) and options.refittable:
        return replace(options, refittable=False)
    return options


def build_engines(
    build_dir: str | Path,
    precision: str | Precision = Precision.FP16,
    profile: ProfileSettings | None = None,
    options: BuildOptions | None = None,
    timing_cache: str | Path | None = None,
    graphs: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = False,
) -> list[EngineResult]:
    """Build (or keep, when current) the engine of every graph of a build at ``precision``.

    Args:
        profile: Sizes and batches the engines accept (default: dynamic around the native size).
        options: Builder settings (refit, weight stripping, optimization level, workspace).
        timing_cache: Timing cache file; default ``BUILD/engines/timing-<TensorRT version>.cache``.
        graphs: Only these graphs (default: all).
        force: Rebuild even engines whose key is current.
    """
    precision = Precision.parse(precision)
    profile = profile or ProfileSettings()
    options = options or BuildOptions()
    build = Build.open(build_dir)
    names = list(graphs or build.manifest.graphs)
    unknown = [n for n in names if n not in build.manifest.graphs]
    if unknown:
        have = ", ".join(build.manifest.graphs)
        raise InputError(f"build {build.path} has no graph {', '.join(unknown)} (it has {have})")
    # every graph's variant and profiles are checked before TensorRT, the GPU or a slow build
    wanted = []
    family = family_of(build.manifest.info)
    for name in names:
        spec = build.manifest.spec(name)
        variant = build.manifest.graphs[name].runs_in(precision)
        onnx = onnx_identity(build, name, variant)  # BuildError naming convert/calibrate if missing
        profiles = derive_profiles(spec, profile, family.batches(spec.kind))
        wanted.append((name, variant, onnx, profiles, options_for(spec, options)))
    import_tensorrt()
    require_cuda()
    import tensorrt as trt

    version = str(trt.__version__)
    gpu = Gpu.current()
    store = EngineStore(build)
    if timing_cache is None:
        cache = TimingCache(store.timing_cache_path(version), version, owned=True)
    else:
        cache = TimingCache(Path(timing_cache).expanduser(), version)
    cache.check()  # a user's file controlrt did not write is refused before any build
    plans = [
        (name, variant, EngineKey(name, str(variant), onnx, profiles, graph_options, version, gpu))
        for name, variant, onnx, profiles, graph_options in wanted
    ]
    results = []
    for name, variant, key in progress_bar(plans, progress, "build: engines", "graph"):
        current = None if force else store.current(key)
        if current is not None:
            logger.info("%s %s engine is current", name, variant)
            results.append(EngineResult(name, str(variant), "current", 0.0, current.plan_bytes))
            continue
        logger.info("building the %s %s engine", variant, name)
        start = time.perf_counter()
        plan = build_plan(build.graph_path(name, variant), key.profiles, key.options, cache)
        record = store.write_current(key, plan)
        results.append(EngineResult(name, str(variant), "built", time.perf_counter() - start, record.plan_bytes))
    return results


class BuilderConfig:
    """The builder configuration of one engine (a polygraphy-style loader: settings in __init__,
    work in __call__ on a builder and network).

    Strongly typed networks take their precision from the ONNX file, so no precision flag is set;
    TF32 is cleared so fp32 engines compute in fp32. Refittable engines get REFIT; weight-stripped
    plans STRIP_PLAN, with REFIT_IDENTICAL unless they are refittable anyway; weight streaming its
    flag. One optimization profile per entry of ``profiles``, in order. The timing cache starts
    from ``timing_cache`` (serialized) or empty.
    """

    def __init__(self, profiles: list[Profile], options: BuildOptions, timing_cache: bytes | None = None) -> None:
        self.profiles = profiles
        self.options = options
        self.timing_cache = timing_cache

    def __call__(self, builder: trt.Builder, network: trt.INetworkDefinition) -> trt.IBuilderConfig:
        import tensorrt as trt

        options = self.options
        config = builder.create_builder_config()
        for shapes in self.profiles:
            profile = builder.create_optimization_profile()
            for name, r in shapes.items():
                # TensorRT converts tuples to Dims; tensorrt-stubs type these parameters as Dims only
                profile.set_shape(name, r.min, r.opt, r.max)  # type: ignore[arg-type]
            config.add_optimization_profile(profile)
        config.clear_flag(trt.BuilderFlag.TF32)
        if options.refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        if options.weight_stripped:
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            if not options.refittable:
                config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)  # refitted with its own weights at load
        if options.weight_streaming:
            config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
        config.builder_optimization_level = options.optimization_level
        if options.workspace_gb is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
        cache = config.create_timing_cache(self.timing_cache or b"")
        config.set_timing_cache(cache, False)
        return config


def build_plan(onnx_path: Path, profiles: list[Profile], options: BuildOptions, cache: TimingCache) -> bytes:
    """Parse ``onnx_path`` as a strongly typed network and build a serialized engine.

    The timing cache is read from ``cache`` if it is valid for this TensorRT and saved back after
    the build (atomically, see TimingCache.save).
    """
    trt = import_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors[:3]) or 'unknown parser error'}")
    config = BuilderConfig(profiles, options, cache.load())(builder, network)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT could not build {onnx_path.name} (see the TensorRT log above)")
    cache.save(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
