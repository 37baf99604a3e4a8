"""Background field removal with spherical mean value (SMV) filters: SHARP and V-SHARP.

A field produced by sources outside the mask is harmonic inside it, so it equals its own
spherical mean there: ``(delta - s_r) * b = 0`` at every voxel whose sphere of radius ``r`` lies
inside the mask. Filtering the total field with ``delta - s_r``, keeping the voxels of the mask
eroded by ``r`` and deconvolving ``delta - s_r`` (truncated SVD) recovers the local field
(Schweser et al., NeuroImage 2011). V-SHARP (Wu et al., Magn Reson Med 2012) uses large spheres
in the interior and smaller ones towards the mask edge, so less of the brain is eroded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.fft

from ..fft import crop_centered, pad_centered, padded_shape
from ._validate import check_inputs

__all__ = ["default_radii_mm", "smv_kernel", "sharp", "vsharp"]


def default_radii_mm(voxel_size_mm: Sequence[float], *, max_radius_mm: float = 12.0) -> np.ndarray:
    """V-SHARP radii (mm) from about ``max_radius_mm`` down to one voxel, one voxel apart.

    The step and the smallest radius are the largest voxel size ``d``, so the smallest sphere
    reaches the neighbours along every axis: ``d * [n, n - 1, ..., 1]`` with
    ``n = max(1, round(max_radius_mm / d))``.
    """
    d = float(max(voxel_size_mm))
    n = max(1, int(round(max_radius_mm / d)))
    return d * np.arange(n, 0, -1, dtype=np.float64)


def _sphere_offsets(radius_mm: float, voxel_size_mm: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Integer voxel offsets (three 1-D arrays) whose centres lie within ``radius_mm``."""
    half = [int(np.floor(radius_mm / d + 1e-9)) for d in voxel_size_mm]
    axes = [np.arange(-h, h + 1) for h in half]
    grid = np.meshgrid(*axes, indexing="ij")
    r2 = sum((g * d) ** 2 for g, d in zip(grid, voxel_size_mm, strict=True))
    inside = r2 <= radius_mm * radius_mm * (1 + 1e-9)
    return tuple(g[inside] for g in grid)


def smv_kernel(
    shape: Sequence[int], voxel_size_mm: Sequence[float], radius_mm: float
) -> tuple[np.ndarray, int]:
    """Spherical mean value kernel on the real-FFT grid of ``shape``.

    The sphere is built in image space from the true voxel sizes (voxel centres within
    ``radius_mm`` of the origin, weights ``1 / count``), placed with its centre at index 0 and
    transformed with ``scipy.fft.rfftn``.

    Returns
    -------
    spectrum : numpy.ndarray
        float32 half spectrum ``S(k)`` (real, since the sphere is symmetric); ``S(0) = 1``.
    count : int
        Number of voxels in the sphere.
    """
    offsets = _sphere_offsets(radius_mm, voxel_size_mm)
    count = offsets[0].size
    for o, n in zip(offsets, shape, strict=True):
        if 2 * int(np.abs(o).max()) + 1 > n:
            raise ValueError(f"a {radius_mm} mm sphere does not fit in a grid of shape {shape}")
    kernel = np.zeros(tuple(shape), dtype=np.float32)
    kernel[offsets] = np.float32(1.0 / count)  # negative offsets wrap to the far end
    spectrum = scipy.fft.rfftn(kernel).real.astype(np.float32)
    return spectrum, count


def vsharp(
    total_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radii_mm: Sequence[float] | None = None,
    threshold: float = 0.05,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """V-SHARP background field removal (Wu et al. 2012), variable-radius SHARP.

    For each radius ``r`` (largest first) the masked total field is filtered with
    ``delta - s_r``; each voxel keeps the result of the largest sphere that fits inside the
    mask around it. The combined field is deconvolved with the largest kernel, dividing by
    ``1 - S_rmax(k)`` where ``|1 - S_rmax(k)| >= threshold`` and setting the rest to zero
    (truncated SVD, Schweser et al. 2011), and masked with the mask eroded by the smallest
    sphere. Convolutions are FFTs on a grid padded (by :mod:`qsmflow.algorithms.fft`) by the
    largest radius, so nothing wraps around.

    Parameters
    ----------
    total_field_ppm : (x, y, z) array
        Unwrapped total field (ppm; any unit works, the filter is linear).
    mask : (x, y, z) bool array
        Region of interest (brain mask).
    voxel_size_mm : (3,) floats
        Voxel size in mm; spheres are built from the true (possibly anisotropic) sizes.
    radii_mm : sequence of float, optional
        Sphere radii in mm; default :func:`default_radii_mm` (12 mm down to one voxel in steps
        of one voxel). Sorted largest first here. A radius smaller than every voxel size
        (sphere of one voxel) is rejected.
    threshold : float
        TSVD truncation level for ``|1 - S(k)|`` of the largest kernel.
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    local_field_ppm : numpy.ndarray
        float32 local field (same unit as the input), zero outside ``eroded_mask``.
    eroded_mask : numpy.ndarray
        bool mask eroded by the smallest sphere: where the local field is valid.

    References
    ----------
    Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed sensing.
    Magn Reson Med 2012;67:137-147.
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of intrinsic magnetic
    tissue properties using MRI signal phase. NeuroImage 2011;54:2789-2807.
    """
    field = np.asarray(total_field_ppm, dtype=np.float32)
    roi = np.asarray(mask, dtype=bool)
    field, roi = check_inputs(field, roi, voxel_size_mm)
    radii = default_radii_mm(voxel_size_mm) if radii_mm is None else np.asarray(radii_mm, float)
    radii = np.sort(np.unique(radii.reshape(-1)))[::-1]
    if radii.size == 0 or radii[-1] <= 0:
        raise ValueError(f"radii_mm must be positive, got {radii_mm!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")

    margin = int(np.ceil(radii[0] / min(voxel_size_mm))) + 1
    big = padded_shape(field.shape, pad_factor=1.0, min_margin=margin)

    def conv(spec: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        return crop_centered(scipy.fft.irfftn(spec * kernel, s=big, workers=n_threads), field.shape)

    field_spec = scipy.fft.rfftn(pad_centered(np.where(roi, field, 0), big), workers=n_threads)
    mask_spec = scipy.fft.rfftn(pad_centered(roi.astype(np.float32), big), workers=n_threads)

    combined = np.zeros(field.shape, dtype=np.float32)
    filled = np.zeros(field.shape, dtype=bool)
    eroded = filled
    largest = None
    for r in radii:
        s_spec, count = smv_kernel(big, voxel_size_mm, r)
        if count < 2:
            raise ValueError(f"a {r} mm sphere holds a single voxel; use radii >= one voxel")
        # A voxel is inside the mask eroded by r when its whole sphere is in the mask.
        eroded = conv(mask_spec, s_spec) > 1.0 - 0.5 / count
        eroded &= roi
        new = eroded & ~filled
        if new.any():
            high_pass = conv(field_spec, 1.0 - s_spec)
            combined[new] = high_pass[new]
            filled |= new
        if largest is None:
            largest = 1.0 - s_spec
        del s_spec

    # Deconvolve the largest kernel with truncated SVD.
    spec = scipy.fft.rfftn(pad_centered(combined, big), workers=n_threads)
    keep = np.abs(largest) >= threshold
    inv = np.zeros_like(largest)
    np.divide(1.0, largest, out=inv, where=keep)
    local = conv(spec, inv)
    local = np.where(eroded, local, 0).astype(np.float32)
    return local, eroded


def sharp(
    total_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radius_mm: float | None = None,
    threshold: float = 0.05,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """SHARP background field removal (Schweser et al. 2011): V-SHARP with one radius.

    Parameters
    ----------
    total_field_ppm, mask, voxel_size_mm, threshold, n_threads
        As for :func:`vsharp`.
    radius_mm : float, optional
        Sphere radius in mm; default about 6 mm, a whole number of the largest voxel size
        (``default_radii_mm(voxel_size_mm, max_radius_mm=6)[0]``).

    Returns
    -------
    local_field_ppm, eroded_mask
        As for :func:`vsharp`; the mask is eroded by ``radius_mm``.

    References
    ----------
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. NeuroImage 2011;54:2789-2807.
    """
    if radius_mm is None:
        radius_mm = float(default_radii_mm(voxel_size_mm, max_radius_mm=6.0)[0])
    return vsharp(
        total_field_ppm,
        mask,
        voxel_size_mm,
        radii_mm=[radius_mm],
        threshold=threshold,
        n_threads=n_threads,
    )
