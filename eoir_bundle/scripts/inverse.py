"""Inverse displacement fields: from the velocities that made a map, or by fixed-point iteration.

Conventions (MONAI ``Warp``, the network's): displacements ``(B, 3, D0, D1, D2)`` in voxel units,
channel ``i`` along array axis ``i``; a displacement ``u`` stands for the map ``x -> x + u(x)``,
and ``warp(img, u)(x) = img(x + u(x))`` (trilinear, ``align_corners=True``). The inverse of
``u`` is the displacement ``w`` with ``w(y) = -u(y + w(y))``, i.e. ``(id + u) o (id + w) = id``
(to interpolation), and then also ``w(x + u(x)) = -u(x)``.

Two ways, the first wherever the velocities are known:

* **Reverse composition** (:func:`compose`, :func:`invert_levels`): a map made by composing
  exponentials of stationary velocities, ``exp(v_a) o exp(v_b) o ...``, has the inverse
  ``... o exp(-v_b) o exp(-v_a)``; each ``exp(-v)`` is integrated by scaling and squaring like
  ``exp(v)``. Its error is that of the integration and of the resampling, not of a search.
* **Fixed-point iteration** (:func:`fixed_point_inverse`): ``w <- -warp(u, w)`` from
  ``w = -u``, for a field whose velocities are unknown (e.g. a TorchScript network). It
  converges where ``|grad u| < 1``, at a rate of about ``|grad u|`` per iteration.

The reverse composition is not exact: each ``exp(-v)`` inverts the 7-step scaling and squaring
of ``exp(v)`` only up to its interpolation errors, which the coarse levels make largest and
each upsampling doubles (in voxels of the finest grid); and EOIR's ``upsample`` is not exactly a
change of grid (see :func:`invert_levels`). A few fixed-point steps started from it
(``fixed_point_inverse(u, start=w)``) remove that residue (``python -m
scripts.tools.inverse_check`` measures the inverse-consistency error).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .layers import ScriptableWarp

__all__ = ["compose", "invert_levels", "fixed_point_inverse", "FIXED_POINT_ITERATIONS"]

#: iterations of :func:`fixed_point_inverse` (the change is then well under 1e-3 voxel where it converges)
FIXED_POINT_ITERATIONS = 40

Field = torch.Tensor
Warp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compose(outer: Field, inner: Field, warp: Warp) -> Field:
    """Displacement of ``(id + outer) o (id + inner)`` (``inner`` applied first):
    ``inner + warp(outer, inner)``. Both on one grid."""
    return inner + warp(outer, inner)


def invert_levels(velocities: List[Field], integrate: Callable[[Field], Field], warp: Warp,
                  upsample: Callable[[Field], Field]) -> Field:
    """Inverse of a coarse-to-fine map of EOIR's kind, from its per-level velocities.

    The network composes, from its coarsest level to its finest, ``u_l = phi_l + warp(u_up,
    phi_l)`` with ``phi_l = exp(v_l)`` and ``u_up = upsample(u_{l+1})``: the map of level ``l`` is
    ``M_l = Up(M_{l+1}) o exp(v_l)``. Its inverse is ``M_l^-1 = exp(-v_l) o Up(M_{l+1}^-1)``,
    composed in reverse order::

        w_coarsest = exp(-v_coarsest)
        w_l = U + warp(exp(-v_l), U),   U = upsample(w_{l+1})

    ``velocities``: finest level first (as ``EOIR.pyramid`` lists them). ``integrate``, ``warp``
    and ``upsample`` are the network's own (scaling and squaring, its warp, ``2 * x2``).
    Returns the inverse displacement on the finest level's grid. Up to interpolation,
    ``Up(M^-1)`` inverts ``Up(M)``: ``upsample`` doubles voxel units while
    ``align_corners=True`` scales positions by ``(2n - 1) / (n - 1)``, a mismatch of
    ``1 / (2n - 1)`` of the coarse displacement's variation (small at all but the coarsest
    levels; measured in the bundle's docs).
    """
    w: Optional[Field] = None
    for v in reversed(velocities):
        psi = integrate(-v)
        w = psi if w is None else compose(psi, upsample(w), warp)
    if w is None:
        raise ValueError("invert_levels needs at least one velocity")
    return w


def fixed_point_inverse(u: Field, start: Optional[Field] = None, iterations: int = FIXED_POINT_ITERATIONS,
                        tolerance: float = 1e-4) -> Field:
    """Inverse of the displacement ``u`` by fixed-point iteration ``w <- -u(y + w(y))``.

    Starts at ``start`` (an estimate of the inverse, e.g. the reverse composition of the
    velocities) or ``-u``; stops after ``iterations`` or once no voxel moves by more than
    ``tolerance`` voxels. Sampling outside the grid reads the border value of ``u`` (the inverse
    near the edge continues the edge's displacement). Points where ``id + u`` folds or
    ``|grad u| >= 1`` may not converge; they keep the last iterate.
    """
    warp = ScriptableWarp(mode="bilinear", padding_mode="border", batch_split=True)
    w = -u if start is None else start
    for _ in range(int(iterations)):
        new = -warp(u, w)
        change = float((new - w).abs().max())
        w = new
        if change < tolerance:
            break
    return w
