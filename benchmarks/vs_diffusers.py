"""controlrt against diffusers' StableDiffusionControlNetPipeline, same weights, same process.

    python benchmarks/vs_diffusers.py                       # SD1.5 architecture, random weights
    python benchmarks/vs_diffusers.py --arch alternate      # small, a minute
    python benchmarks/vs_diffusers.py --root /tmp/pbench/sd15 --reuse   # an existing models/ + build/
    python benchmarks/vs_diffusers.py --reuse --variants openvino:bf16:uniform,openvino:int8:uniform
    python benchmarks/vs_diffusers.py --arch sdxl --size 512 --variants onnxruntime:fp32:uniform,openvino:fp32:uniform
    python benchmarks/vs_diffusers.py --reuse --task img2img    # or inpaint: diffusers' img2img/inpaint pipelines
    python benchmarks/vs_diffusers.py --arch sd3 --root /tmp/pbench/sd3 --variants openvino:fp32:uniform
    python benchmarks/vs_diffusers.py --arch flux --root /tmp/pbench/flux --variants openvino:fp32:uniform

``--task img2img`` and ``--task inpaint`` time StableDiffusionControlNetImg2ImgPipeline and
StableDiffusionControlNetInpaintPipeline (SDXL: their XL counterparts) against controlrt with the same
init image (and mask, the middle of the image), at each pipeline's default strength and scale.

Builds (or reuses, with --reuse) a model set of the chosen architecture with random weights under
ROOT/models (nothing is downloaded) and its export under ROOT/build; int8 variants need int8 graphs
(controlrt calibrate), fp16 ones fp16 graphs (controlrt convert). Then times, warm and interleaved
(each round runs every baseline and every variant of the group once, in turn), diffusers' pipeline in
fp32 and, on a CPU with bf16 instructions, with ``torch_dtype=torch.bfloat16`` (what a diffusers user
on such a CPU picks), against controlrt's variants (BACKEND:PRECISION:MODE; with @BUILD, from another
build of the same models, such as a copy calibrated by another quantizer). Two ControlNets, CFG 7.5,
DDIM, 256 px, 4 steps by default. Prints the CPU with its features and matrix-multiply peaks, then per
variant the median seconds per image with the min-max spread, the speed-up over each diffusers
baseline, and the final image's PSNR against diffusers fp32 (uniform variants only: the
conditional-only modes are other math). One controlrt pipeline is loaded at a time besides
diffusers', to fit in memory.

``--arch sd3`` and ``--arch flux`` build controlrt.smallsets' SD3 and Flux sets at ``--scale`` (default 4:
medium shapes, a transformer 256 wide) and time StableDiffusion3ControlNetPipeline (CFG 7.0) and
FluxControlNetPipeline (guidance 3.5 as an input, no CFG batch) with the model's own flow-matching
scheduler against controlrt, two ControlNets.

``--arch sdxl`` (SDXL base 1.0's shapes, one full-size ControlNet, StableDiffusionXLControlNetPipeline)
does not fit twice in 24 GB (diffusers' pipeline is about 19 GB in fp32, controlrt's sessions about as
much), so there every pipeline is loaded alone, warmed, timed ``--runs`` times and released before the
next loads (``--in-turn``, the default for sdxl): not interleaved, so the spread is printed with each
median. The export alone takes about 30 minutes and 40 GB of disk; ``--reuse`` takes an existing
ROOT/build (or any build: its manifest names its sources).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

DEFAULT_VARIANTS = (
    "openvino:auto:uniform,onnxruntime:fp32:uniform,openvino:fp32:uniform,openvino:bf16:uniform,openvino:bf16:cfg-rw,"
    "openvino:int8:uniform,openvino:int8:cfg-rw"
)


TRANSFORMERS = ("sd3", "flux")  # controlrt.smallsets' families: their own schedulers, no DDIM


def make_models(arch_name: str, root: Path, reuse: bool, scale: int = 4) -> tuple[Path, list[Path], Path]:
    from dataclasses import replace

    from controlrt import builtin, smallsets
    from controlrt.export.build import export_build

    models, build = root / "models", root / "build"
    if reuse and (build / "manifest.json").is_file():
        manifest = json.loads((build / "manifest.json").read_text())
        base = Path(manifest["sources"]["base"]["path"])
        return base, [Path(s["path"]) for s in manifest["sources"]["controlnets"]], build
    if arch_name in TRANSFORMERS:
        writer = smallsets.write_sd3 if arch_name == "sd3" else smallsets.write_flux
        base, controlnets = writer(models, seed=0, scale=scale)
        export_build(base, controlnets[:2], build, force=True)
        return base, controlnets[:2], build
    arch = {
        "alternate": builtin.ALTERNATE,
        "sd15": builtin.SD15,
        "tiny": builtin.TINY,
        "sdxl": replace(builtin.SDXL, controlnets=builtin.SDXL.controlnets[:1]),  # two do not fit 24 GB
    }[arch_name]
    written = builtin.write_builtin_models(models, arch, seed=0, force=True)
    export_build(written.base, written.controlnets, build, force=True)
    return written.base, list(written.controlnets), build


PIPELINES = {  # task -> (SD 1.x/2.x, SDXL) diffusers pipeline class names
    "txt2img": ("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline"),
    "img2img": ("StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionXLControlNetImg2ImgPipeline"),
    "inpaint": ("StableDiffusionControlNetInpaintPipeline", "StableDiffusionXLControlNetInpaintPipeline"),
}


def diffusers_pipeline(base: Path, controlnets: list[Path], dtype, task: str = "txt2img"):
    import diffusers
    from diffusers import ControlNetModel, DDIMScheduler

    if (base / "transformer").is_dir():  # SD3 or Flux: their ControlNet pipelines, their own schedulers
        from diffusers.models.controlnets import FluxMultiControlNetModel, SD3MultiControlNetModel

        flux = not (base / "text_encoder_3").is_dir()
        net, multi, pipeline = (
            (diffusers.FluxControlNetModel, FluxMultiControlNetModel, diffusers.FluxControlNetPipeline)
            if flux
            else (diffusers.SD3ControlNetModel, SD3MultiControlNetModel, diffusers.StableDiffusion3ControlNetPipeline)
        )
        nets = multi([net.from_pretrained(p, torch_dtype=dtype) for p in controlnets])
        pipe = pipeline.from_pretrained(base, controlnet=nets, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    nets = [ControlNetModel.from_pretrained(p, torch_dtype=dtype) for p in controlnets]
    sd, xl = (getattr(diffusers, name) for name in PIPELINES[task])
    if (base / "text_encoder_2").is_dir():
        pipe = xl.from_pretrained(base, controlnet=nets, torch_dtype=dtype)
    else:
        pipe = sd.from_pretrained(
            base, controlnet=nets, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
        )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    import numpy as np
    import torch

    from controlrt import cpu
    from controlrt.builtin import sample_control_images, sample_init_image, sample_mask
    from controlrt.compare import psnr
    from controlrt.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "alternate", "sd15", "sdxl", *TRANSFORMERS], default="sd15")
    parser.add_argument("--scale", type=int, default=4, help="sd3 and flux: the small sets' width and depth factor")
    parser.add_argument("--root", default="vs-diffusers")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="BACKEND:PRECISION:MODE[@BUILD], comma-separated (@BUILD: another build of the same models, "
        "e.g. one calibrated by another quantizer)",
    )
    parser.add_argument("--no-bf16-baseline", action="store_true", help="time diffusers in fp32 only")
    parser.add_argument(
        "--in-turn",
        action="store_true",
        help="load, warm, time and release each pipeline alone (the default for sdxl)",
    )
    parser.add_argument("--task", choices=list(PIPELINES), default="txt2img")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    in_turn = args.in_turn or args.arch == "sdxl"

    root = Path(args.root)
    if args.arch in TRANSFORMERS and args.task != "txt2img":
        parser.error(f"--arch {args.arch} times text-to-image only")
    base, controlnets, build = make_models(args.arch, root, args.reuse, args.scale)
    controlnets = controlnets[:2]
    images = sample_control_images(len(controlnets), args.size, args.size)
    prompt, negative = "a red circle and a blue square", ""
    flux, transformer = args.arch == "flux", args.arch in TRANSFORMERS
    guidance = 3.5 if flux else 7.0 if transformer else 7.5
    scheduler = None if transformer else "ddim"
    steps_label = "flow-matching" if transformer else "DDIM"
    init = sample_init_image(args.size, args.size) if args.task != "txt2img" else None
    mask = sample_mask(args.size, args.size) if args.task == "inpaint" else None
    theirs = {} if init is None else {"image": init, "control_image": images}
    if mask is not None:
        theirs["mask_image"] = mask
    ours = {"image": init, "mask": mask}
    info = cpu.describe()
    peaks = cpu.matmul_peaks()
    print(f"CPU: {info['name']}, {info['cores']} cores, features: {' '.join(info['features']) or 'none listed'}")
    print("matrix-multiply peak (torch, GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items() if v))
    print(
        f"torch threads {torch.get_num_threads()}, {args.arch}, {args.task}, {args.size} px, "
        f"{args.steps} {steps_label} steps",
        flush=True,
    )

    dtypes = {"diffusers fp32": torch.float32}
    if cpu.has_bf16() and not args.no_bf16_baseline:
        dtypes["diffusers bf16"] = torch.bfloat16

    def run_diffusers(pipe):
        torch.manual_seed(0)  # SD3's pipeline samples the control latents from the global generator
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(
            prompt,
            **(theirs or {"control_image" if transformer else "image": images}),
            **({} if flux else {"negative_prompt": negative}),
            # their multi-ControlNet pipelines take one scale per ControlNet
            **({"controlnet_conditioning_scale": [1.0] * len(controlnets)} if transformer else {}),
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            generator=generator,
            height=args.size,
            width=args.size,
        ).images[0]

    baselines = (
        {} if in_turn else {name: diffusers_pipeline(base, controlnets, d, args.task) for name, d in dtypes.items()}
    )
    base_times: dict[str, list[float]] = {name: [] for name in dtypes}
    reference_images = {}
    for name, dtype in dtypes.items():
        pipe = baselines[name] if name in baselines else diffusers_pipeline(base, controlnets, dtype, args.task)
        run_diffusers(pipe)  # warm
        for _ in range(args.runs if in_turn else 1):  # interleaved: timed below, with the variants
            start = time.perf_counter()
            reference_images[name] = np.asarray(run_diffusers(pipe))
            if in_turn:
                base_times[name].append(time.perf_counter() - start)
        if in_turn:
            print(f"{name}: {', '.join(f'{t:.1f}' for t in base_times[name])} s", flush=True)
            del pipe
            gc.collect()
    reference = reference_images["diffusers fp32"]
    groups: dict[tuple[str, str, str], list[str]] = {}
    for text in args.variants.split(","):
        variant, _, other = text.partition("@")
        backend, precision, mode = variant.split(":")
        groups.setdefault((backend, precision, other), []).append(mode)

    results: dict[str, dict] = {}
    for (backend, precision, other), modes in groups.items():
        label = f"{backend} {precision}" + (f" @{Path(other).name}" if other else "")
        # the size asked for, whatever the model's native size (the small sets' is 64 px)
        with Pipeline.load(other or build, backend=backend, precision=precision, max_pixels=args.size**2) as pipe:
            if pipe.precision_choice is not None:  # auto: name what it chose
                label += f"={pipe.precision_choice.label}"
                if pipe.precision_choice.rows:
                    print(pipe.precision_choice.table(), flush=True)

            def run_controlrt(mode: str, pipe=pipe):
                return pipe(
                    prompt,
                    controls=images,
                    negative_prompt=None if flux else negative,
                    control_mode=mode,
                    steps=args.steps,
                    guidance=guidance,
                    seed=0,
                    height=args.size,
                    width=args.size,
                    scheduler=scheduler,
                    **ours,
                )

            for mode in modes:
                run_controlrt(mode)  # warm
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            last = {}
            for _ in range(args.runs):  # the baselines (unless in turn), then each variant, every round
                for name, baseline in baselines.items():
                    start = time.perf_counter()
                    run_diffusers(baseline)
                    base_times[name].append(time.perf_counter() - start)
                for mode in modes:
                    start = time.perf_counter()
                    last[mode] = np.asarray(run_controlrt(mode))
                    times[mode].append(time.perf_counter() - start)
            for mode in modes:
                quality = psnr(reference, last[mode]) if mode == "uniform" else None
                if in_turn:
                    seconds = ", ".join(f"{t:.1f}" for t in times[mode])
                    print(f"{label} {mode}: {seconds} s" + (f", {quality:.1f} dB" if quality else ""), flush=True)
                results[f"controlrt {label} {mode}"] = {"times": times[mode], "psnr_vs_diffusers_fp32": quality}
        gc.collect()

    medians = {name: statistics.median(t) for name, t in base_times.items()}
    columns = "".join(f" {'vs ' + name.removeprefix('diffusers '):>9}" for name in medians)
    print(f"\n{'variant':<48} {'s/image':>8} {'min':>7} {'max':>7}{columns} {'PSNR':>8}")
    for name, t in base_times.items():
        ratios = "".join(f" {medians[other] / medians[name]:>8.2f}x" for other in medians)
        quality = "" if name == "diffusers fp32" else f"{psnr(reference, reference_images[name]):.1f}"
        print(f"{name:<48} {medians[name]:>8.2f} {min(t):>7.2f} {max(t):>7.2f}{ratios} {quality:>8}")
    for name, r in results.items():
        t = statistics.median(r["times"])
        r.update(median=t, speedups={other: medians[other] / t for other in medians})
        ratios = "".join(f" {medians[other] / t:>8.2f}x" for other in medians)
        quality = "" if r["psnr_vs_diffusers_fp32"] is None else f"{r['psnr_vs_diffusers_fp32']:.1f}"
        print(f"{name:<48} {t:>8.2f} {min(r['times']):>7.2f} {max(r['times']):>7.2f}{ratios} {quality:>8}")
    print("PSNR: the final image against diffusers fp32 at the same seed (uniform variants; dB)")
    best = min(medians, key=medians.__getitem__)
    print(f"diffusers' best setting on this CPU: {best} ({medians[best]:.2f} s/image)")
    for what, floor, match in (("any precision", 30.0, ""), ("int8", 25.0, " int8")):
        passing = {n: r for n, r in results.items() if match in n and (r["psnr_vs_diffusers_fp32"] or 0.0) >= floor}
        if passing:
            n = max(passing, key=lambda n: passing[n]["speedups"][best])
            r = passing[n]
            speedup, quality = r["speedups"][best], r["psnr_vs_diffusers_fp32"]
            print(f"fastest >= {floor:.0f} dB ({what}): {n} {speedup:.2f}x, {quality:.1f} dB")
        else:
            print(f"fastest >= {floor:.0f} dB ({what}): none of the variants")
    if args.json:
        data = {
            "cpu": info,
            "matmul_peaks": peaks,
            "task": args.task,
            "baselines": {n: {"times": t, "median": medians[n]} for n, t in base_times.items()},
            "variants": results,
        }
        Path(args.json).write_text(json.dumps(data, indent=2, default=float))


if __name__ == "__main__":
    main()
