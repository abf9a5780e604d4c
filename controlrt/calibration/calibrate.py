"""``controlrt calibrate``: int8 (Q/DQ) UNet and ControlNet graphs from captured loop inputs."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from controlrt.calibration.capture import CaptureSettings, Feeds, capture
from controlrt.calibration.data import CalibrationData
from controlrt.calibration.quantizers import make_quantizer
from controlrt.errors import InputError
from controlrt.export.variants import write_variants
from controlrt.logs import stdout_to_log
from controlrt.manifest import Build, Manifest
from controlrt.precision import INT8_KINDS, OPTIONAL_INT8_KINDS, Precision
from controlrt.runtime.request import sample_control_types
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

# Held-out generations come from the built-in data set at seeds calibration never uses.
HELD_OUT_SEED = 1_000_003
HELD_OUT_SAMPLES = 2
DEFAULT_STEPS = 4
MAX_FLOAT_LAYERS = 64


@dataclass(frozen=True)
class CalibrationSettings:
    """How int8 graphs are made.

    Attributes:
        method: "onnxruntime" (quantize_static), "modelopt" (NVIDIA ModelOpt) or "nncf" (OpenVINO's NNCF).
        calibration: Activation range method: "percentile", "entropy" or "minmax"
            (onnxruntime); "percentile" or "max" (modelopt); "minmax" (nncf).
        samples: Generations captured for calibration.
        steps: Denoising steps per generation (every step is captured).
        height, width: Image size of the captured generations (default: native).
        seed: Seed of the built-in data and of the generations.
        vae: Quantize the VAE decoder too (one captured call per generation); otherwise it runs
            fp16 (or fp32) in int8 pipelines.
        float_layers: In each graph, keep at most this many more layers float: those whose int8
            error reaches the output most, measured on the captures (calibration/sensitivity.py).
        float_budget: In each graph, keep float at most this percentage of the quantizable layers'
            GFLOP, taking layers by error removed per GFLOP (with float_layers: also at most that many).
    """

    method: str = "modelopt"
    calibration: str | None = None
    samples: int = 8
    steps: int = DEFAULT_STEPS
    height: int | None = None
    width: int | None = None
    seed: int = 0
    vae: bool = False
    float_layers: int | None = None
    float_budget: float | None = None

    def check(self) -> None:
        if self.samples < 1:
            raise InputError(f"--samples must be at least 1, got {self.samples}")
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}")
        if self.float_layers is not None and not 0 <= self.float_layers <= MAX_FLOAT_LAYERS:
            raise InputError(f"--float-layers must be 0 to {MAX_FLOAT_LAYERS}, got {self.float_layers}")
        if self.float_budget is not None and not 0 < self.float_budget <= 100:
            raise InputError(f"--float-budget must be a percentage above 0 and at most 100, got {self.float_budget}")


def _capture_settings(build: Build, steps: int, height: int | None, width: int | None, seed: int) -> CaptureSettings:
    info = build.manifest.info
    height = height or info.default_size[0]
    width = width or info.default_size[1]
    build.manifest.spec(build.manifest.denoiser).sizes(1, height, width)  # InputError unless a valid size
    return CaptureSettings(steps=steps, height=height, width=width, seed=seed)


def held_out_captures(
    build: Build, steps: int | None = None, height: int | None = None, width: int | None = None
) -> dict[str, list[Feeds]]:
    """Captured inputs of built-in generations that no calibration uses.

    Size and steps default to those of the build's int8 calibration, else native size, 4 steps.
    """
    unet = build.manifest.graphs[build.manifest.denoiser]
    recorded = unet.variants[Precision.INT8].settings.get("capture", {}) if Precision.INT8 in unet.variants else {}
    cap = _capture_settings(
        build,
        steps or recorded.get("steps", DEFAULT_STEPS),
        height or recorded.get("height"),
        width or recorded.get("width"),
        HELD_OUT_SEED,
    )
    data = CalibrationData.builtin(
        HELD_OUT_SAMPLES,
        len(sample_control_types(build.manifest.controlnet_specs)),
        cap.height,
        cap.width,
        HELD_OUT_SEED,
    )
    return capture(build, data, cap)


def _float_layers(names, build: Build, calibration, module, settings: CalibrationSettings) -> dict[str, list]:
    """Per graph, the layers kept float: those with the largest share of the int8 output error."""
    from controlrt.calibration.sensitivity import choose_float_layers, error_shares

    kept = {}
    for name in names:
        spec = build.manifest.spec(name)
        shares = error_shares(module(spec)(), spec.input_names, calibration[name])
        kept[name] = choose_float_layers(shares, settings.float_layers, settings.float_budget)
        logger.info(
            "%s: %d layers kept float carry %.0f%% of the int8 output error, %.0f%% of the GFLOP: %s",
            name,
            len(kept[name]),
            100 * sum(s.share for s in kept[name]) / (sum(s.share for s in shares if s.share > 0) or 1.0),
            100 * sum(s.gflop for s in kept[name]) / (sum(s.gflop for s in shares) or 1.0),
            ", ".join(s.layer for s in kept[name]),
        )
    return kept


@dataclass(frozen=True)
class Captured:
    """What a calibration reads: its capture settings and data, the captured calibration feeds and
    the held-out feeds it is checked on (graph name -> feeds per call)."""

    settings: CaptureSettings
    data: CalibrationData
    calibration: dict[str, list[Feeds]]
    held_out: dict[str, list[Feeds]]


def capture_generations(
    build: Build, settings: CalibrationSettings, data_dir: str | Path | None = None, progress: bool = False
) -> Captured:
    """Run (or read from the build's cache, calibration/captures-*) the reference generations that a
    calibration with ``settings`` quantizes from and is checked on."""
    cap = _capture_settings(build, settings.steps, settings.height, settings.width, settings.seed)
    count = len(sample_control_types(build.manifest.controlnet_specs))
    if data_dir is None:
        data = CalibrationData.builtin(settings.samples, count, cap.height, cap.width, settings.seed)
    else:
        data = CalibrationData.from_folder(data_dir, settings.samples, count)
    logger.info("capturing %d generations x %d steps", len(data), cap.steps)
    calibration = capture(build, data, cap, progress)
    return Captured(cap, data, calibration, held_out_captures(build, cap.steps, cap.height, cap.width))


def calibrate_build(
    build_dir: str | Path,
    data_dir: str | Path | None = None,
    settings: CalibrationSettings | None = None,
    progress: bool = False,
) -> Manifest:
    """Capture loop inputs, quantize the UNet and every ControlNet (and the VAE decoder if asked) to
    int8, check, record.

    Each int8 graph is checked against the fp32 graph on held-out captured inputs with the
    quantizer's int8 tolerances (controlrt.compare) before it is recorded.
    """
    from controlrt.compare import captured_cases, compare_in_turn
    from controlrt.families import family_of
    from controlrt.ort_session import OrtSession

    settings = settings or CalibrationSettings()
    settings.check()
    quantizer = make_quantizer(settings.method, settings.calibration)
    build = Build.open(build_dir)
    build.require_fp32_graphs("calibrate")
    family = family_of(build.manifest.info)
    captured = capture_generations(build, settings, data_dir, progress)
    cap, data, calibration, held_out = captured.settings, captured.data, captured.calibration, captured.held_out
    kinds = INT8_KINDS | OPTIONAL_INT8_KINDS if settings.vae else INT8_KINDS
    names = [n for n, g in build.manifest.graphs.items() if g.spec.kind in kinds]

    def module(spec: GraphSpec):
        from controlrt.families import load_graph_module
        from controlrt.runtime.backends import open_sources

        return lambda: load_graph_module(spec, *open_sources(build.manifest))

    measure = settings.float_layers or settings.float_budget
    kept = _float_layers(names, build, calibration, module, settings) if measure else {}

    def produce(spec: GraphSpec, target: Path) -> list[Path]:
        layers = [s.layer for s in kept.get(spec.name, [])]
        with stdout_to_log(logger, logging.INFO):  # ModelOpt prints its progress
            return quantizer.quantize(
                spec, build.graph_path(spec.name), calibration[spec.name], target, module(spec), layers
            )

    def check(spec: GraphSpec, path: Path):
        return compare_in_turn(
            lambda: OrtSession(build.graph_path(spec.name), spec),
            lambda: OrtSession(path, spec),
            captured_cases(held_out[spec.name]),
            family.tolerance(Precision.INT8, spec.kind, quantizer.name),
        )

    recorded = {
        **quantizer.describe(),
        "data": data.source,
        "data_sha256": data.digest,
        "samples": len(data),
        "capture": asdict(cap),
        "checked_against": "fp32 graph on held-out captured inputs",
    }
    if kept:
        recorded["float_layers"] = {n: [asdict(s) for s in shares] for n, shares in kept.items()}
        recorded["float_choice"] = {"count": settings.float_layers, "budget_percent": settings.float_budget}
    # An int8 VAE decoder from an earlier calibrate --vae is not left beside other graphs' new int8.
    stale = [n for n, g in build.manifest.graphs.items() if n not in names and Precision.INT8 in g.variants]
    for name in stale:
        logger.info("%s.int8 dropped: this calibration leaves it in float (calibrate --vae quantizes it)", name)
    return write_variants(build, Precision.INT8, names, produce, check, recorded, progress, drop=stale)
