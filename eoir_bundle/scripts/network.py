"""EOIR: Encoder-Only Image Registration network.

Reference:
    Chen et al., "Encoder-Only Image Registration", IEEE TCSVT 2026, arXiv:2509.00451;
    LUMIR 2024 solution: Zhang et al., arXiv:2409.00917 (MIT-licensed code by the authors;
    this is an independent re-implementation that loads their published weights after
    ``python -m scripts.convert_checkpoint``).

Conventions (the same as MONAI's ``Warp`` and the LUMIR challenge):
    - tensors are ``(B, C, D0, D1, D2)``; the input is ``cat([moving, fixed], dim=1)`` with
      intensities in ``[0, 1]`` (LUMIR uint8 / 255);
    - the output is a dense displacement field ``ddf`` of shape ``(B, 3, D0, D1, D2)`` in
      **voxel units**, channel ``i`` = shift along array axis ``i``, such that
      ``warped_moving(p) = moving(p + ddf(p))`` (trilinear, ``align_corners=True``);
    - inside the network, warping pads with **zeros** (as the authors do) and velocities are
      integrated by scaling and squaring in 7 steps.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from monai.networks.blocks import Convolution
from torch import nn

from .inverse import invert_levels
from .layers import INTEGRATION_STEPS, ScriptableDVF2DDF, ScriptableWarp, crop_padding, pad_to_multiple, padding_to_multiple

__all__ = ["EOIR", "FlowEstimator", "MultiScaleOutputs", "NUM_LEVELS", "INTEGRATION_STEPS"]

NUM_LEVELS = 5
_DIVISOR = 2 ** (NUM_LEVELS - 1)  # 16: every pyramid level halves the size


def _encoder_block(in_channels: int, out_channels: int) -> Convolution:
    """Conv3d(k3, p1, bias) -> InstanceNorm3d (no affine, no running stats) -> PReLU (one slope)."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=3,
        act=("prelu", {"num_parameters": 1}),
        norm=("instance", {"affine": False, "track_running_stats": False}),
        adn_ordering="NA",
    )


class FlowEstimator(nn.Module):
    """One pyramid level's velocity estimator.

    ``v = conv(relu(conv(relu(conv(cat(y + x, y - x))))))``: ``2N -> 2N -> 27 -> 3`` channels,
    3x3x3 kernels. ``x`` are the (already warped) moving features, ``y`` the fixed features.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            Convolution(3, 2 * channels, 2 * channels, kernel_size=3, act="relu", norm=None),
            Convolution(3, 2 * channels, 27, kernel_size=3, act="relu", norm=None),
        )
        self.flow = Convolution(3, 27, 3, kernel_size=3, conv_only=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.flow(self.features(torch.cat([y + x, y - x], dim=1)))


class EOIR(nn.Module):
    """EOIR registration network: a shared 3-layer encoder and five coarse-to-fine flow estimators.

    Both images go through the encoder (``1 -> N -> 2N -> N`` channels) as one batch; the
    features form a 5-level pyramid (trilinear x0.5, ``align_corners=True``). From the
    coarsest level (4) to the finest (0), each level warps the moving features by the
    upsampled field of the coarser level, estimates a stationary velocity ``v_l``,
    integrates it (``DVF2DDF``, 7 steps) to ``phi_l`` and composes
    ``u_l = phi_l + warp(u_up, phi_l)``; ``u_up = 2 * upsample_x2(u_l)`` feeds the next level.

    Args:
        start_channel: ``N``, the encoder width (32 in the LUMIR submission, 16 in the
            authors' training script).

    ``forward`` returns the full-resolution ``ddf``; :meth:`pyramid` returns every level (what
    the multi-scale training loss needs; see :class:`MultiScaleOutputs`). The module compiles
    with ``torch.jit.script`` (``monai.bundle ckpt_export``, any input size).
    Sizes that are not multiples of 16 are zero-padded symmetrically and the field is
    cropped back (padding does not change voxel-unit displacements).

    Example::

        >>> net = EOIR(start_channel=8).eval()
        >>> moving, fixed = torch.rand(1, 1, 32, 48, 32), torch.rand(1, 1, 32, 48, 32)
        >>> with torch.no_grad():
        ...     ddf = net(torch.cat([moving, fixed], dim=1))
        >>> ddf.shape
        torch.Size([1, 3, 32, 48, 32])
        >>> warped = Warp(padding_mode="zeros")(moving, ddf)
    """

    def __init__(self, start_channel: int = 32) -> None:
        super().__init__()
        n = int(start_channel)
        if n < 1:
            raise ValueError(f"start_channel must be a positive integer, got {start_channel}")
        self.start_channel = n
        # TorchScript reads module attributes, not module-level globals
        self.num_levels, self.divisor = NUM_LEVELS, _DIVISOR
        self.encoder = nn.Sequential(_encoder_block(1, n), _encoder_block(n, 2 * n), _encoder_block(2 * n, n))
        self.estimators = nn.ModuleList([FlowEstimator(n) for _ in range(NUM_LEVELS)])
        for est in self.estimators:  # start near the identity: tiny flow weights, zero bias
            nn.init.normal_(est.flow.conv.weight, 0.0, 1e-5)
            nn.init.zeros_(est.flow.conv.bias)
        # MONAI's Warp/DVF2DDF default to "border" padding; the authors' transformer pads with
        # zeros (torch grid_sample's default), and the published weights expect it. The
        # Scriptable* subclasses compute what MONAI's layers compute, in a form that
        # torch.jit.script (ckpt_export) accepts; they hold no parameters or buffers.
        self.warp = ScriptableWarp(mode="bilinear", padding_mode="zeros")
        self.integrate = ScriptableDVF2DDF(num_steps=INTEGRATION_STEPS, mode="bilinear", padding_mode="zeros")

    @staticmethod
    def downsample(x: torch.Tensor) -> torch.Tensor:
        """Next pyramid level: trilinear x0.5, ``align_corners=True``."""
        return F.interpolate(x, scale_factor=0.5, mode="trilinear", align_corners=True)

    @staticmethod
    def upsample_field(u: torch.Tensor) -> torch.Tensor:
        """A level's displacement on the next finer level: ``2 * trilinear_x2(u)`` (voxel units double)."""
        return 2.0 * F.interpolate(u, scale_factor=2.0, mode="trilinear", align_corners=True)

    def estimate(self, level: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``self.estimators[level](x, y)``, written so that TorchScript compiles it (it indexes a
        ``ModuleList`` only with literal constants and cannot iterate one backwards)."""
        v = torch.empty(0)
        for i, estimator in enumerate(self.estimators):
            if i == level:
                v = estimator(x, y)
        return v

    def level_step(self, level: int, x: torch.Tensor, y: torch.Tensor,
                   up: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One pyramid level: ``(v, u)`` from features ``x`` (moving), ``y`` (fixed) and the
        upsampled coarser field ``up`` (None at the coarsest level)."""
        if up is not None:  # sampled in the field's precision, handed on in the features'
            x = self.warp(x.to(up.dtype), up).to(x.dtype)
        # fields in at least float32 from here on: under autocast (or in a half-precision
        # model) the convolutions give bf16/fp16, and integrating or composing fields in
        # those would cost up to voxels of accuracy
        v = self.estimate(level, x, y)
        v = v.to(torch.promote_types(v.dtype, torch.float32))
        u = self.integrate(v)
        if up is not None:
            u = u + self.warp(up, u)
        return v, u

    def _checkpointed_encoder(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        # each image alone (InstanceNorm is per instance: the same result as one batch of two)
        run = [torch.utils.checkpoint.checkpoint(self.encoder, img, use_reentrant=False) for img in (moving, fixed)]
        return torch.cat(run, dim=0)

    def _checkpointed_level(self, level: int, x: torch.Tensor, y: torch.Tensor,
                            up: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.utils.checkpoint.checkpoint(self.level_step, level, x, y, up, use_reentrant=False)

    def pyramid(self, moving: torch.Tensor, fixed: torch.Tensor, activation_checkpointing: bool = False,
                finest_level: int = 0) -> dict[str, list[torch.Tensor]]:
        """All levels: ``{"velocities": [v_0..v_4], "displacements": [u_0..u_4]}`` (level 0 first).

        ``activation_checkpointing`` (training only): keep only the encoder's input and output
        and each level's ``(v, u)`` for the backward pass and recompute the rest there
        (``torch.utils.checkpoint``): the same values and gradients for one more forward pass,
        and a fraction of the activation memory (see ``scripts.tools.benchmark_train_step``).
        ``finest_level`` ``k > 0``: stop after level ``k``; the lists then hold levels ``k..4``
        (index 0 = level ``k``).
        """
        b = moving.shape[0]
        # TorchScript compiles only the first branch of each "is_scripting() or ..." test
        if torch.jit.is_scripting() or not activation_checkpointing:
            feats = [self.encoder(torch.cat([moving, fixed], dim=0))]
        else:
            feats = [self._checkpointed_encoder(moving, fixed)]
        for _ in range(self.num_levels - 1):
            feats.append(self.downsample(feats[-1]))
        velocities: list[torch.Tensor] = []
        displacements: list[torch.Tensor] = []
        up: Optional[torch.Tensor] = None
        for level in range(self.num_levels - 1, finest_level - 1, -1):
            x, y = feats[level][:b], feats[level][b:]
            if torch.jit.is_scripting() or not activation_checkpointing:
                v, u = self.level_step(level, x, y, up)
            else:
                v, u = self._checkpointed_level(level, x, y, up)
            velocities.insert(0, v)
            displacements.insert(0, u)
            if level > finest_level:
                up = self.upsample_field(u)
        return {"velocities": velocities, "displacements": displacements}

    def _padded_input(self, x: torch.Tensor, finest_level: int) -> Tuple[torch.Tensor, List[int], List[int]]:
        """``(x padded to a multiple of 16, pads, spatial shape)``, after checking ``x`` and ``finest_level``."""
        if x.dim() != 5 or x.shape[1] != 2:
            raise ValueError("EOIR expects (B, 2, D0, D1, D2) = cat([moving, fixed], 1)")
        if finest_level < 0 or finest_level >= self.num_levels:
            raise ValueError(f"finest_level must be in 0..{self.num_levels - 1}, got {finest_level}")
        shape = [x.shape[2], x.shape[3], x.shape[4]]
        pads = padding_to_multiple(shape, self.divisor)
        return pad_to_multiple(x, pads), pads, shape

    def forward(self, x: torch.Tensor, finest_level: int = 0) -> torch.Tensor:
        """``ddf`` of the pair(s) ``x = cat([moving, fixed], 1)``.

        ``finest_level`` (0-4; default 0 = the whole network): run the coarse-to-fine levels
        down to this one only, and bring its composed displacement to the input grid with
        :meth:`upsample_field` (once per skipped level). That is the network's field with the
        finer levels' velocities taken as zero, at the cost of the coarser levels: instance
        optimisation's warm start reads the field on a coarse grid only, where the finest
        levels' detail does not matter (see ``scripts.instance_optimization``).
        """
        x, pads, shape = self._padded_input(x, finest_level)
        ddf = self.pyramid(x[:, :1], x[:, 1:], False, finest_level)["displacements"][0]
        for _ in range(finest_level):
            ddf = self.upsample_field(ddf)
        return crop_padding(ddf, pads, shape)

    def forward_with_inverse(self, x: torch.Tensor, finest_level: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ddf, inverse)``: :meth:`forward`'s field (the same values) and the displacement of its
        inverse map on the same grid, composed in reverse order from the levels' velocities
        (:func:`scripts.inverse.invert_levels`: ``exp(-v_l)`` by this network's own integration,
        warp and upsampling). ``inverse(p + ddf(p)) = -ddf(p)`` up to interpolation."""
        x, pads, shape = self._padded_input(x, finest_level)
        out = self.pyramid(x[:, :1], x[:, 1:], False, finest_level)
        ddf = out["displacements"][0]
        inverse = invert_levels(out["velocities"], self.integrate, self.warp, self.upsample_field)
        for _ in range(finest_level):
            ddf, inverse = self.upsample_field(ddf), self.upsample_field(inverse)
        return crop_padding(ddf, pads, shape), crop_padding(inverse, pads, shape)

class MultiScaleOutputs(nn.Module):
    """Training view of an :class:`EOIR`: in training mode ``forward`` returns every level,
    ``{"ddf": u_0, "velocities": [v_0..v_4], "displacements": [u_0..u_4]}`` (level 0 first,
    each field in voxel units of its own level; sizes must be multiples of 16); in eval mode
    it returns the ``ddf`` like the network itself (``finest_level`` as in :meth:`EOIR.forward`;
    training ignores it), so one module serves a trainer and its
    validation evaluator. It holds no parameters of its own: checkpoint ``net``.
    ``activation_checkpointing``: recompute activations in the backward pass instead of
    keeping them (see :meth:`EOIR.pyramid`); for full-size training on a small GPU.
    """

    def __init__(self, net: EOIR, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.net = net
        self.activation_checkpointing = bool(activation_checkpointing)

    def forward(self, x: torch.Tensor, finest_level: int = 0):
        if not self.training:
            return self.net(x, finest_level)
        if x.ndim != 5 or x.shape[1] != 2 or any(s % _DIVISOR for s in x.shape[2:]):
            raise ValueError(f"training needs (B, 2, D0, D1, D2) with sizes multiple of {_DIVISOR}, got {tuple(x.shape)}")
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        out = self.net.pyramid(x[:, :1], x[:, 1:], activation_checkpointing=checkpointing)
        return {"ddf": out["displacements"][0], "velocities": out["velocities"], "displacements": out["displacements"]}
