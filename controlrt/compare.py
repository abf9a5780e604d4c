"""Comparing a graph's outputs with a reference: metrics, tolerances, verdicts.

The bottom of parity: export's validation, ``convert``'s and ``calibrate``'s checks, refit's check
and ``controlrt parity`` all judge outputs here, by the gates written here, in one place.

A comparison passes when the relative L2 error and the largest absolute error (relative to the
reference's largest magnitude) are within its tolerance, and fails outright when the reference is
all zeros (a vacuous comparison) or anything is non-finite.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from controlrt.errors import ValidationError
from controlrt.precision import Precision
from controlrt.session import Session
from controlrt.specs import GraphKind, GraphSpec


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted relative L2 error and largest |error| / max |reference|."""

    rel_l2: float
    max_rel: float


@dataclass(frozen=True)
class Gate:
    """What a precision (and, for int8, a quantizer) must reach against the fp32 torch reference.

    Attributes:
        tolerances: Per graph kind, each output against the fp32 torch module (fp32: on seeded
            inputs at two shapes; fp16 and int8: on held-out inputs captured from the loop).
        psnr_db: The final 8-bit image of a short generation against the fp32 torch reference at
            the same seed and settings.
        measured: Where the numbers come from (benchmarks/parity_margins.py).
    """

    tolerances: Mapping[GraphKind, Tolerance]
    psnr_db: float
    measured: str = ""


# Gates sit just beyond the worst figures measured (benchmarks/parity_margins.py: three small
# architectures, random-weight tiny and alternate and the trained built-in model, every output of
# every graph at parity's shapes and in convert's and calibrate's checks; and the SD1.5-architecture
# figures of benchmarks/precision_quality.py and the slow full-size test): per-output bounds at 2-5x
# the worst measured (fp32's at 3x the full-size SD1.5 graphs', whose rounding noise is 15x the small
# models'); end-to-end PSNR 4-10 dB under the lowest measured. A real regression moves these
# figures by far more. In an int8 pipeline the text encoder and VAE decoder run fp16 and are held
# to fp16's bounds, unless calibrate --vae made an int8 VAE decoder: that one is held to the
# quantizer's VAE bound.
_FP16 = {
    GraphKind.TEXT_ENCODER: Tolerance(rel_l2=3e-3, max_rel=5e-3),
    GraphKind.CONTROLNET: Tolerance(rel_l2=2e-2, max_rel=3e-2),
    GraphKind.UNET: Tolerance(rel_l2=8e-3, max_rel=1.2e-2),
    GraphKind.VAE_DECODER: Tolerance(rel_l2=5e-3, max_rel=1e-2),
    GraphKind.VAE_ENCODER: Tolerance(rel_l2=5e-3, max_rel=1e-2),
}
GATES: dict[tuple[Precision, str | None], Gate] = {
    (Precision.FP32, None): Gate(
        {
            **dict.fromkeys(GraphKind, Tolerance(rel_l2=1e-4, max_rel=3e-4)),
            # fp32 sums over a 1024-px image: the VAEs differ more than any other graph (SDXL's
            # decoder; the encoder of a 16-channel VAE, smallsets' Flux set at scale 4)
            GraphKind.VAE_DECODER: Tolerance(rel_l2=5e-4, max_rel=6e-4),
            GraphKind.VAE_ENCODER: Tolerance(rel_l2=5e-4, max_rel=6e-4),
        },
        psnr_db=75.0,
        measured="rel L2 <= 1.9e-6 (small models), 3.2e-5 (SD1.5's VAE decoder at 384x640), 2.4e-4 (SDXL's VAE "
        "decoder at 2x768x1280; 1.5e-4 at 1024 px), 2.2e-4 (a 16-channel VAE encoder at 1024 px, max_abs "
        "3.5e-4); max_rel <= 2.9e-5, 2.1e-4 (SDXL's VAE); images identical, "
        "86.0 dB, 79.3 dB (SD1.5 at 512 px); against diffusers >= 84 dB",
    ),
    (Precision.FP16, None): Gate(
        _FP16,
        psnr_db=50.0,
        measured="rel L2 <= 7.2e-4 (text encoder), 9.6e-3 (ControlNets), 3.2e-3 (UNet), 9.1e-4 (VAE); "
        "PSNR 57.9-61.2 dB",
    ),
    (Precision.BF16, None): Gate(
        {
            GraphKind.TEXT_ENCODER: Tolerance(rel_l2=2e-2, max_rel=2.5e-2),
            GraphKind.CONTROLNET: Tolerance(rel_l2=0.15, max_rel=0.2),
            GraphKind.UNET: Tolerance(rel_l2=5e-2, max_rel=5e-2),
            GraphKind.VAE_DECODER: Tolerance(rel_l2=3e-2, max_rel=3e-2),
            GraphKind.VAE_ENCODER: Tolerance(rel_l2=3e-2, max_rel=3e-2),
        },
        psnr_db=32.0,
        measured="rel L2 <= 7.2e-3 (text encoder), 6.2e-2 (ControlNets), 2.5e-2 (UNet), 1.1e-2 (VAE); max_rel <= "
        "1.2e-2, 7.5e-2, 2.8e-2, 1.8e-2; PSNR 36.9-49.5 dB (OpenVINO and torch in bf16; SD1.5 at 256 px)",
    ),
    (Precision.INT8, "modelopt"): Gate(
        {
            **_FP16,
            GraphKind.CONTROLNET: Tolerance(rel_l2=0.2, max_rel=0.5),
            GraphKind.UNET: Tolerance(rel_l2=0.08, max_rel=0.1),
            GraphKind.VAE_DECODER: Tolerance(rel_l2=0.08, max_rel=0.2),  # int8 (calibrate --vae)
        },
        psnr_db=25.0,
        measured="rel L2 <= 0.117 (ControlNets), 0.034 (UNet), 0.033 (int8 VAE decoder, SD1.5 at 256 px); max_rel "
        "<= 0.27, 0.037, 0.075; PSNR 30.7-46.5 dB (30.7 with the int8 VAE decoder)",
    ),
    (Precision.INT8, "onnxruntime"): Gate(
        {
            **_FP16,
            GraphKind.CONTROLNET: Tolerance(rel_l2=0.25, max_rel=0.4),
            GraphKind.UNET: Tolerance(rel_l2=0.08, max_rel=0.1),
            GraphKind.VAE_DECODER: Tolerance(rel_l2=0.12, max_rel=0.25),  # int8 (calibrate --vae)
        },
        psnr_db=20.0,
        measured="rel L2 <= 0.100 (ControlNets; the alternate architecture's 0.25-0.31 is refused), 0.030 "
        "(UNet), 0.050 (int8 VAE decoder); max_rel <= 0.18, 0.032, 0.104; PSNR 24.2-40.3 dB (27.7 with the int8 "
        "VAE decoder)",
    ),
    (Precision.INT8, "nncf"): Gate(
        {
            **_FP16,
            GraphKind.CONTROLNET: Tolerance(rel_l2=0.2, max_rel=0.5),
            GraphKind.UNET: Tolerance(rel_l2=0.08, max_rel=0.1),
            GraphKind.VAE_DECODER: Tolerance(rel_l2=0.1, max_rel=0.15),  # int8 (calibrate --vae)
        },
        psnr_db=25.0,
        measured="rel L2 <= 0.121 (ControlNets), 0.037 (UNet), 0.043 (int8 VAE decoder, SD1.5 at 256 px); max_rel "
        "<= 0.27, 0.036, 0.061; PSNR 29.1-40.1 dB (with the int8 VAE decoder)",
    ),
}
DEFAULT_QUANTIZER = "modelopt"


def gate(precision: Precision | str, quantizer: str | None = None) -> Gate:
    """The gate of ``precision``; int8 gates are per quantizer (default: modelopt's)."""
    precision = Precision.parse(precision)
    if precision is not Precision.INT8:
        return GATES[precision, None]
    return GATES.get((precision, quantizer or DEFAULT_QUANTIZER), GATES[precision, DEFAULT_QUANTIZER])


def tolerance_for(precision: Precision | str, kind: GraphKind, quantizer: str | None = None) -> Tolerance:
    return gate(precision, quantizer).tolerances[kind]


def end_to_end_gate(precision: Precision | str, quantizer: str | None = None) -> float:
    return gate(precision, quantizer).psnr_db


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

    def describe(self) -> str:
        text = f"{self.output} at {self.shape}: rel_l2 {self.rel_l2:.2e}, max_abs {self.max_abs:.2e}"
        return text + (f" ({self.note})" if self.note else "")


def raise_on_failures(rows: Sequence[Comparison], what: str, limit: int = 4) -> None:
    """ValidationError naming up to ``limit`` failed comparisons; nothing if every row passed."""
    failed = [r for r in rows if not r.passed]
    if failed:
        more = f" (and {len(failed) - limit} more)" if len(failed) > limit else ""
        raise ValidationError(f"{what}: {'; '.join(r.describe() for r in failed[:limit])}{more}")


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


Sizes = Mapping[str, int]
Cases = Sequence[tuple[str, Mapping[str, Any]]]


def parity_sizes(spec: GraphSpec) -> list[dict[str, int]]:
    """Two shapes per graph: batch 1 at the native size; batch 2, non-square, another size."""
    m = spec.size_multiple
    height, width = spec.default_size
    other_h = max(m, (height * 3 // 4) // m * m)
    other_w = max(m, (width * 5 // 4 + m - 1) // m * m)
    if (other_h, other_w) == (height, width):
        other_w += m
    return [spec.sizes(1, height, width), spec.sizes(2, other_h, other_w)]


def shape_label(sizes: Sizes) -> str:
    return f"{sizes['batch']}x{sizes['height']}x{sizes['width']}"


def seeded_cases(spec: GraphSpec, sizes: Sequence[Sizes] | None = None, seed: int = 1234) -> Cases:
    """(label, feeds) at each size (default: parity_sizes), seeded inputs inside the value ranges."""
    return [(shape_label(s), spec.dummy_inputs(s, seed=seed + n)) for n, s in enumerate(sizes or parity_sizes(spec))]


def captured_cases(records: Sequence[Mapping[str, Any]], limit: int = 4) -> Cases:
    """Up to ``limit`` captured feeds spread over the records, labelled by their index."""
    if not records:
        return []
    step = max(1, len(records) // limit)
    return [(f"held-out#{i}", records[i]) for i in range(0, len(records), step)][:limit]


def compare_graph(
    reference: Session,
    candidate: Session,
    tolerance: Tolerance | None = None,
    sizes: Sequence[Sizes] | None = None,
    seed: int = 1234,
) -> list[Comparison]:
    """Run both sessions on the same seeded inputs at each size and compare every output."""
    spec = reference.spec
    tolerance = tolerance or tolerance_for(Precision.FP32, spec.kind)
    return compare_feeds(reference, candidate, seeded_cases(spec, sizes, seed), tolerance)


def compare_feeds(reference: Session, candidate: Session, cases: Cases, tolerance: Tolerance) -> list[Comparison]:
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
    cases: Cases,
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
    del reference
    gc.collect()  # the reference's weights go before the candidate's arrive
    rows = []
    with open_candidate() as candidate:
        for (label, feeds), want in zip(cases, expected, strict=True):
            got = candidate.infer(feeds)
            for name in spec.output_names:
                rows.append(judge(spec.name, label, name, want[name], got[name], tolerance))
            del got
    return rows


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
