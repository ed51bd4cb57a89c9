"""One raw T1w scan -> a LUMIR-like image in MNI space, and the affine that maps it back.

:func:`preprocess_scan` (each step antspyx, ITK threads from ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``):

1. intensities to ~0..1 (minimum -> 0, 99.5th percentile -> 1; any dtype and scale);
2. a brain estimate and N4 bias field in the scan's own space, and a two-stage brain-to-brain
   affine registration to the MNI152 template on a 2 mm grid over LUMIR's field of view
   (:func:`scripts.preprocessing.mni_affine.align_to_mni`); ANTs failing raises an
   :class:`~scripts.errors.InputError` naming the scan;
3. brain extraction: the template's brain mask where the subject's own brain estimate agrees
   (:func:`scripts.preprocessing.mni_affine.brain_mask`); it fails if the brain holds no
   brain-like content (mostly dark, or no tissue contrast), then if the aligned scan correlates
   with the template by less than ``MIN_TEMPLATE_CORRELATION`` inside its brain mask or the brain
   found overlaps the template's brain mask by Dice < ``MIN_BRAIN_DICE`` (the alignment failed);
4. the scan resampled once (linear) onto the output grid (1 mm, RAS, ``grid_shape`` voxels
   centred like LUMIR's grid: LUMIR's grid itself at 160 x 224 x 192), divided by the bias
   field, and intensities to 1..255 in the brain, 0 outside
   (:func:`scripts.preprocessing.intensity.brain_to_lumir`).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import OrderedDict
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..mni import centred_grid, template_on_grid
from .assess import WORK_SHAPE
from .intensity import brain_to_lumir
from .mni_affine import align_to_mni, ants_module, brain_mask, mni_to_scan, to_ants

__all__ = ["CACHE_SIZE", "MIN_BRAIN_DICE", "MIN_TEMPLATE_CORRELATION", "MIN_CONTRAST", "MAX_DARK_FRACTION", "cached_preprocess_scan", "preprocess_scan"]

CACHE_SIZE = 4  # results kept per process (a scan met again is not preprocessed again)

MIN_BRAIN_DICE = 0.7  # below: the affine registration failed
MIN_TEMPLATE_CORRELATION = 0.3  # correlation with the template in its brain mask; below: failed (a T1w brain: ~0.6)
MAX_DARK_FRACTION = 0.5  # of the brain mask below 10 % of its 99.9th percentile: no brain there
MIN_CONTRAST = 0.1  # (p75 - p25) / p50 in the brain: below, no tissue contrast (a T1w brain: ~0.3)

logger = logging.getLogger("eoir.preprocessing")
_CACHE: OrderedDict[str, dict] = OrderedDict()


def _initial_scale(array: np.ndarray) -> np.ndarray:
    x = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(x, [0.0, 99.5])
    if hi <= lo:
        hi = float(x.max())
    return np.clip((x - lo) / max(float(hi - lo), 1e-12), 0.0, None).astype(np.float32)


def _check_content(head: np.ndarray, mask: np.ndarray, name: str, quality: dict) -> None:
    """:class:`InputError` unless the brain mask holds brain-like content: at most
    ``MAX_DARK_FRACTION`` of it dark and tissue contrast ``(p75 - p25) / p50`` of at least
    ``MIN_CONTRAST`` (checked before the alignment's quality: without a brain there is nothing
    to align)."""
    inside = brain_to_lumir(head, mask)[mask]
    dark = float(np.mean(inside < 0.1 * 255)) if inside.size else 1.0
    p25, p50, p75 = np.percentile(inside, [25, 50, 75]) if inside.size else (0.0, 0.0, 0.0)
    contrast = float((p75 - p25) / max(p50, 1e-6))
    quality.update(dark_fraction=dark, contrast=contrast)
    if dark > MAX_DARK_FRACTION or contrast < MIN_CONTRAST:
        why = f"{100 * dark:.0f}% of it is dark" if dark > MAX_DARK_FRACTION else f"no tissue contrast ((p75 - p25) / p50 = {contrast:.2f})"
        raise InputError(f"{name}: no brain-like content after preprocessing: inside the brain mask {why}; is it a T1w brain MRI?")


def preprocess_scan(array: np.ndarray, affine: np.ndarray, name: str, grid_shape: Sequence[int], n4: bool = True) -> dict:
    """Preprocess one scan (module docstring).

    ``array``: 3D, any dtype; ``affine``: its RAS voxel-to-world matrix; ``name`` names it in
    errors and the log. Returns ``image`` (float32 0..255 on the output grid), ``affine`` (the
    output grid's), ``mni_to_scan`` (4 x 4 RAS-mm map from MNI to the scan's world: the
    affine alignment), ``mask`` (the brain mask on the output grid), ``quality`` and ``seconds``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    ants = ants_module()
    x = _initial_scale(array)
    if float(x.max()) <= 0:
        raise InputError(f"{name}: the image is blank or constant; nothing to register")
    subject = to_ants(x, affine)
    tmpl = template_on_grid(WORK_SHAPE)
    spacing = np.linalg.norm(np.asarray(tmpl["affine"])[:3, :3], axis=0)
    def say(what: str) -> None:
        logger.debug("%s: %s, %.1f s (%.1f s CPU)", name, what, time.perf_counter() - t0, time.process_time() - c0)

    with tempfile.TemporaryDirectory(prefix="eoir_preprocess_") as workdir:
        try:
            aligned = align_to_mni(subject, tmpl, workdir, n4=n4, log=say)
            matrix = mni_to_scan(aligned["transforms"])
        except (RuntimeError, ValueError) as e:  # ANTs raises these for images it cannot register
            raise InputError(f"{name}: the affine registration to MNI152 failed ({e.__class__.__name__}: {e})") from None
        quality = dict(aligned["quality"])
        mask_w = brain_mask(aligned["own"], tmpl["mask"], spacing)
        _check_content(aligned["head"].numpy(), mask_w, name, quality)
        if quality["brain_dice"] < MIN_BRAIN_DICE or quality["template_correlation"] < MIN_TEMPLATE_CORRELATION:
            raise InputError(
                f"{name}: affine alignment to MNI152 failed: the brain found in the scan overlaps the template's brain "
                f"by Dice {quality['brain_dice']:.2f} (at least {MIN_BRAIN_DICE} needed) and correlates with the template "
                f"by {quality['template_correlation']:.2f} (at least {MIN_TEMPLATE_CORRELATION}); is it a T1w head or "
                "brain scan with the whole brain in the field of view?"
            )
        out_affine = centred_grid(grid_shape)
        ref = to_ants(np.zeros(tuple(grid_shape), np.float32), out_affine)
        head = ants.apply_transforms(ref, subject, aligned["transforms"], interpolator="linear").numpy()
        if aligned["bias"] is not None:  # the bias field found on the scan's own (2 mm) grid, applied on the output grid
            bias = ants.apply_transforms(ref, aligned["bias"], aligned["transforms"], interpolator="linear",
                                         defaultvalue=1.0).numpy()
            head = head / np.maximum(bias, 1e-3)
    mask = ants.resample_image_to_target(aligned["reference"].new_image_like(mask_w.astype(np.float32)), ref,
                                         interp_type="linear").numpy() >= 0.5
    if not mask.any():
        raise InputError(f"{name}: no brain left after brain extraction; nothing to register")
    say("brain extraction and resampling onto the output grid done")
    image = brain_to_lumir(head, mask)
    say("bias correction and intensities done")
    quality["brain_ml"] = float(mask.sum()) * abs(np.linalg.det(out_affine[:3, :3])) / 1000
    return {"image": image, "affine": out_affine, "mni_to_scan": matrix, "mask": mask, "quality": quality,
            "seconds": time.perf_counter() - t0}


def cached_preprocess_scan(array: np.ndarray, affine: np.ndarray, name: str, grid_shape: Sequence[int], n4: bool = True) -> tuple[dict, bool]:
    """:func:`preprocess_scan`, reusing the result for a scan met before in this process (same
    voxels, dtype, affine, grid and ``n4``; the last ``CACHE_SIZE`` are kept): ``(result, reused)``."""
    digest = hashlib.sha1()
    for part in (np.asarray(array), np.asarray(affine, np.float64), np.asarray(tuple(grid_shape)), np.asarray([bool(n4)])):
        part = np.ascontiguousarray(part)
        digest.update(f"{part.dtype}{part.shape}".encode())
        digest.update(part.view(np.uint8).tobytes())
    key = digest.hexdigest()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], True
    result = preprocess_scan(array, affine, name, grid_shape, n4=n4)
    _CACHE[key] = result
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result, False
