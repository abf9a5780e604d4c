"""The README's examples run as written: every Python block, and every line of the blocks marked
runnable, in a folder holding the demo's output (the built-in model, exported)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from controlrt.cli import cli

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = "<!-- runnable"


def _blocks(language: str, marked: bool) -> list[str]:
    """The README's fenced blocks in ``language`` (only those after a runnable mark, if ``marked``)."""
    text = README.read_text()
    pattern = re.compile(rf"(?P<mark>{re.escape(RUNNABLE)}[^\n]*-->\n)?```{language}\n(?P<body>.*?)```", re.S)
    return [m["body"] for m in pattern.finditer(text) if not marked or m["mark"]]


def _commands(block: str) -> list[list[str]]:
    """Each command of a shell block, continuation lines joined, as argv."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


@pytest.fixture(scope="module")
def demo_folder(demo_run):
    return demo_run[0].parent


def test_there_is_something_to_run():
    assert len(_blocks("python", False)) >= 1
    assert sum(len(_commands(b)) for b in _blocks("bash", True)) >= 4


def test_python_blocks_run(demo_folder, monkeypatch):
    monkeypatch.chdir(demo_folder)
    for k, block in enumerate(_blocks("python", False)):
        exec(compile(block, f"README.md python block {k}", "exec"), {"__name__": f"readme_{k}"})
    assert (demo_folder / "circle-api.png").is_file()


def test_runnable_command_lines_run(demo_folder, monkeypatch):
    monkeypatch.chdir(demo_folder)
    for block in _blocks("bash", True):
        for argv in _commands(block):
            assert argv[0] == "controlrt", argv
            result = CliRunner().invoke(cli, argv[1:])
            assert result.exit_code == 0, f"{shlex.join(argv)}:\n{result.output}"
            assert "Traceback" not in result.output
