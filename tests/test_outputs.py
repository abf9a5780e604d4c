"""What a command writes: never over a user's file without --force, never over its own inputs,
with the umask's mode, and with the settings that say where an image came from."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_clean_error, run

import controlrt
from controlrt.builtin import sample_control_images


@pytest.fixture()
def control(tmp_path):
    path = tmp_path / "edges.png"
    sample_control_images(1, 64, 64)[0].save(path)
    return path


GENERATE = ("--prompt", "x", "--steps", "1")


def test_an_existing_image_is_replaced_only_with_force(tiny_build, tmp_path):
    keep = tmp_path / "keep.png"
    keep.write_text("x")
    assert_clean_error(run("generate", tiny_build, *GENERATE, "--out", keep), "keep.png already exists; pass --force")
    assert keep.read_text() == "x"
    result = run("generate", tiny_build, *GENERATE, "--out", keep, "--force")
    assert result.exit_code == 0, result.output
    assert Image.open(keep).size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]  # no temporary file left


def test_a_batch_never_writes_over_a_users_file(tiny_build, tmp_path):
    folder = tmp_path / "myphotos"
    folder.mkdir()
    (folder / "0001-seed1.png").write_text("mine")
    result = run("generate", tiny_build, *GENERATE, "--num-images", 2, "--out", folder)
    assert_clean_error(result, "0001-seed1.png already exists; pass --force")
    assert sorted(p.name for p in folder.iterdir()) == ["0001-seed1.png"]  # refused before the first image
    assert (folder / "0001-seed1.png").read_text() == "mine"
    assert_clean_error(
        run("generate", tiny_build, *GENERATE, "--num-images", 2, "--out", tmp_path / "nodir" / "batch"),
        "nodir does not exist",
    )


def test_an_output_that_is_an_input_is_refused_even_with_force(tiny_build, control, tmp_path):
    before = control.read_bytes()
    for args in (
        ("generate", tiny_build, *GENERATE, "--control", control, "--out", control, "--force"),
        ("generate", tiny_build, *GENERATE, "--control", f"canny:{control}", "--out", control, "--force"),
        ("preprocess", "canny", control, "--out", control, "--force"),
    ):
        assert_clean_error(run(*args), "is one of this command's inputs")
    assert control.read_bytes() == before
    prompts = tmp_path / "prompts.png"  # a prompts file is an input too, whatever its name
    prompts.write_text("a circle\n")
    link = tmp_path / "link.png"
    link.symlink_to(control)  # another name for an input is the input
    assert_clean_error(
        run("generate", tiny_build, *GENERATE, "--control", control, "--out", link, "--force"),
        "is one of this command's inputs",
    )
    assert control.read_bytes() == before


def test_json_reports_are_never_written_over_a_file_or_the_build(tiny_build, tmp_path):
    report = tmp_path / "parity.json"
    report.write_text("{}")
    args = ("parity", tiny_build, "--no-end-to-end", "--json")
    assert_clean_error(run(*args, report), "--json file")
    assert report.read_text() == "{}"
    manifest = (tiny_build / "manifest.json").read_bytes()
    assert_clean_error(run(*args, tiny_build / "manifest.json", "--force"), "is one of this command's inputs")
    assert (tiny_build / "manifest.json").read_bytes() == manifest
    result = run(*args, report, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["passed"] is True


def test_images_follow_the_umask_and_say_where_they_came_from(tiny_build, control, tmp_path):
    out = tmp_path / "a.png"
    old = os.umask(0o027)
    try:
        result = run("generate", tiny_build, *GENERATE, "--control", control, "--out", out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    settings = json.loads(Image.open(out).text["controlrt"])
    assert settings["controlrt"] == controlrt.__version__
    assert settings["build"]["path"] == str(tiny_build)
    assert len(settings["build"]["manifest_sha256"]) == 64
    assert settings["controls"] == [str(control)]


def test_controls_given_in_memory_are_named_by_their_pixels(pipelines):
    pipe = pipelines("tiny", "onnxruntime")
    images = sample_control_images(2, 64, 64)
    result = pipe.generate(controlrt.GenerationRequest("x", controls=[images[0], np.asarray(images[1])], steps=1))
    first, second = result.settings["controls"]
    assert first.startswith("image 64x64 RGB sha256:") and second.startswith("array 64x64x3 uint8 sha256:")
    again = pipe.generate(controlrt.GenerationRequest("x", controls=[images[0], images[1]], steps=1))
    assert again.settings["controls"][0] == first  # the same pixels, the same name
    assert again.settings["controls"][1].split("sha256:")[1] == second.split("sha256:")[1]


def test_generate_reports_its_steps_on_stderr_when_it_is_not_a_terminal(tiny_build, tmp_path):
    result = run("generate", tiny_build, "--prompt", "x", "--steps", 3, "--out", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert "denoise: 3/3 steps" in result.stderr
    quiet = run("-q", "generate", tiny_build, "--prompt", "x", "--steps", 3, "--out", tmp_path / "b.png")
    assert "denoise" not in quiet.stderr


def test_bare_command_prints_its_help():
    result = run()
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ") and "\nCommands:\n" in result.stdout
    assert not result.stderr


def test_a_passthrough_preprocessor_says_it_copies(control, tmp_path, caplog):
    result = run("preprocess", "depth", control, "--out", tmp_path / "d.png")
    assert result.exit_code == 0, result.output
    assert "depth: no annotator ran" in caplog.text and "taken as a ready depth map, unchanged" in caplog.text
