"""The whole network computed lean: one pair, :func:`lean_forward` and :class:`LeanEOIR`.

Order of the computation (:func:`_pair`): the fixed image's encoder and feature pyramid (its
features kept ragged; :mod:`.fixed`, which can keep them for the next pairs with the same
fixed image), the moving image's (dense: ``grid_sample`` reads them anywhere), then the levels from the coarsest to the finest, each estimator followed by its integration
(scaling and squaring) and the composition with the coarser field. Integration and
composition (whose warps read anywhere) run on 3-channel fields only, and the finest
estimator runs last, after the coarser features are freed.

Profiling: the phases are ``torch.profiler.record_function`` ranges, ``lean.encode.fixed``,
``lean.encode.moving``, ``lean.estimate.level<L>`` and ``lean.integrate.level<L>``, inside
``lean.forward`` (``python -m scripts.tools.profile_lean`` reads them). They cost nothing
measurable when no profiler runs.

Threads: this path runs many more (smaller) parallel regions than ``EOIR.forward``. On a
machine shared with other jobs, libgomp's default spin-waiting then costs a time slice per
region: set ``OMP_WAIT_POLICY=PASSIVE`` in the environment there (``--omp_wait_policy
passive`` in the benchmark). On an idle machine libgomp's default is faster (see NOTES.md).
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from torch import nn
from torch.profiler import record_function

from ..inverse import invert_levels
from ..layers import crop_padding, pad_to_multiple, padding_to_multiple
from ..network import EOIR, NUM_LEVELS
from .encoder import Encoder, choose_split, encode
from .fixed import FixedFeatureCache, fixed_features
from .estimator import estimate
from .memory import release_free_memory
from .resampling import downsample_map, integrate, upsample_rows, warp

# the encoders' storage budget, in 32-channel full maps (1.54 GB at 160 x 224 x 192), chosen so that
# LUMIR-like brains store block 2 whole for both images at N=32 (see NOTES.md); smaller networks
# get the same bytes (more maps)
STORE_LIMIT_32 = 1.75


def default_store_limit(start_channel: int) -> float:
    """``store_limit`` in ``N``-channel maps for the same bytes as ``STORE_LIMIT_32`` 32-channel
    maps (``N >= 32``: ``STORE_LIMIT_32``). At N=16 it is 3.5 maps."""
    return STORE_LIMIT_32 * max(1.0, 32.0 / start_channel)


def _pair(net: EOIR, moving: torch.Tensor, fixed: torch.Tensor, *, rows: int = 2, skip_background: bool = True,
          store_limit: float | None = None, finest_level: int = 0, with_inverse: bool = False,
          fixed_cache: FixedFeatureCache | None = None):
    """``ddf (1, 3, D0, D1, D2)`` of one pair ``(D0, D1, D2)`` each (sizes multiples of 16);
    ``with_inverse``: ``(ddf, inverse)``, the inverse composed from the levels' velocities
    (:func:`scripts.inverse.invert_levels`, with this path's integration and warp).

    The fixed features are kept ragged (only their non-background voxels), the moving ones
    dense (``grid_sample`` reads them anywhere). Each image's block-2 storage is the fastest
    that keeps the encoder's stored maps within ``store_limit`` N-channel full maps.
    ``finest_level``: as ``EOIR.forward``'s (levels below it are not run). ``fixed_cache``: take
    the fixed image's features from it (computed and kept there on a miss; :mod:`.fixed`).
    """
    ex = Encoder(net, moving, rows, skip_background)
    if store_limit is None:
        store_limit = default_store_limit(ex.n)
    if fixed_cache is None:
        y_stored, ys = fixed_features(net, fixed, rows, skip_background, store_limit)
    else:
        y_stored, ys = fixed_cache.get(net, fixed, rows, skip_background, store_limit)
        ys = list(ys)  # the levels are dropped from this list as they are used, not from the cache
    split_x = choose_split(ex.row_sizes(ex.n), ex.row_sizes(2 * ex.n, ex.keep2), y_stored, store_limit)
    with record_function("lean.encode.moving"):
        x0 = encode(net, moving, split=split_x, rows=rows, encoder=ex)
    del ex
    # the moving pyramid (both full-size maps are alive here); level 1 is dropped as soon as
    # level 2 exists and made again when its turn comes (it is 1/8 of level 0: re-making it is
    # cheap, keeping it costs 2 x N/8 channels all along)
    xs = [x0, None]
    del x0
    level = EOIR.downsample(xs[0])
    for _ in range(NUM_LEVELS - 2):
        level = EOIR.downsample(level)
        xs.append(level)
    del level
    release_free_memory()
    u, velocities = None, []
    for level in reversed(range(finest_level, NUM_LEVELS)):
        if level == 1:
            xs[1], ys[1] = EOIR.downsample(xs[0]), downsample_map(ys[0])
        if level == finest_level:  # the finer features are not needed
            xs[:level] = ys[:level] = [None] * level
        up_rows = None if u is None else (lambda r0, r1, u=u: upsample_rows(u, r0, r1))
        with record_function(f"lean.estimate.level{level}"):
            v = estimate(net.estimators[level], xs[level], ys[level], up_rows, rows,
                         consume_y=level == 0 and fixed_cache is None)
        xs[level] = ys[level] = None  # this level's features are no longer needed
        with record_function(f"lean.integrate.level{level}"):
            phi = integrate(v)
        if with_inverse:
            velocities.insert(0, v)
        del v
        if u is not None:  # compose with the coarser field: phi + warp(up, phi)
            w = warp(EOIR.upsample_field(u), phi)
            phi = torch.add(phi, w, out=w)
        u = phi
        release_free_memory()
    for _ in range(finest_level):
        u = EOIR.upsample_field(u)
    if not with_inverse:
        return u
    with record_function("lean.inverse"):
        inverse = invert_levels(velocities, integrate, warp, EOIR.upsample_field)
        del velocities
        for _ in range(finest_level):
            inverse = EOIR.upsample_field(inverse)
    return u, inverse


def lean_forward(net: EOIR, x: torch.Tensor, *, rows: int = 2, skip_background: bool = True,
                 store_limit: float | None = None, finest_level: int = 0, with_inverse: bool = False,
                 fixed_cache: FixedFeatureCache | None = None):
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
            image's block 2 is stored in groups or recomputed (slower, see NOTES.md).
        finest_level: run the levels down to this one only (``EOIR.forward``'s argument;
            0 = the whole network).
        with_inverse: also return the inverse field, as ``EOIR.forward_with_inverse`` does
            (the levels' velocities are kept: 1.14 x a 3-channel full-size field).
        fixed_cache: a :class:`.fixed.FixedFeatureCache`: the fixed image's features are taken
            from it when it holds them (many images registered to one), else computed and kept.

    Returns ``ddf (B, 3, D0, D1, D2)`` float32, like ``EOIR.forward`` in eval mode (an
    ordinary tensor: computed under ``torch.inference_mode()``, returned as a copy usable
    with autograd, e.g. to start instance optimisation from); ``with_inverse``: ``(ddf, inverse)``.
    """
    if x.ndim != 5 or x.shape[1] != 2:
        raise ValueError(f"EOIR expects (B, 2, D0, D1, D2) = cat([moving, fixed], 1), got {tuple(x.shape)}")
    if not 0 <= finest_level < NUM_LEVELS:
        raise ValueError(f"finest_level must be in 0..{NUM_LEVELS - 1}, got {finest_level}")
    shape = list(x.shape[2:])
    pads = padding_to_multiple(shape, net.divisor)
    with torch.inference_mode(), record_function("lean.forward"):
        x = pad_to_multiple(x, pads)
        out, inv = [], []
        for b in range(x.shape[0]):
            xb = x[b].float()
            ddf = _pair(net, xb[0].contiguous(), xb[1].contiguous(), rows=rows, skip_background=skip_background,
                        store_limit=store_limit, finest_level=finest_level, with_inverse=with_inverse,
                        fixed_cache=fixed_cache)
            if with_inverse:
                ddf, inverse = ddf
                inv.append(crop_padding(inverse, pads, shape).contiguous())
            out.append(crop_padding(ddf, pads, shape).contiguous())
        ddf = out[0] if len(out) == 1 else torch.cat(out, 0)
        if with_inverse:
            inverse = inv[0] if len(inv) == 1 else torch.cat(inv, 0)
            return ddf.clone(), inverse.clone()  # outside inference mode: ordinary tensors
    return ddf.clone()  # outside inference mode: an ordinary tensor


class LeanEOIR(nn.Module):
    """An :class:`EOIR` whose inference runs :func:`lean_forward`: a drop-in for inference.

    Wraps (and shares the parameters of) ``net``, or a new ``EOIR(start_channel)``. Its
    ``state_dict`` / ``load_state_dict`` are the wrapped network's (the same keys as an
    ``EOIR``, so a checkpoint loads into either). ``forward(x)`` is the lean path when the
    module is in eval mode and gradients are off (``torch.no_grad()`` / ``inference_mode``,
    as MONAI evaluators run); otherwise it is ``net(x)`` (training, or gradients through the
    network). For TorchScript export use the wrapped ``EOIR``. ``reuse_fixed`` (default): keep
    the last fixed image's features (:class:`.fixed.FixedFeatureCache`, in ``fixed_cache``), so
    that pairs sharing a fixed image (every subject to one template) encode it once.

    Example (a bundle config)::

        "network": "$scripts.lean.LeanEOIR(@network_def)"
    """

    def __init__(self, net: EOIR | None = None, *, start_channel: int = 32, rows: int = 2,
                 skip_background: bool = True, store_limit: float | None = None, reuse_fixed: bool = True):
        super().__init__()
        self.net = EOIR(start_channel=start_channel) if net is None else net
        self.rows, self.skip_background, self.store_limit = rows, skip_background, store_limit
        self.fixed_cache = FixedFeatureCache() if reuse_fixed else None

    def forward(self, x: torch.Tensor, finest_level: int = 0):
        if self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            # training, gradients, or a GPU (where the plain path fits and is fast)
            return self.net(x) if self.training else self.net(x, finest_level)
        x = x.as_tensor() if isinstance(x, MetaTensor) else x  # plain tensor: no per-op metadata bookkeeping
        return lean_forward(self.net, x, rows=self.rows, skip_background=self.skip_background,
                            store_limit=self.store_limit, finest_level=finest_level, fixed_cache=self.fixed_cache)

    def forward_with_inverse(self, x: torch.Tensor, finest_level: int = 0):
        """``(ddf, inverse)``: ``EOIR.forward_with_inverse``, by the lean path where :meth:`forward`
        takes it."""
        if self.training or torch.is_grad_enabled() or x.device.type != "cpu":
            return self.net.forward_with_inverse(x, finest_level)
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        return lean_forward(self.net, x, rows=self.rows, skip_background=self.skip_background,
                            store_limit=self.store_limit, finest_level=finest_level, with_inverse=True,
                            fixed_cache=self.fixed_cache)

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
