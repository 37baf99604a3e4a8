"""Multi-echo unwrapping strategies built on the spatial unwrappers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .laplacian import laplacian_unwrap

__all__ = ["laplacian_unwrap_echo_differences", "temporal_unwrap"]


def temporal_unwrap(
    phase_rad: np.ndarray, template_unwrapped_rad: np.ndarray, *, template_echo: int = 0
) -> np.ndarray:
    """Unwrap multi-echo phase along TE from one spatially unwrapped template echo.

    The phase change between consecutive echoes, ``angle(exp(i * (phase[e+1] - phase[e])))``,
    is wrapped only where the field exceeds ``1 / (2 * dTE)`` Hz, far above brain fields after
    shimming for echo spacings of a few ms; adding these changes echo by echo to the template
    (forwards and backwards) unwraps every echo consistently with it, including its phase
    offset. This is the template strategy of multi-echo unwrapping (cf. ROMEO, Dymerska et al.,
    Magn Reson Med 2021).

    Parameters
    ----------
    phase_rad : (x, y, z, echo) array
        Wrapped phase in radians.
    template_unwrapped_rad : (x, y, z) array
        The template echo after spatial unwrapping (e.g. :func:`laplacian_unwrap`).
    template_echo : int
        Index of the template echo.

    Returns
    -------
    numpy.ndarray
        float32 (x, y, z, echo) unwrapped phase; the template echo equals the template.
    """
    phase = np.asarray(phase_rad, dtype=np.float32)
    if phase.ndim != 4:
        raise ValueError(f"phase must be 4-D (x, y, z, echo), got shape {phase.shape}")
    n_echo = phase.shape[3]
    if not 0 <= template_echo < n_echo:
        raise ValueError(f"template_echo must be in [0, {n_echo - 1}], got {template_echo}")
    if template_unwrapped_rad.shape != phase.shape[:3]:
        raise ValueError(
            f"template shape {template_unwrapped_rad.shape} differs from {phase.shape[:3]}"
        )
    two_pi = np.float32(2 * np.pi)

    def wrap(x: np.ndarray) -> np.ndarray:
        return x - two_pi * np.round(x / two_pi)

    out = np.empty_like(phase)
    out[..., template_echo] = template_unwrapped_rad
    for e in range(template_echo + 1, n_echo):
        out[..., e] = out[..., e - 1] + wrap(phase[..., e] - phase[..., e - 1])
    for e in range(template_echo - 1, -1, -1):
        out[..., e] = out[..., e + 1] + wrap(phase[..., e] - phase[..., e + 1])
    return out


def laplacian_unwrap_echo_differences(
    phase_rad: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    pad_factor: float = 1.5,
    n_threads: int = 1,
) -> np.ndarray:
    """Multi-echo Laplacian unwrapping through consecutive echo differences.

    Echo 1 is Laplacian-unwrapped; every later echo is echo 1 plus the sum of the
    Laplacian-unwrapped phase differences between consecutive echoes,
    ``angle(S[e+1] * conj(S[e]))``. A difference spans only one echo spacing, so its spatial
    gradients stay far below the one-radian-per-voxel level where the Laplacian identity fails
    (near veins, calcifications and sinuses at late echoes), and it carries no phase offset.
    Each term's error is harmonic inside the brain (removed with the background field), so the
    TE-dependence of the result is accurate, unlike unwrapping each echo on its own.

    Parameters
    ----------
    phase_rad : (x, y, z, echo) array
        Wrapped phase in radians.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    pad_factor, n_threads
        Passed to :func:`laplacian_unwrap`.

    Returns
    -------
    numpy.ndarray
        float32 (x, y, z, echo) unwrapped phase in radians.
    """
    phase = np.asarray(phase_rad, dtype=np.float32)
    if phase.ndim != 4:
        raise ValueError(f"phase must be 4-D (x, y, z, echo), got shape {phase.shape}")
    out = np.empty_like(phase)
    out[..., 0] = laplacian_unwrap(
        phase[..., 0], voxel_size_mm, pad_factor=pad_factor, n_threads=n_threads
    )
    two_pi = np.float32(2 * np.pi)
    for e in range(1, phase.shape[3]):
        diff = phase[..., e] - phase[..., e - 1]
        diff -= two_pi * np.round(diff / two_pi)
        out[..., e] = out[..., e - 1] + laplacian_unwrap(
            diff, voxel_size_mm, pad_factor=pad_factor, n_threads=n_threads
        )
    return out
