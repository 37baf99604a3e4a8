"""Dipole inversion: from local field (ppm) to susceptibility (ppm).

The forward model is ``field = ifft(D * fft(chi))`` with the unit dipole kernel of
:mod:`qsmflow.algorithms.dipole`; its zeros on the magic-angle cone make the inversion ill-posed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from ..dipole import dipole_kernel
from ..fft import crop_centered, pad_centered, padded_shape
from ._common import check_inversion_inputs

__all__ = ["tkd_inverse_kernel", "tkd"]


def tkd_inverse_kernel(kernel: np.ndarray, threshold: float) -> np.ndarray:
    """Truncated inverse of a dipole kernel: ``1 / D`` where ``|D| > threshold``, else
    ``sign(D) / threshold`` (0 at ``D = 0``, e.g. at DC). float32, same shape as ``kernel``."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    d = np.asarray(kernel, dtype=np.float32)
    inv = np.sign(d) / np.float32(threshold)
    big = np.abs(d) > threshold
    inv[big] = 1.0 / d[big]
    return inv.astype(np.float32, copy=False)


def tkd(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    threshold: float = 0.19,
    correct: bool = True,
    pad_factor: float = 2.0,
    n_threads: int = 1,
) -> np.ndarray:
    """Truncated k-space division (Shmueli et al. 2009).

    ``chi = ifft(fft(field) * D_inv)`` with ``D_inv`` from :func:`tkd_inverse_kernel`. Clipping
    ``1 / D`` near the magic angle scales the susceptibility down by the central value of the
    point spread function ``ifft(D * D_inv)`` (the k-space mean of ``D * D_inv``); with
    ``correct=True`` the map is divided by that value (Schweser et al. 2013). The field is
    masked and zero-padded (:mod:`qsmflow.algorithms.fft`) before the transform.

    Parameters
    ----------
    local_field_ppm : (x, y, z) array
        Local (background-free) field in ppm of B0.
    mask : (x, y, z) bool array
        Region where the field is valid; the output is zero outside it.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    b0_dir : (3,) floats
        B0 direction in voxel coordinates.
    threshold : float
        Truncation level for ``|D|`` (0 < threshold <= 1).
    correct : bool
        Apply the Schweser et al. 2013 correction for the TKD underestimation.
    pad_factor : float
        Padded length over original length per axis (>= 1).
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    numpy.ndarray
        float32 susceptibility in ppm, zero outside ``mask``; its mean is arbitrary (see
        :mod:`qsmflow.algorithms.reference`).

    References
    ----------
    Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic susceptibility
    mapping of brain tissue in vivo using MRI phase data. Magn Reson Med 2009;62:1510-1522.
    Schweser F, Deistung A, Sommer K, Reichenbach JR. Toward online reconstruction of
    quantitative susceptibility maps: superfast dipole inversion. Magn Reson Med
    2013;69:1582-1594.
    """
    field, roi = check_inversion_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    big = padded_shape(field.shape, pad_factor=pad_factor)
    kernel = dipole_kernel(big, voxel_size_mm, b0_dir, real=True)
    inv = tkd_inverse_kernel(kernel, threshold)
    if correct:
        # Centre of the PSF = mean of D * D_inv over the full spectrum. The half spectrum
        # counts every column but the first (and, for even n, the last) twice.
        prod = kernel * inv
        n_last = big[2]
        weights = np.full(prod.shape[2], 2.0)
        weights[0] = 1.0
        if n_last % 2 == 0:
            weights[-1] = 1.0
        centre = float((prod.sum(axis=(0, 1), dtype=np.float64) * weights).sum()) / np.prod(big)
        inv /= np.float32(centre)
        del prod
    del kernel
    spec = scipy.fft.rfftn(pad_centered(np.where(roi, field, 0), big), workers=n_threads)
    spec *= inv
    chi = crop_centered(scipy.fft.irfftn(spec, s=big, workers=n_threads), field.shape)
    return np.where(roi, chi, 0).astype(np.float32)
