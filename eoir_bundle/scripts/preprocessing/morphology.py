"""Binary masks in millimetres: balls, dilation, erosion, components, the brain envelope, Dice."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["ball", "dice", "dilate", "envelope", "erode", "largest_component"]


def ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on a grid of ``spacing`` mm (a single voxel below one voxel)."""
    r = [max(int(np.floor(radius_mm / s)), 0) for s in spacing]
    grids = np.meshgrid(*[np.arange(-n, n + 1) * s for n, s in zip(r, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-6


def dilate(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    b = ball(radius_mm, spacing)
    return binary_dilation(mask, b) if b.size > 1 else mask.copy()


def erode(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    b = ball(radius_mm, spacing)
    return binary_erosion(mask, b) if b.size > 1 else mask.copy()


def largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import label

    lab, n = label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def envelope(tissue: np.ndarray, spacing) -> np.ndarray:
    """Largest component of ``tissue``, closed by 3 mm, holes filled."""
    from scipy.ndimage import binary_closing, binary_fill_holes

    brain = largest_component(tissue)
    close = ball(3.0, spacing)
    if close.size > 1:
        pad = max(close.shape) // 2 + 1
        brain = binary_closing(np.pad(brain, pad), close)[pad:-pad, pad:-pad, pad:-pad]
    return binary_fill_holes(brain)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0
