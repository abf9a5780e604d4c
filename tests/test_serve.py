"""The Ray Serve application, in-process on loopback with the tiny model (CPU only).

Bounded: one local Ray instance, 8 requests from 4 client threads, a few bad requests, then a
clean shutdown.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from controlrt.builtin import sample_control_images

pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install "controlrt[serve]"')
pytestmark = pytest.mark.serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_build):
    import ray

    from controlrt.serving.app import ServeSettings, start, stop

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start(ServeSettings(str(tiny_build), replicas=2, max_batch=2, port=port), blocking=False)
    yield f"http://127.0.0.1:{port}"
    stop()


def _post(url: str, body) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_concurrent_requests_match_direct_calls(server, pipelines):
    from controlrt.serving.client import generate

    controls = sample_control_images(2, 64, 64)
    jobs = [{"prompt": f"shape {k % 3}", "seed": k, "steps": 3, "scales": [1.0, 0.5]} for k in range(8)]
    with ThreadPoolExecutor(max_workers=4) as clients:
        images = list(clients.map(lambda job: generate(server, controls=controls, **job), jobs))
    direct = pipelines("tiny", "onnxruntime")
    for job, image in zip(jobs, images, strict=True):
        expected = np.asarray(direct(job["prompt"], controls=controls, seed=job["seed"], steps=3, scales=[1.0, 0.5]))
        assert np.array_equal(np.asarray(image.convert("RGB")), expected)
        assert json.loads(image.info["controlrt"])["seed"] == job["seed"]
    with urllib.request.urlopen(server + "/health", timeout=30) as answer:
        assert json.loads(answer.read())["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        ({"steps": 3}, "'prompt'"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "controls": ["%%%"]}, "base64"),
        ({"prompt": "x", "colour": "red"}, "unknown field"),
        ({"prompt": "x", "height": 30}, "multiple of"),
        ({"prompt": "x", "true_cfg": "high"}, "'true_cfg' must be a number"),
        ({"prompt": "x", "true_cfg": 3.0}, "true CFG (diffusers' true_cfg_scale) is for Flux models"),
    ],
)
def test_bad_requests_get_400_with_a_message(server, body, fragment):
    status, data = _post(server, body)
    assert status == 400
    assert fragment in json.loads(data)["error"]


def test_client_raises_input_error_on_4xx(server):
    from controlrt.errors import InputError
    from controlrt.serving.client import generate

    with pytest.raises(InputError, match="400"):
        generate(server, "x", controls=[Image.new("RGB", (64, 64))] * 3)  # more controls than ControlNets


def test_a_bad_request_never_fails_the_good_ones_batched_with_it(server):
    """Requests are checked one by one before they join a batch (max_batch 2 here)."""
    good = {"prompt": "a circle", "steps": 2, "seed": 1}
    bad = {"prompt": "a circle", "steps": 2, "height": 100000, "width": 100000}
    with ThreadPoolExecutor(max_workers=6) as clients:
        answers = list(clients.map(lambda body: _post(server, body), [good, bad, good, bad, good, bad]))
    assert [status for status, _ in answers] == [200, 400] * 3
    assert "pixels; at most" in json.loads(answers[1][1])["error"]


def test_bounded_requests(server):
    status, data = _post(server, {"prompt": "x", "steps": 5000})
    assert status == 400 and "steps must be a whole number from 1 to 999" in json.loads(data)["error"]
    # a body declared larger than the limit is refused before it is read
    import http.client
    from urllib.parse import urlparse

    where = urlparse(server)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    connection.putrequest("POST", "/generate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(65 << 20))
    connection.endheaders(b"{}")
    answer = connection.getresponse()
    assert answer.status == 413 and "over 64 MiB" in json.loads(answer.read())["error"]
    connection.close()


def test_a_busy_port_is_one_line(tiny_build):
    from controlrt.errors import InputError
    from controlrt.serving.app import ServeSettings, start

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot serve on 127.0.0.1:{port}"):
            start(ServeSettings(str(tiny_build), port=port), blocking=False)


def test_image_to_image_requests(server, pipelines):
    """The init image and mask travel as base64 PNGs and give what a direct call gives."""
    from controlrt.builtin import sample_init_image, sample_mask
    from controlrt.serving.client import generate

    init, mask = sample_init_image(64, 64), sample_mask(64, 64)
    image = generate(server, "a circle", image=init, mask=mask, strength=0.8, steps=3, seed=2)
    direct = pipelines("tiny", "onnxruntime")("a circle", image=init, mask=mask, strength=0.8, steps=3, seed=2)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct))
    settings = json.loads(image.info["controlrt"])
    assert settings["strength"] == 0.8 and settings["mask"].startswith("image 64x64 L sha256:")
    status, data = _post(server, {"prompt": "x", "mask": "%%%"})
    assert status == 400 and "'mask' is not valid base64" in json.loads(data)["error"]
