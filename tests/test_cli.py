"""The command line through click's runner: the happy paths and every bad input."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import controlrt
from controlrt.builtin import sample_control_images
from controlrt.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_error(result, fragment: str) -> None:
    """A non-zero exit with exactly one 'error: …' line and no traceback."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def controls(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    paths = []
    for k, image in enumerate(sample_control_images(3, 64, 64)):
        image.save(root / f"c{k}.png")
        paths.append(root / f"c{k}.png")
    (root / "notes.png").write_text("not an image")
    return {"images": paths, "not_image": root / "notes.png", "root": root}


def test_generate_writes_png_with_settings(tiny_build, controls, tmp_path):
    out = tmp_path / "out.png"
    c0, c1 = controls["images"][:2]
    result = run(
        "generate",
        tiny_build,
        "--prompt",
        "a red circle",
        "--control",
        c0,
        "--control",
        c1,
        "--scale",
        0.5,
        "--scale",
        1.5,
        "--start",
        0.1,
        "--control-mode",
        "guess",
        "--steps",
        3,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    image = Image.open(out)
    assert image.size == (64, 64)
    settings = json.loads(image.text["controlrt"])
    assert settings["prompt"] == "a red circle" and settings["scales"] == [0.5, 1.5]
    assert settings["control_mode"] == "guess" and settings["backend"] == "onnxruntime"


def test_generate_on_torch_matches_onnxruntime(tiny_build, controls, tmp_path):
    import numpy as np

    from controlrt.compare import psnr

    images = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.png"
        result = run(
            "generate",
            tiny_build,
            "--prompt",
            "x",
            "--control",
            controls["images"][0],
            "--steps",
            2,
            "--backend",
            backend,
            "--out",
            out,
        )
        assert result.exit_code == 0, result.output
        images[backend] = np.asarray(Image.open(out))
    assert psnr(images["torch"], images["onnxruntime"]) >= 40


def test_parity_passes_and_writes_json(tiny_build, tmp_path):
    report = tmp_path / "parity.json"
    result = run("parity", tiny_build, "--json", report, "--steps", 2)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert len(data["graphs"]) == 2 * (1 + 7 + 7 + 1 + 1 + 2)  # two shapes x every output (VAE encoder: 2)
    assert data["end_to_end"]["psnr_db"] == "inf" or float(data["end_to_end"]["psnr_db"]) >= 40


def test_parity_fails_on_a_wrong_graph(tiny_build, tmp_path):
    """A well-formed graph that computes the wrong thing (another ControlNet's) fails parity."""
    build = tmp_path / "swapped"
    shutil.copytree(tiny_build, build)
    shutil.copy(build / "graphs" / "controlnet_1.onnx", build / "graphs" / "controlnet_0.onnx")
    manifest = json.loads((build / "manifest.json").read_text())
    variants = manifest["graphs"]["controlnet_0"]["variants"]
    variants["fp32"]["files"] = manifest["graphs"]["controlnet_1"]["variants"]["fp32"]["files"]
    variants["fp32"]["files"][0]["path"] = "graphs/controlnet_0.onnx"
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = run("parity", build, "--steps", 2)
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "controlnet_0" in result.stderr
    assert "end-to-end image" in result.stderr


def test_demo(demo_run):
    folder, result = demo_run
    assert result.exit_code == 0, result.output
    for name in (
        "demo.png",
        "demo-off.png",
        "parity.json",
        "control_canny.png",
        "control_seg.png",
        "build/manifest.json",
    ):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "parity.json").read_text())["passed"] is True
    assert "edge F1" in result.stdout and "without the controls" in result.stdout
    assert "export: 6/6 graphs" in result.stderr and "denoise: 2/2 steps" in result.stderr  # progress, not a tty
    settings = json.loads(Image.open(folder / "demo.png").text["controlrt"])
    assert settings["controls"] == [str(folder / "control_canny.png"), str(folder / "control_seg.png")]


@pytest.fixture(scope="module")
def damaged(tiny_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    corrupted = root / "corrupted"
    shutil.copytree(tiny_build, corrupted)
    path = corrupted / "graphs" / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    truncated = root / "truncated"
    shutil.copytree(tiny_build, truncated)
    path = truncated / "graphs" / "controlnet_1.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    (root / "empty").mkdir()
    return {"corrupted": corrupted, "truncated": truncated, "empty": root / "empty"}


BAD_GENERATE = {
    "missing build": ([], "does not exist", {"build": "nowhere"}),
    "not a build": ([], "not a controlrt build", {"build": "empty"}),
    "corrupted graph": ([], "graphs/unet.onnx is corrupted", {"build": "corrupted"}),
    "truncated graph": ([], "graphs/controlnet_1.onnx is truncated", {"build": "truncated"}),
    "missing control": (["--control", "{root}/nope.png"], "nope.png does not exist", {}),
    "non-image control": (["--control", "{not_image}"], "is not a readable image", {}),
    "too many controls": (["--control", "{c0}"] * 3, "3 control images given but the build has 2", {}),
    "height": (["--height", "63"], "height 63 must be a positive multiple of 4", {}),
    "width": (["--width", "0"], "width 0 must be a positive multiple of 4", {}),
    "steps": (["--steps", "0"], "steps must be a whole number from 1 to 999", {}),
    "huge steps": (["--steps", "5000"], "steps must be a whole number from 1 to 999", {}),
    "steps past ddim's": (["--steps", "1000"], "steps must be a whole number from 1 to 999, got 1000", {}),
    "steps past lcm's": (["--steps", "51", "--scheduler", "lcm"], "steps must be a whole number from 1 to 50", {}),
    "huge size": (["--height", "100000", "--width", "100000"], "pixels; at most 16384 are allowed", {}),
    "max pixels": (["--max-pixels", "0"], "max pixels 0 must be a whole number of at least 1", {}),
    "num images": (["--num-images", "1000", "--out", "{root}/many"], "1000 images asked for; at most 64", {}),
    "nan scale": (["--control", "{c0}", "--scale", "nan"], "scale nan is not finite", {}),
    "inf scale": (["--control", "{c0}", "--scale", "inf"], "scale inf is not finite", {}),
    "scale count": (
        ["--control", "{c0}", "--control", "{c1}", "--scale", "1", "--scale", "2", "--scale", "3"],
        "3 scale values given for 2 control(s)",
        {},
    ),
    "window": (["--control", "{c0}", "--start", "0.8", "--end", "0.2"], "start 0.8 and end 0.2", {}),
    "mode": (["--control-mode", "loud"], "unknown control mode 'loud'", {}),
    "scheduler": (["--scheduler", "nope"], "unknown scheduler 'nope'", {}),
    "out extension": (["--out", "{root}/x.unknownext"], "not an image format that keeps the generation settings", {}),
    "out gif": (["--out", "{root}/x.gif"], "use .png (or .jpg)", {}),
    "out under a file": (["--out", "{not_image}/x.png"], "is a file, not a folder", {}),
    "out in proc": (["--out", "/proc/x.png"], "cannot write /proc/x.png", {}),
    "not a number": (["--scale", "abc"], "'abc' is not a valid float", {}),
    "negative guidance": (["--guidance", "-1"], "guidance -1.0 must be finite and non-negative", {}),
    "true cfg on SD": (["--true-cfg", "3"], "true CFG (diffusers' true_cfg_scale) is for Flux models", {}),
    "backend": (["--backend", "tpu"], "'tpu' is not one of", {}),
    "provider": (["--providers", "cuda"], "CUDAExecutionProvider is not available", {}),
    "out is a folder": (["--out", "{root}"], "is a folder; give an image file name such as", {}),
    "out in a missing folder": (["--out", "{root}/nodir/a.png"], "nodir does not exist", {}),
    "out exists": (["--out", "{not_image}"], "notes.png already exists; pass --force to replace it", {}),
    "out is a control": (
        ["--control", "{c0}", "--out", "{c0}", "--force"],
        "is one of this command's inputs; choose another file (even --force",
        {},
    ),
    "unknown kind": (["--control", "sobel:{c0}"], "unknown preprocessor 'sobel' in control 'sobel:", {}),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_generate_bad_input(case, tiny_build, controls, damaged, tmp_path):
    extra, fragment, where = BAD_GENERATE[case]
    names = {
        "root": controls["root"],
        "not_image": controls["not_image"],
        "c0": controls["images"][0],
        "c1": controls["images"][1],
    }
    extra = [a.format(**names) for a in extra]
    build = {"nowhere": tmp_path / "nowhere", **damaged}.get(where.get("build"), tiny_build)
    args = ["generate", build, "--prompt", "x", "--steps", "1", "--out", tmp_path / "o.png", *extra]
    result = run(*args)
    assert_clean_error(result, fragment)
    assert not (tmp_path / "o.png").exists()


def test_missing_required_option_is_one_line(tiny_build):
    assert_clean_error(run("generate", tiny_build, "--prompt", "x"), "Missing option '--out'")
    assert_clean_error(run("nosuchcommand"), "No such command")


def test_export_bad_input(tiny_models, tiny_build, models, tmp_path):
    assert_clean_error(
        run("export", tmp_path, "--controlnet", tiny_models.controlnets[0], "--out", tmp_path / "b"),
        "not a diffusers pipeline folder",
    )
    assert_clean_error(
        run("export", tiny_models.base, "--controlnet", tmp_path / "nope", "--out", tmp_path / "b"),
        "ControlNet folder",
    )
    assert_clean_error(
        run(
            "export",
            tiny_models.base,
            "--controlnet",
            models["other"].controlnets[0],
            "--out",
            tmp_path / "b",
        ),
        "does not fit the base UNet",
    )
    assert_clean_error(
        run("export", tiny_models.base, "--controlnet", tiny_models.controlnets[0], "--out", tiny_build),
        "already exists; pass --force",
    )
    assert not (tmp_path / "b").exists()


def test_parity_bad_input(tmp_path):
    assert_clean_error(run("parity", tmp_path), "not a controlrt build")


def test_torch_backend_refuses_changed_sources(tiny_build, tiny_models, tmp_path):
    build = tmp_path / "moved"
    shutil.copytree(tiny_build, build)
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["sources"]["controlnets"][0]["config_sha256"]["controlnet"] = "0" * 64
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = run("generate", build, "--prompt", "x", "--steps", "1", "--backend", "torch", "--out", tmp_path / "o.png")
    assert_clean_error(result, "changed since it was exported")


def _tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return True
    return False


@pytest.mark.skipif(not _tensorrt_missing(), reason="checks the behaviour where TensorRT is not installed")
@pytest.mark.parametrize(
    "args",
    [
        ("build", "{build}", "--precision", "fp32"),
        ("build", "{build}", "--precision", "fp32", "--static"),
        ("generate", "{build}", "--prompt", "x", "--backend", "tensorrt", "--out", "{out}"),
        ("parity", "{build}", "--backend", "tensorrt"),
        ("refit", "{build}", "--controlnet", "controlnet_0", "--from", "{build}/graphs/controlnet_1.onnx"),
    ],
)
def test_tensorrt_commands_without_tensorrt(args, tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "build")
    result = run(*(a.format(build=build, out=tmp_path / "o.png") for a in args))
    if args[0] == "refit":  # refused before TensorRT is needed: no engine to refit
        assert_clean_error(result, "has no engine for controlnet_0")
    else:
        assert_clean_error(result, "TensorRT")
        assert "pip install tensorrt" in result.output
    assert not (tmp_path / "o.png").exists() and not (build / "engines").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--cuda-graphs",), "need --backend tensorrt"),
        (("--backend", "torch", "--weight-streaming-budget", "1"), "need --backend tensorrt"),
        (("--backend", "torch", "--precision", "fp16"), "torch backend does not compute in fp16"),
        (("--precision", "bf16"), "onnxruntime backend does not compute in bf16"),
        (("--backend", "tensorrt", "--threads", "2"), "--threads applies to --backend onnxruntime and openvino"),
    ],
)
def test_backend_option_mismatch(args, fragment, tiny_build, tmp_path):
    result = run("generate", tiny_build, "--prompt", "x", "--out", tmp_path / "o.png", *args)
    assert_clean_error(result, fragment)


def test_build_bad_sizes_are_one_line(tiny_build, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="0"))
    monkeypatch.setattr("controlrt.engine.builder.require_cuda", lambda: None)
    result = run("build", tiny_build, "--precision", "fp16")
    assert_clean_error(result, "controlrt convert")
    result = run("build", tiny_build, "--precision", "fp32", "--opt-size", "63x64")
    assert_clean_error(result, "must be a positive multiple")
    result = run("build", tiny_build, "--max-size", "big")
    assert_clean_error(result, "HEIGHTxWIDTH")


def test_inspect_shows_graphs_precisions_and_engines(tiny_build):
    result = run("inspect", tiny_build)
    assert result.exit_code == 0, result.output
    assert "unet (unet)" in result.output and "controlnet_1 (controlnet)" in result.output
    assert "precisions: fp32" in result.output and "engines: none" in result.output
    assert "down_block_res_0 float32 (batch," in result.output
    data = json.loads(run("inspect", tiny_build, "--json").output)
    assert set(data["graphs"]) == {"text_encoder", "controlnet_0", "controlnet_1", "unet", "vae_decoder", "vae_encoder"}
    assert data["graphs"]["unet"]["variants"]["fp32"]["bytes"] > 0
    assert_clean_error(run("inspect", tiny_build / "nope"), "does not exist")


def test_preprocess_command_and_inline_controls(tiny_build, controls, tmp_path):
    photo = controls["images"][0]
    out = tmp_path / "edges.png"
    result = run("preprocess", "canny", photo, "--out", out, "--low", "50", "--high", "120")
    assert result.exit_code == 0, result.output
    assert json.loads(Image.open(out).text["controlrt"])["preprocessor"] == "canny"
    assert_clean_error(run("preprocess", "sobel", photo, "--out", out), "unknown preprocessor")
    # the same map inline, then as a ready map: the same image
    inline = tmp_path / "inline.png"
    ready = tmp_path / "ready.png"
    common = ["--prompt", "x", "--steps", "2", "--seed", "4"]
    before = out.read_bytes()
    assert_clean_error(run("preprocess", "canny", photo, "--out", out), "already exists; pass --force")
    assert out.read_bytes() == before
    assert run("preprocess", "canny", photo, "--out", out, "--force").exit_code == 0
    assert run("generate", tiny_build, *common, "--control", f"canny:{photo}", "--out", inline).exit_code == 0
    assert run("generate", tiny_build, *common, "--control", out, "--out", ready).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(inline)), np.asarray(Image.open(ready)))
    settings = json.loads(Image.open(inline).text["controlrt"])
    assert settings["controls"] == [f"canny:{photo}"] and settings["precision"] == "fp32"


def test_batch_generation_names_and_metadata(tiny_build, controls, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "batch"
    args = [
        "--prompts",
        prompts,
        "--num-images",
        "2",
        "--steps",
        "2",
        "--seed",
        "10",
        "--control",
        controls["images"][0],
    ]
    result = run("generate", tiny_build, *args, "--out", out)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000-seed10.png", "0001-seed11.png", "0002-seed10.png", "0003-seed11.png"]
    meta = [json.loads(Image.open(out / n).text["controlrt"]) for n in names]
    assert [m["prompt"] for m in meta] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [m["seed"] for m in meta] == [10, 11, 10, 11]
    assert not np.array_equal(np.asarray(Image.open(out / names[0])), np.asarray(Image.open(out / names[1])))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert_clean_error(run("generate", tiny_build, "--prompts", empty, "--out", out), "no prompts")
    assert_clean_error(run("generate", tiny_build, "--out", out / "x.png"), "--prompt TEXT or --prompts FILE")
    assert_clean_error(run("generate", tiny_build, "--prompt", "x", "--num-images", "0", "--out", out), "at least 1")


def test_jpeg_output_carries_the_settings(tiny_build, controls, tmp_path):
    from controlrt.runtime.images import read_settings

    out = tmp_path / "x.jpg"
    result = run(
        "generate", tiny_build, "--prompt", "a cat", "--control", controls["images"][0], "--steps", 1, "--out", out
    )
    assert result.exit_code == 0, result.output
    settings = read_settings(out)
    assert settings["prompt"] == "a cat" and settings["steps"] == 1 and settings["backend"] == "onnxruntime"


def test_calibrate_reports_progress_off_a_terminal_and_keeps_stdout_for_results(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "build")
    command = ["calibrate", str(build), "--samples", "1", "--steps", "1", "--method", "onnxruntime"]
    result = CliRunner().invoke(cli, [*command, "--calibration", "minmax"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["controlnet_0.int8", "controlnet_1.int8", "unet.int8"]
    assert "calibrate: capture: 1/1 generation" in result.stderr
    assert "int8: 3/3 graphs" in result.stderr


def test_version_matches_the_package_metadata():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert controlrt.__version__ == pyproject["project"]["version"]
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and controlrt.__version__ in result.output
