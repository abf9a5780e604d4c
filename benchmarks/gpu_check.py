"""One-call check for a machine with a GPU.

    python benchmarks/gpu_check.py                 # report, GPU tests, torch-CUDA loop timing
    python benchmarks/gpu_check.py --arch sd15     # time the SD1.5 architecture (random weights)
    python benchmarks/gpu_check.py --device cpu    # smoke-run the script itself on a CPU machine

1. Reports what the machine has: torch and its CUDA device, tensorrt (importable or why not),
   onnxruntime and its providers, polygraphy.
2. Runs the GPU and TensorRT tests (pytest -m "gpu or tensorrt"); those whose requirements are
   missing are reported as skipped with the reason.
3. Times the denoise loop on the torch backend on the device, whether or not TensorRT exists:
   two ControlNets, CFG, DDIM, uniform and cfg-rw modes, warm, median of --runs, in fp32 and fp16
   (torch autocast-free: the modules cast to half). Prints seconds per step and per image.
Writes a JSON summary with --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def environment() -> dict:
    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__}
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # ImportError, or OSError when the libraries are missing
        info["tensorrt"] = f"not importable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    try:
        import onnxruntime

        info["onnxruntime"] = f"{onnxruntime.__version__} {onnxruntime.get_available_providers()}"
    except ImportError as exc:
        info["onnxruntime"] = f"not importable: {exc}"
    try:
        import polygraphy

        info["polygraphy"] = polygraphy.__version__
    except ImportError:
        info["polygraphy"] = "not installed"
    return info


def run_gpu_tests() -> dict:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu or tensorrt", "tests"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    tail = "\n".join(done.stdout.strip().splitlines()[-25:])
    print(tail, flush=True)
    return {"returncode": done.returncode, "seconds": round(time.perf_counter() - start, 1), "tail": tail}


def time_torch_loop(arch_name: str, device: str, size: int, steps: int, runs: int) -> list[dict]:
    """Median seconds per image of the torch backend's denoise loop (no ONNX, no build needed)."""
    import torch

    from controlrt import builtin
    from controlrt.control import Branches, ControlMode, block_weights, residual_divisors
    from controlrt.families import family_of, load_graph_module
    from controlrt.models import BaseModel, ControlNetModelFolder
    from controlrt.runtime.loop import ControlPlan
    from controlrt.runtime.torch_backend import TorchSession
    from controlrt.specs import GraphKind

    arch = {"tiny": builtin.TINY, "alternate": builtin.ALTERNATE, "sd15": builtin.SD15}[arch_name]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = builtin.write_builtin_models(Path(tmp), arch, seed=0)
        base = BaseModel.open(models.base)
        controlnets = [ControlNetModelFolder.open(p) for p in models.controlnets[:2]]
        info = base.info()
        specs = {s.name: s for s in family_of(info).graph_specs(controlnets)}
        scheduler_config = json.loads((models.base / "scheduler" / "scheduler_config.json").read_text())
        for dtype in (torch.float32, torch.float16) if device != "cpu" else (torch.float32,):
            sessions = {}
            for name in ("unet", "controlnet_0", "controlnet_1"):
                module = load_graph_module(specs[name], base, controlnets).to(dtype)
                sessions[name] = _CastSession(TorchSession(module, specs[name], device), dtype)
            divisors = residual_divisors(specs["unet"])
            f = info.vae_scale_factor
            latent = (1, info.latent_channels, size // f, size // f)
            embeds = torch.randn(2, info.sequence_length, info.cross_attention_dim, device=device)
            for mode in (ControlMode.UNIFORM, ControlMode.CFG_RW):
                batch = Branches.of(7.5, mode).per_image(GraphKind.CONTROLNET)
                image = torch.rand(batch, 3, size, size, device=device)
                weights = block_weights(mode, divisors).to(device)
                plans = [ControlPlan(sessions[f"controlnet_{k}"], image, weights, 0.0, 1.0) for k in range(2)]

                def once(plans=plans, mode=mode, sessions=sessions, embeds=embeds, latent=latent):
                    return _denoise_once(sessions["unet"], plans, scheduler_config, embeds, latent, steps, mode, device)

                once()  # warm-up
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    once()
                    times.append(time.perf_counter() - start)
                median = statistics.median(times)
                row = {
                    "arch": arch_name,
                    "device": device,
                    "dtype": str(dtype).removeprefix("torch."),
                    "mode": str(mode),
                    "size": size,
                    "steps": steps,
                    "s_per_image": round(median, 4),
                    "s_per_step": round(median / steps, 4),
                    "min": round(min(times), 4),
                    "max": round(max(times), 4),
                }
                print(
                    f"torch {row['device']} {row['dtype']:<8} {row['mode']:<8} {arch_name} {size}px: "
                    f"{row['s_per_image']:.3f} s/image, {row['s_per_step']:.4f} s/step "
                    f"(min {row['min']:.3f}, max {row['max']:.3f}, {runs} runs)",
                    flush=True,
                )
                rows.append(row)
    return rows


def _denoise_once(unet, plans, scheduler_config, embeds, latent, steps, mode, device):
    import torch

    from controlrt.control import Branches
    from controlrt.runtime.loop import denoise
    from controlrt.runtime.schedulers import make_scheduler

    generator = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn(latent, generator=generator)
    out = denoise(
        unet,
        plans,
        make_scheduler(scheduler_config, "ddim"),
        embeds,
        noise,
        steps=steps,
        guidance=7.5,
        branches=Branches.of(7.5, mode),
        generator=generator,
    )
    if device != "cpu":
        torch.cuda.synchronize()
    return out


class _CastSession:
    """A torch session whose float inputs are cast to the module's dtype and outputs back to fp32."""

    def __init__(self, session, dtype) -> None:
        self.session, self.dtype, self.spec = session, dtype, session.spec

    @property
    def device(self):
        return self.session.device

    def infer(self, feeds):
        import torch

        cast = {k: v.to(self.session.device, self.dtype) if v.is_floating_point() else v for k, v in feeds.items()}
        with torch.inference_mode():
            out = self.session._run(cast)
        return {k: v.float() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "alternate", "sd15"], default="alternate")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    env = environment()
    print(json.dumps(env, indent=2), flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary: dict = {"environment": env}
    if not args.skip_tests:
        summary["tests"] = run_gpu_tests()
    summary["torch_loop"] = time_torch_loop(args.arch, device, args.size, args.steps, args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
