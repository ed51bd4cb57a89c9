"""CPU threads on a shared machine: as many torch threads as the cores other processes leave free.

Why: torch's CPU kernels run as OpenMP parallel regions, and every region ends in a barrier
at which the team waits for its slowest thread. When another process keeps a core busy, the
thread that shares that core is descheduled for a time slice at a time, and each barrier
waits for it (the memory-lean path runs many small regions): on 2 cores one pure-Python busy
loop made inference 2.5-3x slower, one single-threaded ANTs job about 10x. One thread fewer
than the free cores has no barrier to wait at. ``OMP_WAIT_POLICY=PASSIVE`` also helps, but
libgomp reads it when torch is imported, before any bundle code runs: setting it from here has
no effect.

How (``num_threads="auto"``): over :data:`SAMPLE_SECONDS` (this process idle), the busy time
of the CPUs this process may run on (``os.sched_getaffinity``, ``/proc/stat``), less this
process's own (its threads and child processes, e.g. data-loader workers), is the number of
cores other processes keep busy; rounded, the rest are free. Threads: the free cores, at
least 1, at most torch's thread count when this module was imported (``OMP_NUM_THREADS`` or
torch's default). :class:`CpuThreads` chooses when its engine starts and again before an
iteration (a pair in inference, a step in training) once :data:`RECHECK_SECONDS` have passed
since the last choice; it logs the choice once (logger ``eoir.threads``, INFO) and again
only when it changes. An integer ``num_threads`` forces that count. On a CUDA device nothing
changes (logged once). Without ``/proc/stat`` (not Linux) torch's default is kept.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from ignite.engine import Engine, Events

from .errors import InputError

__all__ = ["CpuThreads", "busy_cores", "choose_threads", "check_num_threads", "cpus_busy_seconds", "own_cpu_seconds",
           "DEFAULT_THREADS"]

logger = logging.getLogger("eoir.threads")

#: seconds over which the other processes' CPU time is measured (this process idle)
SAMPLE_SECONDS = 0.2
#: seconds between two choices (each costs :data:`SAMPLE_SECONDS`)
RECHECK_SECONDS = 10.0
#: torch's thread count before any choice: the most threads chosen
DEFAULT_THREADS = torch.get_num_threads()
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def check_num_threads(value: Any) -> str | int:
    """``"auto"`` or an int >= 1, else :class:`InputError`."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise InputError(f"num_threads must be \"auto\" or an integer >= 1, got {value!r}")


def cpus_busy_seconds(cpus: set[int]) -> float:
    """Busy seconds (all but idle and iowait) of ``cpus`` since boot, from ``/proc/stat``."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                if int(name[3:]) in cpus:
                    v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
                    total += sum(v) - v[3] - v[4]
    return total / _TICKS


def own_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) and its live descendants."""
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue
    return total / _TICKS


def busy_cores(seconds: float = SAMPLE_SECONDS) -> tuple[float, int]:
    """``(busy, cores)``: how many of this process's ``cores`` other processes kept busy over the
    next ``seconds`` (this call sleeps); ``OSError`` where ``/proc`` cannot tell."""
    cpus = os.sched_getaffinity(0)
    t0, busy0, own0 = time.monotonic(), cpus_busy_seconds(cpus), own_cpu_seconds()
    time.sleep(seconds)
    t1, busy1, own1 = time.monotonic(), cpus_busy_seconds(cpus), own_cpu_seconds()
    others = ((busy1 - busy0) - (own1 - own0)) / (t1 - t0)
    return min(max(others, 0.0), float(len(cpus))), len(cpus)


def choose_threads(num_threads: str | int = "auto") -> tuple[int, str]:
    """``(threads, why)``: ``num_threads`` itself when an int, else the cores other processes
    leave free (rounded), at least 1, at most :data:`DEFAULT_THREADS`."""
    if check_num_threads(num_threads) != "auto":
        return int(num_threads), f"num_threads={num_threads}"
    try:
        busy, cores = busy_cores()
    except (OSError, AttributeError):  # no /proc/stat or no sched_getaffinity
        return DEFAULT_THREADS, "auto; CPU load unknown: torch's default"
    free = cores - int(busy + 0.5)
    return max(1, min(DEFAULT_THREADS, free)), f"auto; other processes busy on {busy:.1f} of {cores} cores"


class CpuThreads:
    """Engine handler: torch's CPU thread count from ``num_threads`` (``"auto"`` or an int; see
    the module docstring).

    Args:
        num_threads: ``"auto"`` (the cores other processes leave free) or an int to force.
        device: the engine's device; on CUDA the thread count is left as it is (logged once).
        recheck_seconds: seconds between two choices of ``"auto"``.

    When the engine completes, torch's thread count is set back to what it was at its start.
    """

    def __init__(self, num_threads: str | int = "auto", device: Any = "cpu",
                 recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.num_threads = check_num_threads(num_threads)
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        self.recheck_seconds = float(recheck_seconds)
        self.threads: int | None = None  # the current choice
        self._checked = -float("inf")
        self._before: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        if not self.on_cpu:
            if self.threads is None:
                self.threads = torch.get_num_threads()
                logger.info(f"CPU threads: left at {self.threads} (device {self.device})")
            return
        self._before = torch.get_num_threads()
        self.choose()

    def _iteration_started(self, engine: Engine) -> None:
        self.update()

    def _completed(self, engine: Engine) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None

    def update(self) -> None:
        """Choose again (``"auto"`` on a CPU) once ``recheck_seconds`` have passed since the last choice."""
        if self.on_cpu and self.num_threads == "auto" and time.monotonic() - self._checked >= self.recheck_seconds:
            self.choose()

    def choose(self) -> int:
        """Choose, set and (when changed) log the thread count; returns it."""
        if self.threads is not None and self.num_threads != "auto":
            torch.set_num_threads(self.threads)
            return self.threads
        threads, why = choose_threads(self.num_threads)
        self._checked = time.monotonic()
        torch.set_num_threads(threads)
        if threads != self.threads:
            logger.info(f"CPU threads: {threads} ({why})")
        self.threads = threads
        return threads
