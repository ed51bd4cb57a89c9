"""InstanceNorm from moments, and the normalisation + PReLU that follows it.

``InstanceNorm3d`` (no affine, biased variance, eps 1e-5) needs each channel's mean and
variance over the whole volume, so a block's output is normalised only after a full pass
over it: :class:`Moments` sums it chunk by chunk (in float64, around a per-channel shift:
as accurate as PyTorch's double-accumulated statistics) and gives the norm as a per-channel
``(scale, offset)``. ``PReLU`` with one shared slope is ``leaky_relu`` with that slope
(:func:`norm_prelu_`, :func:`norm_prelu_into`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .covers import FULL, rect_slices
from .memory import CL, Buffer, as_matrix, per_channel


class Moments:
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
        self.tmp = Buffer()
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
        self.add_matrix(as_matrix(z))

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
            self._start(as_matrix(plane).mean(0))
        if self._plane is None:
            self._plane = self._sums(as_matrix(plane))
        p1, p2 = self._plane
        n = plane.shape[3] * plane.shape[4]
        for rect in cover:
            if rect not in self._inside:
                inner = plane[rect_slices(rect)].contiguous(memory_format=CL)
                self._inside[rect] = self._sums(as_matrix(inner)) + (inner.shape[3] * inner.shape[4],)
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


def norm_prelu_(t: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, slope: float) -> torch.Tensor:
    """In place: ``PReLU(InstanceNorm(t))`` given the norm as ``scale``/``offset`` (per channel)."""
    t.mul_(per_channel(scale)).add_(per_channel(offset))
    return F.leaky_relu_(t, slope)


def norm_prelu_into(dst: torch.Tensor, src: torch.Tensor, scale, offset, slope: float) -> None:
    """``dst = PReLU(InstanceNorm(src))`` (same shape; ``dst`` may be a strided view)."""
    torch.addcmul(per_channel(offset), src, per_channel(scale), out=dst)
    F.leaky_relu_(dst, slope)
