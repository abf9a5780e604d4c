"""fp16 and int8 graphs: structure, parity at the stated tolerances, failure when damaged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import FAST_CALIBRATION as FAST
from onnx import numpy_helper

from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build
from controlrt.calibration.quantize import excluded
from controlrt.cli import cli
from controlrt.errors import BuildError, InputError
from controlrt.export.fp16 import convert_build
from controlrt.io import sha256_file
from controlrt.manifest import Build
from controlrt.parity import run_parity


@pytest.fixture(scope="module")
def precise(tiny_captured, tmp_path_factory):
    """A copy of the tiny build with fp16 graphs and ModelOpt int8 graphs."""
    path = tmp_path_factory.mktemp("precise") / "build"
    shutil.copytree(tiny_captured, path)
    convert_build(path, "fp16")
    calibrate_build(path, settings=CalibrationSettings(method="modelopt", **FAST))
    return path


@pytest.fixture(scope="module")
def ort_int8(tiny_captured, tmp_path_factory):
    path = tmp_path_factory.mktemp("ort") / "build"
    shutil.copytree(tiny_captured, path)
    calibrate_build(path, settings=CalibrationSettings(method="onnxruntime", calibration="minmax", **FAST))
    return path


@pytest.fixture(scope="module")
def nncf_int8(tiny_captured, tmp_path_factory):
    path = tmp_path_factory.mktemp("nncf") / "build"
    shutil.copytree(tiny_captured, path)
    calibrate_build(path, settings=CalibrationSettings(method="nncf", **FAST))
    return path


def _producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def test_fp16_graphs(precise):
    build = Build.open(precise)
    for name, graph in build.manifest.graphs.items():
        assert "fp16" in graph.variants, name
        model = onnx.load(str(build.graph_path(name, "fp16")))
        types = {t.data_type for t in model.graph.initializer}
        assert onnx.TensorProto.FLOAT16 in types, name
        assert [i.type.tensor_type.elem_type for i in model.graph.input] == [
            i.type.tensor_type.elem_type for i in onnx.load(str(build.graph_path(name))).graph.input
        ], "inputs keep their fp32/int64 types"
    unet = onnx.load(str(build.graph_path("unet", "fp16")))
    inits = {t.name: t for t in unet.graph.initializer}
    producers = _producers(unet)

    def is_fp32(name: str) -> bool:
        if name in inits:
            return inits[name].data_type == onnx.TensorProto.FLOAT
        node = producers[name]
        return node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT

    norms = [n for n in unet.graph.node if n.op_type == "InstanceNormalization"]
    assert norms and all(is_fp32(i) for n in norms for i in n.input), "normalisation stays fp32"
    sin = [n for n in unet.graph.node if n.op_type == "Sin"]
    assert sin and all("/time_proj/" in n.name for n in sin)


@pytest.mark.parametrize("fixture", ["precise", "ort_int8", "nncf_int8"])
def test_int8_graphs_are_symmetric_qdq_around_conv_and_matmul(fixture, request):
    build = Build.open(request.getfixturevalue(fixture))
    for name in ("unet", "controlnet_0", "controlnet_1"):
        model = onnx.load(str(build.graph_path(name, "int8")))
        producers = _producers(model)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        consts = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"
        }
        qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert len(qdq) > 20, name
        for node in qdq:
            zero = inits.get(node.input[2]) if len(node.input) > 2 else None
            zero = consts.get(node.input[2]) if zero is None and len(node.input) > 2 else zero
            assert zero is not None and zero.dtype == np.int8 and not zero.any(), f"{node.name}: not symmetric int8"
        quantized = skipped = 0
        for node in model.graph.node:
            if node.op_type not in ("Conv", "MatMul"):
                continue
            fed = [producers.get(i) for i in node.input[:2]]
            is_q = all(p is not None and p.op_type == "DequantizeLinear" for p in fed)
            if excluded(node.name):
                assert not is_q, f"{node.name} should stay unquantized"
                skipped += 1
            elif node.op_type == "Conv" or fixture == "ort_int8":
                assert is_q, f"{node.name} has no Q/DQ on its inputs"
                quantized += 1
        assert quantized > 5 and skipped >= 1
    assert "int8" not in build.manifest.graphs["text_encoder"].variants


def test_parity_fp16_and_int8_pass(precise):
    for precision, threshold in (("fp16", 35), ("int8", 20)):
        report = run_parity(precise, precision=precision, steps=3)
        assert report.passed, report.table()
        assert report.end_to_end.psnr_db >= threshold
        assert all(c.shape.startswith("held-out#") for c in report.graphs)
        assert all(c.ref_max_abs > 0 for c in report.graphs)


def test_int8_settings_recorded(precise):
    variant = Build.open(precise).manifest.graphs["unet"].variants["int8"]
    assert variant.settings["quantizer"] == "modelopt"
    assert variant.settings["samples"] == 2 and variant.settings["capture"]["steps"] == 2
    assert len(variant.settings["data_sha256"]) == 64
    assert variant.validation and all(r["passed"] for r in variant.validation)


def test_nncf_int8_passes_parity_on_onnxruntime_and_openvino(nncf_int8):
    variant = Build.open(nncf_int8).manifest.graphs["unet"].variants["int8"]
    assert variant.settings["quantizer"] == "nncf"
    assert variant.validation and all(r["passed"] for r in variant.validation)
    for backend in ("onnxruntime", "openvino"):
        report = run_parity(nncf_int8, backend=backend, precision="int8", steps=3)
        assert report.passed, report.table()
        assert all(c.ref_max_abs > 0 for c in report.graphs)


def test_int8_vae_decoder_on_request(tiny_captured, tmp_path):
    from controlrt.precision import Precision
    from controlrt.runtime.backends import BackendOptions, SessionFactory

    path = shutil.copytree(tiny_captured, tmp_path / "build")
    calibrate_build(path, settings=CalibrationSettings("onnxruntime", "minmax", vae=True, **FAST))
    build = Build.open(path)
    vae = build.manifest.graphs["vae_decoder"].variants["int8"]
    assert vae.validation and all(r["passed"] for r in vae.validation)
    model = onnx.load(str(build.graph_path("vae_decoder", "int8")))
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) > 10
    assert "int8" not in build.manifest.graphs["text_encoder"].variants
    sessions = SessionFactory(build, BackendOptions("onnxruntime", precision=Precision.INT8))
    assert sessions.computes("vae_decoder") is Precision.INT8
    assert sessions.computes("text_encoder") is Precision.FP32  # no fp16 graphs in this build
    report = run_parity(path, precision="int8", steps=3)
    assert report.passed, report.table()
    assert any(c.graph == "vae_decoder" and c.ref_max_abs > 0 for c in report.graphs)

    # a calibration without --vae replaces the whole int8 set: the VAE decoder goes back to float
    old = build.graph_path("vae_decoder", "int8")
    calibrate_build(path, settings=CalibrationSettings("onnxruntime", "minmax", **FAST))
    assert "int8" not in Build.open(path).manifest.graphs["vae_decoder"].variants
    assert not old.exists()


def test_damaged_int8_graph_fails_parity(precise, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(precise, damaged)
    path = Build.open(damaged).graph_path("unet", "int8")
    model = onnx.load(str(path))
    convs = [t for t in model.graph.initializer if len(t.dims) == 4][:12]  # convolution weights
    for t in convs:
        t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    assert convs
    onnx.save(model, str(path))
    manifest = json.loads((damaged / "manifest.json").read_text())
    record = manifest["graphs"]["unet"]["variants"]["int8"]["files"][0]
    record["sha256"], record["bytes"] = sha256_file(path), path.stat().st_size
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    report = run_parity(damaged, precision="int8", steps=3)
    assert not report.passed
    assert any(c.graph == "unet" and not c.passed for c in report.graphs)


def test_calibration_is_deterministic(tiny_build, ort_int8, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(tiny_build, again)
    calibrate_build(again, settings=CalibrationSettings(method="onnxruntime", calibration="minmax", **FAST))
    for name in ("unet", "controlnet_0"):
        a = Build.open(ort_int8).manifest.graphs[name].variants["int8"].files[0].sha256
        b = Build.open(again).manifest.graphs[name].variants["int8"].files[0].sha256
        assert a == b, name


def test_missing_precision_is_a_clear_error(tiny_build, tmp_path):
    from controlrt.runtime.pipeline import Pipeline

    with pytest.raises(BuildError, match="controlrt calibrate"):
        Pipeline.load(tiny_build, precision="int8")
    with pytest.raises(InputError, match="torch backend does not compute in fp16"):
        Pipeline.load(tiny_build, backend="torch", precision="fp16")
    with pytest.raises(InputError, match="unknown precision 'fp8'; choose one of auto, fp32, fp16, bf16, int8"):
        Pipeline.load(tiny_build, precision="fp8")
    out = tmp_path / "never.png"
    result = CliRunner().invoke(
        cli, ["generate", str(tiny_build), "--prompt", "x", "--precision", "automatic", "--out", str(out)]
    )
    assert result.exit_code != 0 and "choose one of auto, fp32" in result.output and not out.exists()
    result = CliRunner().invoke(
        cli, ["generate", str(tiny_build), "--prompt", "x", "--precision", "fp16", "--out", str(tmp_path / "o.png")]
    )
    assert result.exit_code != 0 and result.output.startswith("error: ") and "controlrt convert" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_generate_int8_from_cli(precise, tmp_path):
    out = tmp_path / "int8.png"
    result = CliRunner().invoke(
        cli, ["generate", str(precise), "--prompt", "a cat", "--precision", "int8", "--steps", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert json.loads(Image.open(out).text["controlrt"])["precision"] == "int8"
