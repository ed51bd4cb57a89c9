"""``python -m scripts.compare_methods``: every method on the same held-out pairs, scored alike."""

import json
import subprocess
import sys

import pytest
from helpers import BUNDLE, tiny_checkpoint

from scripts.make_synthetic_lumir import make_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("comparedata")
    make_dataset(root, subjects=1, seed=21, shape=(32, 48, 48), val_subjects=2)
    tiny_checkpoint(root / "m8.pt")
    return root


def test_cli_scores_network_io_variants_and_ants(data, tmp_path):
    pytest.importorskip("ants")  # antspyx (requirements.txt) runs the ANTs SyN rows
    out = tmp_path / "compare.json"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.compare_methods", "--dataset_dir", str(data), "--ckpt", str(data / "m8.pt"),
         "--io_iterations", "0,20", "--extra_io_iterations", "20", "--threads", "1", "--output", str(out)],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    mean = doc["mean"]
    assert set(mean) == {"zero", "network", "network+io20", "network+io20 (compose)",
                         "network+io20 (io_network_level 0)", "io20 from zero (no network)", "ants_SyNOnly"}
    assert doc["io_settings"]["io_init"] == "warm_start" and doc["io_settings"]["io_network_level"] == 1
    for name, m in mean.items():
        assert set(m) == {"dice", "hd95", "tre", "ndv", "seconds"}, name
        assert 0.0 < m["dice"] <= 1.0 and m["ndv"] < 0.01, name
    # registration is measured, not assumed: IO and ANTs move the labels closer than no displacement
    for name in ("network+io20", "io20 from zero (no network)", "ants_SyNOnly"):
        assert mean[name]["dice"] > mean["zero"]["dice"] + 0.02, (name, mean[name]["dice"], mean["zero"]["dice"])
    assert "| network+io20 |" in res.stdout  # the Markdown table


def test_cli_device_cuda(data, tmp_path):
    """``--device cuda`` runs the network and IO on the GPU where there is one, else exits in one line."""
    import torch

    out = tmp_path / "compare_cuda.json"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.compare_methods", "--dataset_dir", str(data), "--ckpt", str(data / "m8.pt"),
         "--io_iterations", "0,20", "--extra_io_iterations", "", "--ants", "", "--device", "cuda",
         "--output", str(out)],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    if not torch.cuda.is_available():
        assert res.returncode != 0 and not out.exists()
        assert "--device cuda: torch" in res.stderr and "sees no CUDA device here" in res.stderr
        assert "Traceback" not in res.stderr
        return
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["device"].startswith("cuda") and set(doc["mean"]) == {"zero", "network", "network+io20"}
    assert doc["mean"]["network+io20"]["dice"] > doc["mean"]["zero"]["dice"] + 0.02
    assert doc["mean"]["network+io20"]["ndv"] < 0.01
