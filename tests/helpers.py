"""Shared test helpers: tiny NIfTI pairs, tiny checkpoints, running bundle workflows in-process."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow

from scripts.errors import find_input_error
from scripts.network import EOIR

BUNDLE = Path(__file__).resolve().parents[1] / "eoir_bundle"
AFFINE = np.array([[-1.0, 0, 0, 80], [0, 1, 0, -120], [0, 0, 1, -70], [0, 0, 0, 1]])


def write_nifti(path: Path, array: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def smooth_volume(shape, seed: int) -> np.ndarray:
    """A smooth random uint8 volume (blobs), so registration has something to align."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[max(2, s // 4) for s in shape], generator=g)
    x = torch.nn.functional.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    x = (x - x.min()) / (x.max() - x.min())
    return (x.numpy() * 255).astype(np.uint8)


def tiny_checkpoint(path: Path, start_channel: int = 8, seed: int = 0) -> Path:
    """Deterministic weights whose fields are not zero (flow convs scaled up)."""
    torch.manual_seed(seed)
    net = EOIR(start_channel=start_channel)
    with torch.no_grad():
        for est in net.estimators:
            est.flow.conv.weight.normal_(0.0, 0.05)
    torch.save(net.state_dict(), path)
    return path


def tiny_dataset(root: Path, subjects: int, seed: int, val_subjects: int) -> Path:
    """A small synthetic LUMIR dataset (32 x 48 x 48, labels and landmarks) with ``m8.pt`` beside it."""
    from scripts.synthetic.lumir import make_dataset

    make_dataset(root, subjects=subjects, seed=seed, shape=(32, 48, 48), val_subjects=val_subjects)
    tiny_checkpoint(root / "m8.pt")
    return root

def lumir_folder(root: Path, shape=(32, 48, 32), ids=(3454, 3455, 3456), shape_of_json="authors") -> Path:
    """A LUMIR-layout folder with ``imagesVal`` and a dataset JSON of consecutive pairs."""
    for k, sid in enumerate(ids):
        write_nifti(root / "imagesVal" / f"LUMIRMRI_{sid:04d}_0000.nii.gz", smooth_volume(shape, seed=k))
    pairs = [{"fixed": f"/imagesVal/LUMIRMRI_{b:04d}_0000.nii.gz", "moving": f"./imagesVal/LUMIRMRI_{a:04d}_0000.nii.gz"}
             for a, b in zip(ids[:-1], ids[1:])]
    data = {"training": [], "test": pairs} if shape_of_json == "authors" else {"training": [], "validation": pairs}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def run_workflow(config: str, workflow_type: str = "infer", **overrides):
    """Run a bundle config like ``monai.bundle run`` does; return the workflow."""
    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / config), workflow_type=workflow_type,
                        bundle_root=str(BUNDLE), **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def input_error_of(config: str, **overrides) -> str:
    """Run a workflow expected to fail on bad input; return the InputError message."""
    try:
        run_workflow(config, **overrides)
    except Exception as e:  # noqa: BLE001 - we look for the InputError behind any wrapper
        err = find_input_error(e)
        assert err is not None, f"expected an InputError, got {e!r}"
        return str(err)
    raise AssertionError("the workflow did not fail")
