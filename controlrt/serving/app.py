"""``controlrt serve``: the runtime as a Ray Serve application (``pip install "controlrt[serve]"``).

One deployment; each replica loads a Pipeline once (sessions reused across requests) and runs one
generation at a time in a worker thread, so its event loop keeps answering ``/health``. Replicas
get a GPU each when the backend needs one. With ``max_batch > 1`` requests are grouped by Serve's
batching and run back to back on the replica; every result is the one an unbatched call gives at
the same seed.

Routes: ``POST /generate`` (see controlrt.serving.protocol) -> image/png; ``GET /health`` -> JSON.
Bad requests get a JSON ``{"error": ...}`` with status 400 (the CLI's validation); 500 only for real
failures.
"""

# No "from __future__ import annotations" here: FastAPI reads the handlers' annotations at
# definition time, and Request is imported lazily inside build_app.
import asyncio
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from controlrt.errors import BackendError, InputError

logger = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_batch < 1:
            raise InputError("--replicas and --max-batch must be at least 1")
        if not 0 < self.port < 65536:
            raise InputError(f"--port {self.port} is not a TCP port")

    @property
    def gpus_per_replica(self) -> float:
        gpu_providers = {"cuda", "tensorrt", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
        on_gpu = self.backend == "tensorrt" or bool(set(self.providers or ()) & gpu_providers)
        return 1.0 if on_gpu else 0.0


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
            from controlrt.runtime.pipeline import Pipeline

            self.settings = ServeSettings(**config)
            s = self.settings
            options = {}
            if s.backend == "onnxruntime" and not s.gpus_per_replica:
                # replicas share the machine's cores: one pool of threads per replica, not one each
                options["threads"] = max(1, (os.cpu_count() or 1) // s.replicas)
            self.pipe = Pipeline.load(
                s.build, backend=s.backend, providers=s.providers, precision=s.precision, **options
            )
            self.lock = asyncio.Lock()
            self.served = 0

        @api.get("/health")
        async def health(self) -> dict[str, Any]:
            s = self.settings
            return {"status": "ok", "backend": s.backend, "precision": s.precision, "served": self.served}

        @api.post("/generate")
        async def generate(self, request: Request) -> Response:
            from controlrt.errors import ControlrtError
            from controlrt.serving.protocol import parse_request

            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
            try:
                generation = parse_request(body)
                png = await self._generate(generation)
            except InputError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except ControlrtError as exc:
                logger.error("generation failed: %s", exc)
                return JSONResponse({"error": str(exc)}, status_code=500)
            return Response(content=png, media_type="image/png")

        async def _generate(self, generation) -> bytes:
            if self.settings.max_batch > 1:
                return await self._batched(generation)
            return (await self._run([generation]))[0]

        @serve.batch(max_batch_size=settings.max_batch, batch_wait_timeout_s=0.05)
        async def _batched(self, generations: list) -> list[bytes]:
            return await self._run(generations)

        async def _run(self, generations: list) -> list[bytes]:
            async with self.lock:  # one generation at a time per replica
                results = await asyncio.to_thread(self._generate_all, generations)
            self.served += len(generations)
            return results

        def _generate_all(self, generations: list) -> list[bytes]:
            from controlrt.runtime.images import encode_png

            out = []
            for generation in generations:
                result = self.pipe.generate(generation)
                out.append(encode_png(result.image, result.settings))
            return out

    return ControlrtDeployment.bind(asdict(settings))


def start(settings: ServeSettings, blocking: bool = True):
    """Start Ray (locally), Serve on settings.host:port, and the application."""
    import ray

    serve = _import_serve()
    from controlrt.manifest import Build

    Build.open(settings.build)  # a clear error before Ray starts
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(settings), name="controlrt", route_prefix="/", blocking=blocking)


def stop() -> None:
    import ray

    serve = _import_serve()
    serve.shutdown()
    ray.shutdown()
