"""Plot a training run's TensorBoard scalars to one PNG: loss terms per iteration and
validation Dice / folding per epoch.

Usage (from the bundle folder)::

    python -m scripts.tools.plot_training runs/train docs/training_curve.png
"""

from __future__ import annotations

import argparse

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError, exit_on_input_error
from ..file_io import atomic_write


def _scalars(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise InputError(f"{run_dir}: no TensorBoard scalars found")
    return {t: (np.array([e.step for e in acc.Scalars(t)]), np.array([e.value for e in acc.Scalars(t)])) for t in tags}


def _smooth(y: np.ndarray, n: int = 20) -> np.ndarray:
    n = max(1, min(n, len(y)))
    return np.convolve(y, np.ones(n) / n, mode="valid")


@exit_on_input_error
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.tools.plot_training", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="the training output_dir (TensorBoard events)")
    ap.add_argument("output", help="PNG to write")
    a = ap.parse_args(argv)
    s = _scalars(a.run_dir)
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for tag in ("train/loss", "train/ncc", "train/reg"):
        if tag in s:
            x, y = s[tag]
            ax1.plot(x, y, alpha=0.25)
            ax1.plot(x[len(x) - len(_smooth(y)):], _smooth(y), label=f"{tag} (mean of 20)")
    ax1.set_xlabel("iteration")
    ax1.set_title("training loss (multi-scale NCC + 5 x smoothness)")
    ax1.legend()
    if "val_dice" in s:
        x, y = s["val_dice"]
        ax2.plot(x, y, "o-", label="validation Dice")
    if "val_folding_pct" in s:
        x, y = s["val_folding_pct"]
        ax2.plot(x, y / 100.0, "s--", label="folding fraction")
    ax2.set_xlabel("epoch")
    ax2.set_title("validation")
    ax2.legend()
    fig.tight_layout()
    atomic_write(a.output, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
