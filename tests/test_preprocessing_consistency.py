"""Preprocessing is consistent: the same scan gives the same affine to the bit in a fresh process
(one ITK thread, seeded sampling), and ``scripts.tools.affine_check`` finds a copy of the scan seen
through a known random affine aligned like the scan itself."""

import json
import os
import subprocess
import sys

from conftest import BUNDLE_ROOT
from raw_pair import SCAN

from scripts.tools.affine_check import main

_TWICE = """
import sys, numpy as np, nibabel as nib
from scripts.preprocessing.pipeline import preprocess_scan
img = nib.load(sys.argv[1]); a = np.asarray(img.dataobj, np.float32)
m = [preprocess_scan(a, img.affine, "scan", (64, 80, 64))["mni_to_scan"] for _ in range(2)]
print("same" if np.array_equal(m[0], m[1]) else "differ", float(np.abs(m[0] - m[1]).max()))
"""


def test_the_same_scan_gives_the_same_affine():
    env = {k: v for k, v in os.environ.items() if k not in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ANTS_RANDOM_SEED")}
    out = subprocess.run([sys.executable, "-c", _TWICE, str(SCAN)], cwd=str(BUNDLE_ROOT), env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "same", out.stdout


def test_affine_check_finds_a_consistent_affine(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main([str(SCAN), "--copies", "1", "--seed", "0", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    copy = [r for r in result["runs"] if r["copy"] == 1][0]
    assert copy["error_mean_mm"] < 1.0 and copy["error_max_mm"] < 2.0, copy
    assert result["summary"]["cpu_s_mean"] > 0 and "summary:" in capsys.readouterr().out


def test_affine_check_names_a_missing_scan(tmp_path, capsys):
    assert main([str(tmp_path / "nope.nii.gz")]) == 2
    assert "nope.nii.gz" in capsys.readouterr().out
