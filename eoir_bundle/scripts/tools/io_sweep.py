"""Instance optimisation swept over its iteration budget on synthetic pairs with known anatomy.

    python -m scripts.tools.io_sweep --shape 64,96,64 --pairs 4 [--ckpt models/model.pt --start_channel 16]

Prints a Markdown table (Dice, NCC, NDV, seconds per budget); a developer tool.
"""

from __future__ import annotations

import time
import warnings

import torch
from monai.networks.blocks import Warp

from ..errors import InputError, exit_on_input_error
from ..instance_optimization import InstanceOptimizationInferer
from ..losses import local_ncc_loss



def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in str(text).replace("x", ",").split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None


def measure(shape=(64, 96, 64), pairs: int = 4, iterations=(0, 25, 50, 100, 200), seed: int = 0,
            ckpt: str | None = None, start_channel: int = 16, **io_kwargs) -> list[dict]:
    """Mean Dice / local NCC / max NDV and seconds of IO on synthetic pairs with known anatomy.

    Pairs: two :func:`scripts.synthetic.lumir.random_subject` of the template at ``shape``
    (seeds ``seed + 2k``, ``seed + 2k + 1``), moving and fixed. Network: EOIR with the weights of
    ``ckpt``, run once per pair (its wall seconds are reported apart); ``None``: the identity, i.e.
    the zero field that an EOIR with zero flow weights returns, without running it. Dice: mean
    over labels 1..34 of the moving label map warped with nearest neighbour
    (:func:`scripts.evaluation.metrics.warp_nearest`); NCC: ``1 - local_ncc_loss`` (9^3) of the
    trilinearly warped moving image and the fixed image at full resolution; NDV:
    :func:`scripts.evaluation.metrics.ndv` (%, the maximum over the pairs); seconds: wall and CPU
    (process) time of the inferer's call without the network, mean over the pairs.
    """
    import numpy as np

    from ..checkpoint import load_weights
    from ..synthetic.lumir import NUM_LABELS, random_subject, template_volumes
    from ..network import EOIR
    from ..evaluation.metrics import dice_per_label, ndv, warp_nearest

    t1, labels, _ = template_volumes(shape)
    net = load_weights(EOIR(start_channel=start_channel), ckpt).eval() if ckpt else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warp = Warp(mode="bilinear", padding_mode="zeros")
    data, net_seconds = [], []
    for k in range(pairs):
        mi, ml, _, _ = random_subject(t1, labels, rng=seed + 2 * k)
        fi, fl, _, _ = random_subject(t1, labels, rng=seed + 2 * k + 1)
        x = torch.from_numpy(np.stack([mi, fi]).astype(np.float32) / 255.0)[None]
        t = time.perf_counter()
        with torch.no_grad():
            u_net = net(x) if net is not None else torch.zeros(1, 3, *shape)
        net_seconds.append(time.perf_counter() - t)
        data.append((x, u_net, mi, ml, fl))
    if net is not None:
        print(f"network: {np.mean(net_seconds):.1f} s per pair (wall)")
    rows = []
    for n in iterations:
        inferer = InstanceOptimizationInferer(io_iterations=n, **io_kwargs)
        per = []
        for x, u_net, mi, ml, fl in data:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            with torch.no_grad():
                ddf = inferer(x, lambda _x, _u=u_net: _u)  # the network's field, computed once above
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            disp = ddf[0].permute(1, 2, 3, 0).numpy()
            d = dice_per_label(fl, warp_nearest(ml, disp), range(1, NUM_LABELS + 1), moving_lab=ml)
            with torch.no_grad():
                ncc = 1.0 - float(local_ncc_loss(warp(x[:, :1], ddf), x[:, 1:], window=9))
            per.append((float(np.nanmean(list(d.values()))), ncc, ndv(disp, mi), wall, cpu))
        a = np.array(per)
        rows.append({"iterations": n, "dice": a[:, 0].mean(), "ncc": a[:, 1].mean(), "ndv_max": a[:, 2].max(),
                     "seconds": a[:, 3].mean(), "cpu_seconds": a[:, 4].mean()})
        r = rows[-1]
        print(f"| {n} | {r['dice']:.4f} | {r['ncc']:.4f} | {r['ndv_max']:.5f} | {r['seconds']:.1f} | "
              f"{r['cpu_seconds']:.1f} |", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    """Command line of :func:`measure` (prints a Markdown table)."""
    import argparse

    p = argparse.ArgumentParser(description="Measure instance optimisation on synthetic pairs.")
    p.add_argument("--shape", default="64,96,64")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--iterations", default="0,25,50,100,200")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default=None, help="bundle checkpoint (default: identity network)")
    p.add_argument("--start_channel", type=int, default=16)
    p.add_argument("--io_learning_rate", type=float, default=0.1)
    p.add_argument("--io_reg_weight", type=float, default=3.0)
    p.add_argument("--io_level", type=int, default=1)
    p.add_argument("--io_levels", type=int, default=2)
    p.add_argument("--io_ncc_window", type=int, default=9)
    p.add_argument("--exact_gradient", action="store_true")
    a = p.parse_args(argv)
    print(f"shape {a.shape}, {a.pairs} pairs, network {a.ckpt or 'identity'}, level {a.io_level}, "
          f"levels {a.io_levels}, lr {a.io_learning_rate}, reg {a.io_reg_weight}, torch threads {torch.get_num_threads()}")
    print("| iterations | Dice | NCC | NDV max (%) | IO wall s | IO CPU s |\n|---|---|---|---|---|---|")
    return measure(tuple(_parse_ints(a.shape, "--shape")), a.pairs, _parse_ints(a.iterations, "--iterations"),
                   a.seed, a.ckpt, a.start_channel, io_learning_rate=a.io_learning_rate,
                   io_reg_weight=a.io_reg_weight, io_level=a.io_level, io_levels=a.io_levels, io_ncc_window=a.io_ncc_window,
                   exact_gradient=a.exact_gradient)


if __name__ == "__main__":
    exit_on_input_error(main)()
