"""Tests for qsmflow.algorithms.metrics.

Two kinds of check: agreement with the QSM-CI scorer (``qsm_ci.qsm_eval``) on a small synthetic
head phantom with a distorted reconstruction, and cases whose answer is known independently
(identical maps, exact linear distortions, hand-computed windows, scikit-image's SSIM).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from qsmflow.algorithms import metrics

try:  # the reference scorer; the independent tests below run without it
    from qsm_ci import qsm_eval
except ImportError:  # pragma: no cover - qsm-ci is in the test extra
    qsm_eval = None

needs_qsm_ci = pytest.mark.skipif(qsm_eval is None, reason="qsm-ci is not installed")

SHAPE = (48, 48, 48)
# The brief asks for 1e-6; the two implementations agree to ~1e-13, so hold them to 1e-9.
RTOL = 1e-9
ATOL = 1e-12

# Mean susceptibility (ppm) per label; the calcification is strongly diamagnetic.
LABEL_CHI = {
    1: 0.05,
    2: 0.15,
    3: 0.07,
    4: 0.11,
    5: 0.09,
    6: 0.13,
    7: 0.03,
    8: -0.03,
    9: 0.02,
    10: 0.0,
    11: 0.3,
    13: -0.8,
    14: 9.0,
    15: -0.05,
    16: -1.5,
}


def _ellipsoid(center, radii, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii, strict=True))
    return d <= 1.0


def _phantom():
    """Small head-like phantom: (truth chi ppm, brain mask, segmentation)."""
    rng = np.random.default_rng(20240531)
    c = np.array(SHAPE) / 2 - 0.5
    head = _ellipsoid(c, (23, 22, 22))
    seg = np.zeros(SHAPE, dtype=np.int16)
    seg[head] = 15  # muscle / scalp
    seg[_ellipsoid(c, (21, 20, 20))] = 13  # bone
    seg[_ellipsoid(c, (20.5, 19.5, 19.5))] = 14  # a thin air gap
    mask = _ellipsoid(c, (19, 18, 18))
    seg[mask] = 9  # cortex
    seg[_ellipsoid(c, (16, 15, 15))] = 8  # white matter
    seg[_ellipsoid(c + (0, 0, 2), (4, 6, 3))] = 10  # ventricles
    nuclei = {
        1: ((-6, 6, 3), 3),
        2: ((6, 6, 3), 2.5),
        3: ((-7, -4, 2), 3),
        4: ((5, -6, -4), 2),
        5: ((-4, -10, -8), 2.5),
        6: ((4, 2, -6), 2),
        7: ((0, -2, 6), 3.5),
    }
    for lab, (off, rad) in nuclei.items():
        seg[_ellipsoid(c + off, (rad, rad, rad))] = lab
    # A straight vessel along z and a small calcification blob.
    seg[30:32, 12:14, 8:40] = 11
    seg[_ellipsoid(c + (9, 8, -3), (2.2, 2.2, 2.2))] = 16
    seg[~head] = 0

    smooth = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0)
    smooth *= 0.02 / smooth.std()
    truth = np.zeros(SHAPE)
    for lab, chi in LABEL_CHI.items():
        truth[seg == lab] = chi
    truth += smooth * (seg > 0)
    return truth, mask, seg


def _distorted(truth: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Recon-like map: scaled, offset, blurred, noisy, with a streak pattern along x-y.

    Only the brain is blurred (a method never sees the skull), but noise and streaks run
    everywhere, so the map outside the mask is junk that scoring must ignore.
    """
    recon = 0.8 * ndimage.gaussian_filter(truth * mask, 0.8) + 0.01
    x, y, z = np.indices(truth.shape, dtype=np.float64)
    recon += 0.01 * np.cos(0.9 * (x + y)) * np.exp(-(((z - 24) / 12) ** 2))
    recon += rng.normal(0.0, 0.01, truth.shape)
    return recon


@pytest.fixture(scope="module")
def phantom():
    truth, mask, seg = _phantom()
    recon = _distorted(truth, mask, np.random.default_rng(7))
    return recon, truth, mask, seg


def _close(ours: float, ref: float) -> bool:
    if math.isnan(ref):
        return math.isnan(ours)
    return math.isclose(ours, ref, rel_tol=RTOL, abs_tol=ATOL)


def _assert_dicts_close(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    bad = {k: (ours[k], ref[k]) for k in ref if not _close(ours[k], ref[k])}
    assert not bad, bad


# --- the phantom is what the tests assume ---------------------------------------------------


def test_phantom_has_every_label(phantom):
    _, _, mask, seg = phantom
    present = set(np.unique(seg).tolist()) - {0}
    assert present == set(metrics.SEGMENTATION_LABELS)
    for lab in (*metrics.DGM_LABELS, *metrics.TISSUE_LABELS, 11, 16):
        assert np.count_nonzero(mask & (seg == lab)) > 0, lab


# --- agreement with the QSM-CI scorer ---------------------------------------------------------


@needs_qsm_ci
def test_nrmse_matches_qsm_ci(phantom):
    recon, truth, mask, _ = phantom
    ref_dm, ref_dt = qsm_eval.nrmse_challenge(recon, truth, mask)
    assert _close(metrics.nrmse_demeaned(recon, truth, mask), ref_dm)
    assert _close(metrics.nrmse_detrended(recon, truth, mask), ref_dt)
    # Part of the distortion is a scaling, which detrending forgives.
    assert ref_dt < ref_dm


@needs_qsm_ci
@pytest.mark.parametrize("name", ["hfen", "xsim", "correlation"])
def test_voxel_metrics_match_qsm_ci(phantom, name):
    recon, truth, mask, _ = phantom
    ref = getattr(qsm_eval, name)(recon, truth, mask)
    assert _close(getattr(metrics, name)(recon, truth, mask), ref)


@needs_qsm_ci
def test_xsim_matches_qsm_ci_at_volume_boundary():
    # A mask touching every face exercises the truncated windows.
    rng = np.random.default_rng(3)
    truth = ndimage.gaussian_filter(rng.standard_normal((12, 9, 7)), 1.0) * 0.1
    recon = truth * 0.7 + rng.normal(0.0, 0.02, truth.shape)
    mask = np.ones(truth.shape, dtype=bool)
    assert _close(metrics.xsim(recon, truth, mask), qsm_eval.xsim(recon, truth, mask))


@needs_qsm_ci
def test_region_metrics_match_qsm_ci(phantom):
    recon, truth, _, seg = phantom
    assert _close(
        metrics.dgm_linearity(recon, truth, seg), qsm_eval.dgm_linearity(recon, truth, seg)
    )
    ours = metrics.calcification_metrics(recon, truth, seg)
    ref = qsm_eval.calcification_metrics(recon, truth, seg)
    assert all(np.isfinite(ref))
    assert all(_close(o, r) for o, r in zip(ours, ref, strict=True)), (ours, ref)


@needs_qsm_ci
def test_challenge_metrics_match_qsm_ci(phantom):
    recon, truth, mask, seg = phantom
    ref = qsm_eval.challenge_metrics(recon, truth, mask.astype(np.uint8), seg)
    assert all(np.isfinite(list(ref.values())))
    _assert_dicts_close(metrics.challenge_metrics(recon, truth, mask, seg), ref)


@needs_qsm_ci
@pytest.mark.parametrize("with_seg", [True, False])
def test_score_matches_qsm_ci_score_arrays(phantom, with_seg):
    recon, truth, mask, seg = phantom
    recon = recon.copy()
    recon[~ndimage.binary_erosion(mask, iterations=2)] = 0.0  # an eroded rim
    recon[20, 20, 20:23] = np.nan
    recon[25, 26, 20] = np.inf
    recon[1, 1, 1] = 5.0  # garbage outside the mask must not count
    seg_arg = seg if with_seg else None
    ref, _ = qsm_eval.score_arrays(recon, truth, mask, kind="chi", seg=seg_arg)
    ours = metrics.score(recon, truth, mask, seg_arg)
    _assert_dicts_close(ours, ref)
    assert 0.5 < ours["coverage"] < 1.0


@needs_qsm_ci
def test_calcification_edge_cases_match_qsm_ci(phantom):
    recon, truth, _, seg = phantom
    # Nothing dark enough: no recon calcification is segmented.
    flat = np.abs(recon)
    assert _close(
        metrics.calcification_metrics(flat, truth, seg)[0],
        qsm_eval.calcification_metrics(flat, truth, seg)[0],
    )
    assert math.isnan(metrics.calcification_metrics(flat, truth, seg)[1])
    # Dark streaks around the calcification push the threshold down.
    streaky = recon.copy()
    streaky[seg == 9] -= 0.25
    ours = metrics.calcification_metrics(streaky, truth, seg)
    ref = qsm_eval.calcification_metrics(streaky, truth, seg)
    assert all(_close(o, r) for o, r in zip(ours, ref, strict=True)), (ours, ref)
    # Nothing negative around the cube: the threshold is 0 ppm and faint negatives count.
    positive = np.abs(truth)
    positive[seg == 16] = truth[seg == 16]
    ring = ndimage.binary_dilation(seg == 16, iterations=2) & (seg != 16)
    positive[ring] = -0.005
    ours = metrics.calcification_metrics(positive, truth, seg)
    ref = qsm_eval.calcification_metrics(positive, truth, seg)
    assert all(_close(o, r) for o, r in zip(ours, ref, strict=True)), (ours, ref)
    # No calcification at all.
    no_calc = np.where(seg == 16, 9, seg)
    assert all(math.isnan(v) for v in metrics.calcification_metrics(recon, truth, no_calc))


# --- independent truths -----------------------------------------------------------------------


def test_identical_maps_are_perfect(phantom):
    _, truth, mask, seg = phantom
    assert metrics.nrmse(truth, truth, mask) == 0.0
    assert metrics.nrmse_demeaned(truth, truth, mask) == 0.0
    assert metrics.nrmse_detrended(truth, truth, mask) == pytest.approx(0.0, abs=1e-10)
    assert metrics.hfen(truth, truth, mask) == 0.0
    assert metrics.ssim(truth, truth, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.xsim(truth, truth, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.correlation(truth, truth, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.dgm_linearity(truth, truth, seg) == pytest.approx(0.0, abs=1e-12)
    moment_dev, streak = metrics.calcification_metrics(truth, truth, seg)
    assert moment_dev == pytest.approx(0.0, abs=1e-9)
    assert streak == pytest.approx(0.0, abs=1e-9)


def test_linear_distortion_nrmse(phantom):
    _, truth, mask, _ = phantom
    recon = 2.0 * truth + 0.3
    assert metrics.nrmse_detrended(recon, truth, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.nrmse_demeaned(recon, truth, mask) == pytest.approx(100.0, rel=1e-9)
    # An offset alone: demeaned NRMSE ignores it, the plain one does not.
    assert metrics.nrmse_demeaned(truth + 0.3, truth, mask) == pytest.approx(0.0, abs=1e-9)
    assert metrics.nrmse(truth + 0.3, truth, mask) > 100.0
    assert metrics.nrmse(1.1 * truth, truth, mask) == pytest.approx(10.0, rel=1e-9)
    # LoG is linear: HFEN of a * truth is |a - 1| * 100. It also removes constants, up to the
    # truncation of the kernel (its taps sum to ~1e-7 rather than 0).
    assert metrics.hfen(2.0 * truth, truth, mask) == pytest.approx(100.0, rel=1e-12)
    assert metrics.hfen(recon, truth, mask) == pytest.approx(100.0, rel=1e-5)
    assert metrics.correlation(recon, truth, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.correlation(-recon, truth, mask) == pytest.approx(-1.0, abs=1e-12)


def test_nrmse_hand_computed():
    truth = np.array([1.0, 2.0, 3.0, 4.0]).reshape(2, 2, 1)
    recon = np.array([1.0, 2.0, 3.0, 6.0]).reshape(2, 2, 1)
    mask = np.ones_like(truth, dtype=bool)
    assert metrics.nrmse(recon, truth, mask) == pytest.approx(100 * 2 / math.sqrt(30))
    # Demeaned: recon - 3 = [-2,-1,0,3], truth - 2.5 = [-1.5,-.5,.5,1.5]; error [-.5,-.5,-.5,1.5].
    assert metrics.nrmse_demeaned(recon, truth, mask) == pytest.approx(100 * math.sqrt(3 / 5))


def test_dgm_linearity_and_region_means(phantom):
    _, truth, _, seg = phantom
    means = metrics.region_means(truth, seg, [16, 99, 1])
    assert means[0] == pytest.approx(truth[seg == 16].mean())
    assert math.isnan(means[1])
    assert means[2] == pytest.approx(truth[seg == 1].mean())
    assert metrics.dgm_linearity(0.7 * truth + 0.02, truth, seg) == pytest.approx(0.3, abs=1e-9)
    assert math.isnan(metrics.dgm_linearity(truth, truth, seg, labels=(1, 42)))


def test_calcification_moment_of_a_weakened_blob(phantom):
    _, truth, _, seg = phantom
    calc = seg == 16
    recon = np.where(calc, 0.8 * truth, truth)  # still darker than anything around it
    moment_dev, _ = metrics.calcification_metrics(recon, truth, seg)
    assert moment_dev == pytest.approx(0.2 * abs(truth[calc].sum()), rel=1e-9)


def _gaussian_window(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return w[:, None, None] * w[None, :, None] * w[None, None, :]


def _ssim_at(a, b, weights, c1, c2) -> float:
    mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
    var_a = (weights * (a - mu_a) ** 2).sum()
    var_b = (weights * (b - mu_b) ** 2).sum()
    cov = (weights * (a - mu_a) * (b - mu_b)).sum()
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )


def test_ssim_constant_images():
    a, b, data_range = 0.2, 0.05, 0.5
    truth = np.full((12, 12, 12), a)
    recon = np.full((12, 12, 12), b)
    mask = np.ones(truth.shape, dtype=bool)
    c1 = (0.01 * data_range) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    got = metrics.ssim(recon, truth, mask, data_range=data_range)
    assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="data_range"):
        metrics.ssim(recon, truth, mask)


def test_ssim_and_xsim_against_explicit_windows():
    rng = np.random.default_rng(11)
    truth = ndimage.gaussian_filter(rng.standard_normal((20, 20, 20)), 1.0)
    recon = 0.6 * truth + rng.normal(0.0, 0.1, truth.shape)
    # SSIM at one interior voxel, computed from the explicit 11^3 Gaussian window.
    voxel = np.zeros(truth.shape, dtype=bool)
    voxel[9, 10, 8] = True
    rng_t = truth[voxel].max() - truth[voxel].min()  # 0: pass the range explicitly
    assert rng_t == 0
    data_range = 2.0
    win = (slice(4, 15), slice(5, 16), slice(3, 14))
    expected = _ssim_at(
        recon[win],
        truth[win],
        _gaussian_window(1.5, 5),
        (0.01 * data_range) ** 2,
        (0.03 * data_range) ** 2,
    )
    got = metrics.ssim(recon, truth, voxel, data_range=data_range)
    assert got == pytest.approx(expected, rel=1e-10)
    # XSIM at a corner voxel: the 5^3 window is truncated to 3^3 voxels inside the volume.
    corner = np.zeros(truth.shape, dtype=bool)
    corner[0, 0, 19] = True
    sub = (slice(0, 3), slice(0, 3), slice(17, 20))
    uniform = np.full((3, 3, 3), 1 / 27)
    expected = _ssim_at(recon[sub], truth[sub], uniform, 1e-4, 1e-6)
    assert metrics.xsim(recon, truth, corner) == pytest.approx(expected, rel=1e-10)


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(5)
    truth = ndimage.gaussian_filter(rng.standard_normal((24, 22, 20)), 1.5)
    recon = 0.8 * truth + rng.normal(0.0, 0.05, truth.shape)
    data_range = float(truth.max() - truth.min())
    ref = skm.structural_similarity(
        recon,
        truth,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    interior = np.zeros(truth.shape, dtype=bool)
    interior[5:-5, 5:-5, 5:-5] = True  # skimage averages over the cropped interior
    assert metrics.ssim(recon, truth, interior, data_range=data_range) == pytest.approx(
        ref, rel=1e-10
    )


def test_degenerate_inputs():
    truth = np.zeros((6, 6, 6))
    mask = np.zeros(truth.shape, dtype=bool)
    assert math.isnan(metrics.nrmse(truth, truth, mask))
    assert math.isnan(metrics.nrmse_detrended(truth, truth, mask))
    assert math.isnan(metrics.hfen(truth, truth, mask))
    assert math.isnan(metrics.ssim(truth, truth, mask))
    assert metrics.correlation(truth, truth, mask) == 0.0
    mask[2:4, 2:4, 2:4] = True
    assert math.isnan(metrics.nrmse_demeaned(truth + 1.0, truth, mask))  # flat truth
    varied = np.random.default_rng(0).standard_normal(truth.shape)
    assert metrics.correlation(np.zeros_like(varied), varied, mask) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.nrmse(truth, truth[:-1], mask)
