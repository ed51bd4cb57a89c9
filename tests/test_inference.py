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
