"""Ignite handler that writes each predicted field in the LUMIR submission format.

File: ``{output_dir}/disp_{fixed_id}_{moving_id}.nii.gz``; float32 array of shape
``(H, W, D, 3)`` (channels last), voxel units, array-axis order, with the fixed image's
affine, such that ``warped_moving(p) = moving(p + disp(p))``. Written atomically.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from .file_io import atomic_save_nifti, ensure_writable_dir, subject_id
from .qc import save_qc_png


def disp_name(fixed_path: str, moving_path: str) -> str:
    """``disp_{fixed_id}_{moving_id}.nii.gz`` (LUMIR 4-digit ids, else file stems)."""
    return f"disp_{subject_id(fixed_path)}_{subject_id(moving_path)}.nii.gz"


class DispWriter:
    """Write ``engine.state.output[i][pred_key]`` for every pair of an evaluator's batch.

    Args:
        output_dir: folder for the disp files (created; checked writable at construction).
        pred_key: key of the ``(3, H, W, D)`` field in the decollated output.
        log_every: log one progress line (pair, seconds, ETA) every this many pairs.
        save_qc: also write ``qc_{fixed_id}_{moving_id}.png`` (orthogonal slices of fixed,
            moving, warped moving, differences, deformed grid, Jacobian determinant), from the
            batch's ``image`` (channel 0 moving, 1 fixed).
    """

    def __init__(self, output_dir: str, pred_key: str = "pred", log_every: int = 1, save_qc: bool = False) -> None:
        self.output_dir = ensure_writable_dir(output_dir)
        self.pred_key = pred_key
        self.save_qc = bool(save_qc)
        self.log_every = max(1, int(log_every))
        self.logger = logging.getLogger("eoir.inference")
        self.written: list[Path] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

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
            disp = np.moveaxis(ddf, 0, -1)  # (3, H, W, D) -> (H, W, D, 3)
            path = self.output_dir / disp_name(fixed_path, moving_path)
            atomic_save_nifti(disp, nib.load(fixed_path).affine, path, dtype=np.float32)
            self.written.append(path)
            if self.save_qc:
                image = convert_to_numpy(item["image"])
                qc_path = path.with_name(path.name.replace("disp_", "qc_", 1).replace(".nii.gz", ".png"))
                save_qc_png(qc_path, image[1], image[0], ddf, title=f"fixed {fixed_path}\nmoving {moving_path}")
                self.written.append(qc_path)
        done, total = engine.state.iteration, engine.state.epoch_length or len(self.written)
        if done % self.log_every == 0 or done == total:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / done * (total - done)
            self.logger.info(f"pair {done}/{total}: wrote {path.name} ({elapsed / done:.1f} s/pair, ETA {eta:.0f} s)")
