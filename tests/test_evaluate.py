"""Evaluation workflow (train.json + evaluate.json overlay) and QC pictures from inference."""

import json

import numpy as np
import pytest
from helpers import BUNDLE, run_workflow, tiny_dataset
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts.evaluation.lumir import run as lumir_metrics_run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("evaldata"), subjects=2, seed=11, val_subjects=3)


def test_evaluate_reports_the_official_metrics(data, tmp_path):
    out = tmp_path / "eval"
    run_workflow_eval(data, out)
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["aggregates"]) == {"dice", "hd95", "tre", "ndv", "sdlogj", "folding_pct"}
    assert set(doc["cases"]) == {"0006_0005", "0007_0006"}  # consecutive held-out pairs: fixed_moving
    assert 0.0 < doc["aggregates"]["dice"]["mean"] < 1.0 and doc["aggregates"]["tre"]["mean"] > 0

    # the same numbers as the standalone LUMIR evaluator on the disp files the run wrote
    ref = lumir_metrics_run(out, data, [data / "LUMIR_VAL_Segmentation_evaluation_config.json",
                                        data / "LUMIR_VAL_Landmark_evaluation_config.json"],
                            tmp_path / "ref.json", verbose=False)
    for key, case in ref["cases"].items():
        for metric in ("dice", "hd95", "tre", "ndv"):
            assert doc["cases"][key][metric] == pytest.approx(case[metric], abs=1e-6), (key, metric)

    # per-label CSV and QC pictures of the best and the worst pair
    rows = (out / "metrics_per_label.csv").read_text().splitlines()
    assert rows[0] == "case,fixed,moving,label,dice,hd95" and len(rows) > 20
    pngs = sorted(p.name for p in out.glob("qc_*.png"))
    assert len(pngs) == 2 and pngs[0].startswith("qc_best_") and pngs[1].startswith("qc_worst_")
    assert Image.open(out / pngs[0]).size[0] > 800


def run_workflow_eval(data, out):
    """``monai.bundle run evaluating --config_file "['configs/train.json','configs/evaluate.json']" ...``"""
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs/train.json"), str(BUNDLE / "configs/evaluate.json")],
        workflow_type="infer", run_id="evaluating", bundle_root=str(BUNDLE),
        dataset_dir=str(data), data_list_file_path=str(data / "LUMIR_dataset.json"), output_dir=str(out),
        ckpt_path=str(data / "m8.pt"), save_disp=True, **{"network_def#start_channel": 8},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def test_inference_writes_a_qc_picture_on_request(data, tmp_path):
    out = tmp_path / "inf"
    run_workflow("inference.json", dataset_dir=str(data), data_list_file_path=str(data / "LUMIR_dataset.json"),
                 ckpt_path=str(data / "m8.pt"), output_dir=str(out), save_qc=True,
                 **{"network_def#start_channel": 8})
    png = out / "qc_0006_0005.png"
    assert png.is_file() and (out / "disp_0006_0005.nii.gz").is_file()
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.std() > 10  # a real picture, not a blank canvas
