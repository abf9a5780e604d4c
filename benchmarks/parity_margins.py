"""What parity measures per precision and quantizer: the figures the gates in controlrt/compare.py
are set from.

    python benchmarks/parity_margins.py                       # tiny, alternate, shapes; ~15 min on 2 cores
    python benchmarks/parity_margins.py --archs tiny --json margins.json
    python benchmarks/parity_margins.py --methods nncf --precisions int8 --vae   # int8 VAE decoders too

For each small architecture (random-weight tiny and alternate, and the trained built-in model) it
exports a build, adds fp16 graphs and, per quantizer, int8 graphs, and runs ``controlrt parity`` at
each precision on onnxruntime (bf16 on openvino) with the command's defaults (native size, 4 steps). It prints, per
precision and graph kind, the worst relative L2 error and the worst max |error| / max |reference|
over every compared output, and the end-to-end PSNR, next to the gate each is judged by. A gate
should sit just beyond the worst figure measured, so that a real regression fails.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def _in_child(fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def make_build(arch_name: str, root: str) -> str:
    from controlrt import builtin
    from controlrt.export.build import export_build

    if arch_name == "shapes":
        models = builtin.write_trained_models(Path(root) / "models", force=True)
    else:
        arch = {"alternate": builtin.ALTERNATE, "tiny": builtin.TINY}[arch_name]
        models = builtin.write_builtin_models(Path(root) / "models", arch, seed=7, force=True)
    export_build(models.base, models.controlnets, Path(root) / "build", force=True)
    return str(Path(root) / "build")


def convert(build: str) -> None:
    from controlrt.export.fp16 import convert_build

    convert_build(build, "fp16")


def calibrate(build: str, method: str, vae: bool) -> None:
    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build

    calibrate_build(build, settings=CalibrationSettings(method, samples=4, vae=vae))


def checks(build: str, precision: str) -> dict:
    """The worst figures of the checks convert and calibrate made (recorded in the manifest)."""
    from controlrt.manifest import Build

    kinds: dict[str, dict[str, float]] = {}
    for g in Build.open(build, verify=False).manifest.graphs.values():
        variant = g.variants.get(precision)
        for row in variant.validation if variant else []:
            worst = kinds.setdefault(str(g.spec.kind), {"rel_l2": 0.0, "max_rel": 0.0})
            worst["rel_l2"] = max(worst["rel_l2"], row["rel_l2"])
            worst["max_rel"] = max(worst["max_rel"], row["max_abs"] / row["ref_max_abs"])
    return kinds


def parity(build: str, precision: str, backend: str = "onnxruntime") -> dict:
    from controlrt.parity import run_parity

    report = run_parity(build, backend, precision=precision)
    kinds: dict[str, dict[str, float]] = {}
    manifest_kinds = {}
    from controlrt.manifest import Build

    for name, g in Build.open(build, verify=False).manifest.graphs.items():
        manifest_kinds[name] = str(g.spec.kind)
    for row in report.graphs:
        kind = manifest_kinds[row.graph]
        worst = kinds.setdefault(kind, {"rel_l2": 0.0, "max_rel": 0.0})
        worst["rel_l2"] = max(worst["rel_l2"], row.rel_l2)
        worst["max_rel"] = max(worst["max_rel"], row.max_abs / row.ref_max_abs)
    return {"kinds": kinds, "psnr_db": report.end_to_end.psnr_db, "passed": report.passed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="tiny,alternate,shapes")
    parser.add_argument("--methods", default="modelopt,onnxruntime,nncf")
    parser.add_argument("--vae", action="store_true", help="calibrate --vae: int8 VAE decoders")
    parser.add_argument("--precisions", default="fp32,fp16,bf16,int8", help="bf16 runs on openvino")
    parser.add_argument("--out", default="parity-margins")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    t0 = time.time()
    results: dict[str, dict] = {}
    for arch in args.archs.split(","):
        root = Path(args.out) / arch
        build = _in_child(make_build, arch, str(root))
        _in_child(convert, build)
        for precision in ("fp32", "fp16"):
            if precision in args.precisions:
                results[f"{arch} {precision}"] = _in_child(parity, build, precision)
                results[f"{arch} {precision}"]["check"] = checks(build, precision)
        if "bf16" in args.precisions:
            results[f"{arch} bf16"] = _in_child(parity, build, "bf16", "openvino")
            results[f"{arch} bf16"]["check"] = {}
        for method in args.methods.split(",") if "int8" in args.precisions else ():
            try:
                _in_child(calibrate, build, method, args.vae)
            except Exception as exc:  # the int8 check refused the graphs: report, go on
                print(f"[{time.time() - t0:6.0f}s] {arch} int8 {method}: refused: {exc}", flush=True)
                continue
            results[f"{arch} int8 {method}"] = _in_child(parity, build, "int8")
            results[f"{arch} int8 {method}"]["check"] = checks(build, "int8")
        for key in [k for k in results if k.startswith(arch)]:
            print(f"[{time.time() - t0:6.0f}s] {key}: {json.dumps(results[key])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))

    from controlrt.compare import end_to_end_gate, tolerance_for
    from controlrt.precision import INT8_KINDS, Precision
    from controlrt.specs import GraphKind

    quantized = INT8_KINDS | ({GraphKind.VAE_DECODER} if args.vae else set())  # the rest run fp16 in int8
    print(f"\n{'variant':<26} {'kind':<13} {'where':<7} {'rel_l2':>9} {'gate':>8} {'max_rel':>9} {'gate':>8}")
    for key, r in results.items():
        arch, precision, *method = key.split()
        for where in ("kinds", "check"):
            for kind, worst in r[where].items():
                computes = Precision(precision)
                if computes is Precision.INT8 and GraphKind(kind) not in quantized:
                    computes = Precision.FP16
                tol = tolerance_for(computes, GraphKind(kind), method[0] if computes is Precision.INT8 else None)
                print(
                    f"{key:<26} {kind:<13} {'parity' if where == 'kinds' else 'check':<7} {worst['rel_l2']:>9.2e} "
                    f"{tol.rel_l2:>8.0e} {worst['max_rel']:>9.2e} {tol.max_rel:>8.0e}"
                )
    print(f"\n{'variant':<26} {'PSNR dB':>8} {'gate':>6}")
    for key, r in results.items():
        arch, precision, *method = key.split()
        gate = end_to_end_gate(Precision(precision), method[0] if method else None)
        print(f"{key:<26} {r['psnr_db']:>8.1f} {gate:>6.0f}")


if __name__ == "__main__":
    main()
