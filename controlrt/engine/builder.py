"""``controlrt build``: one strongly typed TensorRT engine per graph, through polygraphy.

Precision lives in the ONNX file (TensorRT 11 removed the builder's FP16/INT8 flags and implicit
int8 calibration): fp16 engines are built from the fp16 graphs of ``controlrt convert``, int8 from
the Q/DQ graphs of ``controlrt calibrate``; networks are parsed strongly typed on TensorRT 10 and
11 alike. In an int8 build the text encoder and VAE decoder use their fp16 (else fp32) graphs.

Refittable engines (``--refittable``) apply to the ControlNets, whose weights are meant to be
swapped; weight-stripped plans (``--weight-stripped``) apply to every graph and are refitted from
the build's ONNX when loaded (REFIT_IDENTICAL: the same weights they were built with).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from controlrt.engine.cache import BuildOptions, EngineKey, EngineStore, Gpu, TimingCache, onnx_identity
from controlrt.engine.profiles import Profile, ProfileSettings, derive_profiles
from controlrt.engine.trt import import_tensorrt, require_cuda
from controlrt.errors import BuildError, InputError
from controlrt.manifest import Build
from controlrt.precision import Precision, variant_for
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
    """The build options one graph gets: only ControlNets are built refittable."""
    if spec.kind is not GraphKind.CONTROLNET and options.refittable:
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
    for name in names:
        spec = build.manifest.spec(name)
        variant = variant_for(spec.kind, precision, set(build.manifest.graphs[name].variants))
        onnx = onnx_identity(build, name, variant)  # BuildError naming convert/calibrate if missing
        wanted.append((name, variant, onnx, derive_profiles(spec, profile), options_for(spec, options)))
    import_tensorrt()
    require_cuda()
    import tensorrt as trt

    version = str(trt.__version__)
    gpu = Gpu.current()
    store = EngineStore(build)
    cache = TimingCache(Path(timing_cache) if timing_cache else store.timing_cache_path(version), version)
    plans = [
        (name, variant, EngineKey(name, str(variant), onnx, profiles, graph_options, version, gpu))
        for name, variant, onnx, profiles, graph_options in wanted
    ]
    results = []
    for name, variant, key in tqdm(plans, disable=not progress, desc="engines", unit="graph", leave=False):
        current = None if force else store.current(key)
        if current is not None:
            logger.info("%s %s engine is current", name, variant)
            results.append(EngineResult(name, str(variant), "current", 0.0, current.plan_bytes))
            continue
        logger.info("building the %s %s engine", variant, name)
        start = time.perf_counter()
        plan = build_plan(build.graph_path(name, variant), key.profiles, key.options, cache)
        record = store.write(key, plan)
        results.append(EngineResult(name, str(variant), "built", time.perf_counter() - start, record.plan_bytes))
    return results


def build_plan(onnx_path: Path, profiles: list[Profile], options: BuildOptions, cache: TimingCache) -> bytes:
    """Parse ``onnx_path`` strongly typed and build a serialized engine with polygraphy."""
    import_tensorrt()
    import tensorrt as trt
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
    )
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    polygraphy_profiles = []
    for shapes in profiles:
        p = PolygraphyProfile()
        for name, r in shapes.items():
            p.add(name, min=r.min, opt=r.opt, max=r.max)
        polygraphy_profiles.append(p)
    pools = None
    if options.workspace_gb is not None:
        pools = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gb * (1 << 30))}
    existing = cache.usable()
    config = CreateConfig(
        profiles=polygraphy_profiles,
        load_timing_cache=str(cache.path) if existing else None,
        refittable=options.refittable,
        strip_plan=options.weight_stripped,
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=pools,
        weight_streaming=options.weight_streaming or None,
    )
    if options.weight_stripped and not options.refittable:
        config = PostprocessConfig(config, func=_refit_identical)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    if not existing:
        cache.path.unlink(missing_ok=True)  # another version's cache: start afresh
    try:
        plan = EngineBytesFromNetwork(network, config, save_timing_cache=str(cache.path))()
    except Exception as exc:  # polygraphy reports parser and builder failures as its own exception
        raise BuildError(f"TensorRT could not build {onnx_path.name}: {str(exc).strip().splitlines()[-1]}") from None
    if plan is None:
        raise BuildError(f"TensorRT could not build {onnx_path.name} (see the TensorRT log above)")
    cache.mark_written()
    return bytes(plan)


def _refit_identical(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> None:
    """Weight-stripped plans are refitted with the weights they were built from."""
    import tensorrt as trt

    config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
