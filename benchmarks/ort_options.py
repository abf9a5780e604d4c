"""Which onnxruntime CPU settings make a graph faster: each setting against the default, same process.

    python benchmarks/ort_options.py BUILD --graph unet --size 256 --batch 2 --runs 5

    python benchmarks/ort_options.py BUILD --graph unet --precision int8 --size 256

Times one graph of a build at one shape (warm, median of --runs, interleaved) under: the session
defaults controlrt uses; onnxruntime's transformer optimizer for UNets (fused attention, GELU,
LayerNorm; GroupNorm and NHWC convolutions off, they are GPU kernels); memory arena off; and
threads pinned to the physical cores. Checks each variant's output against the default's.

With ``--precision int8`` (a calibrated build) it times the int8 graph's ways to run instead, against
the fp32 graph: fused into onnxruntime's int8 kernels (its default; on x86 without VNNI they add
u8 x s8 pairs in 16-bit sums that saturate), dequantized (``session.disable_quant_qdq``: the graph's
exact math, what controlrt runs on such CPUs), and moved to unsigned int8 and fused (every int8
tensor of the Q/DQ chains shifted by 128 into uint8, the same values: onnxruntime's u8 x u8 kernels
sum in 32 bits, without saturation). Errors are against the dequantized run; the CPU and its u8 x u8
and fp32 matrix-multiply rates are printed first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import timeit
from pathlib import Path


def main() -> None:
    import numpy as np
    import onnxruntime as ort

    from controlrt.manifest import Build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build")
    parser.add_argument("--graph", default="unet")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    build = Build.open(args.build, verify=False)
    if args.graph not in build.manifest.graphs:
        parser.error(f"--graph {args.graph}: the build's graphs are {', '.join(build.manifest.graphs)}")
    if args.precision not in build.manifest.graphs[args.graph].variants:
        parser.error(f"{args.graph} has no {args.precision} graph in this build (controlrt convert / calibrate)")
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

    if args.precision == "int8":
        variants = int8_variants(build, args.graph, path, options)
    else:
        variants = {"default": (str(path), options())}
        variants["no memory arena"] = (str(path), options(enable_cpu_mem_arena=False))
    if args.precision != "int8" and spec.kind in ("unet", "controlnet"):
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
    base = statistics.median(times[next(iter(times))])
    print(f"\n{args.graph} {args.precision} batch {args.batch} at {size} px, {args.runs} runs")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:<24} {m:7.3f} s (min {min(t):.3f}, max {max(t):.3f})  {base / m:5.2f}x")


def int8_variants(build, graph: str, path: Path, options) -> dict:
    """The int8 graph fused, dequantized and moved to unsigned int8, after the fp32 graph; and the
    CPU with its matrix-multiply rates."""
    from controlrt import cpu

    print("CPU:", cpu.describe())
    fp32 = cpu.matmul_peaks()["fp32"] or 0
    print(f"torch fp32 matrix multiply: {fp32:.0f} GFLOP/s; onnxruntime u8 x u8: {u8_rate():.0f} GOP/s")
    dequantized = options()
    dequantized.add_session_config_entry("session.disable_quant_qdq", "1")
    unsigned = options()
    unsigned.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return {
        "int8 dequantized": (str(path), dequantized),
        "fp32 graph": (str(build.graph_path(graph)), options()),
        "int8 fused (s8)": (str(path), options()),
        "int8 unsigned, fused (u8)": (unsigned_model(path), unsigned),
    }


def unsigned_model(path: Path) -> bytes:
    """The graph with every int8 tensor of its Q/DQ chains (QuantizeLinear zero points, hence their
    outputs; DequantizeLinear inputs and zero points stored in the graph) shifted by 128 into uint8:
    (q + 128) - (z + 128) = q - z, so every dequantized value is unchanged. Shifted tensors are moved
    into the protobuf (under 2 GB in all); the other external weights stay where they are (read
    through session.model_external_initializers_file_folder_path)."""
    import numpy as np
    import onnx
    from onnx import TensorProto
    from onnx import numpy_helper as nh

    model = onnx.load(str(path), load_external_data=False)
    stored = {t.name: t for t in model.graph.initializer}
    stored |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    names = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            names.update(node.input[2:3])
        elif node.op_type == "DequantizeLinear":
            names.update(node.input[0:1] + node.input[2:3])
            if len(node.input) < 3 and stored.get(node.input[0]) is not None:
                raise SystemExit(f"{path.name}: a DequantizeLinear without a zero point; not handled here")
    for name in names:
        tensor = stored.get(name)
        if tensor is not None and tensor.data_type == TensorProto.INT8:
            value = nh.to_array(tensor, base_dir=str(path.parent))  # stored externally: moved inline
            tensor.CopyFrom(nh.from_array(np.asarray((value.astype(np.int16) + 128).astype(np.uint8)), tensor.name))
    return model.SerializeToString()


def u8_rate(size: int = 2048) -> float:
    """GOP/s of onnxruntime's u8 x u8 -> int32 square product (MatMulInteger), best of 4."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "u8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
        [nh.from_array(rng.integers(0, 256, (size, size), dtype=np.uint8), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {"a": rng.integers(0, 256, (size, size), dtype=np.uint8)}
    session.run(None, feeds)
    best = min(timeit.repeat(lambda: session.run(None, feeds), number=1, repeat=4))
    return 2 * size**3 / best / 1e9


if __name__ == "__main__":
    main()
