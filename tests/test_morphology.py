"""The preprocessing's fast mask operations give exactly what the plain scipy operations give
(bounding-box dilation and erosion, the separable majority filter) and its histogram k-means the
centres of exact Lloyd iterations, to within the histogram's bin."""

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter, median_filter

from scripts.preprocessing.mni_affine import kmeans_1d
from scripts.preprocessing.morphology import ball, dilate, envelope, erode, majority


def _masks():
    rng = np.random.default_rng(0)
    blob = gaussian_filter(rng.random((48, 56, 40)), 3) > 0.5  # fills much of the box and touches its faces
    small = np.zeros((48, 56, 40), bool)
    small[20:26, 30:33, 2:5] = True  # a small object near one face
    return {"blob": blob, "small": small, "empty": np.zeros((48, 56, 40), bool)}


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (1.8, 2.0, 2.4), (1.0, 1.0, 1.0)])
@pytest.mark.parametrize("radius", [1.0, 2.0, 3.0, 5.0])
def test_dilate_and_erode_match_scipy_on_the_whole_array(spacing, radius):
    b = ball(radius, spacing)
    for name, mask in _masks().items():
        want_d = binary_dilation(mask, b) if b.size > 1 else mask
        want_e = binary_erosion(mask, b) if b.size > 1 else mask
        np.testing.assert_array_equal(dilate(mask, radius, spacing), want_d, err_msg=f"dilate {name}")
        np.testing.assert_array_equal(erode(mask, radius, spacing), want_e, err_msg=f"erode {name}")
    assert _masks()["small"].sum() < dilate(_masks()["small"], radius, spacing).sum() or b.size == 1


def test_majority_is_the_binary_median_filter():
    for name, mask in _masks().items():
        np.testing.assert_array_equal(majority(mask), median_filter(mask.astype(np.uint8), 3).astype(bool), err_msg=name)


def test_envelope_closes_a_gap_and_fills_holes():
    shell = np.zeros((30, 30, 30), bool)
    shell[5:25, 5:25, 5:25] = True
    shell[10:20, 10:20, 10:20] = False  # a cavity: filled
    shell[5:25, 15, 5:15] = False  # a 1-voxel slit into half the cube: closed by 3 mm
    out = envelope(shell, (1.0, 1.0, 1.0))
    assert out[15, 15, 15] and out[6, 15, 6] and not out[2, 2, 2]


def _lloyd(values, k, iterations=100):
    centres = np.percentile(values, np.linspace(50.0 / k, 100 - 50.0 / k, k))
    for _ in range(iterations):
        label = np.argmin(np.abs(values[:, None] - centres[None]), axis=1)
        centres = np.array([values[label == j].mean() for j in range(k)])
    return np.sort(centres)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_histogram_kmeans_matches_lloyd(k):
    rng = np.random.default_rng(k)
    values = np.concatenate([rng.normal(0.1, 0.03, 40000), rng.normal(0.45, 0.05, 30000),
                             rng.normal(0.7, 0.05, 30000), rng.normal(0.9, 0.02, 5000)])
    got = kmeans_1d(values, k)
    want = _lloyd(values, k)
    assert np.all(np.diff(got) > 0.02)  # k distinct classes
    np.testing.assert_allclose(got, want, atol=2 * np.ptp(values) / 4096)
