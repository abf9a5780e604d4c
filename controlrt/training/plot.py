"""The control-fidelity curve as a self-contained SVG (no plotting library needed)."""

from __future__ import annotations

from html import escape
from itertools import pairwise

_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def convergence_step(curve: list[dict]) -> int | None:
    """The step after the largest rise in fidelity between two evaluations: the sudden convergence."""
    if len(curve) < 2:
        return None
    rises = [(b["f1"] - a["f1"], b["step"]) for a, b in pairwise(curve)]
    rise, step = max(rises)
    return step if rise > 0 else None


def fidelity_svg(fidelity: dict[str, list[dict]], title: str, width: int = 640, height: int = 360) -> str:
    """One line per ControlNet: edge F1 on held-out scenes against training step."""
    left, right, top, bottom = 56, 16, 36, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    last = max((p["step"] for curve in fidelity.values() for p in curve), default=1) or 1
    top_f1 = max(0.6, *(p["f1"] for curve in fidelity.values() for p in curve))

    def x(step: float) -> float:
        return left + plot_w * step / last

    def y(f1: float) -> float:
        return top + plot_h * (1 - f1 / top_f1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for k in range(6):
        value = top_f1 * k / 5
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4}" text-anchor="end">{value:.2f}</text>')
        parts.append(f'<line x1="{left}" y1="{y(value)}" x2="{left + plot_w}" y2="{y(value)}" stroke="#ddd"/>')
    for k in range(6):
        step = last * k / 5
        parts.append(f'<text x="{x(step)}" y="{top + plot_h + 16}" text-anchor="middle">{step:.0f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">training step</text>')
    parts.append(
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">edge F1, held-out scenes</text>'
    )
    for k, (name, curve) in enumerate(fidelity.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        points = " ".join(f"{x(p['step']):.1f},{y(p['f1']):.1f}" for p in curve)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{left + 10}" y="{top + 16 + 16 * k}" fill="{colour}">{escape(name)} ControlNet</text>')
        step = convergence_step(curve)
        if step is not None:
            parts.append(
                f'<line x1="{x(step)}" y1="{top}" x2="{x(step)}" y2="{top + plot_h}" stroke="{colour}" '
                f'stroke-dasharray="4 3"/>'
            )
            parts.append(f'<text x="{x(step) + 4}" y="{top + plot_h - 8 - 14 * k}" fill="{colour}">step {step}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
