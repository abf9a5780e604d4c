"""fp16 and int8 quality against fp32, for each quantizer, on a model with two ControlNets.

    python benchmarks/precision_quality.py --arch alternate            # small, ~5 min on 2 cores
    python benchmarks/precision_quality.py --arch shapes --size 64     # the trained built-in model,
                                                                       # adds edge F1 per precision
    python benchmarks/precision_quality.py --arch sd15 --methods modelopt:percentile,onnxruntime:minmax \\
        --samples 4                                                    # SD1.5 shapes, ~1 h, ~22 GB

Random weights (nothing is downloaded), or the trained built-in model (``--arch shapes``), for which
each precision also gets its control fidelity: edge F1 between the held-out scenes' controls and the
generated images (``controlrt fidelity``), with the controls on and off. Builds the model set,
exports it, adds fp16 graphs, then for each quantizer calibrates int8 graphs and runs ``controlrt
parity`` at that precision: the final image's PSNR and SSIM against the fp32 torch reference at the
same seed (4 steps, 256 px by default) and the mean relative L2 error of the UNet and ControlNet
outputs on held-out captured inputs. Each stage runs in a fresh process so memory is returned between stages.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from controlrt.errors import ValidationError


def _in_child(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def make_build(arch_name: str, root: str) -> str:
    from controlrt import builtin
    from controlrt.export.build import export_build

    if arch_name == "shapes":
        models = builtin.write_trained_models(Path(root) / "models")
    else:
        arch = {"alternate": builtin.ALTERNATE, "sd15": builtin.SD15, "tiny": builtin.TINY}[arch_name]
        models = builtin.write_builtin_models(Path(root) / "models", arch, seed=0)
    export_build(models.base, models.controlnets, Path(root) / "build", force=True)
    return str(Path(root) / "build")


def convert(build: str) -> None:
    from controlrt.export.fp16 import convert_build

    convert_build(build, "fp16")


def calibrate(build: str, method: str, calibration: str, samples: int, steps: int, size: int) -> None:
    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build

    calibrate_build(build, settings=CalibrationSettings(method, calibration, samples, steps, size, size))


def parity(build: str, precision: str, steps: int, size: int) -> dict:
    from controlrt.calibration.calibrate import held_out_captures
    from controlrt.manifest import Build
    from controlrt.parity import run_parity

    held_out_captures(Build.open(build), steps, size, size)  # held-out inputs at this size
    report = run_parity(build, precision=precision, steps=steps, height=size, width=size)
    rows = report.graphs

    def mean(prefix: str) -> float:
        values = [r.rel_l2 for r in rows if r.graph.startswith(prefix)]
        return sum(values) / len(values)

    e = report.end_to_end
    return {
        "psnr_db": e.psnr_db,
        "ssim": e.ssim,
        "unet_rel_l2": mean("unet"),
        "controlnet_rel_l2": mean("controlnet"),
        "passed": report.passed,
    }


def fidelity(build: str, precision: str, scenes: int) -> dict:
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.training.fidelity import measure

    with Pipeline.load(build, backend="onnxruntime", precision=precision) as pipe:
        return measure(pipe, scenes=scenes).f1


def _has_variant(build: str, precision: str) -> bool:
    from controlrt.manifest import Build

    return all(precision in g.variants for g in Build.open(build, verify=False).manifest.graphs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["alternate", "sd15", "tiny", "shapes"], default="alternate")
    parser.add_argument("--scenes", type=int, default=16, help="held-out scenes for edge F1 (--arch shapes)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8, help="calibration generations")
    parser.add_argument(
        "--methods",
        default="modelopt:percentile,modelopt:max,onnxruntime:percentile,onnxruntime:entropy,onnxruntime:minmax",
    )
    parser.add_argument("--out", default="precision-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--reuse", action="store_true", help="reuse an exported build (and its fp16 graphs) under --out"
    )
    args = parser.parse_args()

    root = Path(args.out) / args.arch
    t0 = time.time()
    existing = root / "build" / "manifest.json"
    build = str(root / "build") if args.reuse and existing.is_file() else _in_child(make_build, args.arch, str(root))
    print(f"[{time.time() - t0:6.0f}s] exported {build}", flush=True)
    if not (args.reuse and _has_variant(build, "fp16")):
        _in_child(convert, build)
    shapes = args.arch == "shapes"
    results = {}
    if shapes:
        results["fp32"] = {"edge_f1": _in_child(fidelity, build, "fp32", args.scenes)}
        print(f"[{time.time() - t0:6.0f}s] fp32: {results['fp32']}", flush=True)
    results["fp16"] = _in_child(parity, build, "fp16", args.steps, args.size)
    if shapes:
        results["fp16"]["edge_f1"] = _in_child(fidelity, build, "fp16", args.scenes)
    print(f"[{time.time() - t0:6.0f}s] fp16: {results['fp16']}", flush=True)
    refused = {}
    for spec in args.methods.split(","):
        method, _, calibration = spec.partition(":")
        try:
            _in_child(calibrate, build, method, calibration or None, args.samples, args.steps, args.size)
        except ValidationError as exc:  # the int8 check refused the graphs: report, go on
            refused[f"int8 {spec}"] = str(exc)
            print(f"[{time.time() - t0:6.0f}s] int8 {spec}: refused: {exc}", flush=True)
            continue
        results[f"int8 {spec}"] = _in_child(parity, build, "int8", args.steps, args.size)
        if shapes:
            results[f"int8 {spec}"]["edge_f1"] = _in_child(fidelity, build, "int8", args.scenes)
        print(f"[{time.time() - t0:6.0f}s] int8 {spec}: {results[f'int8 {spec}']}", flush=True)

    print(f"\n{args.arch}, 2 ControlNets, {args.size} px, {args.steps} steps, {args.samples} calibration samples")
    print(
        f"{'variant':<28} {'PSNR dB':>8} {'SSIM':>7} {'UNet rel_l2':>12} {'CN rel_l2':>10}"
        + (f" {'F1 canny':>9} {'F1 all':>7} {'F1 off':>7}" if shapes else "")
    )
    for name, r in results.items():
        line = f"{name:<28} " + (
            f"{r['psnr_db']:>8.2f} {r['ssim']:>7.4f} {r['unet_rel_l2']:>12.4f} {r['controlnet_rel_l2']:>10.4f}"
            if "psnr_db" in r
            else f"{'(reference)':>41}"
        )
        if shapes:
            f1 = r["edge_f1"]
            line += f" {f1['canny']:>9.3f} {f1['all']:>7.3f} {f1['off']:>7.3f}"
        print(line)
    for name, reason in refused.items():
        print(f"{name:<28} refused by the int8 check: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "refused": refused}, indent=2))


if __name__ == "__main__":
    main()
