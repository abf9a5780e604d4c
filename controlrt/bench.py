"""``controlrt bench``: where the time of a generation goes, on one backend and precision.

Warm, repeated generations with the built-in sample controls. Reported: the median latency of each
graph per call; per denoising step and end to end (median, min and max over the runs); the loop
overhead, the share of the denoise loop spent outside the graph sessions (residual sums, guidance,
the scheduler, feeding); peak memory; and the achieved GFLOP/s of a step against the FLOPs the
UNet and the active ControlNets do in it (counted by torch's FlopCounterMode on the source
architectures, built on the meta device, so no weights are loaded).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from controlrt.runtime.control import Branches
from controlrt.runtime.session import Session
from controlrt.specs import GraphKind


class TimedSession:
    """A session proxy that records the wall time of every ``infer`` (synchronised on CUDA)."""

    def __init__(self, session: Session, log: dict[str, list[float]]) -> None:
        self.session = session
        self.spec = session.spec
        self.backend = session.backend
        self._log = log

    @property
    def device(self) -> torch.device:
        return self.session.device

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cuda = self.session.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.session.device)
        start = time.perf_counter()
        out = self.session.infer(feeds)
        if cuda:
            torch.cuda.synchronize(self.session.device)
        self._log[self.spec.name].append(time.perf_counter() - start)
        return out

    def close(self) -> None:
        self.session.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


@dataclass
class BenchReport:
    backend: str
    precision: str
    settings: dict[str, Any]
    graphs_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # median ms per call, calls per image
    step_s: list[float] = field(default_factory=list)
    image_s: list[float] = field(default_factory=list)
    loop_overhead: list[float] = field(default_factory=list)
    step_gflop: float | None = None
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None

    @staticmethod
    def _spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["step"] = self._spread(self.step_s)
        out["image"] = self._spread(self.image_s)
        out["loop_overhead_share"] = statistics.median(self.loop_overhead)
        out["gflops_per_s"] = self.step_gflop / out["step"]["median"] if self.step_gflop else None
        return out

    def table(self) -> str:
        d = self.to_dict()
        s = self.settings
        lines = [
            f"{self.backend} {self.precision}, {s['height']}x{s['width']}, {s['controls']} control(s), "
            f"mode {s['control_mode']}, guidance {s['guidance']}, {s['steps']} steps ({s['scheduler']} scheduler), "
            f"{s['runs']} runs (warm)",
            f"{'graph':<16} {'calls/image':>11} {'median ms/call':>15}",
        ]
        for name, g in self.graphs_ms.items():
            lines.append(f"{name:<16} {g['calls']:>11.0f} {g['median_ms']:>15.1f}")
        step, image = d["step"], d["image"]
        lines.append(f"per step:   {step['median']:.3f} s (min {step['min']:.3f}, max {step['max']:.3f})")
        lines.append(f"per image:  {image['median']:.3f} s (min {image['min']:.3f}, max {image['max']:.3f})")
        lines.append(f"loop overhead: {100 * d['loop_overhead_share']:.2f}% of the denoise loop outside the graphs")
        if self.step_gflop:
            lines.append(f"step work: {self.step_gflop:.1f} GFLOP counted; achieved {d['gflops_per_s']:.1f} GFLOP/s")
        memory = f"peak memory: {self.peak_rss_mib:.0f} MiB resident"
        if self.peak_cuda_mib is not None:
            memory += f", {self.peak_cuda_mib:.0f} MiB CUDA"
        lines.append(memory)
        return "\n".join(lines)


def step_gflop(build, height: int, width: int, controls: int, branches: Branches) -> float | None:
    """GFLOP of one denoising step (UNet + active ControlNets), or None without the source configs."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from controlrt.graphs import ControlNetGraph, UNetGraph

    sources = build.manifest.sources
    try:
        unet_config = UNet2DConditionModel.load_config(Path(sources["base"]["path"]) / "unet")
        cn_configs = [ControlNetModel.load_config(s["path"]) for s in sources["controlnets"][:controls]]
    except (OSError, ValueError, KeyError):
        return None
    batch = branches.per_image(GraphKind.UNET)
    cn_batch = branches.per_image(GraphKind.CONTROLNET)
    total = 0
    with torch.device("meta"):
        modules = [(UNetGraph(UNet2DConditionModel.from_config(unet_config)), build.manifest.spec("unet"), batch)]
        for k, config in enumerate(cn_configs):
            spec = build.manifest.controlnet_specs[k]
            modules.append((ControlNetGraph(ControlNetModel.from_config(config)), spec, cn_batch))
    for module, spec, b in modules:
        feeds = spec.dummy_inputs(spec.sizes(b, height, width))
        args = [feeds[n].to("meta") for n in spec.input_names]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*args)
        total += counter.get_total_flops()
    return total / 1e9


def run_bench(
    build_dir: str | Path,
    backend: str = "onnxruntime",
    providers=None,
    precision: str = "fp32",
    steps: int = 4,
    height: int | None = None,
    width: int | None = None,
    controls: int | None = None,
    control_mode: str = "uniform",
    guidance: float = 7.5,
    runs: int = 3,
    warmup: int = 1,
    scheduler: str | None = None,
    **backend_options: Any,
) -> BenchReport:
    from controlrt.builtin import sample_control_images
    from controlrt.errors import InputError
    from controlrt.runtime.control import ControlMode
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.runtime.request import GenerationRequest

    if runs < 1 or warmup < 0:
        raise InputError("--runs must be at least 1 and --warmup at least 0")
    log: dict[str, list[float]] = defaultdict(list)
    with Pipeline.load(build_dir, backend, providers, None, True, precision, **backend_options) as pipe:
        count = len(pipe.controlnet_specs) if controls is None else controls
        if not 0 <= count <= len(pipe.controlnet_specs):
            raise InputError(f"--controls {count}: the build has {len(pipe.controlnet_specs)} ControlNet(s)")
        h, w = height or pipe.info.default_size[0], width or pipe.info.default_size[1]
        pipe.sessions = {name: TimedSession(s, log) for name, s in pipe.sessions.items()}  # type: ignore[misc]
        request = GenerationRequest(
            "a red circle and a blue square",
            controls=sample_control_images(count, h, w),
            steps=steps,
            guidance=guidance,
            control_mode=control_mode,
            height=h,
            width=w,
            negative_prompt="",
            scheduler=scheduler,
        )
        settings = {
            "steps": steps,
            "height": h,
            "width": w,
            "controls": count,
            "control_mode": str(ControlMode.parse(control_mode)),
            "guidance": guidance,
            "runs": runs,
            "warmup": warmup,
            "scheduler": scheduler or "the model's own",
        }
        report = BenchReport(pipe.options.backend, str(pipe.options.precision), settings)
        for _ in range(warmup):
            pipe.generate(request)
        per_run: list[dict[str, list[float]]] = []
        for _ in range(runs):
            log.clear()
            timings: dict[str, float] = {}
            start = time.perf_counter()
            pipe.generate(request, timings=timings)
            report.image_s.append(time.perf_counter() - start)
            iterations = len(log["unet"]) or steps  # some schedulers (PNDM) run one more than asked
            report.step_s.append(timings["denoise"] / iterations)
            in_graphs = sum(sum(v) for n, v in log.items() if n == "unet" or n.startswith("controlnet"))
            report.loop_overhead.append(max(0.0, timings["denoise"] - in_graphs) / timings["denoise"])
            per_run.append({n: list(v) for n, v in log.items()})
        for name in pipe.sessions:
            calls = [c for run in per_run for c in run.get(name, [])]
            if calls:
                report.graphs_ms[name] = {
                    "calls": len(calls) / runs,
                    "median_ms": 1000 * statistics.median(calls),
                }
        report.step_gflop = step_gflop(pipe.build, h, w, count, Branches.of(guidance, control_mode))
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report.peak_cuda_mib = torch.cuda.max_memory_allocated() / 2**20
    return report
