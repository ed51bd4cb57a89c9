"""Test-time instance optimisation (scripts/instance_optimization.py) and its config ids."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, input_error_of, lumir_folder, run_workflow, tiny_checkpoint
from monai.bundle import ConfigParser
from monai.networks.blocks import Warp

from scripts.checkpoint import load_weights
from scripts.errors import InputError
from scripts.instance_optimization import InstanceOptimizationInferer, level_window, resize_field, split_iterations
from scripts.losses import local_ncc_loss
from scripts.synthetic.lumir import NUM_LABELS, random_subject, template_volumes
from scripts.network import EOIR
from scripts.evaluation.metrics import dice_per_label, ndv, warp_nearest

SHAPE = (32, 48, 32)
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model8.pt")


@pytest.fixture(scope="module")
def pair():
    """A synthetic pair with known anatomy: two random warps of the template (moving, fixed)."""
    t1, labels, _ = template_volumes(SHAPE)
    mi, ml, _, _ = random_subject(t1, labels, rng=3)
    fi, fl, _, _ = random_subject(t1, labels, rng=4)
    x = torch.from_numpy(np.stack([mi, fi]).astype(np.float32) / 255.0)[None]
    return x, mi, ml, fl


def _identity_eoir():
    net = EOIR(start_channel=4)
    with torch.no_grad():
        for est in net.estimators:
            est.flow.conv.weight.zero_()
    return net.eval()


def test_zero_iterations_is_the_network_exactly(ckpt, pair):
    x = pair[0]
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    with torch.no_grad():
        expected = net(x)
        got = InstanceOptimizationInferer(io_iterations=0)(x, net)
    assert expected.abs().max() > 0.05  # a real field, not zeros
    assert torch.equal(got, expected)


def _scores(x, ddf, mi, ml, fl):
    disp = ddf[0].permute(1, 2, 3, 0).numpy()
    dice = np.nanmean(list(dice_per_label(fl, warp_nearest(ml, disp), range(1, NUM_LABELS + 1), moving_lab=ml).values()))
    warped = Warp(padding_mode="zeros")(x[:, :1], ddf)
    ncc = 1.0 - float(local_ncc_loss(warped, x[:, 1:], window=9))
    return dice, ncc, ndv(disp, mi)


@pytest.mark.parametrize("io_init", ["warm_start", "compose"])
def test_io_improves_ncc_and_dice_and_stays_diffeomorphic(pair, io_init):
    x, mi, ml, fl = pair
    net = _identity_eoir()
    params = [p.clone() for p in net.parameters()]
    # the default levels (1 and 2) are meant for 1 mm grids; this 5 mm grid needs levels 0 and 1
    inferer = InstanceOptimizationInferer(io_iterations=30, io_level=0, io_levels=2, io_init=io_init)
    with torch.no_grad():  # as MONAI's evaluator calls it
        base = net(x)
        ddf = inferer(x, net)
    assert ddf.shape == (1, 3, *SHAPE) and not ddf.requires_grad
    dice0, ncc0, _ = _scores(x, base, mi, ml, fl)
    dice1, ncc1, ndv1 = _scores(x, ddf, mi, ml, fl)
    assert ncc1 > ncc0 + 0.05, (ncc0, ncc1)
    assert dice1 > dice0 + 0.05, (dice0, dice1)
    assert ndv1 < 0.01, ndv1  # percent
    stats = inferer.last_stats
    assert stats["stages"] == [(1, 24), (0, 6)]  # coarse to fine, 4:1
    assert stats["loss_after"] < stats["loss_before"] and stats["ncc_after"] < stats["ncc_before"]
    assert all(torch.equal(a, b) for a, b in zip(params, net.parameters()))  # the network stays frozen
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("io_init", ["warm_start", "compose"])
def test_io_starts_from_the_networks_field(pair, io_init):
    """With a negligible step, either mode returns (about) the network's own nonzero field."""
    x = pair[0]
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=g)
    u = torch.nn.functional.interpolate(coarse, size=tuple(x.shape[2:]), mode="trilinear", align_corners=True)
    u = 2.0 * u / u.abs().max()  # a smooth field of up to 2 voxels
    inferer = InstanceOptimizationInferer(io_iterations=1, io_learning_rate=1e-6, io_level=0, io_levels=1, io_init=io_init)
    with torch.no_grad():
        ddf = inferer(x, lambda _x: u)
    inner = (slice(None), slice(None), *[slice(6, n - 6) for n in x.shape[2:]])  # away from zero-padded borders
    # warm start: exp(u) ~ u up to second-order terms; compose: exactly u (v ~ 0)
    assert float((ddf - u)[inner].abs().max()) < 0.3 * float(u[inner].abs().max())


def test_warm_start_runs_the_network_down_to_io_network_level(ckpt, pair):
    """Warm start asks the network for ``finest_level=io_network_level`` (when it takes it), and
    IO from that start matches IO from the whole network's field; compose runs the whole network."""
    x = pair[0]
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    calls = []

    def spy(inputs, **kwargs):
        calls.append(kwargs)
        return net(inputs, **kwargs)

    def plain(inputs, **kwargs):  # a callable whose signature has no finest_level
        calls.append(("plain", kwargs))
        return net(inputs)

    spy.forward = net.forward  # what the inferer inspects: EOIR.forward takes finest_level
    kw = dict(io_iterations=20, io_level=0, io_levels=2)
    with torch.no_grad():
        short = InstanceOptimizationInferer(io_network_level=1, **kw)(x, spy)
        whole = InstanceOptimizationInferer(io_network_level=0, **kw)(x, spy)
        InstanceOptimizationInferer(io_network_level=1, io_init="compose", **kw)(x, spy)
        InstanceOptimizationInferer(io_network_level=1, **kw)(x, lambda t: plain(t))
        skipped = float((net(x) - net(x, finest_level=1)).abs().max())
    assert calls == [{"finest_level": 1}, {}, {}, ("plain", {})]
    assert skipped > 0.05  # level 0 does change the network's field
    (d_short, n_short, _), (d_whole, n_whole, _) = (_scores(x, ddf, *pair[1:]) for ddf in (short, whole))
    assert abs(d_short - d_whole) < 0.01 and abs(n_short - n_whole) < 0.01, (d_short, d_whole, n_short, n_whole)


def test_works_under_inference_mode_with_a_trained_like_network(ckpt, pair):
    x = pair[0]
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    inferer = InstanceOptimizationInferer(io_iterations=3, exact_gradient=True)
    with torch.inference_mode():
        base = net(x)
        ddf = inferer(x, net)
    assert ddf.shape == base.shape and torch.isfinite(ddf).all()
    assert not torch.equal(ddf, base)  # refined
    assert inferer.last_stats["loss_after"] < inferer.last_stats["loss_before"]


def test_small_images_use_the_levels_that_fit():
    inferer = InstanceOptimizationInferer(io_iterations=5, io_level=1, io_levels=3)
    assert inferer.stages((160, 224, 192)) == [(3, 4), (2, 1), (1, 0)]
    assert inferer.stages((32, 48, 32)) == [(2, 4), (1, 1)]  # level 3's velocity grid would be 2x3x2
    assert inferer.stages((12, 16, 10)) == [(0, 5)]
    x = torch.rand(1, 2, 12, 16, 10)
    ddf = inferer(x, lambda t: torch.zeros(1, 3, *t.shape[2:]))
    assert ddf.shape == (1, 3, 12, 16, 10) and inferer.last_stats["stages"] == [(0, 5)]
    assert split_iterations(50, 2) == [40, 10] and split_iterations(3, 1) == [3]


def test_resize_field_keeps_physical_displacements_and_windows():
    u = torch.ones(1, 3, 17, 33, 9) * torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1, 1)
    half = resize_field(u, (9, 17, 5))
    torch.testing.assert_close(half[0, :, 0, 0, 0], torch.tensor([1.0, 2.0, 4.0]))
    assert resize_field(u, (17, 33, 9)) is u
    assert [level_window(9, lv) for lv in range(4)] == [9, 5, 3, 3]


@pytest.mark.parametrize("kwargs, expect", [
    ({"io_iterations": 2.5}, "io_iterations must be an integer >= 0, got 2.5"),
    ({"io_iterations": -1}, "io_iterations must be an integer >= 0, got -1"),
    ({"io_iterations": True}, "io_iterations must be an integer >= 0"),
    ({"io_learning_rate": 0}, "io_learning_rate must be a finite number > 0"),
    ({"io_reg_weight": -1.0}, "io_reg_weight must be a finite number >= 0"),
    ({"io_level": -1}, "io_level must be an integer >= 0"),
    ({"io_levels": 0}, "io_levels must be an integer >= 1"),
    ({"io_ncc_window": 4}, "io_ncc_window must be an odd integer >= 1"),
    ({"io_init": "zero"}, "io_init must be one of warm_start, compose"),
    ({"io_network_level": 5}, "io_network_level must be an integer in 0..4, got 5"),
    ({"io_network_level": 1.5}, "io_network_level must be an integer in 0..4, got 1.5"),
])
def test_bad_knobs(kwargs, expect):
    with pytest.raises(InputError, match=expect.replace(".", r"\.")):
        InstanceOptimizationInferer(**kwargs)
    assert InstanceOptimizationInferer(io_iterations=50.0).io_iterations == 50


def _infer(ckpt, tmp_path, **kw):
    data_json = lumir_folder(tmp_path / "data")
    return dict(ckpt_path=str(ckpt), output_dir=str(tmp_path / "out"), dataset_dir=str(tmp_path / "data"),
                data_list_file_path=str(data_json), preprocess="off", **{"network_def#start_channel": 8}, **kw)


def test_config_ids_from_the_command_line(tmp_path, ckpt):
    """``monai.bundle run inference --config_file configs/inference.json --io_iterations 5 ...``"""
    run_workflow("inference.json", **_infer(ckpt, tmp_path, io_iterations=5, io_level=1, io_levels=1))
    out = tmp_path / "out" / "disp_3455_3454.nii.gz"
    disp = np.asarray(nib.load(str(out)).dataobj)
    assert disp.shape == (32, 48, 32, 3) and np.isfinite(disp).all()
    # and it is not the network's own field
    moving = nib.load(str(tmp_path / "data/imagesVal/LUMIRMRI_3454_0000.nii.gz")).get_fdata() / 255.0
    fixed = nib.load(str(tmp_path / "data/imagesVal/LUMIRMRI_3455_0000.nii.gz")).get_fdata() / 255.0
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    with torch.no_grad():
        ddf = net(torch.tensor(np.stack([moving, fixed])[None], dtype=torch.float32))[0]
    assert np.abs(disp - ddf.permute(1, 2, 3, 0).numpy()).max() > 1e-3


@pytest.mark.parametrize("value", [2.5, -1])
def test_bad_io_iterations_from_the_command_line(tmp_path, ckpt, value):
    msg = input_error_of("inference.json", **_infer(ckpt, tmp_path, io_iterations=value))
    assert msg == f"io_iterations must be an integer >= 0, got {value}"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_bad_io_iterations_prints_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
         "--io_iterations", "2.5", "--output_dir", str(tmp_path / "out")],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "error: io_iterations must be an integer >= 0, got 2.5" in res.stderr


@pytest.mark.parametrize("files, key", [
    (["inference.json"], "inferer"),
    (["train.json", "evaluate.json"], "validate#inferer"),
])
def test_configs_use_the_io_inferer_with_their_ids(files, key):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f) for f in files])
    parser["bundle_root"] = str(BUNDLE)
    defaults = {k: parser[k] for k in ("io_iterations", "io_learning_rate", "io_reg_weight", "io_level", "io_levels",
                                       "io_init", "io_network_level")}
    assert defaults["io_iterations"] > 0  # users get the refinement by default
    parser["io_iterations"], parser["io_level"], parser["io_levels"] = 7, 2, 1
    inferer = parser.get_parsed_content(key)
    assert isinstance(inferer, InstanceOptimizationInferer)
    assert (inferer.io_iterations, inferer.io_level, inferer.io_levels) == (7, 2, 1)
    assert inferer.io_learning_rate == defaults["io_learning_rate"]
    assert inferer.io_reg_weight == defaults["io_reg_weight"]
    assert (inferer.io_init, inferer.io_network_level) == (defaults["io_init"], defaults["io_network_level"])


def test_select_keeps_the_result_with_the_higher_full_grid_ncc(ckpt, pair):
    """``io_init="select"``: compose and warm start from the whole network's field, and per pair
    the result whose warped moving image has the higher local NCC on the input grid."""
    x = pair[0]
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    kw = dict(io_iterations=12, io_level=0, io_levels=2)
    with torch.no_grad():
        results = {m: InstanceOptimizationInferer(io_init=m, io_network_level=0, **kw)(x, net) for m in ("compose", "warm_start")}
        inferer = InstanceOptimizationInferer(io_init="select", **kw)
        got = inferer(x, net)
    stats = inferer.last_stats
    scores = stats["ncc_full"]
    best = "compose" if scores["compose"][0] >= scores["warm_start"][0] else "warm_start"
    assert stats["selected"] == [best]
    assert torch.equal(got, results[best])
    for mode, ddf in results.items():
        warped = inferer.warp(x[:, :1], ddf)
        assert abs(1.0 - float(local_ncc_loss(warped, x[:, 1:], window=9)) - scores[mode][0]) < 1e-6
