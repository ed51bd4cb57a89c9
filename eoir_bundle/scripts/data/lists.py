"""Data lists for the workflows: LUMIR dataset JSONs and single pairs, checked before any work.

A LUMIR dataset JSON lists paths relative to the dataset folder, with a leading ``/`` or
``./`` (``"/imagesVal/LUMIRMRI_3455_0000.nii.gz"``). Registration pairs are the entries
with ``fixed`` and ``moving`` under ``test`` (the EOIR authors' JSON) or, failing that,
under ``validation`` (the challenge's JSON). Every pair item is
``{"moving": path, "fixed": path, "moving_path": path, "fixed_path": path}``; the ``*_path``
copies survive loading so that writers can name outputs after the subjects. Inference items
also carry ``moving_label`` where the moving image has a label map (:func:`moving_label_of`).

Outputs are named after the files (:func:`scripts.file_io.pair_stem`), so an inference list
whose pairs would write the same file name (``sub-01/anat/T1w.nii.gz`` and
``sub-02/anat/T1w.nii.gz`` both have the id ``T1w``) is refused before anything runs
(:func:`check_output_names`): the contract's names are kept and nothing is overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import nibabel as nib

from ..errors import InputError
from ..file_io import is_nibabel_file, pair_stem, subject_id
from ..geometry import check_affine


def resolve(dataset_dir: str | os.PathLike, entry: str) -> str:
    """Path of a dataset-JSON entry: relative to ``dataset_dir`` (leading ``/`` or ``./`` allowed)."""
    rel = entry[2:] if entry.startswith("./") else entry.lstrip("/")
    return str(Path(dataset_dir) / rel)


def read_dataset_json(path: str | os.PathLike) -> dict:
    """Parse a dataset JSON, with a clear error if it is missing or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: dataset JSON not found")
    try:
        with open(p) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a JSON object with 'training'/'validation'/'test' lists")
    return data


def _header_shape(path: str, role: str) -> tuple[int, ...]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {role} image not found")
    if not is_nibabel_file(p.name):
        return ()  # other formats (.mha, .nrrd, ...) are read and checked when loaded
    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
    except Exception as e:
        raise InputError(f"{p}: cannot read {role} image as NIfTI ({e.__class__.__name__}: {e})") from None
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"{p}: {role} image must be a 3D volume, got shape {shape}")
    header = img.header if isinstance(img, nib.Nifti1Image) else None
    check_affine(img.affine, str(p), header)  # MONAI's reader would silently replace a singular one
    return shape


def check_pair(moving: str, fixed: str, same_grid: bool = True) -> dict:
    """Check that both files exist and (NIfTI) are 3D, and, with ``same_grid``, of one shape;
    return the pair item."""
    ms, fs = _header_shape(moving, "moving"), _header_shape(fixed, "fixed")
    if same_grid and ms != fs:
        raise InputError(f"{moving} has shape {ms} but {fixed} has shape {fs}: the pair must share one grid")
    return {"moving": str(moving), "fixed": str(fixed), "moving_path": str(moving), "fixed_path": str(fixed)}


def pair_entries(data: dict, data_list_file_path: str | os.PathLike) -> list[dict]:
    """The ``{"fixed", "moving", ...}`` entries of a parsed dataset JSON: ``test`` first, else
    ``validation``; :class:`InputError` if there are none."""
    for section in ("test", "validation"):
        entries = [e for e in data.get(section) or [] if isinstance(e, dict) and "fixed" in e and "moving" in e]
        if entries:
            return entries
    raise InputError(
        f"{data_list_file_path}: no registration pairs: expected entries with 'fixed' and 'moving' under 'test' or 'validation'"
    )


def check_output_names(pairs: list[dict], per_image: bool = True) -> list[dict]:
    """Raise :class:`InputError`, naming both pairs, if two pairs would write the same output file:
    the same ``disp_{fixed_id}_{moving_id}`` stem, or (``per_image``: the preprocessed scans'
    ``affine_fixed_{id}.mat`` / ``affine_moving_{id}.mat``) two different files with one id in
    the same role. Return ``pairs``."""
    def clash(what: str, a: dict, b: dict) -> InputError:
        return InputError(
            f"output names collide: pair (fixed {a['fixed']}, moving {a['moving']}) and pair (fixed {b['fixed']}, "
            f"moving {b['moving']}) would both write {what}; outputs are named after the file names (LUMIR ids, else "
            "stems): rename the files or register these pairs in separate runs"
        )

    stems: dict[str, dict] = {}
    ids: dict[tuple[str, str], tuple[str, dict]] = {}
    for pair in pairs:
        stem = pair_stem(pair["fixed"], pair["moving"])
        if stem in stems:
            raise clash(f"disp_{stem}.nii.gz", stems[stem], pair)
        stems[stem] = pair
        if not per_image:
            continue
        for role in ("fixed", "moving"):
            key, path = (role, subject_id(pair[role])), os.path.realpath(pair[role])
            seen = ids.setdefault(key, (path, pair))
            if seen[0] != path:
                raise clash(f"affine_{role}_{key[1]}.mat", seen[1], pair)
    return pairs


def lumir_pairs(data_list_file_path: str | os.PathLike, dataset_dir: str | os.PathLike, same_grid: bool = True) -> list[dict]:
    """Registration pairs of a LUMIR dataset JSON (``test`` first, else ``validation``), checked
    (:func:`check_pair`)."""
    entries = pair_entries(read_dataset_json(data_list_file_path), data_list_file_path)
    return [check_pair(resolve(dataset_dir, e["moving"]), resolve(dataset_dir, e["fixed"]), same_grid) for e in entries]


def moving_label_of(entry: dict, moving: str, segs: dict[str, str], dataset_dir: str | os.PathLike,
                    source) -> str | None:
    """The label map of a pair's moving image, or None: the pair's own ``moving_label`` (a
    dataset-JSON path, which must exist), else the ``seg`` of the data set's ``{"image", "seg"}``
    entry for that image (``segs``: image path -> label path), else the file of the same name
    in ``labels*/`` beside its ``images*/`` folder (:func:`ground_truth_path`, the evaluator's
    rule)."""
    if entry.get("moving_label"):
        return _existing(resolve(dataset_dir, entry["moving_label"]), "moving label map", source)
    if moving in segs:
        return _existing(segs[moving], "label map", source)
    beside = ground_truth_path(moving, "labels")
    return beside if beside != moving and Path(beside).is_file() else None


def inference_pairs(
    data_list_file_path: str = "",
    dataset_dir: str = ".",
    moving_image: str = "",
    fixed_image: str = "",
    moving_label: str = "",
    preprocess: str = "auto",
) -> list[dict]:
    """The pairs an inference run registers: one pair by path if given (with the moving image's
    label map ``moving_label`` if given), else the dataset JSON's pairs, each with its moving
    image's label map where one is found (:func:`moving_label_of`). The two images of a pair
    may lie on different grids (they are resampled onto the network's grid when loaded). Pairs
    whose outputs would share a file name are refused (:func:`check_output_names`; the affine
    files count unless ``preprocess`` is ``"off"``)."""
    per_image = str(preprocess).strip().lower() not in ("off", "false")
    if moving_image or fixed_image:
        if not (moving_image and fixed_image):
            raise InputError("give both moving_image and fixed_image (or neither, to use data_list_file_path)")
        pair = check_pair(moving_image, fixed_image, same_grid=False)
        if moving_label:
            if not Path(moving_label).is_file():
                raise InputError(f"{moving_label}: moving label map not found")
            pair["moving_label"] = str(moving_label)
        return [pair]
    if moving_label:
        raise InputError("moving_label goes with one pair given by moving_image and fixed_image")
    if not data_list_file_path:
        raise InputError("nothing to register: set moving_image and fixed_image, or data_list_file_path")
    data = read_dataset_json(data_list_file_path)
    segs = {
        resolve(dataset_dir, e["image"]): resolve(dataset_dir, e["seg"])
        for section in ("training", "validation", "test") for e in data.get(section) or []
        if isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("seg"), str)
    }
    pairs = []
    for e in pair_entries(data, data_list_file_path):
        pair = check_pair(resolve(dataset_dir, e["moving"]), resolve(dataset_dir, e["fixed"]), same_grid=False)
        label = moving_label_of(e, pair["moving"], segs, dataset_dir, data_list_file_path)
        if label:
            pair["moving_label"] = label
        pairs.append(pair)
    labelled = sum("moving_label" in p for p in pairs)
    if labelled:
        logging.getLogger("eoir.inference").info(
            f"{labelled} of {len(pairs)} pairs have a moving label map: it is warped for each (warped_label_*)")
    return check_output_names(pairs, per_image)


def _existing(path: str, what: str, source) -> str:
    if not Path(path).is_file():
        raise InputError(f"{source}: lists {path} ({what}), which does not exist")
    return path


def training_images(data_list_file_path: str | os.PathLike, dataset_dir: str | os.PathLike) -> list[str]:
    """Paths of the ``training`` images of a LUMIR dataset JSON (checked to exist)."""
    data = read_dataset_json(data_list_file_path)
    entries = [e["image"] for e in data.get("training") or [] if isinstance(e, dict) and "image" in e]
    if len(entries) < 2:
        raise InputError(f"{data_list_file_path}: needs at least 2 'training' images, found {len(entries)}")
    return [_existing(resolve(dataset_dir, e), "training image", data_list_file_path) for e in entries]


def labelled_pairs(data_list_file_path: str | os.PathLike, dataset_dir: str | os.PathLike) -> list[dict]:
    """All ordered pairs ``(moving i, fixed j), i != j`` of the labelled ``validation`` images.

    The authors' JSON lists them as ``{"image": ..., "seg": ...}`` (LUMIR's
    ``SanityCheckLabelsTr``); each pair item has ``moving``, ``fixed``, ``moving_label``,
    ``fixed_label`` and the ``*_path`` copies of the image paths.
    """
    data = read_dataset_json(data_list_file_path)
    entries = [e for e in data.get("validation") or [] if isinstance(e, dict) and "image" in e and "seg" in e]
    if len(entries) < 2:
        raise InputError(
            f"{data_list_file_path}: needs at least 2 labelled 'validation' entries ({{'image', 'seg'}}), found {len(entries)}"
        )
    items = [
        (_existing(resolve(dataset_dir, e["image"]), "image", data_list_file_path),
         _existing(resolve(dataset_dir, e["seg"]), "label map", data_list_file_path))
        for e in entries
    ]
    return [
        {"moving": mi, "fixed": fi, "moving_label": ml, "fixed_label": fl, "moving_path": mi, "fixed_path": fi}
        for i, (mi, ml) in enumerate(items)
        for j, (fi, fl) in enumerate(items)
        if i != j
    ]


def ground_truth_path(image_path: str, dest: str) -> str:
    """The official evaluator's rule: ground truth sits beside the images with ``images`` -> ``dest``
    (``imagesVal/x.nii.gz`` -> ``labelsVal/x.nii.gz`` or ``landmarksVal/x.nii.gz``)."""
    p = Path(image_path)
    return str(p.parent.parent / p.parent.name.replace("images", dest) / p.name)


def evaluation_pairs(data_list_file_path: str | os.PathLike, dataset_dir: str | os.PathLike) -> list[dict]:
    """Pairs to score: the dataset JSON's registration pairs (``test``, else ``validation``) with
    their label maps (``labels*/``) and landmark volumes (``landmarks*/``) where those exist;
    if none of them has a label map or landmarks, all ordered pairs of the labelled
    ``validation`` images (:func:`labelled_pairs`). Keys: ``moving``, ``fixed``,
    ``moving_label``/``fixed_label``, ``moving_landmarks``/``fixed_landmarks`` (when present).
    """
    try:
        pairs = lumir_pairs(data_list_file_path, dataset_dir)
    except InputError:
        pairs = []
    scored = []
    for pair in pairs:
        item = dict(pair)
        for dest, key in (("labels", "label"), ("landmarks", "landmarks")):
            m, f = ground_truth_path(pair["moving"], dest), ground_truth_path(pair["fixed"], dest)
            if Path(m).is_file() and Path(f).is_file():
                item[f"moving_{key}"], item[f"fixed_{key}"] = m, f
        if len(item) > len(pair):
            scored.append(item)
    if scored:
        return scored
    return labelled_pairs(data_list_file_path, dataset_dir)
