"""QC pictures: Jacobian determinant, MONAI warping, deformed grid, PNG/TensorBoard rendering, CLI."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from scripts.evaluation import qc
from scripts.evaluation.metrics import jacobian_determinant
from scripts.errors import InputError

SHAPE = (12, 16, 20)  # all sides different: catches axis mix-ups


def _coords(shape=SHAPE):
    return np.indices(shape).astype(np.float32)


def _blob(shape=SHAPE, seed=0):
    """Smooth, non-symmetric test volume in [0, 1]."""
    x = _coords(shape)
    c = [(n - 1) / 2 for n in shape]
    r2 = sum(((x[i] - c[i]) / (0.35 * shape[i])) ** 2 for i in range(3))
    return (np.exp(-r2) + 0.2 * x[0] / shape[0] + 0.05 * np.random.default_rng(seed).random(shape)).astype(np.float32)


def _smooth_ddf(shape=SHAPE, amp=1.5):
    x = _coords(shape)
    return np.stack(
        [amp * np.sin(2 * np.pi * x[(i + 1) % 3] / shape[(i + 1) % 3]) for i in range(3)]
    ).astype(np.float32)


# --------------------------------------------------------------------------- Jacobian


def test_jacobian_zero_field_is_one():
    jac = jacobian_determinant(np.zeros((3, *SHAPE), np.float32))
    assert jac.shape == SHAPE and jac.dtype == np.float32
    np.testing.assert_array_equal(jac, 1.0)


@pytest.mark.parametrize("a", [0.1, -0.3])
def test_jacobian_linear_field(a):
    ddf = a * _coords()  # ddf_i = a * x_i -> J = (1 + a)^3 everywhere (borders included)
    np.testing.assert_allclose(jacobian_determinant(ddf), (1 + a) ** 3, rtol=1e-5)


def test_jacobian_shear_and_anisotropic_field():
    x = _coords()
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[0] = 0.5 * x[1]  # shear: det unchanged
    ddf[2] = 0.25 * x[2]  # stretch axis 2 only
    np.testing.assert_allclose(jacobian_determinant(ddf), 1.25, rtol=1e-5)


def test_jacobian_folding_field_is_negative():
    x = _coords()
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[1] = -2.0 * x[1]  # p + ddf(p) reverses axis 1: J = -1
    np.testing.assert_allclose(jacobian_determinant(ddf), -1.0, rtol=1e-5)
    # a local fold in an otherwise smooth field
    c = np.array(SHAPE) // 2
    r2 = sum((x[i] - c[i]) ** 2 for i in range(3))
    local = np.zeros((3, *SHAPE), np.float32)
    local[0] = -6.0 * np.exp(-r2 / 8.0) * (x[0] - c[0]) / 2.0
    jac = jacobian_determinant(local)
    assert jac[tuple(c)] < 0 and (jac <= 0).sum() < jac.size // 10
    assert jac[0, 0, 0] == pytest.approx(1.0, abs=1e-3)


def test_jacobian_rejects_bad_shape():
    with pytest.raises(InputError, match=r"\(3, H, W, D\)"):
        jacobian_determinant(np.zeros((2, *SHAPE)))


# --------------------------------------------------------------------------- warping


def test_warp_integer_translation():
    moving = np.random.default_rng(1).integers(1, 200, size=SHAPE).astype(np.float32)
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[0], ddf[1], ddf[2] = 2.0, -3.0, 0.0  # warped[i, j, k] = moving[i + 2, j - 3, k]
    expected = moving[2:, :-3, :]
    lin = qc.warp_image(moving, ddf, order=1)
    near = qc.warp_image(moving.astype(np.int16), ddf, order=0)
    assert lin.shape == SHAPE and lin.dtype == np.float32 and near.dtype == np.int16
    np.testing.assert_array_equal(near[:-2, 3:, :], expected.astype(np.int16))
    # bilinear at integer positions: exact up to float32 rounding of the normalised grid
    np.testing.assert_allclose(lin[:-2, 3:, :], expected, rtol=0, atol=1e-3)
    # zeros padding outside the moving image
    assert (near[-2:] == 0).all() and (near[:, :3] == 0).all()
    np.testing.assert_allclose(lin[-2:], 0.0, atol=1e-3)


def test_warp_labels_stay_labels_and_accepts_torch():
    torch = pytest.importorskip("torch")
    labels = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 7).astype(np.uint8)
    ddf = _smooth_ddf()
    out = qc.warp_image(torch.from_numpy(labels)[None, None], torch.from_numpy(ddf)[None], order=0)
    assert out.dtype == np.uint8 and out.shape == SHAPE
    assert set(np.unique(out)) <= set(range(7))
    with pytest.raises(InputError, match="does not match"):
        qc.warp_image(labels, np.zeros((3, 12, 16, 19), np.float32))


# --------------------------------------------------------------------------- deformed grid


def test_deformed_grid_identity_and_shift():
    zero = np.zeros((3, *SHAPE), np.float32)
    lines = qc.deformed_grid(zero, axis=0, spacing=4)
    # slice through axis 0 shows axes 1 (16 long) and 2 (20 long): 5 lines of constant
    # axis-2 coordinate running along axis 1 (16 points), then 4 along axis 2 (20 points)
    along_a = [ln for ln in lines if len(ln) == 16]
    along_b = [ln for ln in lines if len(ln) == 20]
    assert len(along_a) == 5 and len(along_b) == 4 and len(lines) == 9
    for ln in along_a:
        np.testing.assert_array_equal(ln[:, 0], np.arange(16))
        assert np.unique(ln[:, 1]).size == 1
    shifted = zero.copy()
    shifted[1], shifted[2], shifted[0] = 1.5, -0.5, 100.0  # out-of-plane component ignored
    moved = qc.deformed_grid(shifted, axis=0, spacing=4)
    for a, b in zip(lines, moved):
        np.testing.assert_allclose(b - a, [[1.5, -0.5]] * len(a))
    with pytest.raises(InputError):
        qc.deformed_grid(zero, axis=3)


# --------------------------------------------------------------------------- rendering


def _read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_save_qc_png(tmp_path):
    fixed, moving, ddf = _blob(), _blob(seed=1), _smooth_ddf()
    out = qc.save_qc_png(tmp_path / "sub" / "qc.png", fixed, moving, ddf, title="test")
    assert out == tmp_path / "sub" / "qc.png" and out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["qc.png"]  # no temporary left behind
    img = _read_png(out)
    h, w, _ = img.shape
    assert 500 <= w <= 4000 and 300 <= h <= 2000 and w > h
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_qc_figure_layout_and_titles():
    x = _coords()
    ddf = np.zeros((3, *SHAPE), np.float32)
    ddf[0] = -2.0 * x[0]  # folds everywhere
    fig = qc.qc_figure(_blob(), _blob(seed=1), ddf, title="t", affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == 21
    grid = np.array(axes).reshape(3, 7)
    titles = [ax.get_title() for ax in grid[0]]
    assert "mean over volume" in titles[3] and "mean over volume" in titles[4]
    assert "folding" in titles[6] and "100%" in titles[6]
    # row r = slice through axis r; horizontal = lower remaining axis, with direction codes
    assert grid[0, 0].get_xlabel().startswith("axis 1") and "axis 2" in grid[0, 0].get_ylabel()
    assert grid[1, 0].get_xlabel().startswith("axis 0") and "axis 2" in grid[1, 0].get_ylabel()
    assert grid[2, 0].get_xlabel() == "axis 0 (\u2192R)" and "axis 1 (\u2192A)" in grid[2, 0].get_ylabel()
    # displayed array is slice.T: rows = vertical axis (2), columns = horizontal axis (1)
    assert grid[0, 0].images[0].get_array().shape == (SHAPE[2], SHAPE[1])
    assert grid[2, 0].images[0].get_array().shape == (SHAPE[1], SHAPE[0])
    # difference columns share one colour scale; Jacobian 0..2
    assert grid[0, 3].images[0].get_clim() == grid[2, 4].images[0].get_clim()
    assert grid[1, 6].images[0].get_clim() == (0.0, 2.0)
    assert len(fig.axes) == 23  # two colour bars


def test_to_tensorboard_image():
    torch = pytest.importorskip("torch")
    fixed, moving = torch.from_numpy(_blob())[None, None], torch.from_numpy(_blob(seed=1))[None, None]
    img = qc.to_tensorboard_image(fixed, moving, torch.from_numpy(_smooth_ddf())[None])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[0] == 3
    assert img.shape[2] > 2 * img.shape[1] and img.std() > 10


# --------------------------------------------------------------------------- command line


def _write(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), str(path))
    return str(path)


def _cli_files(tmp_path, disp_shape=SHAPE):
    fixed = _write(tmp_path / "fixed.nii.gz", (255 * _blob()).astype(np.uint8))
    moving = _write(tmp_path / "moving.nii.gz", (255 * _blob(seed=1)).astype(np.uint8))
    disp = _write(tmp_path / "disp.nii.gz", np.moveaxis(_smooth_ddf(disp_shape), 0, -1))  # (H, W, D, 3)
    return fixed, moving, disp


def test_cli_writes_png(tmp_path, capsys):
    # in-process (a subprocess would import torch and MONAI a second time: ~10 s)
    fixed, moving, disp = _cli_files(tmp_path)
    out = tmp_path / "qc.png"
    assert qc.main(["--fixed", fixed, "--moving", moving, "--disp", disp, "--output", str(out)]) == out
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert _read_png(out).std() > 10


def _run_cli(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "scripts.qc", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_missing_file_and_shape_mismatch(tmp_path, bundle_root, capsys):
    # the real command line (cheap: a failing check never imports torch)
    fixed, moving, disp = _cli_files(tmp_path)
    missing = str(tmp_path / "nope_moving.nii.gz")
    args = ["--fixed", fixed, "--moving", missing, "--disp", disp, "--output", str(tmp_path / "a.png")]
    res = _run_cli(bundle_root, *args)
    assert res.returncode == 2
    assert res.stderr.startswith("error:") and "nope_moving.nii.gz" in res.stderr and "not found" in res.stderr
    assert "Traceback" not in res.stderr

    bad = _write(tmp_path / "bad_disp.nii.gz", np.zeros((*SHAPE[:2], SHAPE[2] - 1, 3), np.float32))
    with pytest.raises(SystemExit) as exc:
        qc.main(["--fixed", fixed, "--moving", moving, "--disp", bad, "--output", str(tmp_path / "b.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bad_disp.nii.gz" in err and "(12, 16, 19, 3)" in err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
