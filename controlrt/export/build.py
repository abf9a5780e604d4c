"""``controlrt export``: diffusers folders -> a validated build folder with its manifest."""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from controlrt.compare import Comparison, Tolerance, compare_in_turn, raise_on_failures, seeded_cases
from controlrt.errors import InputError
from controlrt.export.onnx_export import EXPORT_PRECISIONS, ExportSettings, export_onnx
from controlrt.families import Family, family_of, load_graph_module
from controlrt.io import output_folder, staged_folder
from controlrt.lora import Lora
from controlrt.manifest import FileRecord, GraphRecord, Manifest, Variant, explain_build
from controlrt.models import BaseModel, ControlNetModelFolder
from controlrt.precision import Precision
from controlrt.progress import progress_bar
from controlrt.specs import GraphSpec

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)


def _copy_assets(base: BaseModel, staging: Path) -> list[Path]:
    """The tokenizer(s) and scheduler config the runtime needs, so a build stands on its own."""
    files = []
    for name in family_of(base.info()).tokenizer_components:
        tokenizer = staging / name
        shutil.copytree(base.path / name, tokenizer)
        files += sorted(p for p in tokenizer.rglob("*") if p.is_file())
    (staging / "scheduler").mkdir()
    shutil.copy2(base.path / "scheduler" / "scheduler_config.json", staging / "scheduler")
    files.append(staging / "scheduler" / "scheduler_config.json")
    return files


def check_in_turn(
    owner: list, spec: GraphSpec, onnx_path: Path, family: Family, precision: Precision = Precision.FP32
) -> list[Comparison]:
    """The exported graph against its module (computing in ``precision``), never holding both: the
    module (the only reference, in ``owner``) runs every case and is let go before onnxruntime loads.

    fp32: at the family's fp32 tolerances. fp16: two 16-bit computations of one graph (torch's and
    onnxruntime's, which round in different places) differ by up to the sum of their errors against
    fp32, so at twice the family's fp16 tolerances (measured on the small Flux set: the transformer
    0.052 rel L2 between them at guidance 19, each 0.028-0.042 from fp32); what a user runs is
    judged against fp32 by ``controlrt parity --precision fp16``.
    """
    import torch

    from controlrt.ort_session import OrtSession
    from controlrt.runtime.torch_backend import TorchSession

    dtype = getattr(torch, EXPORT_PRECISIONS[precision])
    tolerance = family.tolerance(precision, spec.kind)
    if precision is not Precision.FP32:
        tolerance = Tolerance(2 * tolerance.rel_l2, 2 * tolerance.max_rel)
    return compare_in_turn(
        lambda: TorchSession(owner.pop(), spec, dtype=dtype),
        lambda: OrtSession(onnx_path, spec),
        seeded_cases(spec),
        tolerance,
    )


def _graph_module(spec: GraphSpec, base: BaseModel, controlnets: list, precision: Precision) -> nn.Module:
    """The module export traces for ``spec``: loaded in ``precision`` and, when that is 16-bit,
    behind fp32 inputs and outputs (the graph contract's, whatever the precision)."""
    import torch

    from controlrt.graphs import ComputeIn

    dtype = EXPORT_PRECISIONS[precision]
    module = load_graph_module(spec, base.with_dtype(dtype), [cn.with_dtype(dtype) for cn in controlnets])
    if precision is Precision.FP32:
        return module
    return ComputeIn(module, spec.input_names, getattr(torch, dtype)).eval()


def export_build(
    base_dir: str | Path,
    controlnet_dirs: Sequence[str | Path],
    out_dir: str | Path,
    settings: ExportSettings | None = None,
    force: bool = False,
    validate: bool = True,
    progress: bool = False,
    loras: Sequence[Lora] = (),
    vae_dir: str | Path | None = None,
) -> Manifest:
    """Export the text encoder(s), each ControlNet, the UNet and the VAE decoder and encoder to ONNX.

    ``vae_dir`` is a VAE folder used in place of the base's own (a tiny VAE, TAESD: its graphs,
    scaling and the torch reference all follow it).

    Every graph is checked against its PyTorch module on onnxruntime CPU right after export, at
    two shapes. The build is assembled in a temporary folder beside ``out_dir`` and renamed into
    place with manifest.json written last, so an export that dies leaves nothing a later command
    accepts. The target is checked before the work and again under its lock before the rename:
    an existing build is replaced only with ``force``, and a folder that is not a build, or a
    build holding files controlrt did not write, never.

    Raises:
        ModelError: A folder is missing or unsupported, or a ControlNet does not fit the UNet.
        InputError: ``out_dir`` exists (and ``force`` is off, or it is not controlrt's).
        ExportError / ValidationError: A graph failed to export or to reproduce PyTorch.
    """
    settings = settings or ExportSettings()
    if not controlnet_dirs:
        raise InputError("give at least one ControlNet folder (--controlnet)")
    base = BaseModel.open(base_dir).with_vae(vae_dir).with_loras(loras)
    info = base.info()
    controlnets = [ControlNetModelFolder.open(d) for d in controlnet_dirs]
    for cn in controlnets:
        cn.check_fits(info)
    if sum(cn.union for cn in controlnets) > 1:
        raise InputError("give at most one union ControlNet per build (it takes every typed control)")
    with staged_folder(out_dir, "export", force, explain=explain_build, owner=False) as staging:
        (staging / "graphs").mkdir()
        records = {}
        family = family_of(info)
        specs = family.graph_specs(controlnets)
        wanted = Precision.parse(settings.precision)
        kept = family.kept_in_fp32() if wanted is not Precision.FP32 else {}
        for spec in progress_bar(specs, progress, "export", "graph"):
            logger.info("exporting %s", spec.name)
            precision = Precision.FP32 if spec.name in kept else wanted
            module = _graph_module(spec, base, controlnets, precision)
            files = export_onnx(module, spec, staging / "graphs" / f"{spec.name}.onnx", settings)
            owner = [module]  # the session below takes the only reference, and drops it when closed
            del module
            rows = []
            if validate:
                # PyTorch runs every case and lets the module go before onnxruntime loads the graph,
                # so that a full-size UNet and its session need not fit in memory together
                rows = check_in_turn(owner, spec, files[0], family, precision)
                raise_on_failures(rows, f"{spec.name} does not reproduce PyTorch on onnxruntime")
            made = {"exporter": settings.to_dict()}
            if wanted is not Precision.FP32:
                made["checked_against"] = f"the torch module in {precision}"
                if spec.name in kept:
                    made[spec.name] = f"kept in fp32: {kept[spec.name]}"
            variant = Variant(tuple(FileRecord.of(staging, f) for f in files), [asdict(r) for r in rows], made)
            records[spec.name] = GraphRecord(spec, {str(wanted): variant})
            owner.clear()
            gc.collect()
        assets = [FileRecord.of(staging, f) for f in _copy_assets(base, staging)]
        manifest = Manifest(
            info=info,
            graphs=records,
            assets=tuple(assets),
            sources={
                "base": base.source_record(),
                "controlnets": [cn.source_record() for cn in controlnets],
            },
            settings=settings.to_dict(),
        )
        manifest.write(staging)  # last: a folder without it is not a build
    out = output_folder(out_dir)
    logger.info("build written to %s", out)
    return manifest
