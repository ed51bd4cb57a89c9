"""MONAI Label app: atlas label propagation with the EOIR registration bundle.

Each request registers a labelled atlas (moving) onto the requested image (fixed) with the
bundle's own ``configs/inference.json`` (parsed by MONAI's ``ConfigParser``, so the same
network, weights, geometry handling and writers as ``python -m monai.bundle run inference``)
and returns the atlas labels warped onto the image's grid and affine: a label map that MONAI
Label's 3D Slicer module imports as a segmentation.

Start (see README.md next to this file)::

    monailabel start_server --app APP --studies DIR --host 127.0.0.1 --port 8000 \\
        [--conf bundle PATH] [--conf atlas_image IMG --conf atlas_label LABELS [--conf atlas_labels JSON]]

MONAI Label is imported here only; the bundle does not depend on it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

logger = logging.getLogger("eoir.monailabel")

MODEL = "eoir_atlas"
SAMPLE_ATLAS_IMAGE = "sample/imagesVal/LUMIRMRI_0003_0000.nii.gz"
SAMPLE_ATLAS_LABEL = "sample/labelsVal/LUMIRMRI_0003_0000.nii.gz"
SAMPLE_LABEL_NAMES = "sample/labels.json"
MAX_IO_ITERATIONS = 1000
_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


def find_bundle(app_dir: str, conf: dict) -> Path:
    """The bundle folder: ``--conf bundle PATH``, else the folder above the app."""
    bundle = Path(conf.get("bundle") or Path(app_dir).resolve().parent).expanduser().resolve()
    if not (bundle / "configs" / "inference.json").is_file():
        how = "" if conf.get("bundle") else "; pass --conf bundle /path/to/eoir_bundle (the app was copied out of it?)"
        raise ValueError(f"no EOIR bundle at {bundle}: configs/inference.json not found{how}")
    return bundle


def _load_array(path: str) -> np.ndarray:
    """The voxel array of an image file, read as the bundle reads it (MONAI ``LoadImage``)."""
    from monai.transforms import LoadImage

    return np.asarray(LoadImage(image_only=True)(path))


def read_label_names(path: str) -> dict[int, str]:
    """Label value -> name from a JSON file: ``{"labels": {"1": "name", ...}}`` (the sample's
    ``labels.json``), ``{"1": "name", ...}`` or ``{"name": 1, ...}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"atlas label names {path}: cannot read JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):
        data = data["labels"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"atlas label names {path}: expected a JSON object of label value -> name")
    names = {}
    for key, value in data.items():
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", str(key)):
            names[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            names[value] = str(key)
        else:
            raise ValueError(f"atlas label names {path}: entry {key!r}: {value!r} is not 'value': 'name'")
    return names


class Atlas:
    """The labelled image registered onto every request's image.

    ``labels`` (MONAI Label's name -> index, ``background`` 0) indexes the returned label map.
    MONAI Label's 3D Slicer module assigns the label names, sorted by index and without
    ``background``, to the values 1, 2, 3, ... of a result; an atlas whose values are not
    1..N is therefore propagated from a copy renumbered 1..N (``atlas_values`` keeps each
    name's value in the atlas).
    """

    def __init__(self, bundle: Path, conf: dict, work_dir: Path) -> None:
        self.image = conf.get("atlas_image") or ("" if conf.get("atlas_label") else str(bundle / SAMPLE_ATLAS_IMAGE))
        self.label = conf.get("atlas_label") or ("" if conf.get("atlas_image") else str(bundle / SAMPLE_ATLAS_LABEL))
        default_names = str(bundle / SAMPLE_LABEL_NAMES) if not (conf.get("atlas_image") or conf.get("atlas_label")) else ""
        self.names_file = conf.get("atlas_labels") or default_names
        self.work_dir = work_dir
        self.labels: dict[str, int] = {"background": 0}
        self.atlas_values: dict[str, int] = {"background": 0}
        self.moving_label = self.label
        self.error = self.missing()
        if self.error is None:
            try:
                self._read_labels()
            except Exception as e:  # noqa: BLE001 - reported on every request, the server keeps serving
                self.error = f"atlas label map {self.label}: {e}"
        if self.error:
            logger.error(f"{MODEL}: {self.error}; every request will answer this until it is fixed and the server restarted")
        else:
            logger.info(f"{MODEL}: atlas {self.image} with {len(self.labels) - 1} labels from {self.label}")

    def missing(self) -> str | None:
        """A one-line problem with the atlas files, or None."""
        if not self.image or not self.label:
            return "give both --conf atlas_image IMG and --conf atlas_label LABELS (or neither, for the sample atlas)"
        for path, what in ((self.image, "atlas_image"), (self.label, "atlas_label"), (self.names_file, "atlas_labels")):
            if path and not Path(path).is_file():
                return f"{what} {path} not found"
        return None

    def _read_labels(self) -> None:
        array = _load_array(self.label)
        if not (np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))):
            raise ValueError("not a label map (non-integer values)")
        present = {int(v) for v in np.unique(array)} - {0}
        names = read_label_names(self.names_file) if self.names_file else {}
        names.pop(0, None)
        values = sorted(present | set(names))
        if not values:
            raise ValueError("no labels (all voxels are 0)")
        used: set[str] = {"background"}
        for index, value in enumerate(values, start=1):
            name = names.get(value, f"label {value}")
            if name in used:
                name = f"{name} ({value})"
            used.add(name)
            self.labels[name] = index
            self.atlas_values[name] = value
        if values != list(range(1, len(values) + 1)):
            self.moving_label = self._renumbered(array, values)

    def _renumbered(self, array: np.ndarray, values: list[int]) -> str:
        import nibabel as nib
        from monai.transforms import LoadImage

        lut = np.zeros(int(max(values)) + 1, dtype=np.int32)
        lut[values] = np.arange(1, len(values) + 1)
        dtype = np.uint8 if len(values) < 2**8 else np.uint16 if len(values) < 2**16 else np.int32
        affine = np.asarray(LoadImage(image_only=True)(self.label).affine, dtype=np.float64)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "atlas_label_1toN.nii.gz"
        nib.save(nib.Nifti1Image(lut[array.astype(np.int64)].astype(dtype), affine), str(path))
        logger.info(f"{MODEL}: atlas label values {values[:5]}... renumbered 1..{len(values)} in {path}")
        return str(path)


def _io_iterations(value: Any) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        value, ok = int(value), True
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or not 0 <= value <= MAX_IO_ITERATIONS:
        raise HTTPException(422, f"io_iterations must be an integer from 0 to {MAX_IO_ITERATIONS}, got {value!r}")
    return value


def _device(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _DEVICE.match(value.strip()):
        raise HTTPException(422, f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    value = value.strip()
    if value.startswith("cuda"):
        index = int(value.split(":")[1]) if ":" in value else 0
        if not torch.cuda.is_available():
            raise HTTPException(422, f"device {value!r}: CUDA is not available on this server")
        if index >= torch.cuda.device_count():
            raise HTTPException(422, f"device {value!r}: this server has {torch.cuda.device_count()} CUDA device(s)")
    return value


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class AtlasPropagation(InferTask):
    """Register the atlas onto the request's image with the bundle; return the warped atlas labels."""

    def __init__(self, bundle: Path, atlas: Atlas) -> None:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        self.default_io_iterations = int(parser["io_iterations"])
        devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        super().__init__(
            type=InferType.SEGMENTATION,  # the type MONAI Label clients (3D Slicer) show and run
            labels=atlas.labels,
            dimension=3,
            description=(
                "Atlas label propagation: registers the atlas (EOIR deformable registration, T1w brain MRI, "
                "skull-stripped and affinely aligned to MNI) onto the image and returns the atlas labels on it"
            ),
            config={"io_iterations": self.default_io_iterations, "device": devices},
        )
        self.bundle = bundle
        self.atlas = atlas

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        start = time.perf_counter()
        image = request.get("image")
        image_name = request.get("eoir_image_id") or image
        io_iterations = _io_iterations(request.get("io_iterations", self.default_io_iterations))
        device = _device(request.get("device"))
        problem = self.atlas.error or self.atlas.missing()
        if problem:
            raise HTTPException(500, f"server atlas: {problem}")
        if not isinstance(image, str) or not Path(image).is_file():
            raise HTTPException(404, f"image {image_name!r} not found")
        self._check_contrast(image, image_name)

        out_dir = tempfile.mkdtemp(prefix="eoir_atlas_")
        try:
            warped = self._register(image, io_iterations, device, out_dir)
            fd, result = tempfile.mkstemp(prefix="eoir_atlas_", suffix=".nii.gz")
            os.close(fd)
            shutil.move(str(warped), result)
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes one JSON line; the server keeps serving
            raise self._http_error(e, image, image_name) from None
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        seconds = time.perf_counter() - start
        logger.info(f"{MODEL}: {image_name} labelled in {seconds:.1f} s (io_iterations {io_iterations})")
        return result, {
            "label_names": self.atlas.labels,
            "atlas_values": self.atlas.atlas_values,
            "atlas_image": self.atlas.image,
            "io_iterations": io_iterations,
            "device": device or "default",
            "latencies": {"total": round(seconds, 2)},
        }

    @staticmethod
    def _check_contrast(image: str, image_name: str) -> None:
        """A constant image (blank, or a mask of one value) is no brain MRI; the bundle would
        register it all the same and return the atlas labels on nothing."""
        try:
            array = _load_array(image)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(422, f"image {image_name!r}: cannot be read as an image ({_one_line(e)})") from None
        if array.size and np.nanmax(array) == np.nanmin(array):
            raise HTTPException(
                422, f"image {image_name!r}: every voxel is {np.nanmax(array):g}; expected a T1w brain MRI"
            )

    def _register(self, fixed: str, io_iterations: int, device: str | None, out_dir: str) -> Path:
        """Run the bundle's inference config on (atlas, image) as ``monai.bundle run`` does."""
        from monai.bundle import ConfigParser

        configs = self.bundle / "configs"
        parser = ConfigParser()
        parser.read_config(str(configs / "inference.json"))
        if (configs / "metadata.json").is_file():
            parser.read_meta(str(configs / "metadata.json"))
        overrides: dict[str, Any] = {
            "bundle_root": str(self.bundle),
            "moving_image": str(self.atlas.image),
            "moving_label": str(self.atlas.moving_label),
            "fixed_image": str(fixed),
            "output_dir": str(out_dir),
            "io_iterations": io_iterations,
        }
        if device:
            overrides["device"] = f"$torch.device('{device}')"  # validated: cpu, cuda or cuda:N
        parser.update(overrides)
        parser.parse(reset=True)
        for section in ("initialize", "run", "finalize"):
            if section not in parser:
                continue
            if isinstance(parser[section], list):
                for i in range(len(parser[section])):
                    parser.get_parsed_content(f"{section}#{i}")
            else:
                parser.get_parsed_content(section)
        written = sorted(Path(out_dir).glob("warped_label_*.nii.gz"))
        if len(written) != 1:
            raise RuntimeError(f"the bundle wrote {len(written)} warped label maps, expected 1")
        return written[0]

    def _http_error(self, e: Exception, image: str, image_name: str) -> HTTPException:
        from scripts.errors import find_input_error

        err = find_input_error(e)
        if err is None:
            logger.exception(f"{MODEL}: registration of {image_name} failed")
            return HTTPException(500, f"registration failed: {_one_line(e)}")
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        atlas_files = (self.atlas.image, self.atlas.label, self.atlas.moving_label)
        if any(p and p in message for p in atlas_files) and image not in message:
            return HTTPException(500, f"server atlas: {message}")
        return HTTPException(422, message.replace(image, f"image {image_name!r}"))


class EOIRAtlasApp(MONAILabelApp):
    """One model, ``eoir_atlas``: atlas label propagation with the EOIR bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        self.bundle = find_bundle(app_dir, conf)
        if str(self.bundle) not in sys.path:
            sys.path.insert(0, str(self.bundle))  # the bundle's ``scripts`` package, as monai.bundle run has it
        self.atlas = Atlas(self.bundle, conf, Path(app_dir) / "model")
        try:
            version = json.loads((self.bundle / "configs" / "metadata.json").read_text()).get("version", "")
        except (OSError, ValueError):
            version = ""
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="EOIR atlas label propagation",
            description="Atlas labels registered onto the image with the EOIR brain MRI registration bundle",
            version=version or "unknown",
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL: AtlasPropagation(self.bundle, self.atlas)}

    def infer(self, request: dict, datastore=None) -> dict:
        """MONAI Label's infer, with unknown models and image ids answered as 404 JSON errors."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"model {model!r} not found; this server has: {', '.join(self._infers)}")
        image = request.get("image")
        if not image:
            raise HTTPException(422, "no image given: POST /infer/eoir_atlas?image=ID")
        store = datastore or self.datastore()
        if isinstance(image, str) and not os.path.exists(image) and isinstance(store, LocalDatastore):
            if not store.get_image_uri(image):
                raise HTTPException(404, f"image {image!r} not found in the studies folder {self.studies}")
        name = Path(image).name if isinstance(image, str) and os.path.exists(image) else image  # a session's upload
        return super().infer(dict(request, eoir_image_id=name), datastore)
