"""``controlrt export``: diffusers folders -> a validated build folder with its manifest."""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from controlrt.errors import BuildError, InputError, ValidationError
from controlrt.export.onnx_export import ExportSettings, export_onnx
from controlrt.graphs import graph_specs, load_graph_module
from controlrt.io import replace_dir
from controlrt.manifest import MANIFEST_NAME, FileRecord, GraphRecord, Manifest, Variant
from controlrt.models import BaseModel, ControlNetModelFolder
from controlrt.parity import compare_graph

logger = logging.getLogger(__name__)


def _check_target(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not force:
        raise InputError(f"output folder {out} already exists; pass --force to replace it")
    if not (out / MANIFEST_NAME).is_file():
        raise InputError(f"output folder {out} is not a controlrt build; refusing to replace it even with --force")


def _copy_assets(base: BaseModel, staging: Path) -> list[Path]:
    """The tokenizer and scheduler config the runtime needs, so a build stands on its own."""
    files = []
    tokenizer = staging / "tokenizer"
    shutil.copytree(base.path / "tokenizer", tokenizer)
    files += sorted(p for p in tokenizer.rglob("*") if p.is_file())
    (staging / "scheduler").mkdir()
    shutil.copy2(base.path / "scheduler" / "scheduler_config.json", staging / "scheduler")
    files.append(staging / "scheduler" / "scheduler_config.json")
    return files


def export_build(
    base_dir: str | Path,
    controlnet_dirs: Sequence[str | Path],
    out_dir: str | Path,
    settings: ExportSettings | None = None,
    force: bool = False,
    validate: bool = True,
    progress: bool = False,
) -> Manifest:
    """Export the text encoder, each ControlNet, the UNet and the VAE decoder to ONNX.

    Every graph is checked against its PyTorch module on onnxruntime CPU right after export, at
    two shapes. The build is assembled in a temporary folder beside ``out_dir`` and renamed into
    place with manifest.json written last, so an export that dies leaves nothing a later command
    accepts.

    Raises:
        ModelError: A folder is missing or unsupported, or a ControlNet does not fit the UNet.
        InputError: ``out_dir`` exists (and ``force`` is off, or it is not a build).
        ExportError / ValidationError: A graph failed to export or to reproduce PyTorch.
    """
    from controlrt.runtime.ort_backend import OrtSession
    from controlrt.runtime.torch_backend import TorchSession

    settings = settings or ExportSettings()
    if not controlnet_dirs:
        raise InputError("give at least one ControlNet folder (--controlnet)")
    base = BaseModel.open(base_dir)
    info = base.info()
    controlnets = [ControlNetModelFolder.open(d) for d in controlnet_dirs]
    for cn in controlnets:
        cn.check_fits(info)
    out = Path(out_dir).expanduser().resolve()
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / "graphs").mkdir()
        records = {}
        specs = graph_specs(info, controlnets)
        for spec in tqdm(specs, disable=not progress, desc="export", unit="graph", leave=False):
            logger.info("exporting %s", spec.name)
            module = load_graph_module(spec, base, controlnets)
            files = export_onnx(module, spec, staging / "graphs" / f"{spec.name}.onnx", settings)
            rows = []
            if validate:
                with OrtSession(files[0], spec) as candidate:
                    rows = compare_graph(TorchSession(module, spec), candidate)
                failed = [r for r in rows if not r.passed]
                if failed:
                    detail = "; ".join(
                        f"{r.output} at {r.shape}: rel_l2 {r.rel_l2:.2e} max_abs {r.max_abs:.2e}"
                        + (f" ({r.note})" if r.note else "")
                        for r in failed
                    )
                    raise ValidationError(f"{spec.name} does not reproduce PyTorch on onnxruntime: {detail}")
            variant = Variant(
                tuple(FileRecord.of(staging, f) for f in files),
                [asdict(r) for r in rows],
                {"exporter": settings.to_dict()},
            )
            records[spec.name] = GraphRecord(spec, {"fp32": variant})
            del module
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
        if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise BuildError(f"{out} changed during export; not replacing it")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("build written to %s", out)
    return manifest
