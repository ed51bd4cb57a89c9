"""Row streaming: 3x3x3 convolutions over volumes whose rows arrive in order.

A stride-1, padding-1 convolution's output row ``r`` depends only on input rows
``r-1 .. r+1``. A :class:`RowStream` keeps the last two input rows, puts a zero row before
row 0 and after the last row (the full convolution's zero padding) and convolves with
padding ``(0, 1, 1)``: every output row is computed once, from the same values as the whole
convolution. Chained streams (conv -> pointwise -> conv ...) evaluate a stack of convolutions
with a few rows of each intermediate alive. A stream given covers (:mod:`.covers`) convolves
only the tiles where its output can differ from the background plane.

Convolutions write into preallocated channels-last tensors (:func:`conv_into`); output rows
come back as :class:`Rows`, in buffers reused by the stream's next call.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .covers import FULL
from .memory import CL, Buffer, as_matrix, cl_empty, release_free_memory


def chunks(depth: int, rows: int):
    """Row chunks ``(r0, r1)`` of ``rows`` rows (the last one shorter) covering ``[0, depth)``."""
    for r in range(0, depth, rows):
        yield r, min(r + rows, depth)


def conv_into(out: torch.Tensor, x: torch.Tensor, weight, bias, padding, relu: bool = False,
               accumulate: bool = False) -> torch.Tensor:
    """``out = [relu](conv3d(x, weight, bias, padding) [+ out])`` written into ``out`` (channels-last;
    ``accumulate``: added to what ``out`` holds).

    oneDNN is called directly (its in-place "add" fusion on a zeroed ``out``): no output
    allocation, and no fallback to PyTorch's slow reference kernel, which ``F.conv3d`` picks
    for batch 1 and ``C * D0 * D1 <= 20480`` (a few rows of the 27-channel map; see NOTES.md).
    """
    if not accumulate:
        out.zero_()
    torch.ops.mkldnn._convolution_pointwise_(
        out, x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1, "add", 1.0, "relu" if relu else None, [], None
    )
    return out


class Rows(NamedTuple):
    """Output rows ``[q0, q1)`` of a :class:`RowStream`, computed on the tiles of ``cover``.

    ``tiles``: ``(z, rect)`` pairs, ``z (1, C, q1 - q0, rect's size)`` (``rect`` FULL: the plane);
    ``flat``: all tiles' voxels as one ``(n, C)`` matrix, tile after tile (each tile row after row).
    They live in buffers reused by the stream's next call.
    """

    tiles: list
    q0: int
    q1: int
    cover: object
    flat: torch.Tensor


class RowStream:
    """A 3x3x3, stride-1, zero-padding-1 convolution over a volume whose rows arrive in order.

    ``slot(n)`` returns the channels-last view where the caller writes the next ``n`` input
    rows; ``conv()`` then returns the new output rows as :class:`Rows`, or ``None`` when no
    new row is computable yet. Its input is a window of the buffer, ``[previous 2 rows | new
    rows | zero row after the volume]``, and a zero row stands before row 0: every output row
    is computed once, from the same values as the full convolution. The window slides down a
    buffer of a few chunks; only when it reaches the end are its 2 rows moved to the front.

    ``covers(q0, q1)``, if given, tells where output rows ``[q0, q1)`` can differ from the
    layer's background plane (a cover: ``FULL`` or disjoint tiles ``(h0, h1, w0, w1)``, see
    :class:`~.covers.Covers`); the convolution then runs on each tile only (its input: the tile grown
    by one voxel, zero outside the volume).
    """

    def __init__(self, weight, bias, depth: int, hw: Sequence[int], rows: int, covers=None, relu: bool = False):
        self.weight = weight.contiguous(memory_format=CL)
        self.bias = bias
        self.depth, self.hw = depth, tuple(hw)
        self.covers, self.relu = covers, relu
        self.max_rows = rows + 2  # the last output chunk of an upstream stream is up to 2 rows longer
        # the window slides down a few chunks' rows before it moves back to the front (every
        # third call at rows=2: 2 rows more than the window's own size, a third of the copies)
        self.buf = cl_empty(weight.shape[1], self.max_rows + 3 + rows, *hw)
        self.buf[:, :, 0].zero_()
        self.row0 = -1  # volume row held by buffer row lo (the zero row before the volume)
        self.lo, self.hi = 0, 1  # the window: buffer rows [lo, hi)
        self.next_row = 0  # next input row the caller writes
        self.out, self.box_in = Buffer(), Buffer()
        self.calls = 0

    def slot(self, n: int) -> torch.Tensor:
        if not 0 < n <= self.max_rows or self.next_row + n > self.depth:
            raise ValueError(f"bad row count {n} at row {self.next_row} of {self.depth}")
        if self.hi + n > self.buf.shape[2] - 1:  # no room for n rows and the end's zero row: window to the front
            keep = self.buf[:, :, self.lo : self.hi]
            self.buf[:, :, : self.hi - self.lo].copy_(keep if self.lo >= self.hi - self.lo else keep.clone())
            self.lo, self.hi = 0, self.hi - self.lo
        if self.hi + n > self.buf.shape[2] - 1:
            raise ValueError(f"bad row count {n} at row {self.next_row} of {self.depth}")
        view = self.buf[:, :, self.hi : self.hi + n]
        self.hi += n
        self.next_row += n
        return view

    def _box_input(self, rect) -> torch.Tensor:
        """The window's rows inside ``rect`` grown by one voxel, zero outside the volume."""
        (h, w), (h0, h1, w0, w1) = self.hw, rect
        a0, a1, b0, b1 = max(h0 - 1, 0), min(h1 + 1, h), max(w0 - 1, 0), min(w1 + 1, w)
        x = self.box_in.cl(self.buf.shape[1], self.hi - self.lo, h1 - h0 + 2, w1 - w0 + 2)
        if (a0, a1, b0, b1) != (h0 - 1, h1 + 1, w0 - 1, w1 + 1):
            x.zero_()  # the tile touches a face: the zero padding
        inside = self.buf[:, :, self.lo : self.hi, a0:a1, b0:b1]
        x[..., a0 - h0 + 1 : a1 - h0 + 1, b0 - w0 + 1 : b1 - w0 + 1].copy_(inside)
        return x

    def _at_end(self) -> bool:
        """The window holds the volume's last row: :meth:`conv` adds the zero padding row after it."""
        return self.next_row == self.depth and self.row0 + self.hi - self.lo == self.depth

    def pending(self) -> int:
        """How many output rows the next :meth:`conv` gives (0: none yet)."""
        return max(self.hi - self.lo + self._at_end() - 2, 0)

    def conv(self, onto: torch.Tensor | None = None, into: torch.Tensor | None = None):
        """``onto``: a full-plane ``(1, C_out, rows, H, W)`` channels-last tensor the output is added
        to (in place, before the ReLU); ``into``: one it is written to (e.g. the next stream's
        :meth:`slot`). Either is then the output's one tile; it must have :meth:`pending` rows.
        ``onto`` is for ``FULL`` covers only; with a tiled cover ``into`` is not used (the tiles are
        written to the stream's buffer)."""
        if self._at_end():
            self.buf[:, :, self.hi].zero_()
            self.hi += 1
        if self.hi - self.lo < 3:
            return None
        q0, q1 = self.row0 + 1, self.row0 + self.hi - self.lo - 1
        cover = FULL if self.covers is None else self.covers(q0, q1)
        cout = self.weight.shape[0]
        if onto is not None and cover != FULL:
            raise ValueError("onto needs a FULL cover")
        if cover == FULL:
            z = onto if onto is not None else into if into is not None else self.out.cl(cout, q1 - q0, *self.hw)
            if z.shape[2] != q1 - q0:
                raise ValueError(f"onto/into has {z.shape[2]} rows, the output {q1 - q0}")
            window = self.buf[:, :, self.lo : self.hi]
            conv_into(z, window, self.weight, self.bias, (0, 1, 1), self.relu, onto is not None)
            tiles, flat = [(z, FULL)], as_matrix(z)
        else:
            zs, flat = self.out.cls([(cout, q1 - q0, t[1] - t[0], t[3] - t[2]) for t in cover])
            for z, rect in zip(zs, cover):
                conv_into(z, self._box_input(rect), self.weight, self.bias, (0, 0, 0), self.relu)
            tiles, flat = list(zip(zs, cover)), flat.view(-1, cout)
        self.calls += 1
        if self.calls % 16 == 0:  # oneDNN's per-call allocations: do not let the heap keep them
            release_free_memory()
        # only the last two rows are needed by the next output row: the window starts there
        self.row0 += self.hi - 2 - self.lo
        self.lo = self.hi - 2
        return Rows(tiles, q0, q1, cover, flat)
