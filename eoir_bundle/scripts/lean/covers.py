"""Background skipping: where a layer's output can differ from its background plane.

With an exactly-zero background (skull-stripped images), the encoder's response at a voxel
farther than its reach (block ``L`` reaches ``L`` voxels) from every nonzero voxel, and away
from the axis-0 faces, does not depend on the row: it is a per-layer *background plane*
``(1, C, 1, H, W)``, computed once from the previous layer's plane (its border differs from
its inside: the zero padding). A *keep mask* (:func:`keep_mask`) is a bool ``(D0, H, W)``
mask of the voxels that can differ from the plane.

A *cover* says where rows ``[q0, q1)`` must be computed: ``FULL`` (the whole plane: rows
near the axis-0 faces, or no zero background), ``EMPTY`` (nothing but background), or a
tuple of disjoint tiles ``(h0, h1, w0, w1)`` holding every kept voxel of those rows: the
plane cut into bands of 32 voxels along axis 1, each band's bounding box snapped outwards to
multiples of 8 (few distinct shapes reach oneDNN). Everything outside a cover is the plane
(:func:`fill_background`, :func:`fill_outside`). Images without an exactly-zero background
simply have every cover ``FULL``.
"""

from __future__ import annotations

import torch

FULL = "full"  # a cover: the whole plane (rows near the axis-0 faces, or no zero background)
EMPTY = ()  # a cover: no tile, nothing but background
_BAND = 32  # tiles: the plane is cut into bands of this many voxels along axis 1 ...
_SNAP = 8  # ... and tile corners are multiples of this
_FULL_FRACTION = 0.85  # a cover whose tiles are more of the plane than this is FULL
assert _BAND % _SNAP == 0  # snapped tiles stay inside their band: tiles never overlap


def rects(cover) -> tuple:
    """The rectangles of a cover: ``(FULL,)`` or its tiles."""
    return (FULL,) if cover == FULL else cover


def rect_slices(rect) -> tuple:
    """The index of a rectangle (``FULL`` or a tile) in a ``(1, C, d, H, W)`` tensor."""
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


def fill_background(view: torch.Tensor, plane: torch.Tensor, cover) -> None:
    """Write ``plane (1, C, 1, H, W)`` into every row of ``view`` unless ``cover`` is ``FULL``
    (callers then write the tiles: one copy is fewer, larger operations than the strips between)."""
    if cover != FULL:
        view.copy_(plane.expand_as(view))


def fill_outside(view: torch.Tensor, plane: torch.Tensor, cover) -> None:
    """Write ``plane (1, C, 1, H, W)`` into the rows ``view`` outside ``cover``'s tiles."""
    for rect in _complement(cover, *view.shape[3:]):
        part = view[rect_slices(rect)]
        part.copy_(plane[rect_slices(rect)].expand_as(part))


def dilate(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """A bool ``(D0, D1, D2)`` mask dilated by a ``(2 reach + 1)``-cube (separable: shifted ORs per axis)."""
    m = mask
    for axis, n in enumerate(m.shape):
        src, m = m, m.clone()
        for s in range(1, min(reach, n - 1) + 1):
            m.narrow(axis, s, n - s).logical_or_(src.narrow(axis, 0, n - s))
            m.narrow(axis, 0, n - s).logical_or_(src.narrow(axis, s, n - s))
    return m


def keep_mask(img: torch.Tensor, reach: int, face: int = 3) -> torch.Tensor:
    """Where encoder block ``reach`` (1, 2 or 3) can differ from its background plane: a bool
    ``(D0, D1, D2)`` mask.

    With a zero background, block ``L`` gives, at a voxel farther than ``L`` (along every axis)
    from every nonzero voxel of ``img`` and at least 3 rows from the axis-0 faces, the value it
    gives on an all-zero image there: a per-layer background plane (constant but for its
    ``L - 1`` outer voxels in-plane, where the zero padding differs from the background). So
    the mask is the nonzero voxels dilated by a ``(2 reach + 1)``-cube, plus every voxel of the
    ``face`` rows at each axis-0 face.
    """
    m = dilate(img != 0, reach)
    m[:face] = True
    m[m.shape[0] - face :] = True
    return m


def _cover(mask: torch.Tensor):
    """Disjoint tiles covering the ``True`` voxels of a bool ``(H, W)`` mask: a tuple of
    ``(h0, h1, w0, w1)`` (``EMPTY``: none), or ``FULL`` when they would be most of the plane.

    The plane is cut into bands of ``_BAND`` voxels along axis 1; each band's ``True`` voxels get
    their bounding box, snapped outwards to multiples of ``_SNAP`` (few distinct shapes reach
    oneDNN), and touching tiles with the same columns are merged: on a round cross-section the
    bands follow its outline more closely than one bounding box (see NOTES.md).
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


class Covers:
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
