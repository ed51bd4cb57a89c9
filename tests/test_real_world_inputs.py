"""Real-world inputs: any geometry in (via MONAI transforms), fields / warped images out on the
fixed grid, an ITK transform that ITK (and ANTs) apply, the warp CLI, and bad geometry."""

import subprocess
import sys

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, input_error_of, run_workflow, smooth_volume, tiny_checkpoint, write_nifti
from monai.data import MetaTensor
from monai.transforms import Orientation, SpatialCrop, SpatialPad, Spacing

from scripts.checkpoint import load_weights
from scripts.lean import LeanEOIR
from scripts.network import EOIR
from scripts.evaluation.metrics import dice_per_label

# the held-out sample pair (never trained on), cut to a 96 x 128 x 96 box around the brain centre
BOX = (slice(32, 128), slice(48, 176), slice(40, 136))
BOX_SHAPE = [96, 128, 96]
LABELS = lambda a, b: [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v > 0]  # noqa: E731


def _sample_box(tmp_path):
    """moving 0003 / fixed 0004 images and label maps of the sample, as RAS 1 mm NIfTI boxes."""
    out = {}
    for role, sid in (("moving", 3), ("fixed", 4)):
        for kind, key in (("imagesVal", role), ("labelsVal", f"{role}_label")):
            img = nib.load(str(BUNDLE / f"sample/{kind}/LUMIRMRI_{sid:04d}_0000.nii.gz"))
            affine = img.affine.copy()
            affine[:3, 3] += affine[:3, :3] @ np.array([s.start for s in BOX])
            out[key] = write_nifti(tmp_path / "native" / f"{key}.nii.gz", np.asarray(img.dataobj)[BOX], affine)
    return out


def _regrid(src, dst, pixdim, axcodes, nearest, pad=None, crop=None):
    """Resample a NIfTI file to another orientation / spacing / field of view (MONAI transforms)."""
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj)
    x = MetaTensor(torch.as_tensor(arr.astype(np.float32))[None], affine=torch.as_tensor(img.affine))
    x = Orientation(axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)
    x = Spacing(pixdim=pixdim, mode="nearest" if nearest else "bilinear", padding_mode="zeros")(x)
    if pad is not None:
        x = SpatialPad(spatial_size=[s + p for s, p in zip(x.shape[1:], pad)], method="end")(x)
    if crop is not None:
        x = SpatialCrop(roi_start=crop, roi_end=x.shape[1:])(x)
    out = np.asarray(x.array[0])
    out = np.rint(out).astype(arr.dtype) if nearest else np.clip(out, 0, 255).astype(np.float32)
    return write_nifti(dst, out, np.asarray(x.affine, dtype=np.float64))


def _mean_dice(fixed_label, warped_label):
    return float(np.nanmean(list(dice_per_label(fixed_label, warped_label, LABELS(fixed_label, warped_label)).values())))


def _register(out, moving, fixed, moving_label, **kw):
    # brains cut to a box are not LUMIR-like for preprocess "auto"; these tests are about geometry
    run_workflow("inference.json", output_dir=str(out), moving_image=str(moving), fixed_image=str(fixed),
                 moving_label=str(moving_label), io_iterations=0, network_grid_shape=BOX_SHAPE, preprocess="off", **kw)
    return out


def _itk_warp_label(field_path, moving_label_path, fixed_path):
    """Resample the moving label map onto the fixed image with ITK's DisplacementFieldTransform."""
    stored = itk.imread(str(field_path))  # vectors of float; the transform wants double
    field = itk.GetImageFromArray(itk.array_from_image(stored).astype(np.float64), is_vector=True)
    field.CopyInformation(stored)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    moving = itk.imread(str(moving_label_path), itk.SS)
    fixed = itk.imread(str(fixed_path), itk.F)
    interpolator = itk.NearestNeighborInterpolateImageFunction[type(moving), itk.D].New()
    out = itk.resample_image_filter(moving, transform=transform, interpolator=interpolator,
                                    use_reference_image=True, reference_image=fixed)
    return np.transpose(itk.array_from_image(out), (2, 1, 0))


def test_shared_grid_pair_is_registered_exactly_as_before(tmp_path):
    """A pair on one 1 mm grid goes through untouched: the disp is the network's own field
    (bit for bit that of the default CPU path, the lean one; the same as ``EOIR.forward`` to 1e-4)."""
    files = _sample_box(tmp_path)
    out = _register(tmp_path / "out", files["moving"], files["fixed"], files["moving_label"])
    disp = np.asarray(nib.load(str(out / "disp_fixed_moving.nii.gz")).dataobj)
    net = load_weights(EOIR(start_channel=16), BUNDLE / "models/model.pt").eval()
    pair = [np.asarray(nib.load(str(files[k])).dataobj, dtype=np.float32) / 255.0 for k in ("moving", "fixed")]
    x = torch.tensor(np.stack(pair))[None]
    with torch.no_grad():
        lean = LeanEOIR(net).eval()(x)[0].permute(1, 2, 3, 0).numpy()
        plain = net(x)[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(disp, lean)
    np.testing.assert_allclose(disp, plain, atol=1e-4)


def _on_grid_of(arr, src, dst):
    """``arr`` (on the grid of file ``src``) re-indexed onto the grid of file ``dst``, for grids
    that differ by axis order, flips and integer shifts only (no interpolation), and the mask of
    ``dst`` voxels that lie inside ``src``."""
    a, b = nib.load(str(src)).affine, nib.load(str(dst)).affine
    shape = nib.load(str(dst)).shape[:3]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    src_ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(a) @ b, ijk)).astype(int)
    inside = np.all((src_ijk >= 0) & (src_ijk < np.array(arr.shape[:3])), axis=1)
    out = np.zeros((len(ijk),) + arr.shape[3:], arr.dtype)
    out[inside] = arr[tuple(src_ijk[inside].T)]
    return out.reshape(shape + arr.shape[3:]), inside.reshape(shape)


def test_reoriented_padded_pair_registers_exactly_like_the_native_pair(tmp_path):
    """Lossless geometry changes (axis order, flips, zero margins) give the native registration:
    the same field (in the new grid's voxel axes) and the same warped labels, voxel for voxel."""
    files = _sample_box(tmp_path)
    native = _register(tmp_path / "native_out", files["moving"], files["fixed"], files["moving_label"])
    d = tmp_path / "regrid"
    fixed = _regrid(files["fixed"], d / "fixed.nii.gz", 1.0, "LPS", False, pad=(12, 0, 9))
    moving = _regrid(files["moving"], d / "moving.nii.gz", 1.0, "SRA", False)
    moving_lab = _regrid(files["moving_label"], d / "moving_label.nii.gz", 1.0, "SRA", True)
    out = _register(tmp_path / "out", moving, fixed, moving_lab)

    labels = np.asarray(nib.load(str(out / "warped_label_fixed_moving.nii.gz")).dataobj)
    native_labels, inside = _on_grid_of(
        np.asarray(nib.load(str(native / "warped_label_fixed_moving.nii.gz")).dataobj), files["fixed"], fixed)
    assert inside.sum() == 96 * 128 * 96
    assert np.array_equal(labels[inside], native_labels[inside])
    # displacements in voxels along the array axes: LPS flips the first two axes' signs
    disp = np.asarray(nib.load(str(out / "disp_fixed_moving.nii.gz")).dataobj)
    native_disp, _ = _on_grid_of(np.asarray(nib.load(str(native / "disp_fixed_moving.nii.gz")).dataobj), files["fixed"], fixed)
    np.testing.assert_allclose(disp[inside], native_disp[inside] * np.array([-1, -1, 1]), atol=1e-3)


def test_any_geometry_registers_like_the_native_pair_and_itk_agrees(tmp_path):
    """Fixed at 1.3 mm LPS with another field of view (zero margins on two sides, the brain cut on a
    third), moving at 0.9 mm with permuted axes (superior, right, anterior)."""
    files = _sample_box(tmp_path)
    native = _register(tmp_path / "native_out", files["moving"], files["fixed"], files["moving_label"])
    d = tmp_path / "regrid"
    fov = dict(pad=(12, 0, 9), crop=(0, 6, 0))
    fixed = _regrid(files["fixed"], d / "fixed.nii.gz", 1.3, "LPS", False, **fov)
    fixed_lab = _regrid(files["fixed_label"], d / "fixed_label.nii.gz", 1.3, "LPS", True, **fov)
    moving = _regrid(files["moving"], d / "moving.nii.gz", 0.9, "SRA", False)
    moving_lab = _regrid(files["moving_label"], d / "moving_label.nii.gz", 0.9, "SRA", True)
    out = _register(tmp_path / "out", moving, fixed, moving_lab, save_warped=True, save_itk_transform=True)

    # Dice on the 1.3 mm fixed grid: no registration (the moving labels on that grid), the native
    # run's result on that grid, and this run. A 1.3 mm fixed image has less detail to register
    # to, the moving image is interpolated onto the network grid and the cut loses brain at one
    # edge (measured with the shipped weights: 0.70 / 0.86 / 0.82, 75 % of the gain), so this run
    # must keep at least 60 % of the native run's gain; a geometry error (flip, axis swap, shift
    # by voxels) would lose most or all of it.
    fixed_label_r = np.asarray(nib.load(str(fixed_lab)).dataobj)
    zero_dice = _mean_dice(fixed_label_r, np.asarray(nib.load(str(_regrid(
        files["moving_label"], d / "zero.nii.gz", 1.3, "LPS", True, **fov))).dataobj))
    native_dice = _mean_dice(fixed_label_r, np.asarray(nib.load(str(_regrid(
        native / "warped_label_fixed_moving.nii.gz", d / "native.nii.gz", 1.3, "LPS", True, **fov))).dataobj))
    warped_lab = nib.load(str(out / "warped_label_fixed_moving.nii.gz"))
    assert warped_lab.get_data_dtype() == nib.load(str(moving_lab)).get_data_dtype()
    ours = np.asarray(warped_lab.dataobj)
    dice = _mean_dice(fixed_label_r, ours)
    assert native_dice > zero_dice + 0.1, (zero_dice, native_dice)
    assert dice - zero_dice > 0.6 * (native_dice - zero_dice), (zero_dice, native_dice, dice)

    fixed_img = nib.load(str(fixed))
    disp = nib.load(str(out / "disp_fixed_moving.nii.gz"))
    assert disp.shape == fixed_img.shape + (3,) and np.allclose(disp.affine, fixed_img.affine)
    warped = nib.load(str(out / "warped_fixed_moving.nii.gz"))
    assert warped.shape == fixed_img.shape and np.allclose(warped.affine, fixed_img.affine)

    # ITK's DisplacementFieldTransform applies our ITK field to land the moving labels on the fixed grid
    by_itk = _itk_warp_label(out / "itk_warp_fixed_moving.nii.gz", moving_lab, fixed)
    assert abs(_mean_dice(fixed_label_r, by_itk) - dice) < 0.01
    assert (by_itk == ours).mean() > 0.98
    ants = pytest.importorskip("ants")
    by_ants = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(moving_lab)),
                                    transformlist=[str(out / "itk_warp_fixed_moving.nii.gz")],
                                    interpolator="nearestNeighbor").numpy()
    assert (by_ants == ours).mean() > 0.98

    # the warp CLI applies either saved field exactly as inference did
    for field, exact in (("disp_fixed_moving.nii.gz", True), ("itk_warp_fixed_moving.nii.gz", False)):
        cli = tmp_path / f"cli_{field}"
        res = subprocess.run([sys.executable, "-m", "scripts.warp", "--field", str(out / field), "--moving", str(moving_lab),
                              "--output", str(cli), "--fixed", str(fixed), "--nearest"],
                             cwd=BUNDLE, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        again = np.asarray(nib.load(str(cli)).dataobj)
        assert again.dtype == ours.dtype
        assert np.array_equal(again, ours) if exact else (again == ours).mean() > 0.999
    cli = tmp_path / "cli_image.nii.gz"
    subprocess.run([sys.executable, "-m", "scripts.warp", "--field", str(out / "disp_fixed_moving.nii.gz"),
                    "--moving", str(moving), "--output", str(cli)], cwd=BUNDLE, check=True, capture_output=True)
    np.testing.assert_array_equal(np.asarray(nib.load(str(cli)).dataobj), np.asarray(warped.dataobj))


def test_itk_formats_give_the_nifti_result(tmp_path):
    """.mha and .nrrd inputs (read by ITK, LPS on disk) register exactly like the same NIfTI pair."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    affine = np.array([[0, 0, -1.2, 50.0], [1.1, 0, 0, -60], [0, 0.9, 0, -40], [0, 0, 0, 1]])
    m = write_nifti(tmp_path / "m.nii.gz", smooth_volume((30, 36, 28), 1), affine)
    f = write_nifti(tmp_path / "f.nii.gz", smooth_volume((30, 36, 28), 2), affine)
    kw = dict(ckpt_path=str(ckpt), io_iterations=0, network_grid_shape=[48, 48, 48], preprocess="off",
              **{"network_def#start_channel": 8})
    run_workflow("inference.json", output_dir=str(tmp_path / "nii"), moving_image=str(m), fixed_image=str(f), **kw)
    for path, ext in ((m, ".mha"), (f, ".nrrd")):
        itk.imwrite(itk.imread(str(path)), str(path).replace(".nii.gz", ext))
    run_workflow("inference.json", output_dir=str(tmp_path / "itk"), moving_image=str(tmp_path / "m.mha"),
                 fixed_image=str(tmp_path / "f.nrrd"), **kw)
    a = nib.load(str(tmp_path / "nii/disp_f_m.nii.gz"))
    b = nib.load(str(tmp_path / "itk/disp_f_m.nii.gz"))
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b.dataobj), np.asarray(a.dataobj), atol=1e-4)


def _bad(tmp_path, case):
    vol = smooth_volume((32, 40, 32), 1).astype(np.float32)
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    fixed = write_nifti(tmp_path / "fixed.nii.gz", smooth_volume((32, 40, 32), 2), affine)
    moving, label, expect = tmp_path / "moving.nii.gz", "", None
    if case == "2d":
        write_nifti(moving, vol[:, :, 0], affine)
        expect = "must be a 3D volume"
    elif case == "4d":
        write_nifti(moving, np.stack([vol, vol], -1), affine)
        expect = "must be a 3D volume"
    elif case == "singular":
        img = nib.Nifti1Image(vol, None)
        img.set_sform(np.diag([1.2, 0.0, 1.2, 1.0]), code=2)  # nibabel cannot put it in the qform
        nib.save(img, str(moving))
        expect = "no usable affine"
    elif case == "no_orientation":
        img = nib.Nifti1Image(vol, affine)
        img.set_qform(None, code=0)
        img.set_sform(None, code=0)
        nib.save(img, str(moving))
        expect = "no orientation"
    elif case == "apart":
        far = affine.copy()
        far[:3, 3] = [300.0, 0, 0]
        write_nifti(moving, vol, far)
        expect = "barely overlap"
    elif case == "label":
        write_nifti(moving, vol, affine)
        label = write_nifti(tmp_path / "label.nii.gz", vol / 7.0, affine)  # an intensity image, not labels
        expect = "integer labels"
    return moving, fixed, label, expect


@pytest.mark.parametrize("case", ["2d", "4d", "singular", "no_orientation", "apart", "label"])
def test_bad_geometry_gets_one_clear_error_and_writes_nothing(tmp_path, case):
    moving, fixed, label, expect = _bad(tmp_path, case)
    out = tmp_path / "out"
    msg = input_error_of("inference.json", ckpt_path=str(tiny_checkpoint(tmp_path / "tiny.pt")), output_dir=str(out),
                         moving_image=str(moving), fixed_image=str(fixed), moving_label=str(label), io_iterations=0,
                         network_grid_shape=[32, 48, 32], preprocess="off", **{"network_def#start_channel": 8})
    assert expect in msg, msg
    assert str(label or moving) in msg
    if case == "apart":
        assert str(fixed) in msg
    assert not out.exists() or not any(out.iterdir())


def test_warp_cli_rejects_a_field_of_another_image(tmp_path):
    f = write_nifti(tmp_path / "f.nii.gz", smooth_volume((20, 24, 20), 1))
    other = write_nifti(tmp_path / "other.nii.gz", smooth_volume((20, 24, 22), 1))
    field = write_nifti(tmp_path / "disp_f_m.nii.gz", np.zeros((20, 24, 20, 3), np.float32))
    res = subprocess.run([sys.executable, "-m", "scripts.warp", "--field", str(field), "--moving", str(f),
                          "--output", str(tmp_path / "o.nii.gz"), "--fixed", str(other)],
                         cwd=BUNDLE, capture_output=True, text=True)
    assert res.returncode == 2 and "does not belong to" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_inverse_and_jacobian_on_another_geometry(tmp_path):
    """Fixed at 1.3 mm LPS, moving at 0.9 mm SRA (shipped weights, io 0): the inverse lies on the
    moving grid and inverts the field across the two grids; its ITK form resamples the fixed label
    map onto the moving grid like the warp CLI does with the inverse disp (and ANTs, if installed);
    the Jacobian map's mean over each warped label region is that region's moving / fixed volume
    ratio (within 3 %; the moving volume counted where the fixed box reaches, as the box cuts the
    brain: measured 1.6 % at most, 0.1 % for the whole brain)."""
    from scripts.evaluation.metrics import inverse_consistency
    from scripts.tools.inverse_check import reachable, region_volume_check

    files = _sample_box(tmp_path)
    d = tmp_path / "regrid"
    fixed = _regrid(files["fixed"], d / "fixed.nii.gz", 1.3, "LPS", False)
    fixed_lab = _regrid(files["fixed_label"], d / "fixed_label.nii.gz", 1.3, "LPS", True)
    moving = _regrid(files["moving"], d / "moving.nii.gz", 0.9, "SRA", False)
    moving_lab = _regrid(files["moving_label"], d / "moving_label.nii.gz", 0.9, "SRA", True)
    out = _register(tmp_path / "out", moving, fixed, moving_lab, save_inverse=True, save_jacobian=True,
                    save_itk_transform=True)
    fixed_img, moving_img = nib.load(str(fixed)), nib.load(str(moving))
    disp = nib.load(str(out / "disp_fixed_moving.nii.gz"))
    inverse = nib.load(str(out / "inverse_disp_fixed_moving.nii.gz"))
    assert inverse.shape == moving_img.shape + (3,) and np.allclose(inverse.affine, moving_img.affine)
    jac = nib.load(str(out / "jacdet_fixed_moving.nii.gz"))
    assert jac.shape == fixed_img.shape and np.allclose(jac.affine, fixed_img.affine)
    assert jac.get_data_dtype() == np.float32

    u = np.moveaxis(np.asarray(disp.dataobj, np.float64), -1, 0)
    w = np.moveaxis(np.asarray(inverse.dataobj, np.float64), -1, 0)
    err = inverse_consistency(u, w, fixed_img.affine, moving_img.affine)[np.asarray(fixed_img.dataobj) > 0]
    assert np.median(err) < 0.05 and np.percentile(err, 95) < 0.3, (np.median(err), np.percentile(err, 95))

    moving_label = np.asarray(nib.load(str(moving_lab)).dataobj)
    warped = np.asarray(nib.load(str(out / "warped_label_fixed_moving.nii.gz")).dataobj)
    reached = reachable(w, moving_img.affine, fixed_img.affine, fixed_img.shape)
    assert reached[moving_label > 0].mean() > 0.9
    check = region_volume_check(np.asarray(jac.dataobj), warped, fixed_img.affine, np.where(reached, moving_label, 0),
                                moving_img.affine, min_voxels=200)
    assert check["labels"] >= 20 and check["rel_error_max"] < 0.03, check
    assert abs(check["brain"]["rel_error"]) < 0.01, check["brain"]

    # the fixed label map into the moving image's space: warp CLI (inverse disp), ITK, ANTs
    back = tmp_path / "back.nii.gz"
    res = subprocess.run([sys.executable, "-m", "scripts.warp", "--field", str(out / "inverse_disp_fixed_moving.nii.gz"),
                          "--image", str(fixed_lab), "--reference", str(moving), "--output", str(back), "--nearest"],
                         cwd=BUNDLE, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ours = np.asarray(nib.load(str(back)).dataobj)
    assert ours.shape == moving_img.shape
    by_itk = _itk_warp_label(out / "itk_inverse_warp_fixed_moving.nii.gz", fixed_lab, moving)
    assert (by_itk == ours).mean() > 0.98
    unregistered = _regrid(files["fixed_label"], d / "fixed_on_moving.nii.gz", 0.9, "SRA", True)
    before = _mean_dice(moving_label, np.asarray(nib.load(str(unregistered)).dataobj))
    assert _mean_dice(moving_label, ours) > before + 0.1, (before, _mean_dice(moving_label, ours))
    ants = pytest.importorskip("ants")
    by_ants = ants.apply_transforms(ants.image_read(str(moving)), ants.image_read(str(fixed_lab)),
                                    transformlist=[str(out / "itk_inverse_warp_fixed_moving.nii.gz")],
                                    interpolator="nearestNeighbor").numpy()
    assert (by_ants == ours).mean() > 0.98
    # the inverse field belongs to the moving grid: checked against the fixed image it is refused
    res = subprocess.run([sys.executable, "-m", "scripts.warp", "--field", str(out / "inverse_disp_fixed_moving.nii.gz"),
                          "--moving", str(fixed_lab), "--fixed", str(fixed), "--output", str(tmp_path / "x.nii.gz")],
                         cwd=BUNDLE, capture_output=True, text=True)
    assert res.returncode == 2 and "moving image's grid" in res.stderr
