"""Warping, integration and trilinear resizing, computed a few rows at a time.

Displacements are ``(1, 3, D0, D1, D2)`` contiguous, in voxel units, as in ``EOIR``:
``warp(img, ddf)(p) = img(p + ddf(p))`` (trilinear, zero padding, ``align_corners=True``).

* Rows of ``warp(img, ddf)`` need only those rows of ``ddf`` (``img`` is whole), so warps
  run in slabs of rows (:func:`warp`, and the estimator's warped moving features). The
  sampling grid is made with the same float operations as MONAI's ``Warp``
  (:func:`grid_rows`): ``grid_sample`` gets bit-identical coordinates. Each call samples the
  two halves of axis 1 as a batch of two (:func:`scripts.layers.sample_in_halves`).
* Trilinear resizing with ``align_corners=True`` is separable: rows of the result are the
  axis-0 interpolation (PyTorch's own source indices and weights) of the axis-1/2
  interpolated source rows. The finest estimator gets the upsampled coarser field row by
  row (:func:`upsample_rows`), and ragged maps are downsampled by rows
  (:func:`downsample_map`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..layers import INTEGRATION_STEPS, sample_in_halves
from .maps import Map
from .memory import Buffer, cl_empty
from .streams import chunks


def grid_rows(ddf_rows: torch.Tensor, r0: int, shape: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """``grid_sample`` grid ``(1, d, H, W, 3)`` for output rows ``r0..`` of a displacement.

    The same float operations as MONAI's ``Warp``: ``(index + ddf) * 2 / (size - 1) - 1``,
    in ``(x, y, z) = (axis 2, axis 1, axis 0)`` order.
    """
    d, h, w = ddf_rows.shape[2:]
    grid = torch.empty((1, d, h, w, 3)) if out is None else out
    ranges = (torch.arange(r0, r0 + d), torch.arange(h), torch.arange(w))
    views = ((1, d, 1, 1), (1, 1, h, 1), (1, 1, 1, w))
    for i in range(3):
        g = grid[..., 2 - i]
        torch.add(ddf_rows[:, i], ranges[i].to(ddf_rows.dtype).view(views[i]), out=g)
        g.mul_(2).div_(max(shape[i] - 1, 1)).sub_(1)
    return grid


def warp(img: torch.Tensor, ddf: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """MONAI ``Warp(bilinear, zeros)(img, ddf)``, computed in runs of ``rows`` output rows."""
    shape = ddf.shape[2:]
    out = torch.empty(img.shape[:2] + shape, dtype=img.dtype)
    grid = Buffer()
    for r0, r1 in chunks(shape[0], rows):
        g = grid.plain(1, r1 - r0, shape[1], shape[2], 3)
        sample_in_halves(img, grid_rows(ddf[:, :, r0:r1], r0, shape, g), "bilinear", "zeros", out=out[:, :, r0:r1])
    return out


def integrate(v: torch.Tensor) -> torch.Tensor:
    """``DVF2DDF(7 steps, bilinear, zeros)``: ``u = v / 2**7``, then 7 times ``u = u + warp(u, u)``."""
    u = v / (2**INTEGRATION_STEPS)
    for _ in range(INTEGRATION_STEPS):
        w = warp(u, u)
        u = torch.add(u, w, out=w)  # u + warp(u, u), written over the warped copy
    return u


def _resize_rows(src, n_in: int, n_out: int, size_hw: Sequence[int], r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``F.interpolate(x, size=(n_out, *size_hw), mode="trilinear", align_corners=True)``.

    ``src(a, b)`` returns rows ``[a, b)`` of ``x``. Axis 0 is interpolated here with PyTorch's
    source index and weight (``src = r * (n_in - 1) / (n_out - 1)`` in float32, lower index
    ``floor(src)``, weight ``src - floor``), axes 1 and 2 by ``F.interpolate`` on the needed
    source rows (identity along axis 0); that is the nesting of PyTorch's trilinear kernel.
    """
    scale = torch.tensor((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, dtype=torch.float32)
    pos = scale * torch.arange(r0, r1, dtype=torch.float32)
    lo = pos.floor().long().clamp_max(n_in - 1)
    lam = (pos - lo.float()).clamp(0, 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    a, b = int(lo.min()), int(hi.max()) + 1
    planes = F.interpolate(src(a, b), size=(b - a, *size_hw), mode="trilinear", align_corners=True)
    lam = lam.view(1, 1, -1, 1, 1)
    return (1 - lam) * planes[:, :, lo - a] + lam * planes[:, :, hi - a]


def upsample_rows(u: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``EOIR.upsample_field(u) = 2 * trilinear_x2(u, align_corners=True)``."""
    n = u.shape[2]
    return 2.0 * _resize_rows(lambda a, b: u[:, :, a:b], n, 2 * n, (2 * u.shape[3], 2 * u.shape[4]), r0, r1)


def downsample_map(y: Map) -> torch.Tensor:
    """``EOIR.downsample`` of a ragged map, made by rows (see :func:`_resize_rows`)."""
    n_out, hw = y.depth // 2, (y.hw[0] // 2, y.hw[1] // 2)
    out = cl_empty(y.c, n_out, *hw)
    for r0, r1 in chunks(n_out, 4):
        out[:, :, r0:r1] = _resize_rows(y.read, y.depth, n_out, hw, r0, r1)
    return out
