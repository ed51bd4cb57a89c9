"""``Preprocessd``: the inference pipeline's preprocessing step (config id ``preprocess``).

Placed after ``EnsureChannelFirstd`` and before :class:`scripts.geometry.ToNetworkGridd`. Per
image of the pair, ``preprocess``:

- ``"on"``: :func:`scripts.preprocessing.pipeline.preprocess_scan` (N4, affine to MNI152, brain
  extraction, 0..255): the image becomes the preprocessed one on the MNI output grid;
- ``"off"``: the image stays on its grid and only its intensities go onto LUMIR's scale
  (:func:`scripts.preprocessing.intensity.rescale_to_lumir`; an image already holding whole
  numbers 0..255 is passed on untouched, so LUMIR's files give exactly what they gave before);
- ``"auto"`` (default): ``"on"`` unless :func:`scripts.preprocessing.assess.assess` finds the
  image brain-extracted and MNI-aligned; the decision and its numbers are logged per image.

When either image of a pair is preprocessed, the item also gets ``mni_to_fixed`` and
``mni_to_moving`` (4 x 4 RAS-mm maps from MNI to each scan's own world; identity for an image
used as it is) and ``{fixed,moving}_native_affine`` / ``_native_shape`` (the files' grids), from
which :func:`native_field` composes the network's field into one disp on the native fixed grid.
Otherwise the two images must overlap in space (``min_overlap``, as
:func:`scripts.geometry.check_overlap`).

Every item gets ``preprocess_seconds``: the time spent preprocessing its images (0 for images used
as they are or met before), which :class:`scripts.disp_writer.DispWriter` logs with each pair.

A scan met again in the same process (the same voxels, affine and settings: one atlas in every
pair, a LUMIR-style list where each scan is in two pairs) is preprocessed once
(:func:`scripts.preprocessing.pipeline.cached_preprocess_scan`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from ..errors import InputError
from ..geometry import NETWORK_GRID_SHAPE, affine_of, check_overlap, field_to_native_grid
from .assess import assess, describe
from .intensity import rescale_to_lumir
from .pipeline import cached_preprocess_scan

__all__ = ["MODES", "Preprocessd", "native_field", "preprocessed"]

MODES = ("auto", "on", "off")
logger = logging.getLogger("eoir.inference")


def _mode(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value).strip().lower()
    if mode not in MODES:
        raise InputError(f"preprocess must be one of {', '.join(MODES)}, got {value!r}")
    return mode


class Preprocessd(MapTransform):
    """See the module docstring. ``keys``: the pair's image keys (channel-first ``MetaTensor``s),
    named in messages by ``{key}_path`` when present; ``grid_shape``: the MNI output grid (the
    network's); ``n4``: bias correction on or off."""

    def __init__(
        self,
        keys: Sequence[Hashable] = ("moving", "fixed"),
        preprocess: str = "auto",
        grid_shape: Sequence[int] = NETWORK_GRID_SHAPE,
        min_overlap: float = 0.5,
        n4: bool = True,
    ) -> None:
        super().__init__(keys)
        self.mode = _mode(preprocess)
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.min_overlap = float(min_overlap)
        self.n4 = bool(n4)

    @staticmethod
    def _name(d: Mapping, key: Hashable) -> str:
        if f"{key}_path" in d:
            return str(d[f"{key}_path"])
        return str((getattr(d[key], "meta", {}) or {}).get("filename_or_obj", key))

    def _decide(self, array: np.ndarray, affine: np.ndarray, name: str, key) -> bool:
        if self.mode != "auto":
            logger.info(f"{name}: preprocessing {self.mode} (preprocess={self.mode})")
            return self.mode == "on"
        found = assess(array, affine)
        verdict = "on" if found["preprocess"] else "off"
        logger.info(f"{name}: preprocessing {verdict} (auto: {key} image {describe(found)})")
        return found["preprocess"]

    def _preprocess(self, array: np.ndarray, affine: np.ndarray, name: str) -> tuple[dict, bool]:
        result, reused = cached_preprocess_scan(array, affine, name, self.grid_shape, n4=self.n4)
        q = result["quality"]
        how = "preprocessed before in this process, result reused" if reused else f"preprocessed in {result['seconds']:.1f} s"
        logger.info(f"{name}: {how} (brain Dice with the MNI152 mask {q['brain_dice']:.3f}, brain {q['brain_ml']:.0f} ml)")
        return result, reused

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        native, seconds = {}, 0.0
        for key in self.key_iterator(d):
            img, name = d[key], self._name(d, key)
            array = np.asarray(convert_to_numpy(img))
            array = array[0] if array.ndim == 4 else array
            affine = affine_of(img)
            meta = {"filename_or_obj": (getattr(img, "meta", {}) or {}).get("filename_or_obj", name)}
            if self._decide(array, affine, name, key):
                result, reused = self._preprocess(array, affine, name)
                seconds += 0.0 if reused else float(result["seconds"])
                d[key] = MetaTensor(torch.from_numpy(result["image"].copy())[None], affine=torch.as_tensor(result["affine"]),
                                    meta=meta)
                native[key] = (result["mni_to_scan"], affine, array.shape)
            else:
                scaled = rescale_to_lumir(array)
                if scaled is not array:
                    d[key] = MetaTensor(torch.from_numpy(scaled)[None], affine=torch.as_tensor(affine), meta=meta)
                native[key] = (None, affine, array.shape)
        d["preprocess_seconds"] = seconds
        if any(m is not None for m, _, _ in native.values()):
            for key, (matrix, affine, shape) in native.items():
                d[f"mni_to_{key}"] = np.eye(4) if matrix is None else np.asarray(matrix, np.float64)
                d[f"{key}_native_affine"] = np.asarray(affine, np.float64)
                d[f"{key}_native_shape"] = np.asarray(shape)
        elif self.min_overlap > 0 and len(native) == 2:
            (ka, (_, aa, sa)), (kb, (_, ab, sb)) = native.items()
            check_overlap(aa, sa, self._name(d, ka), ab, sb, self._name(d, kb), self.min_overlap)
        return d


def preprocessed(item: Mapping) -> bool:
    """True when the item went through :class:`Preprocessd` with at least one image preprocessed."""
    return "mni_to_fixed" in item and "mni_to_moving" in item


def native_field(field: np.ndarray, item: Mapping, role: str = "fixed", affine: np.ndarray | None = None) -> np.ndarray:
    """A ``(3, *G)`` field of the network grid of a preprocessed item as one field ``(3, *shape)``
    on the native grid of the ``role`` image, the two affines composed in
    (:func:`scripts.geometry.field_to_native_grid`). ``role="fixed"``: the forward disp, native
    fixed points to native moving points; ``role="moving"``: the inverse field (on the network
    grid it maps moving points to fixed ones), native moving points to native fixed points.
    ``affine``: the role image's native affine (default: the item's)."""
    other = "moving" if role == "fixed" else "fixed"
    get = lambda k: np.asarray(convert_to_numpy(item[k]), dtype=np.float64)  # noqa: E731
    affine = get(f"{role}_native_affine") if affine is None else np.asarray(affine, np.float64)
    shape = tuple(int(s) for s in get(f"{role}_native_shape"))
    return field_to_native_grid(field, get("grid_affine"), affine, shape, get(f"mni_to_{role}"), get(f"mni_to_{other}"))
