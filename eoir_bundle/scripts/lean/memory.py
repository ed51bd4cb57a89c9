"""Reused buffers, the channels-last layout, and giving memory back to the OS.

Conventions of the whole lean path: volumes are ``(1, C, D0, D1, D2)`` float32 and "rows"
are slices along axis 0. Feature maps are kept in ``torch.channels_last_3d`` (:data:`CL`:
channels innermost, NDHWC in memory): oneDNN's 3D convolutions are fastest in that layout,
a run of rows is one contiguous block, and ``grid_sample`` reads all channels of a voxel
from one cache line.

Per-chunk temporaries of varying size would fragment glibc's heap, so they live in reused
:class:`Buffer` s; freed heap pages are handed back between passes
(:func:`release_free_memory`), and rows of a stored map that will not be read again give
their pages back (:func:`release_pages`). Both are no-ops outside glibc / Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Sequence

import torch

CL = torch.channels_last_3d  # the memory format of every feature map


class Buffer:
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
        """A contiguous tensor of ``shape`` (uninitialised)."""
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


def release_free_memory() -> None:
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


def release_pages(t: torch.Tensor, start: int, end: int) -> None:
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


def cl_empty(c: int, d: int, h: int, w: int) -> torch.Tensor:
    """A new contiguous channels-last ``(1, c, d, h, w)`` tensor (uninitialised)."""
    return torch.empty((1, c, d, h, w), memory_format=CL)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A contiguous channels-last ``(1, C, d, H, W)`` tensor as its ``(d*H*W, C)`` matrix (a view)."""
    if not t.is_contiguous(memory_format=CL):
        raise ValueError("expected a contiguous channels-last tensor")
    return t.permute(0, 2, 3, 4, 1).reshape(-1, t.shape[1])


def per_channel(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector ``(C,)`` as a ``(1, C, 1, 1, 1)`` view, to broadcast over a map."""
    return v.view(1, -1, 1, 1, 1)
