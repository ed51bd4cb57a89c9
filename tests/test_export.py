"""TorchScript export (``monai.bundle ckpt_export``) and inference from the exported file
(``configs/inference_ts.json``)."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BUNDLE, smooth_volume, tiny_checkpoint, write_nifti
from monai.bundle import ConfigWorkflow

from scripts.checkpoint import load_weights, read_checkpoint, start_channel_of
from scripts.errors import find_input_error
from scripts.network import EOIR

ODD = (30, 40, 34)  # not multiples of 16: the exported module pads and crops like the network


def _export(ckpt, ts, *extra):
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
         "--ckpt_file", str(ckpt), "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
         *extra],
        cwd=BUNDLE, capture_output=True, text=True,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint (start_channel 8) and its TorchScript export, made by the zoo's command."""
    d = tmp_path_factory.mktemp("export")
    ckpt, ts = tiny_checkpoint(d / "model8.pt"), d / "model8.ts"
    res = _export(ckpt, ts, "--network_def#start_channel", "8")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ts.is_file()
    return ckpt, ts


def _run(config_files, **overrides):
    wf = ConfigWorkflow(config_file=[str(BUNDLE / "configs" / c) for c in config_files], workflow_type="infer",
                        bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


def test_ckpt_export_writes_a_scripted_network_with_the_eager_output(exported):
    ckpt, ts = exported
    extra = {"metadata.json": "", "inference.json": ""}
    module = torch.jit.load(str(ts), _extra_files=extra)
    assert isinstance(module, torch.jit.ScriptModule)
    assert b'"version"' in extra["metadata.json"]  # ckpt_export embeds the bundle's metadata
    net = load_weights(EOIR(start_channel=8), ckpt).eval()
    x = torch.rand(1, 2, *ODD, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = net(x), module(x)
        # the argument instance optimisation's warm start passes (see scripts.instance_optimization)
        want1, got1 = net(x, finest_level=1), module(x, finest_level=1)
    assert got.shape == (1, 3, *ODD)
    assert want.abs().max() > 0.05  # a real field, not the identity
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got1, want1, atol=1e-5, rtol=0)


def test_scripting_keeps_the_eager_output_of_both_sizes():
    torch.manual_seed(0)
    net = EOIR(start_channel=8).eval()
    with torch.no_grad():
        for est in net.estimators:
            est.flow.conv.weight.normal_(0.0, 0.05)
    scripted = torch.jit.script(net)
    for shape in [(1, 2, 32, 48, 32), (1, 2, *ODD)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=0)


def test_inference_from_the_exported_file_writes_the_eager_disp_file(tmp_path, exported):
    ckpt, ts = exported
    m = write_nifti(tmp_path / "in" / "sub-01_T1w.nii.gz", smooth_volume(ODD, 1))
    f = write_nifti(tmp_path / "in" / "sub-02_T1w.nii.gz", smooth_volume(ODD, 2))
    pair = {"moving_image": str(m), "fixed_image": str(f), "io_iterations": 4,  # IO runs on the module's field
            "preprocess": "off"}  # blob images, not brains
    _run(["inference.json"], ckpt_path=str(ckpt), output_dir=str(tmp_path / "eager"),
         **{"network_def#start_channel": 8}, **pair)
    # the checkpoint loader is off with the overlay: a missing ckpt_path does not matter
    wf = _run(["inference.json", "inference_ts.json"], ts_path=str(ts), ckpt_path=str(tmp_path / "no.pt"),
              output_dir=str(tmp_path / "ts"), **pair)
    assert isinstance(wf.parser.get_parsed_content("network"), torch.jit.ScriptModule)
    assert wf.parser.get_parsed_content("inferer").last_stats["iterations"] == 4
    name = "disp_sub-02_T1w_sub-01_T1w.nii.gz"
    eager, scripted = nib.load(str(tmp_path / "eager" / name)), nib.load(str(tmp_path / "ts" / name))
    assert scripted.shape == (*ODD, 3)
    np.testing.assert_allclose(scripted.affine, eager.affine)
    np.testing.assert_allclose(np.asarray(scripted.dataobj), np.asarray(eager.dataobj), atol=1e-4, rtol=0)


def test_missing_exported_file_gets_one_clear_error(tmp_path):
    missing = tmp_path / "none.ts"
    try:
        _run(["inference.json", "inference_ts.json"], ts_path=str(missing), output_dir=str(tmp_path / "out"))
    except Exception as e:  # noqa: BLE001 - the InputError behind MONAI's wrappers
        err = find_input_error(e)
        assert err is not None, repr(e)
        assert str(missing) in str(err) and "ckpt_export" in str(err)
    else:
        raise AssertionError("inference without the .ts file did not fail")


def test_shipped_torchscript_matches_the_shipped_checkpoint():
    """models/model.ts (the zoo CI loads it when present) must be the export of models/model.pt:
    after retraining, re-run the ckpt_export command of docs/README.md."""
    ts = BUNDLE / "models" / "model.ts"
    if not ts.is_file():
        pytest.skip("no models/model.ts in the bundle")
    module = torch.jit.load(str(ts))
    state = read_checkpoint(BUNDLE / "models" / "model.pt")
    got = module.state_dict()
    assert sorted(got) == sorted(state), "models/model.ts has other keys than models/model.pt: re-export it"
    stale = [k for k in state if not torch.equal(got[k], state[k])]
    assert not stale, f"models/model.ts is not the export of models/model.pt ({stale[0]} differs): re-export it"
    net = load_weights(EOIR(start_channel=start_channel_of(state)), BUNDLE / "models" / "model.pt").eval()
    x = torch.rand(1, 2, 16, 32, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(module(x), net(x), atol=1e-5, rtol=0)
