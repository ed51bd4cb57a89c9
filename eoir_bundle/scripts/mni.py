"""The MNI ICBM152 2009 template (nilearn) on LUMIR's grid: the reference space of the data
the network was trained on, shared by the synthetic data (:mod:`scripts.synthetic`) and the
preprocessing of raw scans (:mod:`scripts.preprocessing`).

The MNI ICBM152 2009 (sym, 09a) 1 mm T1 template and its grey/white-matter probability maps
ship inside the ``nilearn`` wheel (no download); the T1 is skull-stripped (brain = non-zero).
LUMIR's grid is 160 x 224 x 192 voxels of 1 mm, RAS, centred on the template's brain bounding
box (:func:`full_template`); other grids keep that field of view (:func:`grid_affine`,
:func:`template_on_grid`) or its centre (:func:`centred_grid`). Affines map voxel centres to
MNI mm.

Licence: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University (free use with attribution).
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import numpy as np

from . import geometry

__all__ = [
    "FULL_SHAPE",
    "centred_grid",
    "full_template",
    "grid_affine",
    "resample",
    "template_on_grid",
    "tissue_classes",
    "world_coordinates",
]

FULL_SHAPE: tuple[int, int, int] = (160, 224, 192)
"""LUMIR's grid; the synthetic field of view is always this many mm."""
MAX_SIDE = 512


def _parse_shape(shape) -> tuple[int, int, int]:
    return geometry.parse_shape(shape, multiple_of=16, max_side=MAX_SIDE)


def _load_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The nilearn MNI152 2009 1 mm T1 (0..1, skull-stripped), GM, WM maps and their affine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=1)
        gm = datasets.load_mni152_gm_template(resolution=1)
        wm = datasets.load_mni152_wm_template(resolution=1)
    affine = np.asarray(t1.affine, dtype=np.float64)
    for img, what in ((gm, "GM"), (wm, "WM")):
        if img.shape != t1.shape or not np.allclose(img.affine, affine):
            raise RuntimeError(f"nilearn's MNI152 {what} map is not on the T1 template's grid")
    arrays = [np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32) for img in (t1, gm, wm)]
    return arrays[0], arrays[1], arrays[2], affine


def _crop_or_pad(vol: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``vol[start : start + shape]`` per axis, zero where that range leaves ``vol``."""
    out = np.zeros(tuple(shape), dtype=vol.dtype)
    src, dst = [], []
    for s, n, size in zip(start, shape, vol.shape):
        lo, hi = max(s, 0), min(s + n, size)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = vol[tuple(src)]
    return out


@functools.lru_cache(maxsize=1)
def full_template() -> dict:
    """Template on the 160x224x192 1 mm grid, plus the region boundaries (MNI mm)."""
    t1, gm, wm, affine = _load_mni()
    mask = t1 > 0  # the template is skull-stripped: brain = non-zero
    start = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        # centre the brain's bounding box: start + (F - 1) / 2 = (lo + hi) / 2
        start.append((int(idx[0]) + int(idx[-1]) - FULL_SHAPE[ax] + 1) // 2)
    shift = np.eye(4)
    shift[:3, 3] = start
    full_affine = affine @ shift
    t1c, gmc, wmc = (_crop_or_pad(v, start, FULL_SHAPE) for v in (t1, gm, wm))
    maskc = (t1c > 0).astype(np.float32)
    # region boundaries from the full-resolution tissue classes, in MNI mm
    tissue = tissue_classes(maskc, gmc, wmc)
    world = world_coordinates(full_affine, FULL_SHAPE)
    bounds = {}
    for cls, name in ((2, "gm"), (3, "wm")):
        sel = tissue == cls
        ys, zs = world[1][sel], world[2][sel]
        bounds[name] = (
            np.quantile(ys, [0.25, 0.5, 0.75]).astype(np.float64),
            np.quantile(zs, [0.5]).astype(np.float64),
        )
    return {"t1": t1c, "gm": gmc, "wm": wmc, "mask": maskc, "affine": full_affine, "bounds": bounds}


def tissue_classes(maskfrac: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background, 1 CSF, 2 GM, 3 WM: argmax of (CSF = brain - GM - WM, GM, WM) in the brain."""
    csf = np.clip(maskfrac - gm - wm, 0.0, None)
    tissue = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.int16)
    tissue[maskfrac < 0.5] = 0
    return tissue


def world_coordinates(affine: np.ndarray, shape: Sequence[int]) -> list[np.ndarray]:
    """MNI mm coordinates (x, y, z) of every voxel centre, each an array of ``shape`` (float32)."""
    idx = [np.arange(n, dtype=np.float64) for n in shape]
    out = []
    for r in range(3):
        c = affine[r, 3]
        acc = np.zeros(tuple(shape), dtype=np.float64) + c
        for a in range(3):
            if affine[r, a] != 0:
                view = [1, 1, 1]
                view[a] = shape[a]
                acc = acc + affine[r, a] * idx[a].reshape(view)
        out.append(acc.astype(np.float32))
    return out


def grid_affine(shape: Sequence[int]) -> np.ndarray:
    """Affine of the grid of ``shape`` over LUMIR's 160x224x192 mm field of view, MNI mm
    (voxels of ``160/H, 224/W, 192/D`` mm; each side a multiple of 16)."""
    shape = _parse_shape(shape)
    full = full_template()["affine"]
    s = np.array(FULL_SHAPE, dtype=np.float64) / np.array(shape, dtype=np.float64)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(s)
    scale[:3, 3] = (s - 1.0) / 2.0  # voxel centre y -> full-grid coordinate (y + 0.5) s - 0.5
    return full @ scale


def centred_grid(shape: Sequence[int], spacing: float = 1.0) -> np.ndarray:
    """RAS affine of a grid of ``shape`` voxels of ``spacing`` mm with LUMIR's grid centre
    (LUMIR's own affine for ``shape = FULL_SHAPE`` and 1 mm)."""
    shape = np.asarray(geometry.parse_shape(shape), dtype=np.float64)
    full = full_template()["affine"]
    centre = full[:3, :3] @ ((np.array(FULL_SHAPE, dtype=np.float64) - 1) / 2) + full[:3, 3]
    out = np.eye(4)
    out[:3, :3] = np.diag([float(spacing)] * 3)
    out[:3, 3] = centre - float(spacing) * (shape - 1) / 2
    return out


def resample(vols: Sequence[np.ndarray], shape: Sequence[int]) -> list[np.ndarray]:
    """Resample full-grid volumes to ``shape`` over the same field of view (area when shrinking)."""
    import torch
    import torch.nn.functional as F

    shape = tuple(shape)
    if shape == FULL_SHAPE:
        return [v.astype(np.float32, copy=True) for v in vols]
    x = torch.from_numpy(np.stack(vols).astype(np.float32))[None]
    with torch.no_grad():
        if all(n <= f for n, f in zip(shape, FULL_SHAPE)):
            y = F.adaptive_avg_pool3d(x, shape)
        else:
            y = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return [a.copy() for a in y[0].numpy()]


@functools.lru_cache(maxsize=4)
def _template_on_grid_cached(shape: tuple[int, int, int]) -> dict:
    full = full_template()
    t1, maskfrac, gm, wm = resample([full["t1"], full["mask"], full["gm"], full["wm"]], shape)
    out = {
        "t1": np.clip(t1, 0.0, 1.0).astype(np.float32),
        "maskfrac": maskfrac,
        "mask": maskfrac >= 0.5,
        "gm": gm,
        "wm": wm,
        "affine": grid_affine(shape),
    }
    for a in out.values():
        a.setflags(write=False)
    return out


def template_on_grid(shape: Sequence[int] = FULL_SHAPE) -> dict:
    """The template on the grid of ``shape`` over LUMIR's field of view (:func:`grid_affine`):
    ``t1`` (0..1), ``maskfrac`` (brain fraction per voxel), ``mask`` (``maskfrac >= 0.5``),
    ``gm``, ``wm`` (probabilities), ``affine``. Read-only arrays, cached."""
    return dict(_template_on_grid_cached(_parse_shape(shape)))
