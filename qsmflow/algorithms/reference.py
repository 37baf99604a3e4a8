"""Susceptibility referencing: QSM gives chi up to a constant; fix it by a reference region."""

from __future__ import annotations

import numpy as np

__all__ = ["reference_to_mean"]


def reference_to_mean(
    chi_ppm: np.ndarray, mask: np.ndarray, *, region: np.ndarray | None = None
) -> np.ndarray:
    """Subtract the mean susceptibility of a reference region.

    Parameters
    ----------
    chi_ppm : (x, y, z) array
        Susceptibility in ppm.
    mask : (x, y, z) bool array
        Brain mask; the output is zero outside it.
    region : (x, y, z) bool array, optional
        Reference region (e.g. CSF); default ``mask`` (the whole-brain mean).

    Returns
    -------
    numpy.ndarray
        float32 ``chi - mean(chi[region])`` inside ``mask``, zero outside.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    roi = np.asarray(mask, dtype=bool)
    ref = roi if region is None else np.asarray(region, dtype=bool)
    if roi.shape != chi.shape or ref.shape != chi.shape:
        raise ValueError(
            f"chi {chi.shape}, mask {roi.shape} and region {ref.shape} must share one shape"
        )
    if not ref.any():
        raise ValueError("the reference region is empty")
    offset = chi[ref].mean(dtype=np.float64)
    return np.where(roi, chi - np.float32(offset), 0).astype(np.float32)
