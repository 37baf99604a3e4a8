"""Tests for qsmflow.algorithms.background.lbv (Laplacian boundary value background removal).

Known answers: harmonic polynomials of degree <= 3 are harmonic for the discrete 7-point
Laplacian too, so LBV removes them to rounding whatever the voxel size; fields of dipoles outside
the mask are harmonic up to the O(h^2) error of that Laplacian; the solution agrees with a sparse
direct solve of the same Dirichlet problem assembled here independently; the background it
returns satisfies the discrete Laplace equation; on the simulator's total field the local field
matches the truth to within the accuracy measured for the method.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
from scipy import ndimage

from qsmflow.algorithms.background.lbv import lbv, lbv_interior
from qsmflow.algorithms.dipole import forward_field
from qsmflow.algorithms.masking import erode_mm
from qsmflow.algorithms.metrics import correlation, nrmse_demeaned

CROSS = ndimage.generate_binary_structure(3, 1)


def energy_ratio(residual, reference, roi):
    """Energy of ``residual`` over that of ``reference`` in ``roi``, both demeaned."""
    r = residual[roi] - residual[roi].mean()
    t = reference[roi] - reference[roi].mean()
    return float(np.dot(r, r) / np.dot(t, t))


def grid_mm(shape, vox):
    """Centred world coordinates (mm) of the voxel centres."""
    return np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, vox, strict=True)], indexing="ij"
    )


def ellipsoid_mask(shape, vox, fraction=0.4):
    x, y, z = grid_mm(shape, vox)
    ext = [n * d for n, d in zip(shape, vox, strict=True)]
    mask = (x / (fraction * ext[0])) ** 2 + (y / (fraction * ext[1])) ** 2 + (
        z / (fraction * ext[2])
    ) ** 2 < 1
    mask &= ~((x > 0) & (np.abs(y) < 3))  # a slot, so the domain is not convex
    return mask


def smooth_local(shape, mask, seed):
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * mask).astype(np.float32)


def laplacian_7pt(u, vox):
    """Discrete Laplacian with weights 1/h^2 per axis (valid away from the array border)."""
    out = np.zeros_like(u, dtype=np.float64)
    for axis, h in enumerate(vox):
        out += (np.roll(u, 1, axis) + np.roll(u, -1, axis) - 2.0 * u) / (h * h)
    return out


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.0, 1.25, 2.0), (0.5, 0.5, 2.0)])
def test_harmonic_polynomial_removed_exactly(vox):
    shape = (44, 40, 32)
    x, y, z = grid_mm(shape, vox)
    mask = ellipsoid_mask(shape, vox)
    harmonic = (
        0.3
        + 0.02 * x
        - 0.01 * z
        + 1e-3 * (x * x - y * y)
        + 5e-4 * (y * y - z * z)
        + 2e-3 * x * z
        + 1e-5 * x * y * z
        + 1e-5 * (x**3 - 3 * x * y * y)
    ).astype(np.float32)
    out, roi = lbv(harmonic, mask, vox, erode_mm=0, tol=1e-6)
    # measured 4e-8 of the largest value (float32 rounding)
    assert np.abs(out[roi]).max() < 1e-5 * np.abs(harmonic[mask]).max()
    # with a local field present, the harmonic part still drops out
    local = smooth_local(shape, mask, 1)
    a, _ = lbv(local, mask, vox, erode_mm=0, tol=1e-6)
    b, _ = lbv(local + harmonic, mask, vox, erode_mm=0, tol=1e-6)
    assert np.abs(a - b)[roi].max() < 1e-5 * np.abs(harmonic[mask]).max()
    # the voxel size matters: x^2 - y^2 in mm is not discretely harmonic on the wrong grid
    # (measured 7 % and 14 % of the largest value for the two anisotropic grids)
    if vox[0] != vox[2]:
        wrong, _ = lbv(harmonic, mask, (1.0, 1.0, 1.0), erode_mm=0, tol=1e-6)
        assert np.abs(wrong[roi]).max() > 1e-2 * np.abs(harmonic[mask]).max()


def test_field_of_outside_dipoles_removed():
    # Point dipoles outside the mask give a field that is harmonic inside it; the 7-point
    # Laplacian sees it up to its O(h^2) truncation error, largest next to the nearest dipole.
    shape, vox = (64, 56, 40), (1.0, 1.25, 2.0)
    x, y, z = grid_mm(shape, vox)
    mask = (x / 26) ** 2 + (y / 28) ** 2 + (z / 32) ** 2 < 1
    background = np.zeros(shape)
    for c, moment in (((40.0, 0.0, 10.0), 1e3), ((0.0, -45.0, 30.0), 5e2), ((5, 5, -50), 3e3)):
        rx, ry, rz = x - c[0], y - c[1], z - c[2]
        r2 = rx * rx + ry * ry + rz * rz
        background += moment * (3 * rz * rz / r2 - 1) / r2**1.5
    background = background.astype(np.float32)
    assert mask.sum() > 0.25 * mask.size
    out, roi = lbv(background, mask, vox, erode_mm=0)
    # measured 0.17 % of the background's largest value, 4.9e-6 of its energy
    assert np.abs(out[roi]).max() < 5e-3 * np.abs(background[mask]).max()
    assert energy_ratio(out, background, roi) < 5e-5


@pytest.fixture(scope="module")
def small_problem():
    """A non-convex mask with anisotropic voxels and a rough total field."""
    shape, vox = (34, 30, 26), (1.0, 1.3, 1.8)
    mask = ellipsoid_mask(shape, vox, fraction=0.42)
    mask[20:24, 12:16, 10:14] = False  # a hole
    rng = np.random.default_rng(7)
    x, y, _ = grid_mm(shape, vox)
    total = (ndimage.gaussian_filter(rng.normal(size=shape), 1.0) + 0.05 * x + 1e-3 * x * y).astype(
        np.float32
    )
    return total, mask, vox


def test_matches_sparse_direct_solve(small_problem):
    total, mask, vox = small_problem
    interior = ndimage.binary_erosion(mask, structure=CROSS)
    np.testing.assert_array_equal(lbv_interior(mask), interior)
    # Assemble the Dirichlet problem for the background independently: -lap(b) = 0 on the
    # interior, b = total on the neighbouring (boundary-layer) voxels.
    n = int(interior.sum())
    index = np.full(mask.shape, -1)
    index[interior] = np.arange(n)
    nodes = np.nonzero(interior)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.full(n, sum(2 / h**2 for h in vox))]
    rhs = np.zeros(n)
    for axis, h in enumerate(vox):
        for step in (1, -1):
            nb = list(nodes)
            nb[axis] = nb[axis] + step
            j = index[tuple(nb)]
            inside = j >= 0
            rows.append(np.arange(n)[inside])
            cols.append(j[inside])
            vals.append(np.full(inside.sum(), -1 / h**2))
            rhs[~inside] += total[tuple(nb)][~inside].astype(np.float64) / h**2
    matrix = scipy.sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    background = scipy.sparse.linalg.spsolve(matrix.tocsc(), rhs)
    expected = np.zeros(mask.shape)
    expected[interior] = total[interior] - background

    local, roi = lbv(total, mask, vox, erode_mm=0, tol=1e-7)
    np.testing.assert_array_equal(roi, interior)
    scale = np.abs(expected).max()
    assert np.abs(local - expected).max() < 1e-5 * scale
    # the default tolerance is already close; threads give the same answer
    default, _ = lbv(total, mask, vox, erode_mm=0)
    assert np.abs(default - expected).max() < 1e-2 * scale
    threaded, _ = lbv(total, mask, vox, erode_mm=0, n_threads=2)
    np.testing.assert_array_equal(threaded, default)


def test_background_solves_laplace_equation(small_problem):
    total, mask, vox = small_problem
    for tol in (1e-4, 1e-7):
        local, roi, info = lbv(total, mask, vox, erode_mm=0, tol=tol, return_info=True)
        assert info["converged"] and info["residual"] <= tol
        background = np.where(mask, total.astype(np.float64) - local, 0.0)
        lap_b = laplacian_7pt(background, vox)[roi]
        lap_f = laplacian_7pt(np.where(mask, total, 0).astype(np.float64), vox)[roi]
        # the float32 output adds ~1e-7 relative rounding to the solver's residual
        ratio = np.linalg.norm(lap_b) / np.linalg.norm(lap_f)
        assert ratio <= tol + 1e-6
        assert info["cycles"] <= 12


def test_erosion_moves_the_boundary_inwards(small_problem):
    total, mask, vox = small_problem
    local0, roi0 = lbv(total, mask, vox, erode_mm=0)
    assert local0.dtype == np.float32 and roi0.dtype == bool
    np.testing.assert_array_equal(roi0, ndimage.binary_erosion(mask, CROSS))
    assert not local0[~roi0].any()
    # erode_mm leaves out the voxels within that distance (mm, true voxel sizes) of the
    # outside, then solves on what is left: the boundary values are taken 2.6 mm deep
    region = erode_mm(mask, 2.6, vox)
    local, roi = lbv(total, mask, vox, erode_mm=2.6)
    np.testing.assert_array_equal(roi, ndimage.binary_erosion(region, CROSS))
    expected, _ = lbv(total, region, vox, erode_mm=0)
    np.testing.assert_array_equal(local, expected)
    # which is not the same as masking the solution on the whole mask
    assert np.abs(local - local0)[roi].max() > 0.1 * np.abs(local0[roi]).max()


def test_warns_when_not_converged(small_problem):
    total, mask, vox = small_problem
    with pytest.warns(RuntimeWarning, match="multigrid cycles"):
        _, _, info = lbv(total, mask, vox, erode_mm=0, tol=1e-12, max_cycles=0, return_info=True)
    assert not info["converged"] and info["cycles"] == 1


def test_rejects_bad_input():
    field = np.zeros((12, 12, 12), np.float32)
    mask = np.zeros((12, 12, 12), bool)
    mask[2:-2, 2:-2, 2:-2] = True
    with pytest.raises(ValueError, match="shape"):
        lbv(field, mask[:-1], (1, 1, 1))
    touching = mask.copy()
    touching[0, 5, 5] = True
    with pytest.raises(ValueError, match="border"):
        lbv(field, touching, (1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size"):
        lbv(field, mask, (1, 0, 1))
    bad = field.copy()
    bad[5, 5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lbv(bad, mask, (1, 1, 1))
    with pytest.raises(ValueError, match="tol"):
        lbv(field, mask, (1, 1, 1), tol=0)
    with pytest.raises(ValueError, match="erode_mm"):
        lbv(field, mask, (1, 1, 1), erode_mm=-1)
    thin = np.zeros_like(mask)
    thin[3:9, 3:9, 5:7] = True  # two voxels thick: no interior voxel
    with pytest.raises(ValueError, match="interior"):
        lbv(field, thin, (1, 1, 1), erode_mm=0)
    # an 8-voxel cube has interior voxels, but none once its outer 4 mm are left out
    assert lbv(field, mask, (1, 1, 1), erode_mm=0)[1].any()
    with pytest.raises(ValueError, match="erode_mm=4"):
        lbv(field, mask, (1, 1, 1))


def test_simulated_background_only(sim_2mm):
    """Field of everything outside the brain (forward model of chi outside the mask)."""
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    outside = np.where(sim.mask, 0, sim.chi_ppm - 9.41).astype(np.float32)  # air-referenced
    background = forward_field(outside, vox, sim.b0_dir, n_threads=2)
    local, roi = lbv(background, sim.mask, vox, n_threads=2)
    # measured 0.031 % of the background's energy in the returned mask (the brief asked < 5 %);
    # 0.72 % with the boundary on the mask's edge (erode_mm=0), where the voxelised skull and
    # air next to the mask give a spectral forward field that is not harmonic for the 7-point
    # Laplacian
    assert energy_ratio(local, background, roi) < 3e-3
    local0, roi0 = lbv(background, sim.mask, vox, erode_mm=0, n_threads=2)
    assert energy_ratio(local0, background, roi0) < 0.02


def test_simulated_total_field(sim_2mm):
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    truth = sim.local_field_ppm
    local, roi, info = lbv(sim.total_field_ppm, sim.mask, vox, n_threads=2, return_info=True)
    assert info["converged"] and info["cycles"] <= 8  # measured 3
    np.testing.assert_array_equal(roi, lbv_interior(erode_mm(sim.mask, 4.0, vox)))
    assert 0.70 < roi.sum() / sim.mask.sum() < 0.77  # measured 73.4 %
    # Measured demeaned NRMSE / correlation 31.9 % / 0.948 (29.7 % at 1 mm, 29.4 % at 1.5 mm,
    # 28.7-32.0 % over head models 0-3 at 2 mm); the brief asks < 40 %.
    nrmse = nrmse_demeaned(local, truth, roi)
    assert nrmse < 36
    assert correlation(local, truth, roi) > 0.93
    # Why the default leaves out the outer 4 mm: LBV's error is minus the harmonic extension
    # of the true local field's values on the boundary, and at the brain's edge (veins and
    # sinuses on the surface, grey matter against CSF) the local field is stronger than inside
    # (RMS 0.015 vs 0.011 ppm). With the boundary on the mask's edge the NRMSE is 79.1 %
    # (correlation 0.73; 57 % at 1 mm), and LBV run on the true local field alone already
    # loses 69.1 % of it, against 29.7 % with the default.
    edge, roi0 = lbv(sim.total_field_ppm, sim.mask, vox, erode_mm=0, n_threads=2)
    np.testing.assert_array_equal(roi0, lbv_interior(sim.mask))
    assert nrmse_demeaned(edge, truth, roi0) > 70
    alone, roi0 = lbv(truth, sim.mask, vox, erode_mm=0, n_threads=2)
    assert nrmse_demeaned(alone, truth, roi0) > 60
    alone, roi = lbv(truth, sim.mask, vox, n_threads=2)
    assert nrmse_demeaned(alone, truth, roi) < 34
    # far from the boundary the harmonic error has decayed: measured 21.2 % deeper than 12 mm,
    # 12.3 % deeper than 24 mm
    depth = ndimage.distance_transform_edt(sim.mask, sampling=vox)
    assert nrmse_demeaned(local, truth, roi & (depth > 12)) < 25
    assert nrmse_demeaned(local, truth, roi & (depth > 24)) < 16
