"""The lean CPU inference path gives EOIR's field; the benchmark CLI reports in its format."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scripts.lean import fixed as lean_fixed_module
from scripts.lean import forward as lean_forward_module
from scripts.lean.covers import EMPTY, FULL, Covers, keep_mask, rect_slices
from scripts.lean.encoder import Encoder, encode, encoder_peak
from scripts.lean.forward import LeanEOIR, default_store_limit, lean_forward
from scripts.lean.streams import RowStream
from scripts.network import EOIR


@pytest.fixture(autouse=True)
def _one_thread():
    """Exactness does not depend on threads; one thread keeps these tests fast on a busy machine
    (the two-thread path of the sampler is covered by ``test_wrapper_shares_weights_and_batches``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(n, seed=0):
    """Non-trivial weights: flow convolutions scaled up so fields move voxels by several voxels."""
    torch.manual_seed(seed)
    net = EOIR(start_channel=n).eval()
    with torch.no_grad():
        for est in net.estimators:
            est.flow.conv.weight.normal_(0.0, 0.08)
            est.flow.conv.bias.uniform_(-0.5, 0.5)
        for block in net.encoder:
            block.adn.A.weight.uniform_(0.05, 0.4)
    return net


def _input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 2, *shape, generator=g)


def _brain(shape=(24, 80, 64), seed=1, centre=(10.0, 42.0, 30.0)):
    """Random texture inside an ellipsoid, exactly zero outside (like skull-stripped MRI)."""
    x = _input(shape, seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s).float() for s in shape], indexing="ij"))
    radii = (6.0, 16.0, 14.0)
    inside = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) < 1
    return x * inside


@pytest.mark.parametrize(
    "make, rows, store_limit",
    [
        (lambda: _input((32, 48, 32)), 2, 1.75),  # dense: fixed split in 2 groups, moving recomputed
        (lambda: _input((30, 40, 33)), 1, 1.75),  # odd size: padded and cropped
        (lambda: _brain(), 2, 1.75),  # zero background: tiles, empty rows, groups of 1 and 4
        (lambda: _brain(), 3, 0.5),  # zero background, both images recomputed
        (lambda: _brain((32, 64, 48), centre=(12.0, 5.0, 42.0)), 2, 1.75),  # cut by in-plane faces: tiles at the edge
    ],
)
def test_same_field_as_reference(make, rows, store_limit):
    net, x = _net(8), make()
    with torch.no_grad():
        ref = net(x)
    ddf = lean_forward(net, x, rows=rows, store_limit=store_limit)
    assert ddf.shape == ref.shape == x.shape[:1] + (3,) + x.shape[2:]
    assert ddf.dtype == torch.float32 and ddf.is_contiguous()
    assert ref.abs().max() > 2.0, "the test field should move voxels by several voxels"
    assert (ddf - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("finest_level", [1, 3])
def test_finest_level_same_as_reference(finest_level):
    net, x = _net(8), _brain()
    with torch.no_grad():
        ref = net(x, finest_level=finest_level)
    ddf = lean_forward(net, x, finest_level=finest_level)
    assert ref.abs().max() > 2.0
    assert (ddf - ref).abs().max().item() < 1e-4
    with torch.no_grad():
        assert (LeanEOIR(net).eval()(x, finest_level=finest_level) - ref).abs().max().item() < 1e-4


def test_default_store_limit_is_a_byte_budget(monkeypatch):
    """The encoders' storage budget is the same bytes whatever N: smaller networks store the
    moving image's block 2 instead of recomputing it; an explicit ``store_limit`` still rules."""
    assert default_store_limit(32) == default_store_limit(64) == 1.75
    assert default_store_limit(16) == 3.5 and default_store_limit(8) == 7.0
    splits = []
    real = lean_forward_module.encode
    for module in (lean_fixed_module, lean_forward_module):  # the fixed image's encoder, the moving one's
        monkeypatch.setattr(module, "encode", lambda *a, **k: splits.append(k["split"]) or real(*a, **k))
    net, x = _net(8), _brain()
    with torch.no_grad():
        ref = net(x)
    for limit, expected in ((None, [1, 1]), (0.5, [1, 0])):  # [fixed (at least 2 maps), moving]
        splits.clear()
        ddf = lean_forward(net, x, store_limit=limit)
        assert splits == expected and (ddf - ref).abs().max().item() < 1e-4


def test_split_first_convolution_skips_the_fixed_background(monkeypatch):
    """The finest estimator's first convolution runs as its fixed part, on tiles of the fixed
    brain only, plus its moving part added onto it (every level: added once per output chunk),
    and still gives EOIR's field."""
    fixed_covers, onto_calls, in_estimate = [], [], []
    real_conv, real_estimate = RowStream.conv, lean_forward_module.estimate

    def conv(self, onto=None, into=None):
        res = real_conv(self, onto, into)
        onto_calls.append(onto is not None)
        if in_estimate and self.covers is not None and res is not None:  # the estimator's fixed half
            fixed_covers.append(res.cover)
        return res

    def estimate(*args, **kwargs):
        in_estimate.append(True)
        try:
            return real_estimate(*args, **kwargs)
        finally:
            in_estimate.clear()

    monkeypatch.setattr(RowStream, "conv", conv)
    monkeypatch.setattr(lean_forward_module, "estimate", estimate)
    net, x = _net(8), _brain()
    with torch.no_grad():
        ref = net(x)
    ddf = lean_forward(net, x)
    assert any(c != FULL and c != EMPTY for c in fixed_covers)  # tiles of the fixed brain, at level 0
    padded = [-(-s // 16) * 16 for s in x.shape[2:]]
    assert sum(onto_calls) == sum(-(-(padded[0] >> level) // 2) for level in range(5))
    assert (ddf - ref).abs().max().item() < 1e-4


def test_encoder_peak_gives_rows_back_with_one_group():
    """One stored group: block 3 gives each buffer row back once read, so the peak is the largest
    'output so far + buffer left', not their sum; several groups hold the buffer whole."""
    out, buf = [0.25] * 4, [0.1] * 4
    assert encoder_peak(out, buf, 1) == pytest.approx(1.0)  # the whole output, at the end
    assert encoder_peak(out, buf, 2) == pytest.approx(1.2)
    assert encoder_peak([0.0] * 4, [0.5] * 4, 1) == pytest.approx(2.0)  # the full buffer, at the start


@pytest.mark.parametrize("shape", [(9, 13, 7), (8, 2, 5)])
def test_keep_mask_is_the_cube_dilation(shape):
    """The shifted-OR dilation equals a (2 reach + 1)-cube max-pool of the nonzero voxels, plus the
    axis-0 face rows, also where an axis is shorter than the reach."""
    g = torch.Generator().manual_seed(7)
    img = torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) < 0.05)
    img[4, 1, 3] = 0.5
    for reach in (1, 2, 3):
        k = 2 * reach + 1
        ref = F.max_pool3d((img != 0).float()[None, None], k, stride=1, padding=reach)[0, 0] > 0
        ref[:3] = ref[-3:] = True
        assert torch.equal(keep_mask(img, reach), ref)


def test_background_tiles_cover_the_kept_voxels():
    """Each chunk's cover: FULL at the axis-0 faces, EMPTY far from the brain, elsewhere disjoint
    tiles (several on a brain's cross-section) holding every kept voxel of the chunk's rows."""
    enc = Encoder(_net(4), _brain(shape=(32, 96, 64))[0, 1], 2, True)
    covers = [enc.covers3(q, q + 2) for q in range(0, 32, 2)]
    assert covers[0] == covers[-1] == FULL  # axis-0 faces
    assert EMPTY in covers and any(len(c) > 1 for c in covers if c != FULL)
    for q, cover in zip(range(0, 32, 2), covers):
        if cover == FULL:
            continue
        hits = torch.zeros(96, 64, dtype=torch.int)
        for h0, h1, w0, w1 in cover:
            hits[h0:h1, w0:w1] += 1
        assert hits.max() <= 1  # disjoint
        assert bool((hits[enc.keep3[q : q + 2].any(0)] == 1).all())  # every kept voxel covered
        assert hits.sum() < 0.85 * 96 * 64


@pytest.mark.parametrize("split", [0, 1, 4])
def test_encoder_matches_module(split):
    net = _net(8, seed=2)
    img = _brain(seed=3)[0, 1]
    with torch.no_grad():
        ref = net.encoder(img[None, None])
    dense = encode(net, img, split=split)
    assert dense.is_contiguous(memory_format=torch.channels_last_3d)
    assert (dense - ref).abs().max().item() < 1e-4
    ragged = encode(net, img, split=split, ragged=True)
    assert ragged.resident() < dense.numel() * 4 * 0.7  # only the voxels near the brain are stored
    assert (ragged.read(0, img.shape[0]) - ref).abs().max().item() < 1e-4


def test_row_stream_is_the_full_convolution():
    torch.manual_seed(0)
    w, b = torch.randn(5, 4, 3, 3, 3), torch.randn(5)
    x = torch.randn(1, 4, 11, 6, 7).contiguous(memory_format=torch.channels_last_3d)
    ref = F.conv3d(x, w, b, padding=1)
    for rows in (1, 2, 4):
        stream, out, r = RowStream(w, b, 11, (6, 7), rows), torch.zeros_like(ref), 0
        while r < 11:
            n = min(rows, 11 - r)
            stream.slot(n).copy_(x[:, :, r : r + n])
            r += n
            res = stream.conv()
            if res is not None:
                assert res.cover == FULL and len(res.tiles) == 1
                out[:, :, res.q0 : res.q1] = res.tiles[0][0]
        assert torch.allclose(out, ref, atol=1e-5)


def test_row_stream_on_tiles_is_the_full_convolution():
    """Streams computing on tiles only (two blobs, sizes off the band and snap grid, chunks of
    varying size) give the full convolution on every tile; pending() says how many rows come."""
    g = torch.Generator().manual_seed(5)
    for depth, h, w, rows in ((13, 37, 21, 2), (9, 70, 19, 3), (6, 8, 40, 1)):
        w_, b = torch.randn(3, 2, 3, 3, 3, generator=g), torch.randn(3)
        x = torch.randn(1, 2, depth, h, w, generator=g).contiguous(memory_format=torch.channels_last_3d)
        ref = F.conv3d(x, w_, b, padding=1)
        keep = torch.zeros(depth, h, w, dtype=torch.bool)  # two blobs, one at the far faces
        keep[1:-2, 3:9, 2:6] = True
        keep[2:5, -6:-2, -5:-1] = True
        stream, r, seen = RowStream(w_, b, depth, (h, w), rows, covers=Covers(keep)), 0, 0
        while r < depth:
            n = min(int(torch.randint(1, rows + 1, (1,), generator=g)), depth - r)
            stream.slot(n).copy_(x[:, :, r : r + n])
            r += n
            expected = stream.pending()
            res = stream.conv()
            assert (0 if res is None else res.q1 - res.q0) == expected
            if res is None:
                continue
            assert res.q0 == seen
            seen = res.q1
            for z, rect in res.tiles:
                assert torch.allclose(z, ref[:, :, res.q0 : res.q1][rect_slices(rect)], atol=1e-5)
            assert res.flat.shape[0] == sum(z[0, 0].numel() for z, _ in res.tiles)
        assert seen == depth


def test_wrapper_shares_weights_and_batches():
    net = _net(4, seed=3)
    lean = LeanEOIR(net).eval()
    assert all(a is b for a, b in zip(lean.parameters(), net.parameters()))
    assert lean.state_dict().keys() == net.state_dict().keys()  # EOIR checkpoints load into either
    lean.load_state_dict(net.state_dict())
    x = torch.cat([_input((16, 32, 16), seed=s) for s in (4, 5)])
    with torch.no_grad():
        ref = net(x)
        torch.set_num_threads(2)  # the sampler's two-thread split
        ddf = lean(x)
    assert (ddf - ref).abs().max().item() < 1e-4
    assert not ddf.is_inference()  # usable with autograd afterwards (instance optimisation)
    assert lean.train()(x[:1]).requires_grad  # training: the ordinary forward


def test_fixed_features_are_reused_for_pairs_sharing_the_fixed_image(monkeypatch):
    """Many to one: the fixed image is encoded once, and every field (and inverse) is bit for bit
    what a run without reuse gives; another fixed image (or new weights) replaces the entry."""
    fixed_encodes = []
    real = lean_fixed_module.encode
    monkeypatch.setattr(lean_fixed_module, "encode", lambda *a, **k: fixed_encodes.append(1) or real(*a, **k))
    net = _net(4, seed=2)
    fixed = _brain((16, 48, 32), seed=7, centre=(8.0, 24.0, 16.0))[:, 1:]
    pairs = [torch.cat([_brain((16, 48, 32), seed=s, centre=(8.0, 24.0, 16.0))[:, :1], fixed], 1) for s in (3, 4, 5)]
    reuse, plain = LeanEOIR(net).eval(), LeanEOIR(net, reuse_fixed=False).eval()
    with torch.no_grad():
        for k, x in enumerate(pairs):
            fixed_encodes.clear()
            ddf = reuse(x)
            assert len(fixed_encodes) == (k == 0) and torch.equal(ddf, plain(x))
        assert reuse.fixed_cache.hits == 2 and reuse.fixed_cache.misses == 1
        a, b = reuse.forward_with_inverse(pairs[0]), plain.forward_with_inverse(pairs[0])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and reuse.fixed_cache.hits == 3
        other = torch.cat([pairs[0][:, :1], pairs[1][:, :1]], 1)
        assert torch.equal(reuse(other), plain(other)) and reuse.fixed_cache.misses == 2
        net.load_state_dict(_net(4, seed=9).state_dict())
        assert torch.equal(reuse(other), plain(other)) and reuse.fixed_cache.misses == 3


def _cli_report(bundle_root, module, *args):
    """Run ``python -m module args`` in the bundle; it must succeed: the JSON on its last line."""
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=bundle_root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_benchmark_cli_small(bundle_root):
    report = _cli_report(bundle_root, "scripts.benchmark", "--shape", "32,32,32", "--start_channel", "8",
                         "--threads", "1", "--input", "random")
    assert report["shape"] == [32, 32, 32] and report["start_channel"] == 8 and report["threads"] == 1
    for path in ("reference", "lean", "authors"):  # the authors' layout too: 32 is a multiple of 16
        assert report["paths"][path]["seconds"] > 0
        assert report["paths"][path]["peak_rss_gb"] > 0
    assert set(report["ratio"]) == set(report["ratio_authors"]) == {"time", "memory"}
    assert set(report["max_abs_diff_voxels_per_path"]) == {"lean", "authors"}
    assert report["max_abs_diff_voxels"] < 1e-4


def test_benchmark_cli_authors_layout_needs_multiples_of_16(bundle_root):
    res = subprocess.run([sys.executable, "-m", "scripts.benchmark", "--paths", "authors", "--shape", "30,32,32"],
                         cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "needs a --shape of multiples of 16" in res.stderr


def test_benchmark_cli_gpu_option(bundle_root):
    """``--device cuda`` measures the GPU path where there is one, else says so in one line."""
    res = subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", "--device", "cuda", "--amp", "off,bf16", "--shape", "32,32,32",
         "--start_channel", "8", "--threads", "1", "--input", "random"],
        cwd=bundle_root, capture_output=True, text=True, timeout=300,
    )
    if not torch.cuda.is_available():
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert "--device cuda: torch" in res.stderr and "sees no CUDA device here" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(report["paths"]) == {"reference", "reference+bf16"} and report["device"] == "cuda"
    assert all(r["peak_allocated_gb"] > 0 and r["seconds"] > 0 for r in report["paths"].values())
    assert report["max_abs_diff_voxels"] < 0.5  # autocast changes the field a little, not wholesale


def test_benchmark_cli_refuses_amp_on_cpu(bundle_root):
    res = subprocess.run([sys.executable, "-m", "scripts.benchmark", "--amp", "bf16", "--shape", "32,32,32"],
                         cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--amp bf16/fp16 is measured on --device cuda only" in res.stderr


def test_profile_cli_small(bundle_root):
    """``python -m scripts.tools.profile_lean`` times each phase of one lean run (JSON on its last line)."""
    report = _cli_report(bundle_root, "scripts.tools.profile_lean", "--shape", "32,32,32", "--start_channel", "4",
                         "--threads", "1", "--ops", "3")
    assert len(report["encoders (fixed, moving)"]) == 2
    assert len(report["estimators (level 4 .. 0)"]) == len(report["integration (level 4 .. 0)"]) == 5
    phases = sum(map(sum, (report[k] for k in report if k.startswith(("enc", "est", "int")))))
    assert 0 < phases <= report["seconds"] + 0.05 and report["rest"] >= -0.05
    assert "mkldnn::_convolution_pointwise_" in report["top_ops_seconds"]
