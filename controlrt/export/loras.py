"""``controlrt lora``: change the LoRAs fused into a build without touching its ControlNets.

The graphs the old or the new LoRAs adapt (the UNet, the text encoders) are exported again from the
base weights plus the new LoRAs (never by subtracting the old ones from the graphs), each checked
against PyTorch on onnxruntime; their fp16 variants are made again and checked against the new
fp32 graphs; their int8 variants, calibrated on other weights, are dropped with a message saying to
recalibrate. Refittable TensorRT engines of those graphs are refitted from the new graphs and
checked numerically before anything is written; other engines of those graphs go stale (their key
names the old graph) and ``controlrt build`` rebuilds them.

Everything is staged under new file names; then, under the build's lock, the graphs move in, the
manifest (with the new LoRA records) is written last, refitted engines are recorded, and the old
files are deleted, as for every command that changes a build.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from controlrt.compare import compare_in_turn, raise_on_failures, seeded_cases
from controlrt.errors import BackendError, BuildError
from controlrt.export.variants import commit_graphs, new_graph_name
from controlrt.families import Family, family_of
from controlrt.lora import Lora, adapted_components, check_loras
from controlrt.manifest import Build, Manifest, Variant
from controlrt.models import BaseModel, source_differences
from controlrt.precision import Precision
from controlrt.progress import progress_bar
from controlrt.specs import GraphKind, GraphSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraChange:
    """What ``set_loras`` did."""

    graphs: tuple[str, ...]  # re-exported
    remade: tuple[str, ...]  # "graph precision" variants made again (fp16)
    dropped: tuple[str, ...]  # "graph precision" variants dropped (int8)
    refitted: tuple[str, ...]  # "graph precision" engines refitted
    stale: tuple[str, ...]  # "graph precision" engines left stale (rebuild them)

    def summary(self) -> list[str]:
        lines = [f"re-exported: {', '.join(self.graphs) or 'nothing (no graph is adapted)'}"]
        if self.remade:
            lines.append(f"made again: {', '.join(self.remade)}")
        if self.refitted:
            lines.append(f"engines refitted: {', '.join(self.refitted)}")
        if self.dropped:
            lines.append(f"dropped (made from other weights; run controlrt calibrate again): {', '.join(self.dropped)}")
        if self.stale:
            lines.append(f"engines now stale (rebuild with controlrt build): {', '.join(self.stale)}")
        return lines


def component_of(spec: GraphSpec, base: BaseModel) -> str | None:
    """The base component a graph computes, for the graphs LoRAs can adapt."""
    if spec.kind is GraphKind.UNET:
        return base.denoiser_component
    if spec.kind is GraphKind.TEXT_ENCODER:
        return base.text_encoder_names[spec.index]
    return None


def set_loras(build_dir: str | Path, loras: list[Lora], progress: bool = False, device: str = "cuda") -> LoraChange:
    """Fuse ``loras`` (none: the base as it is) into the build's UNet and text encoder graphs."""
    from controlrt.engine.cache import EngineStore
    from controlrt.export.build import check_in_turn
    from controlrt.export.onnx_export import ExportSettings, export_onnx
    from controlrt.families import load_graph_module

    loras = check_loras(loras)
    build = Build.open(build_dir)
    build.require_fp32_graphs("lora")
    manifest = build.manifest
    family = family_of(manifest.info)
    recorded = manifest.sources["base"]
    try:
        base = BaseModel.open(recorded["path"]).with_vae(recorded.get("vae"))
    except Exception as exc:
        raise BuildError(f"build {build.path}: changing its LoRAs needs its base model ({exc})") from None
    changed = [r for r in source_differences({**recorded, "loras": []}, base.source_record()) if r != "LoRAs"]
    if changed:
        raise BuildError(
            f"base model {base.path} changed since the build was exported ({', '.join(changed[:3])}); "
            "re-run controlrt export"
        )
    new_base = base.with_loras(loras)
    pipeline = family_of(manifest.info).lora_pipeline
    old_components = {c for r in recorded.get("loras", []) for c in r.get("components", ("unet", "text_encoder"))}
    if recorded.get("loras") and any("components" not in r for r in recorded["loras"]):
        old_components |= {base.denoiser_component, *base.text_encoder_names}
    components = old_components | adapted_components(loras, pipeline)
    specs = [spec for name in manifest.graphs if component_of(spec := manifest.spec(name), base) in components]
    store = EngineStore(build)
    settings = ExportSettings.from_dict(manifest.settings)
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=build.path))
    made: dict[tuple[str, str], tuple[list[Path], Variant]] = {}
    sources = {}
    remade, dropped, refittable, stale = [], [], {}, []
    try:
        for spec in progress_bar(specs, progress, "lora", "graph"):
            logger.info("exporting %s with the new LoRAs", spec.name)
            module = load_graph_module(spec, new_base, [])
            files = export_onnx(module, spec, staging / new_graph_name(spec.name, Precision.FP32), settings)
            owner = [module]
            del module
            rows = check_in_turn(owner, spec, files[0], family)
            raise_on_failures(rows, f"{spec.name} with the new LoRAs does not reproduce PyTorch on onnxruntime")
            old = manifest.graphs[spec.name]
            made[spec.name, "fp32"] = (files, Variant((), [asdict(r) for r in rows], old.variants["fp32"].settings))
            sources[spec.name] = tuple((f.path, f.sha256) for f in build.variant(spec.name).files)
            new_onnx = {Precision.FP32: files[0]}
            for precision in old.variants:
                if precision == "fp16":
                    fp16 = _remake_fp16(spec, files[0], staging, family)
                    made[spec.name, "fp16"] = (fp16[0], Variant((), fp16[1], old.variants["fp16"].settings))
                    new_onnx[Precision.FP16] = fp16[0][0]
                    remade.append(f"{spec.name} fp16")
                elif precision == "int8":
                    dropped.append(f"{spec.name} int8")
            records = {}
            for precision in Precision:
                record = store.record(spec.name, precision)
                if record is None:
                    continue
                if record.key.options.refittable and precision in new_onnx:
                    records[precision] = record
                else:
                    stale.append(f"{spec.name} {precision}")
            if records:
                refittable[spec.name] = (records, new_onnx)
        refitted = _refit(build, refittable, device, stale)

        def update(current: Manifest) -> Manifest:
            for item in dropped:
                name, precision = item.split()
                current = current.without_variant(precision, [name])
            base_record = {k: v for k, v in current.sources["base"].items() if k != "loras"}
            if loras:
                base_record["loras"] = new_base.source_record()["loras"]
            return replace(current, sources={**current.sources, "base": base_record})

        def after(new_build: Build) -> None:
            if refitted:
                from controlrt.engine.refit import write_refitted

                write_refitted(new_build, refitted)

        commit_graphs(build.path, made, sources, update, after)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    engines = tuple(f"{g} {p}" for g, (records, _) in refitted.items() for p in records)
    return LoraChange(tuple(s.name for s in specs), tuple(remade), tuple(dropped), engines, tuple(stale))


def _remake_fp16(spec: GraphSpec, fp32: Path, staging: Path, family: Family) -> tuple[list[Path], list[dict]]:
    """The fp16 variant of a new fp32 graph, checked against it as ``controlrt convert`` checks."""
    from controlrt.export.fp16 import convert_graph_fp16
    from controlrt.ort_session import OrtSession

    files = convert_graph_fp16(fp32, staging / new_graph_name(spec.name, Precision.FP16))
    rows = compare_in_turn(
        lambda: OrtSession(fp32, spec),
        lambda: OrtSession(files[0], spec),
        seeded_cases(spec),
        family.tolerance(Precision.FP16, spec.kind),
    )
    raise_on_failures(rows, f"the fp16 {spec.name} graph with the new LoRAs is out of tolerance")
    return files, [asdict(r) for r in rows]


def _refit(build: Build, refittable: dict, device: str, stale: list[str]) -> dict:
    """Refit what can be refitted here; engines that cannot (no TensorRT or GPU, or built for another
    TensorRT or GPU) are left stale. A refit that does not reproduce its new graph raises."""
    from controlrt.engine.refit import refit_engines

    refitted = {}
    for graph, (records, new_onnx) in refittable.items():
        try:
            refitted[graph] = (records, refit_engines(build, graph, records, new_onnx, device))
        except (BackendError, BuildError) as exc:  # no TensorRT or GPU here, or engines already stale
            logger.warning("cannot refit the %s engines here (%s); they are left stale", graph, exc)
            stale.extend(f"{graph} {p}" for p in records)
    return refitted
