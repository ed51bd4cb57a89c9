"""Synthetic LUMIR data from the MNI152 template: layout, reproducibility, known warps."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.errors import InputError
from scripts.synthetic.lumir import (
    CSF_LABELS,
    FULL_SHAPE,
    GM_FIRST,
    NUM_LABELS,
    NUM_LANDMARKS,
    WM_FIRST,
    grid_affine,
    label_names,
    main,
    make_dataset,
    parse_shape,
    random_subject,
    template_landmarks,
    template_volumes,
)

SHAPE = (32, 48, 48)  # tiny but brain-like: 5 x 4.7 x 4 mm voxels over LUMIR's field of view
N_TRAIN, N_VAL, SEED = 2, 2, 7
REAL_LUMIR = Path(__file__).parent / "data" / "lumir"  # the challenge's own files


def _run_cli(bundle_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "scripts.make_synthetic_lumir", *args],
        cwd=bundle_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory) -> tuple[Path, str, str]:
    """The CLI's ``main`` in this process (a new process would import MONAI again: ~8 s of CPU);
    ``test_bad_shape_is_input_error`` runs ``python -m scripts.make_synthetic_lumir`` itself."""
    out = tmp_path_factory.mktemp("synthetic") / "lumir"
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [str(out), "--subjects", str(N_TRAIN), "--seed", str(SEED), "--shape", ",".join(map(str, SHAPE))]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = main([*argv, "--val_subjects", str(N_VAL)])
    assert result == out / "LUMIR_dataset.json"
    return out, stdout.getvalue(), stderr.getvalue()


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine, img.get_data_dtype()


def _dice_mean(a: np.ndarray, b: np.ndarray) -> float:
    scores = []
    for v in np.union1d(np.unique(a), np.unique(b)):
        if v == 0:
            continue
        x, y = a == v, b == v
        scores.append(2.0 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def _jacobian_det(ddf: np.ndarray) -> np.ndarray:
    """det(I + grad ddf), central differences (one-sided at the border), voxel units."""
    grads = [np.gradient(ddf[i].astype(np.float64)) for i in range(3)]
    jac = np.empty(ddf.shape[1:] + (3, 3))
    for i in range(3):
        for j in range(3):
            jac[..., i, j] = grads[i][j] + (1.0 if i == j else 0.0)
    return np.linalg.det(jac)


# ------------------------------------------------------------------------------- layout


def test_cli_writes_lumir_layout(cli_dataset):
    out, stdout, stderr = cli_dataset
    total = N_TRAIN + 2 * N_VAL
    assert stdout.strip().splitlines()[-1] == str(out / "LUMIR_dataset.json")
    progress = [line for line in stderr.splitlines() if line.startswith("subject ")]
    assert len(progress) == total and progress[-1].startswith(f"subject {total}/{total}") and "ETA" in progress[0]

    ds = json.loads((out / "LUMIR_dataset.json").read_text())
    assert ds["tensorImageShape"]["0"] == list(SHAPE)
    assert ds["numTraining"] == N_TRAIN == len(ds["training"])
    assert ds["numValidation"] == N_VAL == len(ds["validation"])
    assert ds["numTest"] == N_VAL - 1 == len(ds["test"])
    assert [e["image"] for e in ds["training"]] == [f"/imagesTr/LUMIRMRI_{i:04d}_0000.nii.gz" for i in range(N_TRAIN)]
    val_ids = range(N_TRAIN, N_TRAIN + N_VAL)
    assert ds["validation"] == [
        {"image": f"/imagesTr/{name}", "seg": f"/SanityCheckLabelsTr/{name}"}
        for name in (f"LUMIRMRI_{i:04d}_0000.nii.gz" for i in val_ids)
    ]
    eval_ids = list(range(N_TRAIN + N_VAL, N_TRAIN + 2 * N_VAL))
    assert ds["test"] == [
        {"fixed": f"/imagesVal/LUMIRMRI_{f:04d}_0000.nii.gz", "moving": f"/imagesVal/LUMIRMRI_{m:04d}_0000.nii.gz"}
        for f, m in zip(eval_ids[1:], eval_ids[:-1])
    ]
    real = json.loads((REAL_LUMIR / "LUMIR_dataset.json").read_text())  # same keys as the real one
    assert set(real) == set(ds)

    listed = [e["image"] for e in ds["training"]] + [v for e in ds["validation"] for v in e.values()]
    listed += [v for e in ds["test"] for v in e.values()]
    for rel in listed:
        assert (out / rel.lstrip("/")).is_file(), rel

    _, _, affine = template_volumes(SHAPE)
    for rel in {e["image"] for e in ds["training"] + ds["validation"]} | {v for e in ds["test"] for v in e.values()}:
        arr, aff, dtype = _load(out / rel.lstrip("/"))
        assert dtype == np.uint8 and arr.shape == SHAPE
        assert np.allclose(aff, affine)
        assert arr.max() > 200 and 0.15 < (arr > 0).mean() < 0.6  # a brain, background 0
        assert arr[0, 0, 0] == arr[-1, -1, -1] == 0

    for i in eval_ids:
        name = f"LUMIRMRI_{i:04d}_0000.nii.gz"
        seg, _, seg_dtype = _load(out / "labelsVal" / name)
        lms, _, _ = _load(out / "landmarksVal" / name)
        img, _, _ = _load(out / "imagesVal" / name)
        assert np.issubdtype(seg_dtype, np.integer) and seg.shape == SHAPE
        assert len(np.unique(seg)) > 15
        assert set(np.unique(seg)) <= set(range(NUM_LABELS + 1))
        assert sorted(np.unique(lms)) == list(range(NUM_LANDMARKS + 1))
        assert (img[seg > 0] > 0).mean() > 0.99  # labelled voxels are foreground of the image
    for i in val_ids:
        seg, _, _ = _load(out / "SanityCheckLabelsTr" / f"LUMIRMRI_{i:04d}_0000.nii.gz")
        assert len(np.unique(seg)) > 15


def test_evaluation_configs_have_official_format(cli_dataset):
    out = cli_dataset[0]
    ds = json.loads((out / "LUMIR_dataset.json").read_text())
    pairs = [{k: "." + v for k, v in e.items()} for e in ds["test"]]
    seg = json.loads((out / "LUMIR_VAL_Segmentation_evaluation_config.json").read_text())
    lm = json.loads((out / "LUMIR_VAL_Landmark_evaluation_config.json").read_text())
    for cfg in (seg, lm):
        assert cfg["expected_shape"] == [*SHAPE, 3]
        assert cfg["eval_pairs"] == pairs
        assert cfg["masked_evaluation"] is False and "eval_config_version" in cfg
        for pair in cfg["eval_pairs"]:
            assert pair["fixed"].startswith("./imagesVal/") and (out / pair["fixed"]).is_file()
    metrics = {m["metric"]: m for m in seg["evaluation_methods"]}
    assert set(metrics) == {"ndv", "dice", "hd95"}
    assert metrics["dice"]["labels"][0] == 0 and metrics["dice"]["labels"] == list(range(NUM_LABELS + 1))
    assert metrics["hd95"]["labels"] == metrics["dice"]["labels"]
    assert {m["metric"]: m.get("dest") for m in lm["evaluation_methods"]} == {"ndv": None, "tre": "landmarks"}
    for name, ours in (("Segmentation", seg), ("Landmark", lm)):
        real = json.loads((REAL_LUMIR / f"LUMIR_VAL_{name}_evaluation_config.json").read_text())
        assert set(real) == set(ours)
        assert type(real["eval_config_version"]) is type(ours["eval_config_version"])
    labels = json.loads((out / "labels.json").read_text())
    assert labels["labels"]["0"] == "background" and len(labels["labels"]) == NUM_LABELS + 1
    assert len(labels["landmarks"]) == NUM_LANDMARKS


def test_same_seed_same_arrays_other_seed_differs(cli_dataset, tmp_path):
    out = cli_dataset[0]
    again = make_dataset(tmp_path / "again", N_TRAIN, SEED, SHAPE, N_VAL).parent
    other = make_dataset(tmp_path / "other", N_TRAIN, SEED + 1, SHAPE, N_VAL).parent
    assert (again / "LUMIR_dataset.json").read_text() == (out / "LUMIR_dataset.json").read_text()
    rels = [p.relative_to(out) for p in sorted(out.glob("*/*.nii.gz"))]
    assert len(rels) == (N_TRAIN + N_VAL) + N_VAL + 3 * N_VAL
    for rel in rels:
        a, b = _load(out / rel)[0], _load(again / rel)[0]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), rel
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel  # the files too
    for rel in (Path("imagesTr/LUMIRMRI_0000_0000.nii.gz"), Path("labelsVal/LUMIRMRI_0005_0000.nii.gz")):
        assert not np.array_equal(_load(out / rel)[0], _load(other / rel)[0]), rel


# ------------------------------------------------------------------------------- template


def test_template_on_lumir_grid_keeps_mni_coordinates():
    t1, labels, affine = template_volumes(FULL_SHAPE)
    assert t1.shape == labels.shape == FULL_SHAPE and t1.dtype == np.float32 and labels.dtype == np.int16
    assert 0.0 <= t1.min() and t1.max() <= 1.0
    assert np.allclose(np.diag(affine)[:3], 1.0)
    # same intensity at the same MNI point as nilearn's template
    from nilearn.datasets import load_mni152_template

    mni = load_mni152_template(resolution=1)
    data = mni.get_fdata()
    for world in ([0.0, 0.0, 0.0], [-30.0, -20.0, 40.0], [20.0, 50.0, -10.0]):
        ours = np.rint(np.linalg.inv(affine) @ [*world, 1.0])[:3].astype(int)
        theirs = np.rint(np.linalg.inv(mni.affine) @ [*world, 1.0])[:3].astype(int)
        assert t1[tuple(ours)] == pytest.approx(data[tuple(theirs)], abs=1e-6)
    assert np.count_nonzero(t1) == np.count_nonzero(data)  # the whole brain is in view
    # a coarse grid spans the same field of view: its corner voxel centres sit inside the full grid's
    small = grid_affine(SHAPE)
    s = np.array(FULL_SHAPE) / np.array(SHAPE)
    assert np.allclose(np.diag(small)[:3], s)
    assert np.allclose(small @ [0, 0, 0, 1], affine @ [*((s - 1) / 2), 1])


@pytest.mark.parametrize("shape", [SHAPE, (64, 64, 64)])
def test_template_labels_and_landmarks(shape):
    t1, labels, affine = template_volumes(shape)
    assert t1.shape == labels.shape == shape
    for face in (t1[0], t1[-1], t1[:, 0], t1[:, -1], t1[:, :, 0], t1[:, :, -1]):
        assert face.max() == 0  # brain inside the field of view
    values = set(np.unique(labels))
    assert values == set(range(NUM_LABELS + 1)) and len(label_names()) == NUM_LABELS + 1
    assert ((labels > 0) <= (t1 > 0)).all()
    # symmetric template: left/right regions (x < 0 is left, low array index) have similar sizes
    for first in (GM_FIRST, WM_FIRST):
        for region in range(8):  # 8 regions per hemisphere per tissue
            left, right = int((labels == first + region).sum()), int((labels == first + 8 + region).sum())
            assert abs(left - right) < 0.3 * max(left, right), (first, region, left, right)
            assert np.argwhere(labels == first + region)[:, 0].mean() < shape[0] / 2
            assert np.argwhere(labels == first + 8 + region)[:, 0].mean() > shape[0] / 2
    assert (labels == CSF_LABELS[0]).sum() > 0 and (labels == CSF_LABELS[1]).sum() > 0
    lms = template_landmarks(shape)
    assert sorted(np.unique(lms)) == list(range(NUM_LANDMARKS + 1))
    for k in range(1, NUM_LANDMARKS + 1):
        assert (lms == k).sum() == 27  # 3x3x3 blobs, apart from each other
    centres = [np.argwhere(lms == k).mean(0).round().astype(int) for k in range(1, NUM_LANDMARKS + 1)]
    assert all(labels[tuple(c)] > 0 for c in centres)  # inside the brain


def test_bad_shape_is_input_error(bundle_root, tmp_path):
    for bad in ("32,48,40", "32,48", "a,b,c", "0,16,16"):
        with pytest.raises(InputError):
            parse_shape(bad)
    with pytest.raises(InputError, match="multiple of 16"):
        template_volumes((32, 48, 40))
    with pytest.raises(InputError):
        make_dataset(tmp_path / "x", 1, 0, (33, 48, 48))
    with pytest.raises(InputError):
        make_dataset(tmp_path / "x", 1, 0, SHAPE, val_subjects=1)
    proc = _run_cli(bundle_root, str(tmp_path / "y"), "--subjects", "1", "--seed", "0", "--shape", "32,48,40")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "16" in lines[0], proc.stderr
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------- subjects


@pytest.fixture(scope="module")
def template64():
    shape = (64, 64, 64)
    t1, labels, _ = template_volumes(shape)
    return t1, labels, template_landmarks(shape)


def test_subject_is_template_warped_by_returned_ddf(template64):
    from monai.networks.blocks import Warp

    t1, labels, lms = template64
    image, seg, warped_lms, ddf = random_subject(t1, labels, lms, 3)
    assert image.dtype == np.uint8 and image.shape == t1.shape and image.max() == 255
    assert seg.dtype == labels.dtype and warped_lms.dtype == lms.dtype
    assert ddf.shape == (3, *t1.shape) and ddf.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Using PyTorch native grid_sample"
        warp = Warp(mode="nearest", padding_mode="zeros")
    ddf_t = torch.from_numpy(ddf)[None]
    with torch.no_grad():
        rewarped = warp(torch.from_numpy(labels.astype(np.float32))[None, None], ddf_t)[0, 0].numpy()
        rewarped_lms = warp(torch.from_numpy(lms.astype(np.float32))[None, None], ddf_t)[0, 0].numpy()
    assert (rewarped.round() == seg).mean() > 0.99
    assert (rewarped_lms.round() == warped_lms).mean() > 0.99
    assert sorted(np.unique(warped_lms)) == list(range(NUM_LANDMARKS + 1))
    dice = _dice_mean(labels, seg)
    assert 0.3 < dice < 0.95, dice
    # the image follows the labels: brain voxels of the subject are bright where WM is
    assert image[seg >= WM_FIRST].mean() > image[(seg >= GM_FIRST) & (seg < WM_FIRST)].mean()


@pytest.mark.parametrize("seed,max_disp", [(0, None), (1, 8.0), (2, 8.0)])
def test_warp_is_diffeomorphic(template64, seed, max_disp):
    t1, labels, _ = template64
    _, seg, _, ddf = random_subject(t1, labels, None, seed, max_disp=max_disp)
    det = _jacobian_det(ddf)
    assert det.min() > 0, det.min()
    assert np.abs(ddf).max() > 0.5  # a real deformation (voxel units; 8 mm is ~2-3 voxels here)
    assert _dice_mean(labels, seg) < 0.95


def test_random_subject_reproducible_and_options(template64):
    t1, labels, _ = template64
    a = random_subject(t1, labels, None, 5)
    b = random_subject(t1, labels, None, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip((a[0], a[1], a[3]), (b[0], b[1], b[3])))
    assert a[2] is None
    image, none_labels, _, ddf = random_subject(t1, None, None, 5, max_disp=0.0, affine=False, intensity=False)
    assert none_labels is None and np.abs(ddf).max() < 1e-5
    # no warp, no intensity change: the template rescaled to uint8
    expected = np.clip(np.rint(t1 / np.quantile(t1[t1 > 1e-6], 0.999) * 255), 0, 255)
    fg = t1 > 1e-6
    assert np.abs(image[fg].astype(int) - np.maximum(expected[fg], 1)).max() <= 1
    assert (image[~fg] == 0).all()
