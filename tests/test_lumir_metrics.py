"""LUMIR metrics (scripts.evaluation.metrics / scripts.evaluation.lumir): known answers,
independent re-computations, the digital_diffeomorphism package as reference, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.evaluation import metrics as rm
from scripts.evaluation.lumir import main as cli_main

SHAPE = (32, 48, 40)
LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 9]  # 9 is absent everywhere -> NaN, skipped


def brain_labels(shape=SHAPE, n=7, seed=0):
    """Ellipsoid 'brain' split into n Voronoi regions (labels 1..n), background 0, away from borders."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape, dtype=np.float64)
    c = (np.array(shape) / 2.0)[:, None, None, None]
    inside = (((g - c) / (np.array(shape) * 0.33)[:, None, None, None]) ** 2).sum(0) < 1
    pts = np.argwhere(inside)[rng.choice(int(inside.sum()), n, replace=False)]
    d = ((g[None] - pts[:, :, None, None, None]) ** 2).sum(1)
    lab = (np.argmin(d, 0) + 1).astype(np.int32)
    lab[~inside] = 0
    return lab


def landmark_volume(shape=SHAPE, centers=((10, 16, 14), (20, 30, 22), (14, 34, 26), (22, 14, 18))):
    """Landmark k = a 3x3x3 blob of value k (k = 1..)."""
    lm = np.zeros(shape, np.int16)
    for k, (x, y, z) in enumerate(centers, 1):
        lm[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2] = k
    return lm


def smooth_field(shape=SHAPE, amp=1.5, sigma=4.0, seed=1):
    rng = np.random.default_rng(seed)
    d = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(3)], -1)
    return d / np.abs(d).max() * amp


def shift(vol, t):
    """moving(q) = vol(q - t): then moving(p + t) = vol(p)."""
    return np.roll(vol, t, axis=(0, 1, 2))


# ---------------------------------------------------------------- known answers

def test_identity_field_is_perfect():
    lab, lm = brain_labels(), landmark_volume()
    img = (lab > 0).astype(np.uint8) * 100
    zero = np.zeros(SHAPE + (3,))
    r = rm.evaluate_pair(zero, fixed_label=lab, moving_label=lab, dice_labels=LABELS, hd95_labels=LABELS,
                         fixed_landmarks=lm, moving_landmarks=lm, moving_image=img)
    assert r["dice"] == 1.0 and r["hd95"] == 0.0 and r["tre"] == 0.0
    assert r["ndv"] == 0.0 and r["folding_pct"] == 0.0 and r["sdlogj"] == 0.0
    assert np.isnan(r["dice_per_label"][9]) and np.isnan(r["hd95_per_label"][9])
    assert r["dice_per_label"][0] == 1.0  # label 0 (background) is scored when listed, as LUMIR's config does


def test_integer_translation():
    t = (2, -3, 1)
    lab, lm = brain_labels(), landmark_volume()
    mlab, mlm = shift(lab, t), shift(lm, t)
    disp = np.broadcast_to(np.array(t, float), SHAPE + (3,))
    r = rm.evaluate_pair(disp, fixed_label=lab, moving_label=mlab, dice_labels=LABELS, hd95_labels=LABELS,
                         fixed_landmarks=lm, moving_landmarks=mlm)
    assert r["dice"] == pytest.approx(1.0) and r["hd95"] == 0.0 and r["tre"] == pytest.approx(0.0, abs=1e-12)
    assert r["folding_pct"] == 0.0 and r["sdlogj"] == pytest.approx(0.0, abs=1e-12)
    # without the field, each landmark is off by exactly |t|, and the labels overlap less
    zero = np.zeros(SHAPE + (3,))
    r0 = rm.evaluate_pair(zero, fixed_label=lab, moving_label=mlab, dice_labels=LABELS,
                          fixed_landmarks=lm, moving_landmarks=mlm)
    assert r0["tre"] == pytest.approx(np.linalg.norm(t), abs=1e-12)
    assert np.allclose(r0["tre_per_landmark"], np.linalg.norm(t))
    assert r0["dice"] < 0.95


def test_warp_convention_and_out_of_bounds():
    vol = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)
    disp = np.zeros(SHAPE + (3,))
    disp[..., 1] = 2.4  # rounds to +2
    w = rm.warp_nearest(vol, disp)
    assert np.array_equal(w[:, :-3], vol[:, 2:-1])
    # j + 2.4 > n - 1 for the last 3 columns: outside [0, n-1] reads 0 (scipy mode 'constant',
    # as the official evaluator), even where rounding would land on the last column
    assert (w[:, -3:] == 0).all()


def test_fold_gives_ndv_and_folding():
    g = np.indices(SHAPE, dtype=float)
    c = np.array([16, 24, 20.0])[:, None, None, None]
    bump = np.exp(-((g - c) ** 2).sum(0) / (2 * 3.0 ** 2))
    disp = np.zeros(SHAPE + (3,))
    disp[..., 0] = -8.0 * (g[0] - 16) / 3.0 * bump  # d u_x / dx = -8/3 at the centre: a fold
    sd, fold = rm.jacobian_stats(disp)
    assert fold > 0 and np.isfinite(sd)
    mask = np.ones(SHAPE)
    assert rm.ndv(disp, mask) > 0
    assert rm.ndv(np.zeros(SHAPE + (3,)), mask) == 0.0


def test_ndv_of_a_reflection_is_100_percent():
    # x -> -x: every one of the 10 tetrahedra per voxel is inverted; their volumes sum to 1 voxel
    disp = np.zeros((12, 10, 9, 3))
    disp[..., 0] = -2 * np.arange(12)[:, None, None]
    assert rm.ndv(disp, np.ones((12, 10, 9))) == pytest.approx(100.0, rel=1e-12)
    assert rm.jacobian_stats(disp)[1] == 100.0


def test_ndv_counts_only_the_moving_foreground_inside_the_border():
    # reflection on the lower half (axis 0 < 6), identity above: NDV is 100 % of a mask inside the
    # reflected half, 0 % of a mask inside the identity half, 50 % of a mask split evenly
    disp = np.zeros((14, 10, 9, 3))
    disp[:6, ..., 0] = -2 * np.arange(6)[:, None, None]
    img = np.zeros((14, 10, 9))
    low, high = img.copy(), img.copy()
    low[1:4, 2:8, 2:7] = 50
    high[9:12, 2:8, 2:7] = 50
    assert rm.ndv(disp, low) == pytest.approx(100.0, rel=1e-12)
    assert rm.ndv(disp, high) == 0.0
    assert rm.ndv(disp, low + high) == pytest.approx(50.0, rel=1e-12)
    # the foreground is moving > 0, and boundary voxels are removed before counting
    border = img.copy()
    border[0] = 50
    border[:, :, -1] = 50
    assert np.isnan(rm.ndv(disp, border))
    assert np.isnan(rm.ndv(disp, -low))


# ------------------------------------------- agreement with independent computations

def test_dice_and_tre_match_independent_computation():
    lab, lm = brain_labels(seed=3), landmark_volume()
    d0 = smooth_field(amp=2.0, seed=5)
    grid = np.indices(SHAPE, dtype=float)
    mlab = ndimage.map_coordinates(lab, grid + np.moveaxis(d0, -1, 0), order=0)
    mlm = ndimage.map_coordinates(lm, grid + np.moveaxis(d0, -1, 0), order=0)
    disp = smooth_field(amp=2.0, seed=6)
    r = rm.evaluate_pair(disp, fixed_label=lab, moving_label=mlab, dice_labels=LABELS,
                         fixed_landmarks=lm, moving_landmarks=mlm)
    coords = grid + np.moveaxis(disp, -1, 0)
    wl = ndimage.map_coordinates(mlab, coords, order=0)
    wlm = ndimage.map_coordinates(mlm, coords, order=0)
    expected = []
    for k in LABELS:
        a, b = lab == k, wl == k
        if a.sum() == 0 or (mlab == k).sum() == 0:
            assert np.isnan(r["dice_per_label"][k])
            continue
        expected.append(2.0 * (a & b).sum() / (a.sum() + b.sum()))
        assert r["dice_per_label"][k] == pytest.approx(expected[-1], abs=1e-12)
    assert r["dice"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0.3 < r["dice"] < 1.0
    dist = [np.linalg.norm(np.argwhere(wlm == k).mean(0) - np.argwhere(lm == k).mean(0)) for k in range(1, 5)]
    assert r["tre"] == pytest.approx(np.mean(dist), abs=1e-9) and r["tre"] > 0.1


def test_tre_landmark_lost_is_nan_like_official():
    lm = landmark_volume()
    moved = lm.copy()
    moved[moved == 2] = 0
    mean, per = rm.tre(lm, moved)
    assert np.isnan(mean) and np.isnan(per[1]) and np.allclose(np.delete(per, 1), 0)


def _brute_hd95(a, b):
    """Surface points and areas by explicit 2x2x2 loops, all pairwise distances, weighted 95th percentile."""
    table = rm.surfel_area_table((1.0, 1.0, 1.0))
    weights = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])

    def surfels(m):
        p = np.pad(m, 1)
        pts, areas = [], []
        for i in range(p.shape[0] - 1):
            for j in range(p.shape[1] - 1):
                for k in range(p.shape[2] - 1):
                    code = int((p[i:i + 2, j:j + 2, k:k + 2] * weights).sum())
                    if code not in (0, 255):
                        pts.append((i, j, k))
                        areas.append(table[code])
        return np.array(pts, float), np.array(areas)

    (pa, wa), (pb, wb) = surfels(a), surfels(b)
    dab = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min(1)
    dba = np.sqrt(((pb[:, None] - pa[None]) ** 2).sum(-1)).min(1)

    def pct(d, w):
        order = np.lexsort((w, d))
        d, w = d[order], w[order]
        cum = np.cumsum(w) / w.sum()
        return d[min(np.searchsorted(cum, 0.95), len(d) - 1)]

    return max(pct(dab, wa), pct(dba, wb))


def test_hd95_known_cubes_and_brute_force():
    a = np.zeros((20, 18, 16), bool)
    b = np.zeros_like(a)
    a[4:12, 5:13, 4:11] = True
    b[6:14, 5:13, 4:11] = True  # the same box, 2 voxels further along axis 0
    assert rm.robust_hausdorff(rm.surface_distances(a, b), 95) == pytest.approx(2.0, abs=1e-12)
    assert _brute_hd95(a, b) == pytest.approx(2.0, abs=1e-12)
    # irregular shapes: a ball against an off-centre ellipsoid touching the array border
    g = np.indices(a.shape, dtype=float)
    ball = ((g - np.array([9, 9, 8.0])[:, None, None, None]) ** 2).sum(0) < 25
    ell = (((g - np.array([12, 8, 9.0])[:, None, None, None]) / np.array([8, 4, 6.0])[:, None, None, None]) ** 2).sum(0) < 1
    fixed_lab = ball.astype(np.int32) + 2 * (ell & ~ball)
    warped_lab = ell.astype(np.int32)
    h = rm.hd95_per_label(fixed_lab, warped_lab, [1, 2])
    assert h[1] == pytest.approx(_brute_hd95(fixed_lab == 1, warped_lab == 1), abs=1e-3)
    assert np.isinf(h[2])  # label 2 present in the fixed map but vanished after warping: official inf
    assert h[1] > 0


def test_ndv_matches_digital_diffeomorphism_package():
    import torch
    from digital_diffeomorphism.jacobian_calculator_torch import calc_jacdets_3d
    from digital_diffeomorphism.utils import identity_grid_like

    rng = np.random.default_rng(0)
    disp = (rng.standard_normal((14, 16, 12, 3)) * 0.6).astype(np.float32)
    mask = rng.random((14, 16, 12)) > 0.3
    pkg = calc_jacdets_3d(disp + identity_grid_like(disp), torch.device("cpu"))
    mine = rm.tetra_jacobian_dets(disp)
    assert sorted(mine) == sorted(pkg)
    for k in mine:
        assert np.allclose(mine[k], pkg[k][1:-1, 1:-1, 1:-1], atol=1e-4)
    v = rm.ndv(disp, mask)
    assert v > 0
    assert v == pytest.approx(rm.ndv(disp, mask, backend="package"), rel=1e-5)
    assert v == pytest.approx(rm.ndv(disp, mask, slab=3), rel=1e-12)


# ------------------------------------------------------------------------- CLI

def _save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))


def _config(path, pairs, methods, shape=SHAPE):
    path.write_text(json.dumps({"name": "LUMIR", "evaluation_methods": methods, "expected_shape": list(shape) + [3],
                                "eval_pairs": [{"fixed": f"./imagesVal/LUMIRMRI_{f}_0000.nii.gz",
                                                "moving": f"./imagesVal/LUMIRMRI_{m}_0000.nii.gz"} for f, m in pairs],
                                "eval_config_version": 0.0, "masked_evaluation": False}))
    return path


@pytest.fixture
def fake_lumir(tmp_path):
    """Subjects 3454..3456: 3455 is the reference anatomy, the others it shifted by t[s]."""
    t = {"3454": (1, 2, 0), "3455": (0, 0, 0), "3456": (0, -2, 1)}
    lab, lm = brain_labels(seed=2), landmark_volume()
    root, disps = tmp_path / "LUMIR", tmp_path / "disp"
    for s, ts in t.items():
        _save((shift(lab, ts) > 0).astype(np.uint8) * 120, root / f"imagesVal/LUMIRMRI_{s}_0000.nii.gz")
        _save(shift(lab, ts).astype(np.uint8), root / f"labelsVal/LUMIRMRI_{s}_0000.nii.gz")
        _save(shift(lm, ts).astype(np.uint8), root / f"landmarksVal/LUMIRMRI_{s}_0000.nii.gz")
    for f, m in [("3455", "3454"), ("3456", "3455"), ("3456", "3454")]:
        exact = np.subtract(t[m], t[f]).astype(np.float32)
        d = np.broadcast_to(exact, SHAPE + (3,)).copy()
        if (f, m) == ("3456", "3455"):
            d[:] = 0  # this pair left unregistered
        _save(d, disps / f"disp_{f}_{m}.nii.gz")
    seg = _config(tmp_path / "seg.json", [("3455", "3454"), ("3456", "3455")],
                  [{"name": "NDV", "metric": "ndv"}, {"name": "DSC", "metric": "dice", "labels": LABELS},
                   {"name": "HD95", "metric": "hd95", "labels": LABELS}])
    lmk = _config(tmp_path / "lm.json", [("3456", "3454")],
                  [{"name": "NDV", "metric": "ndv"}, {"name": "TRE_lm", "metric": "tre", "dest": "landmarks"}])
    return dict(root=root, disps=disps, seg=seg, lmk=lmk, tmp=tmp_path, t=t)


def _args(f, out, *extra, configs=None):
    cfgs = []
    for c in configs or (f["seg"], f["lmk"]):
        cfgs += ["--config", str(c)]
    return ["--disp_dir", str(f["disps"]), "--dataset_dir", str(f["root"]), *cfgs, "--output", str(out), "--quiet", *extra]


def test_cli_end_to_end(fake_lumir, capsys):
    f = fake_lumir
    out, csv_path = f["tmp"] / "res" / "metrics.json", f["tmp"] / "res" / "labels.csv"
    cli_main(_args(f, out, "--csv", str(csv_path)))
    doc = json.loads(out.read_text())
    assert set(doc) == {"aggregates", "cases"}
    assert set(doc["aggregates"]) == {"dice", "hd95", "tre", "ndv", "sdlogj", "folding_pct"}
    assert all(set(v) == {"mean", "std"} for v in doc["aggregates"].values())
    cases = doc["cases"]
    assert list(cases) == ["3455_3454", "3456_3455", "3456_3454"]
    good, bad, lmk = cases["3455_3454"], cases["3456_3455"], cases["3456_3454"]
    assert good["fixed"] == "3455" and good["moving"] == "3454"
    assert good["dice"] == pytest.approx(1.0) and good["hd95"] == 0.0 and good["ndv"] == 0.0
    assert bad["dice"] < 0.95 and bad["hd95"] > 0
    assert "tre" not in good and "dice" not in lmk
    assert lmk["tre"] == pytest.approx(0.0, abs=1e-9) and lmk["tre_lost_landmarks"] == 0
    assert doc["aggregates"]["dice"]["mean"] == pytest.approx((good["dice"] + bad["dice"]) / 2)
    assert doc["aggregates"]["dice"]["std"] == pytest.approx(abs(good["dice"] - bad["dice"]) / 2)
    assert doc["aggregates"]["ndv"]["mean"] == 0.0  # NDV of all three pairs (both configs)
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "case,fixed,moving,label,dice,hd95"
    assert len(rows) == 1 + 2 * len(LABELS)
    assert rows[1].split(",")[:5] == ["3455_3454", "3455", "3454", "0", "1.0"]
    assert rows[len(LABELS)].split(",")[3:] == ["9", "nan", "nan"]
    assert "dice:" in capsys.readouterr().out


def _expect_exit2(capsys, argv, *names):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    for n in names:
        assert n in err, err
    return err


def test_cli_missing_disp_file_subprocess(fake_lumir, bundle_root):
    f = fake_lumir
    (f["disps"] / "disp_3456_3454.nii.gz").unlink()
    env = dict(os.environ, PYTHONPATH=str(bundle_root))
    p = subprocess.run([sys.executable, "-m", "scripts.lumir_metrics", *_args(f, f["tmp"] / "o.json")],
                       cwd=bundle_root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "disp_3456_3454.nii.gz" in p.stderr and "Traceback" not in p.stderr
    assert not (f["tmp"] / "o.json").exists()


def test_cli_wrong_shape(fake_lumir, capsys):
    f = fake_lumir
    _save(np.zeros((32, 48, 39, 3), np.float32), f["disps"] / "disp_3456_3455.nii.gz")
    err = _expect_exit2(capsys, _args(f, f["tmp"] / "o.json"), "disp_3456_3455.nii.gz", "(32, 48, 39, 3)", "(32, 48, 40, 3)")
    assert "expected" in err


def test_cli_missing_ground_truth(fake_lumir, capsys):
    f = fake_lumir
    (f["root"] / "labelsVal/LUMIRMRI_3454_0000.nii.gz").unlink()
    _expect_exit2(capsys, _args(f, f["tmp"] / "o.json"), "labelsVal/LUMIRMRI_3454_0000.nii.gz")
    (f["root"] / "landmarksVal/LUMIRMRI_3456_0000.nii.gz").unlink()
    _expect_exit2(capsys, _args(f, f["tmp"] / "o.json", configs=[f["lmk"]]), "landmarksVal/LUMIRMRI_3456_0000.nii.gz")


def test_cli_bad_configs(fake_lumir, capsys):
    f, tmp = fake_lumir, fake_lumir["tmp"]
    _expect_exit2(capsys, _args(f, tmp / "o.json", configs=[tmp / "nope.json"]), "nope.json", "not found")
    (tmp / "bad.json").write_text("{not json")
    _expect_exit2(capsys, _args(f, tmp / "o.json", configs=[tmp / "bad.json"]), "bad.json", "JSON")
    (tmp / "nopairs.json").write_text(json.dumps({"evaluation_methods": [{"metric": "ndv"}]}))
    _expect_exit2(capsys, _args(f, tmp / "o.json", configs=[tmp / "nopairs.json"]), "nopairs.json", "eval_pairs")


def test_official_configs_parse():
    from scripts.evaluation.lumir import plan_cases

    shared = Path(__file__).parent / "data" / "lumir"
    cases = plan_cases([shared / "LUMIR_VAL_Segmentation_evaluation_config.json",
                        shared / "LUMIR_VAL_Landmark_evaluation_config.json"])
    c = cases["3455_3454"]
    assert c.dice_labels[0] == 0 and len(c.dice_labels) == 133 and c.ndv and c.tre_dest is None
    assert cases["3485_3484"].tre_dest == "landmarks"
    assert all(s == ((160, 224, 192, 3)) for cc in cases.values() for s, _ in cc.shapes)
