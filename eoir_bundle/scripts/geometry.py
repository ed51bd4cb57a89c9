"""Image geometry: from any scan onto the network's 1 mm grid, and the field back onto the fixed scan.

Conventions:
    - an image's ``affine`` maps array indices ``p = (i, j, k)`` to world millimetres in
      **RAS** (nibabel's and MONAI's convention; MONAI's ITK reader converts ITK's LPS);
    - the network grid ``G`` is RAS, 1 mm, ``grid_shape`` voxels (LUMIR: 160 x 224 x 192),
      centred on the fixed image's foreground (skull-stripped brain) box;
    - a *disp* on the fixed grid is in voxel units of the fixed array axes: fixed voxel ``p``
      lands on world ``A_fixed @ (p + disp(p))``, which is read from the moving image at
      ``inv(A_moving) @ world``. When moving and fixed share one grid this is exactly the
      LUMIR / MONAI ``Warp`` convention ``warped(p) = moving(p + disp(p))``;
    - an ITK displacement-field transform holds, at each fixed voxel, the same displacement
      in physical **LPS** millimetres (what ``antsApplyTransforms`` and ITK's
      ``DisplacementFieldTransform`` add to the fixed point to find the moving point).

All resampling is MONAI's (``Orientation``, ``Spacing``, ``CropForeground``,
``ResizeWithPadOrCrop``, ``ResampleToMatch``, ``SpatialResample``, ``Resample``); this module
only composes the affines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CropForeground,
    MapTransform,
    Orientation,
    Resample,
    ResampleToMatch,
    ResizeWithPadOrCrop,
    Spacing,
    SpatialResample,
)

from .errors import InputError

__all__ = [
    "NETWORK_GRID_SHAPE",
    "ToNetworkGridd",
    "affine_of",
    "check_affine",
    "check_overlap",
    "field_to_fixed_grid",
    "field_to_native_grid",
    "is_shared_1mm_grid",
    "itk_displacement",
    "disp_from_itk_displacement",
    "moving_coordinates",
    "same_grid",
    "warp_to_fixed",
]

NETWORK_GRID_SHAPE = (160, 224, 192)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_TOL = 1e-4  # mm: affines closer than this are the same grid


def affine_of(image) -> np.ndarray:
    """The 4 x 4 float64 RAS affine of a MONAI ``MetaTensor`` (or an array-like 4 x 4)."""
    affine = image.affine if isinstance(image, MetaTensor) else image
    return np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64).reshape(4, 4)


def check_affine(affine: np.ndarray, name: str, meta: Mapping | None = None) -> np.ndarray:
    """Raise :class:`InputError` unless ``affine`` places the image in space (finite, invertible)."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise InputError(f"{name}: the image's affine (voxel-to-world matrix) is not finite: {affine.tolist()}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if spacing.min() <= 1e-6 or abs(np.linalg.det(affine[:3, :3])) <= 1e-9 * spacing.prod():
        raise InputError(f"{name}: the image has no usable affine (singular voxel-to-world matrix, spacing {spacing.tolist()})")
    if meta is not None and int(meta.get("qform_code", 1)) == 0 and int(meta.get("sform_code", 1)) == 0:
        raise InputError(
            f"{name}: the NIfTI header has no orientation (qform_code = sform_code = 0), so the image cannot be "
            "placed in space; set its qform/sform (e.g. with fslorient or nibabel)"
        )
    return affine


def _shape(image) -> tuple[int, ...]:
    return tuple(int(s) for s in image.shape[-3:])


def _world_box(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:]
    return world.min(1), world.max(1)


def check_overlap(affine_a, shape_a, name_a, affine_b, shape_b, name_b, min_fraction: float = 0.5) -> float:
    """Raise :class:`InputError` if the world boxes of two images overlap by less than
    ``min_fraction`` of the smaller box (they are then not in the same space); return the fraction."""
    (lo_a, hi_a), (lo_b, hi_b) = _world_box(affine_a, shape_a), _world_box(affine_b, shape_b)
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod()
    fraction = float(inter / min((hi_a - lo_a).prod(), (hi_b - lo_b).prod()))
    if fraction < min_fraction:
        raise InputError(
            f"{name_a} and {name_b}: the images barely overlap in space ({100 * fraction:.0f}% of the smaller "
            "field of view); both must be affinely aligned to the same (MNI) space first"
        )
    return fraction


def same_grid(affine_a, shape_a, affine_b, shape_b) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=_TOL, rtol=0)


def is_shared_1mm_grid(affine_a, shape_a, affine_b, shape_b) -> bool:
    """True when two images share one grid of 1 mm voxels (any orientation, any shape, e.g. a
    LUMIR pair): the network registers them as they are."""
    spacing = np.linalg.norm(np.asarray(affine_a)[:3, :3], axis=0)
    return same_grid(affine_a, shape_a, affine_b, shape_b) and np.allclose(spacing, 1.0, atol=1e-3, rtol=0)


class ToNetworkGridd(MapTransform):
    """Put a (moving, fixed) pair of channel-first ``MetaTensor`` images on the network's grid.

    A pair that already shares one 1 mm grid (a LUMIR pair, or any such pair) is passed through
    untouched, so it gives exactly the tensors of the plain pipeline. Otherwise the fixed image
    is reoriented to ``axcodes`` (``Orientation``), resampled to 1 mm (``Spacing``, linear),
    cropped to its foreground box (``CropForeground``: skull-stripped brains) and padded /
    cropped around that box's centre to ``grid_shape`` (``ResizeWithPadOrCrop``), and the
    moving image is resampled onto the result through both affines (``ResampleToMatch``,
    linear, zeros outside). ``axcodes`` and ``grid_shape`` are those of the training images
    (LUMIR: RAS, 160 x 224 x 192).

    Adds ``fixed_affine``, ``fixed_shape``, ``moving_affine``, ``moving_shape`` (the files'
    own geometry) and ``grid_affine`` (the network grid's) to the data dictionary.
    """

    def __init__(
        self,
        moving_key: str = "moving",
        fixed_key: str = "fixed",
        grid_shape: Sequence[int] = NETWORK_GRID_SHAPE,
        axcodes: str = "RAS",
    ) -> None:
        super().__init__([moving_key, fixed_key])
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.grid_shape = tuple(int(s) for s in grid_shape)
        if len(self.grid_shape) != 3 or min(self.grid_shape) < 16:
            raise InputError(f"network grid shape must be 3 sizes >= 16, got {list(grid_shape)}")
        self.to_grid = [
            Orientation(axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=1.0, mode="bilinear", padding_mode="zeros"),
            CropForeground(select_fn=lambda x: x > 0, allow_smaller=True),
            ResizeWithPadOrCrop(spatial_size=self.grid_shape),
        ]
        self.resample_moving = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        moving, fixed = d[self.moving_key], d[self.fixed_key]
        for key, img in ((self.moving_key, moving), (self.fixed_key, fixed)):
            d[f"{key}_affine"] = affine_of(img)
            d[f"{key}_shape"] = np.asarray(_shape(img))
        mk, fk = self.moving_key, self.fixed_key
        if not is_shared_1mm_grid(d[f"{mk}_affine"], d[f"{mk}_shape"], d[f"{fk}_affine"], d[f"{fk}_shape"]):
            for transform in self.to_grid:
                fixed = transform(fixed)
            fixed = fixed.to(torch.float32)
            moving = self.resample_moving(moving, img_dst=fixed)
        d[mk], d[fk], d["grid_affine"] = moving, fixed, affine_of(fixed)
        return d


def _as_meta(field: np.ndarray | torch.Tensor, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(np.asarray(field), dtype=torch.float64), affine=torch.as_tensor(affine))


def field_to_fixed_grid(ddf: np.ndarray, grid_affine, fixed_affine, fixed_shape) -> np.ndarray:
    """Bring a ``(3, *G)`` voxel field of the network grid onto the fixed image's grid.

    The displacement is turned into world millimetres, resampled component-wise at the fixed
    voxels (``SpatialResample``, linear, nearest value beyond the network grid's edge) and
    expressed in fixed voxel units. Returns ``(3, *fixed_shape)`` float32. Any target grid works
    the same way: the inverse field goes onto the moving image's grid with the moving affine.
    """
    grid_affine, fixed_affine = np.asarray(grid_affine, np.float64), np.asarray(fixed_affine, np.float64)
    world = np.einsum("ij,j...->i...", grid_affine[:3, :3], np.asarray(ddf, np.float64))
    on_fixed = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False, dtype=torch.float64)(
        _as_meta(world, grid_affine), dst_affine=torch.as_tensor(fixed_affine), spatial_size=tuple(int(s) for s in fixed_shape)
    )
    disp = np.einsum("ij,j...->i...", np.linalg.inv(fixed_affine[:3, :3]), np.asarray(on_fixed.array))
    return disp.astype(np.float32)


def field_to_native_grid(
    ddf: np.ndarray, grid_affine, fixed_affine, fixed_shape, mni_to_fixed=None, mni_to_moving=None, chunk: int = 16
) -> np.ndarray:
    """Compose a ``(3, *G)`` voxel field of the network grid with the two scans' affine
    alignments into one disp on the native fixed grid (module conventions).

    The network registered images resampled into a reference (MNI) space; ``mni_to_fixed`` and
    ``mni_to_moving`` are the 4 x 4 RAS-mm maps from that space to each scan's own world (its
    affine alignment; identity when ``None``). Fixed voxel ``p`` goes to MNI ``z =
    inv(mni_to_fixed) @ A_fixed @ p``, through the network's field there (trilinear, nearest
    value beyond the network grid's edge) to ``z'`` and on to the moving scan's world
    ``mni_to_moving @ z'``; the disp is that point in fixed voxel units, less ``p``. Returns
    ``(3, *fixed_shape)`` float32; computed ``chunk`` slices of the first axis at a time.
    """
    grid_affine = np.asarray(grid_affine, np.float64)
    fixed_affine = np.asarray(fixed_affine, np.float64)
    to_mni = np.linalg.inv(np.eye(4) if mni_to_fixed is None else np.asarray(mni_to_fixed, np.float64))
    to_moving = np.eye(4) if mni_to_moving is None else np.asarray(mni_to_moving, np.float64)
    fixed_to_grid = np.linalg.inv(grid_affine) @ to_mni @ fixed_affine  # fixed voxel -> grid voxel
    grid_to_fixed = np.linalg.inv(fixed_affine) @ to_moving @ grid_affine  # grid voxel -> fixed voxel
    field = torch.as_tensor(np.asarray(ddf, np.float32))[None]  # (1, 3, *G)
    size = torch.tensor([s - 1 for s in field.shape[2:]], dtype=torch.float64)
    shape = tuple(int(s) for s in fixed_shape)
    out = np.empty((3, *shape), np.float32)
    jk = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")).reshape(2, -1).astype(np.float64)
    for start in range(0, shape[0], max(1, int(chunk))):
        i = np.arange(start, min(start + chunk, shape[0]), dtype=np.float64)
        p = np.concatenate([np.repeat(i, jk.shape[1])[None], np.tile(jk, len(i))])  # (3, n) fixed voxels
        g = fixed_to_grid[:3, :3] @ p + fixed_to_grid[:3, 3:]
        norm = torch.as_tensor(g.T) * 2.0 / size.clamp(min=1) - 1.0  # align_corners=True: voxel centres
        with torch.no_grad():
            d = torch.nn.functional.grid_sample(
                field, norm.flip(-1).to(torch.float32).reshape(1, 1, 1, -1, 3), mode="bilinear",
                padding_mode="border", align_corners=True,
            )[0, :, 0, 0].numpy().astype(np.float64)
        q = grid_to_fixed[:3, :3] @ (g + d) + grid_to_fixed[:3, 3:]
        out[:, start:start + len(i)] = (q - p).reshape(3, len(i), shape[1], shape[2])
    return out


def moving_coordinates(disp: np.ndarray, fixed_affine, moving_affine) -> np.ndarray:
    """Moving-array coordinates ``inv(A_moving) @ A_fixed @ (p + disp(p))``, ``(3, *fixed_shape)``."""
    disp = np.asarray(disp, np.float64)
    index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in disp.shape[1:]], indexing="ij"))
    to_moving = np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(fixed_affine, np.float64)
    return np.einsum("ij,j...->i...", to_moving[:3, :3], index + disp) + to_moving[:3, 3].reshape(3, 1, 1, 1)


def warp_to_fixed(moving: np.ndarray, moving_affine, disp: np.ndarray, fixed_affine, nearest: bool = False) -> np.ndarray:
    """The moving image (or label map, ``nearest=True``) resampled onto the fixed grid by ``disp``.

    Linear interpolation returns float32; nearest keeps the input dtype. Zeros outside the moving
    image. ``disp`` is ``(3, *fixed_shape)`` in fixed voxel units (module conventions).
    """
    moving = np.asarray(moving)
    coords = moving_coordinates(disp, fixed_affine, moving_affine)
    centred = coords - (np.asarray(moving.shape, np.float64).reshape(3, 1, 1, 1) - 1) / 2  # MONAI Resample's frame
    resample = Resample(mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=False)
    source = torch.as_tensor(moving.astype(np.float32 if not nearest else np.float64))[None]
    out = np.asarray(resample(source, torch.as_tensor(centred)))[0]
    return out.astype(moving.dtype) if nearest else out.astype(np.float32)


def itk_displacement(disp: np.ndarray, fixed_affine) -> np.ndarray:
    """``(3, *shape)`` fixed-voxel disp -> ``(*shape, 3)`` physical LPS millimetres (ITK's field)."""
    linear = RAS_TO_LPS @ np.asarray(fixed_affine, np.float64)[:3, :3]
    return np.moveaxis(np.einsum("ij,j...->i...", linear, np.asarray(disp, np.float64)), 0, -1).astype(np.float32)


def disp_from_itk_displacement(vectors: np.ndarray, fixed_affine) -> np.ndarray:
    """Inverse of :func:`itk_displacement`: ``(*shape, 3)`` LPS mm -> ``(3, *shape)`` voxel disp."""
    linear = RAS_TO_LPS @ np.asarray(fixed_affine, np.float64)[:3, :3]
    return np.einsum("ij,j...->i...", np.linalg.inv(linear), np.moveaxis(np.asarray(vectors, np.float64), -1, 0)).astype(
        np.float32
    )


def parse_shape(shape, multiple_of: int = 1, max_side: int | None = None) -> tuple[int, int, int]:
    """``"H,W,D"`` (or ``HxWxD``) or a sequence of 3 ints -> ``(H, W, D)``; :class:`InputError`
    unless each side is a positive multiple of ``multiple_of`` (and at most ``max_side``)."""
    if isinstance(shape, str):
        try:
            values = [int(p.strip()) for p in shape.replace("x", ",").split(",")]
        except ValueError:
            raise InputError(f"--shape must be three integers H,W,D, got {shape!r}") from None
    else:
        try:
            values = [int(v) for v in shape]
        except (TypeError, ValueError):
            raise InputError(f"shape must be three integers, got {shape!r}") from None
        if any(int(v) != v for v in shape):
            raise InputError(f"shape must be three integers, got {shape!r}")
    if len(values) != 3:
        raise InputError(f"shape must have 3 sides H,W,D, got {len(values)}: {shape!r}")
    bad = [v for v in values if v <= 0 or v % multiple_of or (max_side is not None and v > max_side)]
    if bad:
        rule = "positive" if multiple_of == 1 else f"a positive multiple of {multiple_of}"
        limit = "" if max_side is None else f" and at most {max_side}"
        raise InputError(f"shape {tuple(values)}: every side must be {rule}{limit} (bad: {', '.join(map(str, bad))})")
    return tuple(values)  # type: ignore[return-value]
