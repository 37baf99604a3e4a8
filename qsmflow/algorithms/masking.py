"""Threshold masks and morphology in millimetres.

``threshold_mask`` turns an intensity image (magnitude, R2*-free first echo, ...) into a mask:
threshold (Otsu's method, a percentile or a fixed value), keep the largest connected component,
fill enclosed holes and erode by a ball given in mm. Erosion and dilation use Euclidean distance
transforms with the true voxel sizes, so a ball of radius ``r`` mm is exact for anisotropic
voxels and the cost does not grow with the radius.

Otsu's threshold maximises the between-class variance of the intensity histogram (Otsu, IEEE
Trans Syst Man Cybern 1979;9:62-66).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "otsu_threshold",
    "threshold_mask",
    "fill_holes",
    "largest_component",
    "erode_mm",
    "dilate_mm",
]

_METHODS = ("otsu", "percentile", "fixed")


def otsu_threshold(values: np.ndarray, *, n_bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape; non-finite values are ignored).

    With the histogram ``p_i`` (``n_bins`` equal bins between the minimum and maximum), the class
    probability ``w(k) = sum_{i<=k} p_i`` and first moment ``mu(k) = sum_{i<=k} p_i x_i``, the
    between-class variance ``(mu_T w(k) - mu(k))^2 / (w(k) (1 - w(k)))`` is maximised over the
    bin boundaries ``k`` (Otsu 1979, eq. 18). The threshold is the upper edge of bin ``k``: the
    lower class is ``values <= threshold``. A constant input returns its value.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("otsu_threshold: no finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(v, bins=int(n_bins), range=(lo, hi))
    p = counts / counts.sum()
    centres = 0.5 * (edges[:-1] + edges[1:])
    w = np.cumsum(p)[:-1]  # class-0 probability for a split after bin k = 0 .. n_bins - 2
    mu = np.cumsum(p * centres)[:-1]
    mu_total = float(np.dot(p, centres))
    denom = w * (1.0 - w)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(denom > 0, (mu_total * w - mu) ** 2 / denom, 0.0)
    # ties (flat maxima between two separated modes): take the middle of the plateau
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))
    k = best[best.size // 2]
    return float(edges[k + 1])


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill cavities of a 3-D mask that are not connected (6-connectivity) to the array border."""
    return ndimage.binary_fill_holes(np.asarray(mask, dtype=bool))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (an empty mask stays empty)."""
    m = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(m)
    if n <= 1:
        return m.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _check_voxel_size(voxel_size_mm: Sequence[float] | None, ndim: int) -> np.ndarray:
    if voxel_size_mm is None:
        raise ValueError("voxel_size_mm is required for morphology in mm")
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    if vox.shape != (ndim,) or np.any(vox <= 0):
        raise ValueError(f"voxel_size_mm must be {ndim} positive sizes, got {voxel_size_mm}")
    return vox


def erode_mm(mask: np.ndarray, radius_mm: float, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Erode ``mask`` by a ball of ``radius_mm``: keep voxels with no outside voxel within it.

    A voxel survives when the Euclidean distance (in mm, true voxel sizes) from its centre to the
    nearest voxel outside the mask is larger than ``radius_mm``; voxels beyond the array count as
    outside. This is binary erosion with the structuring element of all voxel offsets within
    ``radius_mm``.
    """
    m = np.asarray(mask, dtype=bool)
    vox = _check_voxel_size(voxel_size_mm, m.ndim)
    if radius_mm < 0:
        raise ValueError(f"radius_mm must be >= 0, got {radius_mm}")
    if radius_mm == 0 or not m.any():
        return m.copy()
    padded = np.pad(m, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=vox)
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    return dist[inner] > radius_mm * (1 + 1e-9)


def dilate_mm(mask: np.ndarray, radius_mm: float, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Dilate ``mask`` by a ball of ``radius_mm``: add voxels within it of any mask voxel."""
    m = np.asarray(mask, dtype=bool)
    vox = _check_voxel_size(voxel_size_mm, m.ndim)
    if radius_mm < 0:
        raise ValueError(f"radius_mm must be >= 0, got {radius_mm}")
    if radius_mm == 0 or not m.any():
        return m.copy()
    dist = ndimage.distance_transform_edt(~m, sampling=vox)
    return dist <= radius_mm * (1 + 1e-9)


def threshold_mask(
    image: np.ndarray,
    *,
    method: str = "otsu",
    value: float | None = None,
    fill_holes: bool = True,
    voxel_size_mm: Sequence[float] | None = None,
    erode_mm: float = 0.0,
    largest_component: bool = True,
) -> np.ndarray:
    """Mask of the voxels brighter than a threshold, cleaned up.

    Steps, in order: threshold (``image > threshold``), keep the largest 6-connected component,
    fill enclosed holes, erode by a ball of ``erode_mm``.

    Parameters
    ----------
    image : (x, y, z) array
        Intensity image; non-finite voxels are never in the mask.
    method : {"otsu", "percentile", "fixed"}
        ``"otsu"``: Otsu's threshold of the finite voxels (``value`` must be None);
        ``"percentile"``: the ``value``-th percentile (0 to 100) of the finite voxels;
        ``"fixed"``: ``value`` itself, in image units.
    value : float, optional
        Percentile or threshold, for the methods that need one.
    fill_holes : bool
        Fill cavities enclosed by the mask.
    voxel_size_mm : (3,) float, optional
        Voxel sizes in mm; required when ``erode_mm > 0``.
    erode_mm : float
        Radius in mm of the ball the mask is eroded by (0: no erosion).
    largest_component : bool
        Keep only the largest connected component.

    Returns
    -------
    mask : bool array, the shape of ``image``
    """
    img = np.asarray(image)
    if not np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float64)
    finite = np.isfinite(img)
    if not finite.any():
        raise ValueError("threshold_mask: the image has no finite voxels")
    if method == "otsu":
        if value is not None:
            raise ValueError("method='otsu' takes no value")
        threshold = otsu_threshold(img[finite])
    elif method == "percentile":
        if value is None or not 0.0 <= float(value) <= 100.0:
            raise ValueError(f"method='percentile' needs a value in [0, 100], got {value}")
        threshold = float(np.percentile(img[finite], float(value)))
    elif method == "fixed":
        if value is None:
            raise ValueError("method='fixed' needs a threshold value")
        threshold = float(value)
    else:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if erode_mm < 0:
        raise ValueError(f"erode_mm must be >= 0, got {erode_mm}")
    if erode_mm > 0:
        vox = _check_voxel_size(voxel_size_mm, img.ndim)
    mask = finite & (img > threshold)
    if largest_component:
        mask = _largest_component(mask)
    if fill_holes:
        mask = _fill_holes(mask)
    if erode_mm > 0:
        mask = _erode_mm(mask, erode_mm, vox)
    return mask


# aliases: threshold_mask's keyword arguments shadow the public names inside its body
_fill_holes = fill_holes
_largest_component = largest_component
_erode_mm = erode_mm
