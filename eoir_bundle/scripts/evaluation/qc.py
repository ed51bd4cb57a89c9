"""Quality-control pictures of a registration: images, differences, deformed grid, Jacobian.

Conventions (the bundle's): volumes are numpy ``(H, W, D)`` arrays in array-axis order (no
reorientation); a displacement ``ddf`` is ``(3, H, W, D)`` in voxel units, channel ``i`` =
array axis ``i``, and ``warped(p) = moving(p + ddf(p))`` (MONAI ``Warp``, zeros outside).

Slice display (every panel): the slice through the middle of axis ``k`` shows the two other
axes ``a < b``; axis ``a`` runs left to right and axis ``b`` bottom to top (voxel ``(0, 0)``
at the lower left, ``imshow(slice.T, origin="lower")``), so nothing is transposed or
flipped relative to the array. Panels are labelled with array-axis names ("axis 1"); when
an ``affine`` is given, the direction each axis increases towards (nibabel's
``aff2axcodes``, e.g. "axis 2 (->S)") is added and the voxel sizes set the aspect ratio.

Command line (``disp`` = a LUMIR displacement file, ``(H, W, D, 3)`` channels-last NIfTI,
the bundle's output format)::

    python -m scripts.qc --fixed F.nii.gz --moving M.nii.gz --disp disp_F_M.nii.gz --output qc.png

Python API: :func:`warp_image`, :func:`deformed_grid`,
:func:`qc_figure`, :func:`save_qc_png`, :func:`to_tensorboard_image`.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError, exit_on_input_error
from ..file_io import atomic_write, load_nifti
from ..file_io import load_disp
from .metrics import jacobian_determinant

__all__ = [
    "warp_image",
    "deformed_grid",
    "qc_figure",
    "save_qc_png",
    "to_tensorboard_image",
    "main",
]

_AXES = (0, 1, 2)


# --------------------------------------------------------------------------- inputs


def _as_numpy(x) -> np.ndarray:
    """numpy view of a numpy array, torch tensor or MONAI MetaTensor (any device)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch.Tensor / MetaTensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_volume(x, what: str) -> np.ndarray:
    """``(H, W, D)`` array from ``(H, W, D)``, ``(1, H, W, D)`` or ``(1, 1, H, W, D)``."""
    a = _as_numpy(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or min(a.shape) < 2:
        raise InputError(f"{what} must be a 3D volume (H, W, D), got shape {tuple(_as_numpy(x).shape)}")
    return a


def _as_ddf(ddf, shape: Sequence[int] | None = None) -> np.ndarray:
    """``(3, H, W, D)`` float32 from ``(3, H, W, D)`` or ``(1, 3, H, W, D)``; checked against ``shape``."""
    d = _as_numpy(ddf)
    while d.ndim > 4 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 4 or d.shape[0] != 3 or min(d.shape[1:]) < 2:
        raise InputError(f"ddf must have shape (3, H, W, D), got {tuple(_as_numpy(ddf).shape)}")
    if shape is not None and tuple(d.shape[1:]) != tuple(shape):
        raise InputError(f"ddf spatial shape {tuple(d.shape[1:])} does not match the image shape {tuple(shape)}")
    d = d.astype(np.float32, copy=False)
    if not np.isfinite(d).all():
        raise InputError(f"ddf contains {int((~np.isfinite(d)).sum())} NaN/Inf values")
    return d


# --------------------------------------------------------------------------- computations


def warp_image(moving, ddf, order: int = 1) -> np.ndarray:
    """``moving(p + ddf(p))`` with MONAI ``Warp`` (zeros outside the image).

    Args:
        moving: ``(H, W, D)`` volume (numpy or torch).
        ddf: ``(3, H, W, D)`` displacement, voxel units.
        order: 1 = (tri)linear, returns float32; 0 = nearest neighbour (label maps), returns
            ``moving``'s dtype.
    """
    import torch
    from monai.networks.blocks import Warp

    if order not in (0, 1):
        raise InputError(f"order must be 0 (nearest) or 1 (linear), got {order!r}")
    mov = _as_volume(moving, "moving image")
    d = _as_ddf(ddf, mov.shape)
    with warnings.catch_warnings():  # "Using PyTorch native grid_sample" on every construction
        warnings.simplefilter("ignore")
        warp = Warp(mode="bilinear" if order == 1 else "nearest", padding_mode="zeros")
    with torch.no_grad():
        img = torch.from_numpy(np.ascontiguousarray(mov, dtype=np.float32))[None, None]
        out = warp(img, torch.from_numpy(np.ascontiguousarray(d))[None])[0, 0].numpy()
    if order == 0:
        return out.astype(mov.dtype, copy=False)
    return out


def _plane(axis: int) -> tuple[int, int]:
    if axis not in _AXES:
        raise InputError(f"axis must be 0, 1 or 2, got {axis!r}")
    a, b = (ax for ax in _AXES if ax != axis)
    return a, b


def _take(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(vol, index, axis=axis)


def deformed_grid(ddf, axis: int, spacing: int = 8, index: int | None = None) -> list[np.ndarray]:
    """Lines of a regular grid in the slice through ``axis``, moved to ``p + ddf(p)``.

    The slice is ``index`` along ``axis`` (default: the middle, ``n // 2``) and shows the two
    other axes ``a < b``. Grid lines lie every ``spacing`` voxels (centred in the plane), and
    each line is sampled at every voxel. Only the two in-plane components of ``ddf`` are
    used (the out-of-plane one cannot be drawn).

    Returns:
        a list of ``(n_points, 2)`` float arrays, column 0 = coordinate along axis ``a``,
        column 1 = along axis ``b`` (voxel units), ready for ``ax.plot(l[:, 0], l[:, 1])``
        over an ``imshow(slice.T, origin="lower")``. First the lines along ``a`` (constant
        ``b`` before deformation), then the lines along ``b``.
    """
    d = _as_ddf(ddf)
    a, b = _plane(axis)
    n = d.shape[1 + axis]
    index = n // 2 if index is None else int(index)
    if not 0 <= index < n:
        raise InputError(f"slice index {index} outside 0..{n - 1} along axis {axis}")
    if int(spacing) < 1:
        raise InputError(f"grid spacing must be >= 1, got {spacing!r}")
    spacing = int(spacing)
    ua = _take(d[a], axis, index)  # (n_a, n_b)
    ub = _take(d[b], axis, index)
    na, nb = ua.shape
    pa, pb = np.meshgrid(np.arange(na, dtype=np.float64), np.arange(nb, dtype=np.float64), indexing="ij")
    qa, qb = pa + ua, pb + ub

    def positions(size: int) -> np.ndarray:
        return np.arange(((size - 1) % spacing) // 2, size, spacing)

    lines = [np.stack([qa[:, j], qb[:, j]], axis=1) for j in positions(nb)]
    lines += [np.stack([qa[i, :], qb[i, :]], axis=1) for i in positions(na)]
    return lines


# --------------------------------------------------------------------------- figure


def _axis_labels(affine) -> list[str]:
    names = [f"axis {i}" for i in _AXES]
    if affine is None:
        return names
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    return [f"{name} (\u2192{code})" if code else name for name, code in zip(names, codes)]


def _voxel_sizes(affine) -> np.ndarray:
    if affine is None:
        return np.ones(3)
    sizes = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return np.where(sizes > 0, sizes, 1.0)


def _intensity_window(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float]:
    step = max(1, (fixed.size + moving.size) // 2_000_000)
    sample = np.concatenate([fixed.ravel()[::step], moving.ravel()[::step]]).astype(np.float64)
    lo = 0.0 if sample.min() >= 0 else float(np.percentile(sample, 0.5))
    hi = float(np.percentile(sample, 99.5))
    if hi <= lo:
        hi = lo + (float(sample.max()) - lo or 1.0)
    return lo, hi


def qc_figure(
    fixed,
    moving,
    ddf,
    title: str | None = None,
    *,
    axes: Sequence[int] = _AXES,
    affine=None,
    grid_spacing: int = 8,
    dpi: int = 100,
    panel_inches: float = 2.4,
):
    """One figure showing a registration ``fixed <- moving`` by ``ddf``.

    Rows: the middle slices through array axis 0 (showing axis 1 horizontally, axis 2
    vertically), through axis 1 (axis 0 vs axis 2) and through axis 2 (axis 0 vs axis 1);
    ``axes`` picks and orders the rows. Which anatomical plane each is depends on the file
    orientation; pass ``affine`` to get the direction codes on the axis labels (for an RAS
    volume like MNI152 the rows are sagittal, coronal, axial).

    Columns:
        1. fixed; 2. moving; 3. warped moving (same grey scale, shared by the three);
        4. ``|fixed - moving|`` and 5. ``|fixed - warped|`` on the same colour scale, with the
        mean absolute difference over the whole volume in the titles;
        6. the deformed grid (``p + ddf(p)`` of a regular grid every ``grid_spacing`` voxels,
        in-plane components only) on a blank background;
        7. the Jacobian determinant (``RdBu_r``, 0..2, white = 1, colour bar), folding
        voxels (``J <= 0``) painted lime, with the folding percentage over the volume in the
        title.

    Returns a :class:`matplotlib.figure.Figure` built without pyplot (Agg canvas): nothing
    is shown, it is not kept in pyplot's figure list, and it is freed with its last reference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    fix = _as_volume(fixed, "fixed image").astype(np.float32, copy=False)
    mov = _as_volume(moving, "moving image").astype(np.float32, copy=False)
    if fix.shape != mov.shape:
        raise InputError(f"fixed image shape {fix.shape} does not match moving image shape {mov.shape}")
    d = _as_ddf(ddf, fix.shape)
    rows = [int(ax) for ax in axes]
    for ax in rows:
        _plane(ax)
    if not rows:
        raise InputError("axes must name at least one of 0, 1, 2")

    warped = warp_image(mov, d, order=1)
    jac = jacobian_determinant(d).astype(np.float32, copy=False)
    before, after = np.abs(fix - mov), np.abs(fix - warped)
    mae_before, mae_after = float(before.mean()), float(after.mean())
    folding = 100.0 * float((jac <= 0).mean())
    lo, hi = _intensity_window(fix, mov)
    dmax = float(np.percentile(before, 99.5)) or float(before.max()) or 1.0
    labels = _axis_labels(affine)
    vox = _voxel_sizes(affine)

    columns = [
        "fixed",
        "moving",
        "warped moving",
        f"|fixed \u2212 moving| (before)\nmean over volume {mae_before:.4g}",
        f"|fixed \u2212 warped| (after)\nmean over volume {mae_after:.4g}",
        f"deformed grid (every {grid_spacing} vox)",
        f"Jacobian det.\nfolding (J\u22640) {folding:.3g}%, min {float(jac.min()):.3g}",
    ]
    ncol = len(columns)
    fig = Figure(figsize=(panel_inches * ncol + 1.0, panel_inches * len(rows) + (0.9 if title else 0.6)), dpi=dpi,
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid_axes = fig.subplots(len(rows), ncol, squeeze=False)
    fold_cmap = ListedColormap(["lime"])
    grey = dict(cmap="gray", vmin=lo, vmax=hi)
    diff = dict(cmap="magma", vmin=0.0, vmax=dmax)
    im_diff = im_jac = None
    for r, axis in enumerate(rows):
        a, b = _plane(axis)
        idx = fix.shape[axis] // 2
        aspect = vox[b] / vox[a]
        panels = [
            (fix, grey),
            (mov, grey),
            (warped, grey),
            (before, diff),
            (after, diff),
            (None, None),
            (jac, dict(cmap="RdBu_r", vmin=0.0, vmax=2.0)),
        ]
        for c, (vol, style) in enumerate(panels):
            ax = grid_axes[r, c]
            na, nb = fix.shape[a], fix.shape[b]
            if vol is not None:
                im = ax.imshow(_take(vol, axis, idx).T, origin="lower", aspect=aspect, interpolation="nearest",
                               **style)
                if c == 3:
                    im_diff = im
                if c == 6:
                    im_jac = im
                    fold = _take(jac, axis, idx).T <= 0
                    if fold.any():
                        ax.imshow(np.ma.masked_where(~fold, fold.astype(np.float32)), origin="lower", aspect=aspect,
                                  cmap=fold_cmap, vmin=0, vmax=1, interpolation="nearest")
            else:  # deformed grid on blank
                for line in deformed_grid(d, axis, spacing=grid_spacing, index=idx):
                    ax.plot(line[:, 0], line[:, 1], color="tab:blue", linewidth=0.5)
                ax.set_xlim(-0.5, na - 0.5)
                ax.set_ylim(-0.5, nb - 0.5)
                ax.set_aspect(aspect)
            if r == 0:
                ax.set_title(columns[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(f"slice {idx} of axis {axis}\n{labels[b]}", fontsize=8)
                ax.set_xlabel(labels[a], fontsize=8)
                ax.tick_params(labelsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.colorbar(im_diff, ax=list(grid_axes[:, 4]), shrink=0.8, aspect=30, pad=0.01).ax.tick_params(labelsize=6)
    cbar = fig.colorbar(im_jac, ax=list(grid_axes[:, 6]), shrink=0.8, aspect=30, pad=0.01, extend="both")
    cbar.ax.tick_params(labelsize=6)
    cbar.set_label("det J (lime: J \u2264 0)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_qc_png(path: str | os.PathLike, fixed, moving, ddf, title: str | None = None, **kwargs) -> Path:
    """Render :func:`qc_figure` (Agg, no display) and write it to ``path`` as PNG, atomically.

    ``kwargs`` go to :func:`qc_figure` (``affine``, ``axes``, ``grid_spacing``, ``dpi``).
    """
    fig = qc_figure(fixed, moving, ddf, title=title, **kwargs)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    finally:
        fig.clear()  # not in pyplot's list: dropping the reference frees it


def to_tensorboard_image(fixed, moving, ddf, axis: int = 2, title: str | None = None, dpi: int = 80) -> np.ndarray:
    """``(3, H, W)`` uint8 RGB picture for ``SummaryWriter.add_image`` (``dataformats="CHW"``).

    A one-row :func:`qc_figure` (all seven columns) of the middle slice through ``axis``
    (default 2: shows axes 0 and 1, the largest plane of a 160 x 224 x 192 LUMIR image).
    Accepts torch tensors with leading batch/channel dims of 1 (``(1, 1, H, W, D)`` images,
    ``(1, 3, H, W, D)`` field).
    """
    fig = qc_figure(fixed, moving, ddf, title=title, axes=(axis,), dpi=dpi)
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))
    finally:
        fig.clear()


# --------------------------------------------------------------------------- command line


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.qc",
        description="Write a QC picture (images, differences, deformed grid, Jacobian) of one registration.",
    )
    parser.add_argument("--fixed", required=True, help="fixed image (NIfTI)")
    parser.add_argument("--moving", required=True, help="moving image (NIfTI)")
    parser.add_argument("--disp", required=True, help="displacement, LUMIR format: (H, W, D, 3) NIfTI, voxel units")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--title", default=None, help="figure title (default: the three file names)")
    parser.add_argument("--grid_spacing", type=int, default=8, help="deformed-grid line spacing in voxels")
    args = parser.parse_args(argv)

    fixed, affine = load_nifti(args.fixed, "fixed image")
    moving, _ = load_nifti(args.moving, "moving image")
    ddf, _ = load_disp(args.disp, np.float32, channels_first=True)
    if moving.shape != fixed.shape:
        raise InputError(
            f"{args.moving}: moving image shape {tuple(moving.shape)} differs from "
            f"the fixed image's {tuple(fixed.shape)}"
        )
    if ddf.shape[1:] != fixed.shape:
        raise InputError(
            f"{args.disp}: displacement shape {tuple(ddf.shape[1:]) + (3,)} does not fit the fixed image's "
            f"{tuple(fixed.shape)} (expected {tuple(fixed.shape) + (3,)})"
        )
    if args.grid_spacing < 1:
        raise InputError(f"--grid_spacing must be >= 1, got {args.grid_spacing}")
    names = (Path(args.fixed).name, Path(args.moving).name, Path(args.disp).name)
    title = args.title or "fixed {}   moving {}   disp {}".format(*names)
    out = save_qc_png(args.output, fixed, moving, ddf, title=title, affine=affine, grid_spacing=args.grid_spacing)
    print(out)
    return out


if __name__ == "__main__":
    main()
