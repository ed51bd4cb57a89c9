"""Dictionary transforms the bundle adds to MONAI's: checks of loaded image pairs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import MapTransform

from .errors import InputError


class ValidateImagesd(MapTransform):
    """Check loaded images before they reach the network: 3D, finite, and all of one shape.

    Place it right after ``LoadImaged(..., ensure_channel_first=False)``. The error names the
    file (taken from ``{key}_path`` if present, else the image's ``filename_or_obj``).
    """

    def __init__(self, keys: Sequence[Hashable], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    @staticmethod
    def _name(d: Mapping, key: Hashable) -> str:
        if f"{key}_path" in d:
            return str(d[f"{key}_path"])
        meta = getattr(d[key], "meta", {}) or {}
        return str(meta.get("filename_or_obj", key))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        shapes = {}
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
            shapes[key] = (name, shape)
        if len({s for _, s in shapes.values()}) > 1:
            desc = ", ".join(f"{n} {s}" for n, s in shapes.values())
            raise InputError(f"images of different shapes: {desc}; they must share one grid")
        return d

