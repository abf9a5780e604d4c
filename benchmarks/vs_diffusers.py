"""controlrt against diffusers' StableDiffusionControlNetPipeline, same weights, same process.

    python benchmarks/vs_diffusers.py                       # SD1.5 architecture, random weights
    python benchmarks/vs_diffusers.py --arch alternate      # small, a minute
    python benchmarks/vs_diffusers.py --root /tmp/pbench/sd15 --reuse   # an existing models/ + build/

Builds (or reuses, with --reuse) a model set of the chosen architecture with random weights under
ROOT/models (nothing is downloaded) and its export under ROOT/build; with --int8 the build needs
int8 graphs (controlrt calibrate) and with --fp16 fp16 graphs (controlrt convert). Then times, warm
and interleaved (each round runs every variant once, in turn), diffusers' pipeline in uniform mode and
controlrt's variants: onnxruntime fp32 uniform (the same math) and cfg-rw (ControlNets on the
conditional half), and int8/fp16 where asked. Two ControlNets, CFG 7.5, DDIM, 256 px, 4 steps by
default. Prints per variant the median seconds per image with the min-max spread, the speed-up over
diffusers, and the final image's PSNR against diffusers' (uniform variants only: cfg-rw is other
math). One variant's pipeline is loaded at a time besides diffusers', to fit in memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path


def make_models(arch_name: str, root: Path, reuse: bool) -> tuple[Path, list[Path], Path]:
    from controlrt import builtin
    from controlrt.export.build import export_build

    models, build = root / "models", root / "build"
    arch = {"alternate": builtin.ALTERNATE, "sd15": builtin.SD15, "tiny": builtin.TINY}[arch_name]
    if reuse and (build / "manifest.json").is_file():
        manifest = json.loads((build / "manifest.json").read_text())
        base = Path(manifest["sources"]["base"]["path"])
        return base, [Path(s["path"]) for s in manifest["sources"]["controlnets"]], build
    written = builtin.write_builtin_models(models, arch, seed=0)
    export_build(written.base, written.controlnets, build, force=True)
    return written.base, list(written.controlnets), build


def diffusers_pipeline(base: Path, controlnets: list[Path]):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    nets = [ControlNetModel.from_pretrained(p) for p in controlnets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=nets, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    import numpy as np
    import torch

    from controlrt.builtin import sample_control_images
    from controlrt.compare import psnr
    from controlrt.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "alternate", "sd15"], default="sd15")
    parser.add_argument("--root", default="vs-diffusers")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="also time int8 (the build must have it)")
    parser.add_argument("--fp16", action="store_true", help="also time fp16 (the build must have it)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    root = Path(args.root)
    base, controlnets, build = make_models(args.arch, root, args.reuse)
    controlnets = controlnets[:2]
    images = sample_control_images(len(controlnets), args.size, args.size)
    prompt, negative = "a red circle and a blue square", ""
    reference = diffusers_pipeline(base, controlnets)
    print(f"torch threads {torch.get_num_threads()}, {args.arch}, {args.size} px, {args.steps} DDIM steps", flush=True)

    def run_diffusers():
        generator = torch.Generator("cpu").manual_seed(0)
        return reference(
            prompt,
            image=images,
            negative_prompt=negative,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=generator,
            height=args.size,
            width=args.size,
        ).images[0]

    groups = [("fp32", ["uniform", "cfg-rw"])]
    if args.fp16:
        groups.append(("fp16", ["uniform", "cfg-rw"]))
    if args.int8:
        groups.append(("int8", ["uniform", "cfg-rw"]))
    run_diffusers()  # warm
    baseline_image = np.asarray(run_diffusers())
    results: dict[str, dict] = {}
    base_times: list[float] = []
    for precision, modes in groups:
        with Pipeline.load(build, backend="onnxruntime", precision=precision) as pipe:

            def run_controlrt(mode: str, pipe=pipe):
                return pipe(
                    prompt,
                    controls=images,
                    negative_prompt=negative,
                    control_mode=mode,
                    steps=args.steps,
                    guidance=7.5,
                    seed=0,
                    height=args.size,
                    width=args.size,
                    scheduler="ddim",
                )

            for mode in modes:
                run_controlrt(mode)  # warm
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            last = {}
            for _ in range(args.runs):  # interleaved: diffusers, then each variant, every round
                start = time.perf_counter()
                run_diffusers()
                base_times.append(time.perf_counter() - start)
                for mode in modes:
                    start = time.perf_counter()
                    last[mode] = np.asarray(run_controlrt(mode))
                    times[mode].append(time.perf_counter() - start)
            for mode in modes:
                name = f"controlrt onnxruntime {precision} {mode}"
                results[name] = {
                    "times": times[mode],
                    "psnr_vs_diffusers": psnr(baseline_image, last[mode]) if mode == "uniform" else None,
                }
        gc.collect()
    baseline = statistics.median(base_times)
    print(f"\n{'variant':<36} {'s/image':>8} {'min':>7} {'max':>7} {'vs diffusers':>12} {'PSNR':>8}")
    print(
        f"{'diffusers uniform (baseline)':<36} {baseline:>8.2f} {min(base_times):>7.2f} {max(base_times):>7.2f} "
        f"{'1.00x':>12} {'':>8}"
    )
    for name, r in results.items():
        t = statistics.median(r["times"])
        r.update(median=t, speedup=baseline / t)
        quality = "" if r["psnr_vs_diffusers"] is None else f"{r['psnr_vs_diffusers']:.1f}"
        print(
            f"{name:<36} {t:>8.2f} {min(r['times']):>7.2f} {max(r['times']):>7.2f} {baseline / t:>11.2f}x {quality:>8}"
        )
    if args.json:
        data = {"baseline": {"times": base_times, "median": baseline}, "variants": results}
        Path(args.json).write_text(json.dumps(data, indent=2, default=float))


if __name__ == "__main__":
    main()
