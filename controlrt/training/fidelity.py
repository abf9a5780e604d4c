"""Control fidelity: how well the edges of a generated image agree with the edges asked for."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def image_edges(image) -> np.ndarray:
    """The canny edges (100/200) of a generated image, as a boolean map."""
    from controlrt.runtime.preprocess import canny

    return np.asarray(canny(image))[:, :, 0] > 0


def scene_edges(scene) -> np.ndarray:
    """A shapes scene's canny condition, as a boolean map: what a generated image is compared with."""
    return np.asarray(scene.conditions["canny"])[:, :, 0] > 0


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` pixels (Euclidean) of a true pixel of ``mask``."""
    import cv2

    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    return distance <= tolerance


def edge_f1(edges: np.ndarray, target: np.ndarray, tolerance: int = 2) -> float:
    """F1 of two boolean edge maps, an edge pixel counting as matched within ``tolerance`` pixels.

    Precision: the share of ``edges`` pixels near a ``target`` pixel; recall: the share of
    ``target`` pixels near an ``edges`` pixel. 0 when either map is empty.
    """
    edges, target = np.asarray(edges, dtype=bool), np.asarray(target, dtype=bool)
    if edges.shape != target.shape:
        raise ValueError(f"edge maps differ in shape: {edges.shape} vs {target.shape}")
    if not edges.any() or not target.any():
        return 0.0
    precision = float((edges & _near(target, tolerance)).sum() / edges.sum())
    recall = float((target & _near(edges, tolerance)).sum() / target.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class FidelityReport:
    """Mean edge F1 over held-out scenes, per control setting (``off`` = every control at scale 0)."""

    scenes: int
    steps: int
    guidance: float
    f1: dict[str, float]

    def table(self) -> str:
        head = f"edge F1 (2-px tolerance), {self.scenes} held-out scenes, {self.steps} steps, guidance {self.guidance}"
        lines = [head]
        lines += [f"  {name:<10} {value:.3f}" for name, value in self.f1.items()]
        off = self.f1.get("off", 0.0)
        for name, value in self.f1.items():
            if name != "off" and off > 0:
                lines.append(f"  {name} / off = {value / off:.2f}x")
        return "\n".join(lines)


def measure(pipe, scenes: int = 16, steps: int = 20, guidance: float = 4.0, seed: int = 0) -> FidelityReport:
    """Control fidelity of a built model trained on shapes (``controlrt.training``).

    Each held-out scene (never drawn in training) gives its caption as the prompt and its maps as
    the controls, matched to the build's ControlNets by name (``canny``, ``seg``). Rows: each
    ControlNet alone at scale 1 (the others at 0), all of them together, and ``off`` (all at 0),
    same seeds. Edges of each output (canny, 100/200) are compared with the scene's canny edges.
    """
    from controlrt.errors import InputError
    from controlrt.runtime.request import GenerationRequest
    from controlrt.training import shapes

    names = pipe.controlnet_names
    unknown = [n for n in names if n not in shapes.CONDITIONS]
    if unknown:
        raise InputError(
            f"control fidelity needs ControlNets named after the shapes conditions {shapes.CONDITIONS}; "
            f"this build has {names}"
        )
    settings: dict[str, list[float]] = {name: [1.0 if n == name else 0.0 for n in names] for name in names}
    if len(names) > 1:
        settings["all"] = [1.0] * len(names)
    settings["off"] = [0.0] * len(names)
    totals = dict.fromkeys(settings, 0.0)
    for k in range(scenes):
        scene = shapes.sample(shapes.HELD_OUT + 1000 + k)
        target = scene_edges(scene)
        controls = [scene.conditions[name] for name in names]
        for label, scales in settings.items():
            request = GenerationRequest(
                prompt=scene.caption, controls=controls, scales=scales, steps=steps, guidance=guidance, seed=seed + k
            )
            image = pipe.generate(request).image
            totals[label] += edge_f1(image_edges(image), target) / scenes
    return FidelityReport(scenes, steps, guidance, totals)
