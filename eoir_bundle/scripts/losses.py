"""The EOIR training loss: multi-scale local NCC on warped images + L2 gradient of velocities.

This is the loss of the authors' LUMIR 2024 training code (``utils/loss.py``: ``NccLoss``,
``Grad3d(penalty='l2')``; ``utils/functions.py``: ``get_downsampled_images``,
``GaussianBlur3D``), restated in ``RECIPE.md`` ("Loss"). For levels ``l = 0..L-1``
(level 0 = full resolution, level ``l`` = 1/2^l)::

    loss = ncc_w * sum_l NCC(warp(moving_l, u_l), fixed_l) / 2^l
         + reg_w * sum_l Grad(v_l) / 2^l

* ``moving_l``, ``fixed_l``: the loss image pyramid, :func:`image_pyramid`.
* ``u_l``: the level's composed displacement, ``v_l``: its velocity (before integration),
  both ``(B, 3, *level_shape)`` in voxel units of that level, channel ``i`` = array axis ``i``,
  ``warped(p) = image(p + u(p))``.
* ``NCC``: :func:`local_ncc_loss` (9^3 box, ``1 - mean(cc)``); ``Grad``: :func:`grad_l2_loss`.

Where MONAI has the same operation with the same numbers, MONAI is used
(``Warp`` for the warping, ``separable_filtering`` for the box and Gaussian filters). Three
MONAI classes of the same family give *different* numbers and are deliberately not used;
each difference is measured in ``tests/test_losses.py``:

* ``monai.networks.layers.GaussianFilter`` - see :func:`gaussian_kernel_1d`.
* ``monai.losses.LocalNormalizedCrossCorrelationLoss`` - see :func:`local_ncc_loss`.
* ``monai.losses.DiffusionLoss`` - see :func:`grad_l2_loss`.

Precision: everything is computed in (at least) float32 with autocast disabled, whatever the
caller's autocast/AMP state: the NCC subtracts sums of squares over 729 voxels, which fp16
or bf16 cannot represent (catastrophic cancellation). float64 inputs stay float64.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from monai.networks.layers import separable_filtering

__all__ = [
    "EOIRLoss",
    "gaussian_kernel_1d",
    "gaussian_blur",
    "image_pyramid",
    "local_ncc_loss",
    "grad_l2_loss",
]

#: the authors' ``GaussianBlur3D(sigma=1)``: kernel size ``int(2 * sigma * 2 + 1)`` = 5.
BLUR_SIGMA = 1.0
BLUR_TAPS = 5
#: additive constant in the NCC denominator (authors' ``NccLoss``).
NCC_EPS = 1e-5


def gaussian_kernel_1d(
    sigma: float = BLUR_SIGMA, taps: int = BLUR_TAPS, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Normalised sampled 1D Gaussian: ``k[x] = exp(-x^2 / (2 sigma^2)) / sum``, ``x = -taps//2..taps//2``.

    For sigma 1, 5 taps: ``[0.054489, 0.244201, 0.402620, 0.244201, 0.054489]``.

    The authors' ``GaussianBlur3D`` builds a 5x5x5 kernel ``exp(-|r|^2 / 2) / sum`` (sampled at
    integer offsets, normalised to sum 1 over the 125 taps) and applies it with ``conv3d``,
    ``padding=2`` (zeros). Because ``exp(-|r|^2/2) = exp(-x^2/2) exp(-y^2/2) exp(-z^2/2)``, that
    kernel is exactly the outer product of this normalised 1D kernel with itself three times,
    so separable filtering with it gives the same numbers (to rounding) at 3 x 5 instead of
    125 multiply-adds per voxel.

    Why not ``monai.networks.layers.GaussianFilter(3, sigma=1)``: its defaults
    (``truncated=4``, ``approx="erf"``) give a 9-tap kernel of integrated-erf weights
    (``[0.00023, 0.0060, 0.0606, 0.2417, 0.3829, ...]``), max |difference| 0.025 on a random
    image; with ``truncated=2, approx="sampled"`` it has the right 5 taps but is divided by
    ``sqrt(2 pi) sigma`` instead of by its sum, so each 1D pass sums to 0.99089 and a constant
    image comes out x0.9729 (GaussianFilter has no ``normalize`` option). MONAI's
    ``gaussian_1d(sigma, truncated=2, approx="sampled", normalize=True)`` equals this kernel,
    but is computed in float32 only; this function builds it in the requested dtype.
    """
    half = taps // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * x * x / (sigma * sigma))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(image: torch.Tensor, sigma: float = BLUR_SIGMA, taps: int = BLUR_TAPS) -> torch.Tensor:
    """Gaussian blur of a ``(B, C, *spatial)`` tensor, zero padding, output size = input size.

    MONAI ``separable_filtering(mode="zeros")`` with :func:`gaussian_kernel_1d` on every
    axis: identical to the authors' 5x5x5 ``conv3d(padding=2)`` (zero padding is preserved by
    separable passes: a zero-padded row stays zero under filtering along the other axes).
    """
    k = gaussian_kernel_1d(sigma, taps, dtype=image.dtype, device=image.device)
    return separable_filtering(image, [k] * (image.ndim - 2), mode="zeros")


def image_pyramid(image: torch.Tensor, num_levels: int = 5) -> list[torch.Tensor]:
    """The loss's image pyramid: ``[level 0 = image, level 1, ..., level num_levels - 1]``.

    ``level[l + 1] = trilinear_resize_x0.5(gaussian_blur(level[l]), align_corners=True)``
    (the authors' ``get_downsampled_images``: ``F.interpolate(scale_factor=0.5,
    mode='trilinear', align_corners=True)``; each size becomes ``floor(n / 2)``).
    """
    levels = [image]
    for _ in range(num_levels - 1):
        image = F.interpolate(gaussian_blur(image), scale_factor=0.5, mode="trilinear", align_corners=True)
        levels.append(image)
    return levels


def local_ncc_loss(pred: torch.Tensor, target: torch.Tensor, window: int = 9, eps: float = NCC_EPS) -> torch.Tensor:
    """Local squared NCC loss ``1 - mean(cc)`` over a ``window^3`` box, zero padding (authors' ``NccLoss``).

    With window sums ``S_X`` (box filter of ones, ``padding = window // 2``, zeros outside),
    ``n = window^3``, ``u_X = S_X / n``::

        cross = S_IJ - u_J S_I - u_I S_J + u_I u_J n
        var_I = S_II - 2 u_I S_I + u_I^2 n        (same for J)
        cc    = cross^2 / (var_I var_J + eps)       eps = 1e-5
        loss  = 1 - mean(cc)                        (mean over batch, channels and voxels)

    The sums are computed with MONAI ``separable_filtering`` (three 1D box passes; the
    authors use one ``conv3d`` with a ``ones(9, 9, 9)`` kernel: same sums, to rounding).
    The authors' EOIR code returns ``(1 - mean(cc, dim=spatial)).mean()`` (= ``1 - mean(cc)``
    for equal-size images); VoxelMorph/TransMorph return ``-mean(cc)``. The constant 1 changes
    no gradient; it keeps the loss in ``[0, 1]`` with 0 = perfectly correlated.

    Why not ``monai.losses.LocalNormalizedCrossCorrelationLoss(kernel_size=9,
    kernel_type="rectangular")``: its sums and its ``cross``/variance algebra are the same
    (``var = S_II - u_I S_I`` is the same quantity), but

    1. sign/offset: it returns ``-mean(cc)`` (range ``[-1, 0]``), 1 below this loss;
    2. the small constant sits elsewhere: it clamps each variance, ``max(var, smooth_dr=1e-5)``,
       and divides by ``var_I * var_J`` with no additive constant (``smooth_nr = 0`` is added
       to the numerator), where the authors add ``1e-5`` to the *product*. In windows where
       ``var_I * var_J`` is comparable to or below 1e-5 (dim or nearly flat neighbourhoods:
       the brain's edge, the tails of the coarse pyramid levels), the authors' cc goes to 0
       ("uncorrelated") while MONAI's stays near the true squared correlation (up to 1).

    Measured in the tests (32^3 phantoms, float32): on textured images in [0, 1] the two
    agree to < 1e-6 after adding 1 (0.5730190 vs 0.5730189); an image compared with *itself*
    at 1e-3 contrast gives 0.9999 here (its windows count as uncorrelated) but -0.785 from
    MONAI (0.215 after the offset); a textured ball on a zero background, blurred, gives 0.223
    here vs 0.153 (MONAI + 1), the difference coming from the dim voxels at the ball's edge.
    """
    if pred.shape != target.shape:
        raise ValueError(f"local_ncc_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if window % 2 != 1:
        raise ValueError(f"local_ncc_loss: window must be odd, got {window}")
    ndim = pred.ndim - 2
    c = pred.shape[1]
    I, J = target, pred  # cc is symmetric in I and J (the authors pass the warped image as I)
    # one filtering call for the 5 maps: (B, 5C, ...) with groups = 5C inside separable_filtering
    stacked = torch.cat([I, J, I * I, J * J, I * J], dim=1)
    box = torch.ones(window, dtype=stacked.dtype, device=stacked.device)
    sums = separable_filtering(stacked, [box] * ndim, mode="zeros")
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = torch.split(sums, c, dim=1)
    n = float(window**ndim)
    u_I = I_sum / n
    u_J = J_sum / n
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * n
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * n
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * n
    cc = cross * cross / (I_var * J_var + eps)
    return 1.0 - cc.mean()


def grad_l2_loss(field: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser of a ``(B, C, *spatial)`` field (authors' ``Grad3d(penalty='l2')``).

    ``(mean((v[i+1] - v[i])^2 along axis 0) + ... along axis 1 + ... along axis 2) / ndim``:
    squared *forward* differences, each axis's mean taken over its own ``(n - 1)``-long
    difference array (batch, channels and all voxels), then averaged over the axes.

    Why not ``monai.losses.DiffusionLoss``: it uses *central* differences
    ``(v[i+1] - v[i-1]) / 2`` on the interior ``[1:-1]`` of every axis and *sums* the squared
    derivatives over the axes instead of averaging. For a linear ramp ``v = a * i`` along one
    axis it gives ``a^2`` where this gives ``a^2 / 3`` (x3), and for a Nyquist checkerboard
    ``(-1)^i`` it gives 0 (central differences skip the neighbour) where this gives ``4 / 3``,
    i.e. it does not penalise the voxel-scale oscillation this term exists to suppress.
    Both are measured in the tests.
    """
    ndim = field.ndim - 2
    total = field.new_zeros(())
    for axis in range(2, field.ndim):
        n = field.shape[axis]
        d = field.narrow(axis, 1, n - 1) - field.narrow(axis, 0, n - 1)
        total = total + (d * d).mean()
    return total / ndim


def _check_level_lists(name: str, fields, shapes: list[torch.Size], batch: int) -> None:
    if not isinstance(fields, (list, tuple)) or len(fields) != len(shapes):
        n = len(fields) if isinstance(fields, (list, tuple)) else type(fields).__name__
        raise ValueError(
            f"EOIRLoss: {name} must be a list of {len(shapes)} tensors (levels 0..{len(shapes) - 1}), got {n}"
        )
    for level, (f, s) in enumerate(zip(fields, shapes)):
        want = (batch, len(s), *s)
        if tuple(f.shape) != want:
            raise ValueError(
                f"EOIRLoss: {name}[{level}] has shape {tuple(f.shape)}, expected {want} "
                f"(level 0 = full resolution first, level {len(shapes) - 1} = coarsest last)"
            )


class EOIRLoss(torch.nn.Module):
    """Multi-scale EOIR loss (module docstring). Stateless apart from MONAI ``Warp``'s grid cache.

    Args:
        num_levels: pyramid levels (5 in EOIR); image sizes must allow it (each level >= 2 voxels).
        ncc_weight: ``ncc_w`` (1 in the authors' training script).
        reg_weight: ``reg_w`` (5 in the authors' ``train.sh``; their argparse default is 1).
        ncc_window: NCC box size (9).

    ``forward(moving, fixed, velocities, displacements)``:
        moving, fixed: ``(B, 1, H, W, D)`` images in [0, 1] (any channel count works; same shape).
        velocities, displacements: lists of ``num_levels`` tensors, level 0 (full resolution)
        first, each ``(B, 3, *level_shape)`` where ``level_shape`` is the size of the loss
        pyramid's level (``floor`` halving), in voxel units of that level, channel ``i`` =
        array axis ``i``, ``warped(p) = image(p + u(p))``.

    Returns a dict:
        ``"loss"``: the total (0-d tensor with grad) = ``"ncc"`` + ``"reg"``;
        ``"ncc"``: ``ncc_w * sum_l ncc_l / 2^l``; ``"reg"``: ``reg_w * sum_l reg_l / 2^l``;
        ``"ncc_l{l}"``: level ``l``'s raw ``1 - mean(cc)``; ``"reg_l{l}"``: level ``l``'s raw
        gradient loss (neither weighted by ``1/2^l`` nor by ``ncc_w``/``reg_w``).
        All but ``"loss"`` are detached 0-d tensors (call ``.item()`` when logging; no device
        sync is forced here).
    """

    def __init__(self, num_levels: int = 5, ncc_weight: float = 1.0, reg_weight: float = 5.0, ncc_window: int = 9):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"EOIRLoss: num_levels must be >= 1, got {num_levels}")
        if ncc_window < 1 or ncc_window % 2 != 1:
            raise ValueError(f"EOIRLoss: ncc_window must be a positive odd integer, got {ncc_window}")
        self.num_levels = int(num_levels)
        self.ncc_weight = float(ncc_weight)
        self.reg_weight = float(reg_weight)
        self.ncc_window = int(ncc_window)
        # padding_mode="zeros": the authors warp with F.grid_sample's default zeros padding
        # (their SpatialTransformer), so samples from outside the moving image read 0 - which
        # the NCC then sees as background. MONAI's default "border" would replicate the edge
        # voxels instead and change the loss wherever u points outside the image.
        # One Warp per level so that each keeps its own cached reference grid.
        with warnings.catch_warnings():  # "Using PyTorch native grid_sample." (no compiled extension)
            warnings.simplefilter("ignore", UserWarning)
            self.warps = torch.nn.ModuleList(
                [Warp(mode="bilinear", padding_mode="zeros") for _ in range(self.num_levels)]
            )

    def _warp(self, level: int, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        warp = self.warps[level]
        grid = getattr(warp, "ref_grid", None)
        # MONAI caches the grid by shape only; drop it when the device or dtype changed.
        if grid is not None and (grid.device != ddf.device or grid.dtype != ddf.dtype):
            warp.ref_grid = None
        return warp(image, ddf)

    def forward(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        velocities: list[torch.Tensor] | tuple[torch.Tensor, ...],
        displacements: list[torch.Tensor] | tuple[torch.Tensor, ...],
    ) -> dict[str, torch.Tensor]:
        if moving.ndim != 5 or moving.shape != fixed.shape:
            raise ValueError(
                f"EOIRLoss: moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} "
                "must be equal (B, C, H, W, D) shapes"
            )
        dtype = torch.promote_types(moving.dtype, torch.float32)
        with torch.autocast(device_type=moving.device.type, enabled=False):
            moving_pyr = image_pyramid(moving.to(dtype), self.num_levels)
            fixed_pyr = image_pyramid(fixed.to(dtype), self.num_levels)
            shapes = [m.shape[2:] for m in moving_pyr]
            if min(shapes[-1]) < 2:
                raise ValueError(
                    f"EOIRLoss: image size {tuple(moving.shape[2:])} is too small for {self.num_levels} levels "
                    f"(coarsest level {tuple(shapes[-1])}; every level needs >= 2 voxels per axis)"
                )
            _check_level_lists("velocities", velocities, shapes, moving.shape[0])
            _check_level_lists("displacements", displacements, shapes, moving.shape[0])

            out: dict[str, torch.Tensor] = {}
            ncc_total = moving.new_zeros((), dtype=dtype)
            reg_total = moving.new_zeros((), dtype=dtype)
            for level in range(self.num_levels):
                scale = 1.0 / 2**level
                warped = self._warp(level, moving_pyr[level], displacements[level].to(dtype))
                ncc = local_ncc_loss(warped, fixed_pyr[level], window=self.ncc_window)
                reg = grad_l2_loss(velocities[level].to(dtype))
                ncc_total = ncc_total + ncc * scale
                reg_total = reg_total + reg * scale
                out[f"ncc_l{level}"] = ncc.detach()
                out[f"reg_l{level}"] = reg.detach()
            ncc_total = self.ncc_weight * ncc_total
            reg_total = self.reg_weight * reg_total
            out["ncc"] = ncc_total.detach()
            out["reg"] = reg_total.detach()
            out["loss"] = ncc_total + reg_total
        return out
