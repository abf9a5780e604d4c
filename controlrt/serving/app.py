"""``controlrt serve``: the runtime as a Ray Serve application (``pip install "controlrt[serve]"``).

One deployment; each replica loads a Pipeline once (sessions reused across requests) and runs one
generation at a time on a single worker thread of its own, so its event loop keeps answering
``/health``, and a request whose client went away cannot make the next one run the same Pipeline
at the same time. Replicas get a GPU each when the backend needs one. With ``max_batch > 1``
requests are grouped by Serve's batching and run back to back on the replica; every result is the
one an unbatched call gives at the same seed.

Every request is checked on its own before it joins a batch: its body size, JSON, fields, the
build's limits (image size, steps, controls) and its control images, each a 400 with a JSON
``{"error": ...}``, so a bad request never fails the others batched with it; a failure while
generating fails only its own request (500).

Routes: ``POST /generate`` (see controlrt.serving.protocol) -> image/png; ``GET /health`` -> JSON.
"""

# No "from __future__ import annotations" here: FastAPI reads the handlers' annotations at
# definition time, and Request is imported lazily inside build_app.
import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from controlrt.errors import BackendError, InputError
from controlrt.runtime.limits import DEFAULT_MAX_IMAGES

logger = logging.getLogger(__name__)


# The largest request body read (base64 control images included).
MAX_BODY_BYTES = 64 << 20
MAX_REPLICAS = 64


@dataclass(frozen=True)
class ServeSettings:
    build: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    providers: tuple[str, ...] | None = None
    replicas: int = 1
    max_batch: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    max_pixels: int | None = None  # default: Limits.for_model's

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= MAX_REPLICAS or not 1 <= self.max_batch <= DEFAULT_MAX_IMAGES:
            raise InputError(
                f"--replicas must be from 1 to {MAX_REPLICAS} and --max-batch from 1 to {DEFAULT_MAX_IMAGES}"
            )
        if not 0 < self.port < 65536:
            raise InputError(f"--port {self.port} is not a TCP port")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise InputError(f"--max-pixels {self.max_pixels} must be at least 1")

    @property
    def gpus_per_replica(self) -> float:
        gpu_providers = {"cuda", "tensorrt", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
        on_gpu = self.backend == "tensorrt" or bool(set(self.providers or ()) & gpu_providers)
        return 1.0 if on_gpu else 0.0


class Generator:
    """Runs a Pipeline's generations one at a time on a single worker thread.

    ``run`` may be awaited from many requests at once (and cancelled when a client goes away):
    the work itself always runs on the one thread, in the order it was submitted, so a cancelled
    request never lets the next one use the Pipeline while its generation still runs.
    """

    def __init__(self, pipe) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pipe = pipe
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controlrt-generate")

    async def run(self, generations: list) -> list[bytes | Exception]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self.generate_all, generations)

    def generate_all(self, generations: list) -> list[bytes | Exception]:
        """Each generation's PNG, or the exception that ended it (failing only its own request)."""
        from controlrt.runtime.images import encode_png

        out: list[bytes | Exception] = []
        for generation in generations:
            try:
                result = self.pipe.generate(generation)
                out.append(encode_png(result.image, result.settings))
            except Exception as exc:  # reported to its own request only
                logger.error("generation failed: %s", exc, exc_info=not isinstance(exc, InputError))
                out.append(exc)
        return out


def _import_serve():
    try:
        from ray import serve
    except ImportError:
        raise BackendError('controlrt serve needs Ray Serve: pip install "controlrt[serve]"') from None
    return serve


def build_app(settings: ServeSettings):
    """The Ray Serve application for ``settings`` (not yet running)."""
    serve = _import_serve()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    api = FastAPI(title="controlrt")

    @serve.deployment(
        num_replicas=settings.replicas,
        ray_actor_options={"num_gpus": settings.gpus_per_replica, "num_cpus": 0},
        max_ongoing_requests=64,
        health_check_period_s=10,
    )
    @serve.ingress(api)
    class ControlrtDeployment:
        def __init__(self, config: dict[str, Any]) -> None:
            from controlrt.manifest import Build
            from controlrt.runtime.limits import Limits
            from controlrt.runtime.pipeline import Pipeline

            self.settings = ServeSettings(**config)
            s = self.settings
            options = {}
            if s.backend in ("onnxruntime", "openvino") and not s.gpus_per_replica:
                # replicas share the machine's cores: one pool of threads per replica, not one each
                options["threads"] = max(1, (os.cpu_count() or 1) // s.replicas)
            build = Build.open(s.build)
            limits = Limits.for_model(build.manifest.info, s.max_pixels)
            self.pipe = Pipeline.from_build(
                build, backend=s.backend, providers=s.providers, precision=s.precision, limits=limits, **options
            )
            self.generator = Generator(self.pipe)  # one at a time, even when callers are cancelled
            self.served = 0

        @api.get("/health")
        async def health(self) -> dict[str, Any]:
            s = self.settings
            return {"status": "ok", "backend": s.backend, "precision": s.precision, "served": self.served}

        @api.post("/generate")
        async def generate(self, request: Request) -> Response:
            from controlrt.errors import ControlrtError
            from controlrt.serving.protocol import parse_request

            too_big = JSONResponse({"error": f"the request body is over {MAX_BODY_BYTES >> 20} MiB"}, status_code=413)
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
                return too_big
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return too_big
                chunks.append(chunk)
            body = b"".join(chunks)
            try:
                data = json.loads(body)
            except ValueError:
                return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
            try:
                generation = parse_request(data)
                self.pipe.check(generation)  # on its own, before it joins a batch
            except InputError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            result = await self._generate(generation)
            if isinstance(result, InputError):
                return JSONResponse({"error": str(result)}, status_code=400)
            if isinstance(result, Exception):
                message = str(result) if isinstance(result, ControlrtError) else "generation failed"
                return JSONResponse({"error": message}, status_code=500)
            return Response(content=result, media_type="image/png")

        async def _generate(self, generation) -> bytes | Exception:
            if self.settings.max_batch > 1:
                return await self._batched(generation)
            return (await self._run([generation]))[0]

        @serve.batch(max_batch_size=settings.max_batch, batch_wait_timeout_s=0.05)
        async def _batched(self, generations: list) -> list[bytes | Exception]:
            return await self._run(generations)

        async def _run(self, generations: list) -> list[bytes | Exception]:
            results = await self.generator.run(generations)
            self.served += len(generations)
            return results

    return ControlrtDeployment.bind(asdict(settings))


def check_port(host: str, port: int) -> None:
    """InputError if ``host:port`` cannot be listened on (in use, or not an address of this machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"cannot serve on {host}:{port}: {exc.strerror} (another server on that port?)") from None


def start(settings: ServeSettings, blocking: bool = True, announce=None):
    """Check the build and the port, start Ray (locally), Serve on settings.host:port, and the app.

    ``announce``, if given, is called with the URL once the application answers. With
    ``blocking`` this returns only when interrupted (KeyboardInterrupt, after shutting down).
    """
    import time

    import ray

    serve = _import_serve()
    from controlrt.manifest import Build

    Build.open(settings.build)  # clear errors before Ray starts
    check_port(settings.host, settings.port)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        handle = serve.run(build_app(settings), name="controlrt", route_prefix="/", blocking=False)
    except Exception as exc:  # Ray reports a failed replica or proxy as its own exception types
        stop()
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BackendError(f"controlrt serve could not start: {first}") from None
    if announce is not None:
        announce(f"http://{settings.host}:{settings.port}")
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1)
    finally:
        stop()


def stop() -> None:
    import ray

    serve = _import_serve()
    serve.shutdown()
    ray.shutdown()
