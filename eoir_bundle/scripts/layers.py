"""The network's layers that MONAI has in a form TorchScript cannot compile, and pad-to-16.

Conventions (MONAI ``Warp``): tensors ``(B, C, D0, D1, D2)``; a displacement ``ddf`` is
``(B, 3, D0, D1, D2)`` in voxel units, channel ``i`` along array axis ``i``, and
``warped(p) = image(p + ddf(p))`` (trilinear, ``align_corners=True``).
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Warp

__all__ = ["ScriptableWarp", "ScriptableDVF2DDF", "sample_in_halves", "padding_to_multiple", "pad_to_multiple",
           "crop_padding", "INTEGRATION_STEPS"]

INTEGRATION_STEPS = 7  # scaling and squaring steps of every level's velocity


def sample_in_halves(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.grid_sample(image, grid, align_corners=True)``; a 3D batch-1 CPU call on 2+ threads as
    the two halves of axis 1 run as a batch of two (``image`` expanded, not copied).

    PyTorch's 3D CPU sampler parallelises over the batch only: the halves give the same values
    bit for bit, up to twice as fast. ``out`` (optional, ``(1, C, d, h, w)``, any strides):
    the result is copied into it and it is returned.
    """
    if grid.dim() != 5 or image.shape[0] != 1 or grid.shape[2] % 2 or image.device.type != "cpu" \
            or torch.get_num_threads() < 2:
        res = F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
        return res if out is None else out.copy_(res)
    d, h, w = grid.shape[1], grid.shape[2], grid.shape[3]
    halves = grid.view(d, 2, h // 2, w, 3).transpose(0, 1)  # (2, d, h/2, w, 3): a view
    res = F.grid_sample(image.expand(2, -1, -1, -1, -1), halves, mode=mode, padding_mode=padding_mode,
                        align_corners=True)
    if out is None:
        return res.permute(1, 2, 0, 3, 4).reshape(1, image.shape[1], d, h, w)
    out[0].unflatten(2, (2, h // 2)).permute(2, 0, 1, 3, 4).copy_(res)  # the halves back in place
    return out


def padding_to_multiple(shape: List[int], divisor: int) -> List[int]:
    """Voxels to add along each axis so that every size is a multiple of ``divisor``."""
    return [(-s) % divisor for s in shape]


def pad_to_multiple(x: torch.Tensor, pads: List[int]) -> torch.Tensor:
    """``x (B, C, D0, D1, D2)`` zero-padded by ``pads`` (:func:`padding_to_multiple`), half before
    (rounded down) and the rest after; ``x`` itself when nothing is to be added."""
    if pads[0] + pads[1] + pads[2] == 0:
        return x
    # F.pad lists the last axis first
    return F.pad(x, [pads[2] // 2, pads[2] - pads[2] // 2, pads[1] // 2, pads[1] - pads[1] // 2,
                     pads[0] // 2, pads[0] - pads[0] // 2])


def crop_padding(t: torch.Tensor, pads: List[int], shape: List[int]) -> torch.Tensor:
    """The inverse of :func:`pad_to_multiple`: the ``shape`` window of ``t`` (a view)."""
    if pads[0] + pads[1] + pads[2] == 0:
        return t
    return t[:, :, pads[0] // 2 : pads[0] // 2 + shape[0], pads[1] // 2 : pads[1] // 2 + shape[1],
             pads[2] // 2 : pads[2] // 2 + shape[2]]


class ScriptableWarp(Warp):
    """MONAI :class:`~monai.networks.blocks.Warp` whose ``forward`` TorchScript can compile.

    Why it exists: ``torch.jit.script`` (what ``monai.bundle ckpt_export`` runs) rejects
    MONAI's ``Warp.forward`` (MONAI 1.6.1): ``tuple(image.shape[2:])`` (a tuple of unknown
    length), the reference grid cached in ``self.ref_grid`` (an attribute that starts as
    ``None``, so TorchScript types it ``NoneType``; ``get_reference_grid`` also uses the
    generator-based ``torch.random.fork_rng`` for jitter), the module-level ``USE_COMPILED`` flag and
    ``_compiled_unsupported()`` read inside ``forward``, ``grid[..., index_list]`` (list indexing
    after an ellipsis), and the ``grid_pull`` branch (MONAI's compiled extension).

    Same math as ``Warp``'s PyTorch-native path, the same float operations in the same order
    (so the same sampling coordinates, bit for bit): ``grid_i = (i_index + ddf_i) * 2 /
    max(size_i - 1, 1) - 1`` in ``(x, y, z) = (axis 2, 1, 0)`` order, then ``F.grid_sample``
    with ``align_corners=True`` and the ``mode`` / ``padding_mode`` given to ``Warp``. It always
    uses ``F.grid_sample`` (also when MONAI is built with its C++ extension), caches no grid
    (adds the index to each channel instead: no full-size grid kept between calls), and does
    not support ``jitter``.

    ``batch_split=True``: a 3D warp of batch 1 on a CPU with 2+ threads samples the two halves of
    axis 1 as a batch of two (the image expanded, not copied), because PyTorch's 3D CPU
    sampler parallelises over the batch only: the same values bit for bit (the image's gradient
    sums the two halves in another order: equal up to rounding), up to twice as fast (used by instance optimisation; the network keeps the plain call).
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros", batch_split: bool = False) -> None:
        with warnings.catch_warnings():  # Warp announces that it uses torch's grid_sample: expected
            warnings.simplefilter("ignore")
            super().__init__(mode=mode, padding_mode=padding_mode, jitter=False)
        self.batch_split = bool(batch_split)

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        spatial_dims = image.dim() - 2
        if spatial_dims != 2 and spatial_dims != 3:
            raise NotImplementedError(f"got unsupported spatial_dims={spatial_dims}, currently support 2 or 3.")
        if ddf.dim() != image.dim() or ddf.shape[0] != image.shape[0] or ddf.shape[1] != spatial_dims \
                or ddf.shape[2:] != image.shape[2:]:
            raise ValueError(f"Given input {spatial_dims}-d image shape {image.shape}, the input DDF shape must be "
                             f"(batch, {spatial_dims}, *spatial), got {ddf.shape} instead.")
        coords: List[torch.Tensor] = []
        for i in range(spatial_dims - 1, -1, -1):  # grid_sample wants (x, y, z) = array axes reversed
            size = ddf.shape[2 + i]
            view = [1] * spatial_dims
            view[i] = size
            index = torch.arange(0, size, dtype=ddf.dtype, device=ddf.device).view(view)
            coords.append((index + ddf[:, i]) * 2 / max(size - 1, 1) - 1)
        grid = torch.stack(coords, dim=-1)
        # TorchScript compiles only the first branch of an "is_scripting() or ..." test
        if torch.jit.is_scripting() or not self.batch_split:
            return F.grid_sample(image, grid, mode=self._interp_mode_native, padding_mode=self._padding_mode_native,
                                 align_corners=True)
        return self._sample_in_halves(image, grid)

    @torch.jit.unused
    def _sample_in_halves(self, image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return sample_in_halves(image, grid, self._interp_mode_native, self._padding_mode_native)


class ScriptableDVF2DDF(DVF2DDF):
    """MONAI :class:`~monai.networks.blocks.DVF2DDF` (scaling and squaring) warping with
    :class:`ScriptableWarp`, so that TorchScript can compile it; the same computation."""

    def __init__(self, num_steps: int = INTEGRATION_STEPS, mode: str = "bilinear", padding_mode: str = "zeros",
                 batch_split: bool = False) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(num_steps=num_steps, mode=mode, padding_mode=padding_mode)
        self.warp_layer = ScriptableWarp(mode=mode, padding_mode=padding_mode, batch_split=batch_split)
