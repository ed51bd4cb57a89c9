"""Training-step benchmark: seconds and peak memory of one EOIR training step.

    python -m scripts.tools.benchmark_train_step --start_channel 32 --shape 160,224,192 \\
        [--checkpointing off,on] [--amp off] [--steps 2] [--warmup 1] [--threads 2|auto] [--device cpu|cuda]

One step is what ``configs/train.json`` runs per iteration: ``MultiScaleOutputs`` forward
(every level), the multi-scale NCC + smoothness loss (``PairLoss``, the recipe's weights),
backward and an Adam update, batch 1, on a brain-like pair (``scripts.benchmark``'s input).
Each setting (``--checkpointing`` off / on, i.e. ``train.json``'s ``activation_checkpointing``;
``--amp`` off / bf16 / fp16 autocast, GPU) runs in its own child process. Reported per
setting: seconds per step (the minimum over ``--steps`` steps after ``--warmup`` untimed ones) and the
peak memory: on CPU the child's peak resident memory (``VmHWM``, interpreter included, and its
baseline before the first step); on CUDA ``torch.cuda.max_memory_allocated`` (tensors) and
``max_memory_reserved`` (what the caching allocator took). The loss of the first step is
printed per setting: checkpointing must not change it. ``--threads auto``: the threads are
chosen as ``train.json``'s ``num_threads: "auto"`` does (:class:`scripts.threads.CpuThreads`: at the
start, then before a step once its re-check interval has passed; the choice is inside the step's
time), in torch's default environment (no ``OMP_NUM_THREADS``); the threads of each step are
reported. Output: a table, then JSON as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .benchmark import AMP_DTYPES, build_network, make_input, max_rss_gb, require_cuda, shape_argument, spawn_worker


def threads_argument(text: str) -> str | int:
    """``--threads N`` (>= 1) or ``auto`` for argparse."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--threads takes an integer >= 1 or auto, got {text!r}")
    return int(text)


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from ..network import MultiScaleOutputs
    from ..threads import CpuThreads
    from ..training import PairLoss

    device = torch.device(args.device)
    cpu_threads = CpuThreads(args.threads, device)
    if args.threads == "auto":
        cpu_threads.choose()  # as when the trainer starts
    else:
        torch.set_num_threads(args.threads)
    amp_dtype = AMP_DTYPES[args.amp]
    net = build_network(args.start_channel, None, args.seed).to(device)
    model = MultiScaleOutputs(net, activation_checkpointing=args.checkpointing == "on").train()
    loss_fn = PairLoss(ncc_weight=1.0, reg_weight=5.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4)
    x = torch.from_numpy(np.load(args.input_file))[None].to(device)  # (1, 2, D0, D1, D2)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=getattr(torch, amp_dtype)) if amp_dtype else contextlib.nullcontext():
            loss = loss_fn(model(x), x)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = max_rss_gb()
    losses, seconds, threads = [], [], []
    for i in range(args.warmup + args.steps):  # warm-up steps: allocator, kernels, Adam state
        sync()
        t0 = time.perf_counter()
        if args.threads == "auto":
            cpu_threads.update()  # as at the trainer's ITERATION_STARTED
        threads.append(torch.get_num_threads())
        losses.append(step())
        sync()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - t0)
        print(f"step {i}: {time.perf_counter() - t0:.1f} s, loss {losses[-1]:.6f}, {threads[-1]} threads",
              file=sys.stderr, flush=True)
    result = {"seconds": min(seconds), "seconds_all": seconds, "first_loss": losses[0], "torch": torch.__version__,
              "threads": threads}
    if device.type == "cuda":
        result.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                      peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9, gpu=torch.cuda.get_device_name())
    else:
        result.update(peak_rss_gb=max_rss_gb(), baseline_rss_gb=baseline)
    Path(args.result_file).write_text(json.dumps(result))
    return result


def _run_child(args: argparse.Namespace, checkpointing: str, amp: str, input_file: Path, tmp: Path) -> dict:
    result_file = tmp / f"result_{checkpointing}_{amp}.json"
    cmd = ["scripts.tools.benchmark_train_step", "--worker", "--input_file", str(input_file),
           "--result_file", str(result_file), "--start_channel", str(args.start_channel),
           "--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed), "--device", args.device, "--checkpointing", checkpointing, "--amp", amp]
    proc = spawn_worker(cmd, None if args.threads == "auto" else args.threads,
                        os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if proc.returncode != 0 or not result_file.exists():
        return {"error": f"exit {proc.returncode} (out of memory?)"}
    return json.loads(result_file.read_text())


def run_benchmark(args: argparse.Namespace) -> dict:
    settings = [(c, a) for c in args.checkpointing.split(",") for a in args.amp.split(",")]
    for c, a in settings:
        if c not in ("off", "on") or a not in AMP_DTYPES:
            raise SystemExit(f"--checkpointing takes off,on and --amp {','.join(AMP_DTYPES)}; got {c!r}, {a!r}")
        if a != "off" and args.device != "cuda":
            raise SystemExit("--amp bf16/fp16 is measured on --device cuda only")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda":
        require_cuda()
    report = {"shape": list(args.shape), "start_channel": args.start_channel, "threads": args.threads,
              "device": args.device, "steps": args.steps, "warmup": args.warmup, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="eoir_train_bench_") as tmp_name:
        tmp = Path(tmp_name)
        vols, report["input"] = make_input(args.shape, "brain", args.seed)
        input_file = tmp / "input.npy"
        np.save(input_file, vols)
        del vols
        for c, a in settings:
            print(f"running checkpointing={c} amp={a} ...", file=sys.stderr, flush=True)
            report["runs"][f"checkpointing={c},amp={a}"] = _run_child(args, c, a, input_file, tmp)
    mem = "peak_allocated_gb" if args.device == "cuda" else "peak_rss_gb"
    print(f"{'setting':<28} {'s/step':>8} {mem:>18} {'first loss':>12}")
    for name, r in report["runs"].items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
        else:
            print(f"{name:<28} {r['seconds']:>8.2f} {r[mem]:>18.2f} {r['first_loss']:>12.6f}")
    print(json.dumps(report))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m scripts.tools.benchmark_train_step",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--start_channel", type=int, default=32)
    parser.add_argument("--shape", type=shape_argument, default=(160, 224, 192))
    parser.add_argument("--threads", type=threads_argument, default=2,
                        help="CPU threads, or auto (chosen from the cores other processes leave free)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    parser.add_argument("--amp", default="off", help="off, bf16, fp16 (comma-separated; bf16/fp16 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input_file", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    return run_benchmark(args)


if __name__ == "__main__":
    main()
