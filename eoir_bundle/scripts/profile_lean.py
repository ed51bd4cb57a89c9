"""Where the lean CPU path's time goes: seconds per phase of one ``lean_forward`` call.

    python -m scripts.profile_lean --start_channel 32 --shape 160,224,192 --threads 2 [--ops 15]

Same input and weights as ``python -m scripts.benchmark`` (its ``--input brain`` pair, seeded
weights). Phases: each image's encoder (``encode``), each level's flow estimator
(``_estimate``, coarsest first) and integration (``_integrate``), and the rest (the keep
masks and storage plan, the pyramid, the compositions). ``--ops N`` also runs ``torch.profiler`` and lists the N operators with the most
time (the profiler slows the run a little). One process, one run: numbers vary by a few
percent with the machine's state; compare runs made one after the other.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Sequence

PHASES = ("encode", "_estimate", "_integrate")


def profile(start_channel: int, shape: Sequence[int], threads: int, ops: int = 0) -> dict:
    import torch

    from . import lean_inference
    from .benchmark import build_network, make_input

    torch.set_num_threads(threads)
    vols, kind = make_input(shape, "brain", 0)
    net = build_network(start_channel, None, 0)
    x = torch.from_numpy(vols)[None]
    times = {name: [] for name in PHASES}
    real = {name: getattr(lean_inference, name) for name in PHASES}

    def timed(name):
        @functools.wraps(real[name])
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = real[name](*args, **kwargs)
            times[name].append(round(time.perf_counter() - t0, 2))
            return out

        return run

    for name in PHASES:
        setattr(lean_inference, name, timed(name))
    try:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if ops else None
        t0 = time.perf_counter()
        if prof is not None:
            with prof:
                lean_inference.lean_forward(net, x)
        else:
            lean_inference.lean_forward(net, x)
        total = time.perf_counter() - t0
    finally:
        for name in PHASES:
            setattr(lean_inference, name, real[name])
    report = {
        "shape": list(shape), "start_channel": start_channel, "threads": threads, "input": kind,
        "seconds": round(total, 2),
        "encoders (fixed, moving)": times["encode"],
        "estimators (level 4 .. 0)": times["_estimate"],
        "integration (level 4 .. 0)": times["_integrate"],
        "rest": round(total - sum(sum(v) for v in times.values()), 2),
    }
    if prof is not None:
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:ops]
        report["top_ops_seconds"] = {e.key: round(e.self_cpu_time_total / 1e6, 2) for e in top}
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    from .benchmark import parse_shape

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start_channel", type=int, default=32)
    parser.add_argument("--shape", type=parse_shape, default=(160, 224, 192))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", type=int, default=0, help="also list the N operators with the most time")
    args = parser.parse_args(argv)
    report = profile(args.start_channel, args.shape, args.threads, args.ops)
    for key, value in report.items():
        print(f"{key}: {value}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
