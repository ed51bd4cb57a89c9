"""Affine registration of a T1w scan (whole head or brain) to the MNI152 template, with antspyx.

The template is skull-stripped and the scan may be a whole head, so it takes two stages
(:func:`align_to_mni`; Mattes mutual information, an affine pyramid whose coarsest level is at
most ``MAX_LEVEL_MM``). Registering the whole head to the brain template from the start is
ill-posed (the skull can be matched to the brain's edge at many scales): on a raw head it gave
affines tens of millimetres apart from one run to the next.

1. **native brain -> template**: the brain is first estimated in the scan's own space, without
   the template (:func:`native_brain`: tissue brighter than CSF inside the head, within a
   generous ellipsoid below the top of the head, cut from scalp, eyes and neck by an erosion of
   ``NATIVE_EROSION_MM``, largest component, dilated back), bias-corrected (N4), and that brain
   is registered to the template (centre-of-mass start; metric in the template's brain mask
   dilated by ``METRIC_MARGIN_MM``).
2. **scan -> template, near the template's brain**: from stage 1's affine, the whole
   bias-corrected scan (not masked) registered to the template with the metric in the template's
   brain mask dilated by ``STAGE2_MARGIN_MM`` (the brain's outer edge included, most of the skull
   not), so that no binary mask estimated from the scan enters the objective. Masking the moving
   scan by its own brain estimate (as stage 1 must) made the affine jump with the mask's edge
   voxels: the same scans as int16, float 0..1 and uint8 gave affines 0.2-0.9 mm apart on average
   over the brain (up to 2.3 mm); with this stage 0.01-0.07 mm (up to 0.14 mm), and as close to the
   known affine of a randomly transformed copy (0.7-0.9 mm mean, with a smooth warp of up to 4 mm on
   top). With the metric inside the brain mask alone (no margin) the scale was poorly held (affines
   up to 5 mm off). The brain is then estimated again on the template grid (:func:`own_brain`,
   inside the template's brain mask dilated by ``SEARCH_MARGIN_MM``); its Dice with the template's
   brain mask (``brain_dice``) is the quality of the alignment.

Images are ANTs images (LPS); :func:`to_ants` makes one from an array and its RAS affine, and
:func:`mni_to_scan` turns the ANTs transform files into one 4 x 4 RAS-mm matrix. The ANTs
threads are ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (``ITK_THREADS`` unless set before the first use).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .morphology import dice, dilate, envelope, erode, largest_component, majority

__all__ = [
    "BRAIN_EROSION_MM",
    "NATIVE_EROSION_MM",
    "CORE_EROSION_MM",
    "MASK_MARGIN_MM",
    "MAX_LEVEL_MM",
    "RANDOM_SEED",
    "SEARCH_MARGIN_MM",
    "STAGE2_MARGIN_MM",
    "align_to_mni",
    "ants_module",
    "block_average",
    "brain_mask",
    "kmeans_1d",
    "mni_to_scan",
    "native_brain",
    "own_brain",
    "pyramid",
    "to_ants",
]

NATIVE_EROSION_MM = 5.0  # erosion that cuts the brain from scalp, eyes and neck in the scan's own space
BRAIN_RADII_MM = (80.0, 100.0, 85.0)  # ellipsoid (x, y, z) that holds any brain, about its expected centre
BRAIN_CENTRE_BELOW_TOP_MM = 80.0  # a brain's centre lies about this far below the top of the head
N4_MARGIN_MM = 10.0  # N4 estimates the bias field within this of the native brain estimate
SEARCH_MARGIN_MM = 5.0  # region searched for the subject's own brain estimate
BRAIN_EROSION_MM = 3.0  # erosion that cuts the brain from scalp and marrow (then dilated back)
MASK_MARGIN_MM = 2.0  # the applied brain mask: template brain within this of the subject's estimate
CORE_EROSION_MM = 6.0  # template brain eroded by this is always kept (ventricles, deep CSF)
MAX_LEVEL_MM = 10.0  # coarsest registration level, mm per voxel
RANDOM_SEED = 1  # ANTs' sampling seed (ANTS_RANDOM_SEED): the same input gives the same registration
ITK_THREADS = 1  # ITK threads unless ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS is set: one, so that a scan's affine is reproducible
STAGE1 = ((100, 50, 10), (4, 2, 1), (2, 1, 0))  # iterations, shrink factors, smoothing sigmas
STAGE2 = ((50, 50), (2, 1), (1, 0))  # starts near the solution
METRIC_MARGIN_MM = 8.0  # stage 1's metric is evaluated in the template's brain mask dilated by this
STAGE2_MARGIN_MM = 4.0  # stage 2's: the template's brain mask dilated by this
SAMPLING_RATE = 0.2  # fraction of the metric mask's voxels sampled by Mattes mutual information
N4_CONVERGENCE = {"iters": [20, 20, 20], "tol": 1e-6}
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS
_TEMPLATE_MASKS: dict = {}


def ants_module():
    """``import ants`` with ITK's thread count defaulting to :data:`ITK_THREADS` and ANTs' random
    seed to :data:`RANDOM_SEED` (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, ``ANTS_RANDOM_SEED``;
    both are read once, when ITK starts). antspyx passes no ``--random-seed``, and without one ANTs
    seeds its metric sampling from the clock: the affine of the same scan differed by up to 0.5 mm
    from one process to the next. With the seed and one thread the same scan gives the same affine
    to the bit; with two threads ITK sums the metric in varying order and the affine varies by
    0.004-0.04 mm (mean over the brain) from run to run."""
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(ITK_THREADS))
    os.environ.setdefault("ANTS_RANDOM_SEED", str(RANDOM_SEED))
    import ants

    return ants


def to_ants(array: np.ndarray, affine: np.ndarray):
    """ANTs image of ``array`` (nibabel axis order) with the RAS voxel-to-world ``affine``."""
    ants = ants_module()
    lps = _FLIP @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def pyramid(iterations, shrink, sigmas, spacing) -> dict:
    """``ants.registration`` affine-pyramid arguments, keeping the levels whose voxels are at most
    ``MAX_LEVEL_MM`` (a coarse grid starts at a finer shrink factor)."""
    keep = [i for i, f in enumerate(shrink) if f * float(min(spacing)) <= MAX_LEVEL_MM or f == 1]
    return {
        "aff_iterations": tuple(iterations[i] for i in keep),
        "aff_shrink_factors": tuple(shrink[i] for i in keep),
        "aff_smoothing_sigmas": tuple(sigmas[i] for i in keep),
    }


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 50, bins: int = 4096) -> np.ndarray:
    """Sorted centres of ``k`` intensity classes: Lloyd's algorithm from evenly spaced quantiles, on
    a ``bins``-bin histogram of ``values`` (centres to within 1/``bins`` of the range)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(k, lo)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    mids = (edges[:-1] + edges[1:]) / 2
    cdf = np.cumsum(counts) / counts.sum()
    centres = mids[np.minimum(np.searchsorted(cdf, np.linspace(0.5 / k, 1 - 0.5 / k, k)), bins - 1)]
    for _ in range(iterations):
        label = np.argmin(np.abs(mids[:, None] - centres[None]), axis=1)
        weight = np.bincount(label, weights=counts, minlength=k)
        total = np.bincount(label, weights=counts * mids, minlength=k)
        new = np.where(weight > 0, total / np.maximum(weight, 1), centres)
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def block_average(image, target_mm: float):
    """An ANTs image averaged over blocks of ``round(target_mm / spacing)`` voxels per axis (the same
    image when every factor is 1): a quick anti-aliased downsampling towards ``target_mm``."""
    import torch

    spacing = np.asarray(image.spacing, dtype=np.float64)
    factors = [max(1, int(round(target_mm / s))) for s in spacing]
    if factors == [1, 1, 1]:
        return image
    x = torch.from_numpy(np.ascontiguousarray(image.numpy(), dtype=np.float32))[None, None]
    with torch.no_grad():
        y = torch.nn.functional.avg_pool3d(x, kernel_size=factors, stride=factors)[0, 0].numpy()
    direction = np.asarray(image.direction, dtype=np.float64)
    origin = np.asarray(image.origin, dtype=np.float64) + direction @ (spacing * (np.asarray(factors) - 1) / 2)
    ants = ants_module()
    return ants.from_numpy(np.ascontiguousarray(y), origin=tuple(origin), spacing=tuple(spacing * factors), direction=direction)


def native_brain(image) -> np.ndarray:
    """A brain estimate of an ANTs image of a T1w head (or brain) in its own space, without the
    template: the head is the largest component brighter than a 2-class split of the whole image
    (holes filled); tissue is what is brighter than midway between the darkest two of 4 classes
    inside the head (CSF / bone, GM, WM, fat), smoothed by a 3^3 majority vote, within the ellipsoid
    ``BRAIN_RADII_MM`` about the point ``BRAIN_CENTRE_BELOW_TOP_MM`` below the top of the head
    (world superior axis; x and y at the centre of the head's upper part); eroded by
    ``NATIVE_EROSION_MM``, largest component, dilated back inside the tissue, closed and
    hole-filled (:func:`scripts.preprocessing.morphology.envelope`)."""
    from scipy.ndimage import binary_fill_holes

    x = image.numpy()
    spacing = np.asarray(image.spacing, dtype=np.float64)
    step = max(1, int(round(np.cbrt(x.size / 2e6))))
    split = kmeans_1d(x[::step, ::step, ::step].ravel(), 2).mean()
    head = binary_fill_holes(largest_component(x > split))
    centres = kmeans_1d(x[head][:: max(1, int(head.sum()) // 500_000)], 4)
    tissue = majority((x > (centres[0] + centres[1]) / 2) & head)
    # world (RAS) coordinates of the head's voxels
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.direction) * spacing
    lps[:3, 3] = image.origin
    ras = _FLIP @ lps
    idx = np.argwhere(head)[:: max(1, int(head.sum()) // 200_000)].T.astype(np.float64)
    world = ras[:3, :3] @ idx + ras[:3, 3:]
    top = float(np.percentile(world[2], 99.5))
    upper = world[2] > top - 60.0
    centre = np.array([world[0][upper].mean(), world[1][upper].mean(), top - BRAIN_CENTRE_BELOW_TOP_MM])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in x.shape], indexing="ij"))
    offset = np.einsum("ij,j...->i...", ras[:3, :3].astype(np.float32), grid) + (ras[:3, 3] - centre).astype(np.float32).reshape(3, 1, 1, 1)
    inside = sum((o / r) ** 2 for o, r in zip(offset, BRAIN_RADII_MM)) <= 1.0
    tissue &= inside
    core = largest_component(erode(tissue, NATIVE_EROSION_MM, spacing))
    return envelope(dilate(core, NATIVE_EROSION_MM, spacing) & tissue, spacing)


def own_brain(head, search: np.ndarray, spacing) -> np.ndarray:
    """The subject's brain estimate in ``search`` (an array on the grid of the ANTs image
    ``head``): the voxels brighter than midway between the dark class (CSF, skull, background)
    and GM of a 3-class intensity k-means in ``search``, smoothed by a 3^3 majority vote, cut from
    the scalp and marrow by an erosion of ``BRAIN_EROSION_MM`` (largest component, dilated back
    inside the tissue), closed (3 mm) and hole-filled."""
    x = head.numpy()
    centres = kmeans_1d(x[search][:: max(1, int(search.sum()) // 500_000)], 3)
    tissue = majority(x > (centres[0] + centres[1]) / 2) & search
    core = largest_component(erode(tissue, BRAIN_EROSION_MM, spacing))
    return envelope(dilate(core, BRAIN_EROSION_MM, spacing) & tissue, spacing)


def _template_morph(op: str, mask: np.ndarray, radius_mm: float, spacing) -> np.ndarray:
    """``dilate`` or ``erode`` of a template mask, computed once per process (the template's
    masks are the same for every scan; a read-only array)."""
    mask = np.asarray(mask, dtype=bool)
    key = (op, mask.shape, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest(), float(radius_mm),
           tuple(float(v) for v in spacing))
    if key not in _TEMPLATE_MASKS:
        out = (dilate if op == "dilate" else erode)(mask, radius_mm, spacing)
        out.flags.writeable = False
        _TEMPLATE_MASKS[key] = out
    return _TEMPLATE_MASKS[key]


def brain_mask(own: np.ndarray, template_mask: np.ndarray, spacing) -> np.ndarray:
    """The brain mask applied to a scan in MNI space: the template's brain mask within
    ``MASK_MARGIN_MM`` of the subject's own estimate (sulcal and surface CSF kept, no skull or
    scalp), plus the template's brain mask eroded by ``CORE_EROSION_MM`` (ventricles, deep CSF);
    largest component, holes filled."""
    from scipy.ndimage import binary_fill_holes

    mask = (template_mask & dilate(own, MASK_MARGIN_MM, spacing)) | _template_morph("erode", template_mask, CORE_EROSION_MM, spacing)
    return binary_fill_holes(largest_component(mask))


def align_to_mni(subject, template: dict, workdir, n4: bool = True, log=None) -> dict:
    """Two-stage affine registration of the ANTs image ``subject`` to ``template`` (a dict of
    :func:`scripts.mni.template_on_grid`: ``t1``, ``mask``, ``affine``), module docstring.

    Returns ``transforms`` (the ITK affine file(s) in ``workdir``, as ``ants.apply_transforms``
    takes them: template grid -> scan; both stages in one), ``head`` (the scan resampled
    once onto the template grid, N4-corrected if ``n4``), ``bias`` (the N4 bias field on the scan's own
    grid, the scan divided by it; ``None`` without ``n4``), ``own`` (its brain estimate),
    ``search`` (the region searched for it), ``reference`` (the template as an ANTs image) and
    ``quality`` (``brain_dice_stage1``, ``brain_dice``: Dice of the template's brain mask with the
    subject's brain estimate after stage 1 and after both; ``template_correlation``: correlation of
    the aligned head with the template inside the template's brain mask).
    """
    ants = ants_module()
    affine = np.asarray(template["affine"], dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    fixed = to_ants(template["t1"], affine)
    workdir = Path(workdir)
    say = log or (lambda *a: None)

    # -- stage 1: the brain estimated in the scan's own space -> template ------------------
    work = block_average(subject, float(min(spacing)))  # registration needs no finer voxels than the template's
    if float(min(work.spacing)) < 0.9 * float(min(spacing)):
        work = ants.resample_image(work, tuple(float(v) for v in spacing), use_voxels=False, interp_type=0)
    brain0 = native_brain(work)
    if not brain0.any():
        raise ValueError("no brain-like tissue found in the image")
    bias = None
    if n4:  # the bias field around the brain, in the scan's own space
        region = work.new_image_like(dilate(brain0, N4_MARGIN_MM, np.asarray(work.spacing)).astype(np.float32))
        bias = ants.n4_bias_field_correction(work, mask=region, return_bias_field=True, convergence=N4_CONVERGENCE)
        work = work / bias
    say("brain estimate and bias field in the scan's own space done")
    metric_mask = fixed.new_image_like(_template_morph("dilate", template["mask"], METRIC_MARGIN_MM, spacing).astype(np.float32))
    reg1 = ants.registration(
        fixed, work * work.new_image_like(brain0.astype(np.float32)), type_of_transform="Affine", mask=metric_mask,
        aff_metric="mattes", aff_random_sampling_rate=SAMPLING_RATE, outprefix=str(workdir / "stage1_"), **pyramid(*STAGE1, spacing),
    )
    search = _template_morph("dilate", template["mask"], SEARCH_MARGIN_MM, spacing)
    head = ants.apply_transforms(fixed, work, reg1["fwdtransforms"], interpolator="linear")
    own = own_brain(head, search, spacing)
    quality = {"brain_dice_stage1": dice(own, template["mask"])}
    say("stage 1 affine (native brain estimate -> MNI152) and brain estimate done")

    # -- stage 2: the whole (bias-corrected) scan -> template, the metric near the template's brain -----
    near_brain = _template_morph("dilate", template["mask"], STAGE2_MARGIN_MM, spacing)
    reg2 = ants.registration(
        fixed, work, type_of_transform="Affine", mask=fixed.new_image_like(near_brain.astype(np.float32)),
        initial_transform=list(reg1["fwdtransforms"]), aff_metric="mattes", aff_random_sampling_rate=SAMPLING_RATE,
        outprefix=str(workdir / "stage2_"), **pyramid(*STAGE2, spacing),
    )
    transforms = list(reg2["fwdtransforms"])  # stage 1 included (antsRegistration collapses its initial transform in)
    head = ants.apply_transforms(fixed, work, transforms, interpolator="linear")  # one resampling
    own = own_brain(head, search, spacing)
    quality["brain_dice"] = dice(own, template["mask"])
    inside = np.asarray(template["mask"], dtype=bool)
    quality["template_correlation"] = float(np.corrcoef(head.numpy()[inside], np.asarray(template["t1"])[inside])[0, 1])
    say("stage 2 affine (scan -> MNI152 in its brain) and brain estimate done")
    return {"transforms": transforms, "head": head, "bias": bias, "own": own, "search": search, "reference": fixed,
            "quality": quality}


def mni_to_scan(transforms: Sequence[str]) -> np.ndarray:
    """The 4 x 4 RAS-mm map from MNI points to scan points of ANTs affine transform files given
    as ``ants.apply_transforms`` takes them (the point goes through the first file first... as
    ANTs composes: the last file is applied to the image first, so a template point goes through
    the first file first)."""
    ants = ants_module()
    total = np.eye(4)
    for path in transforms:  # point -> first transform, then the next: total = H_last @ ... @ H_first
        tx = ants.read_transform(str(path))
        params = np.asarray(tx.parameters, dtype=np.float64)
        centre = np.asarray(tx.fixed_parameters, dtype=np.float64)
        h = np.eye(4)
        h[:3, :3] = params[:9].reshape(3, 3)
        h[:3, 3] = params[9:12] + centre - h[:3, :3] @ centre
        total = h @ total
    return _FLIP @ total @ _FLIP
