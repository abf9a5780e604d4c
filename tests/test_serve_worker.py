"""The serving worker: one generation at a time per replica, cancelled callers included (no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time

from controlrt.errors import BackendError, InputError
from controlrt.serving.app import Generator


class _SlowPipe:
    """Records how many generations run at once; fails the ones asked to."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.guard = threading.Lock()
        self.done: list[str] = []

    def generate(self, request):
        with self.guard:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.3)
        with self.guard:
            self.running -= 1
        if request == "bad":
            raise BackendError("this one failed")
        self.done.append(request)
        from types import SimpleNamespace

        from PIL import Image

        return SimpleNamespace(image=Image.new("RGB", (4, 4)), settings={"request": request})


def test_a_cancelled_request_never_lets_the_next_run_alongside_it():
    pipe = _SlowPipe()
    generator = Generator(pipe)

    async def scenario():
        first = asyncio.create_task(generator.run(["first"]))
        await asyncio.sleep(0.05)  # the first generation is running
        first.cancel()  # its client went away
        second = await generator.run(["second"])
        return second

    second = asyncio.run(scenario())
    assert pipe.most == 1  # never two generations on one Pipeline at once
    assert pipe.done == ["first", "second"] and isinstance(second[0], bytes)


def test_a_failure_fails_only_its_own_request():
    generator = Generator(_SlowPipe())
    results = asyncio.run(generator.run(["a", "bad", "b"]))
    assert isinstance(results[0], bytes) and isinstance(results[2], bytes)
    assert isinstance(results[1], BackendError) and not isinstance(results[1], InputError)


def test_serve_settings_are_checked_before_ray_starts():
    import pytest

    from controlrt.serving.app import ServeSettings

    for bad in ({"ray_address": " "}, {"ray_address": "10.0.0.1:6379", "dashboard": True}, {"port": 0}):
        with pytest.raises(InputError):
            ServeSettings("build", **bad)
    assert ServeSettings("build").host == "127.0.0.1" and not ServeSettings("build").dashboard
