"""Control fidelity: how well the edges of a generated image agree with the edges asked for."""

from __future__ import annotations

import numpy as np


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
