"""Tests of ``scripts.losses``: the EOIR multi-scale loss against an independent transcription of
RECIPE.md / the authors' code, its behaviour (self-similarity, monotonicity, gradients, AMP),
and the measured differences from MONAI's same-family classes that its docstrings state."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.networks.layers import GaussianFilter, gaussian_1d

from scripts.losses import EOIRLoss, gaussian_blur, gaussian_kernel_1d, grad_l2_loss, image_pyramid, local_ncc_loss

SIZE = 32
LEVELS = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These volumes are tiny (32^3): a second intra-op thread only adds OpenMP spin time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Independent transcription (plain torch, no code from scripts.losses, no MONAI)
# ----------------------------------------------------------------------------------------------
def ref_blur(x):
    """Authors' GaussianBlur3D(sigma=1): 5x5x5 sampled exp(-|r|^2/2), normalised over 125 taps, conv3d pad 2."""
    c = torch.arange(5, dtype=x.dtype)
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    k = torch.exp(-((zz - 2) ** 2 + (yy - 2) ** 2 + (xx - 2) ** 2) / 2.0)
    k = (k / k.sum()).view(1, 1, 5, 5, 5)
    return F.conv3d(x, k, padding=2)


def ref_pyramid(x, levels=LEVELS):
    out = [x]
    for _ in range(levels - 1):
        x = F.interpolate(ref_blur(x), scale_factor=0.5, mode="trilinear", align_corners=True)
        out.append(x)
    return out


def ref_warp(img, u):
    """warped(p) = img(p + u(p)), trilinear, align_corners=True, zeros outside (torch grid_sample)."""
    shape = u.shape[2:]
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=u.dtype) for s in shape], indexing="ij"))
    loc = grid[None] + u
    loc = torch.stack([2.0 * (loc[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], dim=-1)  # (B, H, W, D, 3)
    loc = loc[..., [2, 1, 0]]  # grid_sample wants (x, y, z) = (axis 2, axis 1, axis 0)
    return F.grid_sample(img, loc, mode="bilinear", padding_mode="zeros", align_corners=True)


def ref_ncc(I, J, win=9):
    """Authors' NccLoss: ones(9,9,9) conv3d, padding 4, cc = cross^2 / (I_var J_var + 1e-5), 1 - mean."""
    filt = torch.ones(1, 1, win, win, win, dtype=I.dtype)
    conv = lambda a: F.conv3d(a, filt, padding=win // 2)  # noqa: E731
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = conv(I), conv(J), conv(I * I), conv(J * J), conv(I * J)
    n = win**3
    u_I, u_J = I_sum / n, J_sum / n
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * n
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * n
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * n
    cc = cross * cross / (I_var * J_var + 1e-5)
    return 1.0 - torch.mean(cc)


def ref_grad(v):
    """Authors' Grad3d(penalty='l2')."""
    dy = ((v[:, :, 1:] - v[:, :, :-1]) ** 2).mean()
    dx = ((v[:, :, :, 1:] - v[:, :, :, :-1]) ** 2).mean()
    dz = ((v[:, :, :, :, 1:] - v[:, :, :, :, :-1]) ** 2).mean()
    return (dy + dx + dz) / 3.0


def ref_loss(moving, fixed, vels, disps, ncc_w=1.0, reg_w=5.0):
    mp, fp = ref_pyramid(moving), ref_pyramid(fixed)
    ncc = [ref_ncc(ref_warp(mp[l], disps[l]), fp[l]) for l in range(LEVELS)]
    reg = [ref_grad(vels[l]) for l in range(LEVELS)]
    total = ncc_w * sum(ncc[l] / 2**l for l in range(LEVELS)) + reg_w * sum(reg[l] / 2**l for l in range(LEVELS))
    return total, ncc, reg


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def smooth_noise(shape, gen, passes=2, dtype=torch.float64):
    """Random texture in [0, 1], smoothed with a 3^3 box (plain torch) so NCC is meaningful."""
    x = torch.rand(shape, generator=gen, dtype=dtype)
    filt = torch.ones(shape[1], 1, 3, 3, 3, dtype=dtype) / 27.0
    for _ in range(passes):
        x = F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), filt, groups=shape[1])
    x = x - x.amin(dim=(2, 3, 4), keepdim=True)
    return x / x.amax(dim=(2, 3, 4), keepdim=True)


def make_case(dtype=torch.float64, batch=1, seed=0, size=SIZE, levels=LEVELS):
    gen = torch.Generator().manual_seed(seed)
    fixed = smooth_noise((batch, 1, size, size, size), gen, dtype=dtype)
    moving = smooth_noise((batch, 1, size, size, size), gen, dtype=dtype)
    vels, disps = [], []
    for l in range(levels):
        s = size // 2**l
        # displacements up to ~3 voxels: some samples fall outside the image (tests zeros padding).
        # smooth_noise hits exactly 0 and 1, so the offset keeps every sample off the integer
        # grid, where trilinear interpolation has a kink (no unique derivative).
        u = 2.9 * (2 * smooth_noise((batch, 3, s, s, s), gen, passes=1, dtype=dtype) - 1) + 0.05
        disps.append(u)
        vels.append(torch.randn((batch, 3, s, s, s), generator=gen, dtype=dtype))
    return moving, fixed, vels, disps


# ----------------------------------------------------------------------------------------------
# Transcription
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_case():
    """A float64 case and its transcribed loss, computed once (the 9^3 float64 conv3d is the slow part)."""
    case = make_case(torch.float64)
    return case, ref_loss(*case)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_matches_transcription(reference_case, dtype, rtol):
    (moving, fixed, vels, disps), (total, ncc, reg) = reference_case
    cast = lambda xs: [x.to(dtype) for x in xs]  # noqa: E731
    out = EOIRLoss()(moving.to(dtype), fixed.to(dtype), cast(vels), cast(disps))
    assert out["loss"].dtype == dtype
    for l in range(LEVELS):
        np.testing.assert_allclose(out[f"ncc_l{l}"].item(), ncc[l].item(), rtol=rtol, err_msg=f"ncc_l{l}")
        np.testing.assert_allclose(out[f"reg_l{l}"].item(), reg[l].item(), rtol=rtol, err_msg=f"reg_l{l}")
    np.testing.assert_allclose(out["loss"].item(), total.item(), rtol=rtol)
    np.testing.assert_allclose(out["ncc"].item(), sum(ncc[l].item() / 2**l for l in range(LEVELS)), rtol=rtol)
    np.testing.assert_allclose(out["reg"].item(), 5.0 * sum(reg[l].item() / 2**l for l in range(LEVELS)), rtol=rtol)
    np.testing.assert_allclose(out["loss"].item(), out["ncc"].item() + out["reg"].item(), rtol=1e-6)


def test_weights_window_and_batch(reference_case):
    (moving, fixed, vels, disps), (_, ncc, reg) = reference_case
    # weights: ncc_w * sum ncc_l / 2^l + reg_w * sum reg_l / 2^l
    out = EOIRLoss(ncc_weight=2.0, reg_weight=0.5)(moving, fixed, vels, disps)
    want = sum((2.0 * ncc[l].item() + 0.5 * reg[l].item()) / 2**l for l in range(LEVELS))
    np.testing.assert_allclose(out["loss"].item(), want, rtol=1e-9)
    # batch of 2: every term is a mean over all voxels of equal-size pairs = the mean of the two
    m1, f1, v1, d1 = make_case(torch.float32, seed=0)
    m2, f2, v2, d2 = make_case(torch.float32, seed=1)
    cat = lambda a, b: [torch.cat([x, y]) for x, y in zip(a, b)]  # noqa: E731
    loss = EOIRLoss()
    one, two = loss(m1, f1, v1, d1), loss(m2, f2, v2, d2)
    both = loss(torch.cat([m1, m2]), torch.cat([f1, f2]), cat(v1, v2), cat(d1, d2))
    for key in both:
        np.testing.assert_allclose(both[key].item(), (one[key].item() + two[key].item()) / 2, rtol=1e-5, err_msg=key)
    # the window is honoured (7^3 here)
    m, f = moving[..., :16, :16, :16], fixed[..., :16, :16, :16]
    np.testing.assert_allclose(local_ncc_loss(m, f, window=7).item(), ref_ncc(f, m, win=7).item(), rtol=1e-9)


def test_pieces_match_transcription():
    moving, _, vels, disps = make_case(torch.float64)
    for a, b in zip(image_pyramid(moving), ref_pyramid(moving)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [tuple(a.shape[2:]) for a in image_pyramid(moving)] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]
    loss = EOIRLoss()
    torch.testing.assert_close(loss._warp(0, moving, disps[0]), ref_warp(moving, disps[0]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_l2_loss(vels[1]).item(), ref_grad(vels[1]).item(), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------
def test_ncc_of_image_with_itself_is_zero():
    moving, _, _, _ = make_case(torch.float32)
    assert abs(local_ncc_loss(moving, moving).item()) < 1e-4
    zeros = [torch.zeros(1, 3, SIZE // 2**l, SIZE // 2**l, SIZE // 2**l) for l in range(LEVELS)]
    out = EOIRLoss()(moving, moving, zeros, zeros)
    assert out["reg"].item() == 0.0
    # every level textured -> each ~0; the tiny remainder is the +1e-5 in the denominator
    for l in range(LEVELS - 1):
        assert out[f"ncc_l{l}"].item() < 1e-3, (l, out[f"ncc_l{l}"].item())


def test_ncc_decreases_as_moving_approaches_fixed():
    gen = torch.Generator().manual_seed(3)
    fixed = smooth_noise((1, 1, SIZE, SIZE, SIZE), gen, dtype=torch.float32)
    shift = torch.tensor([3.0, -2.0, 1.5]).view(1, 3, 1, 1, 1)
    # moving(p) = fixed(p - shift): warping moving by u = shift gives back fixed (inside the image)
    moving = ref_warp(fixed.double(), (-shift).double().expand(1, 3, SIZE, SIZE, SIZE)).float()
    loss = EOIRLoss()
    values = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        disps = [(t * shift / 2**l).expand(1, 3, SIZE // 2**l, SIZE // 2**l, SIZE // 2**l) for l in range(LEVELS)]
        zeros = [torch.zeros_like(d) for d in disps]
        out = loss(moving, fixed, zeros, disps)
        values.append((out["ncc"].item(), out["ncc_l0"].item()))
    total, level0 = zip(*values)
    assert all(a > b for a, b in zip(total, total[1:])), total
    assert all(a > b for a, b in zip(level0, level0[1:])), level0
    # not 0 at t = 1: the band that the shift moved out of the image is zeros in the warped image
    assert level0[-1] < 0.5 * level0[0], level0


def test_gradients_flow_to_every_level():
    moving, fixed, vels, disps = make_case(torch.float32)
    vels = [v.clone().requires_grad_(True) for v in vels]
    disps = [d.clone().requires_grad_(True) for d in disps]
    out = EOIRLoss()(moving, fixed, vels, disps)
    assert out["loss"].requires_grad and not out["ncc"].requires_grad and not out["ncc_l0"].requires_grad
    out["loss"].backward()
    for l in range(LEVELS):
        assert torch.isfinite(vels[l].grad).all() and vels[l].grad.abs().sum() > 0, f"velocity {l}"
        assert torch.isfinite(disps[l].grad).all() and disps[l].grad.abs().sum() > 0, f"displacement {l}"


def test_directional_derivative_matches_finite_difference():
    """Autograd vs central finite difference (float64), separately along displacements and velocities."""
    moving, fixed, vels, disps = make_case(torch.float64, seed=5, size=16, levels=3)
    gen = torch.Generator().manual_seed(6)
    dirs_v = [torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in vels]
    dirs_d = [torch.randn(d.shape, generator=gen, dtype=torch.float64) for d in disps]
    loss = EOIRLoss(num_levels=3)
    vr = [v.clone().requires_grad_(True) for v in vels]
    dr = [d.clone().requires_grad_(True) for d in disps]
    loss(moving, fixed, vr, dr)["loss"].backward()
    h = 1e-6
    cases = (("displacements", [d.grad for d in dr], dirs_d), ("velocities", [v.grad for v in vr], dirs_v))
    for name, grads, dirs in cases:
        analytic = sum((g * e).sum() for g, e in zip(grads, dirs)).item()
        zero = [torch.zeros_like(e) for e in dirs]
        ev, ed = (dirs, zero) if name == "velocities" else (zero, dirs)

        def f(s):
            return loss(
                moving, fixed, [v + s * e for v, e in zip(vels, ev)], [d + s * e for d, e in zip(disps, ed)]
            )["loss"].item()

        numeric = (f(h) - f(-h)) / (2 * h)
        assert abs(analytic) > 1e-3, (name, analytic)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, err_msg=name)


def test_autocast_computes_in_float32():
    moving, fixed, vels, disps = make_case(torch.float32)
    loss = EOIRLoss()
    ref = loss(moving, fixed, vels, disps)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = loss(moving.bfloat16(), fixed.bfloat16(), [v.bfloat16() for v in vels], [d.bfloat16() for d in disps])
        out32 = loss(moving, fixed, vels, disps)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    # inputs given in float32 under autocast: identical to no autocast
    assert out32["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    # bf16 inputs: only the input rounding differs
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=2e-2)


def test_bad_inputs_raise():
    moving, fixed, vels, disps = make_case(torch.float32)
    loss = EOIRLoss()
    with pytest.raises(ValueError, match="level 0 = full resolution first"):
        loss(moving, fixed, vels[::-1], disps[::-1])
    with pytest.raises(ValueError, match="list of 5"):
        loss(moving, fixed, vels[:4], disps)
    with pytest.raises(ValueError, match="must be equal"):
        loss(moving, fixed[:, :, :16], vels, disps)
    with pytest.raises(ValueError, match="too small"):
        EOIRLoss(num_levels=6)(moving, fixed, vels, disps)


def test_result_keys():
    moving, fixed, vels, disps = make_case(torch.float32)
    out = EOIRLoss()(moving, fixed, vels, disps)
    expected = {"loss", "ncc", "reg"} | {f"{t}_l{l}" for t in ("ncc", "reg") for l in range(LEVELS)}
    assert set(out) == expected
    assert all(v.ndim == 0 for v in out.values())


def test_warp_cache_follows_dtype():
    moving, fixed, vels, disps = make_case(torch.float64)
    loss = EOIRLoss()
    a = loss(moving, fixed, vels, disps)["loss"].item()
    b = loss(moving.float(), fixed.float(), [v.float() for v in vels], [d.float() for d in disps])["loss"]
    assert b.dtype == torch.float32 and b.item() == pytest.approx(a, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Differences from MONAI's same-family classes (the docstrings' claims)
# ----------------------------------------------------------------------------------------------
def test_gaussian_kernel_vs_monai():
    k = gaussian_kernel_1d(dtype=torch.float64)
    x = torch.arange(-2, 3, dtype=torch.float64)
    torch.testing.assert_close(k, torch.exp(-x * x / 2) / torch.exp(-x * x / 2).sum())
    np.testing.assert_allclose(k.numpy(), [0.054489, 0.244201, 0.402620, 0.244201, 0.054489], atol=1e-6)
    # MONAI's gaussian_1d with these options is the same kernel (computed in float32)
    monai_k = gaussian_1d(torch.tensor(1.0), truncated=2.0, approx="sampled", normalize=True)
    torch.testing.assert_close(monai_k.double(), k, rtol=1e-6, atol=1e-7)

    gen = torch.Generator().manual_seed(0)
    img = torch.rand((1, 1, 20, 20, 20), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(img), ref_blur(img), rtol=1e-12, atol=1e-12)
    # GaussianFilter defaults: 9-tap erf kernel -> different numbers
    diff = (GaussianFilter(3, 1.0)(img.float()).double() - ref_blur(img)).abs().max().item()
    assert diff > 0.01, diff
    # GaussianFilter 5-tap sampled: not normalised -> a constant image is scaled by 0.9729
    ones = torch.ones((1, 1, 9, 9, 9))
    centre = GaussianFilter(3, 1.0, truncated=2.0, approx="sampled")(ones)[0, 0, 4, 4, 4].item()
    assert centre == pytest.approx(0.9729, abs=2e-4)
    assert gaussian_blur(ones)[0, 0, 4, 4, 4].item() == pytest.approx(1.0, abs=1e-6)


def lnc_monai(p, t):
    return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9, kernel_type="rectangular")(p, t)


def test_ncc_vs_monai():
    moving, fixed, _, _ = make_case(torch.float32)
    ours, theirs = local_ncc_loss(moving, fixed).item(), lnc_monai(moving, fixed).item()
    # same family: on textured images only the offset of 1 (their -mean(cc) vs our 1 - mean(cc))
    assert theirs < 0 < ours
    assert abs(ours - (1.0 + theirs)) < 1e-6, (ours, theirs)

    # low-contrast image vs itself: the authors' +1e-5 on var_I*var_J makes cc ~ 0, MONAI's
    # max(var, 1e-5) clamp keeps cc large
    gen = torch.Generator().manual_seed(0)
    low = 1e-3 * smooth_noise((1, 1, SIZE, SIZE, SIZE), gen, dtype=torch.float32)
    ours, theirs = local_ncc_loss(low, low).item(), lnc_monai(low, low).item()
    assert ours == pytest.approx(0.9999, abs=1e-3)
    assert theirs == pytest.approx(-0.785, abs=0.01)  # 0.215 after the offset

    # textured ball on zero background (brain-like): the dim voxels at the edge differ
    g = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float32)] * 3, indexing="ij"))
    ball = ((((g - (SIZE - 1) / 2) ** 2).sum(0)).sqrt() < 12).float()[None, None]
    a = gaussian_blur(ball * (0.3 + 0.7 * moving))
    b = gaussian_blur(ball * (0.3 + 0.7 * fixed))
    ours, theirs = local_ncc_loss(a, b).item(), lnc_monai(a, b).item()
    assert ours == pytest.approx(0.223, abs=0.002)
    assert 1.0 + theirs == pytest.approx(0.153, abs=0.002)


def test_grad_vs_monai_diffusion():
    n = 16
    ramp = (0.5 * torch.arange(n, dtype=torch.float64)).view(1, 1, n, 1, 1).expand(1, 3, n, n, n)
    assert grad_l2_loss(ramp).item() == pytest.approx(0.25 / 3)  # forward diffs, mean over 3 axes
    assert DiffusionLoss()(ramp).item() == pytest.approx(0.25)  # central diffs, summed over axes: x3
    checker = ((-1.0) ** torch.arange(n, dtype=torch.float64)).view(1, 1, n, 1, 1).expand(1, 3, n, n, n)
    assert grad_l2_loss(checker).item() == pytest.approx(4.0 / 3)
    assert DiffusionLoss()(checker).item() == 0.0  # central differences cannot see the oscillation
    _, _, vels, _ = make_case(torch.float64)
    assert abs(grad_l2_loss(vels[0]).item() - DiffusionLoss()(vels[0]).item()) > 0.1


def test_warp_zeros_vs_monai_default_border():
    moving, _, _, disps = make_case(torch.float64)
    zeros = Warp(mode="bilinear", padding_mode="zeros")(moving, disps[0])
    border = Warp(mode="bilinear")(moving, disps[0])  # MONAI's default padding: "border"
    torch.testing.assert_close(zeros, ref_warp(moving, disps[0]), rtol=1e-12, atol=1e-12)
    assert (zeros - border).abs().max().item() > 0.05  # the field points outside near the edges
