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
  for the ``--extra_io_iterations`` budgets also IO with the other ``io_init`` (with the
  default ``select``: each of its two modes alone, ``compose`` and ``warm_start`` from the
  network to ``io_network_level``), IO from a zero field without the network (what the network
  contributes) and, when the default is the warm start, IO from the whole network's field
  (``io_network_level 0``: what skipping its finest level costs);
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
HD95 = True  # --no_hd95: Dice, NDV and folding only (HD95 is the slowest metric on a CPU)
METRICS = ("dice", "hd95", "tre", "ndv", "folding", "ncc", "seconds")
#: ``--ants SyNStrong``: the deformable stage of antsRegistrationSyN.sh (``-t s``): SyN[0.1,3,0],
#: CC radius 4, 100x70x50x20 iterations, shrink 8x4x2x1, smoothing 3x2x1x0 voxels (antspyx
#: derives the shrink factors and sigmas from the 4 levels)
ANTS_STRONG = {"type_of_transform": "SyNOnly", "syn_metric": "CC", "syn_sampling": 4, "grad_step": 0.1,
               "flow_sigma": 3, "total_sigma": 0, "reg_iterations": (100, 70, 50, 20)}


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
    from ..evaluation.metrics import jacobian_stats

    res = evaluate_pair(disp, fixed_label=pair.get("fixed_label"), moving_label=pair.get("moving_label"),
                        dice_labels=labels, hd95_labels=labels if HD95 else None, fixed_landmarks=pair.get("fixed_landmarks"),
                        moving_landmarks=pair.get("moving_landmarks"), moving_image=pair["moving"])
    out = {k: float(res[k]) for k in ("dice", "hd95", "tre", "ndv") if k in res}
    out["folding"] = jacobian_stats(disp)[1]  # % of voxels with det(I + grad u) <= 0 (central differences)
    out["ncc"] = full_ncc(disp, pair)
    return out


def full_ncc(disp: np.ndarray, pair: dict) -> float:
    """``1 - local_ncc_loss`` (9^3 window, the training loss's) of the trilinearly warped moving
    image and the fixed image on the full grid: the similarity a method reached, no labels used."""
    from ..layers import ScriptableWarp
    from ..losses import local_ncc_loss

    with torch.no_grad():
        m = torch.from_numpy(np.asarray(pair["moving"], np.float32) / 255.0)[None, None]
        f = torch.from_numpy(np.asarray(pair["fixed"], np.float32) / 255.0)[None, None]
        u = torch.from_numpy(np.ascontiguousarray(np.moveaxis(disp.astype(np.float32), -1, 0)))[None]
        warped = ScriptableWarp(mode="bilinear", padding_mode="zeros", batch_split=True)(m, u)
        return float(1.0 - local_ncc_loss(warped, f, window=9))


def _default_io_iterations(config: Path = BUNDLE_ROOT / "configs" / "inference.json") -> int:
    return int(json.loads(Path(config).read_text()).get("io_iterations", 0))


DEFAULT_IO_ITERATIONS = _default_io_iterations()


def parse_variants(text: str) -> dict[str, dict]:
    """``"name:io_iterations=100,io_init=compose;name2:..."`` -> ``{name: {setting: value}}``
    (values as JSON, else strings; every variant needs ``io_iterations``)."""
    out = {}
    for part in (p for p in str(text or "").split(";") if p.strip()):
        name, sep, body = part.partition(":")
        settings = {}
        for kv in (b for b in body.split(",") if b.strip()):
            key, eq, value = kv.partition("=")
            if not eq:
                raise InputError(f"--io_variants: expected key=value, got {kv!r}")
            try:
                settings[key.strip()] = json.loads(value)
            except ValueError:
                settings[key.strip()] = value.strip()
        if not sep or not name.strip() or "io_iterations" not in settings:
            raise InputError(f"--io_variants: expected NAME:io_iterations=K[,key=value...], got {part!r}")
        out[name.strip()] = settings
    return out


def inference_settings(config: Path = BUNDLE_ROOT / "configs" / "inference.json") -> dict:
    """The IO settings (``io_*`` ids) of the inference config, so the comparison runs its defaults."""
    data = json.loads(Path(config).read_text())
    return {k: v for k, v in data.items() if k.startswith("io_") and k != "io_iterations"}


class NetworkMethod:
    """The default inference path: the network (lean on a CPU), then instance optimisation."""

    def __init__(self, ckpt: str, io_budgets: list[int], extra_budgets: list[int] = (), device: str = "cpu",
                 variants: dict[str, dict] | None = None):
        from ..checkpoint import load_weights, read_checkpoint, start_channel_of
        from ..lean import LeanEOIR
        from ..network import EOIR

        n = start_channel_of(read_checkpoint(ckpt))
        self.device = torch.device(device)
        self.net = LeanEOIR(load_weights(EOIR(start_channel=n), ckpt)).eval().to(self.device)
        self.start_channel, self.io_budgets, self.settings = n, io_budgets, inference_settings()
        self.extra_budgets = list(extra_budgets)
        self.variants = dict(variants or {})  # name -> IO settings over the config's (io_iterations included)
        self.warmed_up = self.device.type == "cpu"  # CPU: the first call's cost is part of the timing

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _warm_up(self, x: torch.Tensor) -> None:
        """One untimed network run and IO run of the largest budget (CUDA context, cuDNN,
        kernels, the caching allocator at its largest)."""
        from ..instance_optimization import InstanceOptimizationInferer

        iterations = max([1, *self.io_budgets, *self.extra_budgets, *(v["io_iterations"] for v in self.variants.values())])
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
        start_of = {"compose": (u_net, t_net), "select": (u_net, t_net), "warm_start": warm or (u_net, t_net)}
        runs = [(f"network+io{k}", k, {}, *start_of[init]) for k in self.io_budgets if k]
        for k in self.extra_budgets:  # the other ways of using the network, and no network at all
            others = ("compose", "warm_start") if init == "select" else ("compose" if init != "compose" else "warm_start",)
            for other in others:
                runs.append((f"network+io{k} ({other})", k, {"io_init": other}, *start_of[other]))
            if init == "warm_start" and warm_level:  # the same, started from the whole network's field
                runs.append((f"network+io{k} (io_network_level 0)", k, {}, u_net, t_net))
            runs.append((f"io{k} from zero (no network)", k, {"io_init": "compose"}, torch.zeros_like(u_net), 0.0))
        levels = {0: (u_net, t_net), warm_level: warm or (u_net, t_net)}
        for name, change in self.variants.items():  # named IO settings, each from the field its io_init reads
            settings = {**self.settings, **change}
            level = int(settings.get("io_network_level", 0)) if settings.get("io_init", "compose") == "warm_start" else 0
            if level not in levels:
                levels[level] = network(level)
            runs.append((name, int(change["io_iterations"]), {k: v for k, v in change.items() if k != "io_iterations"},
                         *levels[level]))
        for name, k, change, u_start, t_start in runs:
            inferer = InstanceOptimizationInferer(io_iterations=k, **{**self.settings, **change})
            start = self._clock()
            with torch.no_grad():
                ddf = inferer(x, lambda _x, u=u_start: u)  # the network's field, computed (and timed) once
            results[name] = (ddf, t_start + self._clock() - start)
        return {k: (ddf[0].permute(1, 2, 3, 0).cpu().numpy(), t) for k, (ddf, t) in results.items()}


class AntsMethod:
    """ANTs registration through antspyx; the forward warp as a disp on the fixed grid."""

    def __init__(self, transform: str, downsample: int = 1):
        try:
            import ants  # noqa: F401
        except ImportError:
            raise InputError("--ants needs antspyx (pip install antspyx==0.6.3)") from None
        self.transform = transform
        self.kwargs = dict(ANTS_STRONG) if transform == "SyNStrong" else {"type_of_transform": transform}
        self.downsample = int(downsample)
        self.name = f"ants_{transform}" + (f" (1/{self.downsample} resolution)" if self.downsample > 1 else "")

    def run(self, item: dict, pair: dict) -> tuple[np.ndarray, float]:
        import ants

        fixed, moving = ants.image_read(str(item["fixed"])), ants.image_read(str(item["moving"]))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            f_in, m_in = fixed, moving
            if self.downsample > 1:  # registered on a coarser grid (same origin), composed on the full one below
                spacing = tuple(float(s) * self.downsample for s in fixed.spacing)
                f_in = ants.resample_image(fixed, spacing, use_voxels=False, interp_type=0)
                m_in = ants.resample_image(moving, spacing, use_voxels=False, interp_type=0)
            reg = ants.registration(f_in, m_in, outprefix=tmp + "/", **self.kwargs)
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
            device: str = "cpu", variants: dict[str, dict] | None = None, ants_downsample: int = 1,
            skip_pairs: int = 0) -> dict:
    from ..data.lists import evaluation_pairs

    torch.set_num_threads(threads)
    data_json = data_list_file_path or str(Path(dataset_dir) / "LUMIR_dataset.json")
    items = evaluation_pairs(data_json, dataset_dir)
    items = items[skip_pairs:]
    items = items[:max_pairs] if max_pairs else items
    network = NetworkMethod(ckpt or str(BUNDLE_ROOT / "models" / "model.pt"), list(io_budgets), list(extra_budgets),
                            device, variants)
    ants_methods = [AntsMethod(t, ants_downsample if t == "SyNStrong" else 1)
                    for t in (ants_transform or "").split(",") if t.strip()]
    rows, start = [], time.perf_counter()
    for i, item in enumerate(items):
        pair = load_pair(item)
        row = {"moving": item["moving"], "fixed": item["fixed"], "zero": {**_score(np.zeros(pair["fixed"].shape + (3,), np.float32), pair), "seconds": 0.0}}
        if network.io_budgets:  # an empty budget list: the network is not run (e.g. ANTs alone)
            for name, (disp, seconds) in network.run(pair).items():
                row[name] = {**_score(disp, pair), "seconds": seconds}
        for ants_method in ants_methods:
            disp, seconds = ants_method.run(item, pair)
            row[ants_method.name] = {**_score(disp, pair), "seconds": seconds}
        rows.append(row)
        elapsed = time.perf_counter() - start
        LOG.info("pair %d/%d %s: %s (ETA %.0f s)", i + 1, len(items), Path(item["moving"]).name,
                 ", ".join(f"{k} dice {v['dice']:.3f} {v['seconds']:.1f}s" for k, v in row.items() if isinstance(v, dict)),
                 elapsed / (i + 1) * (len(items) - i - 1))
    methods = [k for k, v in rows[0].items() if isinstance(v, dict)]
    reference = f"network+io{DEFAULT_IO_ITERATIONS}" if DEFAULT_IO_ITERATIONS else "network"
    result = {"dataset_dir": str(dataset_dir), "start_channel": network.start_channel, "threads": threads,
              "device": _device_name(network.device), "io_settings": network.settings,
              "io_iterations_default": DEFAULT_IO_ITERATIONS, "variants": network.variants, "pairs": rows,
              "mean": {m: _mean(rows, m) for m in methods}}
    if reference in methods:
        result["wilcoxon_vs_default"] = {"default": reference, **paired_tests(rows, reference)}
    return result


def merge(results: list[dict], reference: str = "") -> dict:
    """One result from several runs on the same data set (e.g. the network and ANTs run in
    parallel, or pairs split with ``--skip_pairs``): rows joined by (moving, fixed), methods
    and selected-mode rows as given, means over the pairs every method has, Wilcoxon tests."""
    rows: dict[tuple, dict] = {}
    for res in results:
        for r in res["pairs"]:
            rows.setdefault((r["moving"], r["fixed"]), {"moving": r["moving"], "fixed": r["fixed"]}).update(r)
    pairs = list(rows.values())
    methods = []
    for r in pairs:
        methods += [k for k, v in r.items() if isinstance(v, dict) and k not in methods]
    complete = [r for r in pairs if all(m in r for m in methods)]
    base = {k: v for k, v in results[0].items() if k not in ("pairs", "mean", "wilcoxon_vs_default", "command")}
    out = {**base, "commands": [c for r in results for c in (r.get("commands") or [r.get("command", "")])], "pairs": pairs,
           "complete_pairs": len(complete), "mean": {m: _mean(complete, m) for m in methods}}
    reference = reference or (f"network+io{DEFAULT_IO_ITERATIONS}" if DEFAULT_IO_ITERATIONS else "network")
    if reference in methods and len(complete) > 1:
        out["wilcoxon_vs_default"] = {"default": reference, **paired_tests(complete, reference)}
    return out


def add_selected(result: dict, name: str, compose: str, warm: str, extra_seconds: str = "") -> None:
    """A row ``name`` per pair: the ``compose`` or ``warm`` method's scores, whichever has the
    higher full-grid NCC (what ``io_init="select"`` keeps); seconds = both IO runs' (the
    network's counted once: ``warm``'s seconds minus ``extra_seconds``'s, the network alone)."""
    for r in result["pairs"]:
        if compose in r and warm in r:
            pick = r[compose] if r[compose]["ncc"] >= r[warm]["ncc"] else r[warm]
            net = r[extra_seconds]["seconds"] if extra_seconds in r else 0.0
            r[name] = {**pick, "seconds": r[compose]["seconds"] + r[warm]["seconds"] - net,
                       "selected": "compose" if pick is r[compose] else "warm_start"}


def paired_tests(rows: list[dict], reference: str, metric: str = "dice") -> dict:
    """Two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) of ``metric`` over the pairs,
    each method against ``reference``: ``{method: {"mean_diff", "p", "n", "wins"}}`` (``mean_diff``
    = method - reference; ``wins``: pairs where the method is higher)."""
    from scipy.stats import wilcoxon

    out = {}
    for method in rows[0]:
        if not isinstance(rows[0][method], dict) or method == reference:
            continue
        both = [(r[method][metric], r[reference][metric]) for r in rows if method in r and reference in r]
        d = np.array([a - b for a, b in both], dtype=np.float64)
        p = float("nan") if len(d) < 2 or not np.any(d) else float(wilcoxon(d).pvalue)
        out[method] = {"mean_diff": float(d.mean()) if len(d) else float("nan"), "p": p, "n": len(d),
                       "wins": int((d > 0).sum())}
    return out


def table(result: dict) -> str:
    tests = result.get("wilcoxon_vs_default", {})
    lines = ["| method | Dice | HD95 (mm) | TRE (mm) | NDV (%) | folding (%) | s/pair | Wilcoxon p vs default |",
             "|---|---|---|---|---|---|---|---|"]
    for method, m in result["mean"].items():
        p = "(default)" if method == tests.get("default") else (f"{tests[method]['p']:.3g}" if method in tests else "")
        lines.append(f"| {method} | {m.get('dice', float('nan')):.4f} | {m.get('hd95', float('nan')):.2f} | "
                     f"{m.get('tre', float('nan')):.2f} | {m.get('ndv', float('nan')):.4f} | "
                     f"{m.get('folding', float('nan')):.4f} | {m['seconds']:.1f} | {p} |")
    return "\n".join(lines)


def pair_table(result: dict) -> str:
    """Dice and seconds of every method on every pair (rows: pairs, moving -> fixed)."""
    methods = list(result["mean"])
    lines = ["| pair (moving -> fixed) | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for r in result["pairs"]:
        cells = [f"{r[m]['dice']:.3f} ({r[m]['seconds']:.0f} s)" if m in r else "" for m in methods]
        lines.append(f"| {Path(r['moving']).name[9:13]} -> {Path(r['fixed']).name[9:13]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@exit_on_input_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--merge", nargs="+", default=[], help="merge these --output JSONs (same data set) instead of running")
    parser.add_argument("--reference", default="", help="with --merge: the method the others are tested against")
    parser.add_argument("--data_list_file_path", default="")
    parser.add_argument("--ckpt", default="", help="bundle state dict (default models/model.pt)")
    parser.add_argument("--io_iterations", default="0,25,50,100", help="comma-separated IO budgets; 0 = network alone")
    parser.add_argument("--extra_io_iterations", default="50",
                        help="budgets also run with the other io_init and from a zero field (no network); empty: none")
    parser.add_argument("--ants", default="SyNOnly",
                        help="comma-separated antspyx type_of_transform values, or SyNStrong (antsRegistrationSyN.sh's "
                             "deformable stage: CC 4, 100x70x50x20); empty to skip ANTs")
    parser.add_argument("--ants_downsample", type=int, default=1,
                        help="SyNStrong registers images downsampled by this factor (field composed on the full grid)")
    parser.add_argument("--io_variants", default="",
                        help="named IO settings over the inference config's: 'NAME:io_iterations=K,io_init=compose,...;...'")
    parser.add_argument("--no_hd95", action="store_true", help="skip HD95 (the slowest metric)")
    parser.add_argument("--skip_pairs", type=int, default=0, help="leave out the first pairs (split a long run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_pairs", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the network and IO run (ANTs runs on the CPU)")
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))  # before ants is imported
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.merge:
        result = merge([json.loads(Path(p).read_text()) for p in args.merge])
        add_selected(result, "network+io50 (select)", "network+io50 (compose)", "network+io50 (io_network_level 0)",
                     "network")
        return _report(merge([result], args.reference), args.output)
    if not args.dataset_dir:
        raise InputError("--dataset_dir is required (unless --merge)")
    try:
        budgets = sorted({int(b) for b in args.io_iterations.split(",") if b.strip()} | {0})
        extra = [int(b) for b in args.extra_io_iterations.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--io_iterations: expected comma-separated integers, got {args.io_iterations!r}") from None
    if args.device == "cuda":
        from .benchmark import require_cuda

        require_cuda()
    global HD95
    HD95 = not args.no_hd95
    if not args.io_iterations.strip():  # no network (e.g. a run of ANTs alone)
        budgets = []
        if args.io_variants.strip():
            raise InputError("--io_variants refine the network's field: give --io_iterations 0 (or more) with them")
    result = compare(args.dataset_dir, args.data_list_file_path, args.ckpt, budgets, args.ants, args.threads,
                     args.max_pairs, extra, args.device, parse_variants(args.io_variants), args.ants_downsample,
                     args.skip_pairs)
    result["command"] = "python -m scripts.compare_methods " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    return _report(result, args.output)


def _report(result: dict, output: str) -> dict:
    """Print the method and per-pair tables of ``result``; write it as JSON to ``output`` if given."""
    print(table(result))
    print()
    print(pair_table(result))
    if output:
        atomic_write_text(json.dumps(result, indent=2), output)
    return result


if __name__ == "__main__":
    main()
