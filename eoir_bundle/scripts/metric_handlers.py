"""Ignite handler that scores an evaluator's fields with the LUMIR metrics of
:mod:`scripts.registration_metrics` (the official evaluator's definitions).

Per pair it reads, from the decollated ``engine.state.batch`` / ``engine.state.output``:
``pred`` (the field, ``(3, H, W, D)``, voxels), ``moving_label`` / ``fixed_label`` (label
maps, for Dice and HD95), ``moving_landmarks`` / ``fixed_landmarks`` (for TRE) and
``image`` (channel 0 = moving, for NDV's foreground mask). At the end of the run the means
go into ``engine.state.metrics`` as ``{prefix}{name}`` (e.g. ``val_dice``), where MONAI's
``CheckpointSaver``, ``StatsHandler`` and ``TensorBoardStatsHandler`` find them.

Why not MONAI's ``MeanDice``/``HausdorffDistance``: they need one-hot maps (LUMIR has 133
labels: 7 GB per full-size pair as float) and MONAI's HD95 uses voxel-centre distances,
whereas LUMIR ranks with DeepMind's surfel-weighted HD95; the numbers here equal the
challenge's.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy

from .disp_writer import disp_name
from .registration_metrics import evaluate_pair

ALL_METRICS = ("dice", "hd95", "tre", "ndv", "sdlogj", "folding_pct")


def _nanmean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


class RegistrationMetrics:
    """Per-pair LUMIR metrics over an evaluator's run; means in ``engine.state.metrics``.

    Args:
        metrics: which of ``dice, hd95, tre, ndv, sdlogj, folding_pct`` to compute (the
            label/landmark/image inputs they need must be in the batch).
        labels: label values for Dice/HD95 (e.g. the LUMIR list, which includes 0); None =
            every value present in the fixed label map.
        prefix: prefix of the names in ``engine.state.metrics``.
    """

    def __init__(self, metrics=("dice", "folding_pct"), labels=None, prefix: str = "val_") -> None:
        unknown = set(metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
        self.metrics = tuple(metrics)
        self.labels = None if labels is None else [int(x) for x in labels]
        self.prefix = prefix
        self.cases: dict[str, dict] = {}
        self.logger = logging.getLogger("eoir.metrics")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine | None = None) -> None:
        self.cases = {}

    def score_pair(self, item: dict, ddf) -> dict:
        """The requested metrics of one pair (``item`` = decollated batch entry, ``ddf`` = (3,H,W,D))."""
        disp = np.moveaxis(convert_to_numpy(ddf).astype(np.float32), 0, -1)
        want = set(self.metrics)
        kwargs = {}
        if want & {"dice", "hd95"}:
            fixed_label = convert_to_numpy(item["fixed_label"]).squeeze()
            labels = self.labels if self.labels is not None else np.unique(fixed_label).astype(int).tolist()
            kwargs.update(fixed_label=fixed_label, moving_label=convert_to_numpy(item["moving_label"]).squeeze(),
                          dice_labels=labels if "dice" in want else None,
                          hd95_labels=labels if "hd95" in want else None)
        if "tre" in want:
            kwargs.update(fixed_landmarks=convert_to_numpy(item["fixed_landmarks"]).squeeze(),
                          moving_landmarks=convert_to_numpy(item["moving_landmarks"]).squeeze())
        if "ndv" in want:
            kwargs.update(moving_image=convert_to_numpy(item["image"])[0])
        return evaluate_pair(disp, **kwargs)

    def update(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            name = disp_name(str(item["fixed_path"]), str(item["moving_path"]))[len("disp_"):-len(".nii.gz")]
            self.cases[name] = self.score_pair(item, out["pred"])

    def aggregates(self) -> dict[str, dict[str, float]]:
        """``{metric: {"mean", "std"}}`` over the pairs scored so far (NaN cases skipped)."""
        agg = {}
        for m in self.metrics:
            mean, std = _nanmean_std(c.get(m) for c in self.cases.values())
            agg[m] = {"mean": mean, "std": std}
        return agg

    def compute(self, engine: Engine) -> None:
        agg = self.aggregates()
        for m, v in agg.items():
            engine.state.metrics[f"{self.prefix}{m}"] = v["mean"]
        self.logger.info(
            f"{len(self.cases)} pairs: " + ", ".join(f"{m} {v['mean']:.4f} ± {v['std']:.4f}" for m, v in agg.items())
        )
