"""The encoder, run by rows without ever holding its ``2N``-channel map, and its storage plan.

The encoder is three blocks ``conv -> InstanceNorm -> PReLU`` (``1 -> N -> 2N -> N``
channels). Block 1 (one input channel) is an im2col matrix product. Block 2's output must be
normalised before block 3 can use it, and storing it costs ``2N`` x volume. Two exact ways
round it (:func:`encode`):

* ``split=G``: block 2's output channels are made in ``G`` groups, each stored, normalised
  with its own moments (InstanceNorm is per channel) and pushed through the matching input
  channels of block 3, whose partial outputs are summed (a convolution is linear in its
  input channels);
* ``split=0``: blocks 1-2 run twice, first for block 2's moments, then again feeding block 3.

:func:`choose_split` picks, per image, the fewest groups whose stored maps fit a budget
(:func:`encoder_peak`: with one group, block 3 gives each stored row back once read).

With background skipping every block computes only the tiles of its covers; the rest of
each row is the block's background plane (see :mod:`.covers`), also counted in its moments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..network import EOIR
from .covers import EMPTY, FULL, Covers, fill_background, keep_mask, rect_slices, rects
from .maps import Map
from .memory import CL, Buffer, as_matrix, cl_empty, per_channel, release_free_memory
from .moments import Moments, norm_prelu_, norm_prelu_into
from .streams import RowStream, chunks, conv_into


class Encoder:
    """The encoder's parameters and per-image state for :func:`encode`."""

    def __init__(self, net: EOIR, img: torch.Tensor, rows: int, skip_background: bool):
        blocks = list(net.encoder)
        if any(b.adn.A.weight.numel() != 1 for b in blocks):
            raise ValueError("the lean path expects PReLU with one shared slope")
        self.w = [b.conv.weight.detach().contiguous(memory_format=CL) for b in blocks]
        self.b = [b.conv.bias.detach() for b in blocks]
        self.slope = [float(b.adn.A.weight.detach().reshape(-1)[0]) for b in blocks]
        self.eps = [float(b.adn.N.eps) for b in blocks]
        self.n = self.w[0].shape[0]
        self.w1_mat = self.w[0].reshape(self.n, 27).t().contiguous()  # block 1: (voxels, 27) @ (27, N)
        self.depth, self.hw, self.rows = img.shape[0], tuple(img.shape[1:]), rows
        self.img_pad = F.pad(img.float()[None, None], (1, 1, 1, 1, 1, 1))[0, 0]
        # where block 2's and block 3's outputs can differ from their planes (what ragged maps of
        # them store), and the tiles blocks 1-2 and block 3 compute (block 1 needs keep_1 only)
        if skip_background:
            self.keep2, self.keep3 = keep_mask(img, 2), keep_mask(img, 3)
            self.covers2, self.covers3 = Covers(self.keep2), Covers(self.keep3)
        else:
            self.keep2 = self.keep3 = torch.ones(img.shape, dtype=torch.bool)
            self.covers2 = self.covers3 = Covers(None)
        self.z1_plane = per_channel(self.b[0]).expand(1, self.n, 1, *self.hw).contiguous(memory_format=CL)
        self.cols, self.z1 = Buffer(), Buffer()

    def plane_after(self, layer: int, plane_in: torch.Tensor, channels=slice(None), bias=True) -> torch.Tensor:
        """Raw output row of block ``layer`` (input ``channels``) on three rows of ``plane_in``."""
        w = self.w[layer][:, channels].contiguous(memory_format=CL)
        out = cl_empty(w.shape[0], 1, *self.hw)
        return conv_into(out, plane_in.expand(-1, -1, 3, -1, -1).contiguous(memory_format=CL), w,
                         self.b[layer] if bias else None, (0, 1, 1))

    def conv1(self, r0: int, r1: int, rect) -> torch.Tensor:
        """Block 1's raw convolution of rows ``[r0, r1)`` inside ``rect`` (an im2col product).

        The image is zero-padded by one voxel, so padded rows ``r0 .. r1 + 1`` hold the
        neighbourhoods; its 27 shifted copies (tap order ``kd, kh, kw``, PyTorch's) form the
        im2col matrix.
        """
        h0, h1, w0, w1 = (0, self.hw[0], 0, self.hw[1]) if rect == FULL else rect
        d, h, w = r1 - r0, h1 - h0, w1 - w0
        cols = self.cols.plain(27, d, h, w)
        for i in range(27):
            a, b, c = i // 9, (i // 3) % 3, i % 3
            cols[i].copy_(self.img_pad[r0 + a : r0 + a + d, h0 + b : h0 + b + h, w0 + c : w0 + c + w])
        out = self.z1.cl(self.n, d, h, w)
        torch.addmm(self.b[0], cols.view(27, -1).t(), self.w1_mat, out=as_matrix(out))
        return out

    def block1_norm(self) -> None:
        """Block 1's moments (one pass), and the background planes that follow from them."""
        mom = Moments(self.eps[0])
        for r0, r1 in chunks(self.depth, max(self.rows, 4)):
            cover = self.covers2(r0, r1)
            for rect in rects(cover):
                mom.add(self.conv1(r0, r1, rect))
            mom.add_outside(self.z1_plane, cover, r1 - r0)
        self.norm1 = mom.affine()
        self.a1_plane = norm_prelu_(self.z1_plane.clone(memory_format=CL), *self.norm1, self.slope[0])
        self.z2_plane = self.plane_after(1, self.a1_plane)
        release_free_memory()

    def block2(self, channels: slice):
        """Yield :class:`Rows` of block 2's raw output ``channels``, row by row."""
        s2 = RowStream(self.w[1][channels], self.b[1][channels], self.depth, self.hw, self.rows, self.covers2)
        for r0, r1 in chunks(self.depth, self.rows):
            slot, cover = s2.slot(r1 - r0), self.covers2(r0, r1)
            fill_background(slot, self.a1_plane, cover)
            for rect in rects(cover):
                norm_prelu_into(slot[rect_slices(rect)], self.conv1(r0, r1, rect), *self.norm1, self.slope[0])
            res = s2.conv()
            if res is not None:
                yield res

    def block2_norm(self, channels: slice, plane: torch.Tensor, store: Map | None = None):
        """A pass of block 2 (output ``channels``, background ``plane``): the InstanceNorm
        ``(scale, offset)`` of those channels; ``store``: also keep the raw rows there."""
        mom = Moments(self.eps[1])
        for z2 in self.block2(channels):
            if store is not None:
                store.write(z2)
            if z2.tiles:
                mom.add_matrix(z2.flat)
            mom.add_outside(plane, z2.cover, z2.q1 - z2.q0)
        release_free_memory()
        return mom.affine()

    def feed3(self, s3: RowStream, tiles, nrows: int, cover, norm2, a2_plane):
        """Push ``nrows`` rows of block 2 (raw, ``(z, rect)`` tiles of ``cover``) into block 3's stream, activated."""
        slot = s3.slot(nrows)
        fill_background(slot, a2_plane, cover)
        for z2, rect in tiles:
            norm_prelu_into(slot[rect_slices(rect)], z2, *norm2, self.slope[1])
        return s3.conv()

    def row_sizes(self, channels: int, keep: torch.Tensor | None = None) -> list:
        """Per row, the size of a map of ``channels`` stored dense (``keep=None``) or ragged
        (the voxels of ``keep``), in ``N``-channel full maps (a dense ``N``-channel map sums to 1)."""
        unit = self.n * self.depth * self.hw[0] * self.hw[1]
        if keep is None:
            return [channels * self.hw[0] * self.hw[1] / unit] * self.depth
        return [channels * n / unit for n in keep.flatten(1).sum(1).tolist()]


def encode(net: EOIR, img: torch.Tensor, *, split: int = 0, rows: int = 2, skip_background: bool = True,
           ragged: bool = False, encoder: Encoder | None = None):
    """Encoder features of one image ``(D0, D1, D2)``: a channels-last ``(1, N, D0, D1, D2)``
    tensor, or (``ragged=True``) a :class:`Map` storing the non-background voxels only.

    ``split=0`` recomputes blocks 1-2 for block 3 (peak: the output plus a few rows);
    ``split=G`` (a divisor of 2N) stores block 2's raw output in ``G`` groups of 2N/G
    channels, one group at a time (ragged), no recomputation. ``skip_background``: compute
    rows only where they can differ from the zero background's response (exact, see
    :func:`keep_mask`; nothing is skipped in images without exactly-zero background).
    """
    e = Encoder(net, img, rows, skip_background) if encoder is None else encoder
    depth, hw, n2 = e.depth, e.hw, e.w[1].shape[0]
    if split and n2 % split:
        raise ValueError(f"split must divide {n2}, got {split}")
    e.block1_norm()
    # block 3's raw output, normalised in place at the end
    out = Map(e.n, depth, hw, e.covers3, e.keep3 if ragged else None)
    if not split:  # a pass for block 2's moments, a second one feeding block 3
        norm2 = e.block2_norm(slice(None), e.z2_plane)
        a2_plane = norm_prelu_(e.z2_plane.clone(memory_format=CL), *norm2, e.slope[1])
        s3 = RowStream(e.w[2], e.b[2], depth, hw, rows, e.covers3)
        for z2 in e.block2(slice(None)):
            res = e.feed3(s3, z2.tiles, z2.q1 - z2.q0, z2.cover, norm2, a2_plane)
            if res is not None:
                out.write(res)
        out.set_plane(e.plane_after(2, a2_plane))
    else:  # block 2 group by group; block 3 = the sum of the groups' partial outputs
        g = n2 // split
        buf = Map(g, depth, hw, e.covers2, e.keep2)
        z3_plane = None
        for k in range(split):
            sl = slice(k * g, (k + 1) * g)
            buf.plane = e.z2_plane[:, sl].clone(memory_format=CL)
            norm2 = e.block2_norm(sl, buf.plane, store=buf)
            a2_plane = norm_prelu_(buf.plane.clone(memory_format=CL), *norm2, e.slope[1])
            part = e.plane_after(2, a2_plane, sl, bias=k == 0)
            z3_plane = part if z3_plane is None else z3_plane.add_(part)
            s3 = RowStream(e.w[2][:, sl], e.b[2] if k == 0 else None, depth, hw, rows, e.covers3)
            for r0, r1 in chunks(depth, rows):
                cover = e.covers2(r0, r1)
                z2 = buf.read(r0, r1) if cover != EMPTY else None
                tiles = [(z2[rect_slices(rect)], rect) for rect in rects(cover)]
                if k == split - 1:
                    buf.release_before(r1)  # read into a buffer: the last group's rows are done with
                res = e.feed3(s3, tiles, r1 - r0, cover, norm2, a2_plane)
                if res is not None:
                    out.write(res, add=k > 0)
            del s3
            release_free_memory()
        del buf
        out.set_plane(z3_plane)
    scale, offset = out.moments(e.eps[2]).affine()
    out.normalise_(scale, offset, e.slope[2])
    del e
    release_free_memory()
    return out if ragged else out.data


def encoder_peak(out_rows: list, buf_rows: list, groups: int) -> float:
    """The most an image's encoder stores at once (per-row sizes, in N-channel full maps):
    block 3's output ``out_rows`` and block 2's raw output ``buf_rows`` kept in ``groups``
    groups. One group is filled by a pass of block 2, then read in row order by block 3, each
    row given back once read while block 3's output rows appear; several groups each refill
    the buffer, so it is held whole next to the whole output."""
    if groups > 1:
        return sum(out_rows) + sum(buf_rows) / groups
    written, left = 0.0, sum(buf_rows)
    peak = left
    for o, b in zip(out_rows, buf_rows):
        written, left = written + o, left - b
        peak = max(peak, written + left)
    return peak


def choose_split(out_rows: list, buf_rows: list, others: float, limit: float) -> int:
    """Block-2 storage for one image: the fewest groups ``G`` (1, 2 or 4) that keep ``others`` plus
    :func:`encoder_peak` within ``limit`` N-channel full maps; 0 (recompute) if none does."""
    for g in (1, 2, 4):
        if others + encoder_peak(out_rows, buf_rows, g) <= limit + 1e-9:
            return g
    return 0
