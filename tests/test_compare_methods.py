"""``python -m scripts.compare_methods``: every method on the same held-out pairs, scored alike."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import BUNDLE, tiny_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("comparedata"), subjects=1, seed=21, val_subjects=2)


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
                         "network+io20 (warm_start)", "io20 from zero (no network)", "ants_SyNOnly"}
    assert doc["io_settings"]["io_init"] == "select" and doc["io_settings"]["io_network_level"] == 1
    for name, m in mean.items():
        assert set(m) == {"dice", "hd95", "tre", "ndv", "folding", "ncc", "seconds"}, name
        assert 0.0 < m["dice"] <= 1.0 and m["ndv"] < 0.01 and m["folding"] < 0.01, name
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


def test_warm_up_runs_before_the_first_pair_only(data, monkeypatch):
    """The GPU warm-up (here forced on the CPU): one untimed IO run of the largest budget before
    the first pair, none later; the timed results are unchanged in kind."""
    from scripts import instance_optimization
    from scripts.tools.compare_methods import NetworkMethod, load_pair
    from scripts.data.lists import evaluation_pairs

    calls = []
    real = instance_optimization.InstanceOptimizationInferer.__init__

    def spy(self, *a, **k):
        calls.append(k.get("io_iterations"))
        real(self, *a, **k)

    monkeypatch.setattr(instance_optimization.InstanceOptimizationInferer, "__init__", spy)
    method = NetworkMethod(str(data / "m8.pt"), [0, 7], [])
    assert method.warmed_up  # on the CPU the first call's cost is part of the timing
    method.warmed_up = False
    pair = load_pair(evaluation_pairs(data / "LUMIR_dataset.json", data)[0])
    first = method.run(pair)
    assert calls == [7, 7] and method.warmed_up  # the warm-up, then the timed network+io7
    second = method.run(pair)
    assert calls == [7, 7, 7] and set(first) == set(second) == {"network", "network+io7"}
    assert all(t > 0 for _, t in second.values())


def test_cli_named_io_variants_folding_and_paired_tests(data, tmp_path):
    """``--io_variants`` runs named IO settings on the same network field; every method gets
    folding and full-grid NCC; each method is tested against the default (Wilcoxon over pairs)."""
    out = tmp_path / "variants.json"
    res = subprocess.run(
        [sys.executable, "-m", "scripts.compare_methods", "--dataset_dir", str(data), "--ckpt", str(data / "m8.pt"),
         "--io_iterations", "0", "--extra_io_iterations", "", "--ants", "", "--no_hd95", "--threads", "1",
         "--io_variants", "sel:io_iterations=10,io_init=select;c10:io_iterations=10,io_init=compose,io_level=0",
         "--output", str(out)],
        cwd=BUNDLE, capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["mean"]) == {"zero", "network", "sel", "c10"}
    assert doc["variants"]["c10"] == {"io_iterations": 10, "io_init": "compose", "io_level": 0}
    for name, m in doc["mean"].items():
        assert {"dice", "ndv", "folding", "ncc", "seconds"} <= set(m) and "hd95" not in m, name
    assert doc["mean"]["c10"]["ncc"] > doc["mean"]["zero"]["ncc"]
    assert "| pair (moving -> fixed) |" in res.stdout


def test_paired_tests():
    from scripts.tools.compare_methods import paired_tests

    rows = [{"a": {"dice": 0.5 + i / 100}, "b": {"dice": 0.6 + i / 90}, "c": {"dice": 0.5 + i / 100}} for i in range(8)]
    got = paired_tests(rows, "a")
    assert set(got) == {"b", "c"}
    assert got["b"]["wins"] == 8 and got["b"]["p"] < 0.01 and got["b"]["mean_diff"] > 0
    assert got["c"]["n"] == 8 and np.isnan(got["c"]["p"])  # identical: no test


def test_io_variants_without_the_network_are_refused(tmp_path, capsys):
    """``--io_variants`` with ``--io_iterations ""`` (no network row) stops with one line instead of scoring
    only ``zero``."""
    from scripts.tools.compare_methods import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--dataset_dir", str(tmp_path), "--io_iterations", "", "--ants", "",
              "--io_variants", "s:io_iterations=10,io_init=select", "--output", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--io_variants refine the network's field" in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()
