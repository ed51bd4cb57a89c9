"""What the model zoo's CI and MONAI Label check: metadata schema, properties, network I/O."""

import subprocess
import sys

import pytest
from helpers import BUNDLE
from monai.bundle import ConfigWorkflow

SCHEMA = BUNDLE.parent / "tests" / "data" / "meta_schema_20240725.json"


def _monai_bundle(*args):
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE, capture_output=True, text=True)


def test_metadata_is_valid_against_the_zoo_schema_offline():
    res = _monai_bundle("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "metadata is verified with no error" in res.stdout + res.stderr


def test_network_input_and_output_match_the_metadata():
    res = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "configs/inference.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "data shape of network is verified with no error" in res.stdout + res.stderr


@pytest.mark.parametrize("config, kind", [("inference.json", "infer"), ("train.json", "train")])
def test_bundle_properties_are_complete(config, kind, tmp_path):
    overrides = {}
    if kind == "train":
        from scripts.synthetic.lumir import make_dataset

        make_dataset(tmp_path, subjects=2, seed=0, shape=(32, 48, 48), val_subjects=2)
        overrides = {"dataset_dir": str(tmp_path), "output_dir": str(tmp_path / "run")}
    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / config), meta_file=str(BUNDLE / "configs/metadata.json"),
                        workflow_type=kind, bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    assert wf.check_properties() == []
