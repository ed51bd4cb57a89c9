"""Glue between EOIR and MONAI's ``SupervisedTrainer``: the unsupervised loss adapter, the
batch preparation, per-term logging with ETA, and finding the checkpoint to resume from.

The trainer's batch ``image`` is ``cat([moving, fixed], 1)``; there is no label: the
"label" handed to the loss is the same image pair, and the network (:class:`scripts.network.MultiScaleOutputs`,
training mode) returns ``{"ddf", "velocities", "displacements"}``.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time

import torch
from ignite.engine import Engine, Events

from .losses import EOIRLoss
from .evaluation.qc import to_tensorboard_image


def prepare_pair_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """``(inputs, targets)`` for the trainer: the pair ``image`` twice (unsupervised)."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image, image


class PairLoss(torch.nn.Module):
    """``SupervisedTrainer``'s ``loss_function(pred, label)`` for EOIR: the multi-scale loss.

    ``pred`` is the network's training output, ``label`` the input pair ``(B, 2, ...)``.
    Returns the total loss; the detached terms of the last call stay in ``self.terms``
    (``ncc``, ``reg``, ``ncc_l{l}``, ``reg_l{l}``) for :class:`TrainingLogger`.
    """

    def __init__(self, **loss_kwargs) -> None:
        super().__init__()
        self.loss = EOIRLoss(**loss_kwargs)
        self.terms: dict[str, float] = {}

    def forward(self, pred: dict, label: torch.Tensor) -> torch.Tensor:
        out = self.loss(label[:, :1], label[:, 1:2], pred["velocities"], pred["displacements"])
        self.terms = {k: v for k, v in out.items() if k != "loss"}
        return out["loss"]


class TrainingLogger:
    """Per-iteration TensorBoard scalars (loss, each term, lr) and a progress line with ETA.

    Args:
        loss: the :class:`PairLoss` whose ``terms`` are logged.
        optimizer: for the learning rate.
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (or None: log only).
        log_every: iterations between progress lines.
    """

    def __init__(self, loss: PairLoss, optimizer, summary_writer=None, log_every: int = 10) -> None:
        self.loss, self.optimizer, self.writer = loss, optimizer, summary_writer
        self.log_every = max(1, int(log_every))
        self.logger = logging.getLogger("eoir.train")
        self._t0, self._it0 = 0.0, None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._first_iteration)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _first_iteration(self, engine: Engine) -> None:
        if self._it0 is None:  # lazily: a resumed run starts at the checkpoint's iteration
            self._t0, self._it0 = time.perf_counter(), engine.state.iteration - 1

    def __call__(self, engine: Engine) -> None:
        it = engine.state.iteration
        output = engine.state.output[0] if isinstance(engine.state.output, list) else engine.state.output
        loss = float(output["loss"].detach())
        lr = self.optimizer.param_groups[0]["lr"]
        terms = {k: float(v) for k, v in self.loss.terms.items()}
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, it)
            self.writer.add_scalar("train/lr", lr, it)
            for k, v in terms.items():
                self.writer.add_scalar(f"train/{k}", v, it)
        if it % self.log_every == 0 or it == engine.state.epoch_length * engine.state.max_epochs:
            done = it - self._it0
            per_it = (time.perf_counter() - self._t0) / max(done, 1)
            total = engine.state.epoch_length * engine.state.max_epochs
            eta = per_it * (total - it)
            self.logger.info(
                f"epoch {engine.state.epoch}/{engine.state.max_epochs} iter {it}/{total} "
                f"loss {loss:.4f} (ncc {terms.get('ncc', float('nan')):.4f} reg {terms.get('reg', float('nan')):.4f}) "
                f"lr {lr:.2e} | {per_it:.2f} s/it, ETA {_hms(eta)}"
            )


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


_EPOCH = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint_epoch=N.pt`` in ``output_dir`` (what a rerun resumes from), else None."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(str(output_dir)), "checkpoint_epoch=*.pt"))
             if (m := _EPOCH.search(p))]
    return max(found)[1] if found else None


class TensorBoardSnapshot:
    """Evaluator handler: after each validation, the first pair's middle slices (moving, fixed,
    warped moving, deformed grid) as one TensorBoard image (``val/snapshot``).

    Args:
        summary_writer: the training run's ``SummaryWriter``.

    The step is the evaluator's epoch, which MONAI's ``ValidationHandler`` sets to the trainer's.
    """

    def __init__(self, summary_writer) -> None:
        self.writer = summary_writer
        self._first = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        if self._first is None:
            item, out = engine.state.batch[0], engine.state.output[0]
            image = item["image"].detach().cpu().numpy()
            self._first = (image[1], image[0], out["pred"].detach().cpu().numpy())

    def __call__(self, engine: Engine) -> None:
        if self._first is None:
            return
        fixed, moving, ddf = self._first
        self.writer.add_image("val/snapshot", to_tensorboard_image(fixed, moving, ddf), engine.state.epoch, dataformats="CHW")


class GradientClipping:
    """Clip the gradient norm after ``backward`` and before the optimizer step (MONAI's
    ``IterationEvents.BACKWARD_COMPLETED``); with AMP the gradients are unscaled first.

    Args:
        max_norm: largest allowed total L2 norm of the network's gradients.
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
