"""Parity: every graph and the whole loop on a backend, against the PyTorch reference.

Tolerances live here, in one place. A comparison passes when the relative L2 error and the
largest absolute error (relative to the reference's largest magnitude) are within its
tolerance, and fails outright when the reference is all zeros (a vacuous comparison).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from controlrt.errors import ParityError
from controlrt.precision import Precision
from controlrt.runtime.session import Session
from controlrt.specs import GraphKind, GraphSpec


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted relative L2 error and largest |error| / max |reference|."""

    rel_l2: float
    max_rel: float


_FP32 = Tolerance(rel_l2=1e-4, max_rel=1e-3)
_FP16 = Tolerance(rel_l2=2e-2, max_rel=5e-2)
# Per graph output against the fp32 torch module (fp16/int8: on held-out captured loop inputs).
# In an int8 pipeline the text encoder and VAE decoder run fp16, and are held to fp16's bounds.
TOLERANCES: dict[Precision, dict[GraphKind, Tolerance]] = {
    Precision.FP32: dict.fromkeys(GraphKind, _FP32),
    Precision.FP16: dict.fromkeys(GraphKind, _FP16),
    Precision.INT8: {
        GraphKind.TEXT_ENCODER: _FP16,
        GraphKind.CONTROLNET: Tolerance(rel_l2=0.25, max_rel=0.5),
        GraphKind.UNET: Tolerance(rel_l2=0.25, max_rel=0.5),
        GraphKind.VAE_DECODER: _FP16,
    },
}
# Final 8-bit image against the fp32 torch reference at the same seed and settings (PSNR, dB).
END_TO_END_PSNR_DB: dict[Precision, float] = {
    Precision.FP32: 40.0,
    Precision.FP16: 35.0,
    Precision.INT8: 20.0,
}


def tolerance_for(precision: Precision | str, kind: GraphKind) -> Tolerance:
    return TOLERANCES[Precision.parse(precision)][kind]


@dataclass(frozen=True)
class Comparison:
    """One output of one graph at one shape."""

    graph: str
    shape: str
    output: str
    max_abs: float
    rel_l2: float
    cosine: float
    ref_max_abs: float
    passed: bool
    note: str = ""


__all__ = [
    "TOLERANCES",
    "Comparison",
    "ParityError",
    "ParityReport",
    "Tolerance",
    "compare_graph",
    "compare_in_turn",
    "run_parity",
]


def tensor_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    ref = reference.detach().double().cpu().flatten()
    out = candidate.detach().double().cpu().flatten()
    diff = out - ref
    ref_norm = float(ref.norm())
    out_norm = float(out.norm())
    return {
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel_l2": float(diff.norm()) / ref_norm if ref_norm else math.inf,
        "cosine": float(ref @ out) / (ref_norm * out_norm) if ref_norm and out_norm else 0.0,
        "ref_max_abs": float(ref.abs().max()) if ref.numel() else 0.0,
    }


def judge(graph: str, shape: str, output: str, reference, candidate, tolerance: Tolerance) -> Comparison:
    if tuple(reference.shape) != tuple(candidate.shape):
        return Comparison(
            graph,
            shape,
            output,
            math.inf,
            math.inf,
            0.0,
            0.0,
            False,
            f"shape {tuple(candidate.shape)} != reference {tuple(reference.shape)}",
        )
    m = tensor_metrics(reference, candidate)
    note = ""
    if m["ref_max_abs"] == 0.0:
        passed, note = False, "reference is all zeros: the comparison proves nothing"
    elif not all(math.isfinite(v) for v in m.values()):
        passed, note = False, "non-finite values"
    else:
        passed = m["rel_l2"] <= tolerance.rel_l2 and m["max_abs"] <= tolerance.max_rel * m["ref_max_abs"]
    return Comparison(graph, shape, output, passed=passed, note=note, **m)


def parity_sizes(spec: GraphSpec) -> list[dict[str, int]]:
    """Two shapes per graph: batch 1 at the native size; batch 2, non-square, another size."""
    m = spec.size_multiple
    height, width = spec.default_size
    other_h = max(m, (height * 3 // 4) // m * m)
    other_w = max(m, (width * 5 // 4 + m - 1) // m * m)
    if (other_h, other_w) == (height, width):
        other_w += m
    return [spec.sizes(1, height, width), spec.sizes(2, other_h, other_w)]


def _shape_label(sizes: Mapping[str, int]) -> str:
    return f"{sizes['batch']}x{sizes['height']}x{sizes['width']}"


def compare_graph(
    reference: Session,
    candidate: Session,
    tolerance: Tolerance | None = None,
    sizes: Sequence[Mapping[str, int]] | None = None,
    seed: int = 1234,
) -> list[Comparison]:
    """Run both sessions on the same seeded inputs at each size and compare every output."""
    spec = reference.spec
    tolerance = tolerance or tolerance_for(Precision.FP32, spec.kind)
    return compare_feeds(reference, candidate, seeded_cases(spec, sizes, seed), tolerance)


def compare_feeds(
    reference: Session,
    candidate: Session,
    cases: Sequence[tuple[str, Mapping[str, Any]]],
    tolerance: Tolerance,
) -> list[Comparison]:
    """Compare every output of both sessions on each (label, feeds) case."""
    spec = reference.spec
    rows = []
    for label, feeds in cases:
        feeds = {k: torch.as_tensor(v) for k, v in feeds.items()}
        expected = reference.infer(feeds)
        got = candidate.infer(feeds)
        for name in spec.output_names:
            rows.append(judge(spec.name, label, name, expected[name], got[name], tolerance))
    return rows


def compare_in_turn(
    open_reference: Callable[[], Session],
    open_candidate: Callable[[], Session],
    cases: Sequence[tuple[str, Mapping[str, Any]]],
    tolerance: Tolerance,
) -> list[Comparison]:
    """Like compare_feeds, but never holds both sessions at once.

    The reference runs every case and is closed before the candidate opens: two sessions of a
    full-size UNet at 512 px need more memory than many machines have.
    """
    cases = [(label, {k: torch.as_tensor(v) for k, v in feeds.items()}) for label, feeds in cases]
    with open_reference() as reference:
        spec = reference.spec
        expected = [reference.infer(feeds) for _, feeds in cases]
    rows = []
    with open_candidate() as candidate:
        for (label, feeds), want in zip(cases, expected, strict=True):
            got = candidate.infer(feeds)
            for name in spec.output_names:
                rows.append(judge(spec.name, label, name, want[name], got[name], tolerance))
            del got
    return rows


def seeded_cases(spec: GraphSpec, sizes: Sequence[Mapping[str, int]] | None = None, seed: int = 1234):
    """(label, feeds) at each size (default: parity_sizes), the inputs compare_graph uses."""
    return [(_shape_label(s), spec.dummy_inputs(s, seed=seed + n)) for n, s in enumerate(sizes or parity_sizes(spec))]


def captured_cases(records: Sequence[Mapping[str, Any]], limit: int = 4) -> list[tuple[str, Mapping[str, Any]]]:
    """Up to ``limit`` captured feeds spread over the records, labelled by their index."""
    if not records:
        return []
    step = max(1, len(records) // limit)
    return [(f"held-out#{i}", records[i]) for i in range(0, len(records), step)][:limit]


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = float(np.mean((reference.astype(np.float64) - candidate.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean SSIM of two uint8 HxWxC images (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    per channel, valid region), in [-1, 1]; 1 when identical."""
    a = torch.from_numpy(np.asarray(reference, dtype=np.float64)).permute(2, 0, 1)[:, None]
    b = torch.from_numpy(np.asarray(candidate, dtype=np.float64)).permute(2, 0, 1)[:, None]
    size = min(11, a.shape[-1], a.shape[-2])
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


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
    graphs: list[Comparison] = field(default_factory=list)
    end_to_end: EndToEnd | None = None

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
            "passed": self.passed,
            "tolerances": {k.value: asdict(v) for k, v in TOLERANCES[self.precision].items()},
            "end_to_end_threshold_db": END_TO_END_PSNR_DB[self.precision],
            "graphs": [asdict(c) for c in self.graphs],
            "end_to_end": asdict(self.end_to_end) if self.end_to_end else None,
        }

    def write_json(self, path: str | Path) -> None:
        from controlrt.io import atomic_write_text

        atomic_write_text(path, json.dumps(_json_safe(self.to_dict()), indent=2))

    def table(self) -> str:
        head = f"{'graph':<14} {'shape':<12} {'output':<18} {'max_abs':>9} {'rel_l2':>9} {'cosine':>10}  result"
        lines = [f"parity: {self.backend} {self.precision} vs torch fp32", head, "-" * len(head)]
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
    **backend_options: Any,
) -> ParityReport:
    """Compare every graph of a build on ``backend`` in ``precision`` with torch fp32, then a
    short generation.

    fp32 graphs are compared on seeded inputs at two shapes; fp16 and int8 graphs on held-out
    inputs captured from the reference denoise loop (never the calibration samples). The
    end-to-end run uses the built-in sample controls (one per ControlNet), uniform mode, CFG and
    a negative prompt, at the model's native size unless ``height``/``width`` are given.
    ``backend_options`` go to BackendOptions (cuda_graphs, weight_streaming_budget).
    """
    from controlrt.builtin import sample_control_images
    from controlrt.manifest import Build
    from controlrt.runtime.backends import BackendOptions, SessionFactory
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.runtime.request import GenerationRequest

    precision = Precision.parse(precision)
    build = Build.open(build_dir)
    options = BackendOptions(backend, tuple(providers) if providers else None, None, precision, **backend_options)
    report = ParityReport(backend, precision)
    held_out = None
    if precision is not Precision.FP32:
        from controlrt.calibration.calibrate import held_out_captures

        held_out = held_out_captures(build)
    # One graph at a time, and the reference closed before the candidate opens: full-size
    # models do not fit in memory twice over.
    reference_sessions = SessionFactory(build, BackendOptions("torch"))
    candidate_sessions = SessionFactory(build, options)
    for name, record in build.manifest.graphs.items():
        spec = record.spec
        cases = seeded_cases(spec) if held_out is None else captured_cases(held_out[name])
        report.graphs += compare_in_turn(
            lambda name=name: reference_sessions.open(name),
            lambda name=name: candidate_sessions.open(name),
            cases,
            tolerance_for(precision, spec.kind),
        )
    if end_to_end:
        default_h, default_w = build.manifest.info.default_size
        height, width = height or default_h, width or default_w
        request = GenerationRequest(
            prompt="a red circle and a blue square",
            negative_prompt="blurry",
            controls=sample_control_images(len(build.manifest.controlnet_specs), height, width),
            steps=steps,
            seed=seed,
            height=height,
            width=width,
        )
        with Pipeline.from_build(build, backend="torch") as reference:
            expected = reference.generate(request)
        with Pipeline.from_build(build, backend, providers, None, precision, **backend_options) as candidate:
            got = candidate.generate(request)
        report.end_to_end = judge_images(expected, got, request.settings(), END_TO_END_PSNR_DB[precision])
    return report


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
