"""The fixed image's part of a pair, and its reuse when many images register to one.

:func:`fixed_features` is what the network computes from the fixed image alone: its encoder
features (ragged, :class:`.maps.Map`) and their pyramid. They do not depend on the moving
image, so a run that registers every subject to one template can compute them once:
:class:`FixedFeatureCache` keeps the last fixed image's features, keyed by the image's content
(a hash of its voxels) and by what shapes them (the weights, ``rows``, ``skip_background``,
``store_limit``). What it saves: the fixed encoder and pyramid, measured on the sample pair
(N=16, 160 x 224 x 192, 2 threads; the ``lean.*`` profiler ranges that
``scripts.tools.profile_lean`` reads) as 28 % of
the whole network's time and 42 % of the network down to level 1 (instance optimisation's
warm start). What it costs: the features stay in memory between pairs (0.37 of an N-channel
full-size map on the sample pair: 0.16 GB at N=16), and the finest estimator
reads them without releasing their rows as it goes (the level starts with them whole either
way). A new fixed image replaces the entry before it is encoded.
"""

from __future__ import annotations

import hashlib

import torch
from torch.profiler import record_function

from ..network import EOIR, NUM_LEVELS
from .encoder import Encoder, choose_split, encode
from .resampling import downsample_map

__all__ = ["fixed_features", "FixedFeatureCache"]


def fixed_features(net: EOIR, fixed: torch.Tensor, rows: int, skip_background: bool, store_limit: float):
    """``(stored, levels)`` of a fixed image ``(D0, D1, D2)``: the size of its ragged features in
    N-channel full maps (what the moving image's encoder must budget around) and the feature
    pyramid ``[level 0 (ragged Map), None, level 2, level 3, level 4]`` (level 1 is made from
    level 0 when its turn comes, see :mod:`.forward`). Block-2 storage: the fastest that keeps
    the encoder within ``max(store_limit, 2)`` maps."""
    ey = Encoder(net, fixed, rows, skip_background)
    y_rows = ey.row_sizes(ey.n, ey.keep3)
    split_y = choose_split(y_rows, ey.row_sizes(2 * ey.n, ey.keep2), 0.0, max(store_limit, 2.0))
    with record_function("lean.encode.fixed"):
        y0 = encode(net, fixed, split=split_y, rows=rows, ragged=True, encoder=ey)
    del ey
    levels = [y0, None]
    level = downsample_map(y0)
    for _ in range(NUM_LEVELS - 2):
        level = EOIR.downsample(level)
        levels.append(level)
    return sum(y_rows), levels


class FixedFeatureCache:
    """One entry: the last fixed image's :func:`fixed_features`, reused while the next pairs have the
    same fixed image (content), weights and settings. ``hits`` / ``misses`` count lookups."""

    def __init__(self) -> None:
        self.key = None
        self.value = None
        self.hits = self.misses = 0

    @staticmethod
    def _key(net: EOIR, fixed: torch.Tensor, settings: tuple) -> tuple:
        content = hashlib.blake2b(fixed.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).hexdigest()
        weights = tuple((p.data_ptr(), p._version) for p in net.parameters())  # in-place loads bump _version
        return (content, tuple(fixed.shape), str(fixed.dtype), id(net), weights, settings)

    def get(self, net: EOIR, fixed: torch.Tensor, rows: int, skip_background: bool, store_limit: float):
        """:func:`fixed_features` of ``fixed``, from the entry when it matches, else computed and kept."""
        key = self._key(net, fixed, (rows, skip_background, store_limit))
        if key == self.key:
            self.hits += 1
            return self.value
        self.key = self.value = None  # give the old features back before encoding the new image
        self.misses += 1
        self.value = fixed_features(net, fixed, rows, skip_background, store_limit)
        self.key = key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None
