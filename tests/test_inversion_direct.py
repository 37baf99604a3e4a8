"""Tests for the closed-form inversions TSVD and Tikhonov and the weight-selection rules.

Known answers: TSVD inverts D exactly outside the truncation cone and its correction is the
fraction of k-space kept; Tikhonov equals the solution of its normal equations built as dense
matrices on a tiny grid; a large sphere is scaled by the analytic orientation average of
the transfer function; the L-curve and discrepancy helpers find the points of synthetic
curves whose corner, inflection and crossing are known. On the noisy 2 mm simulated head the
accuracy measured for each method (and TKD) is held, and an oblique B0 gives the same error
as the axial one.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from qsmflow.algorithms.dipole import dipole_kernel, forward_field
from qsmflow.algorithms.inversion._common import gradient
from qsmflow.algorithms.inversion.direct import (
    tikhonov,
    tikhonov_filter,
    tikhonov_lambda,
    tkd,
    tsvd,
    tsvd_inverse_kernel,
)
from qsmflow.algorithms.metrics import dgm_linearity, nrmse_demeaned
from qsmflow.algorithms.regularization import (
    discrepancy_lambda,
    lcurve_corner,
    lcurve_inflection,
    tikhonov_norms,
)

VOX_2MM = (2.0, 2.0, 2.0)


def noisy_field(sim, sigma_ppm=0.002, seed=0):
    """Local field plus the noise of a multi-echo field fit at SNR 100: Gaussian, 0.002 ppm
    where the first-echo magnitude is at its brain mean, scaled by mean / magnitude (at most
    5x)."""
    mag = sim.magnitude[..., 0]
    ref = float(mag[sim.mask].mean())
    scale = ref / np.maximum(mag, 0.2 * ref)
    noise = np.random.default_rng(seed).standard_normal(mag.shape) * sigma_ppm * scale
    return np.where(sim.mask, sim.local_field_ppm + noise, 0).astype(np.float32)


def sphere_case(vox, b0, shape=(64, 64, 64), radius=12.0, chi=0.1):
    axes = [(np.arange(n) - n / 2 + 0.5) * d for n, d in zip(shape, vox, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    sphere = np.where(r < radius, np.float32(chi), np.float32(0))
    return forward_field(sphere, vox, b0), r


def orientation_average(transfer):
    """Mean over directions of a function of D = 1/3 - u^2, u = cos(theta) uniform."""
    cut = np.sqrt(1 / 3)
    return integrate.quad(lambda u: transfer(1 / 3 - u * u), 0, 1, points=[cut], limit=200)[0]


# ------------------------------------------------------------------------------------- TSVD
def test_tsvd_inverse_kernel():
    d = np.array([-2 / 3, -0.3, -0.1, 0.0, 0.05, 0.1, 0.2, 1 / 3], np.float32)
    np.testing.assert_allclose(
        tsvd_inverse_kernel(d, 0.1), [-1.5, -1 / 0.3, 0, 0, 0, 0, 5.0, 3.0], rtol=1e-6
    )
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            tsvd_inverse_kernel(d, bad)


def test_tsvd_inverts_outside_the_cone():
    shape, vox, b0 = (32, 32, 32), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0)
    rng = np.random.default_rng(1)
    spec = np.fft.rfftn(rng.normal(size=shape))
    spec[np.abs(dipole_kernel(shape, vox, b0, real=True)) <= 0.3] = 0
    chi = np.fft.irfftn(spec, s=shape, axes=(0, 1, 2)).astype(np.float32)
    field = forward_field(chi, vox, b0, pad_factor=1.0)
    out = tsvd(field, np.ones(shape, bool), vox, b0, threshold=0.2, correct=False, pad_factor=1.0)
    np.testing.assert_allclose(out, chi, atol=1e-4 * np.abs(chi).max())


def test_tsvd_correction_is_the_fraction_kept():
    vox, b0, shape = (1.0, 1.2, 1.5), (0.1, -0.2, 1.0), (24, 20, 18)
    field = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    mask = np.ones(shape, bool)
    raw = tsvd(field, mask, vox, b0, correct=False, threshold=0.15, pad_factor=2.0)
    fixed = tsvd(field, mask, vox, b0, correct=True, threshold=0.15, pad_factor=2.0)
    d = dipole_kernel((48, 40, 36), vox, b0, real=False)
    kept = float(np.mean(np.abs(d) > 0.15))
    # over a sphere of directions 1 - (sqrt(1/3 + t) - sqrt(1/3 - t)) = 0.73; the
    # anisotropic box of frequencies weights the directions differently (measured 0.68)
    assert 0.6 < kept < 0.8
    np.testing.assert_allclose(fixed * kept, raw, rtol=2e-4, atol=1e-5)


# --------------------------------------------------------------------------------- Tikhonov
def dense_operators(shape, vox, b0):
    """The dipole convolution and the periodic forward-difference gradient as dense
    matrices, built column by column from unit impulses with numpy's complex FFT."""
    n = int(np.prod(shape))
    d = dipole_kernel(shape, vox, b0, real=False).astype(np.float64)
    conv = np.empty((n, n))
    grad = np.empty((3 * n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1
        e = e.reshape(shape)
        conv[:, j] = np.fft.ifftn(d * np.fft.fftn(e)).real.reshape(-1)
        grad[:, j] = gradient(e, vox).reshape(-1)
    return conv, grad


@pytest.mark.parametrize("regularization", ["identity", "gradient"])
def test_tikhonov_solves_its_normal_equations(regularization):
    shape, vox, b0, lam = (6, 5, 4), (1.0, 1.5, 2.0), (0.2, -0.3, 1.0), 0.03
    field = np.random.default_rng(3).normal(0, 0.05, shape).astype(np.float32)
    conv, grad = dense_operators(shape, vox, b0)
    penalty = np.eye(conv.shape[1]) if regularization == "identity" else grad.T @ grad
    # DC lies in the null space of both D and the gradient: the minimum-norm solution
    # (zero mean) is the one the k-space formula returns.
    expected = np.linalg.lstsq(
        conv.T @ conv + lam * penalty, conv.T @ field.reshape(-1).astype(np.float64), rcond=None
    )[0].reshape(shape)
    out = tikhonov(
        field,
        np.ones(shape, bool),
        vox,
        b0,
        lambda_=lam,
        regularization=regularization,
        correct=False,
        pad_factor=1.0,
    )
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=2e-5 * np.abs(expected).max() + 1e-7)


def test_tikhonov_filter_zero_denominator():
    d = np.array([0.0, 0.0, 0.3], np.float32)
    r = np.array([0.0, 2.0, 1.0], np.float32)
    np.testing.assert_allclose(tikhonov_filter(d, r, 0.1), [0, 0, 0.3 / 0.19], rtol=1e-6)
    with pytest.raises(ValueError):
        tikhonov_filter(d, r, 0.0)


@pytest.mark.parametrize(
    "vox, b0", [((1.0, 1.0, 1.0), (0.3, 0.2, 1.0)), ((1.0, 1.0, 2.0), (0.0, 0.0, 1.0))]
)
def test_large_sphere(vox, b0):
    field, r = sphere_case(vox, b0)
    mask = r < 28
    inner, shell = r < 8, (r > 20) & (r < 26)

    def contrast(chi):
        return float(chi[inner].mean() - chi[shell].mean())

    # TSVD: measured 0.1065 and 0.0936
    assert contrast(tsvd(field, mask, vox, b0)) == pytest.approx(0.1, rel=0.1)
    # gradient Tikhonov keeps low frequencies: measured 0.0960 and 0.0962 uncorrected,
    # 0.1127 and 0.1139 with the default correction, which restores 3 mm balls and so
    # over-restores this 8 mm one by the ratio of the two responses (~13 %)
    raw = tikhonov(field, mask, vox, b0, correct=False)
    assert contrast(raw) == pytest.approx(0.1, rel=0.1)
    grad = tikhonov(field, mask, vox, b0)
    assert contrast(raw) < contrast(grad) < 0.1 * 1.2
    assert grad[inner].std() < 0.05 * 0.1
    # identity Tikhonov scales an isotropic spectrum by the orientation average of
    # D^2 / (D^2 + lambda) (0.742 at 0.01); measured 0.0736 and 0.0740
    lam = 0.01
    raw = tikhonov(field, mask, vox, b0, lambda_=lam, regularization="identity", correct=False)
    factor = orientation_average(lambda d: d * d / (d * d + lam))
    assert contrast(raw) == pytest.approx(0.1 * factor, rel=0.03)
    fixed = tikhonov(field, mask, vox, b0, lambda_=lam, regularization="identity", correct=True)
    assert contrast(fixed) == pytest.approx(0.1, rel=0.1)


# ---------------------------------------------------------------- weight selection helpers
def test_tikhonov_norms_match_image_space():
    shape, vox, b0 = (16, 18, 20), (1.0, 1.0, 1.0), (0.1, 0.0, 1.0)
    rng = np.random.default_rng(4)
    chi = rng.normal(0, 0.05, shape).astype(np.float32)
    field = forward_field(chi, vox, b0, pad_factor=1.0) + rng.normal(0, 0.002, shape)
    field = field.astype(np.float32)
    mask = np.ones(shape, bool)
    d = dipole_kernel(shape, vox, b0, real=True)
    spec = np.fft.rfftn(field)
    mult = np.full(shape[2] // 2 + 1, 2.0)
    mult[0] = mult[-1] = 1.0
    power = np.abs(spec) ** 2 * mult / field.size
    lambdas = [1e-3, 1e-2, 1e-1]
    exact = tikhonov_norms(power, d * d, 1.0, lambdas, n_bins=None)
    binned = tikhonov_norms(power, d * d, 1.0, lambdas)
    for i, lam in enumerate(lambdas):
        sol = tikhonov(
            field, mask, vox, b0, lambda_=lam, regularization="identity", correct=False,
            pad_factor=1.0,
        )  # fmt: skip
        misfit = forward_field(sol, vox, b0, pad_factor=1.0) - field
        assert exact[0][i] == pytest.approx(np.linalg.norm(misfit), rel=1e-3)
        assert exact[1][i] == pytest.approx(np.linalg.norm(sol), rel=1e-3)
    np.testing.assert_allclose(binned, exact, rtol=2e-3)
    with pytest.raises(ValueError):
        tikhonov_norms(power, d * d, 1.0, [0.0, 1.0])


def test_lcurve_corner_and_inflection():
    lam = np.geomspace(1e-3, 1e3, 61)
    t = np.log(lam)
    # symmetric under lambda -> 1 / lambda with the axes swapped: the corner is at 1
    assert lam[lcurve_corner(lam, 1 + lam, 1 + 1 / lam)] == pytest.approx(1.0)
    # a curve that bends one way only has no inflection
    with pytest.raises(ValueError):
        lcurve_inflection(lam, np.exp(t), np.exp(-t + 0.05 * t * t))
    # y(x) = -x - (x - 1)^3 / 6 + ... with x = log lambda: curvature changes sign at x = 1
    y = -t - (t - 1) ** 3 / 60
    assert lcurve_inflection(lam, np.exp(t), np.exp(y)) == pytest.approx(np.e, rel=0.02)
    assert lam[lcurve_corner(lam, np.exp(t), np.exp(y))] < np.e
    with pytest.raises(ValueError):
        lcurve_corner(lam[:3], lam[:3], lam[:3])


def test_discrepancy_lambda():
    lam = np.geomspace(1e-4, 1, 9)
    residual = 0.5 * np.sqrt(lam)  # log-linear, so the interpolation is exact
    assert discrepancy_lambda(lam, residual, 0.5 * np.sqrt(3e-3)) == pytest.approx(3e-3)
    with pytest.raises(ValueError):
        discrepancy_lambda(lam, residual, 10.0)
    with pytest.raises(ValueError):
        discrepancy_lambda(lam, residual, 0.0)


# ------------------------------------------------------------------------ simulated head
@pytest.fixture(scope="module")
def head(sim_2mm):
    return sim_2mm, noisy_field(sim_2mm)


def test_head_accuracy(head):
    sim, field = head
    truth, mask, seg, b0 = sim.chi_ppm, sim.mask, sim.segmentation, sim.b0_dir

    def scores(chi):
        return nrmse_demeaned(chi, truth, mask), dgm_linearity(chi, truth, seg)

    # measured (demeaned NRMSE %, |1 - DGM slope|) with noise 0.002 ppm:
    # TKD 0.19 (54.2, 0.048); TSVD 0.1 (58.2, 0.059);
    # Tikhonov gradient uncorrected (44.6, 0.23), corrected (default; 47.3, 0.072);
    # Tikhonov identity (47.9, 0.27), corrected (54.8, 0.075)
    ref, ref_dgm = scores(tkd(field, mask, VOX_2MM, b0, n_threads=2))
    assert ref < 57 and ref_dgm < 0.1
    err, dgm = scores(tsvd(field, mask, VOX_2MM, b0, n_threads=2))
    assert err < 61 and dgm < 0.1
    err, dgm = scores(tikhonov(field, mask, VOX_2MM, b0, correct=False, n_threads=2))
    assert err < 47 and err < ref - 7
    # regularisation costs linearity, which the correction (default) restores
    assert 0.15 < dgm < 0.3
    err, dgm = scores(tikhonov(field, mask, VOX_2MM, b0, n_threads=2))
    assert err < ref - 5 and dgm < 0.1
    ident = tikhonov(
        field, mask, VOX_2MM, b0, regularization="identity", correct=False, n_threads=2
    )
    err, dgm = scores(ident)
    assert err < 50 and dgm > 0.15
    fixed = tikhonov(field, mask, VOX_2MM, b0, regularization="identity", correct=True, n_threads=2)
    err, dgm = scores(fixed)
    assert err < 57 and dgm < 0.12


def test_automatic_weights(head):
    sim, field = head
    truth, mask, b0 = sim.chi_ppm, sim.mask, sim.b0_dir
    picks = {
        method: tikhonov_lambda(
            field, mask, VOX_2MM, b0, method=method, noise_ppm=0.002, n_threads=2
        )
        for method in ("lcurve", "inflection", "discrepancy")
    }
    # measured 5.7e-4, 5.6e-3, 1.76e-2 mm^2 (best by NRMSE ~8.5e-3): the corner of maximum
    # curvature under-regularises, the inflection and the discrepancy principle do not
    assert picks["lcurve"] < picks["inflection"] < picks["discrepancy"]
    assert 3e-3 < picks["inflection"] < 1.2e-2
    assert 1e-2 < picks["discrepancy"] < 3e-2
    auto = tikhonov(field, mask, VOX_2MM, b0, lambda_="inflection", n_threads=2)
    assert nrmse_demeaned(auto, truth, mask) < 50  # measured 47.8 (corrected)
    corner = tikhonov(field, mask, VOX_2MM, b0, lambda_="lcurve", n_threads=2)
    assert nrmse_demeaned(corner, truth, mask) > 55  # measured 59.2


def test_oblique_b0_matches_axial(head):
    # The simulator's local field is the dipole field of the demeaned brain susceptibility
    # with B0 along z; the same sources and noise seen with a tilted B0 must invert as well.
    sim, field = head
    mask = sim.mask
    noise = field - np.where(mask, sim.local_field_ppm, 0)
    chi = np.where(mask, sim.chi_ppm - sim.chi_ppm[mask].mean(), 0).astype(np.float32)
    oblique = np.array([0.3, -0.2, 1.0]) / np.linalg.norm([0.3, -0.2, 1.0])  # 21 degrees
    tilted = np.where(mask, forward_field(chi, VOX_2MM, oblique, n_threads=2) + noise, 0)
    # measured (demeaned NRMSE %, axial / oblique): TSVD 58.2 / 54.6, Tikhonov 44.6 / 44.1
    for method in (tsvd, tikhonov):
        axial = nrmse_demeaned(method(field, mask, VOX_2MM, sim.b0_dir), chi, mask)
        other = nrmse_demeaned(method(tilted, mask, VOX_2MM, oblique), chi, mask)
        assert abs(axial - other) < 5


# ------------------------------------------------------------------------------- bad input
def small_case():
    rng = np.random.default_rng(5)
    field = rng.normal(0, 0.02, (12, 12, 12)).astype(np.float32)
    mask = np.zeros(field.shape, bool)
    mask[2:10, 2:10, 2:10] = True
    return field, mask


@pytest.mark.parametrize("method", [tsvd, tikhonov])
def test_bad_input(method):
    field, mask = small_case()
    out = method(field, mask, (1, 1, 1))
    assert out.dtype == np.float32 and not out[~mask].any()
    with pytest.raises(ValueError):
        method(field, np.zeros_like(mask), (1, 1, 1))
    bad = field.copy()
    bad[5, 5, 5] = np.nan
    with pytest.raises(ValueError):
        method(bad, mask, (1, 1, 1))
    with pytest.warns(UserWarning, match="ppm"):
        method(field * 127.7, mask, (1, 1, 1))  # a field in Hz at 3 T


def test_bad_parameters():
    field, mask = small_case()
    for threshold in (0.0, -0.2, 1.01):
        with pytest.raises(ValueError):
            tsvd(field, mask, (1, 1, 1), threshold=threshold)
    for lam in (0.0, -1e-3, np.nan, "corner"):
        with pytest.raises(ValueError):
            tikhonov(field, mask, (1, 1, 1), lambda_=lam)
    with pytest.raises(ValueError):
        tikhonov(field, mask, (1, 1, 1), regularization="tv")
    with pytest.raises(ValueError):
        tikhonov(field, mask, (1, 1, 1), correction_radius_mm=0.0)
    with pytest.raises(ValueError):
        tikhonov(field, mask, (1, 1, 1), lambda_="discrepancy")  # no noise level
