"""Where OpenVINO spends a graph's time on this CPU: a per-operation profile of one build graph.

    python benchmarks/ov_profile.py BUILD                                  # UNet, fp32 and bf16, 256 px
    python benchmarks/ov_profile.py BUILD --graph controlnet_0 --precision int8 --inference bf16
    python benchmarks/ov_profile.py BUILD --height 512 --width 512 --top 15

Compiles the graph as the openvino backend does (latency hint, the inference precision asked) with
OpenVINO's per-node performance counters on, runs it ``--runs`` times on the spec's dummy inputs at
the size asked (batch 2: both guidance halves), and prints, for the median run, the time per
operation type and kernel (OpenVINO's exec type: ``brgemm_avx512_amx_bf16``, ``jit_avx512_f32``…)
with its share of the graph's time, then the slowest single nodes. Prints the CPU, its features and
torch's matrix-multiply peaks first, so that a profile is always read with the CPU it came from.
"""

from __future__ import annotations

import argparse
import statistics
import time


def profile(build_dir: str, graph: str, precision: str, inference: str, height: int, width: int, runs: int):
    import numpy as np

    from controlrt.errors import InputError
    from controlrt.manifest import Build
    from controlrt.runtime.limits import Limits
    from controlrt.runtime.ov_backend import compile_config, core

    build = Build.open(build_dir)
    if graph not in build.manifest.graphs:
        raise InputError(f"build {build.path} has no graph {graph!r}; it has {', '.join(build.manifest.graphs)}")
    if not 1 <= runs <= 100:
        raise InputError(f"--runs must be from 1 to 100, got {runs}")
    limits = Limits.for_model(build.manifest.info)
    if height * width > limits.max_pixels:  # bounded before anything is allocated
        raise InputError(f"{height}x{width} is more than this model's {limits.max_pixels} pixels")
    spec = build.manifest.spec(graph)
    path = build.graph_path(graph, precision)
    compiled = core().compile_model(str(path), "CPU", {**compile_config(inference), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    feeds = spec.dummy_inputs(spec.sizes(2, height, width), seed=0)
    inputs = {i: np.ascontiguousarray(feeds[name].numpy()) for i, name in enumerate(spec.input_names)}
    request.infer(inputs)  # warm: first allocations
    walls, counters = [], []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer(inputs)
        walls.append(time.perf_counter() - start)
        counters.append(
            [(c.node_name, c.node_type, c.exec_type, c.real_time.total_seconds()) for c in request.profiling_info]
        )
    median = sorted(range(runs), key=lambda k: walls[k])[runs // 2]
    return walls, counters[median]


def report(walls, rows, top: int) -> None:
    total = sum(r[3] for r in rows)
    by_kind: dict[tuple[str, str], list] = {}  # (operation, kernel) -> [seconds, nodes]
    for _, node_type, exec_type, seconds in rows:
        if seconds > 0:
            entry = by_kind.setdefault((node_type, exec_type), [0.0, 0])
            entry[0] += seconds
            entry[1] += 1
    print(
        f"  wall {statistics.median(walls) * 1e3:.1f} ms per call (min {min(walls) * 1e3:.1f}); "
        f"nodes' sum {total * 1e3:.1f} ms"
    )
    print(f"  {'operation':<28} {'kernel':<34} {'nodes':>5} {'ms':>8} {'share':>6}")
    for (node_type, exec_type), (spent, nodes) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {node_type:<28} {exec_type:<34} {nodes:>5} {spent * 1e3:>8.1f} {spent / total:>6.1%}")
    print("  slowest nodes:")
    for name, node_type, exec_type, seconds in sorted(rows, key=lambda r: -r[3])[: min(top, 10)]:
        print(f"    {seconds * 1e3:7.2f} ms  {node_type:<22} {exec_type:<30} {name[:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--graph", default="unet")
    parser.add_argument("--precision", default="fp32", help="the build's graph variant: fp32, fp16 or int8")
    parser.add_argument(
        "--inference", default=None, help="OpenVINO inference precision, f32 or bf16 (default: both where bf16 runs)"
    )
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()

    from controlrt import cpu
    from controlrt.runtime.ov_backend import supports_bf16

    peaks = cpu.matmul_peaks()
    print(f"CPU: {cpu.cpu_name()}; features: {', '.join(cpu.cpu_features()) or 'none'}")
    print("torch matrix-multiply peaks, GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v))
    inference = [args.inference] if args.inference else ["f32", *(["bf16"] if supports_bf16() else [])]
    from controlrt.errors import ControlrtError

    for hint in inference:
        print(f"{args.graph} ({args.precision} graph, OpenVINO {hint}), batch 2, {args.height}x{args.width}:")
        try:
            walls, rows = profile(args.build, args.graph, args.precision, hint, args.height, args.width, args.runs)
        except ControlrtError as exc:
            raise SystemExit(f"error: {exc}") from None
        report(walls, rows, args.top)


if __name__ == "__main__":
    main()
