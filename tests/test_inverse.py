"""Inverse fields and Jacobian maps: known maps with known inverses and volumes, the network's and
instance optimisation's inverses, the field unchanged with the inverse on."""

import numpy as np
import pytest
import torch
from helpers import smooth_volume

from scripts.disp_writer import jacobian_map
from scripts.evaluation.metrics import inverse_consistency
from scripts.geometry import moving_coordinates
from scripts.instance_optimization import InstanceOptimizationInferer
from scripts.inverse import fixed_point_inverse, invert_levels
from scripts.layers import ScriptableDVF2DDF, ScriptableWarp
from scripts.lean import LeanEOIR
from scripts.network import EOIR

SHAPE = (24, 32, 28)


def _grid(shape):
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))[None]


def _linear_field(matrix, shape):
    """``(matrix - I) (x - c)``: the displacement of a linear map about the grid's centre, ``(1, 3, *shape)``."""
    c = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    m = torch.as_tensor(matrix, dtype=torch.float64) - torch.eye(3, dtype=torch.float64)
    return torch.einsum("ij,bj...->bi...", m, _grid(shape) - c)


def _interior(t, margin=5):
    return t[..., margin:-margin, margin:-margin, margin:-margin]


def _ic(u, w):
    """Median and 95th percentile of ``|w(x + u(x)) + u(x)|`` away from the border (voxels)."""
    e = _interior((ScriptableWarp(padding_mode="border")(w, u) + u).norm(dim=1)[0]).flatten().double()
    return float(e.median()), float(torch.quantile(e, 0.95))


AFFINE_MAP = np.array([[1.08, 0.05, 0.0], [-0.03, 0.95, 0.04], [0.02, 0.0, 1.03]])


def test_fixed_point_inverse_of_an_affine_map_is_its_inverse():
    u = _linear_field(AFFINE_MAP, SHAPE)
    known = _linear_field(np.linalg.inv(AFFINE_MAP), SHAPE)
    w = fixed_point_inverse(u)
    assert float(_interior(w - known, 4).abs().max()) < 1e-4


def test_reverse_composition_of_velocities_inverts_the_composed_map():
    """A two-level map built the network's way from linear velocities (exp(v) is then linear: its
    inverse is known) is inverted from the velocities, without any search."""
    integrate = ScriptableDVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros")
    warp = ScriptableWarp(padding_mode="zeros")
    gen = np.array([[0.06, 0.02, 0.0], [-0.02, -0.04, 0.03], [0.01, 0.0, 0.05]])
    coarse = tuple(n // 2 for n in SHAPE)
    v1, v0 = _linear_field(np.eye(3) + gen, coarse), _linear_field(np.eye(3) - 0.5 * gen.T, SHAPE)
    # one level: exp(-v) against the matrix exponential's inverse
    known = _linear_field(np.linalg.inv(_expm(gen)), coarse)
    assert float(_interior(invert_levels([v1], integrate, warp, EOIR.upsample_field) - known, 3).abs().max()) < 2e-3
    # two levels, composed as EOIR.level_step does: u = phi_0 + warp(up(u_1), phi_0)
    phi0 = integrate(v0)
    u = phi0 + warp(EOIR.upsample_field(integrate(v1)), phi0)
    w = invert_levels([v0, v1], integrate, warp, EOIR.upsample_field)
    median, p95 = _ic(u, w)
    assert median < 0.01 and p95 < 0.02, (median, p95)


def _expm(a):
    out, term = np.eye(3), np.eye(3)
    for k in range(1, 20):
        term = term @ a / k
        out = out + term
    return out


@pytest.fixture(scope="module")
def pair_and_net():
    torch.manual_seed(0)
    net = EOIR(start_channel=8).eval()
    with torch.no_grad():  # a field of up to 3 voxels, gradients up to 0.7, from a random network
        for level, est in enumerate(net.estimators):
            est.flow.conv.weight.normal_(0.0, 0.05 if level else 0.01)
    shape = (32, 48, 32)
    x = torch.tensor(np.stack([smooth_volume(shape, 1), smooth_volume(shape, 2)])[None] / 255.0, dtype=torch.float32)
    return x, net


def test_network_inverse_from_its_velocities_lean_and_plain(pair_and_net):
    x, net = pair_and_net
    with torch.no_grad():
        ddf, inv = net.forward_with_inverse(x)
        assert torch.equal(ddf, net(x))
        lean_ddf, lean_inv = LeanEOIR(net).eval().forward_with_inverse(x)
        assert torch.equal(lean_ddf, LeanEOIR(net).eval()(x))  # the field is unchanged by asking for the inverse
    np.testing.assert_allclose(lean_inv.numpy(), inv.numpy(), atol=1e-4)
    assert float(ddf.abs().max()) > 2.0
    # on this tiny grid (coarsest level 2 x 3 x 2) the reverse composition alone is rough (see
    # scripts.inverse); the inferer refines it (next test)
    median, p95 = _ic(ddf, inv)
    naive = _ic(ddf, -ddf)
    assert median < 0.6 * naive[0] and p95 < 0.7 * naive[1], (median, p95, naive)


class _NoVelocities(torch.nn.Module):
    """A network that only gives its field (as a TorchScript export does)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("io, init", [(0, "warm_start"), (6, "warm_start"), (6, "compose")])
def test_inferer_returns_a_consistent_inverse_and_the_same_field(pair_and_net, io, init):
    x, net = pair_and_net
    kw = dict(io_iterations=io, io_init=init, io_levels=1, io_level=1)
    plain = InstanceOptimizationInferer(**kw)
    with_inverse = InstanceOptimizationInferer(**kw, return_inverse=True)
    with torch.no_grad():
        ddf = plain(x, net)
        out = with_inverse(x, net)
    assert torch.equal(out["ddf"], ddf)  # bit for bit
    assert with_inverse.last_inverse == "velocities"
    median, p95 = _ic(out["ddf"], out["inverse"])
    assert median < 0.05 and p95 < 0.15, (median, p95)
    if io == 0:  # without velocities: fixed-point iteration
        other = InstanceOptimizationInferer(**kw, return_inverse=True)
        with torch.no_grad():
            fp = other(x, _NoVelocities(net))
        assert other.last_inverse == "fixed point" and torch.equal(fp["ddf"], ddf)
        assert _ic(fp["ddf"], fp["inverse"])[0] < 0.05


def test_jacobian_of_a_scaling_is_its_determinant_on_any_grid():
    """On an oblique fixed grid of 1.3 x 0.9 x 1.1 mm, a disp that scales by ``S`` about the centre
    has the world-unit Jacobian ``det(S)`` everywhere (the affine cancels); its inverse, known
    exactly on a moving grid of other spacings, passes the consistency check across the grids."""
    s = np.diag([1.1, 0.95, 1.2]) @ np.array([[1, 0.05, 0], [0, 1, 0], [0, 0.02, 1]])
    disp = _linear_field(s, SHAPE)[0].numpy()
    jac = jacobian_map(disp)
    assert jac.dtype == np.float32 and jac.shape == SHAPE
    np.testing.assert_allclose(jac, np.linalg.det(s), rtol=1e-5)

    a_f = np.array([[1.3, 0.1, 0, -20], [0, 0.9, 0, -15], [0, 0, 1.1, -10], [0, 0, 0, 1]])
    a_m = np.array([[0.8, 0, 0, -25], [0, 1.2, 0, -20], [0, 0, 1.0, -15], [0, 0, 0, 1]])
    moving_shape = (52, 32, 40)
    c = np.array([(n - 1) / 2 for n in SHAPE])
    voxel_map = np.eye(4)
    voxel_map[:3, :3], voxel_map[:3, 3] = s, c - s @ c  # p -> p + disp(p), in fixed voxels
    # the inverse in moving voxels: q -> inv(A_m) A_f inv(voxel_map) inv(A_f) A_m q
    inv_vox = np.linalg.inv(a_m) @ a_f @ np.linalg.inv(voxel_map) @ np.linalg.inv(a_f) @ a_m
    q = _grid(moving_shape)[0].numpy()
    inverse = np.einsum("ij,j...->i...", inv_vox[:3, :3] - np.eye(3), q) + inv_vox[:3, 3].reshape(3, 1, 1, 1)
    err = inverse_consistency(disp, inverse, a_f, a_m)
    landed = moving_coordinates(disp, a_f, a_m)
    inside = np.all((landed >= 0) & (landed <= np.reshape(moving_shape, (3, 1, 1, 1)) - 1), axis=0)
    assert inside.mean() > 0.5 and err[inside].max() < 1e-6


def test_region_volumes_of_a_known_scaling_through_the_writer(tmp_path):
    """A pair with known volumes: the moving anatomy is the fixed one scaled by 1.15 in the world
    (volume x 1.521). The field on a 1 mm network grid is brought to an oblique, anisotropic fixed
    grid as inference does; the Jacobian map there is 1.521 inside the network grid, and its mean
    over each warped label region matches that region's moving / fixed volume ratio within 3 %."""
    from helpers import write_nifti

    from scripts.disp_writer import on_native_grid
    from scripts.geometry import warp_to_fixed

    scale, centre = 1.15, np.array([2.0, -3.0, 1.0])
    grid_affine = np.eye(4)
    grid_affine[:3, 3] = centre - np.array([20.0, 24.0, 20.0])
    grid_shape = (40, 48, 40)
    g = _grid(grid_shape)[0].numpy()
    world = np.einsum("ij,j...->i...", grid_affine[:3, :3], g) + grid_affine[:3, 3].reshape(3, 1, 1, 1)
    ddf = ((scale - 1.0) * (world - centre.reshape(3, 1, 1, 1))).astype(np.float32)  # 1 mm grid: mm = voxels
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    fixed_affine = np.eye(4)
    fixed_affine[:3, :3] = rot @ np.diag([1.3, 0.9, 1.2])
    fixed_shape = (24, 40, 26)
    fixed_affine[:3, 3] = centre - fixed_affine[:3, :3] @ (np.array(fixed_shape) - 1) / 2
    fixed = write_nifti(tmp_path / "fixed.nii.gz", np.zeros(fixed_shape, np.float32), fixed_affine)
    item = {"fixed_path": str(fixed), "grid_affine": grid_affine, "fixed_shape": np.array(fixed_shape)}
    disp, affine = on_native_grid(ddf, item, "fixed")
    jac = jacobian_map(disp)
    np.testing.assert_allclose(jac[2:-2, 2:-2, 2:-2], scale**3, rtol=1e-3)
    # moving label map on a 0.8 mm grid: shells about the centre (labels 1..3), the fixed anatomy scaled
    moving_affine = np.diag([0.8, 0.8, 0.8, 1.0])
    moving_shape = (48, 64, 48)
    moving_affine[:3, 3] = centre - 0.8 * (np.array(moving_shape) - 1) / 2
    mg = _grid(moving_shape)[0].numpy()
    r = np.linalg.norm(np.einsum("ij,j...->i...", moving_affine[:3, :3], mg)
                       + (moving_affine[:3, 3] - centre).reshape(3, 1, 1, 1), axis=0)
    labels = np.digitize(r, [4.0 * scale, 8.0 * scale, 12.0 * scale]).astype(np.uint8)
    labels = np.where(labels < 3, labels + 1, 0).astype(np.uint8)  # 1: r < 4.6, 2: < 9.2, 3: < 13.8 mm
    warped = warp_to_fixed(labels, moving_affine, disp, affine, nearest=True)
    for k in (1, 2, 3):
        region = warped == k
        moving_volume = (labels == k).sum() * 0.8**3
        fixed_volume = region.sum() * abs(np.linalg.det(affine[:3, :3]))
        assert abs(jac[region].mean() / (moving_volume / fixed_volume) - 1) < 0.03, k
