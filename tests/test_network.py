"""EOIR network: parity with an independent statement of the authors' model, checkpoint
conversion from their exact layout, padding of odd sizes."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scripts.tools.authors_layout import AuthorsEOIR, from_eoir
from scripts.convert_checkpoint import convert_state_dict
from scripts.layers import ScriptableWarp
from scripts.network import EOIR, MultiScaleOutputs

SIZE = (32, 48, 32)


def _authors_model(n, seed=0):
    torch.manual_seed(seed)
    model = AuthorsEOIR(n, SIZE)
    with torch.no_grad():  # make the fields several voxels large so the test sees real warping
        for level in range(5):
            getattr(model, f"disp_warp_{level}").get_flow.weight.mul_(20.0)
        for block in model.simple_encoder:
            block.layer[2].weight.uniform_(0.05, 0.4)
    return model.eval()


def _pair(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *SIZE, generator=g), torch.rand(1, 1, *SIZE, generator=g)


@pytest.mark.parametrize("n", [8, 16])
def test_same_field_as_authors_model(n):
    authors = _authors_model(n)
    state, inferred = convert_state_dict(authors.state_dict())
    assert inferred == n
    net = EOIR(start_channel=n).eval()
    net.load_state_dict(state, strict=True)
    moving, fixed = _pair()
    with torch.no_grad():
        ref = authors(moving, fixed)
        ddf = net(torch.cat([moving, fixed], 1))
    assert ref.abs().max() > 1.0, "the test field should move voxels by more than one voxel"
    assert (ddf - ref).abs().max().item() < 1e-4


def test_from_eoir_is_the_inverse_mapping():
    """The benchmark's ``authors`` path gets an ``EOIR``'s weights, and with them its field."""
    authors = _authors_model(8)
    state, _ = convert_state_dict(authors.state_dict())
    net = EOIR(start_channel=8).eval()
    net.load_state_dict(state)
    back = from_eoir(net, SIZE)
    for key, value in authors.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    moving, fixed = _pair()
    with torch.no_grad():
        assert (back(moving, fixed) - net(torch.cat([moving, fixed], 1))).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="multiples of 16"):
        from_eoir(net, (30, 48, 32))


def test_no_grid_buffers_and_parameter_counts():
    for n, count in [(16, 294_272), (32, 909_232)]:
        net = EOIR(start_channel=n)
        assert sum(p.numel() for p in net.parameters()) == count
        assert sum(v.numel() for v in net.state_dict().values()) == count  # nothing but learned tensors


def test_training_outputs_are_the_level_fields():
    net = MultiScaleOutputs(EOIR(start_channel=8))
    moving, fixed = _pair()
    out = net(torch.cat([moving, fixed], 1))
    assert [tuple(v.shape[2:]) for v in out["velocities"]] == [tuple(s // 2**l for s in SIZE) for l in range(5)]
    assert out["ddf"] is out["displacements"][0]
    out["ddf"].sum().backward()
    assert net.net.estimators[4].flow.conv.weight.grad.abs().sum() > 0
    with torch.no_grad():  # eval mode: the plain field, identical to the network's
        assert torch.equal(net.eval()(torch.cat([moving, fixed], 1)), net.net(torch.cat([moving, fixed], 1)))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Recomputing activations in the backward pass changes memory, not results."""
    from scripts.tools.benchmark import build_network
    from scripts.training import PairLoss

    moving, fixed = _pair()
    x = torch.cat([moving, fixed], 1)
    runs, kept = [], []
    for checkpointing in (False, True):
        net = build_network(8, None, 0)  # seeded, with fields of several voxels
        model = MultiScaleOutputs(net, activation_checkpointing=checkpointing).train()
        saved = []  # bytes of the tensors autograd keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            pred = model(x)
        loss = PairLoss(ncc_weight=1.0, reg_weight=5.0)(pred, x)
        loss.backward()
        runs.append((loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}))
        kept.append(sum(saved))
    assert kept[1] < 0.25 * kept[0], kept
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert grads_a[k].abs().sum() > 0, k  # every parameter learns
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_odd_sizes_are_padded_and_cropped():
    net = _eoir_from_authors(8)
    moving, fixed = _pair()
    crop = (slice(None), slice(None), slice(1, 31), slice(3, 45), slice(0, 29))
    with torch.no_grad():
        ddf = net(torch.cat([moving, fixed], 1)[crop])
    assert ddf.shape == (1, 3, 30, 42, 29)
    assert torch.isfinite(ddf).all()


def test_fields_stay_float32_under_autocast():
    """Mixed precision (train.json ``amp``): the convolutions run in bf16, but each level's
    velocity is integrated and composed in float32, so the field stays near the float32 one."""
    authors = _authors_model(8)
    net = EOIR(start_channel=8).eval()
    net.load_state_dict(convert_state_dict(authors.state_dict())[0])
    moving, fixed = _pair()
    with torch.no_grad():
        ref = net(torch.cat([moving, fixed], 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net.pyramid(moving, fixed)
            ddf = net(torch.cat([moving, fixed], 1))
    assert all(t.dtype == torch.float32 for t in out["velocities"] + out["displacements"])
    assert ref.abs().max() > 2.0  # fields of several voxels, so the bound below means something
    assert ddf.dtype == torch.float32 and (ddf - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_models_in_other_precisions(dtype):
    """A network cast to bf16 runs (its fields in float32); one in float64 stays float64."""
    authors = _authors_model(8)
    net = EOIR(start_channel=8).eval()
    net.load_state_dict(convert_state_dict(authors.state_dict())[0])
    x = torch.cat(_pair(), 1)
    with torch.no_grad():
        ref = net(x)
        ddf = net.to(dtype)(x.to(dtype))
    assert ddf.dtype == torch.promote_types(dtype, torch.float32)
    bound = 1e-3 if dtype == torch.float64 else 0.1 * ref.abs().max()  # float64: float32's rounding
    assert (ddf.float() - ref).abs().max() < bound


@pytest.mark.parametrize("finest_level", [1, 2])
def test_finest_level_is_the_network_with_zero_finer_velocities(finest_level):
    """``forward(x, finest_level=k)`` = the whole network whose levels below ``k`` estimate zero
    velocity (so each of them only carries the upsampled coarser field)."""
    net = _eoir_from_authors(8)
    x = torch.cat(_pair(), 1)
    zeroed = _eoir_from_authors(8)
    with torch.no_grad():
        for level in range(finest_level):
            zeroed.estimators[level].flow.conv.weight.zero_()
            zeroed.estimators[level].flow.conv.bias.zero_()
        full, short, expected = net(x), net(x, finest_level=finest_level), zeroed(x)
    assert (short - expected).abs().max().item() < 1e-4
    assert (full - short).abs().max().item() > 0.1  # the skipped levels do change the field
    with pytest.raises(ValueError, match="finest_level must be in 0..4"):
        net(x, finest_level=5)


def _eoir_from_authors(n):
    net = EOIR(start_channel=n).eval()
    net.load_state_dict(convert_state_dict(_authors_model(n).state_dict())[0])
    return net


def test_convert_checkpoint_cli_round_trip(tmp_path, bundle_root):
    authors = _authors_model(8)
    src = tmp_path / "authors.pth"
    torch.save({"model_state_dict": authors.state_dict(), "epoch": 200}, src)
    assert any(k.endswith(".grid") for k in authors.state_dict())
    dst = tmp_path / "model.pt"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.convert_checkpoint", str(src), str(dst)],
        cwd=bundle_root, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "start_channel=8" in res.stdout
    state = torch.load(dst, weights_only=True)
    assert not any("grid" in k for k in state)
    net = EOIR(start_channel=8).eval()
    net.load_state_dict(state, strict=True)
    moving, fixed = _pair()
    with torch.no_grad():
        assert torch.allclose(net(torch.cat([moving, fixed], 1)), authors(moving, fixed), atol=1e-4)


def test_convert_checkpoint_rejects_foreign_checkpoint(tmp_path, bundle_root):
    src = tmp_path / "other.pth"
    torch.save({"model_state_dict": {"conv.weight": torch.zeros(3, 3)}}, src)
    dst = tmp_path / "out.pt"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.convert_checkpoint", str(src), str(dst)],
        cwd=bundle_root, capture_output=True, text=True,
    )
    assert res.returncode != 0
    assert str(src) in res.stderr and "Traceback" not in res.stderr
    assert not dst.exists()


def test_batch_split_warp_gives_the_plain_warps_values_and_gradients():
    """``ScriptableWarp(batch_split=True)`` (instance optimisation's two-thread sampling) is the same warp."""
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 2, 8, 10, 6, generator=g)
    ddf = (3 * torch.randn(1, 3, 8, 10, 6, generator=g))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    batches = []
    sample = F.grid_sample

    def counting_sample(img, *args, **kwargs):
        batches.append(img.shape[0])
        return sample(img, *args, **kwargs)

    try:
        results = []
        for split in (False, True):
            img, d = image.clone().requires_grad_(True), ddf.clone().requires_grad_(True)
            F.grid_sample = counting_sample
            try:
                out = ScriptableWarp(padding_mode="zeros", batch_split=split)(img, d)
            finally:
                F.grid_sample = sample
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            results.append((out, img.grad, d.grad))
    finally:
        torch.set_num_threads(threads)
    assert batches == [1, 2]  # the split path did run, as a batch of two halves
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert results[0][2].abs().max() > 0  # the displacement does get a gradient

