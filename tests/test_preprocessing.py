"""Raw scans in, native space out (``preprocess`` in ``configs/inference.json``): a whole-head
scan and a copy of it seen through a known random affine, smooth warp, grid, orientation and
intensity scale register like the same pair already aligned to MNI; any intensity scale gives
the same registration with and without preprocessing; ``.mgz`` in and out; output names that
collide; bad scans."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, input_error_of, run_workflow, smooth_volume, tiny_checkpoint, write_nifti
from raw_pair import SCAN, SmoothWarp, grid_points, moving_grid, random_affine, sample, write

from scripts.evaluation.metrics import dice_per_label, inverse_consistency
from scripts.file_io import read_itk_affine
from scripts.preprocessing.assess import assess
from scripts.preprocessing.pipeline import cached_preprocess_scan
from scripts.synthetic.lumir import region_labels

GRID = [112, 144, 112]  # 1 mm MNI grid of the network (LUMIR's centre; the brain's edges are cut: faster)
FIXED_ID = "ds000031_sub-01_T1w_2mm"


def _mean_dice(a, b):
    labels = [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v > 0]
    return float(np.nanmean(list(dice_per_label(a, b, labels).values())))


def _register(out, moving, fixed, moving_label, **kw):
    run_workflow("inference.json", output_dir=str(out), moving_image=str(moving), fixed_image=str(fixed),
                 moving_label=str(moving_label), io_iterations=0, network_grid_shape=GRID, **kw)
    return np.asarray(nib.load(str(out / f"warped_label_{fixed.name.split('.')[0]}_{moving.name.split('.')[0]}.nii.gz")).dataobj)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The scan (fixed), its preprocessing (as inference will do it: same voxels, so reused), labels
    made from that (tissue classes of the preprocessed brain x MNI regions, 34 labels), the moving
    scan ``moving(y) = scan(w(R y))`` (R: random affine, w: smooth warp up to 4 mm; another grid and
    orientation; x 16 as int16) and the same pair pre-aligned to MNI by the known R."""
    root = tmp_path_factory.mktemp("raw")
    img = nib.load(str(SCAN))
    scan, affine = np.asarray(img.dataobj), img.affine
    pre, _ = cached_preprocess_scan(scan.astype(np.float32), affine, str(SCAN), GRID)
    to_scan, grid_affine = pre["mni_to_scan"], pre["affine"]
    image, mask = pre["image"], pre["mask"]
    t1, t2 = np.percentile(image[mask], [15, 45])
    tissue = np.where(mask, np.where(image < t1, 1, np.where(image < t2, 2, 3)), 0).astype(np.int16)
    labels_mni = region_labels(tissue, grid_affine)
    to_mni = np.linalg.inv(to_scan)
    # fixed labels on the scan's own grid
    x = grid_points(affine, scan.shape)
    labels = sample(labels_mni, grid_affine, to_mni[:3, :3] @ x + to_mni[:3, 3:], scan.shape, nearest=True)
    rng = np.random.default_rng(20)
    centre = affine[:3, :3] @ ((np.array(scan.shape) - 1) / 2) + affine[:3, 3]
    r = random_affine(rng, centre)
    warp = SmoothWarp(rng, x.min(1), x.max(1), max_mm=4.0)
    m_affine, m_shape = moving_grid(affine, scan.shape, r)
    seen = warp(r[:3, :3] @ grid_points(m_affine, m_shape) + r[:3, 3:])  # fixed-world point of each moving voxel
    moving = sample(scan, affine, seen, m_shape)
    moving_labels = sample(labels_mni, grid_affine, to_mni[:3, :3] @ seen + to_mni[:3, 3:], m_shape, nearest=True)
    files = {
        "fixed": SCAN,
        "fixed_labels": write(root / "fixed_labels.nii.gz", labels, affine),
        "moving": write(root / "moving.nii.gz", np.rint(16 * moving).astype(np.int16), m_affine),
        "moving_labels": write(root / "moving_labels.nii.gz", moving_labels, m_affine),
    }
    # pre-aligned: the same pair in MNI space, aligned by the known R instead of by preprocessing: the
    # preprocessed fixed scan seen through the warp alone (same brain mask and intensities), and the
    # moving scan's own label map brought into MNI space through R (so that both paths' labels pass
    # through the moving scan's 1.8 mm grid and lose the same detail)
    z = grid_points(grid_affine, GRID)
    seen = warp(to_scan[:3, :3] @ z + to_scan[:3, 3:])
    seen = to_mni[:3, :3] @ seen + to_mni[:3, 3:]
    through_r = np.linalg.inv(r) @ to_scan
    files["pre_fixed"] = write(root / "pre_fixed.nii.gz", image, grid_affine)
    files["pre_moving"] = write(root / "pre_moving.nii.gz", sample(image, grid_affine, seen, GRID), grid_affine)
    files["pre_moving_labels"] = write(root / "pre_moving_labels.nii.gz", sample(
        moving_labels, m_affine, through_r[:3, :3] @ z + through_r[:3, 3:], GRID, nearest=True), grid_affine)
    files["moving_float"] = moving  # unrounded, for other scales
    return {"root": root, "files": files, "to_scan": to_scan, "labels": labels}


@pytest.fixture(scope="module")
def registered(pair):
    """Dice with the fixed scan's labels on its own grid: the raw pair (preprocess auto: on) and the
    pre-aligned pair (preprocess off; its MNI-grid result brought back through the fixed scan's
    affine, nearest); the raw run's output folder."""
    f, root = pair["files"], pair["root"]
    raw = _register(root / "raw_out", f["moving"], f["fixed"], f["moving_labels"], save_itk_transform=True,
                    save_inverse=True, save_jacobian=True)
    pre = _register(root / "pre_out", f["pre_moving"], f["pre_fixed"], f["pre_moving_labels"], preprocess="off")
    img = nib.load(str(SCAN))
    to_mni, grid_affine = np.linalg.inv(pair["to_scan"]), nib.load(str(f["pre_fixed"])).affine
    x = grid_points(img.affine, img.shape)
    native = lambda a: sample(a, grid_affine, to_mni[:3, :3] @ x + to_mni[:3, 3:], img.shape, nearest=True)  # noqa: E731
    return {
        "raw": _mean_dice(pair["labels"], raw),
        "pre": _mean_dice(pair["labels"], native(pre)),
        "pre_unregistered": _mean_dice(pair["labels"], native(np.asarray(nib.load(str(f["pre_moving_labels"])).dataobj))),
        "out": root / "raw_out",
    }


def test_raw_pair_registers_like_the_pre_aligned_pair(pair, registered):
    print(f"Dice: raw pair, preprocessed, native grid {registered['raw']:.4f}; pre-aligned {registered['pre']:.4f} "
          f"(unregistered {registered['pre_unregistered']:.4f})")
    assert registered["pre"] > registered["pre_unregistered"] + 0.01  # the network registers the pre-aligned pair
    assert abs(registered["raw"] - registered["pre"]) < 0.03


def test_outputs_live_on_the_native_fixed_grid_and_the_affines_are_ants_files(pair, registered):
    out, fixed = registered["out"], nib.load(str(SCAN))
    stem = f"{FIXED_ID}_moving"
    disp = nib.load(str(out / f"disp_{stem}.nii.gz"))
    assert disp.shape == (*fixed.shape, 3) and np.allclose(disp.affine, fixed.affine)
    label = nib.load(str(out / f"warped_label_{stem}.nii.gz"))
    assert label.shape == fixed.shape and label.get_data_dtype() == nib.load(str(pair["files"]["moving_labels"])).get_data_dtype()
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"affine_fixed_{FIXED_ID}.mat", "affine_moving_moving.mat", f"disp_{stem}.nii.gz",
                            f"itk_warp_{stem}.nii.gz", f"warped_label_{stem}.nii.gz", f"inverse_disp_{stem}.nii.gz",
                            f"itk_inverse_warp_{stem}.nii.gz", f"jacdet_{stem}.nii.gz"])
    # the inverse lies on the native moving grid and undoes the native map (both affines composed in)
    moving = nib.load(str(pair["files"]["moving"]))
    inverse = nib.load(str(out / f"inverse_disp_{stem}.nii.gz"))
    assert inverse.shape == (*moving.shape, 3) and np.allclose(inverse.affine, moving.affine)
    error = inverse_consistency(np.moveaxis(np.asarray(disp.dataobj), -1, 0), np.moveaxis(np.asarray(inverse.dataobj), -1, 0),
                                fixed.affine, moving.affine)
    brain = pair["labels"] > 0
    print(f"inverse consistency in the brain, fixed voxels: median {np.median(error[brain]):.3f}, "
          f"p95 {np.percentile(error[brain], 95):.3f}")
    assert np.median(error[brain]) < 0.1 and np.percentile(error[brain], 95) < 0.5
    jac = nib.load(str(out / f"jacdet_{stem}.nii.gz"))
    assert jac.shape == fixed.shape and np.allclose(jac.affine, fixed.affine)
    # the map's mean volume change over the fixed brain is the moving brain's volume over the fixed one's
    # (both label maps carried by the known maps; mm^3), within the 3 % that the Jacobian check promises
    moving_labels = nib.load(str(pair["files"]["moving_labels"]))
    truth = (np.count_nonzero(np.asarray(moving_labels.dataobj)) * abs(np.linalg.det(moving_labels.affine[:3, :3]))
             / (np.count_nonzero(brain) * abs(np.linalg.det(fixed.affine[:3, :3]))))
    ratio = float(np.mean(np.asarray(jac.dataobj)[brain]))
    print(f"mean Jacobian over the fixed brain {ratio:.4f}; moving / fixed brain volume {truth:.4f}")
    assert abs(ratio - truth) < 0.03 * truth, (ratio, truth)
    # the fixed scan's affine is the one its preprocessing found, and ANTs reads it as the same map
    matrix = read_itk_affine(out / f"affine_fixed_{FIXED_ID}.mat")
    np.testing.assert_allclose(matrix, pair["to_scan"], atol=1e-6)
    ants = pytest.importorskip("ants")
    tx = ants.read_transform(str(out / f"affine_fixed_{FIXED_ID}.mat"))
    point = np.array([12.0, -30.0, 25.0])  # MNI, RAS
    lps = np.array(tx.apply_to_point(tuple(point * [-1, -1, 1])))
    np.testing.assert_allclose(lps * [-1, -1, 1], matrix[:3, :3] @ point + matrix[:3, 3], atol=1e-3)


def test_intensity_scale_and_dtype_do_not_change_the_preprocessed_registration(pair, registered, tmp_path):
    """The raw pair as float 0..1 and as uint8 0..255 (both scans) against int16 x 16."""
    f = pair["files"]
    scan = np.asarray(nib.load(str(SCAN)).dataobj).astype(np.float64)
    moving = pair["files"]["moving_float"]
    m_affine = nib.load(str(f["moving"])).affine
    fixed_affine = nib.load(str(SCAN)).affine
    result = {"int16 x 16": registered["raw"]}
    for kind, convert in (("float 0..1", lambda a: (a / a.max()).astype(np.float32)),
                          ("uint8", lambda a: np.rint(255 * a / a.max()).astype(np.uint8))):
        d = tmp_path / kind.split()[0]
        fixed_file = write(d / f"{FIXED_ID}.nii.gz", convert(scan), fixed_affine)
        moving_file = write(d / "moving.nii.gz", convert(moving), m_affine)
        result[kind] = _mean_dice(pair["labels"], _register(d / "out", moving_file, fixed_file, f["moving_labels"]))
    print("Dice by input scale:", {k: round(v, 4) for k, v in result.items()})
    assert abs(result["float 0..1"] - result["uint8"]) < 0.005
    assert max(result.values()) - min(result.values()) < 0.01


# -- without preprocessing: the sample pair at other scales (cut to a box: fast) ------------------------

BOX = (slice(32, 128), slice(48, 176), slice(40, 136))


def test_intensity_scale_and_dtype_do_not_change_the_registration_without_preprocessing():
    """The sample pair (uint8, LUMIR's scale) as int16 x 16, float 0..1 and z-scores (negative background):
    the network gets the same input (so the same field; measured: Dice 0.8604 for all four on the
    sample box of tests/test_real_world_inputs.py), and LUMIR's uint8 exactly the file's values."""
    from monai.data import MetaTensor

    from scripts.preprocessing.transform import Preprocessd

    step = Preprocessd(preprocess="off")
    item = {}
    for role, sid in (("moving", 3), ("fixed", 4)):
        img = nib.load(str(BUNDLE / f"sample/imagesVal/LUMIRMRI_{sid:04d}_0000.nii.gz"))
        item[role] = (np.asarray(img.dataobj)[BOX], img.affine)
    scales = {
        "int16 x 16": lambda a: (a.astype(np.int16) * 16),
        "float 0..1": lambda a: (a / 255.0).astype(np.float32),
        "z-scores": lambda a: ((a - a.mean()) / a.std()).astype(np.float32),
    }

    def network_input(convert):
        d = {role: MetaTensor(torch.as_tensor(convert(a).astype(np.float32))[None], affine=torch.as_tensor(aff))
             for role, (a, aff) in item.items()}
        out = step(d)
        return {role: np.asarray(out[role].array) for role in item}, out

    lumir, out = network_input(lambda a: a)
    for role, (a, _) in item.items():
        np.testing.assert_array_equal(lumir[role][0], a)  # untouched
    assert "mni_to_fixed" not in out and out["preprocess_seconds"] == 0.0
    for kind, convert in scales.items():
        got, _ = network_input(convert)
        for role in item:
            np.testing.assert_allclose(got[role], lumir[role], atol=0.02, err_msg=kind)


def test_auto_decides_by_content_not_by_scale():
    img = nib.load(str(BUNDLE / "sample/imagesVal/LUMIRMRI_0004_0000.nii.gz"))
    lumir = np.asarray(img.dataobj)
    for array in (lumir, lumir / 255.0, lumir.astype(np.int16) * 16 - 300):
        found = assess(array, img.affine)
        assert found["brain_extracted"] and found["mni_aligned"] and not found["preprocess"], found
    head = nib.load(str(SCAN))
    for array in (np.asarray(head.dataobj), np.asarray(head.dataobj) / 1000.0):
        found = assess(array, head.affine)
        assert not found["brain_extracted"] and not found["mni_aligned"] and found["preprocess"], found


# -- formats and names --------------------------------------------------------------------------------


def test_mgz_in_and_out(tmp_path):
    """A FreeSurfer .mgz pair and label map register exactly like the NIfTI pair; the warp tool writes .mgz."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    affine = np.array([[0, 0, -1.2, 50.0], [1.1, 0, 0, -60], [0, 0.9, 0, -40], [0, 0, 0, 1]])
    m = write_nifti(tmp_path / "m.nii.gz", smooth_volume((30, 36, 28), 1), affine)
    f = write_nifti(tmp_path / "f.nii.gz", smooth_volume((30, 36, 28), 2), affine)
    lab = write_nifti(tmp_path / "lab.nii.gz", (smooth_volume((30, 36, 28), 3) // 64).astype(np.int16), affine)
    kw = dict(ckpt_path=str(ckpt), io_iterations=0, network_grid_shape=[48, 48, 48], preprocess="off",
              **{"network_def#start_channel": 8})
    run_workflow("inference.json", output_dir=str(tmp_path / "nii"), moving_image=str(m), fixed_image=str(f),
                 moving_label=str(lab), **kw)
    for path in (m, f, lab):
        img = nib.load(str(path))
        nib.save(nib.MGHImage(np.asarray(img.dataobj), img.affine), str(path).replace(".nii.gz", ".mgz"))
    run_workflow("inference.json", output_dir=str(tmp_path / "mgz"), moving_image=str(tmp_path / "m.mgz"),
                 fixed_image=str(tmp_path / "f.mgz"), moving_label=str(tmp_path / "lab.mgz"), **kw)
    for name in ("disp_f_m.nii.gz", "warped_label_f_m.nii.gz"):
        a, b = nib.load(str(tmp_path / "nii" / name)), nib.load(str(tmp_path / "mgz" / name))
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
        np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), atol=1e-4)
    out = tmp_path / "warped.mgz"
    res = subprocess.run([sys.executable, "-m", "scripts.warp", "--field", str(tmp_path / "mgz/disp_f_m.nii.gz"),
                          "--moving", str(tmp_path / "lab.mgz"), "--output", str(out), "--nearest"],
                         cwd=BUNDLE, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    back = nib.load(str(out))
    assert isinstance(back, nib.MGHImage)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(nib.load(str(tmp_path / "mgz/warped_label_f_m.nii.gz")).dataobj))
    np.testing.assert_allclose(back.affine, nib.load(str(f)).affine, atol=1e-4)


def test_colliding_output_names_stop_the_run_before_anything_is_written(tmp_path):
    data = tmp_path / "bids"
    for sub in ("sub-01", "sub-02", "sub-03"):
        write_nifti(data / sub / "anat" / "T1w_brain.nii.gz", smooth_volume((24, 28, 24), int(sub[-1])))
    pairs = [{"fixed": f"/{s}/anat/T1w_brain.nii.gz", "moving": "/sub-03/anat/T1w_brain.nii.gz"} for s in ("sub-01", "sub-02")]
    (data / "dataset.json").write_text(json.dumps({"test": pairs}))
    out = tmp_path / "out"
    msg = input_error_of("inference.json", ckpt_path=str(tiny_checkpoint(tmp_path / "tiny.pt")), output_dir=str(out),
                         dataset_dir=str(data), data_list_file_path=str(data / "dataset.json"), preprocess="off",
                         **{"network_def#start_channel": 8})
    assert "collide" in msg and "disp_T1w_brain_T1w_brain.nii.gz" in msg, msg
    assert "sub-01" in msg and "sub-02" in msg and "\n" not in msg
    assert not out.exists() or not any(out.iterdir())


# -- bad scans -----------------------------------------------------------------------------------------


def _bad_scan(tmp_path, case):
    img = nib.load(str(SCAN))
    scan, affine = np.asarray(img.dataobj).copy(), img.affine.copy()
    if case == "blank":
        scan[:] = 0
        return write(tmp_path / "blank.nii.gz", scan, affine), "blank"
    if case == "constant":
        scan[:] = 700
        return write(tmp_path / "constant.nii.gz", scan, affine), "constant"
    if case == "no_brain":  # a head-shaped object of uniform "tissue": no brain inside
        head = scan > np.percentile(scan, 60)
        return write(tmp_path / "no_brain.nii.gz", np.where(head, 400, 0).astype(np.int16), affine), "no brain-like content"
    # the field of view holds the lower half of the head only: the affine alignment cannot be right
    scan[:, :, scan.shape[2] // 2:] = 0
    return write(tmp_path / "lower_half.nii.gz", scan, affine), "affine alignment to MNI152 failed"


@pytest.mark.parametrize("case", ["blank", "constant", "no_brain", "lower_half"])
def test_bad_scans_get_one_clear_error_and_nothing_is_written(tmp_path, case):
    bad, expect = _bad_scan(tmp_path, case)
    out = tmp_path / "out"
    msg = input_error_of("inference.json", output_dir=str(out), moving_image=str(bad), fixed_image=str(SCAN),
                         io_iterations=0, network_grid_shape=GRID, preprocess="on")
    assert expect in msg and str(bad) in msg and "\n" not in msg, msg
    assert not out.exists() or not any(out.iterdir())
