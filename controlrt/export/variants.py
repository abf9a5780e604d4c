"""Adding a precision variant (fp16, int8) of some graphs to an existing build.

New files are made and checked in a temporary folder inside the build, under names no manifest
has used (``unet.fp16.<token>.onnx``), so the files the current manifest lists are never touched.
Then, under the build's lock, the manifest is read again, the new files are moved into graphs/,
the manifest is rewritten (last), and only then are the files of replaced variants deleted. A
crash at any point leaves a manifest whose every file matches its hash; concurrent ``convert``
and ``calibrate`` runs each add their variants to the manifest the other wrote.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from controlrt.compare import Comparison, raise_on_failures
from controlrt.errors import BuildError
from controlrt.io import file_lock, remove_files
from controlrt.manifest import Build, FileRecord, Manifest, Variant, tool_versions
from controlrt.precision import Precision
from controlrt.progress import progress_bar
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

Produce = Callable[[GraphSpec, Path], list[Path]]
Check = Callable[[GraphSpec, Path], list[Comparison]]


def new_graph_name(name: str, precision: Precision | str) -> str:
    """A file name for a new graph variant that no earlier one used: ``NAME.PRECISION.TOKEN.onnx``."""
    return f"{name}.{precision}.{secrets.token_hex(4)}.onnx"


def commit_graphs(
    build_dir: Path,
    made: dict[tuple[str, str], tuple[list[Path], Variant]],
    sources: dict[str, tuple[tuple[str, str], ...]],
    update: Callable[[Manifest], Manifest] | None = None,
    after: Callable[[Build], None] | None = None,
) -> Manifest:
    """Move new graph files into the build and record them, under the build's lock.

    Args:
        made: (graph name, precision) -> (its new files, the .onnx first; the Variant to record,
            whose file records are filled in here).
        sources: graph name -> the (path, sha256) pairs of the files the new variants were made
            from: if the build no longer has them, nothing is committed (it changed meanwhile).
        update: Further changes to the manifest (refit's new source, variants it drops).
        after: Work that needs the new manifest in place, still under the lock (refit's engines).

    Returns the manifest written. Files the old manifest listed and the new one does not are
    deleted last.
    """
    with file_lock(build_dir):
        build = Build.open(build_dir, verify=False)
        for name, identity in sources.items():
            record = build.manifest.graphs.get(name)
            now = [tuple((f.path, f.sha256) for f in v.files) for v in record.variants.values()] if record else []
            if identity not in now:
                raise BuildError(
                    f"build {build.path} changed while new {name} graphs were made (the graph they were made "
                    "from is gone); run the command again"
                )
        before = build.manifest.files
        manifest = build.manifest
        for (name, precision), (files, variant) in made.items():
            records = []
            for f in files:
                target = build.path / "graphs" / f.name
                if target.exists():
                    raise BuildError(f"build {build.path}: {target.name} exists already; run the command again")
                os.replace(f, target)
                records.append(FileRecord.of(build.path, target))
            manifest = manifest.with_variants(
                precision, {name: Variant(tuple(records), variant.validation, variant.settings)}
            )
        if update is not None:
            manifest = update(manifest)
        manifest.write(build.path)
        if after is not None:
            after(Build(build.path, manifest))
        remove_files(build.path, sorted(before - manifest.files))
    return manifest


def write_variants(
    build: Build,
    precision: Precision,
    names: Sequence[str],
    produce: Produce,
    check: Check,
    settings: dict[str, Any],
    progress: bool = False,
    drop: Sequence[str] = (),
) -> Manifest:
    """Make, check and record the ``precision`` variant of each graph in ``names``.

    Args:
        produce: (spec, output .onnx path) -> files written, the .onnx first.
        check: (spec, new .onnx path) -> comparisons; any failure raises ValidationError and the
            build stays as it was.
        settings: How the variant was made, recorded in the manifest (with the tool versions).
        drop: Graphs whose ``precision`` variant the new set replaces by none (their files are
            deleted after the manifest is written).
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{precision}-partial-", dir=build.path))
    settings = {**settings, "tools": tool_versions()}
    try:
        made: dict[str, tuple[list[Path], Variant]] = {}
        sources = {}
        for name in progress_bar(names, progress, str(precision), "graph"):
            spec = build.manifest.spec(name)
            logger.info("making the %s %s graph", precision, name)
            files = produce(spec, staging / new_graph_name(name, precision))
            rows = check(spec, files[0])
            raise_on_failures(rows, f"the {precision} {name} graph is out of tolerance")
            made[name, str(precision)] = (files, Variant((), [asdict(r) for r in rows], settings))
            sources[name] = tuple((f.path, f.sha256) for f in build.variant(name, Precision.FP32).files)
        update = (lambda m: m.without_variant(str(precision), drop)) if drop else None
        return commit_graphs(build.path, made, sources, update)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
