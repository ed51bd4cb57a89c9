"""EOIR as the authors wrote it, restated in plain torch: the straightforward implementation
in their module layout, for comparison (not used by inference or training).

Written from the authors' published architecture without MONAI: explicit
``grid_sample`` with identity grids stored per level, like the authors' ``SpatialTransformer``,
and every level's features kept (so its ``state_dict`` has their exact keys, grid buffers
included). The tests check that :class:`scripts.network.EOIR` gives its field for the same
weights; ``python -m scripts.benchmark --paths reference,lean,authors`` times it beside the
bundle's paths (:func:`from_eoir` copies an ``EOIR``'s weights into it). Sizes must be
multiples of 16 (no padding here).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..convert_checkpoint import GRID_BUFFER_KEY, bundle_key


class ConvBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.layer = nn.Sequential(nn.Conv3d(cin, cout, 3, 1, 1), nn.InstanceNorm3d(cout), nn.PReLU())

    def forward(self, x):
        return self.layer(x)


class DispWarp(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.disp_field_fea = nn.Sequential(
            nn.Conv3d(2 * n, 2 * n, 3, 1, 1), nn.ReLU(), nn.Conv3d(2 * n, 27, 3, 1, 1), nn.ReLU()
        )
        self.get_flow = nn.Conv3d(27, 3, 3, 1, 1)

    def forward(self, x, y):
        return self.get_flow(self.disp_field_fea(torch.cat([y + x, y - x], 1)))


class SpatialTransformer(nn.Module):
    def __init__(self, size):
        super().__init__()
        grids = torch.meshgrid([torch.arange(0, s) for s in size], indexing="ij")
        self.register_buffer("grid", torch.stack(grids).unsqueeze(0).float())

    def forward(self, src, flow):
        new = self.grid + flow
        shape = flow.shape[2:]
        new = torch.stack([2 * (new[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], 1)
        new = new.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
        return F.grid_sample(src, new, align_corners=True, mode="bilinear", padding_mode="zeros")


class VecInt(nn.Module):
    def __init__(self, size, nsteps=7):
        super().__init__()
        self.nsteps = nsteps
        self.transformer = SpatialTransformer(size)

    def forward(self, vec):
        vec = vec / 2**self.nsteps
        for _ in range(self.nsteps):
            vec = vec + self.transformer(vec, vec)
        return vec


class AuthorsEOIR(nn.Module):
    def __init__(self, start_channel, size):
        super().__init__()
        n = start_channel
        self.simple_encoder = nn.Sequential(ConvBlock(1, n), ConvBlock(n, 2 * n), ConvBlock(2 * n, n))
        sizes = [tuple(s // 2**level for s in size) for level in range(5)]
        for level in range(5):
            setattr(self, f"disp_warp_{level}", DispWarp(n))
        self.transformers = nn.ModuleList([SpatialTransformer(s) for s in sizes])
        self.integrates = nn.ModuleList([VecInt(s) for s in sizes])

    def forward(self, moving, fixed):
        x = self.simple_encoder(moving)
        y = self.simple_encoder(fixed)
        xs, ys = [x], [y]
        for _ in range(4):
            xs.append(F.interpolate(xs[-1], scale_factor=0.5, mode="trilinear", align_corners=True))
            ys.append(F.interpolate(ys[-1], scale_factor=0.5, mode="trilinear", align_corners=True))
        up = None
        for level in (4, 3, 2, 1, 0):
            x = xs[level] if up is None else self.transformers[level](xs[level], up)
            v = getattr(self, f"disp_warp_{level}")(x, ys[level])
            u = self.integrates[level](v)
            if up is not None:
                u = u + self.transformers[level](up, u)
            if level:
                up = 2 * F.interpolate(u, scale_factor=2, mode="trilinear", align_corners=True)
        return u


def from_eoir(net, size) -> AuthorsEOIR:
    """An :class:`AuthorsEOIR` for volumes of ``size`` with the weights of ``net`` (an ``EOIR``):
    the inverse of :func:`scripts.convert_checkpoint.convert_state_dict`'s key mapping."""
    if any(s % 16 for s in size):
        raise ValueError(f"the authors' layout needs sizes that are multiples of 16, got {tuple(size)}")
    ours = net.state_dict()
    model = AuthorsEOIR(int(ours["encoder.0.conv.weight"].shape[0]), tuple(size))
    state = model.state_dict()
    for key in state:
        if GRID_BUFFER_KEY.match(key):
            continue
        state[key] = ours[bundle_key(key)].detach().clone()
    model.load_state_dict(state, strict=True)
    return model.eval()
