"""Inter-subject pairs of different real brains (``scripts.synthetic.inter_subject``), and the
IO default on such a pair.

The real scan is the ds000031 T1w of the pydeface 2.1.0 source archive (the copy in
``tests/data``, which the builder's ``--fetch`` downloads at full resolution); the other brain is
the MNI152 template of nilearn. Small grid: fast."""

from __future__ import annotations

import contextlib
import io
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE

from scripts.synthetic.lumir import NUM_LABELS, grid_affine

SHAPE = (64, 96, 80)  # 2.5 x 2.3 x 2.4 mm voxels over LUMIR's field of view


@pytest.fixture(scope="module")
def scan():
    """The ds000031 scan of the pydeface source archive, as kept in tests/data (averaged to ~2 mm)."""
    path = BUNDLE.parent / "tests" / "data" / "ds000031_sub-01_T1w_2mm.nii.gz"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def pairs_dir(scan, tmp_path_factory):
    from scripts.synthetic.inter_subject import main

    out = tmp_path_factory.mktemp("inter") / "inter_subject"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        path = main([str(out), "--scan", f"ds000031={scan}", "--shape", ",".join(map(str, SHAPE))])
    assert path == out / "LUMIR_dataset.json"
    return out


def test_writes_layout_labels_and_both_ordered_pairs(pairs_dir):
    from scripts.data.lists import evaluation_pairs

    names = [f"LUMIRMRI_{i:04d}_0000.nii.gz" for i in range(2)]
    assert sorted(p.name for p in (pairs_dir / "imagesVal").iterdir()) == names
    assert sorted(p.name for p in (pairs_dir / "labelsVal").iterdir()) == names
    assert not (pairs_dir / "landmarksVal").exists()  # no true landmark correspondence between brains
    assert not (pairs_dir / "LUMIR_VAL_Landmark_evaluation_config.json").exists()
    items = evaluation_pairs(pairs_dir / "LUMIR_dataset.json", pairs_dir)
    assert [(i["moving"].split("/")[-1], i["fixed"].split("/")[-1]) for i in items] == [
        (names[1], names[0]), (names[0], names[1])]
    assert all("fixed_label" in i and "moving_label" in i and "moving_landmarks" not in i for i in items)
    config = json.loads((pairs_dir / "LUMIR_VAL_Segmentation_evaluation_config.json").read_text())
    assert config["expected_shape"] == [*SHAPE, 3] and len(config["eval_pairs"]) == 2
    dataset = json.loads((pairs_dir / "LUMIR_dataset.json").read_text())
    assert [b["name"] for b in dataset["brains"].values()] == ["mni152", "ds000031"]
    assert "PDDL" in dataset["brains"][names[1]]["licence"]
    quality = json.loads((pairs_dir / "brains" / "ds000031" / "quality.json").read_text())
    assert quality["brain_dice"] > 0.75, quality  # the affine registration found the brain

    labels = []
    for name in names:
        img = nib.load(str(pairs_dir / "imagesVal" / name))
        assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, grid_affine(SHAPE))
        lab = np.asarray(nib.load(str(pairs_dir / "labelsVal" / name)).dataobj)
        x = np.asarray(img.dataobj)
        assert set(np.unique(lab)) <= set(range(NUM_LABELS + 1)) and len(np.unique(lab)) > 25
        assert ((lab > 0) == (x > 0)).mean() > 0.98  # labels cover the brain, background is 0
        labels.append(lab)
    # two different brains: their labels overlap far from perfectly before registration
    both = [v for v in range(1, NUM_LABELS + 1) if (labels[0] == v).any() and (labels[1] == v).any()]
    dice = np.mean([2 * ((labels[0] == v) & (labels[1] == v)).sum() / ((labels[0] == v).sum() + (labels[1] == v).sum())
                    for v in both])
    assert 0.3 < dice < 0.9, dice


def test_default_io_refines_the_network_on_a_real_pair(pairs_dir):
    """The default IO (``io_init select``: keeps the network's full-resolution field where that
    matches better) on a real inter-subject pair improves the network alone's Dice by at least
    0.02, without folding; ``io_iterations 0`` is the network's field bit for bit. The test grid
    has ~2.4 mm voxels, so IO's loss runs on it (``io_level 0``), as the default's loss runs on the
    2 mm level of LUMIR's 1 mm grid (measured: network 0.618, IO 0.663)."""
    from scripts.checkpoint import load_weights, read_checkpoint, start_channel_of
    from scripts.data.lists import evaluation_pairs
    from scripts.evaluation.metrics import dice_per_label, jacobian_stats, warp_nearest
    from scripts.instance_optimization import InstanceOptimizationInferer
    from scripts.lean import LeanEOIR
    from scripts.network import EOIR
    from scripts.tools.compare_methods import inference_settings, load_pair

    torch.set_num_threads(2)
    ckpt = BUNDLE / "models" / "model.pt"
    net = LeanEOIR(load_weights(EOIR(start_channel=start_channel_of(read_checkpoint(ckpt))), ckpt)).eval()
    config = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    pair = load_pair(evaluation_pairs(pairs_dir / "LUMIR_dataset.json", pairs_dir)[0])
    x = torch.tensor(np.stack([pair["moving"], pair["fixed"]])[None], dtype=torch.float32) / 255.0
    labels = [v for v in range(1, NUM_LABELS + 1) if (pair["fixed_label"] == v).any()]

    def dice(ddf):
        disp = ddf[0].permute(1, 2, 3, 0).numpy()
        warped = warp_nearest(pair["moving_label"], disp)
        return float(np.mean(list(dice_per_label(pair["fixed_label"], warped, labels).values()))), disp

    with torch.no_grad():
        u_net = net(x)
        same = InstanceOptimizationInferer(io_iterations=0, **inference_settings())(x, net)
        refined = InstanceOptimizationInferer(io_iterations=config["io_iterations"],
                                              **{**inference_settings(), "io_level": 0})(x, net)
    assert torch.equal(same, u_net)  # io_iterations 0: the network's field, bit for bit
    d_net, _ = dice(u_net)
    d_io, disp = dice(refined)
    print(f"Dice: network {d_net:.4f}, network + default IO at io_level 0 {d_io:.4f}")
    assert d_io >= d_net + 0.02, (d_io, d_net)
    assert jacobian_stats(disp)[1] < 0.01
