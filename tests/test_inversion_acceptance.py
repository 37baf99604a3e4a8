"""Acceptance of the dipole inversions (issue 5) on the noisy simulated 2 mm head, and the
bad-input contract shared by all ten methods.

Noise: a multi-echo field fit at SNR 100 (mean first-echo magnitude in the brain over the noise
SD). Per voxel, the weighted least-squares slope of the phase over the echoes has the SD
``1 / sqrt(sum_e (s_e m_e / sigma)^2)`` ppm, with ``s_e = 2 pi gamma_bar B0 TE_e`` (rad/ppm),
``m_e`` the echo magnitudes and ``sigma`` the magnitude noise; checked here against a Monte
Carlo fit. For this protocol (4 echoes, 5-20 ms, 3 T) it is ~0.0006 ppm in the brain, about a
third of the 0.002 ppm (~SNR 30) the per-method test files use for their robustness checks.

Acceptance: TV-ADMM, TGV, MEDI and NDI, with their defaults and the true local field plus this
noise as input, reach a demeaned NRMSE at least 25 % below TKD's (threshold 0.19) and a
deep-grey-matter linearity slope within 0.15 of 1.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.algorithms import inversion
from qsmflow.algorithms.metrics import dgm_linearity, nrmse_demeaned

VOX = (2.0, 2.0, 2.0)


def field_noise_sd_ppm(sim, snr: float = 100.0) -> np.ndarray:
    """SD (ppm) of a weighted least-squares field fit over the echoes at magnitude SNR ``snr``."""
    mag = sim.magnitude.astype(np.float64)
    sigma = mag[..., 0][sim.mask].mean() / snr
    rad_per_ppm = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * sim.params.b0_tesla
    s = rad_per_ppm * np.asarray(sim.params.echo_times_s)
    info = np.sum((s * mag / sigma) ** 2, axis=-1)
    sd = 1.0 / np.sqrt(np.maximum(info, 1e-12))
    # background voxels (no signal) would get huge values: cap at 5x the brain median
    return np.minimum(sd, 5 * np.median(sd[sim.mask])).astype(np.float32)


def test_noise_model_matches_a_fit():
    """Monte Carlo: fit noisy phases (SD sigma / m_e per echo) with the weighted slope."""
    rng = np.random.default_rng(0)
    tes = np.array([0.005, 0.010, 0.015, 0.020])
    s = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * 3.0 * tes
    mags = np.array([[1.0, 0.8, 0.65, 0.5], [0.5, 0.45, 0.4, 0.35]])
    sigma = 0.01

    class Sim:
        magnitude = mags.reshape(2, 1, 1, 4)
        mask = np.ones((2, 1, 1), bool)

        class params:
            b0_tesla = 3.0
            echo_times_s = tuple(tes)

    expected = field_noise_sd_ppm(Sim, snr=float(mags[:, 0].mean() / sigma)).reshape(2)
    for m, sd in zip(mags, expected, strict=True):
        phase = rng.standard_normal((20000, 4)) * (sigma / m)
        w = (m / sigma) ** 2
        slope = (phase * w * s).sum(axis=1) / (w * s * s).sum()
        assert slope.std() == pytest.approx(sd, rel=0.03)


@pytest.fixture(scope="module")
def head(sim_2mm):
    sim = sim_2mm
    sd = field_noise_sd_ppm(sim)
    noise = np.random.default_rng(11).standard_normal(sd.shape).astype(np.float32) * sd
    field = np.where(sim.mask, sim.local_field_ppm + noise, 0).astype(np.float32)
    chi_tkd = inversion.tkd(field, sim.mask, VOX, sim.b0_dir, threshold=0.19, n_threads=2)
    return sim, field, nrmse_demeaned(chi_tkd, sim.chi_ppm, sim.mask)


#: method -> keywords beyond the defaults. Measured (demeaned NRMSE %, |1 - DGM slope|; TKD
#: 44.6 % / 0.049): TV 15.8 / 0.018, TGV (Laplacian data term, 150 iterations) 27.3 / 0.033,
#: MEDI 16.9 / 0.025, NDI (sources within 2 mm of the mask, 150 iterations) 32.1 / 0.081.
#: The others, for reference: TSVD 50.0 / 0.063, Tikhonov 41.4 / 0.070, iLSQR 38.8 / 0.051,
#: star-QSM 30.4 / 0.058, RTS 25.9 / 0.080 (41.3 / 0.218 with the published 4 LSMR steps).
ACCEPTED = {"tv_admm": {}, "tgv": {}, "medi": {}, "ndi": {}}
#: methods given the magnitude
WEIGHTED = {"tv_admm", "medi", "ndi"}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accuracy_at_snr_100(head, name):
    sim, field, err_tkd = head
    kwargs = {"magnitude": sim.magnitude} if name in WEIGHTED else {}
    kwargs.update(ACCEPTED[name])
    chi = getattr(inversion, name)(field, sim.mask, VOX, sim.b0_dir, n_threads=2, **kwargs)
    assert chi.dtype == np.float32 and np.all(np.isfinite(chi)) and not chi[~sim.mask].any()
    err = nrmse_demeaned(chi, sim.chi_ppm, sim.mask)
    assert err <= 0.75 * err_tkd, f"{name}: {err:.1f} % against TKD {err_tkd:.1f} %"
    assert dgm_linearity(chi, sim.chi_ppm, sim.segmentation) < 0.15


# ------------------------------------------------------------------------------- bad input
ALL_METHODS = [
    "tkd", "tsvd", "tikhonov", "ilsqr", "star_qsm", "tv_admm", "tgv", "medi", "ndi", "rts",
]  # fmt: skip


def small_case():
    """A 20^3 grid with a ball mask and a smooth 0.05 ppm field."""
    n = 20
    x, y, z = np.mgrid[:n, :n, :n] - (n - 1) / 2
    mask = x * x + y * y + z * z < 8**2
    field = np.where(mask, 0.05 * np.sin(x / 3.0) * np.cos(z / 4.0), 0).astype(np.float32)
    return field, mask


@pytest.mark.parametrize("name", ALL_METHODS)
def test_bad_input_is_named(name):
    func = getattr(inversion, name)
    field, mask = small_case()
    with pytest.raises(ValueError, match="mask"):
        func(field, np.zeros_like(mask), (1, 1, 1))
    bad = field.copy()
    bad[10, 10, 10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        func(bad, mask, (1, 1, 1))
    bad[10, 10, 10] = np.inf
    with pytest.raises(ValueError, match="Inf"):
        func(bad, mask, (1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size"):
        func(field, mask, (1, 0, 1))
    with pytest.raises(ValueError, match="b0_dir"):
        func(field, mask, (1, 1, 1), (0, 0, 0))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_field_in_hz_or_rad_warns(name):
    """A field 127.7x too large (Hz at 3 T) warns that it is probably not in ppm; a sane one
    does not."""
    func = getattr(inversion, name)
    field, mask = small_case()
    with pytest.warns(UserWarning, match="ppm"):
        func(field * 127.7, mask, (1, 1, 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ppm.*")
        func(field, mask, (1, 1, 1))
