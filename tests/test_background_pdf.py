"""Tests for qsmflow.algorithms.background.pdf (projection onto dipole fields).

Known answers: the field of sources outside the mask is removed (to a small leftover that grows
clearly when the B0 direction or the voxel size given to the method is wrong); weights exclude
corrupt voxels from the fit; on the simulator's total field the local field matches the true
local field to within the accuracy measured for the method; bad input raises ValueError.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.algorithms.background.pdf import noise_weights, pdf
from qsmflow.algorithms.dipole import forward_field
from qsmflow.algorithms.echoes import fit_field
from qsmflow.algorithms.masking import erode_mm
from qsmflow.algorithms.metrics import correlation, nrmse_demeaned


def energy_ratio(residual, reference, roi):
    """Energy of ``residual`` over that of ``reference`` in ``roi``, both demeaned."""
    r = residual[roi] - residual[roi].mean()
    t = reference[roi] - reference[roi].mean()
    return float(np.dot(r, r) / np.dot(t, t))


VOX = (1.0, 1.25, 2.0)
B0 = np.array((0.5, -0.3, 1.0)) / np.linalg.norm((0.5, -0.3, 1.0))  # 30 degrees off z


@pytest.fixture(scope="module")
def outside_sources():
    """Ellipsoidal mask (anisotropic voxels) and the field of smooth sources outside it."""
    shape = (64, 56, 48)
    x, y, z = np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, VOX, strict=True)], indexing="ij"
    )
    mask = (x / 22) ** 2 + (y / 20) ** 2 + (z / 24) ** 2 < 1
    chi = np.zeros(shape, np.float32)
    for c, radius, val in (
        ((29, 0, 0), 6.0, 9.0),
        ((-10, 25, 5), 5.0, -2.0),
        ((0, -8, 32), 6.0, 1.0),
        ((5, 5, -34), 7.0, 4.0),
    ):
        r2 = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / radius**2
        chi += (val * np.clip(1 - r2, 0, None) ** 3).astype(np.float32)
    assert not chi[mask].any()
    return mask, forward_field(chi, VOX, B0), (x, y, z)


@pytest.mark.parametrize("n_levels", [0, 1])
def test_field_of_outside_sources_removed(outside_sources, n_levels):
    mask, background, _ = outside_sources
    local, roi = pdf(background, mask, VOX, B0, n_levels=n_levels, max_iter=50, erode_mm=0)
    assert local.dtype == np.float32 and roi.dtype == bool
    np.testing.assert_array_equal(roi, mask)  # erode_mm=0: the whole mask is returned
    assert not local[~roi].any()
    # measured 7.5e-5 / 7.4e-5 (0 / 1 coarse levels) of the background's energy
    leak = energy_ratio(local, background, roi)
    assert leak < 5e-4
    # A kernel with the wrong B0 direction (z instead of 30 degrees off it) or with isotropic
    # voxels fits the field clearly worse: measured 7.5e-4 / 6.6e-4 and 3.1e-2.
    wrong_b0, _ = pdf(background, mask, VOX, (0, 0, 1), n_levels=n_levels, max_iter=50, erode_mm=0)
    assert energy_ratio(wrong_b0, background, roi) > 5 * leak
    wrong_vox, _ = pdf(background, mask, (1, 1, 1), B0, n_levels=n_levels, max_iter=50, erode_mm=0)
    assert energy_ratio(wrong_vox, background, roi) > 100 * leak


def test_weights_exclude_corrupt_voxels(outside_sources):
    mask, background, (x, y, z) = outside_sources
    # an unwrapping-like error: a large offset on a patch at the edge of the mask
    corrupt = mask & (x > 12) & (np.abs(y) < 6) & (np.abs(z) < 8)
    bad = background + np.where(corrupt, np.abs(background[mask]).max(), 0).astype(np.float32)
    clean = mask & ~corrupt
    uniform, _ = pdf(bad, mask, VOX, B0, max_iter=50, erode_mm=0)
    weights = (~corrupt).astype(np.float32)
    weighted, _ = pdf(bad, mask, VOX, B0, weights=weights, max_iter=50, erode_mm=0)
    # measured 0.48 (the fit bends towards the error) and 1.8e-4 of the background's energy
    assert energy_ratio(uniform, background, clean) > 0.05
    assert energy_ratio(weighted, background, clean) < 5e-4
    # only relative weights matter
    scaled, _ = pdf(background, mask, VOX, B0, weights=np.full(mask.shape, 3.0), max_iter=20)
    plain, _ = pdf(background, mask, VOX, B0, max_iter=20)
    np.testing.assert_allclose(scaled, plain, rtol=0, atol=1e-6 * np.abs(plain).max())


def test_result_depends_only_on_the_mask_region(outside_sources):
    # The sources live on a grid around the mask's bounding box, so the field of view (here
    # cut to one voxel around the mask) does not matter.
    mask, background, _ = outside_sources
    idx = np.nonzero(mask)
    box = tuple(slice(int(i.min()) - 1, int(i.max()) + 2) for i in idx)
    big, big_roi = pdf(background, mask, VOX, B0, max_iter=10)
    small, small_roi = pdf(background[box], mask[box], VOX, B0, max_iter=10)
    np.testing.assert_array_equal(big[box], small)
    np.testing.assert_array_equal(big_roi[box], small_roi)
    # the default returns the mask without its outer 4 mm (the erosion of the SMV methods)
    np.testing.assert_array_equal(big_roi, erode_mm(mask, 4.0, VOX))
    assert not big[~big_roi].any() and big[big_roi].any()


def test_simulated_background_only(sim_2mm):
    """Field of everything outside the brain (forward model of chi outside the mask)."""
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    outside = np.where(sim.mask, 0, sim.chi_ppm - 9.41).astype(np.float32)  # air-referenced
    background = forward_field(outside, vox, sim.b0_dir, n_threads=2)
    # A field without local part never meets the relative stopping rule; max_iter bounds it.
    local, roi = pdf(background, sim.mask, vox, sim.b0_dir, max_iter=30, n_threads=2)
    # measured 2.9e-5 of the background's energy left in the returned mask (7.1e-5 in the
    # whole mask with erode_mm=0); the brief asked < 5 %
    assert energy_ratio(local, background, roi) < 1e-3


def test_simulated_total_field(sim_2mm):
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    truth = sim.local_field_ppm
    local, roi = pdf(sim.total_field_ppm, sim.mask, vox, sim.b0_dir, n_threads=2)
    assert local.dtype == np.float32 and roi.dtype == bool
    np.testing.assert_array_equal(roi, erode_mm(sim.mask, 4.0, vox))
    assert not local[~roi].any()
    assert 0.78 < roi.sum() / sim.mask.sum() < 0.85  # measured 81.6 %
    # Measured demeaned NRMSE / correlation 33.2 % / 0.943 (a 4 mm coarse level); 32.4 % at
    # 1 mm (200 x 200 x 160), 33.0 % at 1.5 mm, 32.2-35.0 % over head models 0-3 at 2 mm. The
    # brief asks < 40 %.
    nrmse = nrmse_demeaned(local, truth, roi)
    assert nrmse < 37
    assert correlation(local, truth, roi) > 0.92
    # Why the outer 4 mm are not returned: there the sources just outside the mask absorb the
    # local field, which is strongest at the brain's edge (veins, grey matter against CSF).
    # The whole mask (erode_mm=0, the same fit) scores 49.7 % / 0.868, and PDF run on the
    # true local field alone already loses 49.4 % of it there. The fit itself is good: the
    # background alone is removed to 7e-5 of its energy (test above).
    whole, roi0 = pdf(sim.total_field_ppm, sim.mask, vox, sim.b0_dir, erode_mm=0, n_threads=2)
    np.testing.assert_array_equal(roi0, sim.mask)
    np.testing.assert_array_equal(whole[roi], local[roi])
    assert nrmse_demeaned(whole, truth, roi0) > 45
    alone, _ = pdf(truth, sim.mask, vox, sim.b0_dir, erode_mm=0, n_threads=2)
    assert nrmse_demeaned(alone, truth, roi0) > 45
    # The stopping rule matters little near its default (measured 36.2 % with tol=0.01, 34.4 %
    # with tol=0.1); stopping far too early leaves background: 152 % after 2 iterations.
    early, _ = pdf(
        sim.total_field_ppm, sim.mask, vox, sim.b0_dir, max_iter=2, n_levels=0, n_threads=2
    )
    assert nrmse_demeaned(early, truth, roi) > 80


def test_noise_weights():
    mask = np.zeros((6, 5, 4), bool)
    mask[1:5, 1:4, 1:3] = True
    sd = np.full(mask.shape, 2.0, np.float32)
    sd[1, 1, 1] = 0.0  # no fit there
    sd[2, 1, 1] = np.nan
    sd[3, 1, 1] = 1e-6  # raised to the floor, 1 % of the median
    sd[4, 1, 1] = 4.0
    w = noise_weights(sd, mask)
    assert w.dtype == np.float32 and not w[~mask].any()
    assert w[1, 1, 1] == 0 and w[2, 1, 1] == 0
    assert w[3, 1, 1] == pytest.approx(1 / 0.02)
    assert w[4, 1, 1] == pytest.approx(0.25) and w[2, 2, 2] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        noise_weights(sd[:-1], mask)
    with pytest.raises(ValueError, match="zero or not finite"):
        noise_weights(np.zeros_like(sd), mask)


def test_noise_weights_on_a_fitted_field(sim_2mm):
    """The published weighting (1 / noise SD of the field) on a field fitted from noisy echoes."""
    sim = sim_2mm
    p = sim.params
    tes = np.asarray(p.echo_times_s, np.float32)
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * p.b0_tesla
    clean = sim.phase_offset_rad[..., None] + np.float32(2 * np.pi * hz_per_ppm) * (
        tes * sim.total_field_ppm[..., None]
    )
    unwrapped = clean + np.angle(np.exp(1j * (sim.phase - clean)))  # oracle unwrapping
    fit = fit_field(unwrapped, sim.magnitude, tes, b0_tesla=p.b0_tesla, mask=sim.mask)
    vox, truth = p.voxel_size_mm, sim.local_field_ppm
    plain, roi = pdf(fit.field_ppm, sim.mask, vox, sim.b0_dir, n_threads=2)
    weights = noise_weights(fit.field_sd_ppm, sim.mask)
    weighted, _ = pdf(fit.field_ppm, sim.mask, vox, sim.b0_dir, weights=weights, n_threads=2)
    # measured 37.0 % unweighted, 35.7 % weighted (33.2 % from the noise-free total field)
    assert nrmse_demeaned(weighted, truth, roi) < nrmse_demeaned(plain, truth, roi) - 0.5
    assert nrmse_demeaned(weighted, truth, roi) < 38


def test_rejects_bad_input():
    field = np.zeros((12, 12, 12), np.float32)
    mask = np.zeros((12, 12, 12), bool)
    mask[3:9, 3:9, 3:9] = True
    edge = mask.copy()
    edge[0, 5, 5] = True
    nan_field = field.copy()
    nan_field[5, 5, 5] = np.nan
    bad_calls = [
        dict(total_field_ppm=field, mask=mask[:-1]),  # shape mismatch
        dict(total_field_ppm=field[..., None], mask=mask[..., None]),  # 4-D
        dict(total_field_ppm=field, mask=np.zeros_like(mask)),  # empty mask
        dict(total_field_ppm=field, mask=edge),  # mask touches the border
        dict(total_field_ppm=nan_field, mask=mask),  # NaN inside the mask
        dict(total_field_ppm=field, mask=mask, voxel_size_mm=(1, 1)),
        dict(total_field_ppm=field, mask=mask, voxel_size_mm=(1, 0, 1)),
        dict(total_field_ppm=field, mask=mask, b0_dir=(0, 1)),  # wrong B0 shape
        dict(total_field_ppm=field, mask=mask, b0_dir=(0, 0, 0)),
        dict(total_field_ppm=field, mask=mask, b0_dir=(0, np.nan, 1)),
        dict(total_field_ppm=field, mask=mask, weights=np.ones((12, 12))),
        dict(total_field_ppm=field, mask=mask, weights=-np.ones((12, 12, 12))),
        dict(total_field_ppm=field, mask=mask, weights=np.zeros((12, 12, 12))),
        dict(total_field_ppm=field, mask=mask, tol=0.0),
        dict(total_field_ppm=field, mask=mask, tol=1.5),
        dict(total_field_ppm=field, mask=mask, max_iter=0),
        dict(total_field_ppm=field, mask=mask, pad_factor=0.5),
        dict(total_field_ppm=field, mask=mask, n_levels=-1),
        dict(total_field_ppm=field, mask=mask, erode_mm=-1.0),
    ]
    for kwargs in bad_calls:
        kwargs.setdefault("voxel_size_mm", (1, 1, 1))
        with pytest.raises(ValueError):
            pdf(**kwargs)
    # a 6-voxel cube has no voxel deeper than 4 mm
    with pytest.raises(ValueError, match="erode_mm=4"):
        pdf(field, mask, (1, 1, 1))
    # a field that is zero in the mask has no background to fit
    local, roi = pdf(field, mask, (1, 1, 1), erode_mm=0)
    assert not local.any() and np.array_equal(roi, mask)
