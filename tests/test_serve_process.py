"""``controlrt serve`` as a service manager runs it: a process of its own, stopped by SIGTERM or
SIGINT. While it runs nothing of it listens beyond loopback; stopping drains the request in flight,
exits 0 (SIGTERM) or 130 (SIGINT) without a stack dump, and leaves no process behind."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install "controlrt[serve]"')
pytestmark = pytest.mark.serve

MARKER = "CONTROLRT_SERVE_TEST"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(tag: str) -> list[int]:
    """Every process whose environment carries the test's tag (serve and everything Ray started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARKER}={tag}".encode() in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _listening(pids: list[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket those processes listen on."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # the kernel writes each 32-bit word in host (little-endian) order
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            address = ipaddress.ip_address(packed)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.append((str(address), int(hex_port, 16), inodes[fields[9]]))
    return found


def _start(build: Path, port: int, tag: str) -> subprocess.Popen:
    env = {**os.environ, MARKER: tag}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "controlrt.cli", "serve", str(build), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving "):
            process.lines = lines  # type: ignore[attr-defined]
            threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
            return process
    process.kill()
    pytest.fail(f"serve did not start: {''.join(lines)[-2000:]}")


def _generate(url: str, body: dict, out: list) -> None:
    request = urllib.request.Request(
        url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            out.append((answer.status, answer.read()[:8]))
    except Exception as exc:
        out.append((None, repr(exc)))


def _gone(tag: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _marked(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_serve_stops_cleanly_and_exposes_nothing_beyond_loopback(tiny_build, signum, code):
    tag = uuid.uuid4().hex
    port = _free_port()
    process = _start(tiny_build, port, tag)
    try:
        url = f"http://127.0.0.1:{port}"
        listening = _listening(_marked(tag))
        assert any(p == port for _, p, _ in listening), listening  # the app's own port is among them
        beyond = [entry for entry in listening if not ipaddress.ip_address(entry[0]).is_loopback]
        assert not beyond, f"listening beyond loopback: {beyond}"
        answers: list = []
        if signum == signal.SIGTERM:  # a request in flight when the signal comes is answered
            client = threading.Thread(target=_generate, args=(url, {"prompt": "x", "steps": 60}, answers))
            client.start()
            time.sleep(2.0)
        process.send_signal(signum)
        assert process.wait(timeout=120) == code
        if signum == signal.SIGTERM:
            client.join(timeout=120)
            assert answers and answers[0][0] == 200, answers
        left = _gone(tag, 30)
        assert not left, f"processes left: {[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in left]}"
        text = "".join(process.lines)  # type: ignore[attr-defined]
        assert "Traceback" not in text and "received at time" not in text and "*** SIG" not in text, text[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        for pid in _marked(tag):
            os.kill(pid, signal.SIGKILL)
