"""``controlrt parity``: every graph and the whole loop on a backend, against the PyTorch reference.

The comparisons, their metrics and the gates they are judged by live in controlrt.compare; the
held-out inputs of fp16 and int8 checks come from controlrt.calibration. This module puts them
together for one build, backend and precision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from controlrt.compare import (
    Comparison,
    Gate,
    captured_cases,
    compare_in_turn,
    gate,
    parity_sizes,
    psnr,
    seeded_cases,
    ssim,
    tensor_metrics,
)
from controlrt.errors import ParityError
from controlrt.precision import Precision

if TYPE_CHECKING:
    from controlrt.families import Family

__all__ = ["EndToEnd", "ParityError", "ParityReport", "run_parity"]


@dataclass(frozen=True)
class EndToEnd:
    """A short generation on the backend against the fp32 torch reference."""

    psnr_db: float
    ssim: float
    latent_rel_l2: float
    threshold_db: float
    settings: dict[str, Any]
    passed: bool
    note: str = ""


@dataclass
class ParityReport:
    backend: str
    precision: Precision = Precision.FP32
    quantizer: str | None = None
    graphs: list[Comparison] = field(default_factory=list)
    end_to_end: EndToEnd | None = None
    family: Family | None = field(default=None, repr=False)  # whose gates judge; None: compare's

    @property
    def gate(self) -> Gate:
        return (self.family.gate if self.family else gate)(self.precision, self.quantizer)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.graphs) and (self.end_to_end is None or self.end_to_end.passed)

    @property
    def failures(self) -> list[str]:
        out = [f"{c.graph} {c.shape} {c.output}" for c in self.graphs if not c.passed]
        if self.end_to_end is not None and not self.end_to_end.passed:
            out.append("end-to-end image")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": str(self.precision),
            "quantizer": self.quantizer,
            "passed": self.passed,
            "tolerances": {k.value: asdict(v) for k, v in self.gate.tolerances.items()},
            "end_to_end_threshold_db": self.gate.psnr_db,
            "graphs": [asdict(c) for c in self.graphs],
            "end_to_end": asdict(self.end_to_end) if self.end_to_end else None,
        }

    def to_json(self) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=2)

    def table(self) -> str:
        head = f"{'graph':<14} {'shape':<12} {'output':<18} {'max_abs':>9} {'rel_l2':>9} {'cosine':>10}  result"
        variant = f"{self.precision}" + (f" ({self.quantizer})" if self.quantizer else "")
        lines = [f"parity: {self.backend} {variant} vs torch fp32", head, "-" * len(head)]
        for c in self.graphs:
            mark = "ok" if c.passed else "FAIL" + (f" ({c.note})" if c.note else "")
            lines.append(
                f"{c.graph:<14} {c.shape:<12} {c.output:<18} {c.max_abs:>9.2e} {c.rel_l2:>9.2e} "
                f"{c.cosine:>10.7f}  {mark}"
            )
        if self.end_to_end is not None:
            e = self.end_to_end
            mark = "ok" if e.passed else "FAIL" + (f" ({e.note})" if e.note else "")
            lines.append(
                f"end-to-end image: PSNR {e.psnr_db:.1f} dB (threshold {e.threshold_db:.0f} dB), "
                f"SSIM {e.ssim:.4f}, latent rel_l2 {e.latent_rel_l2:.2e}  {mark}"
            )
        lines.append("PASSED" if self.passed else f"FAILED: {', '.join(self.failures)}")
        return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf"), since strict JSON has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_parity(
    build_dir: str | Path,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    steps: int = 4,
    seed: int = 0,
    end_to_end: bool = True,
    precision: str | Precision = Precision.FP32,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    **backend_options: Any,
) -> ParityReport:
    """Compare every graph of a build on ``backend`` in ``precision`` with torch fp32, then a
    short generation.

    Each graph is judged by the gate of the precision it computes in (in an int8 pipeline the text
    encoder and VAE run fp16 graphs, or bf16 on OpenVINO on a bf16 CPU), the image by the
    pipeline precision's. fp32 graphs are compared on seeded inputs at two shapes; others on held-out
    inputs captured from the reference denoise loop (never the calibration samples). The
    end-to-end run uses the built-in sample controls (one per ControlNet), uniform mode, CFG and
    a negative prompt, at the model's native size unless ``height``/``width`` are given. Shapes
    the backend under test does not accept (a TensorRT engine's profiles) are not asked of it:
    the graphs are compared at the parity shapes it accepts, else at its own profiles' shapes,
    and the generation runs at a size every engine accepts. ``device`` and ``backend_options``
    go to BackendOptions (cuda_graphs, weight_streaming_budget).
    """
    from controlrt.builtin import sample_control_images
    from controlrt.families import family_of
    from controlrt.manifest import Build
    from controlrt.runtime.backends import BackendOptions, SessionFactory
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.runtime.request import GenerationRequest, sample_control_types

    precision = Precision.parse(precision)
    build = Build.open(build_dir)
    options = BackendOptions(backend, tuple(providers) if providers else None, device, precision, **backend_options)
    family = family_of(build.manifest.info)
    quantizer = build.int8_quantizer if precision is Precision.INT8 else None
    report = ParityReport(backend, precision, quantizer, family=family)
    # One graph at a time, and the reference closed before the candidate opens: full-size
    # models do not fit in memory twice over.
    reference_sessions = SessionFactory(build, BackendOptions("torch"))
    candidate_sessions = SessionFactory(build, options)
    size = _generation_size(build, candidate_sessions, height, width)
    held_out = None
    if precision is not Precision.FP32:
        from controlrt.calibration.calibrate import held_out_captures

        held_out = held_out_captures(build, height=size[0], width=size[1])
    for name, record in build.manifest.graphs.items():
        spec = record.spec
        if held_out is None:
            cases = seeded_cases(spec, candidate_sessions.accepted_sizes(name, parity_sizes(spec)))
        else:
            cases = captured_cases(held_out[name])
        computes = candidate_sessions.computes(name)
        tolerance = family.tolerance(computes, spec.kind, quantizer if computes is Precision.INT8 else None)
        report.graphs += compare_in_turn(
            lambda name=name: reference_sessions.open(name),
            lambda name=name: candidate_sessions.open(name),
            cases,
            tolerance,
        )
    if end_to_end:
        types = sample_control_types(build.manifest.controlnet_specs)
        request = GenerationRequest(
            prompt="a red circle and a blue square",
            negative_prompt="blurry" if family.negative_prompts else None,
            controls=sample_control_images(len(types), *size),
            control_types=types,
            steps=steps,
            seed=seed,
            height=size[0],
            width=size[1],
        )
        with Pipeline.from_build(build, backend="torch") as reference:
            expected = reference.generate(request)
        with Pipeline.from_build(build, backend, providers, device, precision, **backend_options) as candidate:
            got = candidate.generate(request)
        report.end_to_end = judge_images(expected, got, got.settings, report.gate.psnr_db)
    return report


def _generation_size(build, sessions, height: int | None, width: int | None) -> tuple[int, int]:
    """The requested size (default native), or else the first size every graph's session accepts."""
    native = build.manifest.info.default_size
    wanted = (height or native[0], width or native[1])
    names = list(build.manifest.graphs)
    unet = build.manifest.spec(build.manifest.denoiser)
    candidates = [unet.sizes(1, *wanted)]
    if height is None and width is None:
        candidates += sessions.own_sizes(unet.name)  # an engine's profile sizes
    for sizes in candidates:
        size = (sizes["height"], sizes["width"])
        if all(sessions.admits(n, build.manifest.spec(n).sizes(1, *size)) for n in names):
            return size
    return wanted  # nothing fits: the run itself says which engine refuses it, and how to rebuild


def judge_images(expected, got, settings: dict[str, Any], threshold_db: float) -> EndToEnd:
    a = np.asarray(expected.image)
    b = np.asarray(got.image)
    value = psnr(a, b)
    latent = tensor_metrics(expected.latents, got.latents)["rel_l2"]
    note = ""
    passed = value >= threshold_db
    if a.std() == 0:
        passed, note = False, "reference image is flat: the comparison proves nothing"
    return EndToEnd(value, ssim(a, b), latent, threshold_db, settings, passed, note)
