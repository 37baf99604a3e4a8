"""Tests for qsmflow.algorithms.echoes.fit_field (weighted linear fit of phase over TE).

Known answers: noise-free synthetic phase is fitted exactly; the weighted fit equals numpy's
``polyfit`` with the same weights; on the simulator's noisy phase (unwrapped with the truth) the
field matches the true total field to within the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.algorithms.background import vsharp
from qsmflow.algorithms.echoes import fit_field
from qsmflow.algorithms.metrics import nrmse_demeaned
from qsmflow.algorithms.unwrap import laplacian_unwrap

TES = (0.004, 0.009, 0.0145, 0.021)
B0 = 2.89


def synthetic(shape=(10, 9, 8), seed=0):
    rng = np.random.default_rng(seed)
    field = rng.uniform(-2, 2, shape).astype(np.float32)  # ppm
    offset = rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
    tes = np.asarray(TES)
    omega = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * B0 * field[..., None]  # rad/s per ppm * ppm
    phase = (offset[..., None] + omega * tes).astype(np.float32)
    mag = (rng.uniform(0.2, 1.0, shape + (1,)) * np.exp(-tes * 30)).astype(np.float32)
    return field, offset, phase, mag


@pytest.mark.parametrize("weighting", ["mag2te2", "mag2", "none"])
def test_noise_free_fit_is_exact(weighting):
    field, offset, phase, mag = synthetic()
    fit = fit_field(phase, mag, TES, b0_tesla=B0, weighting=weighting)
    for arr in fit:
        assert arr.dtype == np.float32 and arr.shape == field.shape
    assert np.abs(fit.field_ppm - field).max() < 1e-4
    assert np.abs(fit.phase_offset_rad - offset).max() < 1e-4
    np.testing.assert_allclose(fit.field_hz, field * GAMMA_BAR_MHZ_PER_T * B0, rtol=1e-5, atol=1e-3)
    assert fit.residual_rad.max() < 1e-4


def test_weighted_fit_matches_polyfit():
    rng = np.random.default_rng(1)
    shape = (5, 4, 3)
    phase = rng.normal(0, 3, shape + (4,)).astype(np.float32)  # not a line at all
    mag = rng.uniform(0.1, 1.0, shape + (4,)).astype(np.float32)
    tes = np.asarray(TES)
    fit = fit_field(phase, mag, TES, b0_tesla=B0)
    w = mag.astype(np.float64) ** 2 * tes**2
    for idx in np.ndindex(shape):
        # polyfit minimises sum((w_poly * residual)^2), so w_poly = sqrt(weights)
        slope, icept = np.polyfit(tes, phase[idx].astype(np.float64), 1, w=np.sqrt(w[idx]))
        hz = slope / (2 * np.pi)
        assert fit.field_hz[idx] == pytest.approx(hz, rel=1e-4, abs=1e-3)
        assert fit.phase_offset_rad[idx] == pytest.approx(icept, rel=1e-4, abs=1e-4)
        resid = phase[idx] - (icept + slope * tes)
        rms = np.sqrt(np.sum(w[idx] * resid**2) / np.sum(w[idx]))
        assert fit.residual_rad[idx] == pytest.approx(rms, rel=1e-4)


def test_without_offset():
    field, offset, phase, mag = synthetic()
    fit = fit_field(phase - offset[..., None], mag, TES, b0_tesla=B0, fit_offset=False)
    assert np.abs(fit.field_ppm - field).max() < 1e-4
    assert not fit.phase_offset_rad.any()
    # with an offset present, a line through the origin cannot fit
    biased = fit_field(phase, mag, TES, b0_tesla=B0, fit_offset=False)
    assert biased.residual_rad.mean() > 0.1


def test_mask_and_degenerate_voxels():
    field, offset, phase, mag = synthetic()
    mask = np.zeros(field.shape, bool)
    mask[2:7, 3:6, 1:5] = True
    mag[0, 0, 0] = 0  # all weights zero: undetermined
    mask[0, 0, 0] = True
    fit = fit_field(phase, mag, TES, b0_tesla=B0, mask=mask)
    for arr in fit:
        assert not arr[~mask].any()
        assert arr[0, 0, 0] == 0
    assert np.abs(fit.field_ppm - field)[2:7, 3:6, 1:5].max() < 1e-4


def test_rejects_bad_input():
    field, offset, phase, mag = synthetic()
    with pytest.raises(ValueError):
        fit_field(phase, mag, TES[:3], b0_tesla=B0)
    with pytest.raises(ValueError):
        fit_field(phase[..., :1], mag[..., :1], TES[:1], b0_tesla=B0)  # one echo, two unknowns
    with pytest.raises(ValueError):
        fit_field(phase, mag, TES, b0_tesla=B0, weighting="snr")
    with pytest.raises(ValueError):
        fit_field(phase, mag[..., :2], TES, b0_tesla=B0)
    with pytest.raises(ValueError):
        fit_field(phase[..., 0], mag[..., 0], TES, b0_tesla=B0)
    # one echo is enough without an offset
    one = fit_field(
        phase[..., :1] - offset[..., None], mag[..., :1], TES[:1], b0_tesla=B0, fit_offset=False
    )
    assert np.abs(one.field_ppm - field).max() < 1e-4


def test_simulated_total_field(sim_2mm):
    sim = sim_2mm
    tes = np.asarray(sim.params.echo_times_s)
    b0 = sim.params.b0_tesla
    true_phase = (
        sim.phase_offset_rad[..., None]
        + 2 * np.pi * GAMMA_BAR_MHZ_PER_T * b0 * tes * (sim.total_field_ppm[..., None])
    )
    # the measured (noisy) phase unwrapped with the truth
    unwrapped = true_phase + np.angle(np.exp(1j * (sim.phase - true_phase)))
    eroded = ndimage.binary_erosion(sim.mask, iterations=2)
    results = {}
    for weighting in ("mag2te2", "mag2", "none"):
        fit = fit_field(
            unwrapped, sim.magnitude, tes, b0_tesla=b0, mask=sim.mask, weighting=weighting
        )
        results[weighting] = nrmse_demeaned(fit.field_ppm, sim.total_field_ppm, eroded)
        err = fit.field_ppm[eroded] - sim.total_field_ppm[eroded]
        assert np.sqrt(np.mean(err**2)) < 0.004  # ppm; the field spans about +-1.5 ppm
        offset_err = np.angle(np.exp(1j * (fit.phase_offset_rad - sim.phase_offset_rad)))
        assert np.sqrt(np.mean(offset_err[eroded] ** 2)) < 0.05  # rad
    # measured NRMSE (%): mag2te2 1.98, mag2 1.47, none 1.51 -- the noise alone
    assert results["mag2te2"] < 3.0
    assert results["mag2"] < 2.5
    assert results["none"] < 2.5
    # inverse phase-noise weights (mag^2) are the efficient ones for a fit with intercept
    assert results["mag2"] < min(results["mag2te2"], results["none"])


def test_laplacian_route_on_simulation(sim_2mm):
    """Laplacian-unwrap each echo, fit, remove the background: the demo route.

    Per-echo Laplacian unwrapping adds an error that is not linear in TE. Most of it is
    harmonic inside the brain and V-SHARP removes it; the rest is documented in fit_field.
    """
    sim = sim_2mm
    tes = np.asarray(sim.params.echo_times_s)
    b0 = sim.params.b0_tesla
    vox = sim.params.voxel_size_mm
    true_phase = (
        sim.phase_offset_rad[..., None]
        + 2 * np.pi * GAMMA_BAR_MHZ_PER_T * b0 * tes * (sim.total_field_ppm[..., None])
    )
    ideal = true_phase + np.angle(np.exp(1j * (sim.phase - true_phase)))
    ideal_fit = fit_field(ideal, sim.magnitude, tes, b0_tesla=b0, mask=sim.mask)
    lap_fit = fit_field(
        laplacian_unwrap(sim.phase, vox, n_threads=2),
        sim.magnitude,
        tes,
        b0_tesla=b0,
        mask=sim.mask,
    )
    diff = lap_fit.field_ppm - ideal_fit.field_ppm
    diff_local, roi = vsharp(diff, sim.mask, vox, n_threads=2)

    def energy(x):
        v = x[roi] - x[roi].mean()
        return float(np.dot(v, v))

    # measured: 97.8 % of the error energy is harmonic and removed
    assert 1 - energy(diff_local) / energy(diff) > 0.95
    local, roi = vsharp(lap_fit.field_ppm, sim.mask, vox, n_threads=2)
    # measured 106.6 % (53.1 % with ideal unwrapping): a regression guard, not a target
    assert nrmse_demeaned(local, sim.local_field_ppm, roi) < 115
    # the residual map shows the non-linearity: median 0.044 rad vs 0.0054 rad (noise)
    assert np.median(lap_fit.residual_rad[sim.mask]) > 4 * np.median(
        ideal_fit.residual_rad[sim.mask]
    )
