"""Phase unwrapping.

Laplacian unwrapping (Schofield & Zhu, Opt Lett 2003;28:1194-1196) recovers a smooth phase from
its wrapped values through the identity

    lap(phi) = cos(phi) * lap(sin(phi)) - sin(phi) * lap(cos(phi)),

whose right-hand side depends on the wrapped phase only, followed by an FFT Poisson solve. The
result is not congruent to the input (it differs from the true phase by a function that is
harmonic where the input is smooth, e.g. inside the brain, plus a constant); background-field
removal takes the harmonic part away.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from ..fft import crop_centered, kspace_grid, pad_centered, padded_shape

__all__ = ["laplacian_kernel", "laplacian_unwrap"]

_KINDS = ("discrete", "continuous")


def laplacian_kernel(
    shape: Sequence[int], voxel_size_mm: Sequence[float], *, kind: str = "discrete"
) -> np.ndarray:
    """Fourier symbol of the Laplacian (1/mm^2) on the real-FFT grid of ``shape`` (float32).

    Parameters
    ----------
    shape : (3,) ints
        Grid shape (already padded).
    voxel_size_mm : (3,) floats
        Voxel size along each array axis in mm.
    kind : {"discrete", "continuous"}
        ``"discrete"``: the 7-point finite-difference stencil,
        ``sum_i (2 cos(2 pi k_i d_i) - 2) / d_i^2``; ``"continuous"``: ``-4 pi^2 |k|^2``.

    Returns
    -------
    numpy.ndarray
        float32 half spectrum for ``scipy.fft.rfftn`` (last axis ``n // 2 + 1``); 0 at DC.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    ks = kspace_grid(shape, voxel_size_mm, real=True)
    out = np.zeros(tuple(k.size for k in ks), dtype=np.float32)
    for k, d in zip(ks, voxel_size_mm, strict=True):
        k = k.astype(np.float64)
        if kind == "discrete":
            term = (2.0 * np.cos(2.0 * np.pi * k * d) - 2.0) / (d * d)
        else:
            term = -((2.0 * np.pi * k) ** 2)
        out += term.astype(np.float32)
    return out


def _unwrap_3d(
    phase: np.ndarray, kernel: np.ndarray, big: tuple[int, ...], n_threads: int
) -> np.ndarray:
    padded = pad_centered(phase, big)
    sin_p = np.sin(padded)
    cos_p = np.cos(padded)
    del padded

    def lap(x: np.ndarray) -> np.ndarray:
        spec = scipy.fft.rfftn(x, workers=n_threads)
        spec *= kernel
        return scipy.fft.irfftn(spec, s=big, workers=n_threads)

    # Laplacian of the unwrapped phase from wrapped data only (Schofield & Zhu 2003).
    rhs = cos_p * lap(sin_p)
    rhs -= sin_p * lap(cos_p)
    del sin_p, cos_p

    # Poisson solve; the DC term (a free constant) is left at zero.
    spec = scipy.fft.rfftn(rhs, workers=n_threads)
    del rhs
    safe = kernel.copy()
    safe[0, 0, 0] = 1.0
    spec /= safe
    spec[0, 0, 0] = 0.0
    out = crop_centered(scipy.fft.irfftn(spec, s=big, workers=n_threads), phase.shape)

    # Choose the free constant so the result agrees with the input modulo 2*pi on average
    # (a circular mean; incoherent noise outside the object averages away).
    diff = phase - out
    shift = np.arctan2(np.sin(diff).sum(dtype=np.float64), np.cos(diff).sum(dtype=np.float64))
    out += np.float32(shift)
    return np.ascontiguousarray(out, dtype=np.float32)


def laplacian_unwrap(
    phase_rad: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    pad_factor: float = 1.5,
    kernel: str = "continuous",
    n_threads: int = 1,
) -> np.ndarray:
    """Laplacian phase unwrapping (Schofield & Zhu 2003) of one volume or of each echo.

    The Laplacian of the unwrapped phase is computed from ``sin`` and ``cos`` of the wrapped
    phase (so it is blind to 2*pi jumps) and inverted with an FFT Poisson solver on a
    zero-padded grid; both Laplacians use the same kernel, built from the true (possibly
    anisotropic) voxel sizes.

    Parameters
    ----------
    phase_rad : (x, y, z) or (x, y, z, echo) array
        Wrapped phase in radians.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    pad_factor : float
        Padded length over original length per axis (>= 1), see
        :func:`qsmflow.algorithms.fft.padded_shape`; zero phase fills the margin.
    kernel : {"continuous", "discrete"}
        Laplacian symbol used for both the forward Laplacians and the Poisson solve, see
        :func:`laplacian_kernel`. The continuous (spectral) one is exact for phase whose
        gradient stays well below pi per voxel. The discrete stencil turns the identity into a
        sum of ``sin`` of neighbour differences, which underestimates the curvature by about
        ``g^2 / 2`` where the phase changes by ``g`` rad per voxel; in simulated brains it
        left 1.2-1.8 times the error of the continuous kernel.
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    numpy.ndarray
        float32 unwrapped phase in radians, shape of ``phase_rad``. Smooth, but not congruent
        to the input: it differs from the true phase by a function that is harmonic where the
        phase is smooth, and by a constant (chosen so the result matches the input modulo
        2*pi on average).

    References
    ----------
    Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications.
    Opt Lett 2003;28:1194-1196.
    """
    phase = np.asarray(phase_rad, dtype=np.float32)
    if phase.ndim not in (3, 4):
        raise ValueError(f"phase must be 3-D or 4-D (x, y, z, echo), got shape {phase.shape}")
    if len(voxel_size_mm) != 3 or min(voxel_size_mm) <= 0:
        raise ValueError(f"voxel_size_mm must be 3 positive sizes, got {voxel_size_mm!r}")
    big = padded_shape(phase.shape[:3], pad_factor=pad_factor)
    lap_kernel = laplacian_kernel(big, voxel_size_mm, kind=kernel)
    if phase.ndim == 3:
        return _unwrap_3d(phase, lap_kernel, big, n_threads)
    out = np.empty(phase.shape, dtype=np.float32)
    for e in range(phase.shape[3]):
        out[..., e] = _unwrap_3d(np.ascontiguousarray(phase[..., e]), lap_kernel, big, n_threads)
    return out
