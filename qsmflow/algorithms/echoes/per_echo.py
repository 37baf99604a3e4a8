"""Echo-wise reconstruction: one field map per echo, and the average of echo-wise maps.

The fitted-field route combines the echoes before background removal and inversion. The
echo-average route (used for long bipolar protocols, e.g. the 9-echo acquisitions processed by
QSMxT, Stewart et al. MRM 2022) turns each echo's unwrapped phase into its own field map,
reconstructs every echo on its own, and averages the echo-wise susceptibility maps; errors that
differ between echoes (bipolar readout shifts, flow, wraps left in one echo) are averaged down
instead of biasing one fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ... import GAMMA_BAR_MHZ_PER_T


def echo_fields_ppm(
    unwrapped: np.ndarray,
    echo_times_s: Sequence[float],
    b0_tesla: float,
    *,
    phase_offset_rad: np.ndarray | None = None,
) -> np.ndarray:
    """Field of each echo in ppm: ``(phase_e - phase0) / (2 pi gamma_bar B0 TE_e)``.

    Parameters
    ----------
    unwrapped : (x, y, z, echo) array
        Unwrapped phase in radians.
    echo_times_s : sequence of float
        Echo times in seconds, one per echo.
    b0_tesla : float
        Main field in Tesla.
    phase_offset_rad : (x, y, z) array, optional
        Echo-independent phase offset (radians) to remove first, e.g. the offset of the
        multi-echo fit; without it the offset divided by TE biases early echoes.

    Returns
    -------
    (x, y, z, echo) float32 array in ppm.
    """
    phase = np.asarray(unwrapped, dtype=np.float32)
    if phase.ndim != 4:
        raise ValueError(f"unwrapped phase must be 4-D (x, y, z, echo), got shape {phase.shape}")
    tes = np.asarray(echo_times_s, dtype=np.float64)
    if tes.shape != (phase.shape[3],):
        raise ValueError(f"{tes.size} echo times for {phase.shape[3]} echoes")
    if np.any(tes <= 0) or np.any(tes > 1.0):
        raise ValueError(f"echo times must be in seconds, in (0, 1], got {tes.tolist()}")
    if not b0_tesla > 0:
        raise ValueError(f"b0_tesla must be positive (Tesla), got {b0_tesla}")
    if phase_offset_rad is not None:
        offset = np.asarray(phase_offset_rad, dtype=np.float32)
        if offset.shape != phase.shape[:3]:
            raise ValueError(
                f"phase offset shape {offset.shape} differs from the phase grid {phase.shape[:3]}"
            )
        phase = phase - offset[..., None]
    rad_per_ppm = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * b0_tesla * tes  # rad per ppm at each TE
    return (phase / rad_per_ppm.astype(np.float32)).astype(np.float32, copy=False)


def average_echo_maps(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of echo-wise maps over the voxels valid in every echo.

    Parameters
    ----------
    maps : sequence of (x, y, z) arrays
        One map per echo (any unit; the mean has the same unit).
    masks : sequence of (x, y, z) bool arrays, optional
        Where each map is valid; the result is zero outside their intersection.
    weights : sequence of float, optional
        Non-negative weight per echo (default equal weights).

    Returns
    -------
    mean : float32 array
    mask : bool array (intersection of the masks; all True without masks)
    """
    if len(maps) == 0:
        raise ValueError("average_echo_maps needs at least one map")
    shape = np.shape(maps[0])
    if any(np.shape(m) != shape for m in maps):
        raise ValueError(f"echo-wise maps differ in shape: {[np.shape(m) for m in maps]}")
    w = np.ones(len(maps)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(maps),) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights must be {len(maps)} non-negative numbers, not all 0: {weights}")
    w = w / w.sum()
    valid = np.ones(shape, dtype=bool)
    if masks is not None:
        if len(masks) != len(maps):
            raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
        for m in masks:
            if np.shape(m) != shape:
                raise ValueError(f"mask shape {np.shape(m)} differs from the maps' {shape}")
            valid &= np.asarray(m, dtype=bool)
    mean = np.zeros(shape, dtype=np.float32)
    for wi, m in zip(w, maps, strict=True):
        mean += np.float32(wi) * np.asarray(m, dtype=np.float32)
    mean[~valid] = 0
    return mean, valid
