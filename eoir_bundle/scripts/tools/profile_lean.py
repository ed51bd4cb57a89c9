"""Where the lean CPU path's time goes: seconds per phase of one ``lean_forward`` call.

    python -m scripts.tools.profile_lean --start_channel 32 --shape 160,224,192 --threads 2 [--ops 15]

Same input and weights as ``python -m scripts.benchmark`` (its ``--input brain`` pair, seeded
weights). Phases: each image's encoder, each level's flow estimator (coarsest first) and
integration, and the rest (the keep masks and storage plan, the pyramid, the compositions),
read from the ``lean.*`` ``torch.profiler.record_function`` ranges that ``lean_forward``
opens (:mod:`scripts.lean.forward`): the run is profiled with ``torch.profiler`` (CPU
activity only; it slows the run a little). ``--ops N`` also lists the N operators with the
most time. One process, one run: numbers vary by a few percent with the machine's state;
compare runs made one after the other.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

# report key -> the prefix of its record_function ranges (one range per image or level, in run order)
PHASES = {
    "encoders (fixed, moving)": "lean.encode.",
    "estimators (level 4 .. 0)": "lean.estimate.",
    "integration (level 4 .. 0)": "lean.integrate.",
}
TOTAL = "lean.forward"  # the range around the whole lean_forward call


def profile(start_channel: int, shape: Sequence[int], threads: int, ops: int = 0) -> dict:
    import torch

    from ..lean import lean_forward
    from .benchmark import build_network, make_input

    torch.set_num_threads(threads)
    vols, kind = make_input(shape, "brain", 0)
    net = build_network(start_channel, None, 0)
    x = torch.from_numpy(vols)[None]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        lean_forward(net, x)
    events = prof.events()
    ranges = sorted((e for e in events if e.name.startswith("lean.")), key=lambda e: e.time_range.start)
    total = sum(e.cpu_time_total for e in ranges if e.name == TOTAL) / 1e6
    times = {key: [round(e.cpu_time_total / 1e6, 2) for e in ranges if e.name.startswith(prefix)]
             for key, prefix in PHASES.items()}
    report = {"shape": list(shape), "start_channel": start_channel, "threads": threads, "input": kind,
              "seconds": round(total, 2), **times,
              "rest": round(total - sum(sum(v) for v in times.values()), 2)}
    if ops:
        operators = [e for e in prof.key_averages() if not e.key.startswith("lean.")]
        top = sorted(operators, key=lambda e: -e.self_cpu_time_total)[:ops]
        report["top_ops_seconds"] = {e.key: round(e.self_cpu_time_total / 1e6, 2) for e in top}
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    from .benchmark import shape_argument

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start_channel", type=int, default=32)
    parser.add_argument("--shape", type=shape_argument, default=(160, 224, 192))
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
