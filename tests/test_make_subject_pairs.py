"""Evaluation pairs from one (here: stand-in) T1w scan: layout, label scheme, definitions shared
with the synthetic data. The stand-in is a synthetic subject of the MNI template written in
another orientation (LAS), voxel size and position, so that the affine registration has work."""

from __future__ import annotations

import contextlib
import io
import json

import nibabel as nib
import numpy as np
import pytest

from scripts.errors import InputError
from scripts.synthetic.subject_pairs import landmark_volume, main, region_labels, template_on_grid
from scripts.synthetic.lumir import (
    NUM_LABELS,
    NUM_LANDMARKS,
    tissue_classes,
    grid_affine,
    random_subject,
    template_landmarks,
    template_volumes,
)

SHAPE = (32, 48, 48)  # 5 x 4.7 x 4 mm voxels over LUMIR's field of view


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A warped template at 2.5 mm, flipped left-right (LAS), shifted 7 mm, in a padded field."""
    t1, _, _ = template_volumes((64, 96, 80))
    image, _, _, _ = random_subject(t1, None, None, 5, max_disp=3.0)
    padded = np.zeros((72, 100, 88), np.uint8)
    padded[4:68, 2:98, 4:84] = image[::-1]
    affine = grid_affine((64, 96, 80)) @ np.diag([-1.0, 1.0, 1.0, 1.0])  # flip axis 0: LAS
    affine[:3, 3] += affine[:3, :3] @ np.array([-63.0 - 4, -2, -4]) + np.array([7.0, -4.0, 3.0])
    path = tmp_path_factory.mktemp("scan") / "standin_T1w.nii.gz"
    nib.save(nib.Nifti1Image(padded.astype(np.int16), affine), str(path))
    return path


@pytest.fixture(scope="module")
def pairs_dir(standin, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "subject_pairs"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        path = main([str(standin), str(out), "--pairs", "2", "--seed", "3", "--shape", ",".join(map(str, SHAPE))])
    assert path == out / "LUMIR_dataset.json"
    assert "affine quality" in stderr.getvalue()
    return out


def test_writes_lumir_layout_with_pairs(pairs_dir):
    from scripts.data.lists import evaluation_pairs

    names = sorted(p.name for p in (pairs_dir / "imagesVal").iterdir())
    assert names == [f"LUMIRMRI_{i:04d}_0000.nii.gz" for i in range(4)]
    for folder in ("labelsVal", "landmarksVal"):
        assert sorted(p.name for p in (pairs_dir / folder).iterdir()) == names
    items = evaluation_pairs(pairs_dir / "LUMIR_dataset.json", pairs_dir)
    assert [(i["fixed"].split("/")[-1], i["moving"].split("/")[-1]) for i in items] == [
        (names[1], names[0]), (names[3], names[2])]
    assert all("fixed_label" in i and "moving_landmarks" in i for i in items)
    for cfg in ("Segmentation", "Landmark"):
        config = json.loads((pairs_dir / f"LUMIR_VAL_{cfg}_evaluation_config.json").read_text())
        assert config["expected_shape"] == [*SHAPE, 3] and len(config["eval_pairs"]) == 2
    quality = json.loads((pairs_dir / "subject" / "quality.json").read_text())
    assert quality["brain_dice"] > 0.75, quality  # the affine registration found the brain


def test_images_labels_landmarks(pairs_dir):
    imgs, labs = [], []
    for i in range(4):
        name = f"LUMIRMRI_{i:04d}_0000.nii.gz"
        img = nib.load(str(pairs_dir / "imagesVal" / name))
        assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, grid_affine(SHAPE))
        lab = np.asarray(nib.load(str(pairs_dir / "labelsVal" / name)).dataobj)
        lms = np.asarray(nib.load(str(pairs_dir / "landmarksVal" / name)).dataobj)
        values = set(np.unique(lab).tolist())
        assert values <= set(range(NUM_LABELS + 1)) and len(values) >= 25  # CSF, GM and WM regions
        assert set(np.unique(lms).tolist()) <= set(range(NUM_LANDMARKS + 1)) and lms.max() > 0
        data = np.asarray(img.dataobj)
        fg, brain = data > 0, lab > 0  # the labels cover the skull-stripped brain (bilinear vs nearest edges)
        assert 2 * (fg & brain).sum() / (fg.sum() + brain.sum()) > 0.9 and (brain & ~fg).sum() < 0.02 * brain.sum()
        imgs.append(data)
        labs.append(lab)
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(labs[0], labs[1])
    base = np.asarray(nib.load(str(pairs_dir / "subject" / "landmarks.nii.gz")).dataobj)
    assert set(np.unique(base).tolist()) == set(range(NUM_LANDMARKS + 1))


def test_label_and_landmark_definitions_match_synthetic():
    """Given the template's tissue maps, the subject's labelling reproduces the synthetic data's."""
    tmpl = template_on_grid(SHAPE)
    tissue = tissue_classes(tmpl["maskfrac"], tmpl["gm"], tmpl["wm"])
    _, labels, _ = template_volumes(SHAPE)
    np.testing.assert_array_equal(region_labels(tissue, tmpl["affine"]), labels)
    np.testing.assert_array_equal(landmark_volume(labels > 0, tmpl["affine"]), template_landmarks(SHAPE))


def test_missing_input_is_input_error(tmp_path, capsys):
    from scripts.synthetic.subject_pairs import make_pairs

    with pytest.raises(InputError, match="not found"):
        make_pairs(tmp_path / "nope.nii.gz", tmp_path / "out", 1, 0, SHAPE)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nope.nii.gz"), str(tmp_path / "out"), "--seed", "0"])
    assert exc.value.code == 2 and "T1w image not found" in capsys.readouterr().err
