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
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from controlrt.engine.cache import EngineRecord, EngineStore, Gpu
from controlrt.errors import BuildError, InputError, ValidationError
from controlrt.manifest import Build, FileRecord, GraphRecord, Variant
from controlrt.precision import Precision
from controlrt.specs import GraphSpec

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
        if name in (spec.name, str(spec.attributes.get("controlnet_name"))):
            return spec
    names = ", ".join(f"{s.name} ({s.attributes.get('controlnet_name')})" for s in specs)
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
        data = source.with_name(source.name + ".data")
        fp32_files = [source, *([data] if data.is_file() else [])]
        source_record = {"path": str(source.resolve()), "onnx": True}
    elif source.is_dir():
        folder, fp32_files = _export_controlnet(build, spec, source, staging)
        source_record = folder.source_record()
    else:
        raise InputError(f"--from {source}: give a diffusers ControlNet folder or an fp32 .onnx file")
    new_graphs: dict[Precision, list[Path]] = {Precision.FP32: fp32_files}
    if Precision.FP16 in records:
        from controlrt.export.fp16 import convert_graph_fp16

        new_graphs[Precision.FP16] = convert_graph_fp16(fp32_files[0], staging / f"{spec.name}.fp16.onnx")
    for precision in records:
        check_same_architecture(build.graph_path(spec.name, precision), new_graphs[precision][0])
    variants = build.manifest.graphs[spec.name].variants
    dropped = tuple(sorted(p for p in variants if Precision(p) not in new_graphs))
    return RefitPlan(spec.name, records, new_graphs, source_record, dropped)


def _export_controlnet(build: Build, spec: GraphSpec, folder_path: Path, staging: Path):
    """Export and validate the ControlNet in ``folder_path`` as ``spec``'s graph (fp32)."""
    from controlrt.export.onnx_export import ExportSettings, export_onnx
    from controlrt.graphs import ControlNetGraph
    from controlrt.models import ControlNetModelFolder
    from controlrt.parity import compare_graph
    from controlrt.runtime.ort_backend import OrtSession
    from controlrt.runtime.torch_backend import TorchSession

    folder = ControlNetModelFolder.open(folder_path)
    folder.check_fits(build.manifest.info)
    channels = spec.tensor("controlnet_cond").shape[1]
    if folder.conditioning_channels != channels:
        raise InputError(
            f"ControlNet {folder.name} takes {folder.conditioning_channels}-channel controls, the engine {channels}"
        )
    module = ControlNetGraph(folder.load()).eval()
    settings = ExportSettings.from_dict(build.manifest.settings)
    files = export_onnx(module, spec, staging / f"{spec.name}.onnx", settings)
    with OrtSession(files[0], spec) as candidate:
        rows = compare_graph(TorchSession(module, spec), candidate)
    failed = [r for r in rows if not r.passed]
    if failed:
        raise ValidationError(f"{folder.name} does not reproduce PyTorch on onnxruntime ({failed[0].output})")
    return folder, files


def refit_controlnet(build_dir: str | Path, controlnet: str, source: str | Path) -> list[str]:
    """Refit the ControlNet's engines with the weights of ``source``; returns what was refitted."""
    from controlrt.engine.trt import import_tensorrt, require_cuda
    from controlrt.runtime.trt_backend import refit_from_onnx

    build = Build.open(build_dir)
    staging = Path(tempfile.mkdtemp(prefix=".refit-", dir=build.path))
    try:
        plan = plan_refit(build, controlnet, source, staging)
        import_tensorrt()
        require_cuda()
        import tensorrt as trt

        version, gpu = str(trt.__version__), Gpu.current()
        store = EngineStore(build)
        plans = {}
        for precision, record in plan.records.items():
            store.check_runnable(plan.graph, precision, version, gpu)  # only current engines are refitted
            trt_logger = trt.Logger(trt.Logger.WARNING)
            engine = trt.Runtime(trt_logger).deserialize_cuda_engine(store.read_plan(record))
            if engine is None:
                raise BuildError(f"TensorRT could not deserialize the {precision} {plan.graph} engine")
            refit_from_onnx(engine, plan.new_graphs[precision][0], trt_logger)
            plans[precision] = bytes(engine.serialize())
        _commit(build, plan, plans)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [f"{plan.graph} {p}" for p in plan.records]


def _commit(build: Build, plan: RefitPlan, plans: dict[Precision, bytes]) -> None:
    """New graph files, then the engines and their records, then the manifest."""
    manifest = build.manifest
    graph = manifest.graphs[plan.graph]
    variants = {p: v for p, v in graph.variants.items() if p not in plan.dropped}
    for precision, files in plan.new_graphs.items():
        old = graph.variants[str(precision)]
        moved = []
        if len(files) != len(old.files):
            raise InputError(f"{files[0].name} and the build's {plan.graph} graph store their weights differently")
        for new_file, old_record in zip(files, old.files, strict=True):
            target = build.path / old_record.path
            tmp = target.with_name(f".{target.name}.refit")
            shutil.copyfile(new_file, tmp)
            os.replace(tmp, target)
            moved.append(target)
        settings = {**old.settings, "refitted_from": plan.source["path"]}
        variants[str(precision)] = Variant(tuple(FileRecord.of(build.path, f) for f in moved), [], settings)
    graphs = {**manifest.graphs, plan.graph: GraphRecord(graph.spec, variants)}
    index = int(graph.spec.attributes["controlnet_index"])
    controlnets = list(manifest.sources["controlnets"])
    controlnets[index] = plan.source
    sources = {**manifest.sources, "controlnets": controlnets}
    new_manifest = replace(manifest, graphs=graphs, sources=sources)
    store = EngineStore(replace(build, manifest=new_manifest))
    for precision, data in plans.items():
        record = plan.records[precision]
        key = replace(record.key, onnx=tuple((f.path, f.sha256) for f in variants[str(precision)].files))
        store.write(key, data, refitted_from=record.key.onnx)
    new_manifest.write(build.path)
    logger.info("refitted %s with %s; dropped variants: %s", plan.graph, plan.source["path"], plan.dropped or "none")
