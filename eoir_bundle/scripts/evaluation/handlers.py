"""Ignite handler that scores an evaluator's fields with the LUMIR metrics of
:mod:`scripts.evaluation.metrics` (the official evaluator's definitions).

Per pair it reads, from the decollated ``engine.state.batch`` / ``engine.state.output``:
``pred`` (the field, ``(3, H, W, D)``, voxels), ``moving_label`` / ``fixed_label`` (label
maps, for Dice and HD95), ``moving_landmarks`` / ``fixed_landmarks`` (for TRE) and
``image`` (channel 0 = moving, for NDV's foreground mask). At the end of the run the means
go into ``engine.state.metrics`` as ``{prefix}{name}`` (e.g. ``val_dice``), where MONAI's
``CheckpointSaver``, ``StatsHandler`` and ``TensorBoardStatsHandler`` find them; optionally
the same JSON/CSV as ``python -m scripts.lumir_metrics`` and QC pictures of the best and the
worst pair (by Dice, else TRE) are written.

Why not MONAI's ``MeanDice``/``HausdorffDistance``: they need one-hot maps (LUMIR has 133
labels: 7 GB per full-size pair as float) and MONAI's HD95 uses voxel-centre distances,
whereas LUMIR ranks with DeepMind's surfel-weighted HD95; the numbers here equal the
challenge's.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from ..file_io import subject_id
from .lumir import METRICS as ALL_METRICS
from .lumir import summarize, write_report
from .qc import save_qc_png
from .metrics import evaluate_pair


class RegistrationMetrics:
    """Per-pair LUMIR metrics over an evaluator's run; means in ``engine.state.metrics``.

    Args:
        metrics: which of ``dice, hd95, tre, ndv, sdlogj, folding_pct`` to compute (the
            label/landmark/image inputs they need must be in the batch; a pair without them
            is scored on the rest).
        labels: label values for Dice/HD95 (e.g. the LUMIR list, which includes 0); None =
            every value present in the fixed label map.
        prefix: prefix of the names in ``engine.state.metrics``.
        output_json, output_csv: if given, write the metrics document / per-label CSV at the end.
        qc_dir: if given, write ``qc_best_{fixed}_{moving}.png`` and ``qc_worst_...png`` there.
    """

    def __init__(self, metrics=("dice", "folding_pct"), labels=None, prefix: str = "val_",
                 output_json: str | None = None, output_csv: str | None = None, qc_dir: str | None = None) -> None:
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
        self.metrics = tuple(metrics)
        self.labels = None if labels is None else [int(x) for x in labels]
        self.prefix = prefix
        self.output_json, self.output_csv, self.qc_dir = output_json, output_csv, qc_dir
        self.results: dict[str, dict] = {}
        self._extremes: dict[str, tuple] = {}
        self.logger = logging.getLogger("eoir.metrics")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine | None = None) -> None:
        self.results, self._extremes = {}, {}

    def score_pair(self, item: dict, ddf) -> dict:
        """The requested metrics of one pair (``item`` = decollated batch entry, ``ddf`` = (3,H,W,D))."""
        disp = np.moveaxis(convert_to_numpy(ddf).astype(np.float32), 0, -1)
        want, kwargs = set(self.metrics), {}
        if want & {"dice", "hd95"} and "fixed_label" in item:
            fixed_label = convert_to_numpy(item["fixed_label"]).squeeze()
            labels = self.labels if self.labels is not None else np.unique(fixed_label).astype(int).tolist()
            kwargs.update(fixed_label=fixed_label, moving_label=convert_to_numpy(item["moving_label"]).squeeze(),
                          dice_labels=labels if "dice" in want else None,
                          hd95_labels=labels if "hd95" in want else None)
        if "tre" in want and "fixed_landmarks" in item:
            kwargs.update(fixed_landmarks=convert_to_numpy(item["fixed_landmarks"]).squeeze(),
                          moving_landmarks=convert_to_numpy(item["moving_landmarks"]).squeeze())
        if "ndv" in want:
            kwargs.update(moving_image=convert_to_numpy(item["image"])[0])
        out = evaluate_pair(disp, **kwargs)
        return {k: v for k, v in out.items() if k.split("_per_")[0] in want or k == "tre_per_landmark"}

    def update(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            t0 = time.perf_counter()
            fixed, moving = subject_id(str(item["fixed_path"])), subject_id(str(item["moving_path"]))
            r = self.score_pair(item, out["pred"])
            r["fixed"], r["moving"] = fixed, moving
            key = f"{fixed}_{moving}"
            self.results[key] = r
            self.logger.debug(f"{key}: " + ", ".join(f"{m} {r[m]:.4f}" for m in self.metrics if m in r)
                              + f" ({time.perf_counter() - t0:.1f} s)")
            if self.qc_dir:
                self._keep_extremes(key, r, item, out["pred"])

    def _keep_extremes(self, key: str, r: dict, item: dict, ddf) -> None:
        """Keep the arrays of the best and the worst pair so far (by Dice, else by -TRE)."""
        score = r.get("dice", -r["tre"] if "tre" in r else None)
        if score is None or math.isnan(score):
            return
        for which, better in (("best", lambda a, b: a > b), ("worst", lambda a, b: a < b)):
            if which not in self._extremes or better(score, self._extremes[which][0]):
                image = convert_to_numpy(item["image"])
                self._extremes[which] = (score, key, image[1], image[0], convert_to_numpy(ddf))

    def compute(self, engine: Engine) -> None:
        doc = summarize(self.results)
        for m in self.metrics:
            engine.state.metrics[f"{self.prefix}{m}"] = doc["aggregates"].get(m, {}).get("mean", float("nan"))
        self.logger.info(f"{len(self.results)} pairs: " + ", ".join(
            f"{m} {v['mean']:.4f} ± {v['std']:.4f}" for m, v in doc["aggregates"].items()))
        if self.output_json:
            write_report(self.results, self.output_json, self.output_csv)
            self.logger.info(f"wrote {self.output_json}" + (f" and {self.output_csv}" if self.output_csv else ""))
        for which, (score, key, fixed, moving, ddf) in self._extremes.items():
            path = Path(self.qc_dir) / f"qc_{which}_{key}.png"
            save_qc_png(path, fixed, moving, ddf, title=f"{which} pair {key} (fixed_moving), score {score:.4f}")
            self.logger.info(f"wrote {path}")
