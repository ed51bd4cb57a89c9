"""LUMIR evaluation: the official challenge metrics on a folder of displacement fields.

    python -m scripts.lumir_metrics --disp_dir D --dataset_dir B --config C [--config C2 ...]
        --output O.json [--csv O.csv]

``C`` is an official LUMIR evaluation config (``LUMIR_VAL_Segmentation_evaluation_config.json``,
``LUMIR_VAL_Landmark_evaluation_config.json``): ``eval_pairs`` of ``fixed``/``moving`` image
paths relative to ``B``, ``expected_shape``, and ``evaluation_methods`` (``dice``/``hd95`` with
``labels``, ``tre`` with ``dest``, ``ndv``). For each pair the field is
``D/disp_{fixed_id}_{moving_id}.nii.gz`` (ids: 4-digit LUMIR numbers), ``H x W x D x 3``, voxel
units, ``warped_moving(p) = moving(p + disp(p))``. Ground truth sits beside the images, as the
official evaluator reads it: label maps at the pair path with ``images`` replaced by ``labels``
(Dice, HD95), landmark volumes with ``images`` replaced by the method's ``dest`` (TRE), and the
moving image itself (NDV mask ``moving > 0``).

Metrics follow the official evaluator (``L2R_LUMIR_Eval`` of JHU-MedImage-Reg/LUMIR_L2R); see
:mod:`scripts.evaluation.metrics` for each definition and the choices made. ``sdlogj`` and
``folding_pct`` (Jacobian statistics of the field) are always reported.

Output ``O.json``: ``{"aggregates": {metric: {"mean", "std"}}, "cases": {"<fixed>_<moving>":
{"fixed", "moving", metric: value, ...}}}``; a metric no config asks for is absent. Means and
(population) standard deviations are over the cases that have the metric, without skipping
non-finite values, as the official aggregation; non-finite values are written as ``NaN`` /
``Infinity`` (Python's ``json`` reads them), as the official JSON. ``O.csv``: one row per case
and label with the per-label ``dice`` and ``hd95``. Every input is checked before any metric is
computed; a problem exits with status 2 and one line naming the file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError, exit_on_input_error
from ..file_io import atomic_write_text, load_disp, load_nifti, subject_id
from .metrics import (  # noqa: F401  (re-exported Python API)
    as_labels,
    dice_per_label,
    evaluate_pair,
    hd95_per_label,
    jacobian_stats,
    ndv,
    tre,
    warp_nearest,
)

METRICS = ("dice", "hd95", "tre", "ndv", "sdlogj", "folding_pct")
_ALWAYS = ("sdlogj", "jacobian")  # L2R names of the field statistics we always report


@dataclass
class Case:
    """One eval pair and everything the configs ask for it."""

    fixed: str  # path relative to the dataset folder, as in the config
    moving: str
    dice_labels: list | None = None
    hd95_labels: list | None = None
    tre_dest: str | None = None
    ndv: bool = False
    shapes: list = field(default_factory=list)  # (expected_shape, config path)

    @property
    def ids(self) -> tuple[str, str]:
        return subject_id(self.fixed), subject_id(self.moving)

    @property
    def key(self) -> str:
        return "_".join(self.ids)


def _rel(path: str) -> str:
    return path[1:] if path.startswith("/") else path


def read_config(path: str | Path) -> dict:
    """Load and check one evaluation config; raise :class:`InputError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: evaluation config not found")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: evaluation config is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("eval_pairs"), list) or not cfg["eval_pairs"]:
        raise InputError(f"{p}: evaluation config has no 'eval_pairs' list")
    for i, pair in enumerate(cfg["eval_pairs"]):
        if not (isinstance(pair, dict) and isinstance(pair.get("fixed"), str) and isinstance(pair.get("moving"), str)):
            raise InputError(f"{p}: eval_pairs[{i}] needs 'fixed' and 'moving' paths")
    methods = cfg.get("evaluation_methods")
    if not isinstance(methods, list) or not all(isinstance(m, dict) and isinstance(m.get("metric"), str) for m in methods):
        raise InputError(f"{p}: evaluation config has no 'evaluation_methods' list of {{'metric': ...}}")
    for m in methods:
        if m["metric"] in ("dice", "hd95"):
            labels = m.get("labels")
            if not isinstance(labels, list) or not labels or not all(isinstance(k, int) and not isinstance(k, bool) for k in labels):
                raise InputError(f"{p}: metric '{m['metric']}' needs a non-empty integer 'labels' list")
        if m["metric"] == "tre" and not isinstance(m.get("dest"), str):
            raise InputError(f"{p}: metric 'tre' needs 'dest' (the ground-truth folder prefix, e.g. 'landmarks')")
    shape = cfg.get("expected_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise InputError(f"{p}: 'expected_shape' must be 4 positive integers, got {shape!r}")
    return cfg


def plan_cases(config_paths) -> dict[str, Case]:
    """Cases of all configs by ``<fixed>_<moving>``; a pair in several configs gets all their metrics."""
    cases: dict[str, Case] = {}
    for cp in config_paths:
        cfg = read_config(cp)
        for pair in cfg["eval_pairs"]:
            c = Case(_rel(pair["fixed"]), _rel(pair["moving"]))
            c = cases.setdefault(c.key, c)
            if cfg.get("expected_shape"):
                c.shapes.append((tuple(cfg["expected_shape"]), str(cp)))
            for m in cfg["evaluation_methods"]:
                metric = m["metric"]
                if metric == "dice":
                    c.dice_labels = list(m["labels"])
                elif metric == "hd95":
                    c.hd95_labels = list(m["labels"])
                elif metric == "tre":
                    c.tre_dest = m["dest"]
                elif metric == "ndv":
                    c.ndv = True
                elif metric not in _ALWAYS:
                    print(f"warning: {cp}: metric '{metric}' is not supported, ignored", file=sys.stderr)
    return cases


def _disp_shape(shape: tuple) -> tuple:
    # the official evaluator also accepts channels-first fields (3, H, W, D)
    return tuple(shape[1:]) + (3,) if len(shape) == 4 and shape[0] == 3 and shape[-1] != 3 else tuple(shape)


def _gt_files(c: Case, dataset_dir: Path) -> dict[str, Path]:
    files = {}
    if c.dice_labels is not None or c.hd95_labels is not None:
        files["fixed label map"] = dataset_dir / c.fixed.replace("images", "labels")
        files["moving label map"] = dataset_dir / c.moving.replace("images", "labels")
    if c.tre_dest is not None:
        files["fixed landmark volume"] = dataset_dir / c.fixed.replace("images", c.tre_dest)
        files["moving landmark volume"] = dataset_dir / c.moving.replace("images", c.tre_dest)
    if c.ndv:
        files["moving image"] = dataset_dir / c.moving
    return files


def check_inputs(cases: dict[str, Case], disp_dir: Path, dataset_dir: Path) -> None:
    """Every disp file exists with the expected shape and every ground-truth file exists (fail fast)."""
    if not disp_dir.is_dir():
        raise InputError(f"{disp_dir}: displacement folder not found")
    if not dataset_dir.is_dir():
        raise InputError(f"{dataset_dir}: dataset folder not found")
    for c in cases.values():
        path = disp_dir / f"disp_{c.key}.nii.gz"
        if not path.is_file():
            raise InputError(f"{path}: displacement field for fixed {c.fixed} / moving {c.moving} not found")
        try:
            shape = _disp_shape(nib.load(str(path)).shape)
        except Exception as e:  # nibabel raises many types for unreadable files
            raise InputError(f"{path}: cannot read displacement field as NIfTI ({e.__class__.__name__}: {e})") from None
        for expected, cfg in c.shapes:
            if shape != expected:
                raise InputError(f"{path}: displacement field has shape {shape}, expected {expected} (from {cfg})")
        for what, p in _gt_files(c, dataset_dir).items():
            if not p.is_file():
                raise InputError(f"{p}: {what} of pair {c.key} not found")


def _load_gt(path: Path, what: str, shape: tuple, labels: bool) -> np.ndarray:
    arr = load_nifti(path, what)[0]
    if arr.shape != shape:
        raise InputError(f"{path}: {what} has shape {arr.shape}, the displacement field {shape}")
    if labels:
        try:
            return as_labels(arr, what)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
    return np.asarray(arr)


def evaluate_case(c: Case, disp_dir: Path, dataset_dir: Path) -> dict:
    """All requested metrics of one case (the dict :func:`evaluate_pair` returns)."""
    disp = load_disp(disp_dir / f"disp_{c.key}.nii.gz")[0]
    shape = disp.shape[:3]
    files = _gt_files(c, dataset_dir)
    kw = {}
    if "fixed label map" in files:
        kw["fixed_label"] = _load_gt(files["fixed label map"], "fixed label map", shape, True)
        kw["moving_label"] = _load_gt(files["moving label map"], "moving label map", shape, True)
        kw["dice_labels"], kw["hd95_labels"] = c.dice_labels, c.hd95_labels
    if c.tre_dest is not None:
        kw["fixed_landmarks"] = _load_gt(files["fixed landmark volume"], "fixed landmark volume", shape, False)
        kw["moving_landmarks"] = _load_gt(files["moving landmark volume"], "moving landmark volume", shape, False)
    if c.ndv:
        kw["moving_image"] = _load_gt(files["moving image"], "moving image", shape, False)
    return evaluate_pair(disp, **kw)


def aggregate(cases: dict[str, dict]) -> dict:
    """``{metric: {"mean", "std"}}`` over the cases that have it (numpy mean / population std)."""
    out = {}
    for m in METRICS:
        v = np.array([c[m] for c in cases.values() if m in c], dtype=np.float64)
        if v.size:
            out[m] = {"mean": float(v.mean()), "std": float(v.std())}
    return out


def per_label_csv(results: dict[str, dict]) -> str:
    """CSV text: case, fixed, moving, label, dice, hd95 (empty where a metric was not asked)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "fixed", "moving", "label", "dice", "hd95"])
    for key, r in results.items():
        dice, hd = r.get("dice_per_label", {}), r.get("hd95_per_label", {})
        for label in list(dict.fromkeys([*dice, *hd])):
            w.writerow([key, r["fixed"], r["moving"], label, repr(float(dice[label])) if label in dice else "",
                        repr(float(hd[label])) if label in hd else ""])
    return buf.getvalue()


def summarize(results: dict[str, dict]) -> dict:
    """The contract's document ``{"aggregates": ..., "cases": ...}`` from per-case results
    (the dicts of :func:`evaluate_pair` plus ``fixed``/``moving`` ids)."""
    summary = {}
    for key, r in results.items():
        s = {"fixed": r["fixed"], "moving": r["moving"]}
        s.update({m: float(r[m]) for m in METRICS if m in r})
        if "tre_per_landmark" in r:
            s["tre_lost_landmarks"] = int(np.isnan(r["tre_per_landmark"]).sum())
        summary[key] = s
    return {"aggregates": aggregate(summary), "cases": summary}


def write_report(results: dict[str, dict], output, csv_path=None) -> dict:
    """Write the metrics JSON (and the per-label CSV) atomically; return the JSON document."""
    doc = summarize(results)
    atomic_write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n", output)
    if csv_path:
        atomic_write_text(per_label_csv(results), csv_path)
    return doc


def run(disp_dir, dataset_dir, configs, output, csv_path=None, verbose=True) -> dict:
    """Evaluate, write ``output`` (and ``csv_path``), return the JSON document."""
    disp_dir, dataset_dir = Path(disp_dir), Path(dataset_dir)
    cases = plan_cases(configs)
    check_inputs(cases, disp_dir, dataset_dir)
    results: dict[str, dict] = {}
    for i, (key, c) in enumerate(cases.items(), 1):
        t0 = time.time()
        r = evaluate_case(c, disp_dir, dataset_dir)
        r["fixed"], r["moving"] = c.ids
        results[key] = r
        if verbose:
            vals = ", ".join(f"{m}={r[m]:.4g}" for m in METRICS if m in r)
            print(f"[{i}/{len(cases)}] {key}: {vals} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return write_report(results, output, csv_path)


@exit_on_input_error
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.lumir_metrics",
        description="Official LUMIR metrics (Dice, HD95, TRE, NDV as the challenge's evaluator computes "
        "them, plus SDlogJ and % folding) for disp_{fixed}_{moving}.nii.gz fields. TRE: the moving "
        "landmark volume is warped with nearest neighbour and landmark centroids are compared (the "
        "official method for LUMIR landmark volumes).",
    )
    ap.add_argument("--disp_dir", required=True, help="folder of disp_{fixed}_{moving}.nii.gz (H x W x D x 3, voxels)")
    ap.add_argument("--dataset_dir", required=True, help="LUMIR root: imagesVal/, labelsVal/, landmarksVal/")
    ap.add_argument("--config", required=True, action="append", help="official evaluation config JSON (repeatable)")
    ap.add_argument("--output", required=True, help="metrics JSON to write")
    ap.add_argument("--csv", default=None, help="optional per-label Dice/HD95 CSV to write")
    ap.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    a = ap.parse_args(argv)
    doc = run(a.disp_dir, a.dataset_dir, a.config, a.output, a.csv, verbose=not a.quiet)
    for m, v in doc["aggregates"].items():
        print(f"{m}: {v['mean']:.4f} +- {v['std']:.4f}")
    print(f"wrote {a.output}" + (f" and {a.csv}" if a.csv else ""))


if __name__ == "__main__":
    main()
