"""Accuracy and speed of the bundle against zero displacement and ANTs SyN, on the same pairs.

    python -m scripts.compare_methods --dataset_dir D [--data_list_file_path D/LUMIR_dataset.json] \\
        [--ckpt models/model.pt] [--io_iterations 0,25,50,100] [--ants SyNOnly] [--threads 2] \\
        [--max_pairs 0] [--device cpu|cuda] [--output results.json]

Pairs: those of the dataset JSON that have label maps (``labels*/``) and landmark volumes
(``landmarks*/``) beside their images, as ``configs/evaluate.json`` scores them
(:func:`scripts.data.evaluation_pairs`); images are LUMIR-style (uint8, one grid).

Methods, each timed on its own (wall clock, data already in memory; on the CPU ``--threads``
threads, on ``--device cuda`` see below):

* ``zero``: no displacement (the pair's starting point);
* ``network`` and ``network+io{K}``: the default inference path of ``configs/inference.json``
  (the network, lean on a CPU, then :class:`~scripts.instance_optimization.InstanceOptimizationInferer`
  with that config's IO settings and ``K`` iterations; ``K = 0`` is the network alone). The
  network runs once per pair (and, first, down to ``io_network_level`` for the warm start,
  as the inference config does); a ``network+io{K}`` time is that network run's plus its IO time;
  for the ``--extra_io_iterations`` budgets also IO with the other ``io_init``, IO from a
  zero field without the network (what the network contributes) and, for the warm start, IO
  from the whole network's field (``io_network_level 0``: what skipping its finest level costs);
* ``ants_<transform>``: ``ants.registration(fixed, moving, type_of_transform=...)`` of
  ``antspyx`` (``SyNOnly``: deformable SyN only, the images being affinely aligned already),
  its forward transforms composed by ANTs into one displacement field and read back as a disp
  on the fixed grid (:mod:`scripts.geometry`).

GPU (``--device cuda``): the network (``EOIR.forward``, what inference runs on a GPU) and IO
run on the GPU, timed between ``torch.cuda.synchronize()`` calls; before the first pair, one
untimed network run and one untimed IO run of the largest budget warm up CUDA (context,
cuDNN, kernels, the caching allocator), to keep CUDA's first-use costs out of the first pair's
timing (on an H200 the first pair's IO times were still up to 2x the later pairs').
ANTs still runs on ``--threads`` CPU threads.

Metrics (:func:`scripts.evaluation.metrics.evaluate_pair`, the LUMIR definitions): Dice and
HD95 over the labels present in the fixed or moving map, TRE on the landmark volumes, NDV
(% non-diffeomorphic volume) in the moving image's foreground. Output: one progress line per
pair and method, a table (mean over pairs), and ``--output`` JSON (per pair and mean).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..errors import InputError, exit_on_input_error
from ..file_io import atomic_write_text
from ..geometry import disp_from_itk_displacement

LOG = logging.getLogger("eoir.compare")
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
METRICS = ("dice", "hd95", "tre", "ndv", "seconds")


def _read(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def load_pair(item: dict) -> dict:
    out = {"moving": _read(item["moving"]), "fixed": _read(item["fixed"]), "affine": nib.load(item["fixed"]).affine}
    for key in ("moving_label", "fixed_label", "moving_landmarks", "fixed_landmarks"):
        if key in item:
            out[key] = _read(item[key])
    return out


def _score(disp: np.ndarray, pair: dict) -> dict:
    from ..evaluation.metrics import evaluate_pair

    labels = None
    if "fixed_label" in pair:
        both = np.union1d(np.unique(pair["fixed_label"]), np.unique(pair["moving_label"]))
        labels = [int(v) for v in both if v > 0]
    res = evaluate_pair(disp, fixed_label=pair.get("fixed_label"), moving_label=pair.get("moving_label"),
                        dice_labels=labels, hd95_labels=labels, fixed_landmarks=pair.get("fixed_landmarks"),
                        moving_landmarks=pair.get("moving_landmarks"), moving_image=pair["moving"])
    return {k: float(res[k]) for k in ("dice", "hd95", "tre", "ndv") if k in res}


def inference_settings(config: Path = BUNDLE_ROOT / "configs" / "inference.json") -> dict:
    """The IO settings (``io_*`` ids) of the inference config, so the comparison runs its defaults."""
    data = json.loads(Path(config).read_text())
    return {k: v for k, v in data.items() if k.startswith("io_") and k != "io_iterations"}


class NetworkMethod:
    """The default inference path: the network (lean on a CPU), then instance optimisation."""

    def __init__(self, ckpt: str, io_budgets: list[int], extra_budgets: list[int] = (), device: str = "cpu"):
        from ..checkpoint import load_weights, read_checkpoint, start_channel_of
        from ..lean import LeanEOIR
        from ..network import EOIR

        n = start_channel_of(read_checkpoint(ckpt))
        self.device = torch.device(device)
        self.net = LeanEOIR(load_weights(EOIR(start_channel=n), ckpt)).eval().to(self.device)
        self.start_channel, self.io_budgets, self.settings = n, io_budgets, inference_settings()
        self.extra_budgets = list(extra_budgets)
        self.warmed_up = self.device.type == "cpu"  # CPU: the first call's cost is part of the timing

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _warm_up(self, x: torch.Tensor) -> None:
        """One untimed network run and IO run of the largest budget (CUDA context, cuDNN,
        kernels, the caching allocator at its largest)."""
        from ..instance_optimization import InstanceOptimizationInferer

        iterations = max([1, *self.io_budgets, *self.extra_budgets])
        with torch.no_grad():
            InstanceOptimizationInferer(io_iterations=iterations, **self.settings)(x, self.net)
        self.warmed_up = True

    def run(self, pair: dict) -> dict[str, tuple[np.ndarray, float]]:
        from ..instance_optimization import InstanceOptimizationInferer

        x = torch.tensor(np.stack([pair["moving"], pair["fixed"]])[None], dtype=torch.float32).to(self.device) / 255.0
        if not self.warmed_up:
            self._warm_up(x)

        def network(finest_level: int):
            start = self._clock()
            with torch.no_grad():
                u = self.net(x, finest_level=finest_level)
            return u, self._clock() - start

        # what each io_init starts from: warm start runs the network down to io_network_level only
        # (first, so that the default's time carries any first-call cost; then the whole network)
        init = self.settings.get("io_init", "compose")
        warm_level = int(self.settings.get("io_network_level", 0))
        warm = network(warm_level) if warm_level and (init == "warm_start" or self.extra_budgets) else None
        u_net, t_net = network(0)
        results = {"network": (u_net, t_net)}
        start_of = {"compose": (u_net, t_net), "warm_start": warm or (u_net, t_net)}
        runs = [(f"network+io{k}", k, {}, *start_of[init]) for k in self.io_budgets if k]
        for k in self.extra_budgets:  # the other way of using the network, and no network at all
            other = "compose" if init != "compose" else "warm_start"
            runs.append((f"network+io{k} ({other})", k, {"io_init": other}, *start_of[other]))
            if init == "warm_start" and warm_level:  # the same, started from the whole network's field
                runs.append((f"network+io{k} (io_network_level 0)", k, {}, u_net, t_net))
            runs.append((f"io{k} from zero (no network)", k, {"io_init": "compose"}, torch.zeros_like(u_net), 0.0))
        for name, k, change, u_start, t_start in runs:
            inferer = InstanceOptimizationInferer(io_iterations=k, **{**self.settings, **change})
            start = self._clock()
            with torch.no_grad():
                ddf = inferer(x, lambda _x, u=u_start: u)  # the network's field, computed (and timed) once
            results[name] = (ddf, t_start + self._clock() - start)
        return {k: (ddf[0].permute(1, 2, 3, 0).cpu().numpy(), t) for k, (ddf, t) in results.items()}


class AntsMethod:
    """ANTs registration through antspyx; the forward warp as a disp on the fixed grid."""

    def __init__(self, transform: str):
        try:
            import ants  # noqa: F401
        except ImportError:
            raise InputError("--ants needs antspyx (pip install antspyx==0.6.3)") from None
        self.transform = transform
        self.name = f"ants_{transform}"

    def run(self, item: dict, pair: dict) -> tuple[np.ndarray, float]:
        import ants

        fixed, moving = ants.image_read(str(item["fixed"])), ants.image_read(str(item["moving"]))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            reg = ants.registration(fixed, moving, type_of_transform=self.transform, outprefix=tmp + "/")
            seconds = time.perf_counter() - start
            # the forward transforms (SyNOnly: an initial affine .mat and the warp) as one
            # displacement field on the fixed grid, composed by ANTs itself
            composed = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=tmp + "/composed_")
            field = nib.load(composed)
            vectors = np.asarray(field.dataobj, dtype=np.float64)[:, :, :, 0, :]
            disp = disp_from_itk_displacement(vectors, field.affine)
        return np.moveaxis(disp, 0, -1), seconds


def _device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}"


def _mean(rows: list[dict], method: str) -> dict:
    values = {m: [r[method][m] for r in rows if m in r[method]] for m in METRICS}
    return {m: float(np.mean(v)) for m, v in values.items() if v}


def compare(dataset_dir: str, data_list_file_path: str = "", ckpt: str = "", io_budgets=(0, 25, 50, 100),
            ants_transform: str = "SyNOnly", threads: int = 2, max_pairs: int = 0, extra_budgets=(50,),
            device: str = "cpu") -> dict:
    from ..data.lists import evaluation_pairs

    torch.set_num_threads(threads)
    data_json = data_list_file_path or str(Path(dataset_dir) / "LUMIR_dataset.json")
    items = evaluation_pairs(data_json, dataset_dir)
    items = items[:max_pairs] if max_pairs else items
    network = NetworkMethod(ckpt or str(BUNDLE_ROOT / "models" / "model.pt"), list(io_budgets), list(extra_budgets),
                            device)
    ants_method = AntsMethod(ants_transform) if ants_transform else None
    rows, start = [], time.perf_counter()
    for i, item in enumerate(items):
        pair = load_pair(item)
        row = {"moving": item["moving"], "fixed": item["fixed"], "zero": {**_score(np.zeros(pair["fixed"].shape + (3,), np.float32), pair), "seconds": 0.0}}
        for name, (disp, seconds) in network.run(pair).items():
            row[name] = {**_score(disp, pair), "seconds": seconds}
        if ants_method is not None:
            disp, seconds = ants_method.run(item, pair)
            row[ants_method.name] = {**_score(disp, pair), "seconds": seconds}
        rows.append(row)
        elapsed = time.perf_counter() - start
        LOG.info("pair %d/%d %s: %s (ETA %.0f s)", i + 1, len(items), Path(item["moving"]).name,
                 ", ".join(f"{k} dice {v['dice']:.3f} {v['seconds']:.1f}s" for k, v in row.items() if isinstance(v, dict)),
                 elapsed / (i + 1) * (len(items) - i - 1))
    methods = [k for k, v in rows[0].items() if isinstance(v, dict)]
    return {"dataset_dir": str(dataset_dir), "start_channel": network.start_channel, "threads": threads,
            "device": _device_name(network.device),
            "io_settings": network.settings, "pairs": rows, "mean": {m: _mean(rows, m) for m in methods}}


def table(result: dict) -> str:
    lines = ["| method | Dice | HD95 (mm) | TRE (mm) | NDV (%) | s/pair |", "|---|---|---|---|---|---|"]
    for method, m in result["mean"].items():
        lines.append(f"| {method} | {m.get('dice', float('nan')):.4f} | {m.get('hd95', float('nan')):.2f} | "
                     f"{m.get('tre', float('nan')):.2f} | {m.get('ndv', float('nan')):.4f} | {m['seconds']:.1f} |")
    return "\n".join(lines)


@exit_on_input_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--data_list_file_path", default="")
    parser.add_argument("--ckpt", default="", help="bundle state dict (default models/model.pt)")
    parser.add_argument("--io_iterations", default="0,25,50,100", help="comma-separated IO budgets; 0 = network alone")
    parser.add_argument("--extra_io_iterations", default="50",
                        help="budgets also run with the other io_init and from a zero field (no network); empty: none")
    parser.add_argument("--ants", default="SyNOnly", help="antspyx type_of_transform; empty to skip ANTs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_pairs", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the network and IO run (ANTs runs on the CPU)")
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))  # before ants is imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        budgets = sorted({int(b) for b in args.io_iterations.split(",") if b.strip()} | {0})
        extra = [int(b) for b in args.extra_io_iterations.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--io_iterations: expected comma-separated integers, got {args.io_iterations!r}") from None
    if args.device == "cuda":
        from .benchmark import require_cuda

        require_cuda()
    result = compare(args.dataset_dir, args.data_list_file_path, args.ckpt, budgets, args.ants, args.threads,
                     args.max_pairs, extra, args.device)
    result["command"] = "python -m scripts.compare_methods " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    print(table(result))
    if args.output:
        atomic_write_text(json.dumps(result, indent=2), args.output)
    return result


if __name__ == "__main__":
    main()
