"""Tests for qsmflow.algorithms.background.smv (SHARP, V-SHARP).

Known answers: harmonic fields (polynomials, fields of sources outside the mask) are removed;
the returned mask is the mask eroded by the smallest sphere; on the simulator's total field the
local field matches the true local field to within the accuracy measured for the method.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qsmflow.algorithms.background import default_radii_mm, sharp, smv_kernel, vsharp
from qsmflow.algorithms.dipole import forward_field
from qsmflow.algorithms.metrics import correlation, nrmse_demeaned


def energy_ratio(residual, reference, roi):
    """Energy of ``residual`` over that of ``reference`` in ``roi``, both demeaned."""
    r = residual[roi] - residual[roi].mean()
    t = reference[roi] - reference[roi].mean()
    return float(np.dot(r, r) / np.dot(t, t))


def test_default_radii():
    np.testing.assert_allclose(default_radii_mm((2, 2, 2)), [12, 10, 8, 6, 4, 2])
    np.testing.assert_allclose(default_radii_mm((1, 1, 1))[[0, -1]], [12, 1])
    assert len(default_radii_mm((1, 1, 1))) == 12
    np.testing.assert_allclose(default_radii_mm((0.9, 0.9, 2.5)), [12.5, 10, 7.5, 5, 2.5])


def test_smv_kernel_is_a_normalised_sphere():
    shape, vox = (32, 30, 20), (1.0, 1.5, 2.0)
    spec, count = smv_kernel(shape, vox, 4.0)
    # 1 + 2*2 + 2*2 (axes) + in-plane and oblique neighbours within 4 mm, counted directly
    offsets = np.array(np.meshgrid(*[np.arange(-5, 6)] * 3, indexing="ij")).reshape(3, -1).T
    expected = int(np.sum(np.sum((offsets * vox) ** 2, axis=1) <= 16.0))
    assert count == expected
    assert spec[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    kernel = np.fft.irfftn(spec, s=shape, axes=(0, 1, 2))
    assert kernel.min() > -1e-6
    assert np.count_nonzero(kernel > 0.5 / count) == count


def test_returned_mask_is_eroded_by_smallest_sphere():
    shape, vox = (40, 36, 30), (1.0, 1.0, 1.5)
    x, y, z = np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, vox, strict=True)], indexing="ij"
    )
    mask = (x / 15) ** 2 + (y / 13) ** 2 + (z / 17) ** 2 < 1
    mask[20:23, 10:14, 5:8] = False  # a notch
    field = np.zeros(shape, np.float32)
    for radii in ([3.0], [6.0, 4.5, 3.0]):
        _, eroded = vsharp(field, mask, vox, radii_mm=radii)
        h = [int(3.0 / d) for d in vox]
        grid = np.meshgrid(
            *[np.arange(-k, k + 1) * d for k, d in zip(h, vox, strict=True)], indexing="ij"
        )
        ball = sum(g * g for g in grid) <= 9.0 + 1e-9
        expected = ndimage.binary_erosion(mask, structure=ball, border_value=0)
        np.testing.assert_array_equal(eroded, expected)


def test_polynomial_harmonic_background_removed():
    # Linear and quadratic harmonic polynomials keep their mean value on a symmetric sphere of
    # cubic voxels, so SHARP/V-SHARP remove them to rounding.
    shape, vox = (48, 48, 40), (1.5, 1.5, 1.5)
    x, y, z = np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, vox, strict=True)], indexing="ij"
    )
    mask = (x / 30) ** 2 + (y / 28) ** 2 + (z / 25) ** 2 < 1
    rng = np.random.default_rng(3)
    local = ndimage.gaussian_filter(rng.normal(size=shape), 2).astype(np.float32)
    local *= mask
    harmonic = (0.3 + 0.02 * x - 0.01 * z + 1e-3 * (x * x - y * y) + 2e-3 * x * z).astype(
        np.float32
    )
    a, m = vsharp(local, mask, vox)
    b, _ = vsharp(local + harmonic, mask, vox)
    assert np.abs(a - b)[m].max() < 1e-4 * np.abs(harmonic).max()


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.0, 1.25, 2.0)])
def test_field_of_outside_sources_removed(vox):
    shape = (64, 56, 60)
    x, y, z = np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, vox, strict=True)], indexing="ij"
    )
    mask = (x / 22) ** 2 + (y / 20) ** 2 + (z / 24) ** 2 < 1
    # smooth, compactly supported sources outside the mask (a sharp-edged voxelised source
    # rings under the spectral forward model and puts small sources inside the mask)
    chi = np.zeros(shape, np.float32)
    for c, radius, val in (
        ((29, 0, 0), 6.0, 9.0),
        ((-10, 25, 5), 5.0, -2.0),
        ((0, -8, 32), 6.0, 1.0),
    ):
        r2 = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / radius**2
        chi += (val * np.clip(1 - r2, 0, None) ** 3).astype(np.float32)
    assert not chi[mask].any()
    b0 = (0.2, 0.1, 1.0)
    background = forward_field(chi, vox, b0)
    rng = np.random.default_rng(4)
    local_chi = ndimage.gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32) * mask
    local = forward_field(local_chi * 0.5, vox, b0)
    out_bg, roi = vsharp(background, mask, vox)
    # measured 3.8e-4 (iso) and 1.1e-3 (aniso) of the background's own energy
    leak = energy_ratio(out_bg, background, roi)
    assert leak < 5e-3
    out_total, _ = vsharp(local + background, mask, vox)
    out_local, _ = vsharp(local, mask, vox)
    # measured 2.1e-4 and 5.1e-4 of the local field's energy
    assert energy_ratio(out_total - out_local, local, roi) < 3e-3
    # spheres built from the wrong (isotropic) voxel size are ellipsoids in mm, over which
    # harmonic fields do not average to their centre value: measured 4.5e-2, 40x worse
    if vox[2] != vox[0]:
        wrong, _ = vsharp(background, mask, (1.0, 1.0, 1.0), radii_mm=default_radii_mm(vox))
        assert energy_ratio(wrong, background, roi) > 10 * leak


def test_sharp_is_vsharp_with_one_radius():
    rng = np.random.default_rng(5)
    shape, vox = (30, 28, 26), (1.0, 1.0, 1.2)
    field = rng.normal(size=shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[4:-4, 5:-5, 4:-4] = True
    a, ma = sharp(field, mask, vox, radius_mm=3.0, threshold=0.1)
    b, mb = vsharp(field, mask, vox, radii_mm=[3.0], threshold=0.1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert a.dtype == np.float32 and not a[~ma].any()


def test_rejects_bad_input():
    field = np.zeros((10, 10, 10), np.float32)
    mask = np.ones((10, 10, 10), bool)
    with pytest.raises(ValueError):
        vsharp(field, mask[:-1], (1, 1, 1))
    with pytest.raises(ValueError):
        vsharp(field, mask, (1, 1, 1), radii_mm=[0.5])  # a one-voxel "sphere"
    with pytest.raises(ValueError):
        vsharp(field, mask, (1, 1, 1), threshold=1.5)


def test_simulated_background_only(sim_2mm):
    """Field of everything outside the brain (forward model of chi outside the mask)."""
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    outside = np.where(sim.mask, 0, sim.chi_ppm - 9.41).astype(np.float32)  # air-referenced
    background = forward_field(outside, vox, sim.b0_dir, n_threads=2)
    local, roi = vsharp(background, sim.mask, vox, n_threads=2)
    # measured 0.16 % of the background's energy in the returned mask (the brief asked < 5 %)
    assert energy_ratio(local, background, roi) < 0.01


def test_simulated_total_field(sim_2mm):
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    truth = sim.local_field_ppm
    results = {}
    for name, radii in (("default", None), ("10-6", (10.0, 6.0)), ("6", (6.0,))):
        local, roi = vsharp(sim.total_field_ppm, sim.mask, vox, radii_mm=radii, n_threads=2)
        assert local.dtype == np.float32 and roi.dtype == bool and not local[~roi].any()
        results[name] = (nrmse_demeaned(local, truth, roi), correlation(local, truth, roi), roi)
    # Measured demeaned NRMSE / correlation: default radii (12 mm down to 2 mm, 91 % of the
    # brain kept) 50.8 % / 0.86; radii 10, 6 mm (71 % kept) 29.9 % / 0.955; SHARP 6 mm (same
    # mask) 37.5 % / 0.93. The error sits in the outer 2-4 mm of the brain, where small spheres
    # see little of the local field; deeper than 12 mm it is 17 %.
    nrmse, corr, roi = results["default"]
    assert nrmse < 55 and corr > 0.8
    assert roi.sum() > 0.88 * sim.mask.sum()
    nrmse, corr, roi = results["10-6"]
    assert nrmse < 35 and corr > 0.93
    # V-SHARP beats SHARP with its smallest sphere on the same voxels
    np.testing.assert_array_equal(roi, results["6"][2])
    assert nrmse < results["6"][0] - 3
    core = ndimage.binary_erosion(sim.mask, structure=np.ones((3, 3, 3)), iterations=6)
    local, roi = vsharp(sim.total_field_ppm, sim.mask, vox, n_threads=2)
    assert nrmse_demeaned(local, truth, roi & core) < 22
