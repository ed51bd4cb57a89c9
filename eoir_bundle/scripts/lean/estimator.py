"""A pyramid level's flow estimator, streamed by rows.

The estimator is ``conv(relu(conv(relu(conv(cat(y + x, y - x))))))``, ``2N -> 2N -> 27 -> 3``
channels, on the fixed features ``y`` and the moving features ``x`` warped by the upsampled
coarser field. :func:`estimate` streams rows of ``y`` and of the warped ``x`` through its
three convolutions (chained row streams, ReLU fused into oneDNN); only the 3-channel
velocity is whole. The same sums as ``EOIR``'s estimator, in another order:

* the first convolution's weight ``[Wa, Wb]`` acts on ``[y + x, y - x]``, that is
  ``(Wa + Wb)`` on ``y`` plus ``(Wa - Wb)`` on ``x``: two ``N``-channel convolutions (faster
  than one ``2N``-channel one), the moving one added onto the fixed one before the ReLU
  (the rounding of ``y + x`` and ``y - x`` is not made). With ragged fixed features the fixed
  one runs only on the tiles of their kept voxels (elsewhere its output is the plane's
  response): exact by linearity;
* the 27- and 3-channel convolutions run zero-padded to 32 and 8 channels (the same values,
  oneDNN's faster shapes).
"""

from __future__ import annotations

import torch

from ..layers import sample_in_halves
from .covers import FULL, Covers, dilate, fill_background, rect_slices
from .maps import Map
from .memory import CL, Buffer, cl_empty
from .resampling import grid_rows
from .streams import RowStream, chunks, conv_into


def _padded(weight: torch.Tensor, bias: torch.Tensor, cout: int, cin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's weight and bias zero-padded to ``cout`` output and ``cin`` input channels.

    The same values: extra outputs are 0 (and stay 0 through a ReLU), extra inputs meet zero
    weights. oneDNN's AVX2 kernels are faster on multiples of 8 channels (see NOTES.md).
    """
    w = weight.new_zeros((cout, cin) + tuple(weight.shape[2:]))
    w[: weight.shape[0], : weight.shape[1]] = weight
    b = bias.new_zeros(cout)
    b[: bias.shape[0]] = bias
    return w, b


def estimate(est, x: torch.Tensor, y, up_rows, rows: int = 2, consume_y: bool = False) -> torch.Tensor:
    """Velocity ``v = est(warp(x, up), y)`` of one level, streamed by rows.

    ``x``: moving features (channels-last); ``y``: fixed features, a tensor or a ragged
    :class:`Map` (``consume_y``: its rows are released once read). ``up_rows(r0, r1)`` gives rows
    of the upsampled coarser field (``None`` at the coarsest level): the warped moving
    features are made row by row. The three convolutions are chained :class:`RowStream` s,
    each writing straight into the next one's input rows, ReLU fused into the first two:

    * the first one's input halves are ``y + x`` and ``y - x``, so its weight ``[Wa, Wb]`` acts
      as ``(Wa + Wb)`` on ``y`` plus ``(Wa - Wb)`` on ``x``: two ``N``-channel convolutions
      (faster than one ``2N``-channel one, see NOTES.md), the moving one added onto the fixed
      one by oneDNN's "add" fusion before the ReLU. With a ragged ``y`` the fixed one runs on
      the tiles of ``y``'s kept voxels grown by one (its plane's response elsewhere);
    * the 27-channel map and the 3-channel output are zero-padded to 32 and 8 channels
      (:func:`_padded`).

    Returns ``v (1, 3, D0, D1, D2)`` contiguous.
    """
    n = x.shape[1]
    depth, hw = x.shape[2], tuple(x.shape[3:])
    c1, c2, c3 = est.features[0].conv, est.features[1].conv, est.flow.conv
    w1 = c1.weight.detach()
    wy, wx = w1[:, :n] + w1[:, n:], w1[:, :n] - w1[:, n:]
    m2, m3 = (-(-c.weight.shape[0] // 8) * 8 for c in (c2, c3))
    w2, b2 = _padded(c2.weight.detach(), c2.bias.detach(), m2, c2.weight.shape[1])
    w3, b3 = _padded(c3.weight.detach(), c3.bias.detach(), m3, m2)
    skips = isinstance(y, Map) and y.ragged and not bool(y.keep.all())  # a zero background to skip
    sy = RowStream(wy, None, depth, hw, rows, covers=Covers(dilate(y.keep, 1)) if skips else None)
    sx = RowStream(wx, c1.bias.detach(), depth, hw, rows, relu=True)
    s2 = RowStream(w2, b2, depth, hw, rows, relu=True)
    s3 = RowStream(w3, b3, depth, hw, rows)
    if skips:  # the fixed part's response to y's background plane
        y_plane = conv_into(cl_empty(wy.shape[0], 1, *hw),
                            y.plane.expand(-1, -1, 3, -1, -1).contiguous(memory_format=CL), wy, None, (0, 1, 1))
    v = torch.empty((1, 3, depth) + hw)
    grid = Buffer()
    for r0, r1 in chunks(depth, rows):
        if up_rows is None:
            sx.slot(r1 - r0).copy_(x[:, :, r0:r1])
        else:
            g = grid.plain(1, r1 - r0, hw[0], hw[1], 3)
            sample_in_halves(x, grid_rows(up_rows(r0, r1), r0, (depth,) + hw, g), "bilinear", "zeros",
                             out=sx.slot(r1 - r0))
        if isinstance(y, Map):
            y.read(r0, r1, out=sy.slot(r1 - r0))
            if consume_y:
                y.release_before(r1)  # read into the stream: the stored rows are done with
        else:
            sy.slot(r1 - r0).copy_(y[:, :, r0:r1])
        k = sy.pending()
        z1 = s2.slot(k) if k else None  # the first convolution's output rows
        res = sy.conv(into=z1)
        if res is None:
            sx.conv()  # nothing computable yet (returns None too)
            continue
        if res.cover != FULL:
            fill_background(z1, y_plane, res.cover)
            for zy, rect in res.tiles:
                z1[rect_slices(rect)].copy_(zy)
        sx.conv(onto=z1)  # relu(conv(wx, x) + bias + conv(wy, y))
        k = s2.pending()
        if s2.conv(into=s3.slot(k) if k else None) is None:
            continue
        res = s3.conv()
        if res is not None:
            v[:, :, res.q0 : res.q1] = res.tiles[0][0][:, :3]
    return v
