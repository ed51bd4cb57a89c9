"""Ignite handler that writes each registration: the LUMIR disp file and, on request, more.

Always: ``{output_dir}/disp_{fixed_id}_{moving_id}.nii.gz``; float32 array of shape
``(*fixed.shape, 3)`` (channels last), in voxel units of the fixed image's array axes, with
the fixed image's affine: fixed voxel ``p`` lands on world ``A_fixed @ (p + disp(p))``, read
from the moving image through its own affine (on one shared grid: ``warped(p) = moving(p +
disp(p))``, the LUMIR convention). A field computed on the network's grid (see
:class:`scripts.geometry.ToNetworkGridd`) is brought back onto the fixed image's grid first.

On request (same stem after the prefix): ``warped_...`` the moving image (linear, float32),
``warped_label_...`` its label map (nearest, dtype kept), ``itk_warp_...`` the ITK
displacement-field transform (LPS mm, vector NIfTI) for ``antsApplyTransforms`` / ITK.

Preprocessed pairs (:mod:`scripts.preprocessing.transform`): the field is composed with the two
scans' affine alignments to MNI into one disp on the native fixed grid, and the alignments are
written as ``affine_fixed_{fixed_id}.mat`` and ``affine_moving_{moving_id}.mat`` (ITK affine
transforms, MNI -> scan: ``antsApplyTransforms -r MNI_IMAGE -i SCAN -t affine_....mat`` puts the
scan in MNI space). Every file is written atomically; when the run ends the output folder's
contents are logged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from .file_io import (
    atomic_save_image,
    atomic_save_itk_affine,
    atomic_save_itk_displacement,
    atomic_save_nifti,
    ensure_writable_dir,
    is_nibabel_file,
    pair_stem,
    read_image,
    subject_id,
)
from .geometry import field_to_fixed_grid, itk_displacement, same_grid, warp_to_fixed
from .evaluation.qc import save_qc_png
from .preprocessing.transform import native_disp, preprocessed


def disp_name(fixed_path: str, moving_path: str) -> str:
    """``disp_{fixed_id}_{moving_id}.nii.gz`` (LUMIR 4-digit ids, else file stems)."""
    return f"disp_{pair_stem(fixed_path, moving_path)}.nii.gz"


def affine_names(fixed_path: str, moving_path: str) -> tuple[str, str]:
    """``(affine_fixed_{fixed_id}.mat, affine_moving_{moving_id}.mat)``: a preprocessed pair's alignments."""
    return f"affine_fixed_{subject_id(fixed_path)}.mat", f"affine_moving_{subject_id(moving_path)}.mat"


class DispWriter:
    """Write ``engine.state.output[i][pred_key]`` for every pair of an evaluator's batch.

    Args:
        output_dir: folder for the disp files (created; checked writable at construction).
        pred_key: key of the ``(3, H, W, D)`` field in the decollated output.
        log_every: log one progress line (pair, seconds, ETA) every this many pairs.
        save_qc: also write ``qc_{fixed_id}_{moving_id}.png`` (orthogonal slices of fixed,
            moving, warped moving, differences, deformed grid, Jacobian determinant), from the
            batch's ``image`` (channel 0 moving, 1 fixed) on the network's grid.
        save_warped: also write the warped moving image on the fixed grid.
        save_itk_transform: also write the ITK displacement-field transform.
        Items whose ``moving_label`` is a path also get the warped label map.
    """

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        log_every: int = 1,
        save_qc: bool = False,
        save_warped: bool = False,
        save_itk_transform: bool = False,
    ) -> None:
        self.output_dir = ensure_writable_dir(output_dir)
        self.pred_key = pred_key
        self.save_qc = bool(save_qc)
        self.save_warped = bool(save_warped)
        self.save_itk_transform = bool(save_itk_transform)
        self.log_every = max(1, int(log_every))
        self.logger = logging.getLogger("eoir.inference")
        self.written: list[Path] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._list_output)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        self.written = []

    def __call__(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, dict):  # evaluator with decollate=False
            raise ValueError("DispWriter needs the evaluator's decollated output (decollate=True)")
        for out, item in zip(outputs, batch):
            fixed_path, moving_path = str(item["fixed_path"]), str(item["moving_path"])
            ddf = convert_to_numpy(out[self.pred_key]).astype(np.float32)
            disp, fixed_affine = self._on_fixed_grid(ddf, item, fixed_path)
            path = self.output_dir / disp_name(fixed_path, moving_path)
            atomic_save_nifti(np.moveaxis(disp, 0, -1), fixed_affine, path, dtype=np.float32)  # (H, W, D, 3)
            self.written.append(path)
            self._write_extras(path, disp, fixed_affine, item, moving_path)
            if preprocessed(item):
                self._write_affines(item, fixed_path, moving_path)
            if self.save_qc:
                image = convert_to_numpy(item["image"])
                qc_path = path.with_name(path.name.replace("disp_", "qc_", 1).replace(".nii.gz", ".png"))
                save_qc_png(qc_path, image[1], image[0], ddf, title=f"fixed {fixed_path}\nmoving {moving_path}")
                self.written.append(qc_path)
        self._log_progress(engine, path)

    @staticmethod
    def _on_fixed_grid(ddf: np.ndarray, item, fixed_path: str) -> tuple[np.ndarray, np.ndarray]:
        """``((3, *fixed_shape) disp, fixed affine)``: the network's field, brought back from the
        network grid when the fixed image was resampled onto one (``grid_affine`` in ``item``)."""
        if is_nibabel_file(fixed_path):
            fixed_affine = nib.load(fixed_path).affine
        else:
            fixed_affine = convert_to_numpy(item.get("fixed_native_affine", item["fixed_affine"])).astype(np.float64)
        if preprocessed(item):
            return native_disp(ddf, item, fixed_affine), fixed_affine
        if "grid_affine" not in item:
            return ddf, fixed_affine
        grid_affine = convert_to_numpy(item["grid_affine"]).astype(np.float64)
        fixed_shape = tuple(int(s) for s in convert_to_numpy(item["fixed_shape"]))
        if same_grid(grid_affine, ddf.shape[1:], fixed_affine, fixed_shape):
            return ddf, fixed_affine
        return field_to_fixed_grid(ddf, grid_affine, fixed_affine, fixed_shape), fixed_affine

    def _write_extras(self, disp_path: Path, disp: np.ndarray, fixed_affine, item, moving_path: str) -> None:
        stem = disp_path.name[len("disp_"):]
        if self.save_itk_transform:
            target = disp_path.with_name("itk_warp_" + stem)
            self.written.append(atomic_save_itk_displacement(itk_displacement(disp, fixed_affine), fixed_affine, target))
        jobs = [(moving_path, "warped_", False)] if self.save_warped else []
        label = item.get("moving_label")
        if isinstance(label, str) and label:  # a path (inference); evaluation items hold the loaded map
            jobs.append((label, "warped_label_", True))
        for source, prefix, nearest in jobs:
            array, affine = read_image(source, "label map" if nearest else "moving image")
            warped = warp_to_fixed(array, affine, disp, fixed_affine, nearest=nearest)
            self.written.append(atomic_save_image(warped, fixed_affine, disp_path.with_name(prefix + stem)))

    def _write_affines(self, item, fixed_path: str, moving_path: str) -> None:
        for name, key in zip(affine_names(fixed_path, moving_path), ("mni_to_fixed", "mni_to_moving")):
            matrix = convert_to_numpy(item[key]).astype(np.float64)
            self.written.append(atomic_save_itk_affine(matrix, self.output_dir / name))

    def _list_output(self, engine: Engine) -> None:
        names = sorted(p.name for p in self.output_dir.iterdir() if not p.name.startswith("."))
        self.logger.info(f"output folder {self.output_dir} holds {len(names)} files: {', '.join(names)}")

    def _log_progress(self, engine: Engine, path: Path) -> None:
        done, total = engine.state.iteration, engine.state.epoch_length or len(self.written)
        if done % self.log_every == 0 or done == total:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / done * (total - done)
            self.logger.info(f"pair {done}/{total}: wrote {path.name} ({elapsed / done:.1f} s/pair, ETA {eta:.0f} s)")
