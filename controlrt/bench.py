"""``controlrt bench``: where the time of a generation goes, on one backend and precision.

Warm, repeated generations with the built-in sample controls. Reported: the median latency of each
graph per call, its FLOPs per call (counted by torch's FlopCounterMode on the source architecture,
built on the meta device, so no weights are loaded), its achieved GFLOP/s and, on the CPU, that
rate as a share of this CPU's matrix-multiply peak in the precision the graph computes in
(measured here: fp32, bf16, int8; measured before the timed generations and after each, the best
kept, so that a peak caught at a slow moment of a shared host does not inflate the shares); per
denoising step and end to end (median, min and max over the
runs); the loop overhead, the share of the denoise loop spent outside the graph sessions (residual
sums, guidance, the scheduler, feeding); peak memory; the CPU's name and instruction features.
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

from controlrt import cpu
from controlrt.control import Branches
from controlrt.precision import Precision
from controlrt.runtime.autoprecision import Candidate, Choice
from controlrt.runtime.backends import BackendOptions, SessionFactory
from controlrt.session import Session

MAX_RUNS = 100  # timed (and warm-up) generations per bench
TASKS = ("txt2img", "img2img", "inpaint")

# The matrix-multiply peak a graph's achieved rate is compared with, by the precision it computes in
# (fp16 graphs compute in fp32 on the CPU backends).
PEAK_OF = {Precision.BF16: "bf16", Precision.INT8: "int8"}


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
    cpu: dict[str, Any] = field(default_factory=dict)  # name, cores, features
    matmul_peaks: dict[str, float | None] = field(default_factory=dict)  # GFLOP/s per precision, this CPU
    precision_choice: dict[str, Any] | None = None  # --precision auto: what was measured and chosen

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
            f"{'graph':<16} {'calls/image':>11} {'median ms/call':>15} {'GFLOP/call':>11} {'GFLOP/s':>8} "
            f"{'computes':>8} {'of peak':>8}",
        ]
        for name, g in self.graphs_ms.items():
            gflop = f"{g['gflop']:>11.1f} {g['gflops_per_s']:>8.1f}" if g.get("gflop") else f"{'':>11} {'':>8}"
            share = f"{100 * g['peak_share']:>7.0f}%" if g.get("peak_share") else f"{'':>8}"
            lines.append(
                f"{name:<16} {g['calls']:>11.0f} {g['median_ms']:>15.1f} {gflop} {g.get('computes', ''):>8} {share}"
            )
        step, image = d["step"], d["image"]
        lines.append(f"per step:   {step['median']:.3f} s (min {step['min']:.3f}, max {step['max']:.3f})")
        lines.append(f"per image:  {image['median']:.3f} s (min {image['min']:.3f}, max {image['max']:.3f})")
        lines.append(f"loop overhead: {100 * d['loop_overhead_share']:.2f}% of the denoise loop outside the graphs")
        if self.step_gflop:
            lines.append(f"step work: {self.step_gflop:.1f} GFLOP counted; achieved {d['gflops_per_s']:.1f} GFLOP/s")
        if self.cpu:
            lines.append(f"CPU: {self.cpu['name']}, {self.cpu['cores']} cores, {' '.join(self.cpu['features'])}")
        if self.matmul_peaks:
            peaks = ", ".join(f"{k} {v:.0f}" for k, v in self.matmul_peaks.items() if v)
            lines.append(f"matrix-multiply peak on this CPU (torch, GFLOP/s, best between the runs): {peaks}")
        memory = f"peak memory: {self.peak_rss_mib:.0f} MiB resident"
        if self.peak_cuda_mib is not None:
            memory += f", {self.peak_cuda_mib:.0f} MiB CUDA"
        lines.append(memory)
        if self.precision_choice and self.precision_choice["rows"]:
            lines.append(Choice.from_dict(self.precision_choice).table())
        return "\n".join(lines)


def _precision_label(options: BackendOptions) -> str:
    """fp32, bf16, …; int8+bf16 where an OpenVINO int8 pipeline's float layers were chosen."""
    return Candidate(options.precision, options.float_precision).label


def _meta_module(build, spec):
    """The graph's module built from its source configs on the meta device (no weights), or None."""
    from controlrt.errors import ModelError
    from controlrt.families import load_graph_module
    from controlrt.models import BaseModel, ControlNetModelFolder

    sources = build.manifest.sources
    try:
        base = BaseModel.open(sources["base"]["path"]).with_vae(sources["base"].get("vae"))
        controlnets = [ControlNetModelFolder.open(s["path"]) for s in sources["controlnets"]]
        return load_graph_module(spec, base, controlnets, meta=True)
    except (ModelError, OSError, ValueError, KeyError):
        return None


def graph_gflop(build, name: str, batch: int, height: int, width: int) -> float | None:
    """GFLOP of one call of graph ``name`` (torch's FlopCounterMode on the source architecture,
    built on the meta device), or None without the source configs."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = build.manifest.spec(name)
    module = _meta_module(build, spec)
    if module is None:
        return None
    feeds = spec.dummy_inputs(spec.sizes(batch, height, width))
    args = [feeds[n].to("meta") for n in spec.input_names]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args)
    return counter.get_total_flops() / 1e9


def step_gflop(build, height: int, width: int, controls: int, branches: Branches) -> float | None:
    """GFLOP of one denoising step (UNet + active ControlNets), or None without the source configs."""
    names = [build.manifest.denoiser, *(s.name for s in build.manifest.controlnet_specs[:controls])]
    counts = [graph_gflop(build, n, branches.per_image(build.manifest.spec(n).kind), height, width) for n in names]
    return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]


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
    task: str = "txt2img",
    **backend_options: Any,
) -> BenchReport:
    """Time warm generations; ``task`` "img2img" or "inpaint" starts from the built-in sample init
    image (and mask), so that the VAE encoder is timed too."""
    from controlrt.builtin import sample_control_images, sample_init_image, sample_mask
    from controlrt.control import ControlMode
    from controlrt.errors import InputError
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.runtime.request import GenerationRequest, sample_control_types

    if not (1 <= runs <= MAX_RUNS and 0 <= warmup <= MAX_RUNS):
        raise InputError(f"--runs must be 1 to {MAX_RUNS} and --warmup 0 to {MAX_RUNS}, got {runs} and {warmup}")
    if task not in TASKS:
        raise InputError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    log: dict[str, list[float]] = defaultdict(list)
    with Pipeline.load(build_dir, backend, providers, None, True, precision, **backend_options) as pipe:
        count = len(pipe.controlnet_specs) if controls is None else controls
        if not 0 <= count <= len(pipe.controlnet_specs):
            raise InputError(f"--controls {count}: the build has {len(pipe.controlnet_specs)} ControlNet(s)")
        h, w = height or pipe.info.default_size[0], width or pipe.info.default_size[1]
        if task != "txt2img":
            pipe.session("vae_encoder")  # opened now, to be timed with the others
        pipe.sessions = {name: TimedSession(s, log) for name, s in pipe.sessions.items()}  # type: ignore[misc]
        types = sample_control_types(pipe.controlnet_specs[:count])
        request = GenerationRequest(
            "a red circle and a blue square",
            controls=sample_control_images(len(types), h, w),
            control_types=types,
            steps=steps,
            guidance=guidance,
            control_mode=control_mode,
            height=h,
            width=w,
            negative_prompt="" if pipe.family.negative_prompts else None,
            scheduler=scheduler,
            image=sample_init_image(h, w) if task != "txt2img" else None,
            mask=sample_mask(h, w) if task == "inpaint" else None,
        )
        settings = {
            "task": task,
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
        choice = pipe.precision_choice
        report = BenchReport(pipe.options.backend, _precision_label(pipe.options), settings)
        report.precision_choice = None if choice is None else choice.to_dict()
        for _ in range(warmup):
            pipe.generate(request)
        denoiser = pipe.unet_spec.name
        on_cpu = pipe.sessions[denoiser].device.type == "cpu"
        peaks: list[dict[str, float | None]] = []

        def measure_peaks() -> None:  # between generations: the best the CPU did while they ran
            if on_cpu:
                peaks.append(cpu.matmul_peaks(threads=backend_options.get("threads")))

        measure_peaks()
        per_run: list[dict[str, list[float]]] = []
        for _ in range(runs):
            log.clear()
            timings: dict[str, float] = {}
            start = time.perf_counter()
            pipe.generate(request, timings=timings)
            report.image_s.append(time.perf_counter() - start)
            iterations = len(log[denoiser]) or steps  # some schedulers (PNDM) run one more than asked
            report.step_s.append(timings["denoise"] / iterations)
            in_graphs = sum(sum(v) for n, v in log.items() if n == denoiser or n.startswith("controlnet"))
            report.loop_overhead.append(max(0.0, timings["denoise"] - in_graphs) / timings["denoise"])
            per_run.append({n: list(v) for n, v in log.items()})
            measure_peaks()
        branches = pipe.family.branches(guidance, control_mode)
        if on_cpu:
            report.cpu = cpu.describe()
            report.matmul_peaks = {k: max((p[k] for p in peaks if p[k]), default=None) for k in peaks[0]}
        factory = SessionFactory(pipe.build, pipe.options)
        for name in pipe.sessions:
            calls = [c for run in per_run for c in run.get(name, [])]
            if not calls:
                continue
            median = statistics.median(calls)
            computes = factory.computes(name)
            row: dict[str, Any] = {"calls": len(calls) / runs, "median_ms": 1000 * median, "computes": str(computes)}
            kind = pipe.build.manifest.spec(name).kind
            gflop = graph_gflop(pipe.build, name, branches.per_image(kind), h, w)
            if gflop:
                row["gflop"] = gflop
                row["gflops_per_s"] = gflop / median
                # a precision without its own peak here computes in fp32 (int8 graphs on x86 without VNNI)
                own = report.matmul_peaks.get(PEAK_OF.get(computes, "fp32"))
                peak = (own or report.matmul_peaks.get("fp32")) if on_cpu else None
                row["peak_share"] = row["gflops_per_s"] / peak if peak else None
            report.graphs_ms[name] = row
        report.step_gflop = step_gflop(pipe.build, h, w, count, branches)
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        report.peak_cuda_mib = torch.cuda.max_memory_allocated() / 2**20
    return report
