"""Dipole kernel and the forward model from susceptibility to field.

Conventions (see DESIGN.md): chi and field in ppm; ``b0_dir`` is the unit B0 direction in voxel
(array) coordinates; voxel sizes in mm. The unit dipole kernel in k-space is

    D(k) = 1/3 - (k . b)^2 / |k|^2,   D(0) = 0,

(Salomir et al., Concepts Magn Reson B 2003; Marques & Bowtell, Concepts Magn Reson B 2005), so the
field is ``ifft(D * fft(chi))`` with the Lorentz-sphere correction included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from .fft import crop_centered, kspace_grid, pad_centered, padded_shape

__all__ = ["normalize_b0_dir", "dipole_kernel", "forward_field"]


def normalize_b0_dir(b0_dir: Sequence[float]) -> np.ndarray:
    """Return ``b0_dir`` as a float64 unit vector; raise on zero or non-3-vectors."""
    b = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
    if b.size != 3 or not np.all(np.isfinite(b)):
        raise ValueError(f"B0 direction must be 3 finite numbers, got {b0_dir!r}")
    norm = np.linalg.norm(b)
    if norm < 1e-12:
        raise ValueError("B0 direction must not be the zero vector")
    return b / norm


def dipole_kernel(
    shape: Sequence[int],
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    real: bool = True,
) -> np.ndarray:
    """Unit dipole kernel D(k) on the FFT grid of ``shape`` (float32).

    Parameters
    ----------
    shape : (3,) ints
        Grid shape (already padded, if padding is wanted).
    voxel_size_mm : (3,) floats
        Voxel size along each array axis in mm (anisotropic sizes are handled exactly).
    b0_dir : (3,) floats
        B0 direction in voxel (array) coordinates; normalised here.
    real : bool
        Return the half-spectrum for ``scipy.fft.rfftn`` (last axis ``n // 2 + 1``).

    Returns
    -------
    numpy.ndarray
        float32 kernel with D(0) = 0, unshifted (DC at index 0).
    """
    b = normalize_b0_dir(b0_dir).astype(np.float32)
    ks = kspace_grid(shape, voxel_size_mm, real=real)
    k2 = ks[0] * ks[0] + ks[1] * ks[1] + ks[2] * ks[2]
    # On an even grid the Nyquist frequency is both +kN and -kN. Averaging D over the two signs
    # keeps the kernel real-even (Hermitian), so the real-FFT convolution is exact; it amounts
    # to dropping the cross terms of (k . b)^2 that involve a Nyquist component.
    kb = np.zeros((1, 1, 1), np.float32)
    kb_nyq = np.zeros((1, 1, 1), np.float32)
    for axis, (k, n) in enumerate(zip(ks, shape, strict=True)):
        kbi = k * b[axis]
        if n % 2 == 0:
            nyq = np.zeros(k.shape, dtype=bool)
            nyq.reshape(-1)[n // 2] = True
            kb_nyq = kb_nyq + np.where(nyq, kbi * kbi, np.float32(0))
            kbi = np.where(nyq, np.float32(0), kbi)
        kb = kb + kbi
    k2[0, 0, 0] = 1.0  # avoid 0/0 at DC; D(0) is set below
    kernel = np.float32(1.0 / 3.0) - (kb * kb + kb_nyq) / k2
    kernel[0, 0, 0] = 0.0
    return kernel.astype(np.float32, copy=False)


def forward_field(
    chi_ppm: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    pad_factor: float = 2.0,
    n_threads: int = 1,
) -> np.ndarray:
    """Field perturbation (ppm of B0) produced by a susceptibility distribution (ppm).

    The volume is zero-padded by ``pad_factor`` per axis (to fast FFT lengths) before the k-space
    convolution so that the field of sources near one edge does not wrap into the other.
    Susceptibility outside the volume is taken as zero, i.e. chi is relative to the medium that
    surrounds the field of view.

    Parameters
    ----------
    chi_ppm : (x, y, z) array
        Susceptibility in ppm.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    b0_dir : (3,) floats
        B0 direction in voxel coordinates.
    pad_factor : float
        Padded length over original length per axis (>= 1).
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    numpy.ndarray
        float32 field in ppm, same shape as ``chi_ppm``.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    if chi.ndim != 3:
        raise ValueError(f"chi must be a 3-D array, got shape {chi.shape}")
    big = padded_shape(chi.shape, pad_factor=pad_factor)
    kernel = dipole_kernel(big, voxel_size_mm, b0_dir, real=True)
    spec = scipy.fft.rfftn(pad_centered(chi, big), workers=n_threads)
    spec *= kernel
    field = scipy.fft.irfftn(spec, s=big, workers=n_threads)
    return np.ascontiguousarray(crop_centered(field, chi.shape), dtype=np.float32)
