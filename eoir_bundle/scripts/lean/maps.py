"""Stored feature maps, dense or ragged, with their background plane.

A :class:`Map` is a channels-last ``(1, C, D0, H, W)`` map that equals its background plane
wherever a cover (dense) or a keep mask (ragged) says it cannot differ from it (see
:mod:`.covers`). A ragged map stores only the kept voxels, row after row, and the plane once:
stored block-2 outputs and the fixed image's features. Rows are written from stream output
(``index_select``), read back as dense rows (``index_copy_`` onto the plane) and, once read
for the last time, their pages are given back to the OS.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .covers import FULL, fill_outside, rect_slices
from .memory import CL, Buffer, as_matrix, cl_empty, release_pages
from .moments import Moments, norm_prelu_
from .streams import Rows, chunks


class Map:
    """A channels-last map ``(1, C, D0, H, W)`` whose row ``r`` equals ``plane`` wherever ``covers(r, r + 1)``
    (dense) or ``keep[r]`` (ragged) says it cannot differ from it.

    Dense (``keep=None``): one tensor; :meth:`set_plane` writes ``plane`` outside each row's cover.
    Ragged: only the voxels of the bool mask ``keep (D0, H, W)`` are stored, row after row in
    one flat buffer (each row an ``(n_r, C)`` matrix in in-plane raster order), the plane once.
    ``write`` takes stream output rows whose cover contains the ``keep`` voxels of those rows.
    """

    def __init__(self, c: int, depth: int, hw: Sequence[int], covers, keep: torch.Tensor | None = None):
        self.c, self.depth, self.hw, self.covers, self.keep = c, depth, tuple(hw), covers, keep
        self.ragged = keep is not None
        self.plane = None
        self._scratch = Buffer()
        if self.ragged:
            counts = keep.flatten(1).sum(1).tolist()
            self.offsets = [0]
            for n in counts:
                self.offsets.append(self.offsets[-1] + n * c)
            self.data = torch.empty(self.offsets[-1])
        else:
            self.data = cl_empty(c, depth, *hw)

    def _kept(self, r: int):
        """Row ``r``'s stored voxels: ``(flat in-plane positions or FULL, (n_r, C) view)``, or ``None``."""
        a, b = self.offsets[r], self.offsets[r + 1]
        if a == b:
            return None
        stored = self.data[a:b].view(-1, self.c)
        return (FULL if stored.shape[0] == self.hw[0] * self.hw[1] else self.keep[r].flatten().nonzero()[:, 0]), stored

    def write(self, rows: Rows, add: bool = False) -> None:
        """Store (``add``: add to what is stored) a stream's output rows."""
        q0, nrows = rows.q0, rows.q1 - rows.q0
        if not self.ragged:
            for z, rect in rows.tiles:
                dst = self.data[:, :, q0 : q0 + nrows][rect_slices(rect)]
                dst.add_(z) if add else dst.copy_(z)
            return
        hw = self.hw[0] * self.hw[1]
        if rows.cover != FULL:  # where each in-plane position of row i is in rows.flat: lut + i * stride
            lut, stride = torch.full(self.hw, -1, dtype=torch.long), torch.zeros(self.hw, dtype=torch.long)
            start = 0
            for h0, h1, w0, w1 in rows.cover:
                n = (h1 - h0) * (w1 - w0)
                lut[h0:h1, w0:w1] = torch.arange(start, start + n).view(h1 - h0, w1 - w0)
                stride[h0:h1, w0:w1] = n
                start += n * nrows
            lut, stride = lut.view(-1), stride.view(-1)
        for i in range(nrows):
            kept = self._kept(q0 + i)
            if kept is None:
                continue
            pos, dst = kept
            if pos is FULL:  # a wholly kept row (its cover is FULL: covers contain the kept voxels)
                src = rows.flat[i * hw : (i + 1) * hw]
                dst.add_(src) if add else dst.copy_(src)
                continue
            idx = pos + i * hw if rows.cover == FULL else lut[pos] + stride[pos] * i
            if add:
                dst.add_(rows.flat.index_select(0, idx))
            else:
                torch.index_select(rows.flat, 0, idx, out=dst)

    def set_plane(self, plane: torch.Tensor) -> None:
        """The raw background plane ``(1, C, 1, H, W)`` (dense maps: written outside each row's cover)."""
        self.plane = plane
        if not self.ragged:
            for r in range(self.depth):
                fill_outside(self.data[:, :, r : r + 1], plane, self.covers(r, r + 1))

    def read(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` as a dense ``(1, C, k, H, W)`` tensor (ragged: a reused buffer, or
        ``out``, a contiguous channels-last tensor of that shape)."""
        if not self.ragged:
            return self.data[:, :, r0:r1] if out is None else out.copy_(self.data[:, :, r0:r1])
        out = self._scratch.cl(self.c, r1 - r0, *self.hw) if out is None else out
        kept = [self._kept(r) for r in range(r0, r1)]
        if any(k is None or k[0] is not FULL for k in kept):
            out.copy_(self.plane.expand_as(out))
        for i, k in enumerate(kept):
            if k is not None:
                dst = as_matrix(out[:, :, i : i + 1])
                dst.copy_(k[1]) if k[0] is FULL else dst.index_copy_(0, k[0], k[1])
        return out

    def moments(self, eps: float) -> Moments:
        """InstanceNorm moments of the whole map (a pass over the stored rows)."""
        mom = Moments(eps)
        if not self.ragged:
            for r0, r1 in chunks(self.depth, 8):
                mom.add(self.data[:, :, r0:r1])
            return mom
        plane = as_matrix(self.plane)
        for r in range(self.depth):
            kept = self._kept(r)
            if kept is not None:
                mom.add_matrix(kept[1])
            mom.add_plane(plane, None if kept is None else kept[0])
        return mom

    def normalise_(self, scale, offset, slope: float) -> None:
        """In place: ``PReLU(InstanceNorm(.))`` of the stored values and of the plane."""
        if self.ragged:
            m = self.data.view(-1, self.c)
            m.mul_(scale).add_(offset)
            F.leaky_relu_(m, slope)
            self.plane = norm_prelu_(self.plane.clone(memory_format=CL), scale, offset, slope)
        else:
            for r0, r1 in chunks(self.depth, 8):
                norm_prelu_(self.data[:, :, r0:r1], scale, offset, slope)
            self.plane = None

    def resident(self) -> int:
        """Bytes of the stored values."""
        return self.data.numel() * 4

    def release_before(self, r: int) -> None:
        """Rows ``< r`` will not be read again: give their memory back (ragged maps)."""
        if self.ragged:
            done = getattr(self, "_released", 0)
            if self.offsets[r] > done:
                release_pages(self.data, done, self.offsets[r])
                self._released = self.offsets[r]
