"""Inference workflow (configs/inference.json): LUMIR disp files, data lists, bad input."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import AFFINE, BUNDLE, input_error_of, lumir_folder, run_workflow, smooth_volume, tiny_checkpoint, write_nifti

from scripts.checkpoint import load_weights
from scripts.network import EOIR


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model8.pt")


def _infer(ckpt, out, **kw):
    # blob images, not brains: the raw-scan preprocessing (tests/test_preprocessing.py) is off
    return run_workflow("inference.json", ckpt_path=str(ckpt), output_dir=str(out), preprocess="off",
                        **{"network_def#start_channel": 8}, **kw)


@pytest.mark.parametrize("json_shape", ["authors", "challenge"])
def test_dataset_json_writes_lumir_disp_files(tmp_path, ckpt, json_shape):
    data_json = lumir_folder(tmp_path / "data", shape_of_json=json_shape)
    _infer(ckpt, tmp_path / "out", dataset_dir=str(tmp_path / "data"), data_list_file_path=str(data_json), io_iterations=0)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["disp_3455_3454.nii.gz", "disp_3456_3455.nii.gz"]  # disp_{fixed}_{moving}

    img = nib.load(str(tmp_path / "out" / "disp_3455_3454.nii.gz"))
    disp = np.asarray(img.dataobj)
    assert disp.shape == (32, 48, 32, 3) and disp.dtype == np.float32
    np.testing.assert_allclose(img.affine, AFFINE)

    # with io_iterations=0 the file holds exactly the network's field, channels last
    moving = nib.load(str(tmp_path / "data/imagesVal/LUMIRMRI_3454_0000.nii.gz")).get_fdata() / 255.0
    fixed = nib.load(str(tmp_path / "data/imagesVal/LUMIRMRI_3455_0000.nii.gz")).get_fdata() / 255.0
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    with torch.no_grad():
        ddf = net(torch.tensor(np.stack([moving, fixed])[None], dtype=torch.float32))[0]
    assert ddf.abs().max() > 0.05
    np.testing.assert_allclose(disp, ddf.permute(1, 2, 3, 0).numpy(), atol=1e-5)


def test_one_pair_by_path_overrides_the_list(tmp_path, ckpt):
    m = write_nifti(tmp_path / "a" / "sub-01_T1w.nii.gz", smooth_volume((30, 40, 33), 1))
    f = write_nifti(tmp_path / "b" / "sub-02_T1w.nii.gz", smooth_volume((30, 40, 33), 2))
    _infer(ckpt, tmp_path / "out", moving_image=str(m), fixed_image=str(f))
    disp = nib.load(str(tmp_path / "out" / "disp_sub-02_T1w_sub-01_T1w.nii.gz"))
    assert disp.shape == (30, 40, 33, 3)  # odd sizes are padded inside the network and cropped back


def _bad_pair(tmp_path, moving_array, name="bad.nii.gz"):
    f = write_nifti(tmp_path / "fixed.nii.gz", smooth_volume((32, 48, 32), 2))
    m = write_nifti(tmp_path / name, moving_array)
    return m, f


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "not found"),
        ("not3d", "must be a 3D volume"),
        ("nan", "NaN/Inf"),
    ],
)
def test_bad_images_get_one_clear_error(tmp_path, ckpt, case, expect):
    arr = smooth_volume((32, 48, 32), 1).astype(np.float32)
    if case == "not3d":
        arr = np.stack([arr, arr], -1)
    elif case == "nan":
        arr[3, 4, 5] = np.nan
    m, f = _bad_pair(tmp_path, arr)
    if case == "missing":
        m = tmp_path / "nowhere.nii.gz"
    msg = input_error_of("inference.json", ckpt_path=str(ckpt), output_dir=str(tmp_path / "out"),
                         moving_image=str(m), fixed_image=str(f), preprocess="off", **{"network_def#start_channel": 8})
    assert str(m) in msg and expect in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_dataset_json_without_pairs(tmp_path, ckpt):
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"training": [{"image": "/imagesTr/x.nii.gz"}], "validation": [{"image": "/a", "seg": "/b"}]}))
    msg = input_error_of("inference.json", ckpt_path=str(ckpt), output_dir=str(tmp_path / "out"),
                         data_list_file_path=str(bad), dataset_dir=str(tmp_path), **{"network_def#start_channel": 8})
    assert str(bad) in msg and "no registration pairs" in msg


def test_checkpoint_of_another_start_channel(tmp_path, ckpt):
    data_json = lumir_folder(tmp_path / "data")
    msg = input_error_of("inference.json", ckpt_path=str(ckpt), output_dir=str(tmp_path / "out"),
                         dataset_dir=str(tmp_path / "data"), data_list_file_path=str(data_json), preprocess="off",
                         **{"network_def#start_channel": 16})
    assert str(ckpt) in msg and "start_channel=8" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output_folder(tmp_path, ckpt):
    data_json = lumir_folder(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    msg = input_error_of("inference.json", ckpt_path=str(ckpt), output_dir=str(blocker / "out"),
                         dataset_dir=str(tmp_path / "data"), data_list_file_path=str(data_json), preprocess="off",
                         **{"network_def#start_channel": 8})
    assert str(blocker / "out") in msg and "not writable" in msg


def test_cli_prints_one_line_and_fails(tmp_path, ckpt):
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
         "--ckpt_path", str(ckpt), "--network_def#start_channel", "8", "--output_dir", str(tmp_path / "out"),
         "--moving_image", str(tmp_path / "missing.nii.gz"), "--fixed_image", str(tmp_path / "missing2.nii.gz")],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert f"error: {tmp_path / 'missing.nii.gz'}: moving image not found" in res.stderr


def test_default_command_registers_the_sample_pair(tmp_path):
    """The README's main command (sample pair, shipped weights), output redirected to tmp."""
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
         "--output_dir", str(tmp_path)],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    img = nib.load(str(tmp_path / "disp_0004_0003.nii.gz"))
    assert img.shape == (160, 224, 192, 3) and img.get_data_dtype() == np.float32
    fixed = nib.load(str(BUNDLE / "sample/imagesVal/LUMIRMRI_0004_0000.nii.gz"))
    np.testing.assert_allclose(img.affine, fixed.affine)
    assert np.isfinite(np.asarray(img.dataobj)).all()


def _labelled_folder(root):
    """:func:`lumir_folder` with a label map per image in ``labelsVal/`` (4 labels)."""
    data_json = lumir_folder(root)
    for img in sorted((root / "imagesVal").iterdir()):
        labels = (np.asarray(nib.load(str(img)).dataobj) // 64).astype(np.uint8)
        write_nifti(root / "labelsVal" / img.name, labels)
    return data_json


def test_dataset_mode_writes_labels_inverse_and_jacobian_for_every_pair(tmp_path, ckpt):
    """Every pair's moving label map is found (``labels*/`` beside ``images*/``) and warped; with
    save_inverse / save_jacobian every pair gets its inverse (consistent with the field) and
    Jacobian map; the disp files are the same bit for bit as a plain run's."""
    from scripts.evaluation.metrics import inverse_consistency
    from scripts.geometry import warp_to_fixed

    data_json = _labelled_folder(tmp_path / "data")
    kw = dict(dataset_dir=str(tmp_path / "data"), data_list_file_path=str(data_json), io_iterations=0)
    _infer(ckpt, tmp_path / "plain", **kw)
    _infer(ckpt, tmp_path / "out", save_inverse=True, save_jacobian=True, **kw)
    for fixed, moving in ((3455, 3454), (3456, 3455)):
        stem = f"{fixed}_{moving}.nii.gz"
        names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(stem))
        assert names == [f"{k}_{stem}" for k in ("disp", "inverse_disp", "jacdet", "warped_label")], names
        plain = tmp_path / "plain" / f"disp_{stem}"
        assert (tmp_path / "out" / f"disp_{stem}").read_bytes() == plain.read_bytes()
        assert sorted(p.name for p in (tmp_path / "plain").iterdir() if p.name.endswith(stem)) == [
            f"disp_{stem}", f"warped_label_{stem}"]
        disp = np.moveaxis(np.asarray(nib.load(str(plain)).dataobj), -1, 0)
        label = np.asarray(nib.load(str(tmp_path / f"data/labelsVal/LUMIRMRI_{moving}_0000.nii.gz")).dataobj)
        warped = np.asarray(nib.load(str(tmp_path / "out" / f"warped_label_{stem}")).dataobj)
        assert np.array_equal(warped, warp_to_fixed(label, AFFINE, disp, AFFINE, nearest=True))
        inverse = nib.load(str(tmp_path / "out" / f"inverse_disp_{stem}"))
        assert inverse.shape == (32, 48, 32, 3) and inverse.get_data_dtype() == np.float32
        err = inverse_consistency(disp, np.moveaxis(np.asarray(inverse.dataobj), -1, 0))[4:-4, 4:-4, 4:-4]
        # the tiny random network's field is rough: its interpolation floor is near 0.05 voxel
        assert np.median(err) < 0.1 and np.percentile(err, 95) < 0.3, (np.median(err), np.percentile(err, 95))
        jac = nib.load(str(tmp_path / "out" / f"jacdet_{stem}"))
        assert jac.shape == (32, 48, 32) and jac.get_data_dtype() == np.float32
        np.testing.assert_allclose(jac.affine, AFFINE)


def test_moving_label_maps_are_found_like_the_evaluator_finds_them(tmp_path):
    """A pair's own ``moving_label``, else the data set's ``{"image", "seg"}`` entry, else ``labels*/``."""
    from scripts.data.lists import inference_pairs

    root = tmp_path / "data"
    for sid in (1, 2, 3, 4):
        write_nifti(root / "imagesVal" / f"LUMIRMRI_{sid:04d}_0000.nii.gz", smooth_volume((8, 8, 8), sid))
    for where in ("labelsVal/LUMIRMRI_0001_0000.nii.gz", "segs/two.nii.gz", "mine/three.nii.gz"):
        write_nifti(root / where, np.zeros((8, 8, 8), np.uint8))
    pair = lambda m, f, **kw: {"moving": f"/imagesVal/LUMIRMRI_{m:04d}_0000.nii.gz",  # noqa: E731
                               "fixed": f"/imagesVal/LUMIRMRI_{f:04d}_0000.nii.gz", **kw}
    data = {"validation": [{"image": "./imagesVal/LUMIRMRI_0002_0000.nii.gz", "seg": "./segs/two.nii.gz"}],
            "test": [pair(1, 4), pair(2, 4), pair(3, 4, moving_label="/mine/three.nii.gz"), pair(4, 1)]}
    (root / "d.json").write_text(json.dumps(data))
    items = inference_pairs(str(root / "d.json"), str(root))
    assert [i.get("moving_label") for i in items] == [
        str(root / "labelsVal/LUMIRMRI_0001_0000.nii.gz"), str(root / "segs/two.nii.gz"), str(root / "mine/three.nii.gz"),
        None]
    data["test"][2]["moving_label"] = "/mine/missing.nii.gz"
    (root / "d.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="missing.nii.gz"):
        inference_pairs(str(root / "d.json"), str(root))
