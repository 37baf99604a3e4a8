"""Tests for region-growing (ROMEO-like) and multi-echo unwrapping.

Known answers: smooth synthetic phase with several wraps is recovered exactly (integer
multiples of 2 pi only), per connected region up to one multiple of 2 pi; the quality map of a
ramp has a closed form; on a simulated 4-echo head at SNR 50 nearly every brain voxel is on the
true unwrapped phase's branch, in template and individual mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.algorithms.unwrap import (
    laplacian_unwrap,
    laplacian_unwrap_echo_differences,
    region_growing_unwrap,
    romeo_quality_map,
    temporal_unwrap,
    unwrap_multi_echo,
)
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

TWO_PI = 2 * np.pi


def wrap(x):
    return np.angle(np.exp(1j * x)).astype(np.float32)


def turns(a, b):
    """(a - b) in turns of 2 pi, rounded, and the largest distance from an integer."""
    t = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) / TWO_PI
    k = np.round(t)
    return k.astype(np.int64), float(np.abs(t - k).max())


def off_branch(out, truth, mask):
    """Voxels (in ``mask``) off the truth's branch after removing the mask's most common
    multiple of 2 pi (one global offset)."""
    k, _ = turns(out, truth)
    values, counts = np.unique(k[mask], return_counts=True)
    return mask & (k != values[np.argmax(counts)])


def exact_fraction(out, truth, mask):
    """Share of mask voxels on the truth's branch after removing one global offset."""
    return 1.0 - off_branch(out, truth, mask).sum() / mask.sum()


def ramp_phase(shape, vox):
    axes = [np.arange(n) * d for n, d in zip(shape, vox, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    cx = 0.5 * shape[0] * vox[0]
    # up to ~2.3 rad per voxel along z (2 mm), far below pi everywhere
    return (0.9 * x + 0.5 * y + 0.6 * z + 0.03 * (x - cx) ** 2 - 0.02 * y * z).astype(np.float32)


# ------------------------------------------------------------------------------ synthetic
def test_smooth_ramp_on_anisotropic_voxels():
    shape, vox = (40, 32, 20), (0.8, 1.2, 2.0)
    truth = ramp_phase(shape, vox) + np.float32(1.0)
    wrapped = wrap(truth)
    assert np.ptp(truth) > 5 * TWO_PI  # many wraps
    out = region_growing_unwrap(wrapped, vox)
    assert out.dtype == np.float32 and out.shape == shape
    k, off = turns(out, truth)
    assert off < 1e-4
    assert np.all(k == k.flat[0])  # exact up to one global multiple of 2 pi
    k_in, off_in = turns(out, wrapped)
    assert off_in < 1e-4  # congruent to the input


def test_magnitude_and_second_echo_do_not_change_a_clean_answer():
    shape, vox = (30, 24, 16), (1.0, 1.0, 1.5)
    truth = ramp_phase(shape, vox)
    rng = np.random.default_rng(0)
    mag = rng.uniform(0.5, 1.0, shape).astype(np.float32)
    out = region_growing_unwrap(
        wrap(truth), vox, magnitude=mag, second_echo_phase=wrap(1.5 * truth), te_ratio=1.5
    )
    k, off = turns(out, truth)
    assert off < 1e-4 and np.all(k == k.flat[0])


def test_two_disconnected_regions_each_exact_outside_unchanged():
    shape, vox = (48, 24, 16), (1.0, 1.0, 1.0)
    truth = ramp_phase(shape, vox)
    wrapped = wrap(truth)
    mask = np.zeros(shape, dtype=bool)
    mask[2:20, 2:22, 2:14] = True
    mask[26:46, 4:20, 3:13] = True  # a 6-voxel gap: no edge joins the two
    out = region_growing_unwrap(wrapped, vox, mask=mask)
    k, off = turns(out, truth)
    assert off < 1e-4
    first, second = k[2:20, 2:22, 2:14], k[26:46, 4:20, 3:13]
    assert np.all(first == first.flat[0]) and np.all(second == second.flat[0])
    # each region keeps its seed's wrapped value (k = 0 there), so the two need not agree
    np.testing.assert_array_equal(out[~mask], wrapped[~mask])


def test_wrong_edges_are_avoided_through_quality():
    """A noisy slab cuts across a ramp; going around it is the only right way."""
    shape, vox = (40, 40, 12), (1.0, 1.0, 1.0)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    truth = (0.8 * x + 0.5 * y + 0.3 * z).astype(np.float32)
    rng = np.random.default_rng(3)
    noisy = truth.copy()
    noisy[18:22, :34] = rng.uniform(-np.pi, np.pi, (4, 34, shape[2]))  # open at y >= 34
    mag = np.ones(shape, dtype=np.float32)
    mag[18:22, :34] = 0.05
    out = region_growing_unwrap(wrap(noisy), vox, magnitude=mag)
    k, _ = turns(out, truth)
    clean = np.ones(shape, dtype=bool)
    clean[18:22, :34] = False
    assert np.all(k[clean] == k[clean].flat[0])


def test_quality_map_of_a_ramp_has_its_closed_form():
    shape, step = (12, 10, 8), 0.6
    x = np.arange(shape[0])[:, None, None] * np.ones(shape)
    phase = wrap(step * x)
    q = romeo_quality_map(phase)
    assert q.dtype == np.float32 and q.shape == shape
    # interior: two x edges of coherence 1 - step/pi, four y/z edges of coherence 1
    expected = (2 * (1 - step / np.pi) + 4) / 6
    np.testing.assert_allclose(q[1:-1, 1:-1, 1:-1], expected, atol=1e-6)
    # a consistent second echo (gradients scale with TE) changes nothing ...
    same = romeo_quality_map(phase, second_echo_phase=wrap(2 * step * x), te_ratio=2.0)
    np.testing.assert_allclose(same, q, atol=1e-6)
    # ... an inconsistent one lowers the quality
    other = romeo_quality_map(phase, second_echo_phase=np.zeros(shape), te_ratio=2.0)
    assert other[1:-1, 1:-1, 1:-1].max() < expected - 0.1
    mask = np.zeros(shape, dtype=bool)
    mask[2:8, 2:8, 2:6] = True
    masked = romeo_quality_map(phase, mask=mask)
    assert np.all(masked[~mask] == 0) and np.all(masked[mask] > 0)


def test_rejects_bad_input():
    good = np.zeros((6, 6, 6), dtype=np.float32)
    bad = good.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        region_growing_unwrap(bad)
    with pytest.raises(ValueError, match="3-D"):
        region_growing_unwrap(good[0])
    with pytest.raises(ValueError, match="te_ratio"):
        region_growing_unwrap(good, second_echo_phase=good)
    with pytest.raises(ValueError, match="shape"):
        region_growing_unwrap(good, magnitude=good[:5])
    with pytest.raises(ValueError, match="shape"):
        romeo_quality_map(good, mask=np.ones((6, 6, 5), bool))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        region_growing_unwrap(good, (1.0, 1.0))

    phase4 = np.zeros((6, 6, 6, 3), dtype=np.float32)
    tes = (0.005, 0.010, 0.015)
    with pytest.raises(ValueError, match="increasing"):
        unwrap_multi_echo(phase4, (1, 1, 1), (0.005, 0.005, 0.015))
    with pytest.raises(ValueError, match="echo times"):
        unwrap_multi_echo(phase4, (1, 1, 1), tes[:2])
    with pytest.raises(ValueError, match="magnitude"):
        unwrap_multi_echo(phase4, (1, 1, 1), tes, magnitude=phase4[..., :2])
    with pytest.raises(ValueError, match="mask"):
        unwrap_multi_echo(phase4, (1, 1, 1), tes, mask=np.ones((6, 6, 5), bool))
    nan4 = phase4.copy()
    nan4[0, 0, 0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        unwrap_multi_echo(nan4, (1, 1, 1), tes)
    with pytest.raises(ValueError, match="two echoes"):
        unwrap_multi_echo(phase4[..., :1], (1, 1, 1), tes[:1], mode="template")
    with pytest.raises(ValueError, match="4-D"):
        unwrap_multi_echo(phase4[..., 0], (1, 1, 1), tes[:1])
    with pytest.raises(ValueError, match="method"):
        unwrap_multi_echo(phase4, (1, 1, 1), tes, method="romeo")
    with pytest.raises(ValueError, match="mode"):
        unwrap_multi_echo(phase4, (1, 1, 1), tes, mode="temporal")
    with pytest.raises(ValueError, match="template_echo"):
        unwrap_multi_echo(phase4, (1, 1, 1), tes, template_echo=3)
    # a single echo is fine where no template is needed
    out = unwrap_multi_echo(phase4[..., :1], (1, 1, 1), tes[:1], mode="individual")
    assert out.shape == (6, 6, 6, 1)


def synthetic_echoes(shape=(36, 30, 20), vox=(1.0, 1.0, 2.0), field_offset_hz=0.0):
    """Multi-echo phase with a smooth offset spanning several turns; truth and wrapped."""
    tes = np.array([0.004, 0.008, 0.012, 0.016])
    axes = [(np.arange(n) - n / 2) * d for n, d in zip(shape, vox, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    offset = 0.25 * x - 0.15 * y + 0.1 * z + 2.0  # ~12 rad across: not echo-proportional
    field_hz = field_offset_hz + 20 * np.sin(x / 6) + 15 * np.cos(y / 7) + 0.8 * z
    truth = (offset[..., None] + TWO_PI * field_hz[..., None] * tes).astype(np.float32)
    return truth, wrap(truth), tes, vox


@pytest.mark.parametrize("template_echo", [0, 2])
def test_template_mode_accounts_for_the_phase_offset(template_echo):
    truth, wrapped, tes, vox = synthetic_echoes()
    out = unwrap_multi_echo(wrapped, vox, tes, template_echo=template_echo)
    k, off = turns(out, truth)
    assert off < 1e-4
    assert np.all(k == k.flat[0])  # every voxel of every echo, one shared multiple of 2 pi
    # the offset matters: scaling the template by TE_e / TE_t alone gets later echoes wrong
    t = template_echo
    naive = wrapped + TWO_PI * np.round(
        (out[..., t : t + 1] * (tes / tes[t]) - wrapped) / TWO_PI
    ).astype(np.float32)
    k_naive, _ = turns(naive, truth)
    wrong = [np.mean(k_naive[..., e] != k.flat[0]) for e in range(4)]
    assert max(wrong) > 0.2  # measured 79 % (template 0) and 21 % (template 2)


def test_template_branch_with_a_strong_field():
    """At 8 ms a 50-140 Hz field wraps everywhere in the template, so its spatial unwrapping
    lands on some 2 pi n; scaled by TE_e / TE_t = 1.5 that would be no whole number of turns,
    so the template must first be put on the branch 2 pi f TE_t."""
    truth, wrapped, tes, vox = synthetic_echoes(field_offset_hz=90.0)
    out = unwrap_multi_echo(wrapped, vox, tes, template_echo=1)
    k, off = turns(out, truth)
    assert off < 1e-4 and np.all(k == k.flat[0])


def test_individual_mode_threads_and_branches():
    truth, wrapped, tes, vox = synthetic_echoes()
    one = unwrap_multi_echo(wrapped, vox, tes, mode="individual", n_threads=1)
    two = unwrap_multi_echo(wrapped, vox, tes, mode="individual", n_threads=2)
    np.testing.assert_array_equal(one, two)
    k, off = turns(one, truth)
    assert off < 1e-4 and np.all(k == k.flat[0])  # all echoes aligned on one branch


def test_laplacian_routes():
    truth, wrapped, tes, vox = synthetic_echoes(shape=(24, 20, 12))
    np.testing.assert_array_equal(
        unwrap_multi_echo(wrapped, vox, tes, method="laplacian", mode="individual"),
        laplacian_unwrap(wrapped, vox),
    )
    np.testing.assert_array_equal(
        unwrap_multi_echo(wrapped, vox, tes, method="laplacian"),
        laplacian_unwrap_echo_differences(wrapped, vox),
    )
    # a later template: the template echo alone, the others through the differences
    out = laplacian_unwrap_echo_differences(wrapped, vox, template_echo=2)
    np.testing.assert_array_equal(out[..., 2], laplacian_unwrap(wrapped[..., 2], vox))
    diff = laplacian_unwrap(wrap(wrapped[..., 2] - wrapped[..., 1]), vox)
    np.testing.assert_allclose(out[..., 1], out[..., 2] - diff, atol=1e-5)


# ------------------------------------------------------------------------------ simulated head
@pytest.fixture(scope="module")
def sim_snr50():
    """2 mm, 4 echoes (5-20 ms, 3 T), SNR 50: noisier than the shared SNR 80 fixture."""
    params = AcquisitionParams(matrix=(88, 104, 80), voxel_size_mm=(2.0, 2.0, 2.0), snr=50)
    return simulate_acquisition(
        make_head_model(0), params, rng=np.random.default_rng(0), n_threads=2
    )


def true_unwrapped(sim):
    hz = GAMMA_BAR_MHZ_PER_T * sim.params.b0_tesla * sim.total_field_ppm
    tes = np.asarray(sim.params.echo_times_s, dtype=np.float64)
    return (sim.phase_offset_rad[..., None] + TWO_PI * hz[..., None] * tes).astype(np.float32)


@pytest.mark.parametrize("mode", ["template", "individual"])
def test_simulated_head_snr50_exact_voxels(sim_snr50, mode):
    sim = sim_snr50
    truth = true_unwrapped(sim)
    vox, tes = sim.params.voxel_size_mm, sim.params.echo_times_s
    out = unwrap_multi_echo(
        sim.phase, vox, tes, magnitude=sim.magnitude, mask=sim.mask, mode=mode, n_threads=2
    )
    fractions = [exact_fraction(out[..., e], truth[..., e], sim.mask) for e in range(4)]
    # measured (template): 100, 100, 100, 100 %; (individual): 100, 100, 99.998, 99.938 %
    assert min(fractions) >= 0.999, fractions
    _, off = turns(out[sim.mask], sim.phase[sim.mask])
    assert off < 1e-4  # congruent
    if mode == "template":
        # no 1 / (2 dTE) limit: voxels whose field exceeds 100 Hz are right too, unlike with
        # echo-to-echo differences from the same template
        hz = GAMMA_BAR_MHZ_PER_T * sim.params.b0_tesla * sim.total_field_ppm
        fast = sim.mask & (np.abs(hz) > 0.5 / (tes[1] - tes[0]))
        chained = temporal_unwrap(sim.phase, out[..., 0], template_echo=0)
        wrong = off_branch(out[..., 3], truth[..., 3], sim.mask)
        wrong_chained = off_branch(chained[..., 3], truth[..., 3], sim.mask)
        # measured: 154 such voxels, 1 wrong (template mode) and 154 wrong (chained)
        assert fast.sum() > 100
        assert wrong[fast].mean() < 0.02
        assert wrong_chained[fast].mean() > 0.5


def test_simulated_head_single_echo_with_quality_map(sim_snr50):
    """One echo unwrapped on its own; the quality map separates brain from background."""
    sim = sim_snr50
    truth = true_unwrapped(sim)[..., 1]
    out = region_growing_unwrap(sim.phase[..., 1], magnitude=sim.magnitude[..., 1], mask=sim.mask)
    assert exact_fraction(out, truth, sim.mask) >= 0.999
    q = romeo_quality_map(sim.phase[..., 1], magnitude=sim.magnitude[..., 1])
    assert 0 <= q.min() and q.max() <= 1
    background = sim.magnitude[..., 0] < 0.1 * np.percentile(sim.magnitude[..., 0], 99)
    assert np.median(q[sim.mask]) > 0.8
    assert np.median(q[background]) < 0.4
