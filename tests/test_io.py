"""Output safety: locks between processes, folders controlrt owns, nothing a user wrote replaced."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from controlrt.cli import cli
from controlrt.errors import InputError
from controlrt.io import check_replaceable, file_lock, lock_path, staged_folder


def _hold(target: str, seconds: float, started, order) -> None:
    with file_lock(target):
        order.put(("child", "in"))
        started.set()
        time.sleep(seconds)
        order.put(("child", "out"))


def test_lock_excludes_another_process_and_leaves_no_file(tmp_path):
    target = tmp_path / "build"
    context = multiprocessing.get_context("spawn")
    started, order = context.Event(), context.Queue()
    child = context.Process(target=_hold, args=(str(target), 1.0, started, order))
    child.start()
    assert started.wait(60)
    with file_lock(target):  # waits for the child to let go
        order.put(("parent", "in"))
    child.join(30)
    events = [order.get(timeout=5) for _ in range(3)]
    assert events == [("child", "in"), ("child", "out"), ("parent", "in")]
    assert not lock_path(target).exists()


def test_lock_is_reentrant_in_one_process(tmp_path):
    with file_lock(tmp_path / "x"), file_lock(tmp_path / "x"):
        assert lock_path(tmp_path / "x").exists()
    assert not lock_path(tmp_path / "x").exists()


def test_a_folder_controlrt_did_not_write_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for force in (False, True):
        with pytest.raises(InputError, match="not written by controlrt"):
            check_replaceable(mine, force)
    with staged_folder(tmp_path / "ours", "test") as staging:
        (staging / "a.txt").write_text("a")
    with pytest.raises(InputError, match="pass --force"):
        check_replaceable(tmp_path / "ours", False)
    check_replaceable(tmp_path / "ours", True)
    (tmp_path / "ours" / "added.txt").write_text("a user's file")  # added later by hand
    with pytest.raises(InputError, match=r"holds files controlrt did not write \(added.txt\)"):
        check_replaceable(tmp_path / "ours", True)


def test_a_target_written_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    outer = staged_folder(target, "test")
    with pytest.raises(InputError, match="written by another command meanwhile"):  # noqa: SIM117
        with outer, staged_folder(target, "test") as other:  # another command finishes first
            (other / "theirs.txt").write_text("theirs")
    assert (target / "theirs.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_builtin_never_deletes_a_users_files(tmp_path):
    (tmp_path / "m" / "base").mkdir(parents=True)
    (tmp_path / "m" / "base" / "x").write_text("w")
    for extra in ([], ["--force"]):
        code, output = _invoke("builtin", tmp_path / "m", *extra)
        assert code != 0 and output.startswith("error: ") and "not written by controlrt" in output
        assert (tmp_path / "m" / "base" / "x").read_text() == "w"
    code, output = _invoke("builtin", tmp_path / "new", "--random")
    assert code == 0, output
    code, output = _invoke("builtin", tmp_path / "new", "--random")
    assert code != 0 and "pass --force" in output
    code, output = _invoke("builtin", tmp_path / "new", "--random", "--force", "--seed", "3")
    assert code == 0, output


@pytest.mark.parametrize("where", [".", "/", "{file}/sub"])
def test_builtin_refuses_impossible_outputs_in_one_line(tmp_path, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    code, output = _invoke("builtin", where.format(file=tmp_path / "file"))
    assert code != 0 and output.count("\n") == 1 and output.startswith("error: "), output


def test_demo_never_touches_a_users_folder(tmp_path):
    (tmp_path / "d" / "models").mkdir(parents=True)
    (tmp_path / "d" / "models" / "mine.txt").write_text("keep")
    code, output = _invoke("demo", "--out", tmp_path / "d", "--steps", 1, "--force")
    assert code != 0 and "not written by controlrt" in output
    assert (tmp_path / "d" / "models" / "mine.txt").read_text() == "keep"


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_exits_130_in_one_line(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("controlrt.export.build.export_build", _interrupt)
    code, output = _invoke("export", tiny_models.base, "--controlnet", tiny_models.controlnets[0], "--out", tmp_path)
    assert code == 130 and output.strip() == "error: interrupted"


def test_bad_opset_is_one_line_and_nothing_on_stdout(tiny_models, tmp_path):
    base, controlnet = str(tiny_models.base), str(tiny_models.controlnets[0])
    result = CliRunner().invoke(
        cli, ["export", base, "--controlnet", controlnet, "--out", str(tmp_path / "b"), "--opset", "5"]
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.output.strip().startswith("error: ONNX opset 5 is not supported")
    assert not (tmp_path / "b").exists()


def test_export_into_a_file_or_proc_is_one_line(tiny_models, tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "b", Path("/proc/controlrt-build")):
        code, output = _invoke("export", tiny_models.base, "--controlnet", tiny_models.controlnets[0], "--out", out)
        assert code != 0 and output.count("\n") == 1 and output.startswith("error: "), output


def test_hidden_files_a_user_put_in_a_build_are_theirs(tiny_build, tmp_path):
    """Only controlrt's own temporary names count as controlrt's, not any hidden file."""
    import shutil

    from controlrt.manifest import explain_build

    build = shutil.copytree(tiny_build, tmp_path / "build")
    (build / ".fp16-partial-abc").mkdir()
    (build / ".fp16-partial-abc" / "unet.fp16.x.onnx").write_bytes(b"left by a killed convert")
    check_replaceable(build, True, explain_build)
    (build / ".git").mkdir()
    (build / ".git" / "HEAD").write_text("a user's repository")
    with pytest.raises(InputError, match=r"did not write \(.git/HEAD\)"):
        check_replaceable(build, True, explain_build)
