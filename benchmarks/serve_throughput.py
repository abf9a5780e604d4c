"""Requests per minute of ``controlrt serve`` at 1 and 2 replicas, on loopback.

    python benchmarks/serve_throughput.py                 # built-in model, 16 requests, 4 clients
    python benchmarks/serve_throughput.py --build BUILD --requests 32 --steps 20

Builds and exports the built-in model unless --build is given, then for each replica count starts
the Ray Serve application, sends --requests generations from --clients threads (two controls,
--steps steps, distinct seeds), checks every image against a direct Pipeline call at the same seed,
and prints requests per minute. One Ray instance with the machine's CPUs.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import numpy as np
    import ray
    from ray import serve

    from controlrt.builtin import sample_control_images, write_builtin_models
    from controlrt.export.build import export_build
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.serving.app import ServeSettings, build_app
    from controlrt.serving.client import generate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replicas", default="1,2")
    args = parser.parse_args()

    build = args.build
    if build is None:
        root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
        models = write_builtin_models(root / "models")
        export_build(models.base, models.controlnets, root / "build")
        build = str(root / "build")
    controls = sample_control_images(2, 64, 64)
    jobs = [{"prompt": f"shapes {k}", "seed": k, "steps": args.steps} for k in range(args.requests)]
    with Pipeline.load(build) as direct:
        expected = [np.asarray(direct(j["prompt"], controls=controls, seed=j["seed"], steps=j["steps"])) for j in jobs]

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for replicas in [int(r) for r in args.replicas.split(",")]:
            port = _port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(ServeSettings(build, replicas=replicas, port=port)), name="controlrt", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            generate(url, "warm", controls=controls, steps=2)
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                images = list(pool.map(lambda j, url=url: generate(url, controls=controls, **j), jobs))
            seconds = time.perf_counter() - start
            correct = sum(
                np.array_equal(np.asarray(i.convert("RGB")), e) for i, e in zip(images, expected, strict=True)
            )
            rows.append((replicas, seconds, 60 * len(jobs) / seconds, correct))
            serve.shutdown()
    finally:
        ray.shutdown()
    print(f"\n{args.requests} requests, {args.clients} clients, {args.steps} steps, {os.cpu_count()} CPUs")
    print(f"{'replicas':>8} {'seconds':>8} {'req/min':>8} {'equal to direct':>16}")
    for replicas, seconds, rpm, correct in rows:
        print(f"{replicas:>8} {seconds:>8.1f} {rpm:>8.1f} {correct:>10}/{len(jobs)}")


if __name__ == "__main__":
    main()
