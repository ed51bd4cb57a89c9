"""Inference and a training step on a CPU shared with busy processes: seconds per load and thread setting.

    python -m scripts.tools.shared_cpu [--busy 0,1,2] [--num_threads auto,2] \\
        [--cases inference,inference_io0,train_step] [--train_shape 80,112,96] [--train_start_channel 16] \\
        [--repeats 1] [--timeout 1800] [--quiet_below 0.2 --quiet_wait 3600 --attempts 3]

Every case runs under every ``--num_threads`` setting and every load of ``--busy``: that many
pure-Python busy loops in the background, each its own process, started for the run and
killed after it (also on an error or Ctrl-C; each also ends by itself after ``--timeout`` +
2 min). Each run is its own process, in a user's default environment: ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` removed. ``auto`` is the
configs' default (the threads chosen from the cores other processes leave free,
:mod:`scripts.threads`); an integer forces that many threads: the number of cores is the
behaviour before the choice existed.

Cases:
    ``inference``: ``python -m monai.bundle run inference --config_file configs/inference.json
    --num_threads X`` (the sample pair, the shipped weights, the default pipeline: network and
    instance optimisation); ``inference_io0``: the same with ``--io_iterations 0`` (network
    only). Timed: the evaluator's run (ignite's "Engine run finished" time: weights, thread
    choice, loading, registration, writing) and the whole command (start-up included).
    ``train_step``: one training step of ``configs/train.json``'s recipe
    (:mod:`scripts.tools.benchmark_train_step`'s worker, ``--threads X``; the minimum over
    ``--train_steps`` steps after one warm-up step) at ``--train_shape`` and
    ``--train_start_channel``.

Other users' load: each run reports ``external_busy``, the cores that processes not started
here kept busy during it, on average (busy time of the usable CPUs less this process's own,
its busy loops' and its runs'). ``--quiet_below C``: before each run, wait (at most
``--quiet_wait`` s) until that load is below C cores, and rerun (at most ``--attempts`` runs)
when it was not below C during the run.

Output: a table (seconds, the ratio to the same setting with no busy process, the threads
chosen as logged, the external load), then JSON as the last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..threads import busy_cores, cpus_busy_seconds, own_cpu_seconds
from .benchmark import make_input, shape_argument, spawn_worker
from .benchmark_train_step import threads_argument

CASES = ("inference", "inference_io0", "train_step")
_ENGINE_TIME = re.compile(r"Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)")
_THREADS_LINE = re.compile(r"CPU threads: ([^\n]*)")


def start_busy(count: int, lifetime: float) -> list[subprocess.Popen]:
    """``count`` pure-Python busy loops, each its own process, each ending by itself after ``lifetime`` s."""
    code = (f"# busy loop of {os.getpid()}\nimport time\nend = time.monotonic() + {lifetime}\n"
            "while time.monotonic() < end:\n    pass\n")
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def _clear_openmp_env() -> None:
    """This process's children get a user's default environment (spawn_worker copies os.environ)."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        os.environ.pop(name, None)


def run_inference(num_threads: str | int, io0: bool, out_dir: Path, timeout: float) -> dict:
    cmd = ["monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--output_dir", str(out_dir), "--num_threads", str(num_threads)]
    if io0:
        cmd += ["--io_iterations", "0"]
    t0 = time.perf_counter()
    proc = spawn_worker(cmd, None, "unset", capture_output=True, timeout=timeout)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    m = _ENGINE_TIME.search(log)
    if proc.returncode != 0 or not m:
        lines = [line for line in log.strip().splitlines() if line.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}
    seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return {"seconds": seconds, "command_seconds": wall, "threads": _THREADS_LINE.findall(log)}


def run_train_step(num_threads: str | int, args: argparse.Namespace, input_file: Path, tmp: Path) -> dict:
    result_file = tmp / "train_step.json"
    result_file.unlink(missing_ok=True)
    cmd = ["scripts.tools.benchmark_train_step", "--worker", "--input_file", str(input_file),
           "--result_file", str(result_file), "--start_channel", str(args.train_start_channel),
           "--threads", str(num_threads), "--steps", str(args.train_steps), "--warmup", "1",
           "--device", "cpu", "--checkpointing", "off", "--amp", "off"]
    proc = spawn_worker(cmd, None, "unset", capture_output=True, timeout=args.timeout)
    if proc.returncode != 0 or not result_file.exists():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}
    r = json.loads(result_file.read_text())
    return {"seconds": r["seconds"], "seconds_all": r["seconds_all"], "threads": r["threads"]}


def _own_and_reaped_seconds() -> float:
    """CPU seconds of this process, its live children (the busy loops) and its ended ones (the runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own_cpu_seconds() + r.ru_utime + r.ru_stime


def wait_until_quiet(quiet_below: float | None, max_wait: float) -> float:
    """Seconds waited until processes not started here keep less than ``quiet_below`` cores busy
    (over 2 s; at most ``max_wait`` s; None: no wait)."""
    t0 = time.monotonic()
    while quiet_below is not None and time.monotonic() - t0 < max_wait and busy_cores(2.0)[0] >= quiet_below:
        time.sleep(10.0)
    return time.monotonic() - t0


def _timed_run(busy: int, case: str, setting: str | int, args: argparse.Namespace, input_file: Path,
               tmp: Path) -> dict:
    """One run under ``busy`` busy loops (started for it, killed after it), with ``external_busy``:
    the cores that processes not started here kept busy meanwhile, on average."""
    cpus = os.sched_getaffinity(0)
    procs = start_busy(busy, args.timeout + 120.0)
    try:
        time.sleep(1.0 if busy else 0.0)  # the busy loops are running
        t0, cpu0, own0 = time.monotonic(), cpus_busy_seconds(cpus), _own_and_reaped_seconds()
        try:
            if case == "train_step":
                r = run_train_step(setting, args, input_file, tmp)
            else:
                r = run_inference(setting, case == "inference_io0", tmp / "out", args.timeout)
        except subprocess.TimeoutExpired:
            r = {"error": f"timed out after {args.timeout} s"}
        t1, cpu1, own1 = time.monotonic(), cpus_busy_seconds(cpus), _own_and_reaped_seconds()
    finally:
        stop_busy(procs)
    r["external_busy"] = round(max(0.0, (cpu1 - cpu0) - (own1 - own0)) / (t1 - t0), 2)
    return r


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores usable, {os.cpu_count()} online"


def _table(report: dict) -> str:
    rows = [f"{'busy':>4}  {'case':<14} {'num_threads':>11} {'seconds':>8} {'x idle':>7}  {'command s':>9}  "
            f"{'external':>9}  threads"]
    for r in report["runs"]:
        if "error" in r:
            rows.append(f"{r['busy']:>4}  {r['case']:<14} {r['num_threads']:>11}  {r['error']}")
            continue
        ratio = f"{r['x_idle']:.2f}" if r.get("x_idle") else "-"
        cmd_s = f"{r['command_seconds']:.1f}" if "command_seconds" in r else "-"
        threads = "; ".join(r["threads"]) if r["case"] != "train_step" else ",".join(map(str, r["threads"]))
        ext = f"{r['external_busy']:.2f}"
        rows.append(f"{r['busy']:>4}  {r['case']:<14} {r['num_threads']:>11} {r['seconds']:>8.1f} {ratio:>7}  "
                    f"{cmd_s:>9}  {ext:>9}  {threads}")
    return "\n".join(rows)


def run_benchmark(args: argparse.Namespace) -> dict:
    busy_counts = [int(b) for b in args.busy.split(",")]
    settings = [threads_argument(s) for s in args.num_threads.split(",")]
    cases = args.cases.split(",")
    if any(c not in CASES for c in cases) or any(b < 0 for b in busy_counts):
        raise SystemExit(f"--cases takes {','.join(CASES)}; --busy counts >= 0")
    _clear_openmp_env()
    report = {"machine": _machine(), "python": sys.version.split()[0], "busy": busy_counts,
              "num_threads": settings, "cases": cases, "train_shape": list(args.train_shape),
              "train_start_channel": args.train_start_channel, "repeats": args.repeats, "runs": []}
    print(f"machine: {report['machine']}; load average before: {os.getloadavg()}", file=sys.stderr, flush=True)
    idle: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory(prefix="eoir_shared_cpu_") as tmp_name:
        tmp = Path(tmp_name)
        input_file = tmp / "train_input.npy"
        if "train_step" in cases:
            np.save(input_file, make_input(args.train_shape, "brain", 0)[0])
        for rep, busy, case, setting in itertools.product(range(args.repeats), busy_counts, cases, settings):
            for attempt in range(1, args.attempts + 1):
                waited = wait_until_quiet(args.quiet_below, args.quiet_wait)
                print(f"busy {busy}, {case}, num_threads {setting}, run {rep + 1}, attempt {attempt} ...",
                      file=sys.stderr, flush=True)
                r = _timed_run(busy, case, setting, args, input_file, tmp)
                r.update(busy=busy, case=case, num_threads=setting, run=rep + 1, attempt=attempt,
                         waited_for_quiet_s=round(waited))
                print(f"  {json.dumps(r)}", file=sys.stderr, flush=True)
                if args.quiet_below is None or r["external_busy"] <= args.quiet_below:
                    break
            if "seconds" in r:
                if busy == 0:
                    idle.setdefault((case, setting), r["seconds"])
                if (case, setting) in idle:
                    r["x_idle"] = r["seconds"] / idle[(case, setting)]
            report["runs"].append(r)
    print(_table(report))
    print(json.dumps(report))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.shared_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", default="0,1,2", help="numbers of busy background processes (comma-separated)")
    parser.add_argument("--num_threads", default=f"auto,{len(os.sched_getaffinity(0))}",
                        help="settings compared (auto and/or integers; default: auto and the number of cores)")
    parser.add_argument("--cases", default=",".join(CASES), help=",".join(CASES))
    parser.add_argument("--train_shape", type=shape_argument, default=(80, 112, 96))
    parser.add_argument("--train_start_channel", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=1, help="timed training steps after one warm-up step")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every case and setting per load")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    parser.add_argument("--quiet_below", type=float, default=None,
                        help="before each run, wait until processes not started here keep fewer cores busy; "
                        "rerun a run during which they kept as many busy on average (default: no wait)")
    parser.add_argument("--quiet_wait", type=float, default=3600.0, help="seconds to wait for quiet at most")
    parser.add_argument("--attempts", type=int, default=3, help="runs at most per measurement with --quiet_below")
    report = run_benchmark(parser.parse_args(argv))
    if any("error" in r for r in report["runs"]):
        raise SystemExit("some runs failed (see the table)")
    return report


if __name__ == "__main__":
    main()
