"""A raw-scan pair with a known correspondence, made from one whole-head T1w scan (the test copy
of OpenNeuro ds000031 sub-01 in ``tests/data``): the "moving" scan is the original seen through
a random affine (rotations up to 15 degrees, translations up to 20 mm, scaling 0.9-1.1), a smooth
warp, another voxel grid and orientation, and another intensity scale."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.synthetic.raw_scan import SmoothWarp, grid_points, moving_grid, random_affine, sample  # noqa: F401

SCAN = Path(__file__).resolve().parent / "data" / "ds000031_sub-01_T1w_2mm.nii.gz"


def write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path
