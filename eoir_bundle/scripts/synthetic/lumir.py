"""Synthetic LUMIR-layout data set made from real anatomy (the MNI ICBM152 2009 template).

The MNI ICBM152 2009 (sym, 09a) 1 mm T1 template and its grey/white-matter probability maps
ship inside the ``nilearn`` wheel (no download). This module puts them on LUMIR's grid,
derives a deterministic label map and landmark volume from them, and makes "subjects" by
random smooth diffeomorphic warps plus intensity changes, written in the LUMIR layout::

    python -m scripts.make_synthetic_lumir OUT --subjects N --seed S [--shape H,W,D] [--val_subjects K]

writes, under ``OUT`` (ids are 4-digit LUMIR subject numbers):

- ``imagesTr/LUMIRMRI_{id:04d}_0000.nii.gz``: ids ``0..N-1`` (training, unlabelled) and
  ``N..N+K-1`` (labelled, for validation during training; their label maps are in
  ``SanityCheckLabelsTr/`` under the same file name);
- ``imagesVal/``, ``labelsVal/``, ``landmarksVal/``: the held-out evaluation subjects
  ``N+K..N+2K-1`` (image, label map, landmark volume; same file names);
- ``LUMIR_dataset.json`` (the real one's keys; ``test`` = consecutive evaluation pairs
  ``(fixed id+1, moving id)`` like LUMIR's), ``LUMIR_VAL_Segmentation_evaluation_config.json``
  and ``LUMIR_VAL_Landmark_evaluation_config.json`` (the official evaluation-config format),
  and ``labels.json`` (label and landmark names).

Images are uint8 (0..255, background exactly 0), label maps and landmark volumes uint8.
The same ``--seed`` gives the same arrays (subject ``id`` is drawn from the seed sequence
``[seed, id]``, so it does not depend on ``N`` either).

Grid: at the full shape 160 x 224 x 192 the template is cropped/padded at 1 mm around the
centre of its brain bounding box, the affine's translation adjusted so that MNI world
coordinates are unchanged. A smaller (or other) shape resamples that same 160 x 224 x 192 mm
field of view (area averaging when shrinking), so the whole brain stays in view; the affine
then has voxel sizes ``160/H, 224/W, 192/D`` mm and still maps voxel centres to MNI mm.

Displacement convention (MONAI ``Warp``, the bundle's): a ``ddf`` is ``(3, H, W, D)`` float32
in voxel units of the grid, channel ``i`` = array axis ``i``, and a subject is
``subject(p) = template(p + ddf(p))``. Labels and landmarks are warped with nearest
neighbour by the same ``ddf``.

Python API: :func:`template_volumes`, :func:`template_landmarks`, :func:`random_subject`,
:func:`make_dataset`, :func:`parse_shape`.
"""

from __future__ import annotations

import argparse
import functools
import json
import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, exit_on_input_error
from .. import geometry
from ..file_io import atomic_save_nifti, atomic_write_text, ensure_writable_dir
from ..mni import FULL_SHAPE, full_template, grid_affine, resample, tissue_classes, world_coordinates

logger = logging.getLogger(__name__)

DEFAULT_VAL_SUBJECTS = 4
MAX_SIDE = 512

# -- labels -------------------------------------------------------------------------------
_HEMIS = ("left", "right")
_Y_SLABS = ("posterior", "mid-posterior", "mid-anterior", "anterior")  # MNI y quartiles
_Z_SLABS = ("inferior", "superior")  # MNI z halves
_N_REGIONS = len(_HEMIS) * len(_Y_SLABS) * len(_Z_SLABS)  # per tissue (GM, WM): 16
CSF_LABELS = (1, 2)  # left, right
GM_FIRST = 3  # GM regions 3..18
WM_FIRST = GM_FIRST + _N_REGIONS  # WM regions 19..34
NUM_LABELS = WM_FIRST + _N_REGIONS - 1  # 34 (0 = background not counted)

# -- landmarks: approximate MNI152 mm coordinates of anatomically distinct points ---------
# Each is snapped to the nearest brain voxel of the grid (keeping blobs apart), so on coarse
# grids the blob sits a voxel or two from the nominal point.
LANDMARKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("anterior commissure", (0.0, 2.0, -4.0)),
    ("posterior commissure", (0.0, -26.0, -2.0)),
    ("genu of corpus callosum", (0.0, 28.0, 6.0)),
    ("splenium of corpus callosum", (0.0, -38.0, 10.0)),
    ("left thalamus", (-11.0, -18.0, 8.0)),
    ("right thalamus", (11.0, -18.0, 8.0)),
    ("left putamen", (-25.0, 2.0, 2.0)),
    ("right putamen", (25.0, 2.0, 2.0)),
    ("left hippocampus", (-27.0, -22.0, -14.0)),
    ("right hippocampus", (27.0, -22.0, -14.0)),
    ("pons", (0.0, -26.0, -34.0)),
    ("cerebellar vermis", (0.0, -62.0, -24.0)),
    ("left cerebellar hemisphere", (-30.0, -64.0, -32.0)),
    ("right cerebellar hemisphere", (30.0, -64.0, -32.0)),
    ("left precentral gyrus", (-38.0, -20.0, 56.0)),
    ("right precentral gyrus", (38.0, -20.0, 56.0)),
    ("left middle frontal gyrus", (-36.0, 36.0, 30.0)),
    ("right middle frontal gyrus", (36.0, 36.0, 30.0)),
    ("left occipital pole", (-16.0, -94.0, 6.0)),
    ("right occipital pole", (16.0, -94.0, 6.0)),
)
NUM_LANDMARKS = len(LANDMARKS)

# -- subject randomisation ----------------------------------------------------------------
_VELOCITY_GRID = (11, 15, 13)  # control grid over the 160x224x192 mm field of view (~16 mm)
_INTEGRATION_GRID = (41, 57, 49)  # scaling-and-squaring grid over the field of view (~4 mm)
_VELOCITY_SIGMA = 1.0  # Gaussian smoothing of the control-grid noise, control-grid voxels
_SS_STEPS = 7  # scaling and squaring steps
MAX_DISP_RANGE_MM = (2.0, 8.0)  # max |velocity| per subject, mm (= full-size voxels)
SCALE_RANGE = 0.05  # global affine: per-axis scaling 1 +- 5 %
ROTATION_DEG = 3.0  # global affine: rotation about each axis +- 3 degrees
GAMMA_RANGE = (0.7, 1.4)
BIAS_RANGE = (0.05, 0.2)  # max |log bias|
NOISE_RANGE = (0.005, 0.03)  # Gaussian noise sd, relative to the 0..1 intensity range


def lumir_name(subject: int) -> str:
    """LUMIR file name of subject number ``subject``: ``LUMIRMRI_0007_0000.nii.gz``."""
    return f"LUMIRMRI_{subject:04d}_0000.nii.gz"


def parse_shape(shape) -> tuple[int, int, int]:
    """A data set's grid: ``"H,W,D"`` or 3 ints, each a positive multiple of 16, at most 512
    (:func:`scripts.geometry.parse_shape`)."""
    return geometry.parse_shape(shape, multiple_of=16, max_side=MAX_SIDE)


def region_labels(tissue: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The 34-label map of tissue classes (0 bg, 1 CSF, 2 GM, 3 WM) on a grid with MNI
    ``affine``: CSF by hemisphere, GM/WM by hemisphere x MNI-y quartile x MNI-z half, with the
    template's region boundaries (the definition of :func:`template_volumes`)."""
    full = full_template()
    x, y, z = world_coordinates(affine, tissue.shape)
    hemi = (x >= 0).astype(np.int16)  # RAS: x < 0 is left
    labels = np.zeros(tissue.shape, dtype=np.int16)
    labels[tissue == 1] = CSF_LABELS[0] + hemi[tissue == 1]
    for cls, name, first in ((2, "gm", GM_FIRST), (3, "wm", WM_FIRST)):
        ybounds, zbounds = full["bounds"][name]
        yslab = np.searchsorted(ybounds, y, side="right").astype(np.int16)
        zslab = np.searchsorted(zbounds, z, side="right").astype(np.int16)
        region = first + hemi * (len(_Y_SLABS) * len(_Z_SLABS)) + yslab * len(_Z_SLABS) + zslab
        sel = tissue == cls
        labels[sel] = region[sel]
    return labels


@functools.lru_cache(maxsize=4)
def _template_cached(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    full = full_template()
    t1, maskfrac, gm, wm = resample([full["t1"], full["mask"], full["gm"], full["wm"]], shape)
    t1 = np.clip(t1, 0.0, 1.0).astype(np.float32)
    affine = grid_affine(shape)
    tissue = tissue_classes(maskfrac, gm, wm)
    labels = region_labels(tissue, affine)
    for a in (t1, labels, affine):
        a.setflags(write=False)
    return t1, labels, affine


def template_volumes(shape: Sequence[int] = FULL_SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 template on the synthetic grid of ``shape``.

    Returns ``(t1, labels, affine)``: ``t1`` float32 in ``[0, 1]`` (0 outside the brain),
    ``labels`` int16 (0 background, 1-2 CSF left/right, 3-18 GM and 19-34 WM regions: hemisphere
    x MNI-y quartile x MNI-z half; names in :func:`label_names`), ``affine`` (4x4, voxel -> MNI mm).
    Deterministic (no randomness). Raises :class:`InputError` for a bad shape.
    """
    t1, labels, affine = _template_cached(parse_shape(shape))
    return t1.copy(), labels.copy(), affine.copy()


def label_names() -> dict[int, str]:
    """``{label value: name}`` of the template label map, 0 = background included."""
    names = {0: "background"}
    for h, hemi in enumerate(_HEMIS):
        names[CSF_LABELS[h]] = f"CSF {hemi}"
    for tissue, first in (("GM", GM_FIRST), ("WM", WM_FIRST)):
        for h, hemi in enumerate(_HEMIS):
            for yi, yname in enumerate(_Y_SLABS):
                for zi, zname in enumerate(_Z_SLABS):
                    value = first + h * len(_Y_SLABS) * len(_Z_SLABS) + yi * len(_Z_SLABS) + zi
                    names[value] = f"{tissue} {hemi} {yname} {zname}"
    return names


@functools.lru_cache(maxsize=4)
def _landmarks_cached(shape: tuple[int, int, int]) -> np.ndarray:
    _, labels, affine = _template_cached(shape)
    inv = np.linalg.inv(affine)
    spacing = np.abs(np.diag(affine)[:3])
    brain = labels > 0
    blocked = np.zeros(shape, dtype=bool)
    out = np.zeros(shape, dtype=np.int16)
    for k, (_, mm) in enumerate(LANDMARKS, start=1):
        target = (inv @ np.array([*mm, 1.0]))[:3]
        centre = None
        for allowed in (brain & ~blocked, brain & (out == 0)):  # blobs apart; else centres apart
            centre = nearest_allowed(allowed, target, spacing)
            if centre is not None:
                break
        if centre is None:  # fewer brain voxels than landmarks: a degenerate grid
            raise InputError(f"shape {shape}: too coarse to place {NUM_LANDMARKS} landmarks")
        lo = [max(c - 1, 0) for c in centre]
        hi = [min(c + 2, n) for c, n in zip(centre, shape)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        free = out[box] == 0
        out[box][free] = k  # a blob never overwrites an earlier one
        out[centre] = k
        blo = [max(c - 2, 0) for c in centre]
        bhi = [min(c + 3, n) for c, n in zip(centre, shape)]
        blocked[tuple(slice(a, b) for a, b in zip(blo, bhi))] = True
    out.setflags(write=False)
    return out


def nearest_allowed(allowed: np.ndarray, target: np.ndarray, spacing: np.ndarray):
    """Index of the ``allowed`` voxel nearest (in mm) to voxel coordinate ``target``, or None."""
    shape = allowed.shape
    for radius in (6, 12, max(shape)):
        lo = [max(int(math.floor(t)) - radius, 0) for t in target]
        hi = [min(int(math.ceil(t)) + radius + 1, n) for t, n in zip(target, shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        sub = allowed[tuple(slice(a, b) for a, b in zip(lo, hi))]
        idx = np.argwhere(sub)
        if len(idx) == 0:
            continue
        pos = idx + np.array(lo)
        d2 = (((pos - target) * spacing) ** 2).sum(axis=1)
        # ties broken by index order (argwhere is C-ordered): deterministic
        best = pos[int(np.argmin(d2))]
        return tuple(int(v) for v in best)
    return None


def template_landmarks(shape: Sequence[int] = FULL_SHAPE) -> np.ndarray:
    """Landmark volume (int16) of the template on the grid of ``shape``: landmark ``k`` (1-based,
    ``LANDMARKS[k-1]``) is a 3x3x3 blob of value ``k`` centred on a brain voxel; 0 elsewhere."""
    return _landmarks_cached(parse_shape(shape)).copy()


def landmark_names() -> dict[int, dict]:
    """``{k: {"name", "mni_mm"}}`` for the landmark values ``1..NUM_LANDMARKS``."""
    return {k: {"name": n, "mni_mm": list(mm)} for k, (n, mm) in enumerate(LANDMARKS, start=1)}


# =========================================================================================
# Random subjects
# =========================================================================================


@functools.lru_cache(maxsize=1)
def _warp_layers():
    """``(DVF2DDF, bilinear Warp, nearest Warp)``, MONAI layers whose reference grid is cached."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample"
        from monai.networks.blocks import DVF2DDF, Warp

        class CachedGridWarp(Warp):
            """MONAI ``Warp`` with a working reference-grid cache (the same grid as MONAI's). MONAI
            1.6 compares the cached grid's ``shape[1:]`` (channels included) with the field's
            spatial shape, so it rebuilds the grid on every call (seconds at 160x224x192 on a CPU)."""

            _grids: dict = {}  # shared by all instances: (batch, spatial shape, dtype, device) -> grid

            def get_reference_grid(self, ddf, jitter=False, seed=0):
                if jitter:
                    return super().get_reference_grid(ddf, jitter=jitter, seed=seed)
                key = (ddf.shape[0], tuple(ddf.shape[2:]), ddf.dtype, ddf.device)
                grid = self._grids.get(key)
                if grid is None:
                    import torch

                    axes = [torch.arange(n, dtype=ddf.dtype, device=ddf.device) for n in ddf.shape[2:]]
                    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
                    grid = grid.expand(ddf.shape[0], -1, *ddf.shape[2:])
                    while len(self._grids) >= 3:  # a full-size grid is 80 MB: keep a few
                        self._grids.pop(next(iter(self._grids)))
                    self._grids[key] = grid
                return grid

        ss = DVF2DDF(num_steps=_SS_STEPS, mode="bilinear", padding_mode="border")
        ss.warp_layer = CachedGridWarp(mode="bilinear", padding_mode="border")
        return (
            ss,
            CachedGridWarp(mode="bilinear", padding_mode="zeros"),
            CachedGridWarp(mode="nearest", padding_mode="zeros"),
        )


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        if rng < 0:
            raise InputError(f"seed must be >= 0, got {rng}")
        return np.random.default_rng(int(rng))
    if isinstance(rng, (list, tuple)):
        return np.random.default_rng(list(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def _upsample(coarse: np.ndarray, shape: Sequence[int]):
    """``(C, h, w, d)`` control grid spanning the field of view -> ``(1, C, *shape)`` torch, trilinear."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None]
    return F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)


def random_ddf(shape: Sequence[int], rng=0, max_disp: float | None = None, affine: bool = True) -> np.ndarray:
    """A random smooth diffeomorphic displacement field on the synthetic grid of ``shape``.

    A stationary velocity field (Gaussian-smoothed noise on a ~16 mm control grid, max |v| =
    ``max_disp`` mm, default uniform in ``MAX_DISP_RANGE_MM``) is upsampled to a ~4 mm
    integration grid spanning the field of view and integrated there by scaling and squaring
    (MONAI ``DVF2DDF``); the result is composed exactly with a small global affine ``A``
    (per-axis scaling 1 +- 5 %, rotations +- 3 degrees about the centre of the field of view),
    ``phi(p) = A(p + u(p))``, and upsampled (trilinear) to ``shape``. The same ``rng`` state
    gives (nearly) the same physical deformation at any ``shape``.

    Returns ``ddf`` (3, H, W, D) float32 in voxel units of ``shape``, channel i = array axis i,
    ``phi(p) = p + ddf(p)``.
    """
    import torch
    from scipy.ndimage import gaussian_filter

    rng = _as_rng(rng)
    shape = tuple(int(n) for n in shape)
    spacing = np.array(FULL_SHAPE, dtype=np.float64) / np.array(shape, dtype=np.float64)  # mm per voxel
    # integration grid: corners on the corner voxel centres of ``shape`` (align_corners=True)
    grid = np.array(_INTEGRATION_GRID, dtype=np.float64)
    grid_spacing = (np.array(shape) - 1) * spacing / (grid - 1)  # mm between integration points
    amp = float(rng.uniform(*MAX_DISP_RANGE_MM)) if max_disp is None else float(max_disp)
    noise = rng.standard_normal((3, *_VELOCITY_GRID))
    noise = gaussian_filter(noise, sigma=(0, _VELOCITY_SIGMA, _VELOCITY_SIGMA, _VELOCITY_SIGMA), mode="nearest")
    peak = float(np.sqrt((noise**2).sum(axis=0)).max())
    v_mm = noise * (amp / peak if peak > 0 else 0.0)
    v_int = _upsample(v_mm / grid_spacing.reshape(3, 1, 1, 1), _INTEGRATION_GRID)  # integration-grid voxels
    ss, _, _ = _warp_layers()
    with torch.no_grad():
        u = ss(v_int)[0].numpy().astype(np.float64)
    u_mm = u * grid_spacing.reshape(3, 1, 1, 1)
    if affine:
        scales = 1.0 + rng.uniform(-SCALE_RANGE, SCALE_RANGE, size=3)
        angles = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, size=3))
        u_mm = _compose_affine(u_mm, _rotation(angles) @ np.diag(scales), grid_spacing)
    ddf = _upsample(u_mm / spacing.reshape(3, 1, 1, 1), shape)
    return ddf[0].numpy()


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _compose_affine(u_mm: np.ndarray, m: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Displacement (mm) of ``p -> C + M (p + u(p) - C)``, ``C`` the centre of the grid."""
    shape = u_mm.shape[1:]
    rel = []  # positions relative to the centre, mm
    for a in range(3):
        view = [1, 1, 1]
        view[a] = shape[a]
        rel.append(((np.arange(shape[a]) - (shape[a] - 1) / 2.0) * spacing[a]).reshape(view))
    q = [rel[a] + u_mm[a] for a in range(3)]
    return np.stack([m[r, 0] * q[0] + m[r, 1] * q[1] + m[r, 2] * q[2] - rel[r] for r in range(3)])


def random_subject(
    t1: np.ndarray,
    labels: np.ndarray | None,
    landmarks: np.ndarray | None = None,
    rng=0,
    *,
    max_disp: float | None = None,
    affine: bool = True,
    intensity: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
    """One synthetic subject from the template volumes (of :func:`template_volumes` /
    :func:`template_landmarks`, on the synthetic grid of their shape).

    ``rng``: a numpy ``Generator`` or an int seed >= 0. ``max_disp``: max velocity magnitude in
    mm (default random in 2..8); ``affine``: also a small global affine (scaling +- 5 %,
    rotation +- 3 degrees); ``intensity``: smooth bias field, gamma 0.7..1.4, Gaussian noise
    (else only the warped template rescaled to 1..255).

    Returns ``(image, labels, landmarks, ddf)``: ``image`` uint8 (background 0, warped brain
    >= 1); ``labels`` / ``landmarks`` warped with nearest neighbour, in the input's dtype (None
    where the input is None, which also skips that work); ``ddf`` float32 ``(3, H, W, D)`` in
    voxel units with ``subject(p) = template(p + ddf(p))`` (MONAI ``Warp`` convention, channel
    i = array axis i). ``p -> p + ddf(p)`` is a diffeomorphism (positive Jacobian).
    """
    import torch

    t1 = np.asarray(t1, dtype=np.float32)
    discrete = [None if d is None else np.asarray(d) for d in (labels, landmarks)]
    if t1.ndim != 3 or any(d is not None and d.shape != t1.shape for d in discrete):
        shapes = ", ".join(str(None if d is None else d.shape) for d in discrete)
        raise InputError(f"random_subject: t1, labels, landmarks must be 3D of one shape, got {t1.shape}, {shapes}")
    rng = _as_rng(rng)
    shape = t1.shape
    ddf = random_ddf(shape, rng, max_disp=max_disp, affine=affine)
    _, warp_lin, warp_nn = _warp_layers()
    ddf_t = torch.from_numpy(ddf)[None]
    present = [d for d in discrete if d is not None]
    with torch.no_grad():
        warped = warp_lin(torch.from_numpy(t1)[None, None], ddf_t)[0, 0].numpy()
        if present:  # one nearest-neighbour pass for labels and landmarks together
            stack = torch.from_numpy(np.stack([d.astype(np.float32) for d in present]))[None]
            warped_discrete = list(warp_nn(stack, ddf_t)[0].numpy())
    outputs = []
    for d in discrete:
        outputs.append(None if d is None else np.rint(warped_discrete.pop(0)).astype(d.dtype))
    image = _intensity(warped, rng, shape) if intensity else to_uint8(np.clip(warped, 0, None), warped > 1e-6)
    return image, outputs[0], outputs[1], ddf


def _intensity(warped: np.ndarray, rng: np.random.Generator, shape) -> np.ndarray:
    """Smooth multiplicative bias, gamma, Gaussian noise inside the foreground; uint8."""
    fg = warped > 1e-6
    x = np.clip(warped, 0.0, None).astype(np.float32)
    bias_amp = rng.uniform(*BIAS_RANGE)
    coarse = rng.standard_normal((1, 4, 4, 4))
    coarse *= bias_amp / max(float(np.abs(coarse).max()), 1e-6)
    bias = np.exp(_upsample(coarse, shape)[0, 0].numpy())
    x *= bias
    peak = float(x.max()) if fg.any() else 1.0
    x /= max(peak, 1e-6)
    gamma = float(np.exp(rng.uniform(np.log(GAMMA_RANGE[0]), np.log(GAMMA_RANGE[1]))))
    np.power(x, np.float32(gamma), out=x)
    sd = rng.uniform(*NOISE_RANGE)
    x += rng.standard_normal(shape, dtype=np.float32) * np.float32(sd)
    return to_uint8(x, fg)


def to_uint8(x: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Rescale foreground by its 99.9th percentile to 1..255; background exactly 0."""
    out = np.zeros(x.shape, dtype=np.uint8)
    if not fg.any():
        return out
    vals = x[fg]
    top = float(np.quantile(vals, 0.999))
    scaled = np.rint(np.clip(vals / max(top, 1e-6), 0.0, 1.0) * 255.0)
    out[fg] = np.clip(scaled, 1, 255).astype(np.uint8)
    return out


# =========================================================================================
# Data set
# =========================================================================================


def write_evaluation_files(out: Path, shape, eval_pairs: list[dict], names: dict[int, str], description: str,
                           landmarks: bool = True) -> None:
    """Write ``labels.json`` and the two official-format evaluation configs (Dice/HD95 over
    ``names``, TRE on ``landmarks``, NDV) for ``eval_pairs`` of images of ``shape``
    (``landmarks=False``: no landmark config and no landmark definitions)."""
    common = {
        "expected_shape": [*shape, 3],
        "eval_pairs": eval_pairs,
        "eval_config_version": 0.0,
        "masked_evaluation": False,
    }
    seg_config = {
        "name": "LUMIR",
        "evaluation_methods": [
            {"name": "Non-diffeomorphic Volumes", "metric": "ndv"},
            {"name": "DSC", "metric": "dice", "labels": sorted(names)},
            {"name": "HD95", "metric": "hd95", "labels": sorted(names)},
        ],
        **common,
    }
    lm_config = {
        "name": "LUMIR",
        "evaluation_methods": [
            {"name": "Non-diffeomorphic Volumes", "metric": "ndv"},
            {"name": "TRE_lm", "metric": "tre", "dest": "landmarks"},
        ],
        **common,
    }
    labels_doc = {
        "description": description,
        "labels": {str(v): name for v, name in names.items()},
    }
    if landmarks:
        labels_doc["landmarks"] = {str(v): d for v, d in landmark_names().items()}
    atomic_write_text(json.dumps(labels_doc, indent=4) + "\n", out / "labels.json")
    atomic_write_text(json.dumps(seg_config, indent=4) + "\n", out / "LUMIR_VAL_Segmentation_evaluation_config.json")
    if landmarks:
        atomic_write_text(json.dumps(lm_config, indent=4) + "\n", out / "LUMIR_VAL_Landmark_evaluation_config.json")


def make_dataset(
    out_dir,
    subjects: int,
    seed: int,
    shape: Sequence[int] = FULL_SHAPE,
    val_subjects: int = DEFAULT_VAL_SUBJECTS,
) -> Path:
    """Write the synthetic LUMIR-layout data set under ``out_dir``; return its ``LUMIR_dataset.json``.

    ``subjects`` training images (ids ``0..N-1``), ``val_subjects`` labelled training-time
    validation images (ids ``N..N+K-1``, labels in ``SanityCheckLabelsTr/``) and
    ``val_subjects`` held-out evaluation subjects (ids ``N+K..N+2K-1`` in ``imagesVal/``,
    ``labelsVal/``, ``landmarksVal/``), evaluated as ``K-1`` consecutive pairs.
    Raises :class:`InputError` for bad arguments.
    """
    shape = parse_shape(shape)
    n, k = check_count(subjects, "subjects", 1), check_count(val_subjects, "val_subjects", 2)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    out = ensure_writable_dir(out_dir)

    t1, labels, affine = template_volumes(shape)
    landmarks = template_landmarks(shape)
    train_ids = list(range(n))
    val_ids = list(range(n, n + k))
    eval_ids = list(range(n + k, n + 2 * k))
    jobs = [(i, "training") for i in train_ids] + [(i, "validation") for i in val_ids]
    jobs += [(i, "evaluation") for i in eval_ids]

    t0 = time.perf_counter()
    for count, (sid, role) in enumerate(jobs, start=1):
        rng = np.random.default_rng([int(seed), sid])
        image, seg, lms, _ = random_subject(
            t1, None if role == "training" else labels, landmarks if role == "evaluation" else None, rng
        )
        name = lumir_name(sid)
        if role == "evaluation":
            atomic_save_nifti(image, affine, out / "imagesVal" / name, np.uint8)
            atomic_save_nifti(seg, affine, out / "labelsVal" / name, np.uint8)
            atomic_save_nifti(lms, affine, out / "landmarksVal" / name, np.uint8)
        else:
            atomic_save_nifti(image, affine, out / "imagesTr" / name, np.uint8)
            if role == "validation":
                atomic_save_nifti(seg, affine, out / "SanityCheckLabelsTr" / name, np.uint8)
        elapsed = time.perf_counter() - t0
        eta = elapsed / count * (len(jobs) - count)
        logger.info("subject %d/%d %s (%s) done, %.1fs elapsed, ETA %.1fs", count, len(jobs), name, role, elapsed, eta)

    names = label_names()
    pairs = [(eval_ids[j + 1], eval_ids[j]) for j in range(len(eval_ids) - 1)]
    dataset = {
        "name": "LUMIR-synthetic",
        "release": "synthetic",
        "description": (
            "Synthetic LUMIR-layout data set: random smooth diffeomorphic warps and intensity changes of "
            f"the MNI ICBM152 2009 1 mm template (nilearn), seed {int(seed)}, shape {list(shape)}."
        ),
        "license": "MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging "
        "Centre, Montreal Neurological Institute, McGill University (free use with attribution)",
        "reference": "Fonov et al., NeuroImage 54 (2011) 313-327; Fonov et al., NeuroImage 47 (2009) S102.",
        "pairings": "unpaired",
        "provided_data": {"0": ["image"]},
        "modality": {"0": "T1w Brain MRI"},
        "labels": {str(v): name for v, name in names.items()},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(shape)},
        "numTraining": n,
        "training": [{"image": f"/imagesTr/{lumir_name(i)}"} for i in train_ids],
        "numValidation": k,
        "validation": [
            {"image": f"/imagesTr/{lumir_name(i)}", "seg": f"/SanityCheckLabelsTr/{lumir_name(i)}"} for i in val_ids
        ],
        "numTest": len(pairs),
        "test": [{"fixed": f"/imagesVal/{lumir_name(f)}", "moving": f"/imagesVal/{lumir_name(m)}"} for f, m in pairs],
    }
    eval_pairs = [{"fixed": f"./imagesVal/{lumir_name(f)}", "moving": f"./imagesVal/{lumir_name(m)}"} for f, m in pairs]
    write_evaluation_files(
        out, shape, eval_pairs, names,
        "Label maps: tissue classes of the MNI152 GM/WM probability maps, GM and WM split by "
        "hemisphere (MNI x < 0 is left), MNI-y quartile and MNI-z half. Landmarks: 3x3x3 blobs of value k "
        "near the given approximate MNI coordinates.",
    )
    return atomic_write_text(json.dumps(dataset, indent=4) + "\n", out / "LUMIR_dataset.json")


@contextlib.contextmanager
def progress_to_stderr(log: logging.Logger):
    """Within the block, ``log``'s INFO lines go to stderr as bare messages (CLI progress)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)


def check_count(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"--{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_synthetic_lumir",
        description="Write a synthetic LUMIR-layout data set made from the MNI152 template (nilearn).",
    )
    parser.add_argument("out", help="output folder (created if needed)")
    parser.add_argument("--subjects", type=int, required=True, help="number of training images N")
    parser.add_argument("--seed", type=int, required=True, help="random seed (>= 0); same seed, same data")
    parser.add_argument("--shape", default=",".join(map(str, FULL_SHAPE)), help="H,W,D, multiples of 16")
    parser.add_argument(
        "--val_subjects",
        type=int,
        default=DEFAULT_VAL_SUBJECTS,
        help="K labelled validation images and K held-out evaluation subjects (>= 2)",
    )
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    check_count(args.subjects, "subjects", 1)
    check_count(args.val_subjects, "val_subjects", 2)
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    with progress_to_stderr(logger):  # one line per subject
        path = make_dataset(args.out, args.subjects, args.seed, shape, args.val_subjects)
    print(path)
    return path


if __name__ == "__main__":
    main()
