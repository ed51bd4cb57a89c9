"""Does a scan need preprocessing? The ``"auto"`` rule of ``preprocess``.

A scan is used as it is (like LUMIR's images) only if it is both

- **brain-extracted**: a constant background (its most common value, and its minimum) fills at
  least ``MIN_EXTRACTED_BACKGROUND`` of the volume and the rest (the foreground) is at most
  ``MAX_BRAIN_ML`` millilitres (a head with skull, scalp and neck is well above; a brain, CSF
  included, below); and
- **MNI-aligned**: that foreground, placed in space by the file's header, overlaps the MNI152
  brain mask with Dice >= ``MIN_MNI_DICE`` (on a 2 mm grid). A scan of LUMIR's shape (160 x 224 x
  192) is also compared array to array with the template on LUMIR's grid (LUMIR files are
  MNI-aligned arrays, whatever their header's origin); the larger Dice counts.

Otherwise it is preprocessed. Every number is scale- and dtype-free (uint8, int16 scanner
units, float 0..1 or z-scores decide alike).
"""

from __future__ import annotations

import numpy as np

from ..mni import FULL_SHAPE, template_on_grid
from .intensity import background_value
from .morphology import dice

__all__ = ["MAX_BRAIN_ML", "MIN_EXTRACTED_BACKGROUND", "MIN_MNI_DICE", "WORK_SHAPE", "assess", "describe"]

MIN_EXTRACTED_BACKGROUND = 0.3
MAX_BRAIN_ML = 2500.0
MIN_MNI_DICE = 0.8
WORK_SHAPE = (80, 112, 96)  # 2 mm over LUMIR's field of view


def _sample_on(template_affine: np.ndarray, shape, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``mask`` (on the grid of ``affine``) at the voxel centres of a template grid (nearest)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")).reshape(3, -1)
    to_mask = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(template_affine, np.float64)
    idx = np.rint(to_mask[:3, :3] @ ijk + to_mask[:3, 3:]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(mask.shape).reshape(3, 1)), axis=0)
    out = np.zeros(idx.shape[1], dtype=bool)
    out[inside] = mask[tuple(idx[:, inside])]
    return out.reshape(tuple(shape))


def assess(array: np.ndarray, affine: np.ndarray) -> dict:
    """The ``auto`` rule's numbers for one scan: ``background_fraction``, ``foreground_ml``,
    ``brain_extracted``, ``mni_dice``, ``mni_aligned`` and ``preprocess`` (their verdict)."""
    x = np.asarray(array)
    if x.ndim == 4:
        x = x[0] if x.shape[0] == 1 else x[..., 0]
    value, fraction = background_value(x)
    is_min = value <= float(x.min())
    fg = x != value if is_min else np.ones(x.shape, dtype=bool)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, np.float64)[:3, :3]))) / 1000.0
    fg_ml = float(np.count_nonzero(fg)) * voxel_ml
    extracted = bool(is_min and fraction >= MIN_EXTRACTED_BACKGROUND and fg_ml <= MAX_BRAIN_ML)
    tmpl = template_on_grid(WORK_SHAPE)
    overlap = dice(_sample_on(tmpl["affine"], WORK_SHAPE, fg, affine), tmpl["mask"])
    if tuple(x.shape) == FULL_SHAPE:
        on_lumir = _sample_on(tmpl["affine"], WORK_SHAPE, fg, template_on_grid(FULL_SHAPE)["affine"])
        overlap = max(overlap, dice(on_lumir, tmpl["mask"]))
    aligned = bool(overlap >= MIN_MNI_DICE)
    return {
        "background_fraction": fraction,
        "foreground_ml": fg_ml,
        "brain_extracted": extracted,
        "mni_dice": overlap,
        "mni_aligned": aligned,
        "preprocess": not (extracted and aligned),
    }


def describe(found: dict) -> str:
    """One line: why ``auto`` decided as it did."""
    parts = [
        ("brain-extracted" if found["brain_extracted"] else "not brain-extracted")
        + f" (background {100 * found['background_fraction']:.0f}% of voxels, foreground {found['foreground_ml']:.0f} ml)",
        ("MNI-aligned" if found["mni_aligned"] else "not MNI-aligned")
        + f" (Dice with the MNI152 brain mask {found['mni_dice']:.2f})",
    ]
    return ", ".join(parts)
