"""Dictionary transforms the bundle adds to MONAI's: checks of loaded image pairs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import MapTransform

from .errors import InputError
from .file_io import check_label_map, read_image
from .geometry import affine_of, check_affine, check_overlap, same_grid


class ValidateImagesd(MapTransform):
    """Check loaded images before they reach the network.

    Each image: 3D, finite, and an affine that places it in space. A pair: with
    ``same_grid`` (training, evaluation), one shape; otherwise (inference on users' scans) its
    world extents must overlap by ``min_overlap`` of the smaller one, or the two are not in
    one space (``min_overlap = 0``: not checked here, e.g. when preprocessing aligns the two
    first). Each image must hold more than one value (not blank, not constant). ``label_keys`` maps a key holding a label map's *path* to the key of its image:
    the label map must be integer and on that image's grid (it is read here only to check it).

    Place it right after ``LoadImaged(..., ensure_channel_first=False)``. The error names the
    file (taken from ``{key}_path`` if present, else the image's ``filename_or_obj``).
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        same_grid: bool = True,
        label_keys: Mapping[str, str] | None = None,
        min_overlap: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.same_grid = bool(same_grid)
        self.label_keys = dict(label_keys or {})
        self.min_overlap = float(min_overlap)

    @staticmethod
    def _name(d: Mapping, key: Hashable) -> str:
        if f"{key}_path" in d:
            return str(d[f"{key}_path"])
        meta = getattr(d[key], "meta", {}) or {}
        return str(meta.get("filename_or_obj", key))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        seen = {}
        for key in self.key_iterator(d):
            img, name = d[key], self._name(d, key)
            shape = tuple(img.shape)
            if len(shape) == 4 and shape[-1] == 1:
                shape = shape[:3]
            if len(shape) != 3:
                raise InputError(f"{name}: {key} image must be a 3D volume, got shape {shape}")
            bad = int((~torch.isfinite(torch.as_tensor(img))).sum()) if torch.is_floating_point(torch.as_tensor(img)) else 0
            if bad:
                raise InputError(f"{name}: {key} image contains {bad} NaN/Inf voxels")
            values = torch.as_tensor(img)
            if values.numel() and bool((values == values.reshape(-1)[0]).all()):
                what = "blank (all zero)" if float(values.reshape(-1)[0]) == 0 else f"constant (every voxel {float(values.reshape(-1)[0]):g})"
                raise InputError(f"{name}: {key} image is {what}: nothing to register")
            affine = check_affine(affine_of(img), name, getattr(img, "meta", None)) if hasattr(img, "affine") else None
            seen[key] = (name, shape, affine)
        if self.same_grid and len({s for _, s, _ in seen.values()}) > 1:
            desc = ", ".join(f"{n} {s}" for n, s, _ in seen.values())
            raise InputError(f"images of different shapes: {desc}; they must share one grid")
        if not self.same_grid and len(seen) == 2 and self.min_overlap > 0:
            (na, sa, aa), (nb, sb, ab) = seen.values()
            if aa is not None and ab is not None:
                check_overlap(aa, sa, na, ab, sb, nb, self.min_overlap)
        for label_key, image_key in self.label_keys.items():
            if d.get(label_key) and image_key in seen:
                self._check_label(str(d[label_key]), *seen[image_key])
        return d

    @staticmethod
    def _check_label(path: str, image_name: str, image_shape, image_affine) -> None:
        label, affine = read_image(path, "label map")
        check_label_map(label, path)
        if image_affine is not None and not same_grid(affine, label.shape, image_affine, image_shape):
            raise InputError(f"{path}: the label map is not on the grid (shape and affine) of its image {image_name}")
