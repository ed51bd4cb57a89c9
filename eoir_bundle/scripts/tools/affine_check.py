"""How consistently and how fast preprocessing aligns a scan: the scan and copies of it seen
through known random affines are each preprocessed, and each copy's affine is compared with the
scan's own.

    python -m scripts.tools.affine_check SCAN [SCAN ...] [--copies 1] [--seed 0] [--output check.json]

For a copy ``copy(y) = scan(R y)`` (:func:`scripts.synthetic.raw_scan.random_affine`: rotations
up to 15 degrees, translations up to 20 mm, scaling 0.9-1.1; another grid and orientation),
perfect preprocessing finds ``R @ mni_to_copy == mni_to_scan``. The error is the distance (mm)
between the two maps' images of the MNI152 brain mask's voxel centres (2 mm grid): mean and
maximum per copy. Seconds are wall and CPU of :func:`scripts.preprocessing.pipeline.preprocess_scan`
alone (the template is loaded before the clock starts). One line per run, then a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..file_io import atomic_write_text, read_image
from ..mni import template_on_grid
from ..preprocessing.assess import WORK_SHAPE
from ..preprocessing.pipeline import preprocess_scan
from ..synthetic.raw_scan import grid_points, moving_grid, random_affine, sample

GRID = (160, 224, 192)


def _timed(array: np.ndarray, affine: np.ndarray, name: str) -> tuple[dict, float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = preprocess_scan(array, affine, name, GRID)
    return out, time.perf_counter() - t, time.process_time() - c


def check(paths: list[str], copies: int = 1, seed: int = 0) -> dict:
    """``{"runs": [...], "summary": {...}}`` for the scans ``paths`` (module docstring)."""
    tmpl = template_on_grid(WORK_SHAPE)
    z = grid_points(tmpl["affine"], WORK_SHAPE)[:, np.asarray(tmpl["mask"], bool).ravel()]
    z = np.vstack([z, np.ones(z.shape[1])])
    rng = np.random.default_rng(seed)
    runs = []
    for path in paths:
        array, affine = read_image(path, "scan")
        array = np.asarray(array, np.float32)
        name = Path(path).name
        ref, wall, cpu = _timed(array, affine, name)
        runs.append({"scan": name, "copy": None, "wall_s": wall, "cpu_s": cpu, **ref["quality"]})
        print(f"{name}: {wall:.1f} s ({cpu:.1f} s CPU), brain Dice with the template {ref['quality']['brain_dice']:.3f}", flush=True)
        centre = affine[:3, :3] @ ((np.array(array.shape) - 1) / 2) + affine[:3, 3]
        for k in range(copies):
            r = random_affine(rng, centre)
            m_affine, m_shape = moving_grid(affine, array.shape, r)
            moved = sample(array, affine, r[:3, :3] @ grid_points(m_affine, m_shape) + r[:3, 3:], m_shape)
            out, wall, cpu = _timed(moved, m_affine, f"{name} copy {k + 1}")
            err = np.linalg.norm((r @ out["mni_to_scan"] @ z - ref["mni_to_scan"] @ z)[:3], axis=0)
            runs.append({"scan": name, "copy": k + 1, "wall_s": wall, "cpu_s": cpu, "error_mean_mm": float(err.mean()),
                         "error_max_mm": float(err.max()), **out["quality"]})
            print(f"{name} copy {k + 1}: {wall:.1f} s ({cpu:.1f} s CPU), affine error mean {err.mean():.2f} mm, "
                  f"max {err.max():.2f} mm", flush=True)
    copies_run = [r for r in runs if r["copy"] is not None]
    summary = {
        "runs": len(runs),
        "wall_s_mean": float(np.mean([r["wall_s"] for r in runs])),
        "cpu_s_mean": float(np.mean([r["cpu_s"] for r in runs])),
        "error_mean_mm": float(np.mean([r["error_mean_mm"] for r in copies_run])) if copies_run else None,
        "error_max_mm": float(np.max([r["error_max_mm"] for r in copies_run])) if copies_run else None,
    }
    print("summary: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return {"scans": list(paths), "copies": copies, "seed": seed, "runs": runs, "summary": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scans", nargs="+", help="T1w scans (any format the bundle reads)")
    parser.add_argument("--copies", type=int, default=1, help="random-affine copies per scan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="write the runs and summary as JSON")
    args = parser.parse_args(argv)
    try:
        result = check(args.scans, args.copies, args.seed)
    except InputError as e:
        print(f"error: {e}")
        return 2
    if args.output:
        atomic_write_text(json.dumps(result, indent=1), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
