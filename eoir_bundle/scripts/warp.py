"""Apply a saved field to an image or label map: ``python -m scripts.warp``.

``python -m scripts.warp --field F --moving M --output O [--fixed R] [--nearest]``

``F`` is either the bundle's disp file (``disp_*.nii.gz``: ``(H, W, D, 3)`` voxel units of the
fixed grid, see :mod:`scripts.geometry`) or its ITK displacement-field transform
(``itk_warp_*.nii.gz``: vector NIfTI, LPS mm). ``M`` is any 3D image that nibabel or ITK
reads, on its own grid; ``O`` is written on the field's (the fixed image's) grid and affine,
as NIfTI or, for other extensions, by ITK. ``--nearest`` for label maps (dtype kept);
otherwise linear interpolation, float32. ``--fixed`` checks that the field belongs to that
image's grid.
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
    if fixed:
        fixed_array, affine = read_image(fixed, "fixed image")
        if not same_grid(affine, fixed_array.shape, fixed_affine, disp.shape[1:]):
            raise InputError(f"{field} does not belong to {fixed}: their grids (shape and affine) differ")
    moving_array, moving_affine = read_image(moving, "label map" if nearest else "moving image")
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
    parser.add_argument("--field", required=True, help="disp_*.nii.gz or itk_warp_*.nii.gz written by inference")
    parser.add_argument("--moving", required=True, help="image or label map to warp (any grid, any format)")
    parser.add_argument("--output", required=True, help="where to write it (on the fixed grid)")
    parser.add_argument("--fixed", default=None, help="optional: the fixed image, to check the field belongs to it")
    parser.add_argument("--nearest", action="store_true", help="nearest-neighbour interpolation (label maps)")
    args = parser.parse_args(argv)
    path = warp_file(args.field, args.moving, args.output, fixed=args.fixed, nearest=args.nearest)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
