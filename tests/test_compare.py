"""The gates of controlrt.compare: set from measurement, tight enough that small regressions fail."""

from __future__ import annotations

import json
import shutil

import onnx
from onnx import numpy_helper

from controlrt.compare import GATES, gate, tolerance_for
from controlrt.manifest import Build, FileRecord
from controlrt.parity import run_parity
from controlrt.precision import Precision
from controlrt.specs import GraphKind


def _perturb_unet(build, precision: str, delta: float) -> None:
    """Add ``delta`` to the UNet's last bias in its ``precision`` graph and record the file anew."""
    path = Build.open(build).graph_path("unet", precision)
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name.endswith("conv_out.bias"):
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((value + delta).astype(value.dtype), init.name))
    onnx.save(model, str(path))
    data = json.loads((build / "manifest.json").read_text())
    data["graphs"]["unet"]["variants"][precision]["files"][0] = FileRecord.of(build, path).__dict__
    (build / "manifest.json").write_text(json.dumps(data))


def test_a_small_fp16_regression_fails_parity(tiny_build, tmp_path):
    """An fp16 UNet a few times less exact than measured fails, though the old gate (2e-2) passed it."""
    from controlrt.export.fp16 import convert_build

    build = shutil.copytree(tiny_build, tmp_path / "build")
    convert_build(build, "fp16")
    _perturb_unet(build, "fp16", 4e-3)
    report = run_parity(build, precision="fp16", steps=2)
    unet = [r for r in report.graphs if r.graph == "unet"]
    assert not report.passed and not any(r.passed for r in unet)
    assert all(tolerance_for("fp16", GraphKind.UNET).rel_l2 < r.rel_l2 < 2e-2 for r in unet), [r.rel_l2 for r in unet]
    assert all(r.passed for r in report.graphs if r.graph != "unet")


def test_gates_per_precision_and_quantizer():
    assert gate("int8", "onnxruntime").psnr_db < gate("int8", "modelopt").psnr_db < gate("fp16").psnr_db
    assert gate("fp16").psnr_db < gate("fp32").psnr_db
    assert gate("int8") is GATES[Precision.INT8, "modelopt"]  # the default quantizer's
    for (precision, _), g in GATES.items():
        assert g.measured, f"the {precision} gate must say what it was set from"
        if precision is Precision.INT8:  # the text encoder runs fp16 in an int8 pipeline
            fp16 = gate("fp16").tolerances
            assert g.tolerances[GraphKind.TEXT_ENCODER] == fp16[GraphKind.TEXT_ENCODER]
            # the VAE decoder's bound is for an int8 one (calibrate --vae); an fp16 one is judged by fp16's
            assert g.tolerances[GraphKind.VAE_DECODER].rel_l2 > fp16[GraphKind.VAE_DECODER].rel_l2
    assert tolerance_for("fp16", GraphKind.UNET).rel_l2 < 2e-2  # the old gate let a 20 dB regression pass


def test_parity_reports_its_gate_and_quantizer(builds):
    report = run_parity(builds["tiny"], steps=1, end_to_end=False)
    data = report.to_dict()
    assert data["quantizer"] is None and data["end_to_end_threshold_db"] == gate("fp32").psnr_db
    assert Build.open(builds["tiny"]).int8_quantizer is None


def test_parity_judges_by_the_familys_gate(builds, monkeypatch):
    """A family declares its tolerances (Family.gate); parity, export, convert, calibrate and auto ask
    it. A family that asks for exactness no fp32 graph reaches fails every graph, and is reported."""
    from dataclasses import replace

    from controlrt.compare import Tolerance
    from controlrt.families import StableDiffusion

    exact = replace(gate("fp32"), tolerances=dict.fromkeys(GraphKind, Tolerance(rel_l2=0.0, max_rel=0.0)))
    monkeypatch.setattr(StableDiffusion, "gate", lambda self, precision, quantizer=None: exact)
    report = run_parity(builds["tiny"], steps=1, end_to_end=False)
    assert report.graphs and not any(r.passed for r in report.graphs if r.max_abs > 0)
    assert any(r.max_abs > 0 for r in report.graphs)  # onnxruntime's graphs are not bit-exact
    assert report.to_dict()["tolerances"]["unet"] == {"rel_l2": 0.0, "max_rel": 0.0}
