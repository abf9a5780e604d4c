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

Ray itself stays off the network: a Ray that ``start`` starts is local, every one of its servers
bound to loopback (only the HTTP app listens on the host given), without a dashboard unless
``dashboard`` is set (then on loopback too); ``ray_address`` joins a cluster the user runs
instead. SIGTERM and SIGINT stop it alike: in-flight requests drain (up to DRAIN_TIMEOUT_S), Serve
and the Ray processes it started stop, and nothing of them is left running.
"""

# No "from __future__ import annotations" here: FastAPI reads the handlers' annotations at
# definition time, and Request is imported lazily inside build_app.
import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from controlrt.errors import BackendError, InputError
from controlrt.runtime.limits import DEFAULT_MAX_IMAGES

logger = logging.getLogger(__name__)


# The largest request body read (base64 control images included).
MAX_BODY_BYTES = 64 << 20
MAX_REPLICAS = 64
APP_NAME = "controlrt"
# How long a stopping replica waits for its in-flight generations (Serve's own shutdown wait is 30 s).
DRAIN_TIMEOUT_S = 25.0
# Ray's switch for a local-only node: its servers bind to loopback and it advertises 127.0.0.1.
_RAY_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class ServeSettings:
    build: str
    backend: str = "onnxruntime"
    precision: str = "fp32"  # "auto" is resolved by start(), once, before any replica starts
    providers: tuple[str, ...] | None = None
    replicas: int = 1
    max_batch: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    max_pixels: int | None = None  # default: Limits.for_model's
    dashboard: bool = False  # Ray's dashboard, on loopback (a Ray that start() starts)
    ray_address: str | None = None  # join this Ray cluster instead of starting a local one
    float_precision: str | None = None  # openvino int8: the float layers' precision (see BackendOptions)

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= MAX_REPLICAS or not 1 <= self.max_batch <= DEFAULT_MAX_IMAGES:
            raise InputError(
                f"--replicas must be from 1 to {MAX_REPLICAS} and --max-batch from 1 to {DEFAULT_MAX_IMAGES}"
            )
        if not 0 < self.port < 65536:
            raise InputError(f"--port {self.port} is not a TCP port")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise InputError(f"--max-pixels {self.max_pixels} must be at least 1")
        if self.ray_address is not None and (not self.ray_address.strip() or self.dashboard):
            raise InputError("--ray-address needs a cluster address (and the cluster's own dashboard, not --dashboard)")

    @property
    def gpus_per_replica(self) -> float:
        gpu_providers = {"cuda", "tensorrt", "CUDAExecutionProvider", "TensorrtExecutionProvider"}
        on_gpu = self.backend == "tensorrt" or bool(set(self.providers or ()) & gpu_providers)
        return 1.0 if on_gpu else 0.0

    def backend_options(self) -> dict[str, Any]:
        """The BackendOptions of each replica, beyond backend, providers and precision."""
        options: dict[str, Any] = {}
        if self.backend in ("onnxruntime", "openvino") and not self.gpus_per_replica:
            # replicas share the machine's cores: one pool of threads per replica, not one each
            options["threads"] = max(1, (os.cpu_count() or 1) // self.replicas)
        if self.float_precision is not None:
            options["float_precision"] = self.float_precision
        return options

    def resolved(self, build) -> "ServeSettings":
        """These settings with ``precision`` auto replaced by what it chooses for the replicas
        (measured with their thread count, at first use; cached in the build)."""
        from controlrt.runtime.autoprecision import choose_precision, requested

        if requested(self.precision) is not None:
            return self
        choice = choose_precision(build, self.backend, self.providers, **self.backend_options())
        float_precision = None if choice.float_precision is None else str(choice.float_precision)
        return replace(self, precision=str(choice.precision), float_precision=float_precision)


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
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
        graceful_shutdown_wait_loop_s=0.5,
    )
    @serve.ingress(api)
    class ControlrtDeployment:
        def __init__(self, config: dict[str, Any]) -> None:
            from controlrt.manifest import Build
            from controlrt.runtime.limits import Limits
            from controlrt.runtime.pipeline import Pipeline

            _replica_grpc_on_loopback()
            self.settings = ServeSettings(**config)
            s = self.settings
            options = s.backend_options()
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


def _replica_grpc_on_loopback() -> None:
    """In a local-only Ray, bind this replica's inter-deployment gRPC server to loopback.

    Ray Serve starts one per replica, right after the deployment's constructor, on every interface
    ("[::]:0", with no setting to change it). A Ray whose node address is loopback (the local Ray
    ``start`` starts) is reached only from this machine, so that server is too; in a cluster
    joined with ray_address it is left as Serve makes it.
    """
    import ipaddress

    import ray
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "controlrt_loopback", False):
        return
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return

    def on_loopback(server, address: str):
        return add_port(server, address.replace("[::]:", "127.0.0.1:", 1))

    on_loopback.controlrt_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


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


class Stopped(Exception):
    """Raised in the main thread by the first SIGTERM or SIGINT while ``start`` blocks."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _init_ray(settings: ServeSettings) -> str | None:
    """Connect to ``settings.ray_address``, or start a local Ray whose servers all listen on
    loopback, with no dashboard unless asked for (its address is returned). A Ray the caller
    already started is used as it is."""
    import ray

    if ray.is_initialized():
        return None
    quiet = {"log_to_driver": False, "configure_logging": False}
    if settings.ray_address is not None:
        try:
            ray.init(address=settings.ray_address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise BackendError(f"--ray-address {settings.ray_address}: cannot join the cluster: {first}") from None
        return None
    # Ray reads its local-only switch from the environment (its node, GCS, raylet and agents) and,
    # in this process, from a constant read when ray was imported
    from ray._private import ray_constants

    saved = os.environ.get(_RAY_LOCAL_ONLY), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_LOCAL_ONLY] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(address="local", include_dashboard=settings.dashboard, dashboard_host="127.0.0.1", **quiet)
    finally:
        if saved[0] is None:
            os.environ.pop(_RAY_LOCAL_ONLY, None)
        else:
            os.environ[_RAY_LOCAL_ONLY] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
    return getattr(context, "dashboard_url", None) if settings.dashboard else None


def start(settings: ServeSettings, blocking: bool = True, announce=None):
    """Check the build and the port, start Ray (see _init_ray), Serve on settings.host:port, and
    the app.

    ``announce``, if given, is called with the URL once the application answers, and the
    dashboard's URL (None unless one was asked for). With ``blocking`` this returns only when
    SIGTERM or SIGINT arrives, after draining the in-flight requests and stopping Serve and Ray: it
    returns the signal's number for SIGTERM and raises KeyboardInterrupt for SIGINT; signals after
    the first are ignored while it stops.
    """
    import signal
    import time

    serve = _import_serve()
    from controlrt.manifest import Build

    settings = settings.resolved(Build.open(settings.build))  # clear errors before Ray starts
    check_port(settings.host, settings.port)
    dashboard = _init_ray(settings)
    external = settings.ray_address is not None
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        handle = serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # Ray reports a failed replica or proxy as its own exception types
        stop(external)
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BackendError(f"controlrt serve could not start: {first}") from None
    if announce is not None:
        announce(f"http://{settings.host}:{settings.port}", f"http://{dashboard}" if dashboard else None)
    if not blocking:
        return handle
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        if not received:  # the first one stops; later ones must not cut the drain short
            received.append(signum)
            raise Stopped(signum)

    # set after ray.init, whose handlers (and the core worker's stack-dumping one) these replace
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            time.sleep(1)
    except Stopped:
        pass
    finally:
        try:
            stop(external)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received[0] == signal.SIGINT:
        raise KeyboardInterrupt
    return received[0]


def stop(external: bool = False) -> None:
    """Stop the app: with ``external`` (a cluster joined with ray_address) delete it there and
    disconnect; else shut Serve down and stop the local Ray with every process it started."""
    import ray

    serve = _import_serve()
    # deleting the app first lets its replicas finish the requests in flight (DRAIN_TIMEOUT_S)
    # while the HTTP proxy is still there to answer them
    serve.delete(APP_NAME)
    if not external:
        serve.shutdown()
    ray.shutdown()
