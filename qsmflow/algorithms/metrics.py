"""Image-quality metrics for susceptibility maps against a ground truth.

All functions take a reconstruction, a ground truth (both in ppm, shape ``(x, y, z)``) and a mask
or a label map, and return plain floats. Work is done in float64 whatever the input dtype.

The set follows the QSM Reconstruction Challenge 2.0 (Marques et al., Magn Reson Med 2021;86:526;
Bilgic et al., Magn Reson Med 2021;86:1241): demeaned and detrended NRMSE globally and per region,
deep-grey-matter linearity, calcification moment and streaking, plus HFEN (Ravishankar & Bresler,
IEEE TMI 2011; as used in the 2016 challenge, Langkammer et al., Magn Reson Med 2018;79:1661),
SSIM (Wang et al., IEEE TIP 2004), XSIM (Milovic et al., Magn Reson Med 2024) and Pearson
correlation. Where the papers leave a detail open, the choice agrees numerically with the QSM-CI
scorer (``qsm_ci.qsm_eval``), so that a number computed here is the number a leaderboard shows;
``challenge_metrics`` and ``score`` return the same dictionaries as that scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "SEGMENTATION_LABELS",
    "DGM_LABELS",
    "TISSUE_LABELS",
    "BLOOD_LABEL",
    "CALCIFICATION_LABEL",
    "nrmse",
    "nrmse_demeaned",
    "nrmse_detrended",
    "hfen",
    "ssim",
    "xsim",
    "correlation",
    "region_means",
    "dgm_linearity",
    "calcification_metrics",
    "challenge_metrics",
    "score",
]

#: Label scheme of the QSM Reconstruction Challenge 2.0 head phantom (label 12 is unused).
SEGMENTATION_LABELS: dict[int, str] = {
    1: "caudate",
    2: "globus pallidus",
    3: "putamen",
    4: "red nucleus",
    5: "dentate nucleus",
    6: "substantia nigra",
    7: "thalamus",
    8: "white matter",
    9: "grey matter",
    10: "CSF",
    11: "blood",
    13: "bone",
    14: "air",
    15: "muscle",
    16: "calcification",
}

#: Deep grey matter nuclei (caudate ... substantia nigra).
DGM_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
#: Labels pooled for the challenge's "tissue" NRMSE (thalamus, white and grey matter).
TISSUE_LABELS: tuple[int, ...] = (7, 8, 9)
BLOOD_LABEL = 11
CALCIFICATION_LABEL = 16

# XSIM constants (Milovic et al. 2024): dynamic range L = 1 ppm, K1 = 0.01, K2 = 0.001, with the
# 5x5x5 uniform windows of the QSM-CI implementation.
_XSIM_C1 = (0.01 * 1.0) ** 2
_XSIM_C2 = (0.001 * 1.0) ** 2
_XSIM_WINDOW = 5

# Norms below this are treated as zero (a truth that is flat inside the mask has no NRMSE/HFEN).
_TINY = 1e-30


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _bool(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask) > 0


def _labels(seg: np.ndarray) -> np.ndarray:
    seg = np.asarray(seg)
    if not np.issubdtype(seg.dtype, np.integer):
        seg = np.rint(seg).astype(np.int64)
    return seg


def _check_shapes(*arrays: np.ndarray) -> None:
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"arrays must share one shape, got {[np.shape(a) for a in arrays]}")


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y ~ slope * x + intercept`` on 1-D float64 vectors.

    A constant ``x`` admits no trend: the slope is then 0 and the intercept the mean of ``y``.
    """
    if x.size == 0:
        return 0.0, float("nan")
    xm, ym = x.mean(), y.mean()
    if x.min() == x.max():
        return 0.0, float(ym)
    dx = x - xm
    slope = float(np.dot(dx, y - ym) / np.dot(dx, dx))
    return slope, float(ym - slope * xm)


def _nrmse_pair(recon_v: np.ndarray, truth_v: np.ndarray) -> tuple[float, float]:
    """Demeaned and detrended NRMSE (%) of two 1-D vectors of the voxels in a region."""
    if truth_v.size == 0:
        return float("nan"), float("nan")
    r = recon_v - recon_v.mean()
    t = truth_v - truth_v.mean()
    norm_t = float(np.sqrt(np.dot(t, t)))
    if norm_t < _TINY:
        return float("nan"), float("nan")
    err = r - t
    demeaned = 100.0 * float(np.sqrt(np.dot(err, err))) / norm_t
    slope, intercept = _linear_fit(t, r)
    if abs(slope) < _TINY:
        # The recon carries no linear trace of the truth; there is nothing to undo.
        return demeaned, demeaned
    err = (r - intercept) / slope - t
    return demeaned, 100.0 * float(np.sqrt(np.dot(err, err))) / norm_t


def _masked(
    recon: np.ndarray, truth: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    _check_shapes(recon, truth, mask)
    m = _bool(mask)
    return _f64(recon)[m], _f64(truth)[m]


def nrmse(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Plain normalised root-mean-square error inside ``mask``, in percent.

    ``100 * ||recon - truth|| / ||truth||`` over the mask voxels, without demeaning (the 2016
    challenge definition, Langkammer et al., Magn Reson Med 2018). Sensitive to any offset, so it
    only makes sense when recon and truth share a susceptibility reference.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    mask : (x, y, z) array
        Region to score; non-zero voxels count.

    Returns
    -------
    float
        NRMSE in %; NaN for an empty mask or an all-zero truth.
    """
    r, t = _masked(recon, truth, mask)
    norm_t = float(np.sqrt(np.dot(t, t)))
    if t.size == 0 or norm_t < _TINY:
        return float("nan")
    err = r - t
    return 100.0 * float(np.sqrt(np.dot(err, err))) / norm_t


def nrmse_demeaned(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """NRMSE (%) after subtracting each map's own mean inside ``mask`` (Challenge 2.0 "NRMSE").

    Removes the arbitrary susceptibility reference. Same parameters as :func:`nrmse`.

    Returns
    -------
    float
        ``100 * ||(r - mean r) - (t - mean t)|| / ||t - mean t||``; NaN for an empty mask or a
        truth that is constant inside it.

    References
    ----------
    Marques et al., Magn Reson Med 2021;86:526-542; Bilgic et al., Magn Reson Med 2021;86:1241.
    """
    return _nrmse_pair(*_masked(recon, truth, mask))[0]


def nrmse_detrended(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """NRMSE (%) after undoing a linear fit of recon on truth (Challenge 2.0 "detrended NRMSE").

    Inside the mask both maps are demeaned, ``recon = slope * truth + intercept`` is fitted by
    least squares, the recon is corrected by the inverse map ``(recon - intercept) / slope`` and
    compared with the demeaned truth. A global scaling error (e.g. from regularisation) therefore
    costs nothing; only errors that are not linear in the truth remain. If the slope is zero the
    correction is undefined and the demeaned NRMSE is returned.
    Same parameters as :func:`nrmse`.

    Returns
    -------
    float
        Detrended NRMSE in %; NaN for an empty mask or a constant truth.

    References
    ----------
    Marques et al., Magn Reson Med 2021;86:526-542; Bilgic et al., Magn Reson Med 2021;86:1241.
    """
    return _nrmse_pair(*_masked(recon, truth, mask))[1]


def hfen(
    recon: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    sigma: float = 1.5,
    truncate: float = 5.0,
) -> float:
    """High-frequency error norm (%): NRMSE of Laplacian-of-Gaussian filtered maps.

    Both volumes are filtered whole (edges need their neighbours; ``reflect`` boundary) with a
    LoG of width ``sigma`` voxels, then ``100 * ||LoG(recon) - LoG(truth)|| / ||LoG(truth)||`` is
    taken over the mask voxels. The default ``truncate=5`` gives a kernel radius of
    ``int(5 * 1.5 + 0.5) = 8`` voxels (17 taps), as in the QSM-CI scorer; the 15-tap kernel of
    the 2016 challenge (``truncate=4.5`` here) changes HFEN by roughly 1e-5 relative. Apply it to
    maps that are zero outside the mask (as :func:`score` does), or structure beyond the brain
    edge leaks into the filtered values at the edge.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    mask : (x, y, z) array
        Voxels where the norms are taken.
    sigma : float
        Gaussian width in voxels.
    truncate : float
        Kernel half-width in units of ``sigma`` (``scipy.ndimage`` convention).

    Returns
    -------
    float
        HFEN in %; NaN for an empty mask or a truth without high-frequency content.

    References
    ----------
    Ravishankar & Bresler, IEEE Trans Med Imaging 2011;30:1028-1041; Langkammer et al.,
    Magn Reson Med 2018;79:1661-1673.
    """
    _check_shapes(recon, truth, mask)
    m = _bool(mask)
    if not m.any():
        return float("nan")
    log_r = ndimage.gaussian_laplace(_f64(recon), sigma=sigma, truncate=truncate)[m]
    log_t = ndimage.gaussian_laplace(_f64(truth), sigma=sigma, truncate=truncate)[m]
    norm_t = float(np.sqrt(np.dot(log_t, log_t)))
    if norm_t < _TINY:
        return float("nan")
    err = log_r - log_t
    value = 100.0 * float(np.sqrt(np.dot(err, err))) / norm_t
    return value if np.isfinite(value) else float("nan")


def _ssim_map(
    mu_r: np.ndarray,
    mu_t: np.ndarray,
    rr: np.ndarray,
    tt: np.ndarray,
    rt: np.ndarray,
    c1: float,
    c2: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator of SSIM from local first and second moments."""
    var_r = rr - mu_r * mu_r
    var_t = tt - mu_t * mu_t
    cov = rt - mu_r * mu_t
    num = (2.0 * mu_r * mu_t + c1) * (2.0 * cov + c2)
    den = (mu_r * mu_r + mu_t * mu_t + c1) * (var_r + var_t + c2)
    return num, den


def ssim(
    recon: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    *,
    data_range: float | None = None,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean structural similarity (Wang et al. 2004) with Gaussian windows, over ``mask``.

    Local means, variances and covariance are Gaussian-weighted (weights sum to 1, i.e. the
    population moments of Wang et al.; ``reflect`` boundary), and per voxel

        SSIM = (2 mu_r mu_t + C1)(2 cov + C2) / ((mu_r^2 + mu_t^2 + C1)(var_r + var_t + C2)),

    with ``C1 = (k1 * L)^2`` and ``C2 = (k2 * L)^2``, ``L`` the data range. The defaults (sigma
    1.5 voxels, 11-tap window, K1 = 0.01, K2 = 0.03) are those of the paper and of
    ``skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)``, which this equals on voxels away from the border.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    mask : (x, y, z) array
        Voxels whose SSIM values are averaged.
    data_range : float, optional
        Dynamic range ``L`` in ppm; default: max - min of ``truth`` inside the mask.
    sigma, truncate : float
        Gaussian window width (voxels) and half-width in units of ``sigma``.
    k1, k2 : float
        Stabilising constants.

    Returns
    -------
    float
        Mean SSIM over the mask (1 for identical maps); NaN for an empty mask.

    References
    ----------
    Wang, Bovik, Sheikh & Simoncelli, IEEE Trans Image Process 2004;13:600-612.
    """
    _check_shapes(recon, truth, mask)
    m = _bool(mask)
    if not m.any():
        return float("nan")
    r, t = _f64(recon), _f64(truth)
    if data_range is None:
        data_range = float(t[m].max() - t[m].min())
    if not data_range > 0:
        raise ValueError("data_range must be positive; pass it when the truth is flat in the mask")
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2

    def smooth(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, sigma=sigma, truncate=truncate, mode="reflect")

    num, den = _ssim_map(smooth(r), smooth(t), smooth(r * r), smooth(t * t), smooth(r * t), c1, c2)
    return float(np.mean(num[m] / den[m]))


def _window_sum(x: np.ndarray, size: int) -> np.ndarray:
    """Sum over a ``size``-wide cube around each voxel; voxels outside the volume are absent."""
    ones = np.ones(size)
    for axis in range(x.ndim):
        x = ndimage.correlate1d(x, ones, axis=axis, mode="constant", cval=0.0)
    return x


def xsim(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """XSIM, the SSIM variant tuned for QSM (Milovic et al. 2024), averaged over ``mask``.

    SSIM with the susceptibility values used as they are (no rescaling), ``L = 1`` ppm,
    ``K1 = 0.01`` and ``K2 = 0.001`` (so ``C1 = 1e-4``, ``C2 = 1e-6``), and local moments over
    5x5x5 uniform windows. Windows at the volume boundary are truncated: only voxels inside the
    volume count and the moments are normalised by that count. The map is averaged over mask
    voxels where its denominator is positive.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    mask : (x, y, z) array
        Voxels whose XSIM values are averaged.

    Returns
    -------
    float
        Mean XSIM (1 for identical maps); 0.0 where no voxel qualifies (as QSM-CI reports it).

    References
    ----------
    Milovic et al., "XSIM: a structural similarity index measure optimized for MRI QSM",
    Magn Reson Med 2024; Wang et al., IEEE Trans Image Process 2004;13:600-612.
    """
    _check_shapes(recon, truth, mask)
    r, t = _f64(recon), _f64(truth)
    size = _XSIM_WINDOW
    # Voxel count of each truncated window: separable, so an outer product of 1-D counts.
    count = np.ones((1,) * r.ndim)
    for axis, n in enumerate(r.shape):
        c = ndimage.correlate1d(np.ones(n), np.ones(size), mode="constant", cval=0.0)
        count = count * c.reshape([-1 if a == axis else 1 for a in range(r.ndim)])

    def mean(x: np.ndarray) -> np.ndarray:
        return _window_sum(x, size) / count

    num, den = _ssim_map(
        mean(r), mean(t), mean(r * r), mean(t * t), mean(r * t), _XSIM_C1, _XSIM_C2
    )
    valid = _bool(mask) & (den > 0.0)
    if not valid.any():
        return 0.0
    return float(np.mean(num[valid] / den[valid]))


def correlation(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation coefficient of recon and truth over ``mask``.

    Returns
    -------
    float
        r in [-1, 1]; 0.0 where it is undefined (empty mask, or either map constant in it, e.g.
        an all-zero failed reconstruction), as QSM-CI reports it.
    """
    r, t = _masked(recon, truth, mask)
    if r.size == 0 or r.min() == r.max() or t.min() == t.max():
        return 0.0
    dr, dt = r - r.mean(), t - t.mean()
    den = float(np.sqrt(np.dot(dr, dr) * np.dot(dt, dt)))
    return float(np.dot(dr, dt)) / den if den > 0 else 0.0


def region_means(vol: np.ndarray, seg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Mean of ``vol`` over each label of ``seg``.

    Parameters
    ----------
    vol : (x, y, z) array
        Values (e.g. chi in ppm).
    seg : (x, y, z) int array
        Label map; float maps are rounded.
    labels : sequence of int
        Labels to summarise, in the order wanted.

    Returns
    -------
    numpy.ndarray
        float64 means, one per entry of ``labels``; NaN for a label with no voxel.
    """
    _check_shapes(vol, seg)
    wanted = np.asarray(labels, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        return np.zeros(0)
    uniq, inverse = np.unique(wanted, return_inverse=True)
    seg_flat = _labels(seg).reshape(-1)
    pos = np.clip(np.searchsorted(uniq, seg_flat), 0, uniq.size - 1)
    hit = uniq[pos] == seg_flat
    sums = np.bincount(pos[hit], weights=_f64(vol).reshape(-1)[hit], minlength=uniq.size)
    counts = np.bincount(pos[hit], minlength=uniq.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means[inverse]


def dgm_linearity(
    recon: np.ndarray,
    truth: np.ndarray,
    seg: np.ndarray,
    *,
    labels: Sequence[int] = DGM_LABELS,
) -> float:
    """Deep grey matter linearity: ``|1 - slope|`` of region means, recon against truth.

    The mean susceptibility of each region in ``labels`` (whole label, no brain mask) is
    computed for both maps, and ``recon_mean = slope * truth_mean + intercept`` fitted by least
    squares. 0 means region contrast is preserved up to an offset (Challenge 2.0).

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    seg : (x, y, z) int array
        Label map (:data:`SEGMENTATION_LABELS` scheme).
    labels : sequence of int
        Regions to use; absent labels are skipped.

    Returns
    -------
    float
        ``|1 - slope|`` (dimensionless); NaN when fewer than two regions are present.

    References
    ----------
    Bilgic et al., Magn Reson Med 2021;86:1241-1255.
    """
    _check_shapes(recon, truth, seg)
    t = region_means(truth, seg, labels)
    r = region_means(recon, seg, labels)
    present = ~np.isnan(t)
    if np.count_nonzero(present) < 2:
        return float("nan")
    slope, _ = _linear_fit(t[present], r[present])
    return abs(1.0 - slope)


def _grow(lo: np.ndarray, hi: np.ndarray, by: int, shape: tuple[int, ...]):
    """Grow the half-open box ``[lo, hi)`` by ``by`` voxels per side, clipped to ``shape``."""
    return np.maximum(lo - by, 0), np.minimum(hi + by, shape)


def calcification_metrics(
    recon: np.ndarray,
    truth: np.ndarray,
    seg: np.ndarray,
    *,
    label: int = CALCIFICATION_LABEL,
) -> tuple[float, float]:
    """Calcification moment deviation and streaking level (QSM Challenge 2.0).

    Boxes around the calcification: the *cube* is its bounding box grown by 3 voxels, the *rim*
    box the cube grown by 4 more, the *outer* box the rim grown by 4 more (all clipped to the
    volume). The recon calcification is segmented inside the cube by a threshold ``t``: the
    least negative of 0, -0.01, ..., -3.5 ppm below which no recon voxel of the outer box outside
    the cube falls (-3.5 ppm if none qualifies). Its moment (sum of chi over its voxels) is
    compared with that of the true label region. The streak level is the standard deviation of
    the residual of a linear fit of recon on truth in the rim (rim box minus cube), divided by
    the absolute mean of the segmented recon calcification.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    seg : (x, y, z) int array
        Label map; ``label`` marks the calcification.
    label : int
        Calcification label.

    Returns
    -------
    moment_dev : float
        ``|sum(truth over label) - sum(recon over segmented voxels)|`` in ppm x voxels; NaN if
        there is no calcification, ``|true moment|`` if nothing is segmented in the recon.
    streak : float
        Dimensionless streak level; NaN if it cannot be formed.

    References
    ----------
    Marques et al., Magn Reson Med 2021;86:526-542; Bilgic et al., Magn Reson Med 2021;86:1241.
    """
    _check_shapes(recon, truth, seg)
    calc = _labels(seg) == label
    if not calc.any():
        return float("nan"), float("nan")
    r, t = _f64(recon), _f64(truth)
    true_moment = float(t[calc].sum())

    shape = np.asarray(calc.shape)
    idx = np.nonzero(calc)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx]) + 1
    cube = _grow(lo, hi, 3, shape)
    rim = _grow(*cube, 4, shape)
    outer = _grow(*rim, 4, shape)

    def box(bounds) -> np.ndarray:
        m = np.zeros(calc.shape, dtype=bool)
        m[tuple(slice(a, b) for a, b in zip(*bounds, strict=True))] = True
        return m

    in_cube = box(cube)
    around = box(outer) & ~in_cube
    in_rim = box(rim) & ~in_cube

    # Least negative threshold on a 0.01 ppm grid that nothing outside the cube undercuts.
    grid = -0.01 * np.arange(351)
    outside = r[around]
    outside = outside[~np.isnan(outside)]
    lowest = outside.min() if outside.size else np.inf
    ok = lowest >= grid
    threshold = grid[np.argmax(ok)] if ok.any() else grid[-1]

    cube_vals = r[in_cube]
    segmented = cube_vals[cube_vals < threshold]
    if segmented.size == 0:
        return abs(true_moment), float("nan")
    calc_mean = float(segmented.mean())
    moment_dev = abs(true_moment - float(segmented.sum()))

    rim_r, rim_t = r[in_rim], t[in_rim]
    if rim_r.size < 2 or abs(calc_mean) < _TINY:
        return moment_dev, float("nan")
    slope, intercept = _linear_fit(rim_t, rim_r)
    residual = rim_r - (slope * rim_t + intercept)
    return moment_dev, float(residual.std()) / abs(calc_mean)


def challenge_metrics(
    recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, seg: np.ndarray
) -> dict[str, float]:
    """The QSM Challenge 2.0 metric suite, as the QSM-CI scorer reports it.

    Keys: ``nrmse`` (the *demeaned* NRMSE, %), ``nrmse_detrend``, ``nrmse_tissue`` (labels 7-9
    in the mask), ``nrmse_blood`` (label 11 in the mask, dilated by a 3x3x3 cube and not
    re-masked), ``nrmse_dgm`` (labels 1-6 in the mask) -- the three region values are detrended
    NRMSE -- ``dgm_linearity``, ``calc_moment_dev``, ``calc_streak`` (both from the whole label,
    see :func:`calcification_metrics`), ``correlation``, ``xsim`` and ``hfen``.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    mask : (x, y, z) array
        Brain mask.
    seg : (x, y, z) int array
        Label map (:data:`SEGMENTATION_LABELS` scheme).

    Returns
    -------
    dict of str to float
        Metric values; NaN where a region is missing.
    """
    _check_shapes(recon, truth, mask, seg)
    r, t = _f64(recon), _f64(truth)
    m = _bool(mask)
    labels = _labels(seg)

    def detrended(region: np.ndarray) -> float:
        return _nrmse_pair(r[region], t[region])[1]

    demeaned, detrend = _nrmse_pair(r[m], t[m])
    blood = ndimage.binary_dilation(
        m & (labels == BLOOD_LABEL), structure=np.ones((3, 3, 3), dtype=bool)
    )
    moment_dev, streak = calcification_metrics(r, t, labels)
    return {
        "nrmse": demeaned,
        "nrmse_detrend": detrend,
        "nrmse_tissue": detrended(m & np.isin(labels, TISSUE_LABELS)),
        "nrmse_blood": detrended(blood),
        "nrmse_dgm": detrended(m & np.isin(labels, DGM_LABELS)),
        "dgm_linearity": dgm_linearity(r, t, labels),
        "calc_moment_dev": moment_dev,
        "calc_streak": streak,
        "correlation": correlation(r, t, m),
        "xsim": xsim(r, t, m),
        "hfen": hfen(r, t, m),
    }


def score(
    recon: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None = None,
) -> dict[str, float]:
    """Score a susceptibility map against the truth over the whole mask, as QSM-CI does.

    Both maps are set to zero outside the mask (so neighbourhood metrics do not see anything
    beyond the brain edge), and recon voxels that are not finite are set to zero too, so a
    dropped or failed voxel is scored as 0 against the true value. With ``seg`` the result is
    :func:`challenge_metrics`; without it ``nrmse`` (demeaned), ``nrmse_detrend``, ``hfen``,
    ``correlation`` and ``xsim``. ``coverage`` is added: the fraction of mask voxels where the
    recon is finite and non-zero.

    Parameters
    ----------
    recon, truth : (x, y, z) arrays
        Reconstructed and true susceptibility (ppm).
    mask : (x, y, z) array
        Brain mask.
    seg : (x, y, z) int array, optional
        Label map; enables the region metrics.

    Returns
    -------
    dict of str to float
        Metric values plus ``coverage`` (0-1).
    """
    arrays = (recon, truth, mask) if seg is None else (recon, truth, mask, seg)
    _check_shapes(*arrays)
    m = _bool(mask)
    r = _f64(recon)
    r = np.where(m & np.isfinite(r), r, 0.0)
    t = np.where(m, _f64(truth), 0.0)
    coverage = float(np.count_nonzero(r[m]) / m.sum()) if m.any() else float("nan")
    if seg is not None:
        metrics = challenge_metrics(r, t, m, seg)
    else:
        demeaned, detrend = _nrmse_pair(r[m], t[m])
        metrics = {
            "nrmse": demeaned,
            "nrmse_detrend": detrend,
            "hfen": hfen(r, t, m),
            "correlation": correlation(r, t, m),
            "xsim": xsim(r, t, m),
        }
    metrics["coverage"] = coverage
    return metrics
