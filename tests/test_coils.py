"""Tests for qsmflow.algorithms.echoes.coils (MCPC-3D-S and ASPIRE, Eckstein et al. 2018).

Known answers: on noise-free synthetic channels the offsets are exact (ASPIRE, and MCPC-3D-S when
TE1 = TE2 - TE1) or exact up to a term shared by all channels (any echo times); on the
simulator's 8-channel head the field fitted from the combined phase is as accurate as the
combination with the true (simulated) channel offsets, and the offset left in the combined
phase is small.

How the combined phase is judged: it is unwrapped with the true field, ``omega_true * TE +
wrap(phase - omega_true * TE)``, which keeps any echo-independent offset the combination leaves
(within +-pi) and adds nothing echo-dependent; the field is then fitted with an intercept and
compared with the true total field. A badly combined phase (cancellation between channels,
offsets near +-pi, jumps) shows up as field error; the raw complex sum is the negative control.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.algorithms.echoes import fit_field
from qsmflow.algorithms.echoes.coils import _smooth_complex, aspire, mcpc3ds
from qsmflow.algorithms.metrics import nrmse
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

TES = (0.005, 0.010, 0.015, 0.020)  # TE2 = 2 * TE1 (ASPIRE) and TE1 = TE2 - TE1
VOX = (2.0, 2.0, 2.0)
B0 = 3.0


def wrap(x):
    return np.angle(np.exp(1j * x))


@pytest.fixture(scope="module")
def sim8():
    """The 2 mm head with 8 receive channels, SNR 100 after combination (about 10 s)."""
    params = AcquisitionParams(
        matrix=(88, 104, 80), voxel_size_mm=VOX, echo_times_s=TES, b0_tesla=B0, snr=100, n_coils=8
    )
    sim = simulate_acquisition(
        make_head_model(0), params, rng=np.random.default_rng(1), n_threads=2
    )
    for value in vars(sim).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return sim


def judge(sim, phase, magnitude, echoes):
    """(field NRMSE % in the brain, RMS of the fitted echo-independent offset in rad)."""
    tes = np.asarray(TES)[echoes]
    omega_te = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * B0 * sim.total_field_ppm[..., None] * tes
    unwrapped = (omega_te + wrap(phase - omega_te)).astype(np.float32)
    fit = fit_field(unwrapped, magnitude, tes, b0_tesla=B0, mask=sim.mask, weighting="mag2")
    offset = wrap(fit.phase_offset_rad[sim.mask])
    return nrmse(fit.field_ppm, sim.total_field_ppm, sim.mask), float(np.sqrt(np.mean(offset**2)))


def weighted_sum_phase(weights, phase):
    """Phase of ``sum_c weights * exp(i phase)`` over the last axis (float32, cheap)."""
    return np.arctan2((weights * np.sin(phase)).sum(-1), (weights * np.cos(phase)).sum(-1))


def oracle(sim, echoes):
    """Combination with the simulator's true channel offsets (same weights as the methods)."""
    mag = sim.magnitude[..., echoes, :]
    w = mag * mag
    phase = weighted_sum_phase(w, sim.phase[..., echoes, :] - sim.phase_offset_rad[..., None, :])
    return phase, np.sqrt(w.sum(-1))


def relative_offset_error(sim, offsets):
    """RMS (rad, brain) of the offset error after removing the part shared by all channels."""
    err = np.exp(1j * (offsets - sim.phase_offset_rad))
    shared = err.mean(axis=-1, keepdims=True)
    return float(np.sqrt(np.mean(np.angle(err * np.conj(shared))[sim.mask] ** 2)))


# (echo indices, limit on the combined phase's residual offset in rad): with echoes 1 and 2 at
# 5 and 10 ms nothing is unwrapped; with 5 and 15 ms (TE1 / dTE = 1/2) the Laplacian-unwrapped
# difference enters and its non-congruent error stays as a smooth offset (about 0.3 rad RMS).
CASES = [([0, 1, 2, 3], 0.05), ([0, 2, 3], 0.5)]


@pytest.mark.parametrize(("echoes", "offset_limit"), CASES, ids=["te1=dte", "te1=dte/2"])
def test_mcpc3ds_on_simulated_coils(sim8, echoes, offset_limit):
    tes = np.asarray(TES)[echoes]
    res = mcpc3ds(sim8.magnitude[..., echoes, :], sim8.phase[..., echoes, :], tes, VOX)
    shape = sim8.mask.shape
    assert res.magnitude.shape == res.phase_rad.shape == shape + (len(echoes),)
    assert res.phase_offsets_rad.shape == shape + (8,)
    assert all(a.dtype == np.float32 for a in res)
    rss = np.sqrt((sim8.magnitude[..., echoes, :].astype(np.float64) ** 2).sum(-1))
    np.testing.assert_allclose(res.magnitude, rss, rtol=1e-5)

    field_err, residual_offset = judge(sim8, res.phase_rad, res.magnitude, echoes)
    ideal_err, _ = judge(sim8, *oracle(sim8, echoes), echoes)
    naive = weighted_sum_phase(sim8.magnitude[..., echoes, :], sim8.phase[..., echoes, :])
    naive_err, _ = judge(sim8, naive, res.magnitude, echoes)
    assert field_err < 2.0
    assert field_err < 1.03 * ideal_err
    assert naive_err > 10.0  # the judge sees what the offsets do to a plain complex sum
    # the offset left in the combined phase, against the single channel's own offset (~2 rad)
    single_offset = np.sqrt(np.mean(wrap(sim8.phase_offset_rad[..., 0])[sim8.mask] ** 2))
    assert single_offset > 1.0
    assert residual_offset < offset_limit
    assert relative_offset_error(sim8, res.phase_offsets_rad) < 0.03


def test_aspire_on_simulated_coils(sim8):
    res = aspire(sim8.magnitude, sim8.phase, TES, VOX)
    field_err, residual_offset = judge(sim8, res.phase_rad, res.magnitude, [0, 1, 2, 3])
    ideal_err, _ = judge(sim8, *oracle(sim8, [0, 1, 2, 3]), [0, 1, 2, 3])
    assert field_err < 2.0
    assert field_err < 1.03 * ideal_err
    assert residual_offset < 0.05
    # ASPIRE needs no unwrapping, so the offsets themselves (not only their differences) match
    err = wrap(res.phase_offsets_rad - sim8.phase_offset_rad)[sim8.mask]
    assert np.sqrt(np.mean(err**2)) < 0.03


def synthetic_channels(tes, n_coils=4, shape=(24, 20, 16), seed=0, slope=1.5):
    """Noise-free channels: smooth field, per-channel smooth offsets and magnitudes."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    omega = 2 * np.pi * 40.0 * np.exp(-(x**2 + y**2 + z**2) / 0.3)  # rad/s, up to 40 Hz
    coords = np.stack([x, y, z]).reshape(3, -1)
    offsets = np.stack(
        [
            rng.uniform(-np.pi, np.pi) + rng.uniform(-slope, slope, 3) @ coords
            for _ in range(n_coils)
        ],
        axis=-1,
    ).reshape(shape + (n_coils,))
    mags = np.stack([1.0 + 0.5 * np.cos(x + c) * np.sin(y - c) for c in range(n_coils)], -1)
    tes = np.asarray(tes)
    phase = offsets[..., None, :] + omega[..., None, None] * tes[:, None]
    mag = np.broadcast_to(mags[..., None, :], phase.shape)
    return mag.astype(np.float32), wrap(phase).astype(np.float32), offsets, omega


@pytest.mark.parametrize("method", [mcpc3ds, aspire])
def test_exact_offsets_without_noise_or_smoothing(method):
    tes = (0.004, 0.008, 0.012)
    mag, phase, offsets, omega = synthetic_channels(tes)
    res = method(mag, phase, tes, (1.0, 1.0, 1.0), sigma_mm=0)
    assert np.abs(wrap(res.phase_offsets_rad - offsets)).max() < 1e-4
    expected = wrap(omega[..., None] * np.asarray(tes))
    assert np.abs(wrap(res.phase_rad - expected)).max() < 1e-4


def test_mcpc3ds_channels_consistent_for_any_echo_times():
    # TE1 / (TE2 - TE1) = 0.8: the unwrapped echo difference enters, but only as a term shared
    # by all channels, so differences between the channels' offsets stay exact.
    tes = (0.004, 0.009, 0.014)
    mag, phase, offsets, _ = synthetic_channels(tes, seed=3)
    res = mcpc3ds(mag, phase, tes, (1.0, 1.0, 1.0), sigma_mm=0)
    diff_est = res.phase_offsets_rad - res.phase_offsets_rad[..., :1]
    diff_true = offsets - offsets[..., :1]
    assert np.abs(wrap(diff_est - diff_true)).max() < 1e-4


def test_coarse_grid_smoothing_approximates_gaussian():
    rng = np.random.default_rng(0)
    shape = (61, 50, 43)
    noise = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    z = ndimage.gaussian_filter(noise.real, 2) + 1j * ndimage.gaussian_filter(noise.imag, 2)
    z = z.astype(np.complex64)
    sigma = np.array([6.0, 4.8, 7.2])  # >= 4 voxels: block-averaged path
    ref = ndimage.gaussian_filter(z.real, sigma, mode="constant") + 1j * ndimage.gaussian_filter(
        z.imag, sigma, mode="constant"
    )
    out = _smooth_complex(z, sigma)
    assert out.shape == shape and out.dtype == np.complex64
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05


def test_mask_keeps_corrupt_voxels_out_of_the_smoothing():
    # Outside the mask every channel's phase is off by pi/2 and bright (as if another tissue):
    # with the mask the offsets inside stay right up to the mask's edge, without it they are
    # pulled towards the wrong phase.
    tes = (0.004, 0.008, 0.012)
    mag, phase, offsets, _ = synthetic_channels(tes, slope=0.3)
    mask = np.zeros(mag.shape[:3], bool)
    mask[4:20, 4:16, 4:12] = True
    outside = ~mask[..., None, None]
    phase = np.where(outside, wrap(phase + np.pi / 2), phase).astype(np.float32)
    mag = np.where(outside, 3 * mag, mag).astype(np.float32)
    vox = (1.0, 1.0, 1.0)
    edge = mask & ~ndimage.binary_erosion(mask)
    # (the masked error left, about 0.08 rad, is the bias of a kernel cut off at the mask's edge)
    errors = []
    for m in (mask, None):
        res = mcpc3ds(mag, phase, tes, vox, sigma_mm=1.5, mask=m)
        errors.append(np.abs(wrap(res.phase_offsets_rad - offsets)[edge]).max())
    assert errors[0] < 0.1
    assert errors[1] > 0.5


def test_input_validation():
    mag, phase, _, _ = synthetic_channels((0.004, 0.008, 0.012))
    vox = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"TE1 = 4 ms and TE2 = 9 ms"):
        aspire(mag, phase, (0.004, 0.009, 0.014), vox)
    with pytest.raises(ValueError, match="5-D"):
        mcpc3ds(mag[..., 0], phase[..., 0], (0.004, 0.008, 0.012), vox)
    with pytest.raises(ValueError, match="echo times for"):
        mcpc3ds(mag, phase, (0.004, 0.008), vox)
    with pytest.raises(ValueError, match="TE2 > TE1"):
        mcpc3ds(mag, phase, (0.008, 0.004, 0.012), vox)
    with pytest.raises(ValueError, match="sigma_mm"):
        mcpc3ds(mag, phase, (0.004, 0.008, 0.012), vox, sigma_mm=-1)
    with pytest.raises(ValueError, match="mask shape"):
        mcpc3ds(mag, phase, (0.004, 0.008, 0.012), vox, mask=np.ones((3, 3, 3), bool))
    with pytest.raises(ValueError, match="differs from phase shape"):
        mcpc3ds(mag[..., :2], phase, (0.004, 0.008, 0.012), vox)
