"""Binary masks in millimetres: balls, dilation, erosion, majority filter, components, the brain
envelope, Dice."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["ball", "dice", "dilate", "envelope", "erode", "largest_component", "majority"]


def ball(radius_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on a grid of ``spacing`` mm (a single voxel below one voxel)."""
    r = [max(int(np.floor(radius_mm / s)), 0) for s in spacing]
    grids = np.meshgrid(*[np.arange(-n, n + 1) * s for n, s in zip(r, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2 + 1e-6


def _box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` grown by ``margin`` voxels per axis, clipped to the array
    (``None`` for an empty mask)."""
    if not mask.any():
        return None
    box = []
    for axis, m in enumerate(margin):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - m, 0), min(int(hit[-1]) + m + 1, mask.shape[axis])))
    return tuple(box)


def _morph(op, mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """``op`` (binary dilation or erosion) by the ball of ``radius_mm`` on the bounding box of
    ``mask`` grown by the ball's radius and one voxel: the same voxels as on the whole array
    (outside the box the mask is empty and stays so), in a fraction of the time."""
    mask = np.asarray(mask, dtype=bool)
    b = ball(radius_mm, spacing)
    if b.size == 1:
        return mask.copy()
    out = np.zeros_like(mask)
    box = _box(mask, [n // 2 + 1 for n in b.shape])
    if box is not None:
        out[box] = op(mask[box], b)
    return out


def dilate(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return _morph(binary_dilation, mask, radius_mm, spacing)


def erode(mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """Outside the array counts as background (as ``scipy.ndimage.binary_erosion``)."""
    from scipy.ndimage import binary_erosion

    return _morph(binary_erosion, mask, radius_mm, spacing)


def majority(mask: np.ndarray) -> np.ndarray:
    """3 x 3 x 3 median filter of a binary mask: at least 14 of the 27 voxels set, edges reflected
    (the voxels of ``scipy.ndimage.median_filter(mask, 3)``, by a separable box sum: ten times faster)."""
    from scipy.ndimage import uniform_filter

    return uniform_filter(np.asarray(mask, dtype=np.float32), size=3, mode="reflect") * 27.0 >= 13.5


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
