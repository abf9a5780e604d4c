"""Latency from fewer steps: an LCM-LoRA at 4 steps against the same base at 20 DDIM steps, per image.

    python benchmarks/few_steps.py                      # SD1.5 architecture, random weights, 256 px
    python benchmarks/few_steps.py --arch alternate     # small, a minute
    python benchmarks/few_steps.py --reuse --variants onnxruntime:fp32,openvino:int8

Builds (or reuses, with --reuse) a model set with random weights under ROOT/models, its export with
one ControlNet under ROOT/build, and an LCM-LoRA-shaped LoRA (rank 64 on every attention projection,
feed-forward and transformer in/out projection, random weights: the weights do not change the time)
fused into a copy with ``controlrt lora`` (ROOT/build-lcm). Then times, warm and interleaved, per
backend and precision: the base at 20 DDIM steps with CFG 7.5 (two UNet branches), the LCM-LoRA
build at 4 LCMScheduler steps with guidance 1 (no CFG batch, as LCM-LoRAs are run), and diffusers'
pipeline (fp32, and bf16 on a CPU with bf16 instructions) with the same LoRA fused at 4 LCM steps.
Prints the CPU with its features, the median seconds per image with the spread, and the speed-ups.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
from pathlib import Path

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


def make_builds(arch_name: str, root: Path, reuse: bool) -> tuple[Path, Path, Path, Path, Path]:
    """(base folder, ControlNet folder, plain build, LCM-LoRA build, the LoRA file); with ``reuse``,
    what ROOT already holds is kept."""
    from controlrt import builtin
    from controlrt.export.build import export_build
    from controlrt.export.loras import set_loras
    from controlrt.lora import Lora

    models, build, lcm = root / "models", root / "build", root / "build-lcm"
    lora = root / "lcm-lora" / "pytorch_lora_weights.safetensors"
    if reuse and (build / "manifest.json").is_file():
        sources = json.loads((build / "manifest.json").read_text())["sources"]
        base, controlnet = Path(sources["base"]["path"]), Path(sources["controlnets"][0]["path"])
    else:
        arch = {"alternate": builtin.ALTERNATE, "sd15": builtin.SD15, "tiny": builtin.TINY}[arch_name]
        written = builtin.write_builtin_models(models, arch, seed=0, force=True)
        base, controlnet = written.base, written.controlnets[0]
        export_build(base, [controlnet], build, force=True)
    if not (reuse and lora.is_file()):
        write_lora(base, lora.parent)
    if not (reuse and (lcm / "manifest.json").is_file()):
        if lcm.exists():
            shutil.rmtree(lcm)
        shutil.copytree(build, lcm)
        set_loras(lcm, [Lora(lora, 1.0)])
    return base, controlnet, build, lcm, lora


def write_lora(base: Path, out: Path, rank: int = 64) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False)
    unet = inject_adapter_in_model(config, unet)
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))


def diffusers_lcm_pipeline(base: Path, controlnet: Path, lora: Path, dtype):
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    net = ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=[net], safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
    )
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    import torch

    from controlrt import cpu
    from controlrt.builtin import sample_control_images
    from controlrt.runtime.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "alternate", "sd15"], default="sd15")
    parser.add_argument("--root", default="few-steps")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the base")
    parser.add_argument("--lcm-steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", default="onnxruntime:fp32", help="BACKEND:PRECISION, comma-separated")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' LCM-LoRA baseline")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    base, controlnet, build, lcm, lora = make_builds(args.arch, Path(args.root), args.reuse)
    images = sample_control_images(1, args.size, args.size)
    prompt = "a red circle and a blue square"
    info = cpu.describe()
    print(f"CPU: {info['name']}, {info['cores']} cores, features: {' '.join(info['features']) or 'none listed'}")
    print(
        f"torch threads {torch.get_num_threads()}, {args.arch}, {args.size} px, one ControlNet; base: "
        f"{args.steps} DDIM steps, CFG 7.5; LCM-LoRA: {args.lcm_steps} LCM steps, guidance 1",
        flush=True,
    )
    times: dict[str, list[float]] = {}

    def timed(name: str, run) -> None:
        start = time.perf_counter()
        run()
        times.setdefault(name, []).append(time.perf_counter() - start)

    def ours(pipe, steps: int, guidance: float, scheduler: str):
        settings = {"steps": steps, "guidance": guidance, "scheduler": scheduler, "seed": 0}
        return lambda: pipe(prompt, controls=images, height=args.size, width=args.size, **settings)

    for text in args.variants.split(","):
        backend, precision = text.split(":")
        with (
            Pipeline.load(build, backend=backend, precision=precision) as plain,
            Pipeline.load(lcm, backend=backend, precision=precision) as fast,
        ):
            runs = {
                f"{backend} {precision}: base, {args.steps} DDIM steps": ours(plain, args.steps, 7.5, "ddim"),
                f"{backend} {precision}: LCM-LoRA, {args.lcm_steps} steps": ours(fast, args.lcm_steps, 1.0, "lcm"),
            }
            for run in runs.values():
                run()  # warm
            for _ in range(args.runs):  # interleaved
                for name, run in runs.items():
                    timed(name, run)
        gc.collect()
    if not args.no_diffusers:
        dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if cpu.has_bf16() else {})}
        for label, dtype in dtypes.items():
            pipe = diffusers_lcm_pipeline(base, controlnet, lora, dtype)

            def theirs(pipe=pipe):
                return pipe(
                    prompt,
                    image=images,
                    num_inference_steps=args.lcm_steps,
                    guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                    height=args.size,
                    width=args.size,
                )

            theirs()
            for _ in range(args.runs):
                timed(f"diffusers {label}: LCM-LoRA, {args.lcm_steps} steps", theirs)
            del pipe
            gc.collect()

    medians = {name: statistics.median(t) for name, t in times.items()}
    slowest = max(medians.values())
    print(f"\n{'run':<52} {'s/image':>8} {'min':>7} {'max':>7} {'speed-up':>9}")
    for name, t in times.items():
        print(f"{name:<52} {medians[name]:>8.2f} {min(t):>7.2f} {max(t):>7.2f} {slowest / medians[name]:>8.2f}x")
    print("speed-up: against the slowest run (the base at full steps)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": info, "times": times, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
