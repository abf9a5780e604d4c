"""--precision auto: the precision is chosen by measuring, gated by quality, and cached per machine."""

from __future__ import annotations

import json
import shutil

import pytest

from controlrt.manifest import Build
from controlrt.precision import Precision
from controlrt.runtime import autoprecision
from controlrt.runtime.autoprecision import CACHE_FOLDER, choose_precision


@pytest.fixture(scope="module")
def fp16_build(tiny_build, tmp_path_factory):
    """The tiny build with fp16 graphs: onnxruntime can run it in fp32 and in fp16, on any CPU."""
    from controlrt.export.fp16 import convert_build

    folder = tmp_path_factory.mktemp("auto") / "build"
    build = shutil.copytree(tiny_build, folder, ignore=shutil.ignore_patterns("openvino"))
    convert_build(build, "fp16")
    return build


@pytest.fixture
def build(fp16_build, tmp_path):
    """A fresh copy (no cached choice) of the fp16 build."""
    return Build.open(shutil.copytree(fp16_build, tmp_path / "build"))


def fake_timer(times: dict[str, float], calls: list[str] | None = None):
    """A timer that runs the call (its output is judged) and says it took ``times[label]``."""

    def timer(candidate, call):
        call()
        if calls is not None:
            calls.append(candidate.label)
        return times[candidate.label]

    return timer


def test_the_faster_precision_is_chosen(build):
    faster = choose_precision(build, "onnxruntime", timer=fake_timer({"fp32": 1.0, "fp16": 0.5}), use_cache=False)
    assert (faster.precision, faster.source) == (Precision.FP16, "measured")
    slower = choose_precision(build, "onnxruntime", timer=fake_timer({"fp32": 1.0, "fp16": 2.0}), use_cache=False)
    assert slower.precision is Precision.FP32
    fp16 = next(r for r in slower.rows if r.label == "fp16")
    assert fp16.passed and 0 < fp16.rel_l2 < fp16.tolerance["rel_l2"]  # really compared, and within its gate
    assert "fp16 2000 ms" in slower.describe() and "chosen" in slower.table()


def test_a_candidate_that_fails_its_gate_is_never_used(build, monkeypatch):
    from controlrt.compare import Tolerance
    from controlrt.families import StableDiffusion

    # the family's gate judges each candidate: one no fp16 graph meets
    monkeypatch.setattr(StableDiffusion, "tolerance", lambda *a, **k: Tolerance(rel_l2=1e-9, max_rel=1e-9))
    choice = choose_precision(build, "onnxruntime", timer=fake_timer({"fp32": 1.0, "fp16": 0.1}))
    assert choice.precision is Precision.FP32
    assert [r.passed for r in choice.rows] == [True, False]
    # a cache file that names the failed candidate (edited, or written by an older controlrt) is not trusted
    (path,) = (build.path / CACHE_FOLDER).iterdir()
    data = json.loads(path.read_text())
    data["choice"]["precision"] = "fp16"
    path.write_text(json.dumps(data))
    calls: list[str] = []
    again = choose_precision(build, "onnxruntime", timer=fake_timer({"fp32": 1.0, "fp16": 0.1}, calls))
    assert again.precision is Precision.FP32 and calls == ["fp32", "fp16"]  # measured again


def test_the_choice_is_cached_per_cpu_model(build, monkeypatch):
    calls: list[str] = []
    timer = fake_timer({"fp32": 1.0, "fp16": 0.5}, calls)
    first = choose_precision(build, "onnxruntime", timer=timer)
    assert first.precision is Precision.FP16 and calls == ["fp32", "fp16"]
    second = choose_precision(build, "onnxruntime", timer=timer)
    assert (second.precision, second.source) == (Precision.FP16, "cached") and len(calls) == 2
    assert second.rows == first.rows
    monkeypatch.setattr("controlrt.cpu.cpu_name", lambda: "Another CPU")
    choose_precision(build, "onnxruntime", timer=timer)
    assert len(calls) == 4  # another CPU model measures again
    choose_precision(build, "onnxruntime", timer=timer, threads=1)
    assert len(calls) == 6  # so does another thread count
    assert len(list((build.path / CACHE_FOLDER).iterdir())) == 3


def test_one_candidate_is_not_measured(tiny_build):
    build = Build.open(tiny_build)
    assert choose_precision(build, "onnxruntime", timer=None).precision is Precision.FP32  # fp32 graphs only
    assert choose_precision(build, "torch").precision is Precision.FP32  # the reference
    assert not (tiny_build / CACHE_FOLDER).exists()


def test_a_build_that_cannot_be_written_still_chooses(build, monkeypatch):
    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("controlrt.io.atomic_write_text", refuse)
    choice = choose_precision(build, "onnxruntime", timer=fake_timer({"fp32": 1.0, "fp16": 0.5}))
    assert choice.precision is Precision.FP16
    assert not any((build.path / CACHE_FOLDER).glob("*.json"))


def test_pipelines_and_the_cli_run_what_auto_chose(build, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from PIL import Image

    from controlrt.cli import cli
    from controlrt.runtime.pipeline import Pipeline

    monkeypatch.setattr(autoprecision, "_default_timer", fake_timer({"fp32": 1.0, "fp16": 0.5}))
    with Pipeline.from_build(build, "onnxruntime", precision="auto") as pipe:
        assert pipe.options.precision is Precision.FP16 and pipe.precision_choice.source == "measured"
        settings = pipe("a house", steps=1, seed=0).info["controlrt"]
    assert json.loads(settings)["precision"] == "fp16"
    out = tmp_path / "o.png"
    result = CliRunner().invoke(cli, ["generate", str(build.path), "--prompt", "x", "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(out).info["controlrt"])["precision"] == "fp16"  # the default is auto, cached
    result = CliRunner().invoke(cli, ["bench", str(build.path), "--steps", "1", "--runs", "1", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime fp16" in result.output and "precision auto on" in result.output


def test_openvino_int8_measures_the_float_layers_both_ways(monkeypatch, tmp_path, tiny_build):
    pytest.importorskip("openvino", reason="needs OpenVINO: pip install openvino")
    from controlrt.runtime import ov_backend

    build = Build.open(shutil.copytree(tiny_build, tmp_path / "b", ignore=shutil.ignore_patterns("openvino")))
    monkeypatch.setattr(autoprecision, "has_precision", lambda b, p: True)  # as if calibrated
    monkeypatch.setattr(ov_backend, "supports_bf16", lambda: True)
    labels = [c.label for c in autoprecision.candidates(build, "openvino")]
    assert labels == ["fp32", "bf16", "int8+fp32", "int8+bf16"]
    monkeypatch.setattr(ov_backend, "supports_bf16", lambda: False)
    assert [c.label for c in autoprecision.candidates(build, "openvino")] == ["fp32", "int8+fp32"]


def _bf16_here() -> bool:
    try:
        from controlrt.runtime.ov_backend import supports_bf16

        return supports_bf16()
    except Exception:  # no OpenVINO
        return False


@pytest.mark.skipif(not _bf16_here(), reason="needs OpenVINO on a CPU with bf16 instructions (AVX-512 BF16 or AMX)")
@pytest.mark.parametrize(("bf16_seconds", "chosen"), [(0.5, Precision.BF16), (2.0, Precision.FP32)])
def test_openvino_picks_bf16_only_where_it_measures_faster(tiny_build, tmp_path, bf16_seconds, chosen):
    build = Build.open(shutil.copytree(tiny_build, tmp_path / "b", ignore=shutil.ignore_patterns("openvino")))
    choice = choose_precision(build, "openvino", timer=fake_timer({"fp32": 1.0, "bf16": bf16_seconds}))
    assert choice.precision is chosen
    bf16 = next(r for r in choice.rows if r.label == "bf16")
    assert bf16.passed and bf16.rel_l2 > 0  # computed in bf16, within bf16's UNet gate
