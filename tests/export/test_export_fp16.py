"""``controlrt export --precision fp16``: graphs exported from modules loaded and traced in fp16.

A build exported this way has fp16 graphs only (the graphs its family keeps in fp32, T5, exported
in fp32 as their fp16 variant), with the graph contract's fp32 inputs and outputs; each graph is
checked on onnxruntime against its module in fp16 at export, and the whole build must pass
``parity --precision fp16`` against the fp32 torch reference. What needs fp32 graphs (calibrate,
convert) says so in one line.
"""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from controlrt.cli import cli
from controlrt.manifest import Build
from controlrt.parity import run_parity

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _weights(path) -> dict[int, int]:
    """Bytes of the graph's initializers by element type."""
    model = onnx.load(str(path))
    out: dict[int, int] = {}
    for tensor in model.graph.initializer:
        size = len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
        out[tensor.data_type] = out.get(tensor.data_type, 0) + size
    return out


def _io_types(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    values = [*model.graph.input, *model.graph.output]
    return {v.type.tensor_type.elem_type for v in values if v.name not in ("input_ids",)}


@pytest.fixture(scope="module")
def half(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "build"
    command = ["export", str(tiny_models.base), *[a for c in tiny_models.controlnets for a in ("--controlnet", str(c))]]
    result = CliRunner().invoke(cli, [*command, "--out", str(out), "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    return out


def test_graphs_are_fp16_behind_fp32_inputs_and_outputs(half):
    build = Build.open(half)
    assert build.manifest.exported == "fp16"
    assert build.manifest.settings["precision"] == "fp16"
    for name, graph in build.manifest.graphs.items():
        assert list(graph.variants) == ["fp16"], name
        variant = graph.variants["fp16"]
        assert variant.validation and all(r["passed"] for r in variant.validation), name
        assert min(r["ref_max_abs"] for r in variant.validation) > 0, name
        assert variant.settings["checked_against"] == "the torch module in fp16", name
        path = build.graph_path(name, "fp16")
        weights = _weights(path)
        assert weights.get(HALF, 0) > 20 * weights.get(FLOAT, 0), (name, weights)  # fp32: small constants only
        assert _io_types(path) <= {FLOAT, TensorProto.INT64}, name


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp16_export_passes_parity_against_torch_fp32(half, backend):
    report = run_parity(half, backend=backend, precision="fp16", steps=3)
    assert report.passed, report.table()
    assert all(c.ref_max_abs > 0 for c in report.graphs)
    assert report.end_to_end is not None and report.end_to_end.psnr_db >= report.gate.psnr_db


def test_what_needs_fp32_graphs_says_so(half, tmp_path):
    runner = CliRunner()
    for command in (["calibrate", str(half)], ["convert", str(half), "--precision", "fp16"]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 1, result.output
        expected = f"controlrt {command[0]} works from fp32 graphs, and build {Build.open(half).path} was exported"
        assert f"{expected} in fp16 (its graphs are fp16 already): export it again without --precision" in result.stderr
        assert "Traceback" not in result.output
    out = tmp_path / "image.png"
    args = ["generate", str(half), "--prompt", "a cat", "--steps", "2", "--out", str(out)]
    result = runner.invoke(cli, [*args, "--precision", "fp32"])
    assert result.exit_code == 1 and not out.exists()
    assert "was exported in fp16 and has no fp32 graphs: run it in fp16 (--precision fp16 or auto;" in result.stderr
    result = runner.invoke(cli, args)  # auto: the build's only graphs
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_flux_exports_in_fp16_with_t5_kept_in_fp32(tmp_path):
    """The small Flux set: the transformer and ControlNets traced in fp16, T5 in fp32 (its
    activations overflow fp16); parity against torch fp32 at Flux's fp16 gate. (Export's own check,
    at Flux's native 1024 px in fp16 on a CPU, is left to the SD build above: it takes a minute.)"""
    from flux_files import SIZE, write_flux

    from controlrt.export.build import export_build
    from controlrt.export.onnx_export import ExportSettings

    base, controlnets = write_flux(tmp_path / "models")
    settings = ExportSettings(precision="fp16")
    manifest = export_build(base, controlnets[:2], tmp_path / "build", settings, validate=False)
    build = Build.open(tmp_path / "build")
    t5 = manifest.graphs["text_encoder_2"].variants["fp16"]
    assert t5.settings["text_encoder_2"] == "kept in fp32: T5's activations overflow fp16"
    assert HALF not in _weights(build.graph_path("text_encoder_2", "fp16"))
    weights = _weights(build.graph_path("transformer", "fp16"))
    assert weights.get(HALF, 0) > 20 * weights.get(FLOAT, 0), weights
    report = run_parity(build.path, precision="fp16", steps=3, height=SIZE, width=SIZE + 32)
    assert report.passed, report.table()
    assert all(c.ref_max_abs > 0 for c in report.graphs)
    assert report.end_to_end is not None and report.end_to_end.psnr_db >= report.gate.psnr_db
