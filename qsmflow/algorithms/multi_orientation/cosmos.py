"""COSMOS: Calculation Of Susceptibility through Multiple Orientation Sampling.

Liu, Spincemaille, de Rochefort, Kressler & Wang, Magn Reson Med 2009;61:196. The same
(isotropic) susceptibility seen with several B0 directions ``h_i`` (registered into one voxel
frame) gives fields ``b_i = F^-1 D_i F chi`` with ``D_i = 1/3 - (k . h_i)^2 / |k|^2``; the cones
where one ``D_i`` vanishes differ between orientations, so the joint least-squares problem is
well-posed:

* closed form, per spatial frequency: ``chi(k) = sum_i D_i b_i(k) / sum_i D_i^2``;
* masked conjugate gradient: ``min_chi sum_i ||W_i M (F^-1 D_i F chi - b_i)||^2`` with ``chi``
  supported in the mask ``M``, where the fields are known (CG on the normal equations, started
  from the closed form); this image-space weighted least squares is the formulation of Liu et
  al. (2009), and the default.

Why the closed form is less accurate on a masked brain (18-20 % NRMSE where the masked CG reaches
< 1 % on the same noise-free fields): the per-frequency solution needs each field on the whole
grid, but a local field is only known inside the brain mask and is stored as 0 outside, although
the brain's own sources do produce a field there. The zero-filled fields are not fields of any
susceptibility confined to the mask, so the k-space division spreads the truncation error over
the whole spectrum (a low-frequency under-estimate plus edge artefacts). The remedy is to treat
the field outside the mask as unknown rather than zero, which is exactly the masked least
squares above (it discards the data term outside ``M``); the closed form is kept as its start.

Per-orientation masks: after registration every orientation's field is valid in its own
(resampled) mask. Passing those masks as ``weights`` and their union as ``mask`` fits each field
only where it is known and keeps the sources near the edge of the other masks (intersecting the
masks instead leaves sources outside the intersection whose fields reach into it; on the 3 mm
head that alone costs 11-22 % NRMSE with otherwise perfect fields).

Fields and chi in ppm; B0 directions in the (reference) voxel frame; voxel sizes in mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from ..dipole import dipole_kernel
from ..fft import crop_centered, pad_centered, padded_shape
from .sti import check_orientations

__all__ = ["cosmos", "cosmos_closed_form", "cosmos_cg"]


def _check_inputs(fields, mask, b0_dirs):
    fields = [np.asarray(f, dtype=np.float32) for f in fields]
    mask = np.asarray(mask, dtype=bool)
    if len(fields) != len(b0_dirs):
        raise ValueError(
            f"got {len(fields)} fields but {len(b0_dirs)} B0 directions; give one per field"
        )
    dirs = check_orientations(b0_dirs, what="COSMOS")
    for i, f in enumerate(fields):
        if f.shape != mask.shape:
            raise ValueError(
                f"field {i} has shape {f.shape} but the mask has {mask.shape}; resample every "
                "orientation to the reference grid first (RegisterOrientations)"
            )
        if not np.all(np.isfinite(f[mask])):
            raise ValueError(f"field {i} has NaN or Inf inside the mask")
    return fields, mask, dirs


def cosmos_closed_form(
    fields_ppm: Sequence[np.ndarray],
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dirs: Sequence[Sequence[float]],
    *,
    threshold: float = 1e-3,
    pad_factor: float = 1.5,
    n_threads: int = 1,
) -> np.ndarray:
    """COSMOS per-frequency least squares, ``chi = F^-1 [sum D_i F b_i / sum D_i^2]`` (ppm).

    Frequencies where ``sum_i D_i^2 < threshold`` (k = 0 and, for nearly coplanar B0
    directions, where all cones meet) are set to zero. Returns chi (ppm) zeroed outside ``mask``.
    """
    fields, mask, dirs = _check_inputs(fields_ppm, mask, b0_dirs)
    big = padded_shape(mask.shape, pad_factor=pad_factor)
    num = None
    den = None
    for f, h in zip(fields, dirs, strict=True):
        d = dipole_kernel(big, voxel_size_mm, h, real=True)
        spec = scipy.fft.rfftn(
            pad_centered(np.where(mask, f, np.float32(0)), big), workers=n_threads
        )
        spec *= d
        num = spec if num is None else num + spec
        d *= d
        den = d if den is None else den + d
        del spec, d
    keep = den >= np.float32(threshold)
    num *= np.where(keep, np.float32(1) / np.where(keep, den, np.float32(1)), np.float32(0))
    del den, keep
    chi = scipy.fft.irfftn(num, s=big, workers=n_threads)
    return np.where(mask, crop_centered(chi, mask.shape), np.float32(0)).astype(np.float32)


def cosmos_cg(
    fields_ppm: Sequence[np.ndarray],
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dirs: Sequence[Sequence[float]],
    *,
    weights: Sequence[np.ndarray] | None = None,
    max_iter: int = 30,
    tol: float = 1e-3,
    pad_factor: float = 1.0,
    init: np.ndarray | None = None,
    n_threads: int = 1,
) -> np.ndarray:
    """Masked COSMOS by conjugate gradients on the normal equations (Liu et al. 2009).

    Solves ``min_chi sum_i ||W_i M (D_i chi - b_i)||^2`` over chi supported in ``mask``;
    ``weights`` (optional, per orientation, e.g. each orientation's registered mask, or a
    magnitude- or noise-based confidence) default to 1. Starts from ``init`` or the closed-form
    solution; stops after ``max_iter`` iterations or when the residual of the normal equations
    has dropped by ``tol``. Returns chi in ppm.

    ``pad_factor`` 1 (default) pads only to fast FFT lengths: chi and the data term are confined
    to the mask, so the circular wrap-around of the far field costs little (5 noise-free
    orientations, 1.1 mm head at 160^3: 0.85 % NRMSE unpadded, 0.56 % with 1.5x padding, at
    about a fifth of the time).
    """
    fields, mask, dirs = _check_inputs(fields_ppm, mask, b0_dirs)
    big = padded_shape(mask.shape, pad_factor=pad_factor)
    shape = mask.shape
    m = mask.astype(np.float32)
    if weights is None:
        w2 = [m] * len(fields)
    else:
        if len(weights) != len(fields):
            raise ValueError(f"got {len(weights)} weight maps for {len(fields)} fields")
        w2 = [np.asarray(w, dtype=np.float32) ** 2 * m for w in weights]
    kernels = [dipole_kernel(big, voxel_size_mm, h, real=True) for h in dirs]

    def apply_d(x, d):
        spec = scipy.fft.rfftn(pad_centered(x, big), workers=n_threads)
        spec *= d
        return crop_centered(scipy.fft.irfftn(spec, s=big, workers=n_threads), shape)

    def normal_op(x):
        spec = scipy.fft.rfftn(pad_centered(x * m, big), workers=n_threads)
        acc = None
        for d, wi in zip(kernels, w2, strict=True):
            y = crop_centered(scipy.fft.irfftn(spec * d, s=big, workers=n_threads), shape)
            s2 = scipy.fft.rfftn(pad_centered((y * wi).astype(np.float32), big), workers=n_threads)
            s2 *= d
            acc = s2 if acc is None else acc + s2
        out = crop_centered(scipy.fft.irfftn(acc, s=big, workers=n_threads), shape)
        return (out * m).astype(np.float32)

    rhs = np.zeros(shape, np.float32)
    for f, d, wi in zip(fields, kernels, w2, strict=True):
        rhs += apply_d((f * wi).astype(np.float32), d) * m
    if init is None:
        x = cosmos_closed_form(
            fields, mask, voxel_size_mm, dirs, pad_factor=pad_factor, n_threads=n_threads
        )
    else:
        x = np.where(mask, np.asarray(init, np.float32), np.float32(0))

    def dot(a, b):
        return float(np.sum(a * b, dtype=np.float64))

    r = rhs - normal_op(x)
    p = r.copy()
    rr = dot(r, r)
    rr0 = dot(rhs, rhs) or 1.0
    for _ in range(max_iter):
        if rr <= (tol**2) * rr0:
            break
        ap = normal_op(p)
        alpha = rr / dot(p, ap)
        x += np.float32(alpha) * p
        r -= np.float32(alpha) * ap
        rr_new = dot(r, r)
        p = r + np.float32(rr_new / rr) * p
        rr = rr_new
    return np.where(mask, x, np.float32(0)).astype(np.float32)


def cosmos(
    fields_ppm: Sequence[np.ndarray],
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dirs: Sequence[Sequence[float]],
    *,
    method: str = "cg",
    n_threads: int = 1,
    **kwargs,
) -> np.ndarray:
    """COSMOS susceptibility (ppm) by ``method`` ``"cg"`` (default) or ``"closed-form"``."""
    if method == "closed-form":
        func = cosmos_closed_form
    elif method == "cg":
        func = cosmos_cg
    else:
        raise ValueError(f"COSMOS method must be 'closed-form' or 'cg', got {method!r}")
    return func(fields_ppm, mask, voxel_size_mm, b0_dirs, n_threads=n_threads, **kwargs)
