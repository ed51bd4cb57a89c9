"""Memory-lean, fast CPU inference for :class:`scripts.network.EOIR`.

``lean_forward(net, x)`` returns what ``net.eval()(x)`` returns (the full-resolution ``ddf``,
same conventions, same parameters; the only weight copies are kB-sized re-layouts) without
ever holding a full-resolution map wider than the ``N``-channel encoder features. At
160 x 224 x 192 with ``start_channel=32`` the straightforward ``EOIR.forward`` peaks at
9-13 GB; this path needs 1.6-2 GB on top of the interpreter (the moving features alone are
0.88 GB), and on skull-stripped brains skips about half of the encoder's work.

Conventions
    Volumes are ``(1, C, D0, D1, D2)``; "rows" are slices along axis 0 (``D0``). Feature maps
    are kept in ``torch.channels_last_3d`` (channels innermost, NDHWC in memory): oneDNN's
    3D convolutions are fastest in that layout, a run of rows is one contiguous block, and
    ``grid_sample`` reads all channels of a voxel from one cache line. Displacements stay
    ``(1, 3, D0, D1, D2)`` contiguous, in voxel units, exactly as in ``EOIR``.

Why each trick is exact (the same arithmetic as ``EOIR.forward`` up to float rounding
order, ~1e-7 relative; the fields then agree to ~1e-5 voxel, as closely as the reference
agrees with itself run in another memory format, see the benchmark):

* **Row streaming of 3x3x3 convolutions** (:class:`_RowStream`). A stride-1, padding-1
  convolution's output row ``r`` depends only on input rows ``r-1..r+1``. Input rows arrive
  in order; the stream keeps the last two, puts a zero row before row 0 and after the last
  row (the full convolution's zero padding) and convolves with padding ``(0, 1, 1)``. Every
  output row is computed once, from the same values. Chained streams (conv -> pointwise ->
  conv ...) evaluate a conv stack with a few rows of each intermediate alive.
* **InstanceNorm from moments** (:class:`_Moments`). ``InstanceNorm3d`` (no affine, biased
  variance, eps 1e-5) needs each channel's mean and variance over the whole volume, so a
  block is normalised only after a full pass over its raw output. Moments are summed per
  row chunk around a per-channel shift (the first chunk's mean: no cancellation) in float64,
  as accurate as PyTorch's double-accumulated statistics. ``PReLU`` with one shared slope is
  ``leaky_relu`` with that slope.
* **Encoder without the 2N-channel map** (:func:`encode`). Block 2's output (2N channels)
  must be normalised before block 3 can use it, and storing it costs 2N x volume. Exact
  ways round it: ``split=G`` makes block 2's output channels in ``G`` groups, each stored,
  normalised with its own moments (InstanceNorm is per channel) and pushed through the
  matching input channels of block 3, whose partial outputs are summed (a convolution is
  linear in its input channels); ``split=0`` runs blocks 1-2 twice (first for block 2's
  moments, then again feeding block 3). :func:`lean_forward` picks, per image, the fastest
  that fits its memory rule (:func:`_encoder_peak`: with one group, block 3 gives each stored
  row back once read). Block 1 (one input channel) is an im2col matrix product.
* **Background skipping** (:func:`_keep_mask`, :func:`_cover`). With an exactly-zero background
  (skull-stripped LUMIR images), the encoder's response at a voxel farther than its reach (3
  voxels) from every nonzero voxel, and away from the axis-0 faces, does not depend on the
  row: it is a per-layer *background plane*, computed once by convolving three copies of
  the previous layer's plane (the zero padding makes its border differ). Each chunk of rows
  is convolved only on *tiles* covering the voxels within reach of a nonzero one (the plane
  cut into bands of 32 voxels along axis 1, each band's bounding box snapped to 8): on brain
  MRI about 0.5 of the volume, against 0.7 for one bounding box per row. The rest is the
  plane, counted in the moments from the plane's sums. Stored maps (block 2's raw output,
  the fixed features) keep only the voxels within reach (2 or 3) of a nonzero one
  (:class:`_Map`, ragged: gathered with ``index_select``) plus the plane: about 0.35-0.4 of
  the volume. Images without an exactly-zero background simply have every chunk ``FULL``.
* **Slab-wise warping**. ``warp(img, ddf)(p)`` only reads ``ddf(p)``, so rows of the result
  need only those rows of the field (``img`` is whole). The sampling grid is computed with
  the same float operations as MONAI's ``Warp``, so ``grid_sample`` gets bit-identical
  coordinates. Each call is split in two along axis 1 and run as a batch of two (``img``
  expanded, not copied): PyTorch's 3D CPU sampler parallelises over the batch only.
* **Resized maps by rows** (:func:`_resize_rows`). Trilinear resizing with
  ``align_corners=True`` is separable: rows of the result are the axis-0 interpolation
  (PyTorch's own source indices and weights) of the axis-1/2 interpolated source rows. The
  level-0 estimator gets the upsampled coarser field row by row, never whole.
* **Level 0 last, 3-channel fields last**. The finest estimator streams rows of ``y`` and
  ``warp(x, up)`` through its three convolutions (ReLU fused into oneDNN); integration
  (scaling and squaring, whose warps read anywhere) and the composition run on 3-channel
  fields after the features are freed.
* **Each estimator's first convolution as two halves** (:func:`_estimate`). Its weight
  ``[Wa, Wb]`` acts on ``[y + x, y - x]``, that is ``(Wa + Wb)`` on ``y`` and ``(Wa - Wb)`` on
  ``x``: two ``N``-channel convolutions (faster than one ``2N``-channel one), the fixed one
  convolved at level 0 only on the tiles of its kept voxels (elsewhere its output is the
  plane's response), the moving one added onto it by oneDNN's "add" fusion before the ReLU.
  The same sums in another order: the rounding of ``y + x`` and ``y - x`` is not made. The
  27- and 3-channel convolutions run zero-padded to 32 and 8 channels (:func:`_padded`:
  the same values, oneDNN's faster shapes).
* **No allocator churn**. Chunk temporaries of varying size fragment glibc's heap (0.4 GB
  kept at full size): per-chunk temporaries live in reused buffers, convolutions write into
  them (oneDNN's in-place "add" fusion on a zeroed buffer; also avoids ``F.conv3d``'s
  8x slower fallback kernel for a few rows of 27 channels), tile corners are snapped to
  multiples of 8 (few oneDNN primitives), and ``malloc_trim`` runs between passes.

Threads: the path runs many more (smaller) parallel regions than ``EOIR.forward``. On a
machine shared with other jobs, libgomp's default spin-waiting then costs a time slice per
region (measured 2-20x slower, the straightforward path suffers too); set
``OMP_WAIT_POLICY=PASSIVE`` in the environment there (``--omp_wait_policy passive`` in the
benchmark). On an idle machine libgomp's default (brief spinning) is faster: at N=32 the lean
path took 53.9-57.5 s per pair there, against 56-64 s with ``PASSIVE`` (0.5.1, session 6).

Measured and not kept: NCDHW convolutions (10-25 % slower than channels-last here); mmap
for every temporary (no heap growth, but page faults: +60 % time); 4-row chunks (no faster,
more memory). Tiles (and 8-voxel snapping) were first measured no faster than one box per
row, when copies and per-row index work cost more than the convolutions they saved; once
those shrank they gave the encoders about 3 s per pair at N=32 (20.4 -> 17.4 s, one profiled
run). Not tried: ``torch.compile`` (the time is in oneDNN convolutions already, and the
streamed loops have data-dependent shapes); bf16/fp16 (not exact; no AVX2 speed-up);
Winograd (in PyTorch ops its transforms cost about what it saves).
Weighed and not done: background skipping in the level-0 flow estimator (a quarter of the
time at N=16, 40 % at N=32). Its input is a constant only where the fixed features are
background and the moving features sampled through the upsampled field are too; on the
sample pair (shipped weights) what its three convolutions must compute is 57 % of the volume,
but as per-row boxes plus the in-plane border frame (zero padding and the warped border make
that frame non-constant) it is 71 %: about 3 s of 25 s at N=16 and 7 s of 56 s at N=32, for
the most intricate streaming code here (a one-off measurement, not a shipped benchmark). On
the benchmark's input at N=32 (fields up to 8 voxels; "constant" within 1e-5, as trilinear
sampling of a constant is not bitwise constant) it is 62 % of the volume, and 74-84 % as
tiles plus a border ring: 3-4 s of the estimator's 21 s, before the costs of finding it.
What is done instead is exact by linearity alone: the fixed half of the first convolution
skips the fixed background (1.1-1.4 s per pair at N=32 with row boxes, measured alternating
with the commit before it; the moving half, the warped moving features, is computed
everywhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn

from .network import EOIR, INTEGRATION_STEPS, NUM_LEVELS

__all__ = ["lean_forward", "LeanEOIR", "encode"]

CL = torch.channels_last_3d
_DIVISOR = 2 ** (NUM_LEVELS - 1)
FULL = "full"  # a cover: the whole plane (rows near the axis-0 faces, or no zero background)
EMPTY = ()  # a cover: no tile, nothing but background
_BAND = 32  # tiles: the plane is cut into bands of this many voxels along axis 1 ...
_SNAP = 8  # ... and tile corners are multiples of this
_FULL_FRACTION = 0.85  # a cover whose tiles are more of the plane than this is FULL
assert _BAND % _SNAP == 0  # snapped tiles stay inside their band: tiles never overlap
# the encoders' storage budget, in 32-channel full maps (1.54 GB at 160 x 224 x 192): at N=32 LUMIR-
# like brains store block 2 whole for both images (the moving one peaks near 1.4 maps) and the
# whole path peaks at about 2.15-2.25 GB; smaller networks get the same bytes (more maps)
STORE_LIMIT_32 = 1.75


# =========================================================================================
# Building blocks
# =========================================================================================


class _Buffer:
    """A reusable flat float32 buffer handing out tensors of any shape up to its size."""

    def __init__(self):
        self.flat = torch.empty(0)

    def _take(self, n: int) -> torch.Tensor:
        if self.flat.numel() < n:
            self.flat = None
            self.flat = torch.empty(n)
        return self.flat[:n]

    def cl(self, c: int, d: int, h: int, w: int) -> torch.Tensor:
        """A contiguous channels-last ``(1, c, d, h, w)`` tensor (uninitialised)."""
        return self._take(c * d * h * w).view(1, d, h, w, c).permute(0, 4, 1, 2, 3)

    def cls(self, shapes: Sequence[tuple]) -> tuple[list, torch.Tensor]:
        """Contiguous channels-last tensors of ``shapes`` ``(c, d, h, w)``, one after the other in the
        buffer, and the flat buffer they fill."""
        sizes = [c * d * h * w for c, d, h, w in shapes]
        flat = self._take(sum(sizes))
        views, o = [], 0
        for (c, d, h, w), n in zip(shapes, sizes):
            views.append(flat[o : o + n].view(1, d, h, w, c).permute(0, 4, 1, 2, 3))
            o += n
        return views, flat

    def plain(self, *shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return self._take(n).view(shape)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Chunk temporaries and oneDNN's per-shape primitives are freed, but glibc keeps freed
    heap pages resident; between passes this returns them (a few ms).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _load_madvise():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE, _MADV_DONTNEED, _PAGE = _load_madvise(), 4, 4096


def _release_pages(t: torch.Tensor, start: int, end: int) -> None:
    """Drop the resident pages of elements ``[start, end)`` of a flat tensor that will never be
    read again (Linux ``madvise(MADV_DONTNEED)`` on the whole pages inside the range; a no-op
    elsewhere). The memory stays allocated; reading it would give zeros."""
    if _MADVISE is None or end <= start:
        return
    base = t.data_ptr()
    a = -(-(base + start * t.element_size()) // _PAGE) * _PAGE
    b = (base + end * t.element_size()) // _PAGE * _PAGE
    if b > a:
        _MADVISE(a, b - a, _MADV_DONTNEED)


def _cl_empty(c: int, d: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((1, c, d, h, w), memory_format=CL)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A contiguous channels-last ``(1, C, d, H, W)`` tensor as its ``(d*H*W, C)`` matrix (a view)."""
    if not t.is_contiguous(memory_format=CL):
        raise ValueError("expected a contiguous channels-last tensor")
    return t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1, 1)


def _conv_into(out: torch.Tensor, x: torch.Tensor, weight, bias, padding, relu: bool = False,
               accumulate: bool = False) -> torch.Tensor:
    """``out = [relu](conv3d(x, weight, bias, padding) [+ out])`` written into ``out`` (channels-last;
    ``accumulate``: added to what ``out`` holds).

    oneDNN is called directly (its in-place "add" fusion on a zeroed ``out``): no output
    allocation, and no fallback to PyTorch's slow reference kernel, which ``F.conv3d`` picks
    for batch 1 and ``C * D0 * D1 <= 20480`` (a few rows of the 27-channel map: 8x slower).
    """
    if not accumulate:
        out.zero_()
    torch.ops.mkldnn._convolution_pointwise_(
        out, x, weight, bias, list(padding), [1, 1, 1], [1, 1, 1], 1, "add", 1.0, "relu" if relu else None, [], None
    )
    return out


def _rects(cover) -> tuple:
    """The rectangles of a cover: ``(FULL,)`` or its tiles."""
    return (FULL,) if cover == FULL else cover


def _rect_slices(rect) -> tuple:
    return (Ellipsis,) if rect == FULL else (Ellipsis, slice(rect[0], rect[1]), slice(rect[2], rect[3]))


def _complement(cover, h: int, w: int) -> list:
    """Rectangles tiling the ``h x w`` plane outside a cover's disjoint tiles."""
    if cover == FULL:
        return []
    cuts = sorted({0, h, *(t[0] for t in cover), *(t[1] for t in cover)})
    out = []
    for a, b in zip(cuts, cuts[1:]):
        c = 0
        for w0, w1 in sorted((t[2], t[3]) for t in cover if t[0] <= a and b <= t[1]):
            if w0 > c:
                out.append((a, b, c, w0))
            c = w1
        if c < w:
            out.append((a, b, c, w))
    return out


def _fill_background(view: torch.Tensor, plane: torch.Tensor, cover) -> None:
    """Write ``plane (1, C, 1, H, W)`` into every row of ``view`` unless ``cover`` is ``FULL``
    (callers then write the tiles: one copy is fewer, larger operations than the strips between)."""
    if cover != FULL:
        view.copy_(plane.expand_as(view))


def _fill_outside(view: torch.Tensor, plane: torch.Tensor, cover) -> None:
    """Write ``plane (1, C, 1, H, W)`` into the rows ``view`` outside ``cover``'s tiles."""
    for rect in _complement(cover, *view.shape[3:]):
        part = view[_rect_slices(rect)]
        part.copy_(plane[_rect_slices(rect)].expand_as(part))


class _Rows(NamedTuple):
    """Output rows ``[q0, q1)`` of a :class:`_RowStream`, computed on the tiles of ``cover``.

    ``tiles``: ``(z, rect)`` pairs, ``z (1, C, q1 - q0, rect's size)`` (``rect`` FULL: the plane);
    ``flat``: all tiles' voxels as one ``(n, C)`` matrix, tile after tile (each tile row after row).
    They live in buffers reused by the stream's next call.
    """

    tiles: list
    q0: int
    q1: int
    cover: object
    flat: torch.Tensor


class _RowStream:
    """A 3x3x3, stride-1, zero-padding-1 convolution over a volume whose rows arrive in order.

    ``slot(n)`` returns the channels-last view where the caller writes the next ``n`` input
    rows; ``conv()`` then returns the new output rows as :class:`_Rows`, or ``None`` when no
    new row is computable yet. Its input is a window of the buffer, ``[previous 2 rows | new
    rows | zero row after the volume]``, and a zero row stands before row 0: every output row
    is computed once, from the same values as the full convolution. The window slides down a
    buffer of a few chunks; only when it reaches the end are its 2 rows moved to the front.

    ``covers(q0, q1)``, if given, tells where output rows ``[q0, q1)`` can differ from the
    layer's background plane (a cover: ``FULL`` or disjoint tiles ``(h0, h1, w0, w1)``, see
    :class:`_Covers`); the convolution then runs on each tile only (its input: the tile grown
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
        self.buf = _cl_empty(weight.shape[1], self.max_rows + 3 + rows, *hw)
        self.buf[:, :, 0].zero_()
        self.row0 = -1  # volume row held by buffer row lo (the zero row before the volume)
        self.lo, self.hi = 0, 1  # the window: buffer rows [lo, hi)
        self.next_row = 0  # next input row the caller writes
        self.out, self.box_in = _Buffer(), _Buffer()
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
            _conv_into(z, window, self.weight, self.bias, (0, 1, 1), self.relu, onto is not None)
            tiles, flat = [(z, FULL)], _as_matrix(z)
        else:
            zs, flat = self.out.cls([(cout, q1 - q0, t[1] - t[0], t[3] - t[2]) for t in cover])
            for z, rect in zip(zs, cover):
                _conv_into(z, self._box_input(rect), self.weight, self.bias, (0, 0, 0), self.relu)
            tiles, flat = list(zip(zs, cover)), flat.view(-1, cout)
        self.calls += 1
        if self.calls % 16 == 0:  # oneDNN's per-call allocations: do not let the heap keep them
            _release_free_memory()
        # only the last two rows are needed by the next output row: the window starts there
        self.row0 += self.hi - 2 - self.lo
        self.lo = self.hi - 2
        return _Rows(tiles, q0, q1, cover, flat)


class _Moments:
    """Per-channel mean and InstanceNorm scale of a channels-last map seen in row chunks.

    Sums of ``z - shift`` and ``(z - shift)**2`` in float64 (per-chunk float32 sums use
    PyTorch's cascade summation); ``shift`` is the first chunk's channel mean, so the
    variance ``E[(z-shift)^2] - E[z-shift]^2`` has no cancellation. Background parts of rows
    (a known plane outside a cover's tiles) are counted from the plane's sums.
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps
        self.shift = self.s1 = self.s2 = None
        self.count = 0
        self.tmp = _Buffer()
        self._plane = None
        self._inside = {}  # rect -> the plane's sums inside it

    def _start(self, shift: torch.Tensor) -> None:
        self.shift = shift
        self.s1 = torch.zeros(shift.shape[0], dtype=torch.float64)
        self.s2 = torch.zeros(shift.shape[0], dtype=torch.float64)

    def _sums(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.sub(m, self.shift, out=self.tmp.plain(*m.shape))
        s1 = t.sum(0).double()
        return s1, t.square_().sum(0).double()

    def add(self, z: torch.Tensor) -> None:
        self.add_matrix(_as_matrix(z))

    def add_matrix(self, m: torch.Tensor) -> None:
        """Add the voxels of an ``(n, C)`` matrix."""
        if self.shift is None:
            self._start(m.mean(0))
        s1, s2 = self._sums(m)
        self.s1 += s1
        self.s2 += s2
        self.count += m.shape[0]

    def add_plane(self, plane: torch.Tensor, kept) -> None:
        """Add one row equal to the plane (an ``(H*W, C)`` matrix) but for the voxels ``kept``
        (flat in-plane positions; ``FULL``: none left; ``None``: the whole plane)."""
        if kept is FULL:
            return
        if self.shift is None:
            self._start(plane.mean(0))
        if self._plane is None:
            self._plane = self._sums(plane)
        p1, p2 = self._plane
        n = plane.shape[0]
        if kept is not None:
            k1, k2 = self._sums(plane.index_select(0, kept))
            p1, p2, n = p1 - k1, p2 - k2, n - kept.numel()
        self.s1 += p1
        self.s2 += p2
        self.count += n

    def add_outside(self, plane: torch.Tensor, cover, nrows: int) -> None:
        """Add ``nrows`` rows equal to ``plane (1, C, 1, H, W)`` outside ``cover``'s tiles."""
        if cover == FULL:
            return
        if self.shift is None:
            self._start(_as_matrix(plane).mean(0))
        if self._plane is None:
            self._plane = self._sums(_as_matrix(plane))
        p1, p2 = self._plane
        n = plane.shape[3] * plane.shape[4]
        for rect in cover:
            if rect not in self._inside:
                inner = plane[_rect_slices(rect)].contiguous(memory_format=CL)
                self._inside[rect] = self._sums(_as_matrix(inner)) + (inner.shape[3] * inner.shape[4],)
            b1, b2, nb = self._inside[rect]
            p1, p2, n = p1 - b1, p2 - b2, n - nb
        self.s1 += nrows * p1
        self.s2 += nrows * p2
        self.count += nrows * n

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` (float32) with ``InstanceNorm(z) = z * scale + offset``."""
        mu = self.s1 / self.count
        var = (self.s2 / self.count - mu * mu).clamp_min(0.0)
        invstd = 1.0 / torch.sqrt(var + self.eps)
        return invstd.float(), (-(self.shift.double() + mu) * invstd).float()


def _norm_prelu_(t: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, slope: float) -> torch.Tensor:
    """In place: ``PReLU(InstanceNorm(t))`` given the norm as ``scale``/``offset`` (per channel)."""
    t.mul_(_per_channel(scale)).add_(_per_channel(offset))
    return F.leaky_relu_(t, slope)


def _norm_prelu_into(dst: torch.Tensor, src: torch.Tensor, scale, offset, slope: float) -> None:
    """``dst = PReLU(InstanceNorm(src))`` (same shape; ``dst`` may be a strided view)."""
    torch.addcmul(_per_channel(offset), src, _per_channel(scale), out=dst)
    F.leaky_relu_(dst, slope)


def _chunks(depth: int, rows: int):
    for r in range(0, depth, rows):
        yield r, min(r + rows, depth)


# =========================================================================================
# Encoder
# =========================================================================================


def _dilate(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """A bool ``(D0, D1, D2)`` mask dilated by a ``(2 reach + 1)``-cube (separable: shifted ORs per axis)."""
    m = mask
    for axis, n in enumerate(m.shape):
        src, m = m, m.clone()
        for s in range(1, min(reach, n - 1) + 1):
            m.narrow(axis, s, n - s).logical_or_(src.narrow(axis, 0, n - s))
            m.narrow(axis, 0, n - s).logical_or_(src.narrow(axis, s, n - s))
    return m


def _keep_mask(img: torch.Tensor, reach: int, face: int = 3) -> torch.Tensor:
    """Where encoder block ``reach`` (1, 2 or 3) can differ from its background plane: a bool
    ``(D0, D1, D2)`` mask.

    With a zero background, block ``L`` gives, at a voxel farther than ``L`` (along every axis)
    from every nonzero voxel of ``img`` and at least 3 rows from the axis-0 faces, the value it
    gives on an all-zero image there: a per-layer background plane (constant but for its
    ``L - 1`` outer voxels in-plane, where the zero padding differs from the background). So
    the mask is the nonzero voxels dilated by a ``(2 reach + 1)``-cube, plus every voxel of the
    ``face`` rows at each axis-0 face.
    """
    m = _dilate(img != 0, reach)
    m[:face] = True
    m[m.shape[0] - face :] = True
    return m


def _cover(mask: torch.Tensor):
    """Disjoint tiles covering the ``True`` voxels of a bool ``(H, W)`` mask: a tuple of
    ``(h0, h1, w0, w1)`` (``EMPTY``: none), or ``FULL`` when they would be most of the plane.

    The plane is cut into bands of ``_BAND`` voxels along axis 1; each band's ``True`` voxels get
    their bounding box, snapped outwards to multiples of ``_SNAP`` (few distinct shapes reach
    oneDNN), and touching tiles with the same columns are merged. On a brain's cross-section
    (an ellipse) this is about 0.5 of the plane where one bounding box is about 0.7.
    """
    h, w = mask.shape
    nb = -(-h // _BAND)
    if nb * _BAND != h:
        mask = torch.cat([mask, mask.new_zeros(nb * _BAND - h, w)])
    bands = mask.view(nb, _BAND, w)
    rows, cols = bands.any(2), bands.any(1)  # (nb, _BAND), (nb, w)
    found = rows.any(1).tolist()
    r0, c0 = rows.byte().argmax(1).tolist(), cols.byte().argmax(1).tolist()
    r1, c1 = rows.flip(1).byte().argmax(1).tolist(), cols.flip(1).byte().argmax(1).tolist()
    tiles, area = [], 0
    for b in range(nb):
        if not found[b]:
            continue
        lo, hi = b * _BAND + r0[b], b * _BAND + _BAND - r1[b]  # rows [lo, hi) of the band
        rect = [lo // _SNAP * _SNAP, min(-(-hi // _SNAP) * _SNAP, h),
                c0[b] // _SNAP * _SNAP, min(-(-(w - c1[b]) // _SNAP) * _SNAP, w)]
        area += (rect[1] - rect[0]) * (rect[3] - rect[2])
        if tiles and tiles[-1][1] == rect[0] and tiles[-1][2:] == rect[2:]:
            tiles[-1][1] = rect[1]
        else:
            tiles.append(rect)
    if area > _FULL_FRACTION * h * w:
        return FULL
    return tuple(tuple(t) for t in tiles)


class _Covers:
    """``covers(q0, q1)``: the cover (see :func:`_cover`) of rows ``[q0, q1)`` of a keep mask, that
    is where a layer's output rows can differ from its background plane (``keep=None``: ``FULL``
    everywhere). Covers only grow with the rows: the cover of fewer rows lies in that of more."""

    def __init__(self, keep: torch.Tensor | None):
        self.keep, self._cache = keep, {}

    def __call__(self, q0: int, q1: int):
        if self.keep is None:
            return FULL
        if (q0, q1) not in self._cache:
            self._cache[q0, q1] = _cover(self.keep[q0:q1].any(0))
        return self._cache[q0, q1]


class _Map:
    """A channels-last map ``(1, C, D0, H, W)`` whose row ``r`` equals ``plane`` wherever ``covers(r, r + 1)``
    (dense) or ``keep[r]`` (ragged) says it cannot differ from it.

    Dense (``keep=None``): one tensor; :meth:`set_plane` writes ``plane`` outside each row's cover.
    Ragged: only the voxels of the bool mask ``keep (D0, H, W)`` are stored, row after row in
    one flat buffer (each row an ``(n_r, C)`` matrix in in-plane raster order), the plane once;
    on brain MRI that is about a third of the dense map. ``write`` takes stream output rows
    whose cover contains the ``keep`` voxels of those rows.
    """

    def __init__(self, c: int, depth: int, hw: Sequence[int], covers, keep: torch.Tensor | None = None):
        self.c, self.depth, self.hw, self.covers, self.keep = c, depth, tuple(hw), covers, keep
        self.ragged = keep is not None
        self.plane = None
        self._scratch = _Buffer()
        if self.ragged:
            counts = keep.flatten(1).sum(1).tolist()
            self.offsets = [0]
            for n in counts:
                self.offsets.append(self.offsets[-1] + n * c)
            self.data = torch.empty(self.offsets[-1])
        else:
            self.data = _cl_empty(c, depth, *hw)

    def _kept(self, r: int):
        """Row ``r``'s stored voxels: ``(flat in-plane positions or FULL, (n_r, C) view)``, or ``None``."""
        a, b = self.offsets[r], self.offsets[r + 1]
        if a == b:
            return None
        stored = self.data[a:b].view(-1, self.c)
        return (FULL if stored.shape[0] == self.hw[0] * self.hw[1] else self.keep[r].flatten().nonzero()[:, 0]), stored

    def write(self, rows: _Rows, add: bool = False) -> None:
        """Store (``add``: add to what is stored) a stream's output rows."""
        q0, nrows = rows.q0, rows.q1 - rows.q0
        if not self.ragged:
            for z, rect in rows.tiles:
                dst = self.data[:, :, q0 : q0 + nrows][_rect_slices(rect)]
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
                _fill_outside(self.data[:, :, r : r + 1], plane, self.covers(r, r + 1))

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
                dst = _as_matrix(out[:, :, i : i + 1])
                dst.copy_(k[1]) if k[0] is FULL else dst.index_copy_(0, k[0], k[1])
        return out

    def moments(self, eps: float) -> _Moments:
        """InstanceNorm moments of the whole map (a pass over the stored rows)."""
        mom = _Moments(eps)
        if not self.ragged:
            for r0, r1 in _chunks(self.depth, 8):
                mom.add(self.data[:, :, r0:r1])
            return mom
        plane = _as_matrix(self.plane)
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
            self.plane = _norm_prelu_(self.plane.clone(memory_format=CL), scale, offset, slope)
        else:
            for r0, r1 in _chunks(self.depth, 8):
                _norm_prelu_(self.data[:, :, r0:r1], scale, offset, slope)
            self.plane = None

    def resident(self) -> int:
        return self.data.numel() * 4

    def release_before(self, r: int) -> None:
        """Rows ``< r`` will not be read again: give their memory back (ragged maps)."""
        if self.ragged:
            done = getattr(self, "_released", 0)
            if self.offsets[r] > done:
                _release_pages(self.data, done, self.offsets[r])
                self._released = self.offsets[r]


class _Encoder:
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
            self.keep2, self.keep3 = _keep_mask(img, 2), _keep_mask(img, 3)
            self.covers2, self.covers3 = _Covers(self.keep2), _Covers(self.keep3)
        else:
            self.keep2 = self.keep3 = torch.ones(img.shape, dtype=torch.bool)
            self.covers2 = self.covers3 = _Covers(None)
        self.z1_plane = _per_channel(self.b[0]).expand(1, self.n, 1, *self.hw).contiguous(memory_format=CL)
        self.cols, self.z1 = _Buffer(), _Buffer()

    def plane_after(self, layer: int, plane_in: torch.Tensor, channels=slice(None), bias=True) -> torch.Tensor:
        """Raw output row of block ``layer`` (input ``channels``) on three rows of ``plane_in``."""
        w = self.w[layer][:, channels].contiguous(memory_format=CL)
        out = _cl_empty(w.shape[0], 1, *self.hw)
        return _conv_into(out, plane_in.expand(-1, -1, 3, -1, -1).contiguous(memory_format=CL), w,
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
        torch.addmm(self.b[0], cols.view(27, -1).t(), self.w1_mat, out=_as_matrix(out))
        return out

    def block1_norm(self) -> None:
        """Block 1's moments (one pass), and the background planes that follow from them."""
        mom = _Moments(self.eps[0])
        for r0, r1 in _chunks(self.depth, max(self.rows, 4)):
            cover = self.covers2(r0, r1)
            for rect in _rects(cover):
                mom.add(self.conv1(r0, r1, rect))
            mom.add_outside(self.z1_plane, cover, r1 - r0)
        self.norm1 = mom.affine()
        self.a1_plane = _norm_prelu_(self.z1_plane.clone(memory_format=CL), *self.norm1, self.slope[0])
        self.z2_plane = self.plane_after(1, self.a1_plane)
        _release_free_memory()

    def block2(self, channels: slice):
        """Yield :class:`_Rows` of block 2's raw output ``channels``, row by row."""
        s2 = _RowStream(self.w[1][channels], self.b[1][channels], self.depth, self.hw, self.rows, self.covers2)
        for r0, r1 in _chunks(self.depth, self.rows):
            slot, cover = s2.slot(r1 - r0), self.covers2(r0, r1)
            _fill_background(slot, self.a1_plane, cover)
            for rect in _rects(cover):
                _norm_prelu_into(slot[_rect_slices(rect)], self.conv1(r0, r1, rect), *self.norm1, self.slope[0])
            res = s2.conv()
            if res is not None:
                yield res

    def block2_norm(self, channels: slice, plane: torch.Tensor, store: _Map | None = None):
        """A pass of block 2 (output ``channels``, background ``plane``): the InstanceNorm
        ``(scale, offset)`` of those channels; ``store``: also keep the raw rows there."""
        mom = _Moments(self.eps[1])
        for z2 in self.block2(channels):
            if store is not None:
                store.write(z2)
            if z2.tiles:
                mom.add_matrix(z2.flat)
            mom.add_outside(plane, z2.cover, z2.q1 - z2.q0)
        _release_free_memory()
        return mom.affine()

    def feed3(self, s3: _RowStream, tiles, nrows: int, cover, norm2, a2_plane):
        """Push ``nrows`` rows of block 2 (raw, ``(z, rect)`` tiles of ``cover``) into block 3's stream, activated."""
        slot = s3.slot(nrows)
        _fill_background(slot, a2_plane, cover)
        for z2, rect in tiles:
            _norm_prelu_into(slot[_rect_slices(rect)], z2, *norm2, self.slope[1])
        return s3.conv()

    def row_sizes(self, channels: int, keep: torch.Tensor | None = None) -> list:
        """Per row, the size of a map of ``channels`` stored dense (``keep=None``) or ragged
        (the voxels of ``keep``), in ``N``-channel full maps (a dense ``N``-channel map sums to 1)."""
        unit = self.n * self.depth * self.hw[0] * self.hw[1]
        if keep is None:
            return [channels * self.hw[0] * self.hw[1] / unit] * self.depth
        return [channels * n / unit for n in keep.flatten(1).sum(1).tolist()]


def encode(net: EOIR, img: torch.Tensor, *, split: int = 0, rows: int = 2, skip_background: bool = True,
           ragged: bool = False, _encoder: _Encoder | None = None):
    """Encoder features of one image ``(D0, D1, D2)``: a channels-last ``(1, N, D0, D1, D2)``
    tensor, or (``ragged=True``) a :class:`_Map` storing the non-background voxels only.

    ``split=0`` recomputes blocks 1-2 for block 3 (peak: the output plus a few rows);
    ``split=G`` (a divisor of 2N) stores block 2's raw output in ``G`` groups of 2N/G
    channels, one group at a time (ragged), no recomputation. ``skip_background``: compute
    rows only where they can differ from the zero background's response (exact, see
    :func:`_keep_mask`; nothing is skipped in images without exactly-zero background).
    """
    e = _Encoder(net, img, rows, skip_background) if _encoder is None else _encoder
    depth, hw, n2 = e.depth, e.hw, e.w[1].shape[0]
    if split and n2 % split:
        raise ValueError(f"split must divide {n2}, got {split}")
    e.block1_norm()
    # block 3's raw output, normalised in place at the end
    out = _Map(e.n, depth, hw, e.covers3, e.keep3 if ragged else None)
    if not split:  # a pass for block 2's moments, a second one feeding block 3
        norm2 = e.block2_norm(slice(None), e.z2_plane)
        a2_plane = _norm_prelu_(e.z2_plane.clone(memory_format=CL), *norm2, e.slope[1])
        s3 = _RowStream(e.w[2], e.b[2], depth, hw, rows, e.covers3)
        for z2 in e.block2(slice(None)):
            res = e.feed3(s3, z2.tiles, z2.q1 - z2.q0, z2.cover, norm2, a2_plane)
            if res is not None:
                out.write(res)
        out.set_plane(e.plane_after(2, a2_plane))
    else:  # block 2 group by group; block 3 = the sum of the groups' partial outputs
        g = n2 // split
        buf = _Map(g, depth, hw, e.covers2, e.keep2)
        z3_plane = None
        for k in range(split):
            sl = slice(k * g, (k + 1) * g)
            buf.plane = e.z2_plane[:, sl].clone(memory_format=CL)
            norm2 = e.block2_norm(sl, buf.plane, store=buf)
            a2_plane = _norm_prelu_(buf.plane.clone(memory_format=CL), *norm2, e.slope[1])
            part = e.plane_after(2, a2_plane, sl, bias=k == 0)
            z3_plane = part if z3_plane is None else z3_plane.add_(part)
            s3 = _RowStream(e.w[2][:, sl], e.b[2] if k == 0 else None, depth, hw, rows, e.covers3)
            for r0, r1 in _chunks(depth, rows):
                cover = e.covers2(r0, r1)
                z2 = buf.read(r0, r1) if cover != EMPTY else None
                tiles = [(z2[_rect_slices(rect)], rect) for rect in _rects(cover)]
                if k == split - 1:
                    buf.release_before(r1)  # read into a buffer: the last group's rows are done with
                res = e.feed3(s3, tiles, r1 - r0, cover, norm2, a2_plane)
                if res is not None:
                    out.write(res, add=k > 0)
            del s3
            _release_free_memory()
        del buf
        out.set_plane(z3_plane)
    scale, offset = out.moments(e.eps[2]).affine()
    out.normalise_(scale, offset, e.slope[2])
    del e
    _release_free_memory()
    return out if ragged else out.data


# =========================================================================================
# Warping and field resampling
# =========================================================================================


def _grid_rows(ddf_rows: torch.Tensor, r0: int, shape: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """``grid_sample`` grid ``(1, d, H, W, 3)`` for output rows ``r0..`` of a displacement.

    The same float operations as MONAI's ``Warp``: ``(index + ddf) * 2 / (size - 1) - 1``,
    in ``(x, y, z) = (axis 2, axis 1, axis 0)`` order.
    """
    d, h, w = ddf_rows.shape[2:]
    grid = torch.empty((1, d, h, w, 3)) if out is None else out
    ranges = (torch.arange(r0, r0 + d), torch.arange(h), torch.arange(w))
    views = ((1, d, 1, 1), (1, 1, h, 1), (1, 1, 1, w))
    for i in range(3):
        g = grid[..., 2 - i]
        torch.add(ddf_rows[:, i], ranges[i].to(ddf_rows.dtype).view(views[i]), out=g)
        g.mul_(2).div_(max(shape[i] - 1, 1)).sub_(1)
    return grid


def _sample(img: torch.Tensor, grid: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` (trilinear, zeros, align_corners) of ``img (1, C, ...)`` at ``grid (1, d, H, W, 3)``,
    copied into ``out (1, C, d, H, W)`` (any strides, e.g. a stream's channels-last slot) and returned.

    Split in two along axis 1 and run as a batch of two (``img`` expanded, not copied): the
    3D CPU sampler parallelises over the batch only.
    """
    h = grid.shape[2]
    if h % 2 or torch.get_num_threads() < 2:
        return out.copy_(F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    g2 = grid.view(grid.shape[1], 2, h // 2, *grid.shape[3:]).transpose(0, 1)
    res = F.grid_sample(img.expand(2, -1, -1, -1, -1), g2, mode="bilinear", padding_mode="zeros", align_corners=True)
    out[0].unflatten(2, (2, h // 2)).permute(2, 0, 1, 3, 4).copy_(res)  # the halves back in place
    return out


def _warp(img: torch.Tensor, ddf: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """MONAI ``Warp(bilinear, zeros)(img, ddf)``, computed in runs of ``rows`` output rows."""
    shape = ddf.shape[2:]
    out = torch.empty(img.shape[:2] + shape, dtype=img.dtype)
    grid = _Buffer()
    for r0, r1 in _chunks(shape[0], rows):
        g = grid.plain(1, r1 - r0, shape[1], shape[2], 3)
        _sample(img, _grid_rows(ddf[:, :, r0:r1], r0, shape, g), out[:, :, r0:r1])
    return out


def _integrate(v: torch.Tensor) -> torch.Tensor:
    """``DVF2DDF(7 steps, bilinear, zeros)``: ``u = v / 2**7``, then 7 times ``u = u + warp(u, u)``."""
    u = v / (2**INTEGRATION_STEPS)
    for _ in range(INTEGRATION_STEPS):
        w = _warp(u, u)
        u = torch.add(u, w, out=w)  # u + warp(u, u), written over the warped copy
    return u


def _resize_rows(src, n_in: int, n_out: int, size_hw: Sequence[int], r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``F.interpolate(x, size=(n_out, *size_hw), mode="trilinear", align_corners=True)``.

    ``src(a, b)`` returns rows ``[a, b)`` of ``x``. Axis 0 is interpolated here with PyTorch's
    source index and weight (``src = r * (n_in - 1) / (n_out - 1)`` in float32, lower index
    ``floor(src)``, weight ``src - floor``), axes 1 and 2 by ``F.interpolate`` on the needed
    source rows (identity along axis 0); that is the nesting of PyTorch's trilinear kernel.
    """
    scale = torch.tensor((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, dtype=torch.float32)
    pos = scale * torch.arange(r0, r1, dtype=torch.float32)
    lo = pos.floor().long().clamp_max(n_in - 1)
    lam = (pos - lo.float()).clamp(0, 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    a, b = int(lo.min()), int(hi.max()) + 1
    planes = F.interpolate(src(a, b), size=(b - a, *size_hw), mode="trilinear", align_corners=True)
    lam = lam.view(1, 1, -1, 1, 1)
    return (1 - lam) * planes[:, :, lo - a] + lam * planes[:, :, hi - a]


def _upsample_rows(u: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``EOIR.upsample_field(u) = 2 * trilinear_x2(u, align_corners=True)``."""
    n = u.shape[2]
    return 2.0 * _resize_rows(lambda a, b: u[:, :, a:b], n, 2 * n, (2 * u.shape[3], 2 * u.shape[4]), r0, r1)


# =========================================================================================
# Flow estimators
# =========================================================================================


def _padded(weight: torch.Tensor, bias: torch.Tensor, cout: int, cin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's weight and bias zero-padded to ``cout`` output and ``cin`` input channels.

    The same values: extra outputs are 0 (and stay 0 through a ReLU), extra inputs meet zero
    weights. oneDNN's AVX2 kernels are faster on multiples of 8 channels: at 2 rows of the
    full plane, 64 -> 27 takes 93 ms and 64 -> 32 71 ms; 27 -> 3 15 ms and 32 -> 8 12 ms.
    """
    w = weight.new_zeros((cout, cin) + tuple(weight.shape[2:]))
    w[: weight.shape[0], : weight.shape[1]] = weight
    b = bias.new_zeros(cout)
    b[: bias.shape[0]] = bias
    return w, b


def _estimate(est, x: torch.Tensor, y, up_rows, rows: int = 2, consume_y: bool = False) -> torch.Tensor:
    """Velocity ``v = est(warp(x, up), y)`` of one level, streamed by rows.

    ``x``: moving features (channels-last); ``y``: fixed features, a tensor or a ragged
    :class:`_Map` (``consume_y``: its rows are released once read). ``up_rows(r0, r1)`` gives rows
    of the upsampled coarser field (``None`` at the coarsest level): the warped moving
    features are made row by row. The three convolutions are chained :class:`_RowStream` s,
    each writing straight into the next one's input rows, ReLU fused into the first two:

    * the first one's input halves are ``y + x`` and ``y - x``, so its weight ``[Wa, Wb]`` acts
      as ``(Wa + Wb)`` on ``y`` plus ``(Wa - Wb)`` on ``x``: two ``N``-channel convolutions (at
      2 rows of the full plane, two 32 -> 64 take 126 ms where one 64 -> 64 takes 161 ms), the
      moving one added onto the fixed one by oneDNN's "add" fusion before the ReLU. With a ragged
      ``y`` the fixed one runs on the tiles of ``y``'s kept voxels grown by one (its plane's
      response elsewhere);
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
    skips = isinstance(y, _Map) and y.ragged and not bool(y.keep.all())  # a zero background to skip
    sy = _RowStream(wy, None, depth, hw, rows, covers=_Covers(_dilate(y.keep, 1)) if skips else None)
    sx = _RowStream(wx, c1.bias.detach(), depth, hw, rows, relu=True)
    s2 = _RowStream(w2, b2, depth, hw, rows, relu=True)
    s3 = _RowStream(w3, b3, depth, hw, rows)
    if skips:  # the fixed part's response to y's background plane
        y_plane = _conv_into(_cl_empty(wy.shape[0], 1, *hw),
                             y.plane.expand(-1, -1, 3, -1, -1).contiguous(memory_format=CL), wy, None, (0, 1, 1))
    v = torch.empty((1, 3, depth) + hw)
    grid = _Buffer()
    for r0, r1 in _chunks(depth, rows):
        if up_rows is None:
            sx.slot(r1 - r0).copy_(x[:, :, r0:r1])
        else:
            g = grid.plain(1, r1 - r0, hw[0], hw[1], 3)
            _sample(x, _grid_rows(up_rows(r0, r1), r0, (depth,) + hw, g), sx.slot(r1 - r0))
        if isinstance(y, _Map):
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
            _fill_background(z1, y_plane, res.cover)
            for zy, rect in res.tiles:
                z1[_rect_slices(rect)].copy_(zy)
        sx.conv(onto=z1)  # relu(conv(wx, x) + bias + conv(wy, y))
        k = s2.pending()
        if s2.conv(into=s3.slot(k) if k else None) is None:
            continue
        res = s3.conv()
        if res is not None:
            v[:, :, res.q0 : res.q1] = res.tiles[0][0][:, :3]
    return v


# =========================================================================================
# The whole network
# =========================================================================================


def _downsample_map(y: _Map) -> torch.Tensor:
    """``EOIR.downsample`` of a ragged map, made by rows (see :func:`_resize_rows`)."""
    n_out, hw = y.depth // 2, (y.hw[0] // 2, y.hw[1] // 2)
    out = _cl_empty(y.c, n_out, *hw)
    for r0, r1 in _chunks(n_out, 4):
        out[:, :, r0:r1] = _resize_rows(y.read, y.depth, n_out, hw, r0, r1)
    return out


def _encoder_peak(out_rows: list, buf_rows: list, groups: int) -> float:
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


def _choose_split(out_rows: list, buf_rows: list, others: float, limit: float) -> int:
    """Block-2 storage for one image: the fewest groups ``G`` (1, 2 or 4) that keep ``others`` plus
    :func:`_encoder_peak` within ``limit`` N-channel full maps; 0 (recompute) if none does."""
    for g in (1, 2, 4):
        if others + _encoder_peak(out_rows, buf_rows, g) <= limit + 1e-9:
            return g
    return 0


def default_store_limit(start_channel: int) -> float:
    """``store_limit`` in ``N``-channel maps for the same bytes as ``STORE_LIMIT_32`` 32-channel
    maps (``N >= 32``: ``STORE_LIMIT_32``). At N=16 it is 3.5 maps."""
    return STORE_LIMIT_32 * max(1.0, 32.0 / start_channel)


def _pair(net: EOIR, moving: torch.Tensor, fixed: torch.Tensor, *, rows: int = 2, skip_background: bool = True,
          store_limit: float | None = None, finest_level: int = 0) -> torch.Tensor:
    """``ddf (1, 3, D0, D1, D2)`` of one pair ``(D0, D1, D2)`` each (sizes multiples of 16).

    The fixed features are kept ragged (only their non-background voxels), the moving ones
    dense (``grid_sample`` reads them anywhere). Each image's block-2 storage is the fastest
    that keeps the encoder's stored maps within ``store_limit`` N-channel full maps.
    ``finest_level``: as ``EOIR.forward``'s (levels below it are not run).
    """
    ey = _Encoder(net, fixed, rows, skip_background)
    ex = _Encoder(net, moving, rows, skip_background)
    if store_limit is None:
        store_limit = default_store_limit(ey.n)
    y_rows = ey.row_sizes(ey.n, ey.keep3)  # the fixed features, ragged
    split_y = _choose_split(y_rows, ey.row_sizes(2 * ey.n, ey.keep2), 0.0, max(store_limit, 2.0))
    split_x = _choose_split(ex.row_sizes(ex.n), ex.row_sizes(2 * ex.n, ex.keep2), sum(y_rows), store_limit)
    y0 = encode(net, fixed, split=split_y, rows=rows, ragged=True, _encoder=ey)
    del ey
    x0 = encode(net, moving, split=split_x, rows=rows, _encoder=ex)
    del ex
    # the pyramid, one image at a time (both full-size maps are alive here); level 1 is dropped
    # as soon as level 2 exists and made again when its turn comes (it is 1/8 of level 0:
    # re-making it costs ~0.5 s, keeping it 2 x N/8 channels all along)
    xs, ys = [x0, None], [y0, None]
    del x0, y0
    for levels, down1 in ((xs, EOIR.downsample), (ys, _downsample_map)):
        level = down1(levels[0])
        for _ in range(NUM_LEVELS - 2):
            level = EOIR.downsample(level)
            levels.append(level)
        del level
    _release_free_memory()
    u = None
    for level in reversed(range(finest_level, NUM_LEVELS)):
        if level == 1:
            xs[1], ys[1] = EOIR.downsample(xs[0]), _downsample_map(ys[0])
        if level == finest_level:  # the finer features are not needed
            xs[:level] = ys[:level] = [None] * level
        up_rows = None if u is None else (lambda r0, r1, u=u: _upsample_rows(u, r0, r1))
        v = _estimate(net.estimators[level], xs[level], ys[level], up_rows, rows, consume_y=level == 0)
        xs[level] = ys[level] = None  # this level's features are no longer needed
        phi = _integrate(v)
        del v
        if u is not None:  # compose with the coarser field: phi + warp(up, phi)
            w = _warp(EOIR.upsample_field(u), phi)
            phi = torch.add(phi, w, out=w)
        u = phi
        _release_free_memory()
    for _ in range(finest_level):
        u = EOIR.upsample_field(u)
    return u


def lean_forward(net: EOIR, x: torch.Tensor, *, rows: int = 2, skip_background: bool = True,
                 store_limit: float | None = None, finest_level: int = 0) -> torch.Tensor:
    """``net.eval()(x)`` computed lean: ``x (B, 2, D0, D1, D2) = cat([moving, fixed], 1)`` -> ``ddf``.

    Args:
        net: an :class:`EOIR`; its parameters are used as they are (its train/eval mode is
            ignored: this is always the inference computation).
        rows: rows per streamed chunk (memory grows with it; 2 is about as fast as larger).
        skip_background: skip the encoder's work on exactly-zero background (exact).
        store_limit: how many ``N``-channel full-size maps the moving image's encoder may
            hold at once (the fixed features, kept ragged, the moving ones being made, and
            block-2 buffers); more allows less recomputation. The fixed image, encoded
            first, may use ``max(store_limit, 2)`` (level 0 holds two maps anyway). Default
            (None): :func:`default_store_limit`, a fixed number of bytes (1.75 maps at N=32,
            3.5 at N=16). On LUMIR-like brains both images' block 2 is then stored whole (the
            moving image's encoder holds at most about 1.4 maps). Under about 1.4, the moving
            image's block 2 is stored in groups or recomputed: about 3 s slower per pair at N=32.
        finest_level: run the levels down to this one only (``EOIR.forward``'s argument;
            0 = the whole network).

    Returns ``ddf (B, 3, D0, D1, D2)`` float32, like ``EOIR.forward`` in eval mode (an
    ordinary tensor: computed under ``torch.inference_mode()``, returned as a copy usable
    with autograd, e.g. to start instance optimisation from).
    """
    if x.ndim != 5 or x.shape[1] != 2:
        raise ValueError(f"EOIR expects (B, 2, D0, D1, D2) = cat([moving, fixed], 1), got {tuple(x.shape)}")
    if not 0 <= finest_level < NUM_LEVELS:
        raise ValueError(f"finest_level must be in 0..{NUM_LEVELS - 1}, got {finest_level}")
    shape = x.shape[2:]
    pads = [(-s) % _DIVISOR for s in shape]
    with torch.inference_mode():
        if any(pads):
            pad_arg = [p for s in reversed(pads) for p in (s // 2, s - s // 2)]
            x = F.pad(x, pad_arg)
        out = []
        for b in range(x.shape[0]):
            xb = x[b].float()
            ddf = _pair(net, xb[0].contiguous(), xb[1].contiguous(), rows=rows, skip_background=skip_background,
                        store_limit=store_limit, finest_level=finest_level)
            if any(pads):
                ddf = ddf[(...,) + tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape))].contiguous()
            out.append(ddf)
        ddf = out[0] if len(out) == 1 else torch.cat(out, 0)
    return ddf.clone()  # outside inference mode: an ordinary tensor


class LeanEOIR(nn.Module):
    """An :class:`EOIR` whose inference runs :func:`lean_forward`: a drop-in for inference.

    Wraps (and shares the parameters of) ``net``, or a new ``EOIR(start_channel)``. Its
    ``state_dict`` / ``load_state_dict`` are the wrapped network's (the same keys as an
    ``EOIR``, so a checkpoint loads into either). ``forward(x)`` is the lean path when the
    module is in eval mode and gradients are off (``torch.no_grad()`` / ``inference_mode``,
    as MONAI evaluators run); otherwise it is ``net(x)`` (training, or gradients through the
    network). For TorchScript export use the wrapped ``EOIR``.

    Example (a bundle config)::

        "network": "$scripts.lean_inference.LeanEOIR(@network_def)"
    """

    def __init__(self, net: EOIR | None = None, *, start_channel: int = 32, rows: int = 2,
                 skip_background: bool = True, store_limit: float | None = None):
        super().__init__()
        self.net = EOIR(start_channel=start_channel) if net is None else net
        self.rows, self.skip_background, self.store_limit = rows, skip_background, store_limit

    def forward(self, x: torch.Tensor, finest_level: int = 0):
        if self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            # training, gradients, or a GPU (where the plain path fits and is fast)
            return self.net(x) if self.training else self.net(x, finest_level)
        x = x.as_tensor() if isinstance(x, MetaTensor) else x  # plain tensor: no per-op metadata bookkeeping
        return lean_forward(self.net, x, rows=self.rows, skip_background=self.skip_background,
                            store_limit=self.store_limit, finest_level=finest_level)

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
