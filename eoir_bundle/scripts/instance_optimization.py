"""Test-time instance optimisation (IO): refine the network's field on each pair.

After the (frozen) network has predicted ``u_net`` for a pair, a residual *stationary
velocity field* ``v`` is optimised for that pair alone and composed with the network's map.

Conventions (the bundle's, see ``scripts.network``): tensors ``(B, C, D0, D1, D2)``; the input is
``cat([moving, fixed], 1)`` in ``[0, 1]``; a displacement ``u`` is in voxel units, channel ``i``
= array axis ``i``, ``warped(p) = image(p + u(p))`` (MONAI ``Warp``, trilinear,
``align_corners=True``, zeros outside the image).

The transform::

    u_io = exp(v)                                   (scaling and squaring, MONAI DVF2DDF, 7 steps)
    phi(p) = p + u_io(p) + u_net(p + u_io(p))       i.e.  ddf = u_io + warp(u_net, u_io)
    warped_moving(p) = moving(phi(p))

``phi = phi_net o phi_io``: the fixed-space point is first moved by the residual ``exp(v)``, then
mapped by the network's transform, i.e. ``v`` is a correction in the fixed image's space applied
to the network-warped moving image (``warped = (moving o phi_net) o phi_io``). The output is
composed exactly (the moving image is interpolated once). ``exp(v)`` is a diffeomorphism for a
smooth ``v``, and so is its composition with the network's (diffeomorphic) map. ``v = 0`` gives
``u_io = 0`` and ``ddf = u_net``; with ``io_iterations = 0`` the inferer does not build ``v`` at
all and returns ``network(inputs)`` itself (bit for bit, as ``SimpleInferer``).

That is ``io_init="compose"``. With ``io_init="warm_start"`` (this class's default) the final
map is ``exp(v)`` alone and ``v`` starts at the network's displacement resampled to the velocity
grid (``exp(u) ~ u`` for moderate ``u``): the optimisation keeps the network's large-scale
deformation as its starting point but is not tied to the network's fine-scale errors, which a
smooth ``v`` composed with ``phi_net`` cannot undo; the output, however, holds nothing finer than
the velocity grid. ``io_init="select"`` (the bundle's default in ``configs/inference.json`` and
``configs/evaluate.json``) runs both from the whole network's field and keeps, per pair, the one
whose warped moving image has the higher local NCC with the fixed image on the full grid.
Measured with the shipped weights and the other defaults (docs/inter_subject.md,
``python -m scripts.compare_methods``): on real inter-subject pairs, where the network's
full-resolution detail matters, ``select`` chose ``compose`` on every pair and beat the network
alone, which the warm start fell below; on smooth synthetic warps of one brain (the warm start's
model class) it chose the warm start.

The warm start reads the network's displacement on the coarsest velocity grid only (1/8 of the
input grid at the defaults), so the network need not run its finest levels: with
``io_network_level = k`` the inferer calls ``network(inputs, finest_level=k)`` (``EOIR``'s
argument: the coarse-to-fine levels stop at level ``k``, whose field is upsampled), when the
network's ``forward`` takes ``finest_level``, else ``network(inputs)``. The full-resolution
level 0 is most of the network's time on a CPU (N=16, 160x224x192, 2 cores: 11-14 s to level 1
instead of 22-32 s for the whole network), and on the held-out pairs of docs/README.md IO
reaches the same Dice from either start (to 0.0001). ``compose`` and ``io_iterations = 0``
always run the whole network.

Optimisation (per call, i.e. per batch of pairs; each pair has its own ``v``):

* Resolutions: the similarity is computed on a level of the training loss's image pyramid
  (:func:`scripts.losses.image_pyramid`: Gaussian blur + x0.5; level 0 = the input grid,
  1 = half, 2 = quarter) and ``v`` lives one level coarser, where it is integrated; ``exp(v)``
  is resampled to the loss grid (and at the end to the input grid) by :func:`resize_field`.
  A velocity grid coarser than the loss grid regularises (a ``v`` on the loss grid itself
  overfits noise and folds) and is cheap. Coarse to fine: ``io_levels`` loss levels, from
  ``io_level + io_levels - 1`` down to ``io_level``; ``v`` is carried (resampled) from one level
  to the next, and each level gets 1/4 of the iterations of the next coarser one (2 levels:
  80 % / 20 %), as a finer level costs ~5-8x more per iteration. For LUMIR's 1 mm grid the
  defaults (``io_level=1``, ``io_levels=2``) are: loss on 40x56x48 (4 mm) with ``v`` on 20x28x24,
  then loss on 80x112x96 (2 mm) with ``v`` on 40x56x48.
* Loss: ``local_ncc_loss(warp(warped_net, exp(v)), fixed_l, window) + io_reg_weight *
  grad_l2_loss(v)`` (the training loss's own functions), where ``fixed_l`` is the fixed image's
  pyramid level and ``warped_net = warp(moving_l, u_net_l)`` the moving image's level warped once
  by the network's field resampled to that grid (so ``warp(warped_net, u_io)(p)`` is
  ``moving(p + u_io(p) + u_net(p + u_io(p)))`` up to one resampling, for one 1-channel warp per
  iteration). The NCC window is ``io_ncc_window`` (input-grid voxels) divided by ``2**level``,
  rounded to an odd size >= 3 (9 -> 5 at half, 3 at quarter resolution).
* Adam on ``v`` only, ``io_learning_rate`` in velocity-grid voxels (Adam moves each component by
  about ``lr`` per step). The network runs once, under ``torch.no_grad()``.
* Gradient: by default the gradient of ``exp(v)`` with respect to ``v`` is approximated by the
  identity ("straight-through": the forward value is the exact ``exp(v)``, the backward pass
  skips the 7 self-warps of scaling and squaring, whose ``grid_sample`` backward is the slowest
  operation on a CPU). For a residual of a few voxels the two nearly agree; measured on two
  synthetic 160x224x192 pairs (identity network, defaults, 50 iterations): Dice 0.917 in
  10.4 CPU-s vs 0.918 in 16.2 CPU-s with ``exact_gradient=True``, which back-propagates through
  the integration.

Cost: per iteration one integration on the velocity grid (forward only), one 1-channel warp
and one local NCC on the loss grid (forward and backward); once per level the loss pyramid and
one warp of the moving image; once at the end one full-resolution composition. The warps and
the integration are the network's MONAI-derived layers with ``batch_split=True`` (PyTorch's 3D
CPU sampler uses one thread per batch item; the two halves of a volume go as a batch of two:
the same values, about 1.3x faster IO on 2 cores). Measured on the held-out 160x224x192 pairs of
docs/README.md, 2 CPU cores, nothing else running (``python -m scripts.compare_methods``): the
defaults (50 iterations) take 6-9 s per pair without the network (25 iterations: 4-6 s; 100:
14-15 s). Memory: the optimisation holds a few loss-grid tensors;
at full resolution the inputs, ``u_net``, the resampled ``u_io``, the output and the
warp's temporaries of the final composition: about 0.75 GB above the inputs at
160x224x192, well under the network's own peak (the network's activations are freed before the
optimisation starts).

Inverse (``return_inverse=True``, the bundle's ``save_inverse``): the inferer then returns
``{"ddf": ..., "inverse": ...}``, the inverse map's displacement on the same grid
(``inverse(p + ddf(p)) = -ddf(p)`` up to interpolation), from velocities wherever the map is
made of them (:mod:`scripts.inverse`):

* ``io_iterations = 0``: the network's map, inverted from its levels' velocities
  (``network.forward_with_inverse``: ``EOIR`` and ``scripts.lean.LeanEOIR``); a network without
  that method (a TorchScript export) by fixed-point iteration of its field;
* ``warm_start``: the map is ``exp(v)`` alone, its inverse ``exp(-v)`` (the velocity grid's
  integration, resized like ``exp(v)``);
* ``compose``: ``phi = phi_net o exp(v)``, its inverse ``exp(-v) o phi_net^-1`` with the
  network's inverse as for ``io_iterations = 0``.

The velocity inverse is then refined by ``inverse_iterations`` fixed-point steps against the
final field (``w <- -ddf(y + w(y))``, :func:`scripts.inverse.fixed_point_inverse` started from
it): the reverse composition inverts the scaling and squaring only up to its interpolation
errors (:mod:`scripts.inverse`); measured on the sample pair (io 0) 0.077 / 0.32 voxel
(median / 95th percentile of ``|inverse(p + ddf(p)) + ddf(p)|`` in the brain), 0.029 / 0.114
after 5 steps, against 0.029 / 0.118 for 40 fixed-point steps from ``-ddf`` (the floor is the
trilinear interpolation of the check itself). A network without velocities gets the
fixed-point inverse from ``-ddf``.

The forward field is the same with or without the inverse (bit for bit).

Logging: logger ``eoir.io``; one INFO line per call (iterations, loss before/after, seconds),
the loss of every iteration at DEBUG.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from .errors import InputError
from .inverse import FIXED_POINT_ITERATIONS, compose, fixed_point_inverse
from .losses import grad_l2_loss, image_pyramid, local_ncc_loss
from .layers import INTEGRATION_STEPS, ScriptableDVF2DDF, ScriptableWarp

__all__ = ["InstanceOptimizationInferer", "check_io_iterations", "resize_field", "level_window", "network_with_inverse"]

logger = logging.getLogger("eoir.io")

#: smallest velocity-grid side: a level whose velocity grid would be smaller is not used
MIN_VELOCITY_SIDE = 4
#: iterations of a level / iterations of the next finer level
COARSE_TO_FINE_RATIO = 4
#: how the network's field enters (see the module docstring)
IO_INITS = ("warm_start", "compose", "select")
#: the coarsest level an EOIR network can stop at (its pyramid has levels 0..4)
MAX_NETWORK_LEVEL = 4


def _takes_argument(fn: Callable, name: str) -> bool:
    """Whether ``fn(...)`` (a module, a TorchScript module or a function) takes keyword ``name``."""
    forward = getattr(fn, "forward", fn)
    schema = getattr(forward, "schema", None)  # TorchScript method
    if schema is not None:
        return any(a.name == name for a in schema.arguments)
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no introspectable signature
        return False


def check_io_iterations(value: Any) -> int:
    """``value`` as an int >= 0, else :class:`InputError` (integral floats such as ``50.0`` pass)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, numbers.Real) and not isinstance(value, bool):
        ok = math.isfinite(value) and float(value).is_integer()
    if not ok or int(value) < 0:
        raise InputError(f"io_iterations must be an integer >= 0, got {value!r}")
    return int(value)


def _check_number(name: str, value: Any, minimum: float, strict: bool) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        if value > minimum or (not strict and value == minimum):
            return float(value)
    rel = ">" if strict else ">="
    raise InputError(f"{name} must be a finite number {rel} {minimum:g}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int, odd: bool = False) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        if not odd or value % 2 == 1:
            return int(value)
    what = "an odd integer" if odd else "an integer"
    raise InputError(f"{name} must be {what} >= {minimum}, got {value!r}")


def resize_field(u: torch.Tensor, shape) -> torch.Tensor:
    """A displacement field resampled onto another grid covering the same field of view.

    Trilinear, ``align_corners=True`` (corner voxel centres coincide, as in the network's and
    the loss pyramid's resizing), voxel units rescaled per axis by ``(n_new - 1) / (n_old - 1)``.
    Returns ``u`` itself when the shape is unchanged.
    """
    src = tuple(u.shape[2:])
    shape = tuple(int(n) for n in shape)
    if src == shape:
        return u
    out = F.interpolate(u, size=shape, mode="trilinear", align_corners=True)
    scale = [(n - 1) / max(s - 1, 1) for n, s in zip(shape, src)]
    return out * torch.tensor(scale, dtype=out.dtype, device=out.device).view(1, -1, *([1] * len(shape)))


def level_window(window: int, level: int) -> int:
    """NCC window at pyramid ``level`` for ``window`` voxels at level 0: ``window / 2**level`` rounded
    to the nearest odd integer, at least 3 (9 -> 9, 5, 3, 3, ...)."""
    k = window / 2**level
    return max(3, int(2 * math.floor((k - 1) / 2 + 0.5) + 1))


def network_with_inverse(network: Callable[..., Any], inputs: torch.Tensor, *args: Any,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(ddf, inverse, how)`` of ``network(inputs)``: ``network.forward_with_inverse`` where it has
    one (``how = "velocities"``: EOIR's reverse composition, unrefined), else the field's inverse
    by fixed-point iteration from ``-ddf`` (``how = "fixed point"``). Runs without gradients."""
    with torch.no_grad():
        method = getattr(network, "forward_with_inverse", None)
        if callable(method):
            ddf, inverse = method(inputs, *args, **kwargs)
            return ddf, inverse, "velocities"
        out = network(inputs, *args, **kwargs)
        ddf = out["ddf"] if isinstance(out, dict) else out
        inverse = fixed_point_inverse(convert_to_tensor(ddf, track_meta=False), iterations=FIXED_POINT_ITERATIONS)
        return ddf, inverse, "fixed point"


def split_iterations(total: int, levels: int, ratio: int = COARSE_TO_FINE_RATIO) -> list[int]:
    """``total`` iterations over ``levels`` levels, coarse first, each level ``ratio`` x the next
    finer one (rounded; the finest level gets the remainder): ``(50, 2) -> [40, 10]``."""
    weights = [ratio ** (levels - 1 - k) for k in range(levels)]
    out = [int(round(total * w / sum(weights))) for w in weights[:-1]]
    return out + [total - sum(out)]


class InstanceOptimizationInferer(Inferer):
    """Network prediction refined per pair by optimising a residual stationary velocity field.

    Module docstring: the transform (``ddf = u_io + warp(u_net, u_io)``, ``u_io = exp(v)``), the
    loss, the resolutions and the cost. ``__call__(inputs, network, *args, **kwargs)`` runs
    ``network(inputs, *args, **kwargs)`` once (no gradient) and returns the refined
    ``(B, 3, D0, D1, D2)`` ``ddf`` (float32, a plain tensor). It works whatever the caller's mode:
    MONAI's evaluators call inferers under ``torch.no_grad()``; gradients are re-enabled (and
    inference mode and autocast switched off) for the optimisation only.

    Args:
        io_iterations: Adam steps per pair over all levels (int >= 0). 0 = the network's field,
            unchanged (``network(inputs)`` is returned as is). Time grows linearly with it.
        io_learning_rate: Adam learning rate, in voxels of the velocity grid per step.
        io_reg_weight: weight of the diffusion regulariser ``grad_l2_loss(v)`` (the training
            loss's); larger = smoother, smaller correction.
        io_level: finest pyramid level of the similarity loss (0 = input grid, 1 = half,
            2 = quarter); ``v`` lives one level coarser. One level finer = finer detail at
            ~5-8x the time per iteration.
        io_levels: number of loss levels, coarse to fine, ending at ``io_level``; each level gets
            1/4 of the iterations of the next coarser one. Levels whose velocity grid would be
            under 4 voxels on a side are skipped (tiny images; at worst level 0 alone is used).
        io_ncc_window: local NCC window in voxels of the input grid (odd); at level ``l`` it is
            ``io_ncc_window / 2**l`` rounded to an odd size >= 3.
        exact_gradient: back-propagate through the scaling-and-squaring integration instead of
            the straight-through approximation (about 1.6x slower, the same accuracy in our tests).
        integration_steps: scaling-and-squaring steps of ``exp(v)`` (7, as in the network).
        io_init: ``"compose"`` (``phi = phi_net o exp(v)``, ``v`` from 0), ``"warm_start"``
            (``phi = exp(v)``, ``v`` started at the network's displacement resampled to the
            velocity grid) or ``"select"`` (both, each pair keeping the one with the higher
            full-grid local NCC; the whole network runs; the bundle's configs use it): see the
            module docstring. Any way, 0 iterations = the network.
        io_network_level: with ``warm_start``, the finest pyramid level the network runs
            (0-4; passed as ``finest_level`` to networks that take it): 0 = the whole
            network; 1 (default) skips the full-resolution level, whose detail the warm start
            does not read (see the module docstring).
        return_inverse: return ``{"ddf", "inverse"}`` instead of the ``ddf`` (module docstring).
        inverse_iterations: fixed-point steps refining a velocity inverse against the final
            field (0 = the reverse composition alone; module docstring).

    Attributes:
        last_stats: after a call with ``io_iterations > 0``: ``iterations``, ``stages``
            (``[(level, iterations), ...]`` coarse to fine), ``loss_before`` / ``loss_after``
            (total loss on the finest level at ``v = 0`` and at the final ``v``), ``ncc_before`` /
            ``ncc_after`` (its NCC term), ``seconds`` (optimisation and composition, without the
            network), ``loss_shape`` and ``velocity_shape`` of the finest level.
        last_inverse: with ``return_inverse``, how the last call's inverse was made:
            ``"velocities"`` or ``"fixed point"`` (a network without velocities, module docstring).

    Example (``configs/inference.json``)::

        "inferer": {"_target_": "scripts.instance_optimization.InstanceOptimizationInferer",
                    "io_iterations": "@io_iterations", "io_learning_rate": "@io_learning_rate",
                    "io_reg_weight": "@io_reg_weight", "io_level": "@io_level", "io_levels": "@io_levels"}
    """

    def __init__(
        self,
        io_iterations: int = 50,
        io_learning_rate: float = 0.1,
        io_reg_weight: float = 3.0,
        io_level: int = 1,
        io_levels: int = 2,
        io_ncc_window: int = 9,
        exact_gradient: bool = False,
        integration_steps: int = INTEGRATION_STEPS,
        io_init: str = "warm_start",
        io_network_level: int = 1,
        return_inverse: bool = False,
        inverse_iterations: int = 5,
    ) -> None:
        super().__init__()
        if io_init not in IO_INITS:
            raise InputError(f"io_init must be one of {', '.join(IO_INITS)}, got {io_init!r}")
        self.io_init = io_init
        self.io_iterations = check_io_iterations(io_iterations)
        self.io_learning_rate = _check_number("io_learning_rate", io_learning_rate, 0.0, strict=True)
        self.io_reg_weight = _check_number("io_reg_weight", io_reg_weight, 0.0, strict=False)
        self.io_level = _check_int("io_level", io_level, 0)
        self.io_levels = _check_int("io_levels", io_levels, 1)
        self.io_ncc_window = _check_int("io_ncc_window", io_ncc_window, 1, odd=True)
        self.exact_gradient = bool(exact_gradient)
        self.integration_steps = _check_int("integration_steps", integration_steps, 1)
        if not (isinstance(io_network_level, numbers.Integral) and not isinstance(io_network_level, bool)
                and 0 <= io_network_level <= MAX_NETWORK_LEVEL):
            raise InputError(f"io_network_level must be an integer in 0..{MAX_NETWORK_LEVEL}, got {io_network_level!r}")
        self.io_network_level = int(io_network_level)
        self.return_inverse = bool(return_inverse)
        self.inverse_iterations = _check_int("inverse_iterations", inverse_iterations, 0)
        self.last_stats: dict | None = None
        self.last_inverse: str | None = None
        # the network's MONAI Warp / DVF2DDF layers (zeros padding; MONAI's default is "border"),
        # sampling batch-1 volumes on two threads (the same values; see ScriptableWarp)
        self.warp = ScriptableWarp(mode="bilinear", padding_mode="zeros", batch_split=True)
        self.integrate = ScriptableDVF2DDF(num_steps=self.integration_steps, mode="bilinear", padding_mode="zeros",
                                           batch_split=True)

    # ----------------------------------------------------------------------------------------
    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.io_iterations == 0:
            if not self.return_inverse:
                return network(inputs, *args, **kwargs)  # exactly SimpleInferer
            ddf, inverse, self.last_inverse = network_with_inverse(network, inputs, *args, **kwargs)
            logger.info(f"inverse field: the network's, from its {self.last_inverse}")
            if self.last_inverse == "velocities":
                inverse = self._refined(ddf, inverse)
            return {"ddf": ddf, "inverse": inverse}
        if inputs.ndim != 5 or inputs.shape[1] != 2:
            raise ValueError("InstanceOptimizationInferer expects (B, 2, D0, D1, D2) = cat([moving, fixed], 1), "
                             f"got {tuple(inputs.shape)}")
        level = self.io_network_level if self.io_init == "warm_start" else 0
        if min(inputs.shape[2:]) < 4:  # too small to optimise: the whole network's field is returned
            level = 0
        if level and _takes_argument(network, "finest_level"):
            kwargs = {**kwargs, "finest_level": level}
        # the network's inverse is part of the result's unless the map is exp(v) alone (warm start)
        w_net = None
        if self.return_inverse and (self.io_init in ("compose", "select") or min(inputs.shape[2:]) < 4):
            u_net, w_net, self.last_inverse = network_with_inverse(network, inputs, *args, **kwargs)
        else:
            with torch.no_grad():
                out = network(inputs, *args, **kwargs)
            u_net = out["ddf"] if isinstance(out, dict) else out
            del out
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(inputs.device.type, enabled=False):
            x = convert_to_tensor(inputs, track_meta=False)  # plain tensors: no MetaTensor bookkeeping
            u_net = convert_to_tensor(u_net, track_meta=False)
            # tensors made under inference mode cannot enter autograd: copy them out of it
            x = x.clone() if x.is_inference() else x
            u_net = u_net.clone() if u_net.is_inference() else u_net
            dtype = torch.promote_types(x.dtype, torch.float32)
            ddf, v, modes = self._optimize_selected(x[:, :1].to(dtype), x[:, 1:].to(dtype), u_net.detach().to(dtype))
        if not self.return_inverse:
            return ddf
        with torch.no_grad():
            inverse = self.inverse(v, tuple(inputs.shape[2:]), w_net, modes)
        return {"ddf": ddf, "inverse": self._refined(ddf, inverse)}

    def _refined(self, ddf: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """An inverse after ``inverse_iterations`` fixed-point steps against ``ddf``."""
        if not self.inverse_iterations:
            return inverse
        with torch.no_grad():
            ddf = convert_to_tensor(ddf, track_meta=False)
            inverse = convert_to_tensor(inverse, track_meta=False).to(ddf.dtype)
            return fixed_point_inverse(ddf, start=inverse, iterations=self.inverse_iterations)

    def inverse(self, v: torch.Tensor | None, shape, w_net: torch.Tensor | None, modes=None) -> torch.Tensor:
        """Inverse displacement of the optimised map on the input grid ``shape``: ``exp(-v)``
        (warm start), ``exp(-v) o (id + w_net)`` (compose; ``w_net`` the network's inverse),
        ``w_net`` when no ``v`` was optimised (an image too small). ``modes``: each pair's mode
        (default: ``io_init`` for all; ``select`` gives each pair its own)."""
        if v is None:
            return w_net
        modes = list(modes or [self.io_init] * v.shape[0])
        psi = resize_field(self.integrate(-v), shape)
        if all(m == "warm_start" for m in modes):
            self.last_inverse = "velocities"
            logger.info("inverse field: exp(-v) of the optimised velocity")
            return psi
        w_net = convert_to_tensor(w_net, track_meta=False).to(psi.dtype)
        logger.info(f"inverse field: exp(-v) composed with the network's inverse (from its {self.last_inverse})"
                    + ("" if all(m == "compose" for m in modes) else " for the pairs that kept compose"))
        composed = compose(psi, w_net, self.warp)
        keep = torch.tensor([m == "compose" for m in modes], device=psi.device).view(-1, 1, 1, 1, 1)
        return torch.where(keep, composed, psi)

    # ----------------------------------------------------------------------------------------
    def stages(self, shape) -> list[tuple[int, int]]:
        """``[(loss level, iterations), ...]`` coarse to fine for an image of spatial ``shape``."""
        fits = [lv for lv in range(self.io_level, self.io_level + self.io_levels)
                if min(n // 2 ** (lv + 1) for n in shape) >= MIN_VELOCITY_SIDE] or [0]
        if fits[0] != self.io_level or len(fits) != self.io_levels:
            logger.info(f"image {tuple(shape)} is small for io_level {self.io_level}, io_levels {self.io_levels}: "
                        f"using levels {fits}")
        levels = fits[::-1]
        return list(zip(levels, split_iterations(self.io_iterations, len(levels))))

    def _velocity_to(self, v: torch.Tensor, shape, grad: bool) -> torch.Tensor:
        """``exp(v)`` on the grid ``shape``; straight-through gradient unless ``exact_gradient``."""
        if grad and not self.exact_gradient:
            with torch.no_grad():
                phi = self.integrate(v)
            u = v + (phi - v).detach()  # value exp(v), gradient of the identity
        else:
            u = self.integrate(v)
        return resize_field(u, shape)

    def _loss(self, v: torch.Tensor, level: dict, grad: bool):
        """``(loss, ncc)`` of velocity ``v`` on a prepared ``level`` (:meth:`_prepare`)."""
        u = self._velocity_to(v, level["fixed"].shape[2:], grad)
        ncc = local_ncc_loss(self.warp(level["warped_net"], u), level["fixed"], window=level["window"])
        return ncc + self.io_reg_weight * grad_l2_loss(v), ncc

    def _prepare(self, pyramid: list[torch.Tensor], u_net: torch.Tensor, level: int) -> dict:
        images = pyramid[level]
        shape = tuple(images.shape[2:])
        return {
            "level": level,
            "fixed": images[:, 1:],
            # the moving image through the (fixed) network map, resampled once on this grid
            "warped_net": self.warp(images[:, :1], resize_field(u_net, shape)),
            "window": level_window(self.io_ncc_window, level),
            "velocity_shape": tuple(n // 2 for n in shape),
        }

    def optimize(self, moving: torch.Tensor, fixed: torch.Tensor, u_net: torch.Tensor) -> torch.Tensor:
        """Refine ``u_net`` for the pair(s) ``moving``, ``fixed`` (``(B, 1, *S)``, float) -> ``(B, 3, *S)``.

        ``io_init="select"``: both ``compose`` and ``warm_start`` (from the whole network's
        field), each pair keeping the result whose moving image, warped on the input grid, has
        the higher local NCC (``io_ncc_window``) with the fixed image."""
        return self._optimize_selected(moving, fixed, u_net)[0]

    def _optimize_selected(self, moving: torch.Tensor, fixed: torch.Tensor, u_net: torch.Tensor):
        """``(ddf, v, modes)``: :meth:`optimize`'s field, the optimised velocity (None if none was)
        and the mode each pair's result came from."""
        if self.io_init != "select":
            ddf, v = self._optimize(moving, fixed, u_net, self.io_init)
            return ddf, v, [self.io_init] * moving.shape[0]
        start = time.perf_counter()
        results, stats, scores = [], [], []
        for mode in ("compose", "warm_start"):
            ddf, v = self._optimize(moving, fixed, u_net, mode)
            with torch.no_grad():
                warped = self.warp(moving, ddf)
                cc = torch.stack([1.0 - local_ncc_loss(warped[b:b + 1], fixed[b:b + 1], window=self.io_ncc_window)
                                  for b in range(moving.shape[0])])
                del warped
            results.append((ddf, v))
            stats.append(self.last_stats)
            scores.append(cc)
        keep_compose = scores[0] >= scores[1]  # ties: the network's detail
        (ddf_c, v_c), (ddf_w, v_w) = results
        keep = keep_compose.view(-1, 1, 1, 1, 1)
        ddf = torch.where(keep, ddf_c, ddf_w)
        v = None if v_c is None or v_w is None else torch.where(keep, v_c, v_w)
        modes = ["compose" if k else "warm_start" for k in keep_compose.tolist()]
        self.last_stats = {**stats[0], "seconds": time.perf_counter() - start, "selected": modes,
                           "ncc_full": {"compose": scores[0].tolist(), "warm_start": scores[1].tolist()}}
        logger.info(f"io_init select: {', '.join(modes)} (full-grid NCC compose "
                    f"{', '.join(f'{v:.4f}' for v in scores[0].tolist())}, warm start "
                    f"{', '.join(f'{v:.4f}' for v in scores[1].tolist())}), {self.last_stats['seconds']:.1f} s")
        return ddf, v, modes

    def _optimize(self, moving: torch.Tensor, fixed: torch.Tensor, u_net: torch.Tensor, mode: str):
        """``(ddf, v)`` of one ``mode`` (``"compose"`` or ``"warm_start"``): the refined field and
        the optimised velocity (None if none was)."""
        start = time.perf_counter()
        shape = tuple(moving.shape[2:])
        if min(shape) < 4:  # no velocity grid of >= 2 voxels per side even at level 0
            logger.info(f"image {shape} too small for instance optimisation: the network's field is returned")
            return u_net, None
        stages = self.stages(shape)
        debug = logger.isEnabledFor(logging.DEBUG)
        warm = mode == "warm_start"
        u_outer = torch.zeros_like(u_net) if warm else u_net  # the map composed after exp(v)
        with torch.no_grad():  # the loss pyramid of both images in one pass
            pyramid = image_pyramid(torch.cat([moving, fixed], dim=1), stages[0][0] + 1)
            finest = self._prepare(pyramid, u_outer, stages[-1][0])
            v = torch.zeros(moving.shape[0], len(shape), *finest["velocity_shape"], dtype=moving.dtype,
                            device=moving.device)
            if warm:  # exp(u) ~ u: the network's displacement as the initial velocity
                v = resize_field(u_net, tuple(n // 2 ** (stages[0][0] + 1) for n in shape))
            loss_before, ncc_before = (t.item() for t in self._loss(v, finest, grad=False))
        for level_index, iterations in stages:
            with torch.no_grad():
                level = finest if level_index == finest["level"] else self._prepare(pyramid, u_outer, level_index)
                v = resize_field(v, level["velocity_shape"])
            v.requires_grad_(True)
            opt = torch.optim.Adam([v], lr=self.io_learning_rate)
            for it in range(iterations):
                opt.zero_grad(set_to_none=True)
                loss, ncc = self._loss(v, level, grad=True)
                loss.backward()
                if debug:
                    logger.debug(f"io level {level_index} iteration {it + 1}/{iterations}: loss {loss.item():.5f} "
                                 f"(ncc {ncc.item():.5f})")
                opt.step()
            del opt, level
            v = v.detach()
        with torch.no_grad():
            loss_after, ncc_after = (t.item() for t in self._loss(v, finest, grad=False))
            loss_shape = tuple(finest["fixed"].shape[2:])
            del pyramid, finest
            u_io = self._velocity_to(v, shape, grad=False)
            ddf = u_io if warm else u_io + self.warp(u_net, u_io)
            del u_io, u_outer
        seconds = time.perf_counter() - start
        self.last_stats = {
            "iterations": self.io_iterations, "stages": stages, "loss_before": loss_before,
            "loss_after": loss_after, "ncc_before": ncc_before, "ncc_after": ncc_after, "seconds": seconds,
            "loss_shape": loss_shape, "velocity_shape": tuple(v.shape[2:]),
        }
        plan = " + ".join(f"{n} at level {lv}" for lv, n in stages)
        logger.info(f"instance optimisation: {plan} (finest loss grid {'x'.join(map(str, loss_shape))}): "
                    f"loss {loss_before:.4f} -> {loss_after:.4f} (ncc {ncc_before:.4f} -> {ncc_after:.4f}), "
                    f"{seconds:.1f} s")
        return ddf, v
