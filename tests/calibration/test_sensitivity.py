"""calibrate --float-layers: which layers' int8 error reaches the output, and keeping them float."""

from __future__ import annotations

import shutil

import onnx
import pytest
from click.testing import CliRunner
from conftest import FAST_CALIBRATION as FAST

from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build, held_out_captures
from controlrt.calibration.quantize import excluded
from controlrt.calibration.sensitivity import Int8Simulation, LayerShare, choose_float_layers
from controlrt.cli import cli
from controlrt.errors import InputError
from controlrt.families import load_graph_module
from controlrt.manifest import Build
from controlrt.parity import run_parity
from controlrt.runtime.backends import open_sources


def test_float_layer_names_match_module_paths_and_onnx_scopes():
    layer = "unet.up_blocks.1.resnets.2.conv1"
    assert excluded("unet.up_blocks.1.resnets.2.conv1", [layer])
    assert excluded("/unet/up_blocks.1/resnets.2/conv1/Conv", [layer])
    assert not excluded("/unet/up_blocks.1/resnets.2/conv2/Conv", [layer])
    assert not excluded("/unet/up_blocks.1/resnets.2/conv10/Conv", ["unet.up_blocks.1.resnets.2.conv1"])
    assert not excluded("/unet/up_blocks.1/resnets.2/conv1/Conv")
    assert excluded("/unet/conv_out/Conv")  # EXCLUDE_PATTERNS as before
    # the VAE decoder graph calls vae.decode, so its ONNX scopes lack the wrapper's "vae"
    assert excluded("/post_quant_conv/Conv", ["vae.post_quant_conv"])
    assert not excluded("/decoder/up_blocks.0/upsamplers.0/conv/Conv", ["vae.post_quant_conv"])


@pytest.fixture(scope="module")
def tiny_copy(tiny_captured, tmp_path_factory):
    return shutil.copytree(tiny_captured, tmp_path_factory.mktemp("shares") / "build")


@pytest.mark.parametrize("name", ["unet", "controlnet_0", "vae_decoder"])
def test_largest_shares_are_the_layers_whose_int8_error_reaches_the_output(tiny_copy, name):
    build = Build.open(tiny_copy)
    spec = build.manifest.spec(name)
    calls = held_out_captures(build, steps=2)[name]
    module = load_graph_module(spec, *open_sources(build.manifest))
    with Int8Simulation(module, spec.input_names, calls) as simulation:
        shares = simulation.shares()
        error = simulation.error()
        top = [s.layer for s in shares[:2]]
        bottom = [s.layer for s in shares[-2:]]
        assert len(shares) == len(simulation.layers) > 10
        assert error > 1e-3  # the simulation does quantize
        # the shares split the output's relative squared error, to first order
        assert 0.3 * error**2 < sum(s.share for s in shares) < 1.5 * error**2
        assert simulation.error(top) < 0.9 * error
        assert simulation.error(top) < simulation.error(bottom)
        assert all(s.gflop > 0 for s in shares)
    # the module's layers compute in float again afterwards
    assert all(layer.forward.__func__ is type(layer).forward for layer in simulation.layers.values())


@pytest.fixture(scope="module")
def float_int8(tiny_captured, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "build"
    shutil.copytree(tiny_captured, path)
    calibrate_build(path, settings=CalibrationSettings("onnxruntime", "minmax", float_layers=2, vae=True, **FAST))
    return path


@pytest.fixture(scope="module")
def float_modelopt(tiny_captured, tmp_path_factory):
    path = tmp_path_factory.mktemp("float-modelopt") / "build"
    shutil.copytree(tiny_captured, path)
    calibrate_build(path, settings=CalibrationSettings("modelopt", float_layers=2, **FAST))
    return path


@pytest.mark.parametrize("fixture", ["float_int8", "float_modelopt"])
def test_float_layers_stay_unquantized_and_are_recorded(fixture, request):
    build = Build.open(request.getfixturevalue(fixture))
    names = ("unet", "controlnet_0", "controlnet_1", "vae_decoder")
    for name in names if fixture == "float_int8" else names[:-1]:
        variant = build.manifest.graphs[name].variants["int8"]
        kept = variant.settings["float_layers"][name]
        assert len(kept) == 2 and all(k["share"] > 0 and k["gflop"] > 0 for k in kept)
        layers = [k["layer"] for k in kept]
        model = onnx.load(str(build.graph_path(name, "int8")))
        producers = {out: node for node in model.graph.node for out in node.output}
        floats = quantized = 0
        for node in model.graph.node:
            if node.op_type != "Conv" or excluded(node.name):
                continue
            fed = [producers.get(i) for i in node.input[:2]]
            is_q = all(p is not None and p.op_type == "DequantizeLinear" for p in fed)
            if excluded(node.name, layers):
                assert not is_q, f"{name}: {node.name} should stay float"
                floats += 1
            else:
                quantized += is_q
        assert floats >= 2 and quantized > 5, name


def test_float_layers_lower_the_held_out_error(float_int8, tiny_captured, tmp_path):
    plain = shutil.copytree(tiny_captured, tmp_path / "plain")
    calibrate_build(plain, settings=CalibrationSettings("onnxruntime", "minmax", vae=True, **FAST))

    def errors(path):
        manifest = Build.open(path).manifest
        rows = {n: manifest.graphs[n].variants["int8"].validation for n in ("unet", "vae_decoder")}
        return {n: sum(r["rel_l2"] for r in v) / len(v) for n, v in rows.items()}

    with_float, without = errors(float_int8), errors(plain)
    for name in with_float:
        assert 0 < with_float[name] < without[name], (name, with_float, without)
    report = run_parity(float_int8, precision="int8", steps=3)
    assert report.passed, report.table()


def test_choice_by_count_and_by_compute_budget():
    shares = [
        LayerShare("big", 5e-4, 40.0),
        LayerShare("cheap", 2e-4, 1.0),
        LayerShare("mid", 1e-4, 10.0),
        LayerShare("tiny", 1e-5, 0.5),
        LayerShare("harmless", -1e-6, 48.5),
    ]  # 100 GFLOP in all
    names = lambda chosen: [s.layer for s in chosen]  # noqa: E731
    assert names(choose_float_layers(shares, 2, None)) == ["big", "cheap"]
    assert names(choose_float_layers(shares, None, None)) == ["big", "cheap", "mid", "tiny"]  # positive only
    # by share per GFLOP, within 12% of the compute: "big" does not fit, "mid" does after "cheap"
    assert names(choose_float_layers(shares, None, 12)) == ["cheap", "tiny", "mid"]
    assert names(choose_float_layers(shares, 1, 12)) == ["cheap"]
    assert names(choose_float_layers(shares, None, 100)) == ["cheap", "tiny", "big", "mid"]


@pytest.mark.parametrize("option", [["--float-budget", "0"], ["--float-budget", "nan"], ["--float-budget", "101"]])
def test_float_budget_out_of_range_is_one_line(tiny_build, option):
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_build), *option])
    assert result.exit_code == 2
    assert "--float-budget must be a percentage above 0 and at most 100" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("value", ["-1", "65"])
def test_float_layers_out_of_range_is_one_line(tiny_build, value):
    with pytest.raises(InputError, match="--float-layers"):
        CalibrationSettings(float_layers=int(value)).check()
    result = CliRunner().invoke(cli, ["calibrate", str(tiny_build), "--float-layers", value])
    assert result.exit_code == 2
    assert "--float-layers must be 0 to 64" in result.output
    assert "Traceback" not in result.output
