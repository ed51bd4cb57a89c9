"""A scan seen through a known transform: random affines, smooth random warps, another voxel grid
and orientation, and sampling at world points.

Conventions: RAS world millimetres; a map ``y -> x`` sends a point of the new ("moving") scan's
world to the original scan's world, so ``moving(y) = scan(map(y))``; point sets are ``(3, n)``.
Used by ``tests/test_preprocessing.py`` (a raw pair with a known answer) and
:mod:`scripts.tools.affine_check` (how consistently preprocessing aligns a scan and its copies).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

__all__ = ["SmoothWarp", "grid_points", "moving_grid", "random_affine", "sample"]


def random_affine(rng: np.random.Generator, centre: np.ndarray, max_deg=15.0, max_mm=20.0, scale=(0.9, 1.1)) -> np.ndarray:
    """4 x 4 RAS map ``y -> x``: rotation (each axis up to ``max_deg``) and per-axis scaling about
    ``centre``, then a translation up to ``max_mm`` per axis."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    linear = rz @ ry @ rx @ np.diag(rng.uniform(*scale, 3))
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + rng.uniform(-max_mm, max_mm, 3)
    return out


class SmoothWarp:
    """``x -> x + w(x)``: a smooth random displacement (mm) on a coarse control grid over a world box."""

    def __init__(self, rng: np.random.Generator, lo, hi, max_mm: float = 4.0, grid=(7, 8, 8)):
        noise = gaussian_filter(rng.standard_normal((3, *grid)), sigma=(0, 1, 1, 1), mode="nearest")
        self.field = noise * (max_mm / np.sqrt((noise**2).sum(0)).max())
        self.lo, self.hi, self.grid = np.asarray(lo, float), np.asarray(hi, float), np.asarray(grid)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x``: (3, n) world points -> (3, n) displaced points."""
        idx = (x - self.lo[:, None]) / (self.hi - self.lo)[:, None] * (self.grid - 1)[:, None]
        return x + np.stack([map_coordinates(f, idx, order=1, mode="nearest") for f in self.field])


def grid_points(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")).reshape(3, -1)
    return affine[:3, :3] @ ijk + affine[:3, 3:]


def sample(array: np.ndarray, affine: np.ndarray, world: np.ndarray, shape, nearest=False) -> np.ndarray:
    """``array`` (on the grid of ``affine``) at ``world`` points, reshaped to ``shape``; 0 outside."""
    idx = np.linalg.inv(affine)[:3, :3] @ world + np.linalg.inv(affine)[:3, 3:]
    out = map_coordinates(array.astype(np.float32 if not nearest else array.dtype), idx, order=0 if nearest else 1,
                          mode="constant", cval=0)
    return out.reshape(tuple(shape))


def moving_grid(fixed_affine, fixed_shape, to_fixed: np.ndarray, spacing=1.8, margin_mm=10.0):
    """A grid in another orientation (axes permuted and flipped) and voxel size that holds the whole
    field of view of the fixed scan seen through ``inv(to_fixed)``."""
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in fixed_shape], indexing="ij")).reshape(3, -1)
    world = np.linalg.inv(to_fixed) @ np.vstack([fixed_affine[:3, :3] @ corners + fixed_affine[:3, 3:], np.ones(8)])
    lo, hi = world[:3].min(1) - margin_mm, world[:3].max(1) + margin_mm
    axes = [(2, -1.0), (0, 1.0), (1, -1.0)]  # array axis i runs along world axis a, direction sign: "ILP"-like
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    shape = []
    for i, (a, sign) in enumerate(axes):
        n = int(np.ceil((hi[a] - lo[a]) / spacing)) + 1
        affine[a, i] = sign * spacing
        affine[a, 3] = lo[a] if sign > 0 else lo[a] + (n - 1) * spacing
        shape.append(n)
    return affine, tuple(shape)
