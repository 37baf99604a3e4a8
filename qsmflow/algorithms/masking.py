"""Threshold masks, phase-quality masks, two-pass artefact reduction and morphology in mm.

``threshold_mask`` turns an intensity image (magnitude, phase-quality map, ...) into a mask:
threshold (Otsu's method, Otsu's method on the voxels above Otsu's threshold, a percentile or a
fixed value), keep the largest connected component, close gaps, fill enclosed holes and erode by
a ball given in mm. Erosion and dilation use Euclidean distance transforms with the true voxel
sizes, so a ball of radius ``r`` mm is exact for anisotropic voxels and the cost does not grow
with the radius.

Otsu's threshold maximises the between-class variance of the intensity histogram (Otsu, IEEE
Trans Syst Man Cybern 1979;9:62-66).

Phase-quality masks and the two-pass combination follow QSMxT (Stewart AW, Robinson SD,
O'Brien K, et al. QSMxT: Robust masking and artifact reduction for quantitative susceptibility
mapping. Magn Reson Med 2022;87:1289-1300): the ROMEO phase-quality map (Dymerska et al., MRM
2021) is thresholded; the thresholded mask with its holes filled gives a first susceptibility
map without holes, the unfilled ("reliable") mask gives a second map free of the streaking that
unreliable voxels (veins, haemorrhage, calcifications, where the phase is noisy) spread through
the inversion, and the final map takes the second map inside the reliable mask and the first map
in the filled holes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "otsu_threshold",
    "foreground_otsu_threshold",
    "threshold_value",
    "threshold_mask",
    "clean_mask",
    "fill_holes",
    "largest_component",
    "erode_mm",
    "dilate_mm",
    "close_mm",
    "check_head_image",
    "remove_outer_csf",
    "magnitude_tissue_mask",
    "local_mean",
    "tissue_split",
    "phase_quality_map",
    "phase_quality_mask",
    "reliable_mask",
    "two_pass_combine",
]

_METHODS = ("otsu", "otsu-foreground", "percentile", "fixed")


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


def foreground_otsu_threshold(values: np.ndarray, *, n_bins: int = 256) -> float:
    """Otsu's threshold of the values above Otsu's threshold (a two-step, three-class split).

    The first Otsu threshold separates the background (air, bone: noise) from the head; the
    second splits the head into its darker and brighter part. On a phase-quality map that is
    the CSF and scalp around the brain (phase noisier near the skull, darker magnitude) versus
    brain tissue; on a GRE magnitude, CSF and scalp versus brain tissue.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    first = otsu_threshold(v, n_bins=n_bins)
    upper = v[v > first]
    if upper.size == 0:
        return first
    return otsu_threshold(upper, n_bins=n_bins)


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


def close_mm(mask: np.ndarray, radius_mm: float, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Morphological closing by a ball of ``radius_mm``: dilate, then erode.

    Bridges gaps narrower than about ``2 * radius_mm`` (sulci, vessels cut out of a threshold
    mask) without growing the outline; the array is padded so that the border does not erode.
    """
    m = np.asarray(mask, dtype=bool)
    vox = _check_voxel_size(voxel_size_mm, m.ndim)
    if radius_mm < 0:
        raise ValueError(f"radius_mm must be >= 0, got {radius_mm}")
    if radius_mm == 0 or not m.any():
        return m.copy()
    # work on the bounding box plus the ball's reach (zero-padded where it leaves the array)
    reach = [int(np.ceil(radius_mm / v)) + 1 for v in vox]
    box, pads = [], []
    for axis in range(m.ndim):
        hit = np.flatnonzero(m.any(axis=tuple(a for a in range(m.ndim) if a != axis)))
        lo, hi = hit[0] - reach[axis], hit[-1] + 1 + reach[axis]
        box.append(slice(max(lo, 0), min(hi, m.shape[axis])))
        pads.append((max(-lo, 0), max(hi - m.shape[axis], 0)))
    padded = np.pad(m[tuple(box)], pads)
    closed = ~dilate_mm(~dilate_mm(padded, radius_mm, vox), radius_mm, vox)
    inner = tuple(slice(a, closed.shape[i] - b) for i, (a, b) in enumerate(pads))
    out = np.zeros_like(m)
    out[tuple(box)] = closed[inner]
    return out


def threshold_value(
    image: np.ndarray, *, method: str = "otsu", value: float | None = None
) -> float:
    """Threshold of the finite voxels of ``image`` by ``method`` (see :func:`threshold_mask`)."""
    img = np.asarray(image)
    finite = img[np.isfinite(img)]
    if finite.size == 0:
        raise ValueError("threshold: the image has no finite voxels")
    if method in ("otsu", "otsu-foreground"):
        if value is not None:
            raise ValueError(f"method={method!r} takes no value")
        pick = otsu_threshold if method == "otsu" else foreground_otsu_threshold
        return pick(finite)
    if method == "percentile":
        if value is None or not 0.0 <= float(value) <= 100.0:
            raise ValueError(f"method='percentile' needs a value in [0, 100], got {value}")
        return float(np.percentile(finite, float(value)))
    if method == "fixed":
        if value is None:
            raise ValueError("method='fixed' needs a threshold value")
        return float(value)
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def clean_mask(
    mask: np.ndarray,
    *,
    largest_component: bool = True,
    close_mm: float = 0.0,
    fill_holes: bool = True,
    erode_mm: float = 0.0,
    voxel_size_mm: Sequence[float] | None = None,
) -> np.ndarray:
    """Largest component, closing by ``close_mm``, hole filling, erosion by ``erode_mm``."""
    if erode_mm < 0:
        raise ValueError(f"erode_mm must be >= 0, got {erode_mm}")
    if close_mm < 0:
        raise ValueError(f"close_mm must be >= 0, got {close_mm}")
    m = np.asarray(mask, dtype=bool)
    if erode_mm > 0 or close_mm > 0:
        vox = _check_voxel_size(voxel_size_mm, m.ndim)
    if largest_component:
        m = _largest_component(m)
    if close_mm > 0:
        m = _close_mm(m, close_mm, vox)
    if fill_holes:
        m = _fill_holes(m)
    if erode_mm > 0:
        m = _erode_mm(m, erode_mm, vox)
    return m


def threshold_mask(
    image: np.ndarray,
    *,
    method: str = "otsu",
    value: float | None = None,
    fill_holes: bool = True,
    voxel_size_mm: Sequence[float] | None = None,
    erode_mm: float = 0.0,
    largest_component: bool = True,
    close_mm: float = 0.0,
) -> np.ndarray:
    """Mask of the voxels brighter than a threshold, cleaned up.

    Steps, in order: threshold (``image > threshold``), keep the largest 6-connected component,
    close gaps by a ball of ``close_mm``, fill enclosed holes, erode by a ball of ``erode_mm``.

    Parameters
    ----------
    image : (x, y, z) array
        Intensity image; non-finite voxels are never in the mask.
    method : {"otsu", "otsu-foreground", "percentile", "fixed"}
        ``"otsu"``: Otsu's threshold of the finite voxels (``value`` must be None);
        ``"otsu-foreground"``: Otsu's threshold of the voxels above Otsu's threshold (see
        :func:`foreground_otsu_threshold`; ``value`` must be None);
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
    close_mm : float
        Radius in mm of the ball of a morphological closing (0: none); needs ``voxel_size_mm``.

    Returns
    -------
    mask : bool array, the shape of ``image``
    """
    img = np.asarray(image)
    if not np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float64)
    threshold = threshold_value(img, method=method, value=value)
    mask = np.isfinite(img) & (img > threshold)
    return clean_mask(
        mask,
        largest_component=largest_component,
        close_mm=close_mm,
        fill_holes=fill_holes,
        erode_mm=erode_mm,
        voxel_size_mm=voxel_size_mm,
    )


def check_head_image(
    image: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    name: str = "image",
    min_fraction: float = 0.01,
) -> None:
    """Raise ``ValueError`` unless ``image`` is a 3-D image that shows a head.

    Checks: 3-D shape, finite values, not all zero (or constant), and an object: after Otsu's
    threshold and a one-voxel opening (which breaks up noise speckle), the largest connected
    piece must fill at least ``min_fraction`` of the image (a head fills 10-50 % of its field
    of view; the largest piece of pure noise ~0.001 %). Relative, so that small brains (rodents,
    ex vivo samples) pass. ``name`` (a file name or parameter) starts every message.
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3-D image, got shape {img.shape}; give one echo or one volume "
            "(for 4-D multi-echo data use the first echo or an echo combination)"
        )
    _check_voxel_size(voxel_size_mm, 3)
    finite = np.isfinite(img)
    if not finite.any():
        raise ValueError(f"{name}: the image has no finite voxels")
    values = np.where(finite, img, 0).astype(np.float32, copy=False)
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        what = "all zero" if hi == 0 else f"constant ({hi})"
        raise ValueError(
            f"{name}: the image is {what}; expected a head image (magnitude or quality map) - "
            "check that the right file was given and that it is not empty"
        )
    foreground = ndimage.binary_opening(values > otsu_threshold(values[finite]))
    fraction = np.count_nonzero(largest_component(foreground)) / img.size
    if fraction < min_fraction:
        raise ValueError(
            f"{name}: no head found (the largest bright object fills {100 * fraction:.3g} % of "
            f"the image, expected at least {100 * min_fraction:.3g} %); is this a noise-only "
            "image or the wrong file?"
        )


def _upsample_linear(coarse: np.ndarray, shape: Sequence[int], factor: Sequence[int]) -> np.ndarray:
    """Linear interpolation of a block-averaged grid back to ``shape`` (one axis at a time)."""
    out = coarse
    for axis, (n, f) in enumerate(zip(shape, factor, strict=True)):
        m = out.shape[axis]
        pos = np.clip((np.arange(n) + 0.5) / f - 0.5, 0, m - 1)
        lo = np.minimum(np.floor(pos).astype(np.intp), m - 1)
        hi = np.minimum(lo + 1, m - 1)
        w = (pos - lo).astype(np.float32)
        shape_w = [1] * out.ndim
        shape_w[axis] = n
        w = w.reshape(shape_w)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def local_mean(
    image: np.ndarray,
    weight: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    sigma_mm: float = 20.0,
    grid_mm: float = 4.0,
) -> np.ndarray:
    """Weighted local mean of ``image`` at the scale ``sigma_mm`` (normalised convolution).

    ``G * (image w) / G * w`` with a Gaussian ``G`` of ``sigma_mm`` and the voxels of ``weight``
    (bool or non-negative), computed on a grid of about ``grid_mm`` (block averages) and
    interpolated back; where the weights vanish the global weighted mean is used. A smooth
    estimate of the receive (bias) field of a magnitude image when ``weight`` marks one tissue
    class (Knutsson & Westin, CVPR 1993).
    """
    img = np.asarray(image, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)
    vox = _check_voxel_size(voxel_size_mm, img.ndim)
    factor = [max(1, int(round(grid_mm / v))) for v in vox]
    pad = [(0, (-n) % f) for n, f in zip(img.shape, factor, strict=True)]
    coarse_shape = [(n + p[1]) // f for n, p, f in zip(img.shape, pad, factor, strict=True)]
    blocks = []
    for arr in (img * w, w):
        a = np.pad(arr, pad).reshape(
            coarse_shape[0], factor[0], coarse_shape[1], factor[1], coarse_shape[2], factor[2]
        )
        blocks.append(a.mean(axis=(1, 3, 5)))
    sigma = [sigma_mm / (v * f) for v, f in zip(vox, factor, strict=True)]
    num = ndimage.gaussian_filter(blocks[0], sigma, mode="constant")
    den = ndimage.gaussian_filter(blocks[1], sigma, mode="constant")
    total = float(w.sum())
    fallback = float((img * w).sum() / total) if total > 0 else float(img.mean())
    floor = 1e-3 * float(den.max()) if den.max() > 0 else 1.0
    level = np.where(den > floor, num / np.maximum(den, floor), fallback).astype(np.float32)
    return _upsample_linear(level, img.shape, factor)


def tissue_split(
    image: np.ndarray,
    region: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    sigma_mm: float = 12.0,
) -> np.ndarray:
    """Voxels of ``region`` brighter than the darker class, robust to a smooth intensity bias.

    Twice: divide the image by its local mean over the current bright class (at first the whole
    region; :func:`local_mean`, ``sigma_mm``; 12 mm follows shading that changes by half across
    the head) and split the ratio inside ``region`` with Otsu's
    threshold. On a GRE magnitude inside the skull the bright class is brain tissue and the dark
    one CSF; dividing by the tissue's own smooth level removes receive-field shading that would
    otherwise move a global threshold into tissue or CSF.
    """
    img = np.asarray(image, dtype=np.float32)
    r = np.asarray(region, dtype=bool)
    bright = r
    for _ in range(2):
        level = local_mean(img, bright, voxel_size_mm, sigma_mm=sigma_mm)
        ratio = img / np.maximum(level, np.float32(1e-12) * max(float(level.max()), 1e-30))
        bright = r & (ratio > otsu_threshold(ratio[r]))
        if not bright.any():
            break
    return bright


def magnitude_tissue_mask(
    image: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    close_mm: float = 3.0,
    fill_holes: bool = True,
    erode_mm: float = 0.0,
) -> np.ndarray:
    """Brain mask of a GRE magnitude by intensity classes, robust to receive-field shading.

    The head is the largest piece above Otsu's threshold (holes filled); inside it
    :func:`tissue_split` keeps the voxels brighter than the CSF and scalp relative to the local
    tissue level; then the largest component, a closing by ``close_mm``, hole filling and
    erosion by ``erode_mm`` (as :func:`clean_mask`).
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if img.ndim != 3:
        raise ValueError(f"image must be 3-D, got shape {img.shape}")
    head = clean_mask(img > otsu_threshold(img))
    if not head.any():
        raise ValueError("magnitude_tissue_mask: nothing above Otsu's threshold")
    tissue = tissue_split(img, head, voxel_size_mm)
    return clean_mask(
        tissue,
        close_mm=close_mm,
        fill_holes=fill_holes,
        erode_mm=erode_mm,
        voxel_size_mm=voxel_size_mm,
    )


def remove_outer_csf(
    image: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    close_mm: float = 3.0,
) -> np.ndarray:
    """Take the CSF between brain and skull out of an intracranial mask (such as BET's).

    On a first-echo GRE magnitude the CSF is darker than brain tissue (T1 saturation) but far
    brighter than the skull, so BET's surface settles at the inner skull. Inside ``mask``,
    :func:`tissue_split` separates tissue from CSF (Otsu's threshold on the image over its
    local tissue level, so smooth receive-field shading does not move the split); the tissue's
    largest component, closed by ``close_mm`` (sulci) and hole-filled (ventricles, veins),
    within ``mask`` is returned.
    """
    img = np.asarray(image)
    m = np.asarray(mask, dtype=bool)
    if img.shape != m.shape:
        raise ValueError(f"image shape {img.shape} differs from mask shape {m.shape}")
    if not m.any():
        raise ValueError("mask is empty")
    tissue = tissue_split(img, m, voxel_size_mm)
    out = clean_mask(tissue, close_mm=close_mm, fill_holes=True, voxel_size_mm=voxel_size_mm)
    return out & m


def phase_quality_map(
    phase_rad: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    echo_times_s: Sequence[float] | None = None,
) -> np.ndarray:
    """ROMEO phase-quality map (in [0, 1]) of single- or multi-echo GRE phase.

    The quality of the first echo (:func:`qsmflow.algorithms.unwrap.romeo_quality_map`, after
    Dymerska et al., MRM 2021): phase coherence with the neighbours, with the second echo's
    phase-gradient coherence when there are two or more echoes, and the magnitude coherence and
    weight when ``magnitude`` is given. High in tissue, low in noise (air, bone) and where the
    phase is unreliable (veins, haemorrhage, strong field gradients near the skull).

    Parameters
    ----------
    phase_rad : (x, y, z) or (x, y, z, echo) array
        Wrapped phase in radians.
    magnitude : array of the same shape, optional
    echo_times_s : sequence of float, optional
        Echo times in s; required with two or more echoes.
    """
    from .unwrap import romeo_quality_map

    phase = np.asarray(phase_rad, dtype=np.float32)
    if phase.ndim == 3:
        phase = phase[..., None]
    if phase.ndim != 4:
        raise ValueError(f"phase_rad must be 3-D or 4-D (echoes last), got shape {phase.shape}")
    mag = None
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32)
        if mag.ndim == 3:
            mag = mag[..., None]
        if mag.shape[:3] != phase.shape[:3]:
            raise ValueError(f"magnitude shape {mag.shape} differs from phase {phase.shape}")
        mag = mag[..., 0]
    second, ratio = None, None
    if phase.shape[3] > 1:
        if echo_times_s is None or len(echo_times_s) != phase.shape[3]:
            raise ValueError(
                f"echo_times_s must give one echo time (s) per echo ({phase.shape[3]}), got "
                f"{echo_times_s}"
            )
        te = [float(t) for t in echo_times_s]
        if te[0] <= 0 or te[1] <= te[0]:
            raise ValueError(f"echo_times_s must be positive and increasing, got {te}")
        second, ratio = phase[..., 1], te[1] / te[0]
    return romeo_quality_map(phase[..., 0], magnitude=mag, second_echo_phase=second, te_ratio=ratio)


def phase_quality_mask(
    quality: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    magnitude: np.ndarray | None = None,
    method: str = "otsu",
    value: float | None = None,
    magnitude_method: str = "tissue",
    magnitude_value: float | None = None,
    close_mm: float = 3.0,
    fill_holes: bool = True,
    erode_mm: float = 0.0,
) -> np.ndarray:
    """Brain mask from a phase-quality map (after QSMxT, Stewart et al., MRM 2022).

    Voxels whose phase quality passes ``method``/``value`` (default Otsu: reliable phase versus
    noise in air and bone) and, when ``magnitude`` is given, whose magnitude passes
    ``magnitude_method``/``magnitude_value``: by default ("tissue") :func:`tissue_split` inside
    the filled quality mask, which separates brain tissue from the darker CSF (whose phase is as
    smooth as the brain's) also under receive-field shading; or a threshold of
    :func:`threshold_mask` on the magnitude itself. Then the largest component,
    a closing by ``close_mm`` (sulci), hole filling (ventricles, veins, deep grey matter with
    short T2*) and erosion by ``erode_mm``. Methods and values as in :func:`threshold_mask`.
    Unlike BET it follows the cortex instead of a smooth surface.
    """
    q = np.asarray(quality)
    if q.ndim != 3:
        raise ValueError(f"quality must be a 3-D map, got shape {q.shape}")
    raw = np.isfinite(q) & (q > threshold_value(q, method=method, value=value))
    if magnitude is not None:
        mag = np.asarray(magnitude)
        if mag.shape != q.shape:
            raise ValueError(f"magnitude shape {mag.shape} differs from quality {q.shape}")
        if magnitude_method == "tissue":
            if magnitude_value is not None:
                raise ValueError("magnitude_method='tissue' takes no magnitude_value")
            region = _fill_holes(_largest_component(raw))
            if region.any():
                raw &= tissue_split(np.nan_to_num(mag), region, voxel_size_mm)
        else:
            level = threshold_value(mag, method=magnitude_method, value=magnitude_value)
            raw &= np.isfinite(mag) & (mag > level)
    return clean_mask(
        raw,
        close_mm=close_mm,
        fill_holes=fill_holes,
        erode_mm=erode_mm,
        voxel_size_mm=voxel_size_mm,
    )


def reliable_mask(
    quality: np.ndarray,
    mask: np.ndarray,
    *,
    method: str = "otsu-foreground",
    value: float | None = None,
) -> np.ndarray:
    """The voxels of ``mask`` whose phase quality passes the threshold: no hole filling.

    This is the second-pass mask of QSMxT's two-pass reconstruction (Stewart et al., MRM 2022):
    the same threshold as the brain mask, without filling, so veins, haemorrhages and other
    voxels with unreliable phase stay out of the inversion. ``method``/``value`` as in
    :func:`threshold_mask`, computed over the whole map (use the values that made ``mask``).
    """
    q = np.asarray(quality)
    m = np.asarray(mask, dtype=bool)
    if q.shape != m.shape:
        raise ValueError(f"quality shape {q.shape} differs from mask shape {m.shape}")
    if not m.any():
        raise ValueError("mask is empty")
    keep = threshold_mask(q, method=method, value=value, fill_holes=False, largest_component=False)
    return keep & m


def two_pass_combine(
    chi_filled: np.ndarray,
    chi_reliable: np.ndarray,
    filled_mask: np.ndarray,
    reliable: np.ndarray,
) -> np.ndarray:
    """Combine the two QSMxT passes (Stewart et al., MRM 2022): ppm in, ppm out.

    ``chi_reliable`` (the inversion on the reliable mask) inside ``reliable``; ``chi_filled``
    (the inversion on the hole-filled mask) in the rest of ``filled_mask`` (the filled holes:
    veins, haemorrhage); zero outside ``filled_mask``. ``reliable`` must lie inside
    ``filled_mask``.
    """
    a = np.asarray(chi_filled, dtype=np.float32)
    b = np.asarray(chi_reliable, dtype=np.float32)
    fm = np.asarray(filled_mask, dtype=bool)
    rm = np.asarray(reliable, dtype=bool)
    for label, arr in (("chi_reliable", b), ("filled_mask", fm), ("reliable", rm)):
        if arr.shape != a.shape:
            raise ValueError(f"{label} shape {arr.shape} differs from chi_filled {a.shape}")
    if np.any(rm & ~fm):
        raise ValueError("the reliable mask must lie inside the filled mask")
    return np.where(rm, b, np.where(fm, a, np.float32(0))).astype(np.float32)


# aliases: threshold_mask's keyword arguments shadow the public names inside its body
_fill_holes = fill_holes
_largest_component = largest_component
_erode_mm = erode_mm
_close_mm = close_mm
