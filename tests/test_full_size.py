"""Stable Diffusion 1.5's full-size shapes with random weights: export (external data) and parity.

Slow (about 7 minutes on 2 cores, 21 GB peak memory, 12 GB of disk): run with ``pytest -m slow``.
"""

from __future__ import annotations

import pytest

from controlrt.builtin import SD15, write_builtin_models
from controlrt.export.build import export_build
from controlrt.manifest import Build
from controlrt.parity import run_parity

pytestmark = pytest.mark.slow


def test_sd15_shapes_export_and_parity(tmp_path):
    models = write_builtin_models(tmp_path / "models", SD15, seed=0)
    export_build(models.base, models.controlnets[:1], tmp_path / "build")
    build = Build.open(tmp_path / "build")
    unet = build.manifest.graphs["unet"]
    files = unet.variants["fp32"].files
    assert [f.path for f in files] == ["graphs/unet.onnx", "graphs/unet.onnx.data"]
    assert files[1].bytes > 2**31  # over protobuf's 2 GiB limit
    assert len(unet.spec.inputs) == 3 + 13
    report = run_parity(tmp_path / "build", steps=2)
    print(report.table())
    assert report.passed, report.table()
