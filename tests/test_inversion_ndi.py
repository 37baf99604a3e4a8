"""Tests for nonlinear dipole inversion (qsmflow.algorithms.inversion.ndi).

Known answers: the k-space iteration equals a direct image-space implementation of the NDI
update; on the noisy 2 mm simulated head NDI beats TKD with a deep-grey-matter slope near 1,
gives the same error for an oblique B0, stays bounded and accurate when every source is three
times stronger (calcification at -4.5 ppm), and its cone-energy rule stops before noise builds
streaks; the support constraint (sources within 2 mm of the mask) helps on the true local field
and, thanks to its margin, costs little after V-SHARP (residual background).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from qsmflow.algorithms.background import vsharp
from qsmflow.algorithms.dipole import dipole_kernel, forward_field
from qsmflow.algorithms.inversion.direct import tkd
from qsmflow.algorithms.inversion.ndi import ndi, phase_scale_rad_per_ppm
from qsmflow.algorithms.metrics import calcification_metrics, dgm_linearity, nrmse_demeaned

VOX = (2.0, 2.0, 2.0)
OBLIQUE_B0 = (0.35, -0.25, 1.0)  # 23 degrees from the z axis


def noise_ppm(sim, sigma_ppm=0.002, seed=0):
    """Noise of a multi-echo field fit at SNR ~100: Gaussian, ``sigma_ppm`` where the first-echo
    magnitude is at its brain mean, scaled by mean / magnitude (at most 5x)."""
    mag = sim.magnitude[..., 0]
    ref = float(mag[sim.mask].mean())
    scale = ref / np.maximum(mag, 0.2 * ref)
    return (np.random.default_rng(seed).standard_normal(mag.shape) * sigma_ppm * scale).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def case(sim_2mm):
    sim = sim_2mm
    noise = noise_ppm(sim)
    field = np.where(sim.mask, sim.local_field_ppm + noise, 0).astype(np.float32)
    chi, n_iter = ndi(
        field, sim.mask, VOX, sim.b0_dir, magnitude=sim.magnitude, return_iterations=True,
        n_threads=2,
    )  # fmt: skip
    return {"sim": sim, "noise": noise, "field": field, "ndi": chi, "n_iter": n_iter}


def test_phase_scale():
    # 2 pi * 42.577 MHz/T * 3 T * 5 ms * 1e-6
    assert phase_scale_rad_per_ppm(3.0, 0.005) == pytest.approx(4.01283, rel=1e-5)
    for b0, te in [(0.0, 0.005), (3.0, 0.0), (3.0, 20.0)]:
        with pytest.raises(ValueError):
            phase_scale_rad_per_ppm(b0, te)


@pytest.mark.parametrize("support", [False, True])
def test_iteration_matches_direct_update(support):
    """Five iterations against x <- P[x - tau (D[W^2 sin(D x - phi)] + alpha x)] written out in
    image space (P: zero outside the mask when ``support`` with no margin)."""
    rng = np.random.default_rng(0)
    shape, vox, b0 = (24, 20, 18), (1.0, 1.2, 1.5), (0.2, -0.1, 1.0)
    mask = rng.uniform(size=shape) < 0.7
    mask[0, 0, 0] = mask[-1, -1, -1] = True  # the bounding box is the whole grid
    field = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    mag = rng.uniform(0.3, 1.0, shape).astype(np.float32)
    scale = phase_scale_rad_per_ppm(3.0, 0.005)
    tau, alpha = 3.0, 1e-3
    chi = ndi(
        field, mask, vox, b0, magnitude=mag, stop="none", max_iter=5, margin_mm=0.0, tau=tau,
        alpha=alpha, support=support, support_margin_mm=0.0,
    )  # fmt: skip

    kernel = dipole_kernel(shape, vox, b0, real=True)

    def conv(v):
        return scipy.fft.irfftn(scipy.fft.rfftn(v) * kernel, s=shape)

    w2 = np.where(mask, np.minimum(mag / np.percentile(mag[mask], 99.9), 1.0) ** 2, 0)
    phi = np.where(mask, scale * field, 0)
    x = np.zeros(shape)
    for _ in range(5):
        x = x - tau * (conv(w2 * np.sin(conv(x) - phi)) + alpha * x)
        if support:
            x[~mask] = 0
    expected = np.where(mask, x / scale, 0)
    np.testing.assert_allclose(chi, expected, atol=2e-4 * np.abs(expected).max())


def test_default_phase_scale_does_not_depend_on_b0():
    """The field is in ppm: by default the same 4 rad/ppm scale (5 ms at 3 T) at 7 T, so the
    same map; an explicit 20 ms at 7 T (37 rad/ppm) puts strong sources past sin's turn."""
    rng = np.random.default_rng(1)
    shape = (20, 20, 20)
    mask = np.zeros(shape, bool)
    mask[3:17, 3:17, 3:17] = True
    field = np.where(mask, 0.3 * rng.standard_normal(shape), 0).astype(np.float32)
    kw = {"stop": "none", "max_iter": 10}
    at3 = ndi(field, mask, (1, 1, 1), b0_tesla=3.0, **kw)
    np.testing.assert_allclose(ndi(field, mask, (1, 1, 1), b0_tesla=7.0, **kw), at3, atol=1e-5)
    far = ndi(field, mask, (1, 1, 1), b0_tesla=7.0, te_s=0.02, **kw)
    assert np.abs(far - at3).max() > 0.01


def test_ndi_beats_tkd(case):
    sim = case["sim"]
    base = tkd(case["field"], sim.mask, VOX, sim.b0_dir, threshold=0.19)
    chi = case["ndi"]
    assert chi.dtype == np.float32 and chi.shape == sim.mask.shape
    assert not chi[~sim.mask].any() and np.all(np.isfinite(chi))
    assert 4 < case["n_iter"] < 150  # the cone rule stopped it (measured: 55 iterations)
    e_tkd = nrmse_demeaned(base, sim.chi_ppm, sim.mask)
    e_ndi = nrmse_demeaned(chi, sim.chi_ppm, sim.mask)
    # measured at this noise (0.002 ppm, ~SNR 30; the SNR-100 acceptance is in
    # test_inversion_acceptance.py): TKD 54.3 %, NDI 44.4 % (deep-grey slope error 0.132)
    assert e_ndi < 0.9 * e_tkd
    assert dgm_linearity(chi, sim.chi_ppm, sim.segmentation) < 0.16


def test_support_constraint_and_stopping_rules(case):
    """Keeping the sources near the mask helps on the true local field; its 2 mm margin keeps
    the rim's sources after V-SHARP (residual background, eroded mask), where no margin hurts;
    running past the cone rule's stop builds noise streaks."""
    sim = case["sim"]
    e_ndi = nrmse_demeaned(case["ndi"], sim.chi_ppm, sim.mask)
    free = ndi(
        case["field"], sim.mask, VOX, sim.b0_dir, magnitude=sim.magnitude, support=False,
        n_threads=2,
    )  # fmt: skip
    longer = ndi(
        case["field"], sim.mask, VOX, sim.b0_dir, magnitude=sim.magnitude, stop="none",
        max_iter=3 * case["n_iter"], n_threads=2,
    )  # fmt: skip
    # measured: default 44.4 %, unconstrained 47.3 %, 3x the iterations 49.1 %
    assert nrmse_demeaned(free, sim.chi_ppm, sim.mask) > e_ndi + 2
    assert nrmse_demeaned(longer, sim.chi_ppm, sim.mask) > e_ndi + 1

    total = (sim.total_field_ppm + case["noise"]).astype(np.float32)
    local, kept = vsharp(total, sim.mask, VOX, n_threads=2)
    errors = {
        name: nrmse_demeaned(
            ndi(local, kept, VOX, sim.b0_dir, magnitude=sim.magnitude, n_threads=2, **kw)
            if kw is not None
            else tkd(local, kept, VOX, sim.b0_dir),
            sim.chi_ppm,
            kept,
        )
        for name, kw in (("tkd", None), ("ndi", {}), ("no_margin", {"support_margin_mm": 0.0}))
    }
    # measured after V-SHARP: TKD 60.8 %, NDI 55.1 %, without the margin 57.8 %
    assert errors["ndi"] < errors["tkd"] - 2
    assert errors["ndi"] < errors["no_margin"] - 2


def test_oblique_b0_matches_axial(case):
    sim = case["sim"]
    chi_brain = np.where(sim.mask, sim.chi_ppm - sim.chi_ppm[sim.mask].mean(), 0)
    field = forward_field(chi_brain.astype(np.float32), VOX, OBLIQUE_B0, pad_factor=2.0)
    field = np.where(sim.mask, field + case["noise"], 0).astype(np.float32)
    chi = ndi(field, sim.mask, VOX, OBLIQUE_B0, magnitude=sim.magnitude, n_threads=2)
    e_axial = nrmse_demeaned(case["ndi"], sim.chi_ppm, sim.mask)
    e_oblique = nrmse_demeaned(chi, sim.chi_ppm, sim.mask)
    # measured: 44.4 % axial, 44.5 % oblique (deep-grey slope error 0.132 and 0.164)
    assert abs(e_oblique - e_axial) < 5.0


def test_strong_susceptibility_stays_bounded(case):
    """Every source three times stronger: veins ~1 ppm, calcification -4.5 ppm, whose field
    reaches ~0.9 ppm (3.6 rad at the 5 ms reference: sin() turns over)."""
    sim = case["sim"]
    truth = 3.0 * sim.chi_ppm
    field = np.where(sim.mask, 3.0 * sim.local_field_ppm + case["noise"], 0).astype(np.float32)
    chi = ndi(field, sim.mask, VOX, sim.b0_dir, magnitude=sim.magnitude, n_threads=2)
    assert np.all(np.isfinite(chi))
    assert np.abs(chi).max() < np.abs(truth[sim.mask]).max()
    e3 = nrmse_demeaned(chi, truth, sim.mask)
    e_tkd = nrmse_demeaned(tkd(field, sim.mask, VOX, sim.b0_dir), truth, sim.mask)
    # measured: 32.9 % (TKD 45.0 %), calcification moment error 4.1 (TKD 6.8) ppm x voxels;
    # the noise is relatively 3x lower, so no worse than at 1x
    assert e3 < nrmse_demeaned(case["ndi"], sim.chi_ppm, sim.mask)
    assert e3 < e_tkd
    moment, _ = calcification_metrics(chi, truth, sim.segmentation)
    moment_tkd, _ = calcification_metrics(
        tkd(field, sim.mask, VOX, sim.b0_dir), truth, sim.segmentation
    )
    assert moment < moment_tkd


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tau": 5.0},  # beyond 2 / (4/9) = 4.5: unstable
        {"tau": 0.0},
        {"alpha": -1.0},
        {"max_iter": 0},
        {"stop": "never"},
        {"te_s": 5.0},
        {"margin_mm": -1.0},
        {"magnitude": np.zeros((10, 10, 10), np.float32)},
        {"magnitude": np.ones((4, 4, 4), np.float32)},
        {"noise_sd_ppm": np.zeros((10, 10, 10), np.float32)},
    ],
)
def test_bad_parameters(kwargs):
    field = np.zeros((10, 10, 10), np.float32)
    mask = np.zeros((10, 10, 10), bool)
    mask[2:8, 2:8, 2:8] = True
    with pytest.raises(ValueError):
        ndi(field, mask, (1.0, 1.0, 1.0), **kwargs)


def test_bad_inputs():
    field = np.zeros((10, 10, 10), np.float32)
    mask = np.ones((10, 10, 10), bool)
    with pytest.raises(ValueError):
        ndi(field[0], mask[0], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        ndi(field, ~mask, (1.0, 1.0, 1.0))
    bad = field.copy()
    bad[5, 5, 5] = np.inf
    with pytest.raises(ValueError):
        ndi(bad, mask, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        ndi(field, mask, (1.0, 1.0))
    with pytest.raises(ValueError):
        ndi(field, mask, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
