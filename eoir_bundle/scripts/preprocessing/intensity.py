"""Intensities onto LUMIR's 0..255 scale, whatever the scan's dtype and units.

- :func:`is_lumir_scale`: every value a whole number in 0..255 (LUMIR's uint8 images, whatever
  dtype holds them). Such an image is used exactly as it is.
- :func:`rescale_to_lumir` (images not preprocessed, any other scale): the background is the
  most common value when it covers at least ``MIN_BACKGROUND_FRACTION`` of the volume (a
  skull-stripped or masked image), else there is none; ``lo`` is that background value (or,
  if the foreground goes below it, the foreground's 0.5th percentile; with no background, the
  image's 0.5th percentile) and ``hi`` the foreground's 99.9th percentile; ``lo..hi`` maps
  linearly to 0..255, clipped, and the background to 0. Any positive scale and any offset give
  the same image (uint8 x 16, float 0..1, z-scores with a negative background).
- :func:`brain_to_lumir` (preprocessed scans): inside the brain mask, intensity divided by its
  99.9th percentile in the mask, clipped to 1..255; 0 outside (after the bias correction,
  background at 0: scale-free).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIN_BACKGROUND_FRACTION", "background_value", "brain_to_lumir", "is_lumir_scale", "rescale_to_lumir"]

MIN_BACKGROUND_FRACTION = 0.1  # a value this common is the background (skull-stripped, masked)
TOP_PERCENTILE = 99.9  # maps to 255


def is_lumir_scale(array: np.ndarray) -> bool:
    """True when every value is a whole number in 0..255 (LUMIR's uint8 scale)."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return True
    if a.size == 0 or float(a.min()) < 0 or float(a.max()) > 255:
        return False
    return bool(np.issubdtype(a.dtype, np.integer) or np.all(a == np.round(a)))


def background_value(array: np.ndarray, sample: int = 2_000_000) -> tuple[float, float]:
    """``(value, fraction)``: the most common value and the fraction of voxels holding it
    (exact count; the candidate is found on a strided sample of at most ``sample`` voxels)."""
    flat = np.asarray(array).ravel()
    step = max(1, flat.size // sample)
    values, counts = np.unique(flat[::step], return_counts=True)
    value = values[int(np.argmax(counts))]
    return float(value), float(np.count_nonzero(flat == value)) / flat.size


def rescale_to_lumir(array: np.ndarray) -> np.ndarray:
    """Any-scale image -> float32 0..255 (module docstring); an image already on LUMIR's scale
    is returned unchanged (same array)."""
    if is_lumir_scale(array):
        return array
    x = np.asarray(array, dtype=np.float64)
    value, fraction = background_value(x)
    if fraction >= MIN_BACKGROUND_FRACTION:
        fg = x != value
        lo = min(value, float(np.percentile(x[fg], 0.5))) if fg.any() else value
    else:
        lo = float(np.percentile(x, 0.5))
        fg = x > lo
    if not fg.any():
        return np.zeros(x.shape, np.float32)
    hi = float(np.percentile(x[fg], TOP_PERCENTILE))
    if hi <= lo:  # a foreground darker than the background: scale by its extent instead
        hi = float(x[fg].max())
    out = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255.0
    if fraction >= MIN_BACKGROUND_FRACTION:
        out[~fg] = 0.0
    return out.astype(np.float32)


def brain_to_lumir(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A bias-corrected scan with zero background -> float32: ``clip(x / p99.9(brain), 1/255, 1)
    * 255`` inside ``mask``, 0 outside."""
    x = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    top = float(np.percentile(x[mask], TOP_PERCENTILE)) if mask.any() else 0.0
    out = np.clip(x / max(top, 1e-12), 1.0 / 255.0, 1.0) * 255.0
    return np.where(mask, out, 0.0).astype(np.float32)
