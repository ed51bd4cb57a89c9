"""NIfTI reading with input checks, atomic writing, and LUMIR subject ids.

Conventions: arrays are in the file's array-axis order (no reorientation); a LUMIR file
``LUMIRMRI_3455_0000.nii.gz`` has subject id ``3455``; any other file's id is its stem.
NIfTI and FreeSurfer MGH (``.mgz``, ``.mgh``) files are read and written by nibabel, other
formats (``.mha``, ``.nrrd``, ...) by ITK.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from .errors import InputError

ITK_VECTOR_INTENT = 1007  # NIfTI intent of a vector field, as ITK writes displacement fields
NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")  # read and written by nibabel
_LUMIR_ID = re.compile(r"LUMIRMRI_(\d{4})_\d{4}")


def subject_id(path: str | os.PathLike) -> str:
    """4-digit LUMIR subject number of ``path``, else the file name without its extension."""
    name = Path(path).name
    m = _LUMIR_ID.search(name)
    if m:
        return m.group(1)
    for ext in (".nii.gz", ".nii", ".mgz", ".mgh", ".mha", ".mhd", ".nrrd", ".nhdr", ".gz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def pair_stem(fixed_path: str | os.PathLike, moving_path: str | os.PathLike) -> str:
    """``{fixed_id}_{moving_id}``: what every output file of a pair is named after
    (``disp_{stem}.nii.gz``, ``warped_{stem}.nii.gz``, ...)."""
    return f"{subject_id(fixed_path)}_{subject_id(moving_path)}"


def is_nibabel_file(path: str | os.PathLike) -> bool:
    """True for the formats nibabel reads and writes here (NIfTI, FreeSurfer MGH)."""
    return str(path).lower().endswith(NIBABEL_SUFFIXES)


def nibabel_reader():
    """MONAI's ``NibabelReader``, also for ``.mgz`` / ``.mgh`` and in native byte order (MGH
    files are big-endian, which torch cannot hold): give it to ``LoadImage(d)`` as ``reader``;
    other formats still go to MONAI's default readers (ITK)."""
    from monai.data import NibabelReader
    from monai.data.utils import is_supported_format

    class NibabelMGHReader(NibabelReader):
        def verify_suffix(self, filename) -> bool:
            return is_supported_format(filename, [s.lstrip(".") for s in NIBABEL_SUFFIXES])

        def get_data(self, img):
            data, meta = super().get_data(img)
            if data.dtype.byteorder not in ("=", "|"):
                data = data.astype(data.dtype.newbyteorder("="))
            return data, meta

    return NibabelMGHReader()


def check_volume(array: np.ndarray, path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """Raise :class:`InputError` unless ``array`` is a finite 3D volume; return it."""
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{path}: {what} must be a 3D volume, got shape {tuple(array.shape)}")
    if min(array.shape) < 2:
        raise InputError(f"{path}: {what} has a degenerate shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n = int((~np.isfinite(array)).sum())
        raise InputError(f"{path}: {what} contains {n} NaN/Inf voxels")
    return array


def check_label_map(array: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Raise :class:`InputError` unless ``array`` holds integer labels (integer dtype, or
    floats that are all whole numbers); return it unchanged."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array
    frac = np.abs(array - np.round(array)) > 1e-3
    if frac.any():
        raise InputError(
            f"{path}: a label map must hold integer labels; {int(frac.sum())} voxels are not whole numbers "
            f"(dtype {array.dtype}); is it an intensity image?"
        )
    return array


def read_nifti(path: str | os.PathLike, what: str = "image", dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a NIfTI file (``dtype``: convert, as ``get_fdata`` would), with a
    clear error if it is missing or unreadable; no shape check."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} file not found")
    try:
        img = nib.load(str(p))
        array = np.asanyarray(img.dataobj) if dtype is None else img.get_fdata(dtype=dtype)
    except Exception as e:  # nibabel raises many types for unreadable files
        raise InputError(f"{p}: cannot read {what} as NIfTI ({e.__class__.__name__}: {e})") from None
    return array, img.affine


def load_nifti(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI file as ``(array, affine)`` after checking it exists, parses and is 3D, finite."""
    array, affine = read_nifti(path, what)
    return check_volume(array, path, what), affine


def read_image(path: str | os.PathLike, what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Any 3D image that nibabel or ITK reads (``.nii``, ``.nii.gz``, ``.mha``, ``.nrrd``, ...) as
    ``(array in its stored dtype, RAS affine)``, through MONAI's ``LoadImage``; checked to exist,
    parse, be 3D and finite, and have a usable affine."""
    from monai.transforms import LoadImage

    from .geometry import affine_of, check_affine

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} file not found")
    try:
        image = LoadImage(image_only=True, dtype=None, reader=nibabel_reader())(str(p))
    except Exception as e:  # readers raise many types for unreadable files
        raise InputError(f"{p}: cannot read {what} ({e.__class__.__name__}: {e})") from None
    array = check_volume(np.asarray(image.array), p, what)
    return array, check_affine(affine_of(image), str(p), image.meta)


def atomic_save_image(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 3D image atomically: NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer MGH (``.mgz``,
    ``.mgh``) by nibabel, anything else by ITK (``.mha``, ``.nrrd``, ...), with the RAS
    ``affine`` (ITK gets it as LPS)."""
    if str(path).lower().endswith((".mgz", ".mgh")):
        arr = np.asarray(array)
        if arr.dtype in (np.int8, np.uint16, np.uint32, np.int64, np.uint64, np.bool_):  # MGH: uint8, int16, int32, float32
            arr = arr.astype(np.int32 if arr.dtype != np.bool_ else np.uint8)
        elif arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        img = nib.MGHImage(arr, np.asarray(affine, dtype=np.float64))
        return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix="".join(Path(path).suffixes[-1:]))
    if str(path).endswith((".nii", ".nii.gz")):
        return atomic_save_nifti(array, affine, path)
    import itk

    image = _itk_image(np.asarray(array), affine)
    return atomic_write(path, lambda tmp: itk.imwrite(image, tmp), suffix="".join(Path(path).suffixes))


def load_disp(path: str | os.PathLike, dtype=np.float64, *, itk_fields: bool = False,
              channels_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A displacement file as ``((H, W, D, 3) array in voxel units, affine)``, checked finite.

    Accepts the LUMIR layout ``(H, W, D, 3)``, the NIfTI vector layout ``(H, W, D, 1, 3)`` and
    channels-first ``(3, H, W, D)`` (which the official evaluator also accepts).
    ``itk_fields``: a NIfTI vector field with ITK's displacement intent (1007; physical LPS mm,
    as ``save_itk_transform`` writes) is converted to voxel units of its own grid, and any
    other 5D field is refused. ``channels_first``: return ``(3, H, W, D)`` instead.
    """
    array, affine = read_nifti(path, "displacement field", dtype=np.float64 if itk_fields else dtype)
    if itk_fields and array.ndim == 5 and array.shape[3] == 1 and array.shape[4] == 3:
        if int(nib.load(str(path)).header["intent_code"]) != ITK_VECTOR_INTENT:
            raise InputError(f"{path}: a 5D field must be an ITK displacement field (NIfTI intent 1007 vector)")
        from .geometry import disp_from_itk_displacement

        disp = np.moveaxis(disp_from_itk_displacement(array[:, :, :, 0, :], affine), 0, -1)
    else:
        disp = array
        if disp.ndim == 5 and disp.shape[3] == 1:
            disp = disp[:, :, :, 0, :]
        if disp.ndim == 4 and disp.shape[0] == 3 and disp.shape[-1] != 3:
            disp = np.moveaxis(disp, 0, -1)
        if disp.ndim != 4 or disp.shape[-1] != 3:
            raise InputError(f"{path}: displacement field must be H x W x D x 3, got {tuple(disp.shape)}")
        disp = disp.astype(dtype, copy=False)
    if not np.isfinite(disp).all():
        raise InputError(f"{path}: displacement field has {int((~np.isfinite(disp)).sum())} NaN/Inf values")
    return (np.ascontiguousarray(np.moveaxis(disp, -1, 0)) if channels_first else disp), affine


def ensure_writable_dir(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that files can be created in it."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write_test_"):
            pass
    except OSError as e:
        raise InputError(f"{d}: output folder is not writable ({e.strerror or e})") from None
    return d


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary name in the destination folder, then rename to ``path``.

    A crash, a full disk or a bad input leaves either the old file or none, never a truncated
    one. The file gets the usual permissions (``0o666`` less the umask).
    """
    p = Path(path)
    ensure_writable_dir(p.parent)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return p


def atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=None) -> Path:
    """Write ``array`` as NIfTI (``dtype`` if given) with ``affine`` to ``path`` atomically."""
    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(arr.dtype)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def _itk_image(array: np.ndarray, affine: np.ndarray):
    """An ITK image of an ``(X, Y, Z)`` array (or ``(X, Y, Z, C)`` vectors) on the grid of a RAS affine."""
    import itk

    affine = np.asarray(affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    is_vector = array.ndim == 4
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0, 3) if is_vector else (2, 1, 0))), is_vector=is_vector)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]).tolist())
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps / spacing)))
    return image


def atomic_save_itk_displacement(vectors: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ITK displacement-field transform atomically (vector NIfTI, intent 1007).

    ``vectors``: ``(X, Y, Z, 3)`` displacements in physical LPS mm on the grid of the RAS
    ``affine`` (the fixed image's); ITK stores the grid in LPS (origin, spacing, direction).
    """
    import itk

    image = _itk_image(np.asarray(vectors, dtype=np.float32), affine)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    return atomic_write(path, lambda tmp: itk.imwrite(image, tmp), suffix=suffix)


def atomic_save_itk_affine(matrix: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a 3D affine transform atomically as an ITK transform file (``.mat``: ITK's MATLAB
    format, as ``antsRegistration`` writes; ``.txt`` / ``.tfm``: ITK text) that
    ``antsApplyTransforms`` and ITK read.

    ``matrix`` is 4 x 4 and maps points in RAS mm (x -> matrix @ x); ITK files hold the same map
    in LPS mm (``AffineTransform_double_3_3``, centre 0).
    """
    import itk

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ np.asarray(matrix, dtype=np.float64) @ flip
    transform = itk.AffineTransform[itk.D, 3].New()
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3])))
    transform.SetTranslation([float(v) for v in lps[:3, 3]])
    return atomic_write(path, lambda tmp: itk.transformwrite([transform], tmp), suffix=Path(path).suffix)


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """The 4 x 4 RAS-mm map of an ITK affine transform file (inverse of :func:`atomic_save_itk_affine`;
    any centre)."""
    import itk

    transform = itk.transformread(str(path))[0]
    params = np.asarray(transform.GetParameters(), dtype=np.float64)
    centre = np.asarray(transform.GetFixedParameters(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = params[:9].reshape(3, 3)
    lps[:3, 3] = params[9:12] + centre - lps[:3, :3] @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file (JSON, CSV) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (checkpoints: an interrupted save never corrupts the last one)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
