"""Apply a saved field to an image or label map: ``python -m scripts.warp``.

``python -m scripts.warp --field F --moving M --output O [--fixed R] [--nearest]``

``F`` is either the bundle's disp file (``disp_*.nii.gz``: ``(H, W, D, 3)`` voxel units of the
fixed grid, see :mod:`scripts.geometry`) or its ITK displacement-field transform
(``itk_warp_*.nii.gz``: vector NIfTI, LPS mm). ``M`` is any 3D image that nibabel or ITK
reads, on its own grid; ``O`` is written on the field's (the fixed image's) grid and affine,
as NIfTI or, for other extensions, by ITK. ``--nearest`` for label maps (dtype kept);
otherwise linear interpolation, float32. ``--fixed`` checks that the field belongs to that
image's grid.

The inverse field (``inverse_disp_*.nii.gz`` or ``itk_inverse_warp_*.nii.gz``, written with
``save_inverse``) is the same kind of file with the roles swapped: it lies on the moving
image's grid and reads the fixed image. ``--field inverse_disp_F_M.nii.gz --moving
FIXED_IMAGE_OR_LABELS --output O [--fixed MOVING_IMAGE]`` brings fixed-space images and label
maps into the moving image's space (``--image`` and ``--reference`` name the same options
without the roles: the image to resample, the grid the field lies on).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .errors import InputError, exit_on_input_error
from .file_io import atomic_save_image, check_label_map, load_disp, read_image
from .geometry import check_overlap, same_grid, warp_to_fixed

__all__ = ["warp_file", "main"]

def warp_file(field: str, moving: str, output: str, fixed: str | None = None, nearest: bool = False) -> Path:
    """Resample ``moving`` onto the field's grid through the field; write ``output``; return its path."""
    disp, fixed_affine = load_disp(field, np.float32, itk_fields=True, channels_first=True)
    inverse = Path(field).name.startswith(("inverse_disp_", "itk_inverse_warp_"))
    if fixed:
        fixed_array, affine = read_image(fixed, "reference image")
        if not same_grid(affine, fixed_array.shape, fixed_affine, disp.shape[1:]):
            which = "the moving image's grid (an inverse field)" if inverse else "the fixed image's grid"
            raise InputError(f"{field} does not belong to {fixed}: their grids (shape and affine) differ; "
                             f"the field lies on {which}")
    moving_array, moving_affine = read_image(moving, "label map" if nearest else "image to warp")
    if nearest:
        check_label_map(moving_array, moving)
    check_overlap(fixed_affine, disp.shape[1:], field, moving_affine, moving_array.shape, moving)
    warped = warp_to_fixed(moving_array, moving_affine, disp, fixed_affine, nearest=nearest)
    try:
        return atomic_save_image(warped, fixed_affine, output)
    except OSError as e:
        raise InputError(f"{output}: cannot write ({e.strerror or e})") from None


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--field", required=True, help="disp_*.nii.gz or itk_warp_*.nii.gz written by inference "
                        "(or inverse_disp_*.nii.gz / itk_inverse_warp_*.nii.gz: fixed-space images into moving space)")
    parser.add_argument("--moving", "--image", dest="moving", required=True,
                        help="image or label map to warp (any grid, any format; the fixed image's for an inverse field)")
    parser.add_argument("--output", required=True, help="where to write it (on the field's grid)")
    parser.add_argument("--fixed", "--reference", dest="fixed", default=None,
                        help="optional: the image whose grid the field lies on (fixed image; moving image for an "
                             "inverse field), to check the field belongs to it")
    parser.add_argument("--nearest", action="store_true", help="nearest-neighbour interpolation (label maps)")
    args = parser.parse_args(argv)
    path = warp_file(args.field, args.moving, args.output, fixed=args.fixed, nearest=args.nearest)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
