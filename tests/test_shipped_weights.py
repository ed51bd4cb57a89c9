"""The shipped weights (models/model.pt, trained by configs/train.json) register a held-out pair."""

import nibabel as nib
import numpy as np
import torch
from helpers import BUNDLE

from scripts.checkpoint import load_weights, read_checkpoint, start_channel_of
from scripts.network import EOIR
from scripts.evaluation.metrics import dice_per_label, ndv, warp_nearest

# a 96 x 128 x 96 box around the brain centre of the sample pair (synthetic seed 4242, never trained on)
BOX = (slice(32, 128), slice(48, 176), slice(40, 136))


def _load(kind, sid):
    return np.asarray(nib.load(str(BUNDLE / f"sample/{kind}/LUMIRMRI_{sid:04d}_0000.nii.gz")).dataobj)[BOX]


def test_shipped_weights_beat_zero_displacement_on_a_held_out_pair():
    state = read_checkpoint(BUNDLE / "models/model.pt")
    net = load_weights(EOIR(start_channel=start_channel_of(state)), BUNDLE / "models/model.pt").eval()
    moving, fixed = _load("imagesVal", 3).astype(np.float32), _load("imagesVal", 4).astype(np.float32)
    moving_lab, fixed_lab = _load("labelsVal", 3), _load("labelsVal", 4)
    with torch.no_grad():
        ddf = net(torch.tensor(np.stack([moving, fixed])[None] / 255.0))[0]
    disp = ddf.permute(1, 2, 3, 0).numpy()
    labels = [int(v) for v in np.unique(fixed_lab) if v > 0]

    def dice(d):
        return np.nanmean(list(dice_per_label(fixed_lab, warp_nearest(moving_lab, d), labels, moving_lab).values()))

    before, after = dice(np.zeros_like(disp)), dice(disp)
    assert after > before + 0.08, (before, after)
    assert ndv(disp, moving) < 0.01  # percent: diffeomorphic
