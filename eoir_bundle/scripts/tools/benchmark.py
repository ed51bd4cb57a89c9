"""CPU inference benchmark: seconds and peak memory per registered pair, per inference path.

    python -m scripts.benchmark --start_channel 32 --shape 160,224,192 --threads 2 \\
        [--paths reference,lean,authors] [--repeats 1] [--warmup 0] [--ckpt models/model.pt] \\
        [--input brain|random] [--seed 0] [--omp_wait_policy inherit|passive|active]
    python -m scripts.benchmark --device cuda --start_channel 32 --amp off,bf16 --warmup 1 --repeats 3

Paths (default: all three on a CPU; ``authors`` only for sizes that are multiples of 16):
    ``reference``: the straightforward ``EOIR.forward`` under ``torch.no_grad()``;
    ``lean``: :func:`scripts.lean.lean_forward` (same weights, same field);
    ``authors``: the straightforward implementation as the authors wrote it, restated in
    plain torch (:mod:`scripts.tools.authors_layout`: their module layout, stored identity grids,
    plain ``grid_sample``; same weights, same field).

Each path runs in its own child process (``python -m scripts.benchmark --worker PATH ...``)
with ``torch.set_num_threads(threads)`` (and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``; the
OpenMP wait policy is the caller's environment, as for inference, unless ``--omp_wait_policy
passive|active`` sets ``OMP_WAIT_POLICY`` for both: on a machine shared with other jobs use
``passive``, since libgomp's spinning threads then make every parallel region wait for a
time slice, which distorts timings 2-20x), on the same input and the same weights: ``--ckpt`` (a
state dict for ``EOIR``) or a deterministic ``torch.manual_seed(seed)`` initialisation whose
flow convolutions are scaled up so the fields are several voxels large (the default
initialisation gives near-zero fields, which would make the field comparison
meaningless). Input: ``brain`` (default) = two synthetic subjects made from the MNI152
template by :mod:`scripts.synthetic.lumir` (uint8 / 255, zero background, like LUMIR),
``random`` = two smooth random volumes (no background); both fixed by ``--seed``.

Measured per path: seconds per pair (wall clock, the minimum over ``--repeats`` timed runs,
after ``--warmup`` untimed runs; start-up, imports, weight and input loading excluded), CPU
seconds of the same run, and the child's peak resident memory (``VmHWM``, else
``ru_maxrss``). The peak includes the interpreter, torch and MONAI, the weights and the
input (about 0.5 GB), also reported alone as ``baseline_rss_gb``. The fields are saved by
the workers and compared: ``max_abs_diff_voxels`` is the largest difference of any path
from ``reference``.

GPU (``--device cuda``): the path that inference runs on a GPU, ``reference`` (``LeanEOIR``
is ``EOIR.forward`` there), once per ``--amp`` setting (``off``: float32; ``bf16`` / ``fp16``:
``torch.autocast``, named ``reference+bf16`` ...), each in its own process; seconds between
``torch.cuda.synchronize()`` calls, and peak GPU memory as ``torch.cuda.max_memory_allocated``
(tensors: weights, input, activations) and ``max_memory_reserved`` (what the caching
allocator took); an autocast field is compared with the float32 one.

Output: a readable table, then, as the last line, JSON::

    {"device": "cpu", "shape": [...], "start_channel": 32, "threads": 2,
     "paths": {"reference": {"seconds": s, "peak_rss_gb": g, "amp": "off", ...}, "lean": {...}},
     "ratio": {"time": lean/ref, "memory": lean/ref}, "ratio_authors": {"time": lean/authors, ...},
     "max_abs_diff_voxels": d, "max_abs_diff_voxels_per_path": {"lean": d1, "authors": d2}, ...}

(on cuda the paths are ``reference``, ``reference+bf16`` ..., each with ``peak_allocated_gb``,
``peak_reserved_gb`` and ``gpu``; ``ratio`` is null)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..geometry import parse_shape

PATHS = ("reference", "lean", "authors")
RATIOS = (("ratio", "reference"), ("ratio_authors", "authors"))  # report key: lean / that path
AMP_DTYPES = {"off": None, "bf16": "bfloat16", "fp16": "float16"}
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
FLOW_WEIGHT_STD = 0.05  # flow-conv init for benchmark weights: fields of a few voxels


def shape_argument(text: str) -> tuple[int, int, int]:
    """``--shape H,W,D`` for argparse (:func:`scripts.geometry.parse_shape`, any positive sizes)."""
    try:
        return parse_shape(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# =========================================================================================
# Input
# =========================================================================================


def _smooth_random(shape: Sequence[int], seed: int) -> np.ndarray:
    """Two smooth random volumes in [0, 1] (trilinear upsampling of coarse noise)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(2, 1, *[max(2, s // 8) for s in shape], generator=g)
    vols = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    vols = vols + 0.05 * torch.rand(2, 1, *shape, generator=g)
    return vols.clamp_(0, 1)[:, 0].numpy().astype(np.float32)


def _brain_pair(shape: Sequence[int], seed: int) -> np.ndarray:
    """Two synthetic LUMIR-like subjects (uint8 / 255) from :mod:`scripts.synthetic.lumir`."""
    from ..synthetic.lumir import random_subject, template_volumes

    t1, _, _ = template_volumes(tuple(shape))
    vols = [random_subject(t1, None, None, rng=seed * 2 + k)[0] for k in range(2)]
    return np.stack(vols).astype(np.float32) / 255.0


def make_input(shape: Sequence[int], kind: str, seed: int) -> tuple[np.ndarray, str]:
    """``(2, D0, D1, D2)`` float32 = (moving, fixed), and the input kind actually used."""
    if kind == "brain":
        try:
            return _brain_pair(shape, seed), "brain"
        except ImportError as exc:  # nilearn missing: fall back, and say so
            print(f"note: brain-like input unavailable ({exc}); using smooth random volumes", file=sys.stderr)
    return _smooth_random(shape, seed), "random"


# =========================================================================================
# Worker (one path, its own process)
# =========================================================================================


def max_rss_gb() -> float:
    """Peak resident set size of this process in GB.

    ``VmHWM`` where /proc has it: ``ru_maxrss`` survives ``exec``, so a worker would report
    its parent's size at the time of the fork if that were larger.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return kb * (1 if sys.platform == "darwin" else 1024) / 1e9


def build_network(start_channel: int, ckpt: str | None, seed: int):
    import torch

    from ..network import EOIR

    torch.manual_seed(seed)
    net = EOIR(start_channel=start_channel)
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    else:
        with torch.no_grad():
            for est in net.estimators:
                est.flow.conv.weight.normal_(0.0, FLOW_WEIGHT_STD)
    return net.eval()


def run_worker(args: argparse.Namespace) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(args.threads)
    from ..lean import lean_forward

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    net = build_network(args.start_channel, args.ckpt, args.seed).to(device)
    x = torch.from_numpy(np.load(args.input_file))[None].to(device)  # (1, 2, D0, D1, D2)
    amp = AMP_DTYPES[args.amp]
    if args.worker == "reference":

        def run():
            autocast = torch.autocast(device.type, dtype=getattr(torch, amp)) if amp else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                ddf = net(x)
            if cuda:
                torch.cuda.synchronize()
            return ddf

    elif args.worker == "authors":
        from .authors_layout import from_eoir

        model = from_eoir(net, x.shape[2:]).to(device)

        def run():
            with torch.no_grad():
                return model(x[:, :1], x[:, 1:])

    else:

        def run():
            return lean_forward(net, x)

    baseline = max_rss_gb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        ddf = run()
        del ddf
    seconds, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ddf = run()
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(seconds) < args.repeats:
            del ddf
    np.save(args.field_file, ddf.detach().float().cpu().numpy())
    best = int(np.argmin(seconds))
    result = {
        "seconds": seconds[best],
        "cpu_seconds": cpu[best],
        "seconds_all": seconds,
        "peak_rss_gb": max_rss_gb(),
        "baseline_rss_gb": baseline,
        "warmup_runs": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
        "amp": args.amp,
    }
    if cuda:
        result.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
                      peak_reserved_gb=torch.cuda.max_memory_reserved() / 1e9, gpu=torch.cuda.get_device_name())
    Path(args.result_file).write_text(json.dumps(result))
    return result


# =========================================================================================
# Parent
# =========================================================================================


def _wait_policy_env(args: argparse.Namespace) -> str:
    """``OMP_WAIT_POLICY`` as the workers see it (``unset``: libgomp's default)."""
    if args.omp_wait_policy != "inherit":
        return args.omp_wait_policy.upper()
    return os.environ.get("OMP_WAIT_POLICY", "unset")


def spawn_worker(cmd: list[str], threads: int | None, wait_policy: str | None = None,
                 capture_output: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <cmd>`` in the bundle folder in its own process, with ``threads`` OpenMP/MKL
    threads (None: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` removed, torch's default) and
    ``OMP_WAIT_POLICY=wait_policy`` (None: the caller's environment; ``"unset"``: removed);
    stdout and stderr captured, or stdout dropped and stderr passed through. ``timeout``:
    seconds, then the child is killed (``subprocess.TimeoutExpired``)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
        if threads is not None:
            env[name] = str(threads)
    if wait_policy == "unset":
        env.pop("OMP_WAIT_POLICY", None)
    elif wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    out = dict(capture_output=True) if capture_output else dict(stdout=subprocess.DEVNULL, stderr=sys.stderr)
    return subprocess.run([sys.executable, "-m", *cmd], cwd=BUNDLE_ROOT, env=env, text=True, timeout=timeout, **out)


def _run_child(path: str, args: argparse.Namespace, tmp: Path, input_file: Path, amp: str = "off") -> dict:
    name = path if amp == "off" else f"{path}+{amp}"
    field_file, result_file = tmp / f"field_{name}.npy", tmp / f"result_{name}.json"
    cmd = [
        "scripts.tools.benchmark", "--worker", path,
        "--input_file", str(input_file), "--field_file", str(field_file), "--result_file", str(result_file),
        "--start_channel", str(args.start_channel), "--threads", str(args.threads),
        "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed),
        "--device", args.device, "--amp", amp,
    ]
    if args.ckpt:
        cmd += ["--ckpt", str(Path(args.ckpt).resolve())]
    wait_policy = _wait_policy_env(args) if args.omp_wait_policy != "inherit" else None
    proc = spawn_worker(cmd, args.threads, wait_policy, capture_output=True)
    if proc.returncode != 0 or not result_file.exists():
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise SystemExit(f"benchmark worker '{name}' failed (exit {proc.returncode}): "
                         f"{lines[-1] if lines else 'no error output'}")
    result = json.loads(result_file.read_text())
    result["field_file"] = str(field_file)
    return result


def _table(report: dict) -> str:
    if report.get("device") == "cuda":
        head = f"{'path':<16} {'s/pair':>8} {'peak GPU allocated GB':>22} {'peak GPU reserved GB':>21}"
        rows = [f"{name:<16} {r['seconds']:>8.3f} {r['peak_allocated_gb']:>22.2f} {r['peak_reserved_gb']:>21.2f}"
                for name, r in report["paths"].items()]
    else:
        head = f"{'path':<10} {'s/pair':>8} {'cpu s':>8} {'peak RSS GB':>12} {'baseline GB':>12} {'above base GB':>14}"
        rows = [f"{name:<10} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} {r['peak_rss_gb']:>12.2f} "
                f"{r['baseline_rss_gb']:>12.2f} {r['peak_rss_gb'] - r['baseline_rss_gb']:>14.2f}"
                for name, r in report["paths"].items()]
    lines = [head, "-" * len(head)] + rows
    for key, base in RATIOS:
        if report.get(key):
            lines.append(f"lean / {base}: time {report[key]['time']:.3f}, memory {report[key]['memory']:.3f}")
    for path, diff in (report.get("max_abs_diff_voxels_per_path") or {}).items():
        lines.append(f"max |ddf_{path} - ddf_reference| = {diff:.3g} voxel (max |ddf| = {report['max_abs_field_voxels']:.3g})")
    return "\n".join(lines)


def require_cuda() -> None:
    """Exit with one line when torch sees no CUDA device (for ``--device cuda``)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device here")


def _check_device(args: argparse.Namespace, paths: list[str]) -> list[str]:
    """The ``--amp`` settings to run; a clear exit for what cannot run here."""
    amps = list(dict.fromkeys(a.strip() for a in args.amp.split(",") if a.strip()))  # unique, in order
    if not amps or any(a not in AMP_DTYPES for a in amps):
        raise SystemExit(f"--amp takes a comma-separated subset of {','.join(AMP_DTYPES)}, got {args.amp!r}")
    if args.device == "cpu":
        if amps != ["off"]:
            raise SystemExit("--amp bf16/fp16 is measured on --device cuda only (on a CPU the lean float32 path is the one to use)")
        return amps
    require_cuda()
    import torch

    if paths != ["reference"]:
        raise SystemExit("--device cuda measures --paths reference only: the lean path is CPU inference "
                         "(LeanEOIR runs EOIR.forward on a GPU)")
    if "bf16" in amps and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--amp bf16: {torch.cuda.get_device_name()} does not support bfloat16")
    return amps


def run_benchmark(args: argparse.Namespace) -> dict:
    multiple_of_16 = all(s % 16 == 0 for s in args.shape)
    if args.paths is None:
        args.paths = "reference" if args.device == "cuda" else ",".join(PATHS if multiple_of_16 else PATHS[:2])
    paths = list(dict.fromkeys(p.strip() for p in args.paths.split(",") if p.strip()))
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or not paths:
        raise SystemExit(f"--paths takes a comma-separated subset of {','.join(PATHS)}, got {args.paths!r}")
    if "authors" in paths and not multiple_of_16:
        raise SystemExit(f"--paths authors: the authors' layout needs a --shape of multiples of 16, got {args.shape}")
    amps = _check_device(args, paths)
    with tempfile.TemporaryDirectory(prefix="eoir_bench_") as tmp_name:
        tmp = Path(tmp_name)
        vols, kind = make_input(args.shape, args.input, args.seed)
        input_file = tmp / "input.npy"
        np.save(input_file, vols)
        del vols
        results = {}
        for path in paths:
            for amp in amps:
                name = path if amp == "off" else f"{path}+{amp}"
                print(f"running {name} ...", file=sys.stderr, flush=True)
                results[name] = _run_child(path, args, tmp, input_file, amp)
        report = {
            "device": args.device,
            "shape": list(args.shape),
            "start_channel": args.start_channel,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup_runs": args.warmup,
            "input": kind,
            "omp_wait_policy": args.omp_wait_policy,
            "omp_wait_policy_env": _wait_policy_env(args),
            "weights": args.ckpt or f"torch.manual_seed({args.seed}) init, flow conv std {FLOW_WEIGHT_STD}",
            "paths": {},
            "ratio": None,
            "ratio_authors": None,
            "max_abs_diff_voxels": None,
        }
        keys = ("seconds", "peak_rss_gb", "cpu_seconds", "baseline_rss_gb", "seconds_all", "torch", "amp",
                "peak_allocated_gb", "peak_reserved_gb", "gpu")
        for path, r in results.items():
            report["paths"][path] = {k: r[k] for k in keys if k in r}
        if "reference" in results:
            ref = np.load(results["reference"]["field_file"])
            report["max_abs_field_voxels"] = float(np.abs(ref).max())
            diffs = {p: float(np.abs(np.load(r["field_file"]) - ref).max()) for p, r in results.items() if p != "reference"}
            if diffs:
                report["max_abs_diff_voxels"] = max(diffs.values())
                report["max_abs_diff_voxels_per_path"] = diffs
        for key, base in RATIOS:
            if "lean" in results and base in results:
                report[key] = {
                    "time": results["lean"]["seconds"] / results[base]["seconds"],
                    "memory": results["lean"]["peak_rss_gb"] / results[base]["peak_rss_gb"],
                }
    print(_table(report))
    print(json.dumps(report))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--start_channel", type=int, default=32)
    parser.add_argument("--shape", type=shape_argument, default=(160, 224, 192))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paths", default=None,
                        help="reference,lean,authors (default; authors only for sizes that are multiples of 16; "
                        "on cuda: reference)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", default="off", help="off, bf16, fp16 (comma-separated; bf16/fp16 on cuda)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path (the minimum is reported)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs before the timed ones (reported)")
    parser.add_argument("--ckpt", default=None, help="EOIR state dict (default: seeded random weights)")
    parser.add_argument("--input", choices=("brain", "random"), default="brain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--omp_wait_policy", choices=("inherit", "passive", "active"), default="inherit",
        help="OMP_WAIT_POLICY for both workers (default inherit: the environment as it is, which "
        "is what inference runs in; use passive on a machine shared with other jobs, where "
        "libgomp's spinning threads make every parallel region wait for a time slice)",
    )
    # worker-only arguments
    parser.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--input_file", help=argparse.SUPPRESS)
    parser.add_argument("--field_file", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.start_channel < 1:
        parser.error("--threads, --repeats and --start_channel must be >= 1, --warmup >= 0")
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore", message=".*grid_sample.*")  # MONAI Warp's notice
        return run_worker(args)
    return run_benchmark(args)


if __name__ == "__main__":
    main()
