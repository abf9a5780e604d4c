"""The trained built-in model shipped in the package: it exports, passes parity, follows its controls."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from controlrt.builtin import TRAINED_CONTROLNETS, write_trained_models
from controlrt.cli import cli


@pytest.fixture(scope="module")
def trained_build(tmp_path_factory):
    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("trained")
    models = write_trained_models(root / "models")
    export_build(models.base, models.controlnets, root / "build")
    return root / "build"


@pytest.fixture(scope="module")
def trained_pipeline(trained_build):
    from controlrt.runtime.pipeline import Pipeline

    with Pipeline.load(trained_build, backend="onnxruntime") as pipe:
        yield pipe


def test_shipped_model_is_small_and_derives_its_sizes(trained_pipeline):
    from controlrt.builtin import TRAINED_DIR

    size = sum(p.stat().st_size for p in TRAINED_DIR.glob("**/*.safetensors"))
    assert size < 20 * 2**20
    assert trained_pipeline.controlnet_names == list(TRAINED_CONTROLNETS)
    assert trained_pipeline.info.vae_scale_factor == 4  # from the VAE config, not assumed to be 8
    assert trained_pipeline.info.default_size == (64, 64)


def test_shipped_model_passes_parity(trained_build):
    from controlrt.parity import run_parity

    report = run_parity(trained_build, backend="onnxruntime", steps=4)
    assert report.passed, report.failures
    assert report.end_to_end.psnr_db > 40


def test_shipped_model_follows_its_controls(trained_pipeline):
    """The issue's bar, on held-out scenes: edge F1 >= 0.35 with the canny control, >= 2x without."""
    from controlrt.training.fidelity import measure

    report = measure(trained_pipeline, scenes=8, steps=20)
    print(report.table())
    assert report.f1["canny"] >= 0.35, report.table()
    assert report.f1["canny"] >= 2 * report.f1["off"], report.table()
    assert report.f1["seg"] > report.f1["off"], report.table()


def test_fidelity_command(trained_build, tmp_path):
    result = CliRunner().invoke(
        cli, ["fidelity", str(trained_build), "--scenes", "1", "--steps", "4", "--json", str(tmp_path / "f.json")]
    )
    assert result.exit_code == 0, result.output
    assert "edge F1" in result.output and "off" in result.output
    figures = json.loads((tmp_path / "f.json").read_text())
    assert set(figures["f1"]) == {"canny", "seg", "all", "off"}


def test_fidelity_refuses_a_build_of_another_model(tiny_build):
    result = CliRunner().invoke(cli, ["fidelity", str(tiny_build), "--scenes", "1", "--steps", "2"])
    assert result.exit_code != 0
    assert result.output.startswith("error: control fidelity needs ControlNets named")


def test_builtin_command_writes_trained_or_random(tmp_path):
    trained = CliRunner().invoke(cli, ["builtin", str(tmp_path / "trained")])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "trained/canny/config.json").is_file() and (tmp_path / "trained/seg/config.json").is_file()
    random = CliRunner().invoke(cli, ["builtin", str(tmp_path / "random"), "--random"])
    assert random.exit_code == 0, random.output
    assert (tmp_path / "random/edges/config.json").is_file()
