"""Check an inference run's inverse field and Jacobian map on a pair: a developer tool.

    python -m scripts.tools.inverse_check --output_dir OUT --fixed F --moving M [--moving_label ML]

Reads ``OUT/disp_{f}_{m}.nii.gz``, ``inverse_disp_...`` and ``jacdet_...`` (written by
``configs/inference.json`` with ``save_inverse`` and ``save_jacobian``) and prints, as JSON:

* ``inverse_consistency``: median and 95th percentile, over the fixed image's brain (``F > 0``),
  of ``|inverse(p + disp(p)) + disp(p)|`` in fixed voxels
  (:func:`scripts.evaluation.metrics.inverse_consistency`, any two grids);
* ``jacobian`` (with ``--moving_label``): per label ``k`` of the moving label map, the mean of
  ``jacdet`` over the fixed voxels that the map sends into ``k`` (the warped label map, read
  from ``warped_label_...`` or made here) against the ratio of ``k``'s volume in the moving
  image to that region's volume (mm^3); the relative error's median and maximum over the
  labels of at least ``--min_voxels`` fixed voxels, and the same for the whole brain. Where the
  fixed field of view does not cover the whole moving brain (a cut scan), only the moving
  voxels it reaches count (those the inverse field sends into a fixed voxel's cell): the map
  cannot bring the rest anywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..disp_writer import disp_name
from ..errors import exit_on_input_error
from ..evaluation.metrics import inverse_consistency
from ..file_io import load_disp, read_image
from ..geometry import warp_to_fixed


def reachable(inverse: np.ndarray, moving_affine, fixed_affine, fixed_shape) -> np.ndarray:
    """Moving voxels whose inverse lands inside the fixed grid's voxel cells (``[-0.5, n - 0.5]``
    per axis): the part of the moving image that the fixed grid's map reaches."""
    q = np.indices(inverse.shape[1:], dtype=np.float64) + inverse
    to_fixed = np.linalg.inv(np.asarray(fixed_affine, np.float64)) @ np.asarray(moving_affine, np.float64)
    p = np.einsum("ij,j...->i...", to_fixed[:3, :3], q) + to_fixed[:3, 3].reshape(3, 1, 1, 1)
    upper = np.reshape(fixed_shape, (3, 1, 1, 1)) - 0.5
    return np.all((p >= -0.5) & (p <= upper), axis=0)


def region_volume_check(jacdet: np.ndarray, warped_label: np.ndarray, fixed_affine, moving_label: np.ndarray,
                        moving_affine, min_voxels: int = 500) -> dict:
    """Per label ``k``: mean ``jacdet`` over ``warped_label == k`` against
    ``volume_moving(k) / volume(warped_label == k)`` (mm^3); summary of the relative errors."""
    fixed_voxel = abs(np.linalg.det(np.asarray(fixed_affine)[:3, :3]))
    moving_voxel = abs(np.linalg.det(np.asarray(moving_affine)[:3, :3]))
    n = int(max(warped_label.max(), moving_label.max())) + 1
    count_w = np.bincount(warped_label.ravel().astype(np.int64), minlength=n)
    count_m = np.bincount(moving_label.ravel().astype(np.int64), minlength=n)
    sum_j = np.bincount(warped_label.ravel().astype(np.int64), weights=jacdet.ravel().astype(np.float64), minlength=n)
    per = {}
    for k in range(1, n):
        if count_w[k] >= min_voxels:
            mean_j = sum_j[k] / count_w[k]
            ratio = count_m[k] * moving_voxel / (count_w[k] * fixed_voxel)
            per[k] = {"mean_jacdet": mean_j, "volume_ratio": ratio, "rel_error": mean_j / ratio - 1.0}
    brain = warped_label > 0
    mean_brain = float(jacdet[brain].mean())
    ratio_brain = float((moving_label > 0).sum() * moving_voxel / (brain.sum() * fixed_voxel))
    errs = np.abs([v["rel_error"] for v in per.values()])
    return {
        "labels": len(per),
        "rel_error_median": float(np.median(errs)) if len(errs) else float("nan"),
        "rel_error_max": float(errs.max()) if len(errs) else float("nan"),
        "brain": {"mean_jacdet": mean_brain, "volume_ratio": ratio_brain, "rel_error": mean_brain / ratio_brain - 1.0},
        "per_label": per,
    }


def check(output_dir: str, fixed: str, moving: str, moving_label: str | None = None, min_voxels: int = 500) -> dict:
    out = Path(output_dir)
    name = disp_name(fixed, moving)
    disp, fixed_affine = load_disp(out / name, np.float64, channels_first=True)
    fixed_img, _ = read_image(fixed, "fixed image")
    result: dict = {"pair": name[len("disp_"):-len(".nii.gz")]}
    inverse_path = out / ("inverse_" + name)
    inverse = None
    if inverse_path.is_file():
        inverse, moving_affine = load_disp(inverse_path, np.float64, channels_first=True)
        err = inverse_consistency(disp, inverse, fixed_affine, moving_affine)[fixed_img > 0]
        result["inverse_consistency"] = {"median": float(np.median(err)), "p95": float(np.percentile(err, 95)),
                                         "max": float(err.max()), "voxels": int(err.size)}
    jac_path = out / name.replace("disp_", "jacdet_", 1)
    if moving_label and jac_path.is_file():
        jacdet, _ = read_image(jac_path, "Jacobian map")
        labels, moving_affine = read_image(moving_label, "label map")
        warped_path = out / name.replace("disp_", "warped_label_", 1)
        if warped_path.is_file():
            warped, _ = read_image(warped_path, "warped label map")
        else:
            warped = warp_to_fixed(labels, moving_affine, disp, fixed_affine, nearest=True)
        if inverse is not None:
            reach = reachable(inverse, moving_affine, fixed_affine, disp.shape[1:])
            result["moving_brain_reached"] = float(reach[labels > 0].mean())
            labels = np.where(reach, labels, 0)
        result["jacobian"] = region_volume_check(jacdet, warped, fixed_affine, labels, moving_affine, min_voxels)
    return result


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--moving_label", default=None)
    parser.add_argument("--min_voxels", type=int, default=500)
    parser.add_argument("--per_label", action="store_true", help="also print every label's numbers")
    args = parser.parse_args(argv)
    result = check(args.output_dir, args.fixed, args.moving, args.moving_label, args.min_voxels)
    if not args.per_label and "jacobian" in result:
        result["jacobian"].pop("per_label")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
