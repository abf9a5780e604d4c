"""Adding a precision variant (fp16, int8) of some graphs to an existing build.

New files are written beside the build, checked, moved into graphs/, and the manifest is
rewritten last. Until then the build's manifest does not list them, so nothing trusts them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from controlrt.errors import ValidationError
from controlrt.manifest import Build, FileRecord, Manifest, Variant
from controlrt.parity import Comparison
from controlrt.precision import Precision
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

Produce = Callable[[GraphSpec, Path], list[Path]]
Check = Callable[[GraphSpec, Path], list[Comparison]]


def variant_file_name(name: str, precision: Precision) -> str:
    return f"{name}.{precision}.onnx"


def write_variants(
    build: Build,
    precision: Precision,
    names: Sequence[str],
    produce: Produce,
    check: Check,
    settings: dict[str, Any],
    progress: bool = False,
) -> Manifest:
    """Make, check and record the ``precision`` variant of each graph in ``names``.

    Args:
        produce: (spec, output .onnx path) -> files written, the .onnx first.
        check: (spec, new .onnx path) -> comparisons; any failure raises ValidationError and the
            build stays as it was.
        settings: How the variant was made, recorded in the manifest.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{precision}-partial-", dir=build.path))
    try:
        made: dict[str, tuple[list[Path], list[Comparison]]] = {}
        for name in tqdm(names, disable=not progress, desc=str(precision), unit="graph", leave=False):
            spec = build.manifest.spec(name)
            logger.info("making the %s %s graph", precision, name)
            files = produce(spec, staging / variant_file_name(name, precision))
            rows = check(spec, files[0])
            failed = [r for r in rows if not r.passed]
            if failed:
                detail = "; ".join(f"{r.output} at {r.shape}: rel_l2 {r.rel_l2:.2e}" for r in failed[:4])
                raise ValidationError(f"the {precision} {name} graph is out of tolerance: {detail}")
            made[name] = (files, rows)
        variants = {}
        for name, (files, rows) in made.items():
            moved = []
            for f in files:
                target = build.path / "graphs" / f.name
                os.replace(f, target)
                moved.append(target)
            records = tuple(FileRecord.of(build.path, f) for f in moved)
            variants[name] = Variant(records, [asdict(r) for r in rows], settings)
        manifest = build.manifest.with_variants(str(precision), variants)
        manifest.write(build.path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
