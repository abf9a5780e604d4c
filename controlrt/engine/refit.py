"""``controlrt refit``: swap a ControlNet's weights inside its engine, without a rebuild.

The new ControlNet must have the architecture of the one the engine was built from: the same
weight names, shapes and types in its ONNX graph (checked on the CPU before TensorRT is touched).
It comes as a diffusers ControlNet folder (exported and validated here, converted to fp16 when
the engine is fp16) or as an ONNX file of the engine's precision. Engines must have been built
with ``--refittable``; int8 engines are not refitted, since their scales come from calibration.

The build then describes the new ControlNet: its graph replaces the old one, the graph's other
precision variants (made from the old weights) are dropped, the source is updated, and each
refitted engine's record names the new graph, all written with the manifest last.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from controlrt.engine.cache import EngineRecord, EngineStore, Gpu
from controlrt.errors import BuildError, InputError
from controlrt.export.variants import new_graph_name
from controlrt.manifest import Build, GraphRecord, Manifest, Variant
from controlrt.precision import Precision
from controlrt.specs import GraphSpec

if TYPE_CHECKING:
    from controlrt.compare import Tolerance

logger = logging.getLogger(__name__)

WeightSignature = dict[str, tuple[tuple[int, ...], int]]


def weight_signature(onnx_path: Path) -> WeightSignature:
    """name -> (shape, ONNX data type) of every initializer, read without loading the weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a bad file
        raise InputError(f"{onnx_path} is not a readable ONNX file ({exc})") from None
    return {init.name: (tuple(init.dims), init.data_type) for init in model.graph.initializer}


def check_same_architecture(current: Path, new: Path) -> None:
    """InputError naming the first weight that differs unless both graphs hold the same weights."""
    old_sig, new_sig = weight_signature(current), weight_signature(new)
    missing = sorted(set(old_sig) - set(new_sig))
    extra = sorted(set(new_sig) - set(old_sig))
    if missing or extra:
        example = (missing or extra)[0]
        raise InputError(
            f"{new.name} does not have the engine's architecture: {len(missing)} weights missing and "
            f"{len(extra)} extra (e.g. {example!r})"
        )
    for name, (shape, dtype) in old_sig.items():
        if new_sig[name] != (shape, dtype):
            raise InputError(
                f"{new.name} does not have the engine's architecture: weight {name!r} is "
                f"{new_sig[name][0]} of type {new_sig[name][1]}, the engine's is {shape} of type {dtype}"
            )


@dataclass(frozen=True)
class RefitPlan:
    """What a refit will do, decided and checked before anything is written."""

    graph: str
    records: dict[Precision, EngineRecord]  # the refittable engines of the graph
    new_graphs: dict[Precision, list[Path]]  # the new ONNX files per precision (staged)
    source: dict  # the new source record
    dropped: tuple[str, ...]  # graph variants made from the old weights, removed from the build


def resolve_controlnet(build: Build, name: str) -> GraphSpec:
    """A ControlNet graph by graph name (controlnet_0) or by its source folder's name."""
    specs = build.manifest.controlnet_specs
    for spec in specs:
        if name in (spec.name, spec.source_name):
            return spec
    names = ", ".join(f"{s.name} ({s.source_name})" for s in specs)
    raise InputError(f"build {build.path} has no ControlNet {name!r}; it has {names}")


def plan_refit(build: Build, controlnet: str, source: str | Path, staging: Path) -> RefitPlan:
    """Check the swap and stage the new graphs; touches neither the build nor any engine."""
    spec = resolve_controlnet(build, controlnet)
    store = EngineStore(build)
    records: dict[Precision, EngineRecord] = {}
    for precision in Precision:
        record = store.record(spec.name, precision)
        if record is None:
            continue
        if not record.key.options.refittable:
            raise BuildError(
                f"the {precision} engine of {spec.name} is not refittable; rebuild it with "
                f"controlrt build {build.path} --precision {precision} --refittable"
            )
        if precision is Precision.INT8:
            raise InputError(
                f"the int8 engine of {spec.name} cannot take new weights (its scales come from calibration); "
                "re-run controlrt calibrate and controlrt build"
            )
        records[precision] = record
    if not records:
        raise BuildError(
            f"build {build.path} has no engine for {spec.name}; "
            f"build one with controlrt build {build.path} --refittable"
        )
    source = Path(source).expanduser()
    if source.is_file() and source.suffix == ".onnx":
        check_same_architecture(build.graph_path(spec.name), source)  # an fp32 graph of this architecture
        fp32_files = _copy_onnx(source, staging / new_graph_name(spec.name, Precision.FP32))
        source_record = {"path": str(source.resolve()), "onnx": True}
    elif source.is_dir():
        folder, fp32_files = _export_controlnet(build, spec, source, staging)
        source_record = folder.source_record()
    else:
        raise InputError(f"--from {source}: give a diffusers ControlNet folder or an fp32 .onnx file")
    new_graphs: dict[Precision, list[Path]] = {Precision.FP32: fp32_files}
    if Precision.FP16 in records:
        from controlrt.export.fp16 import convert_graph_fp16

        new_graphs[Precision.FP16] = convert_graph_fp16(
            fp32_files[0], staging / new_graph_name(spec.name, Precision.FP16)
        )
    for precision in records:
        check_same_architecture(build.graph_path(spec.name, precision), new_graphs[precision][0])
    variants = build.manifest.graphs[spec.name].variants
    dropped = tuple(sorted(p for p in variants if Precision(p) not in new_graphs))
    return RefitPlan(spec.name, records, new_graphs, source_record, dropped)


def _copy_onnx(source: Path, target: Path) -> list[Path]:
    """A copy of an ONNX file (and its external data) under a new name."""
    import onnx

    from controlrt.export.onnx_export import save_onnx

    try:
        model = onnx.load(str(source), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, FileNotFoundError for missing data, ...
        raise InputError(f"{source} is not a readable ONNX file ({str(exc).splitlines()[0]})") from None
    return save_onnx(model, target, external=source.with_name(source.name + ".data").exists())


def _export_controlnet(build: Build, spec: GraphSpec, folder_path: Path, staging: Path):
    """Export and validate the ControlNet in ``folder_path`` as ``spec``'s graph (fp32)."""
    from controlrt.compare import raise_on_failures
    from controlrt.export.build import check_in_turn
    from controlrt.export.onnx_export import ExportSettings, export_onnx
    from controlrt.families import family_of
    from controlrt.models import ControlNetModelFolder

    folder = ControlNetModelFolder.open(folder_path)
    folder.check_fits(build.manifest.info)
    channels = spec.tensor("controlnet_cond").shape[1]
    if folder.conditioning_channels != channels:
        raise InputError(
            f"ControlNet {folder.name} takes {folder.conditioning_channels}-channel controls, the engine {channels}"
        )
    family = family_of(build.manifest.info)
    module = family.controlnet_graph(folder).eval()
    settings = ExportSettings.from_dict(build.manifest.settings)
    files = export_onnx(module, spec, staging / new_graph_name(spec.name, Precision.FP32), settings)
    owner = [module]
    del module
    rows = check_in_turn(owner, spec, files[0], family)
    raise_on_failures(rows, f"{folder.name} does not reproduce PyTorch on onnxruntime")
    return folder, files


def check_refitted(
    spec: GraphSpec, precision: Precision, plan: bytes, profiles, onnx_path: Path, device, tolerance: Tolerance
) -> None:
    """ValidationError unless the refitted engine computes what its new ONNX graph computes on
    onnxruntime, at the shapes of its profiles.

    A refit that did not take (old weights, or a blend of old and new) is off by far more than
    ``tolerance`` (the family's fp16 bounds, for fp32 and fp16 engines alike).
    """
    from controlrt.compare import compare_feeds, raise_on_failures, seeded_cases
    from controlrt.engine.profiles import profile_sizes
    from controlrt.engine.session import TensorRTSession
    from controlrt.ort_session import OrtSession

    cases = seeded_cases(spec, profile_sizes(profiles, spec)[:2], seed=97)
    with TensorRTSession(plan, spec, profiles, device=device) as engine, OrtSession(onnx_path, spec) as reference:
        rows = compare_feeds(reference, engine, cases, tolerance)
    raise_on_failures(
        rows, f"the refitted {precision} {spec.name} engine does not reproduce its new graph (the build is unchanged)"
    )


def refit_engines(
    build: Build,
    graph: str,
    records: dict[Precision, EngineRecord],
    new_onnx: dict[Precision, Path],
    device: str = "cuda",
) -> dict[Precision, bytes]:
    """Each engine in ``records`` with the weights of its new graph, checked against that graph on
    onnxruntime; touches nothing on disk. The weights come whole from the new graph, so an engine
    never carries a blend of old and new weights."""
    from controlrt.engine.session import refit_from_onnx
    from controlrt.engine.trt import import_tensorrt, require_cuda
    from controlrt.families import family_of

    import_tensorrt()
    require_cuda()
    import tensorrt as trt

    version, gpu = str(trt.__version__), Gpu.current()
    store = EngineStore(build)
    spec = build.manifest.spec(graph)
    tolerance = family_of(build.manifest.info).tolerance(Precision.FP16, spec.kind)
    plans = {}
    for precision, record in records.items():
        store.check_runnable(graph, precision, version, gpu)  # only current engines are refitted
        trt_logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(trt_logger).deserialize_cuda_engine(store.read_plan(record))
        if engine is None:
            raise BuildError(f"TensorRT could not deserialize the {precision} {graph} engine")
        refit_from_onnx(engine, new_onnx[precision], trt_logger)
        plans[precision] = bytes(engine.serialize())
        check_refitted(spec, precision, plans[precision], record.key.profiles, new_onnx[precision], device, tolerance)
    return plans


def write_refitted(
    new_build: Build, refitted: dict[str, tuple[dict[Precision, EngineRecord], dict[Precision, bytes]]]
) -> None:
    """Write refitted engines with records naming the graphs of ``new_build`` (under its lock)."""
    store = EngineStore(new_build)
    for graph, (records, plans) in refitted.items():
        for precision, data in plans.items():
            record = records[precision]
            files = new_build.variant(graph, precision).files
            key = replace(record.key, onnx=tuple((f.path, f.sha256) for f in files))
            store.write(key, data, refitted_from=record.key.onnx)


def refit_controlnet(build_dir: str | Path, controlnet: str, source: str | Path, device: str = "cuda") -> list[str]:
    """Refit the ControlNet's engines with the weights of ``source``; returns what was refitted.

    New graphs are staged under new names; each refitted engine is checked against its new graph
    on onnxruntime before anything in the build changes. Then, under the build's lock, the graphs
    move in, the manifest is written, the engines and their records are replaced, and the old
    graphs are deleted last.
    """
    from controlrt.export.variants import commit_graphs

    build = Build.open(build_dir)
    build.require_fp32_graphs("refit")
    staging = Path(tempfile.mkdtemp(prefix=".refit-", dir=build.path))
    try:
        plan = plan_refit(build, controlnet, source, staging)
        new_onnx = {p: files[0] for p, files in plan.new_graphs.items()}
        plans = refit_engines(build, plan.graph, plan.records, new_onnx, device)
        old = tuple((f.path, f.sha256) for f in build.variant(plan.graph, Precision.FP32).files)
        made = {
            (plan.graph, str(p)): (
                files,
                Variant((), [], {**build.variant(plan.graph, p).settings, "refitted_from": plan.source["path"]}),
            )
            for p, files in plan.new_graphs.items()
        }

        def update(manifest: Manifest) -> Manifest:
            graph = manifest.graphs[plan.graph]
            variants = {p: v for p, v in graph.variants.items() if p not in plan.dropped}
            controlnets = list(manifest.sources["controlnets"])
            controlnets[graph.spec.index] = plan.source
            return replace(
                manifest,
                graphs={**manifest.graphs, plan.graph: GraphRecord(graph.spec, variants)},
                sources={**manifest.sources, "controlnets": controlnets},
            )

        refitted = {plan.graph: (plan.records, plans)}
        commit_graphs(build.path, made, {plan.graph: old}, update, lambda b: write_refitted(b, refitted))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("refitted %s with %s; dropped variants: %s", plan.graph, plan.source["path"], plan.dropped or "none")
    return [f"{plan.graph} {p}" for p in plan.records]
