"""Ignite handler that writes each registration: the LUMIR disp file and, on request, more.

Always: ``{output_dir}/disp_{fixed_id}_{moving_id}.nii.gz``; float32 array of shape
``(*fixed.shape, 3)`` (channels last), in voxel units of the fixed image's array axes, with
the fixed image's affine: fixed voxel ``p`` lands on world ``A_fixed @ (p + disp(p))``, read
from the moving image through its own affine (on one shared grid: ``warped(p) = moving(p +
disp(p))``, the LUMIR convention). A field computed on the network's grid (see
:class:`scripts.geometry.ToNetworkGridd`) is brought back onto the fixed image's grid first.

On request (same stem after the prefix): ``warped_...`` the moving image (linear, float32),
``warped_label_...`` its label map (nearest, dtype kept), ``itk_warp_...`` the ITK
displacement-field transform (LPS mm, vector NIfTI) for ``antsApplyTransforms`` / ITK;
``inverse_disp_...`` the inverse field on the moving image's grid (its voxel units and affine:
moving voxel ``q`` maps to world ``A_moving @ (q + inverse(q))`` in the fixed image), with
``itk_inverse_warp_...`` its ITK form (resamples fixed-space images onto the moving grid);
``jacdet_...`` the Jacobian determinant of the map on the fixed grid (:func:`jacobian_map`).

Preprocessed pairs (:mod:`scripts.preprocessing.transform`): the field (and its inverse) is
composed with the two scans' affine alignments to MNI into one disp on the native fixed grid
(the inverse on the native moving grid), and the alignments are written as
``affine_fixed_{fixed_id}.mat`` and ``affine_moving_{moving_id}.mat`` (ITK affine transforms,
MNI -> scan: ``antsApplyTransforms -r MNI_IMAGE -i SCAN -t affine_....mat`` puts the scan in MNI
space). Every file is written atomically; when the run ends the output folder's contents are
logged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from .evaluation.metrics import jacobian_determinant
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
from .preprocessing.transform import native_field, preprocessed


def disp_name(fixed_path: str, moving_path: str) -> str:
    """``disp_{fixed_id}_{moving_id}.nii.gz`` (LUMIR 4-digit ids, else file stems)."""
    return f"disp_{pair_stem(fixed_path, moving_path)}.nii.gz"


def affine_names(fixed_path: str, moving_path: str) -> tuple[str, str]:
    """``(affine_fixed_{fixed_id}.mat, affine_moving_{moving_id}.mat)``: a preprocessed pair's alignments."""
    return f"affine_fixed_{subject_id(fixed_path)}.mat", f"affine_moving_{subject_id(moving_path)}.mat"


def jacobian_map(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant, in world units, of the map of a disp on the fixed grid: float32 ``(*shape)``.

    The map sends world point ``x = A_f p`` to ``A_f (p + disp(p))`` (``A_f`` the fixed affine,
    linear part ``L_f``; the moving affine only says where that point is read in the moving
    array), so in world coordinates it is ``x -> x + L_f disp(inv(A_f) x)``, whose Jacobian is
    ``I + L_f grad_p(disp) inv(L_f)``: a similarity transform of ``I + grad_p(disp)``. Hence

        ``J_world(p) = det(I + grad_p disp(p))``

    for any spacing, orientation or obliquity (:func:`scripts.evaluation.metrics.jacobian_determinant`,
    derivatives in fixed voxels, central inside and one-sided at the border). It is the volume
    (mm^3) of moving anatomy mapped onto a fixed voxel per mm^3 of that voxel: its mean over a
    fixed region is the volume in the moving image of what the map sends there (e.g. that
    region's label in the warped moving label map) divided by the region's volume. In moving
    *voxels* per fixed voxel it would be ``J_world * |det(L_f)| / |det(L_moving)|``.
    """
    return jacobian_determinant(np.asarray(disp, np.float32)).astype(np.float32, copy=False)


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
        save_itk_transform: also write the ITK displacement-field transform (and, with
            ``save_inverse``, the inverse's).
        save_inverse: also write the inverse field on the moving grid; the prediction must then
            be ``{"ddf", "inverse"}`` (``InstanceOptimizationInferer(return_inverse=True)``).
        save_jacobian: also write the Jacobian determinant map (:func:`jacobian_map`).
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
        save_inverse: bool = False,
        save_jacobian: bool = False,
    ) -> None:
        self.output_dir = ensure_writable_dir(output_dir)
        self.pred_key = pred_key
        self.save_qc = bool(save_qc)
        self.save_warped = bool(save_warped)
        self.save_itk_transform = bool(save_itk_transform)
        self.save_inverse = bool(save_inverse)
        self.save_jacobian = bool(save_jacobian)
        self.log_every = max(1, int(log_every))
        self.logger = logging.getLogger("eoir.inference")
        self.written: list[Path] = []
        self._start = 0.0
        self._preprocess_seconds = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._list_output)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        self.written = []
        self._preprocess_seconds = 0.0

    def __call__(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if isinstance(outputs, dict):  # evaluator with decollate=False
            raise ValueError("DispWriter needs the evaluator's decollated output (decollate=True)")
        for out, item in zip(outputs, batch):
            fixed_path, moving_path = str(item["fixed_path"]), str(item["moving_path"])
            self._preprocess_seconds += float(convert_to_numpy(item.get("preprocess_seconds", 0.0)))
            ddf, inverse = self._fields(out[self.pred_key])
            disp, fixed_affine = self._on_fixed_grid(ddf, item, fixed_path)
            path = self.output_dir / disp_name(fixed_path, moving_path)
            atomic_save_nifti(np.moveaxis(disp, 0, -1), fixed_affine, path, dtype=np.float32)  # (H, W, D, 3)
            self.written.append(path)
            self._write_extras(path, disp, fixed_affine, item, moving_path)
            if preprocessed(item):
                self._write_affines(item, fixed_path, moving_path)
            if self.save_jacobian:
                self.written.append(atomic_save_nifti(jacobian_map(disp), fixed_affine, _named(path, "jacdet_")))
            if self.save_inverse:
                self._write_inverse(path, inverse, item)
            if self.save_qc:
                image = convert_to_numpy(item["image"])
                qc_path = path.with_name(path.name.replace("disp_", "qc_", 1).replace(".nii.gz", ".png"))
                save_qc_png(qc_path, image[1], image[0], ddf, title=f"fixed {fixed_path}\nmoving {moving_path}")
                self.written.append(qc_path)
        self._log_progress(engine, path)

    def _fields(self, pred) -> tuple[np.ndarray, object]:
        """``(ddf as float32 numpy, inverse or None)`` of a prediction (a field or ``{"ddf", "inverse"}``)."""
        inverse = None
        if isinstance(pred, dict):
            pred, inverse = pred["ddf"], pred.get("inverse")
        if self.save_inverse and inverse is None:
            raise ValueError("save_inverse needs the inverse field from the inferer: "
                             "InstanceOptimizationInferer(return_inverse=True), as configs/inference.json sets it")
        return convert_to_numpy(pred).astype(np.float32), inverse

    @staticmethod
    def _on_fixed_grid(ddf: np.ndarray, item, fixed_path: str) -> tuple[np.ndarray, np.ndarray]:
        """``((3, *fixed_shape) disp, fixed affine)``: the network's field, brought back from the
        network grid when the fixed image was resampled onto one (``grid_affine`` in ``item``)."""
        return on_native_grid(ddf, item, "fixed")

    def _write_inverse(self, disp_path: Path, inverse, item) -> None:
        """The inverse field on the moving image's grid (and its ITK form on request)."""
        inv, moving_affine = on_native_grid(convert_to_numpy(inverse).astype(np.float32), item, "moving")
        path = _named(disp_path, "inverse_disp_")
        self.written.append(atomic_save_nifti(np.moveaxis(inv, 0, -1), moving_affine, path, dtype=np.float32))
        if self.save_itk_transform:
            self.written.append(atomic_save_itk_displacement(itk_displacement(inv, moving_affine), moving_affine,
                                                             _named(disp_path, "itk_inverse_warp_")))

    def _write_extras(self, disp_path: Path, disp: np.ndarray, fixed_affine, item, moving_path: str) -> None:
        stem = disp_path.name[len("disp_"):]
        if self.save_itk_transform:
            target = _named(disp_path, "itk_warp_")
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
            pre = self._preprocess_seconds
            share = f", preprocessing {pre / done:.1f} s/pair ({100 * pre / max(elapsed, 1e-9):.0f}%)" if pre else ""
            self.logger.info(f"pair {done}/{total}: wrote {path.name} ({elapsed / done:.1f} s/pair{share}, ETA {eta:.0f} s)")


def _named(disp_path: Path, prefix: str) -> Path:
    """``disp_{stem}`` -> ``{prefix}{stem}`` in the same folder."""
    return disp_path.with_name(prefix + disp_path.name[len("disp_"):])


def on_native_grid(field: np.ndarray, item, role: str) -> tuple[np.ndarray, np.ndarray]:
    """``((3, *shape) field, affine)`` on the native grid of the ``role`` (``"fixed"`` or ``"moving"``)
    image of ``item``: a field of the network grid (``grid_affine`` in ``item``) resampled onto
    it in that image's voxel units (:func:`scripts.geometry.field_to_fixed_grid`), or the field
    itself when the grids are one; for a preprocessed item, composed with the two scans' affine
    alignments (:func:`scripts.preprocessing.transform.native_field`). The affine is the file's
    (nibabel's, for NIfTI and MGH)."""
    path = str(item[f"{role}_path"])
    if is_nibabel_file(path):
        affine = nib.load(path).affine
    else:
        affine = convert_to_numpy(item.get(f"{role}_native_affine", item[f"{role}_affine"])).astype(np.float64)
    if preprocessed(item):
        return native_field(field, item, role, affine), affine
    if "grid_affine" not in item:
        return field, affine
    grid_affine = convert_to_numpy(item["grid_affine"]).astype(np.float64)
    shape = tuple(int(s) for s in convert_to_numpy(item[f"{role}_shape"]))
    if same_grid(grid_affine, field.shape[1:], affine, shape):
        return field, affine
    return field_to_fixed_grid(field, grid_affine, affine, shape), affine
