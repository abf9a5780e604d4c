"""Which onnxruntime CPU settings make a graph faster: each setting against the default, same process.

    python benchmarks/ort_options.py BUILD --graph unet --size 256 --batch 2 --runs 5

Times one graph of a build at one shape (warm, median of --runs, interleaved) under: the session
defaults controlrt uses; onnxruntime's transformer optimizer for UNets (fused attention, GELU,
LayerNorm; GroupNorm and NHWC convolutions off, they are GPU kernels); memory arena off; and
threads pinned to the physical cores. Checks each variant's output against the default's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    from controlrt.manifest import Build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--graph", default="unet")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    build = Build.open(args.build, verify=False)
    spec = build.manifest.spec(args.graph)
    path = build.graph_path(args.graph, args.precision)
    size = args.size or spec.default_size[0]
    feeds = {k: v.numpy() for k, v in spec.dummy_inputs(spec.sizes(args.batch, size, size), seed=1).items()}

    def options(**kw):
        o = ort.SessionOptions()
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        o.log_severity_level = 3
        for k, v in kw.items():
            setattr(o, k, v)
        return o

    variants = {"default": (str(path), options())}
    variants["no memory arena"] = (str(path), options(enable_cpu_mem_arena=False))
    if spec.kind == "unet" or spec.kind == "controlnet":
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        fusion = FusionOptions("unet")
        fusion.enable_attention = False  # its UNet pattern does not match this export (num_heads not constant)
        fusion.enable_group_norm = False
        fusion.enable_skip_group_norm = False
        fusion.enable_nhwc_conv = False
        fusion.enable_bias_splitgelu = False
        fusion.enable_packed_qkv = False
        fusion.enable_packed_kv = False
        fusion.enable_bias_add = False
        tmp = Path(tempfile.mkdtemp()) / "fused.onnx"
        model = optimize_model(str(path), model_type="unet", optimization_options=fusion, opt_level=0)
        model.save_model_to_file(str(tmp), use_external_data_format=path.with_name(path.name + ".data").exists())
        print("fused ops:", {k: v for k, v in model.get_fused_operator_statistics().items() if v}, flush=True)
        variants["transformer optimizer"] = (str(tmp), options())
    sessions = {n: ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]) for n, (p, o) in variants.items()}
    reference = None
    for name, s in sessions.items():
        out = s.run(None, feeds)[0]
        if reference is None:
            reference = out
        err = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        print(f"{name}: rel_l2 vs default {err:.2e}", flush=True)
    times = {n: [] for n in sessions}
    for _ in range(args.runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["default"])
    print(f"\n{args.graph} {args.precision} batch {args.batch} at {size} px, {args.runs} runs")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:<24} {m:7.3f} s (min {min(t):.3f}, max {max(t):.3f})  {base / m:5.2f}x")


if __name__ == "__main__":
    main()
