"""Tests for qsmflow.algorithms.background.smv (SHARP, V-SHARP, RESHARP, iSMV).

Known answers: harmonic fields (polynomials, fields of sources outside the mask) are removed;
the returned mask is the mask eroded by the (smallest) sphere; RESHARP and iSMV match a dense
linear-algebra solution of their equations on a small grid; on the simulator's total field the
local field matches the true local field to within the accuracy measured for each method.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from scipy import ndimage

from qsmflow.algorithms.background import (
    default_radii_mm,
    ismv,
    resharp,
    sharp,
    smv_kernel,
    vsharp,
)
from qsmflow.algorithms.background.smv import _sphere_offsets
from qsmflow.algorithms.dipole import forward_field
from qsmflow.algorithms.metrics import correlation, nrmse_demeaned
from qsmflow.algorithms.regularization import lcurve_corner

#: The methods that take one sphere radius, and all four.
ONE_RADIUS = {"sharp": sharp, "resharp": resharp, "ismv": ismv}
METHODS = {**ONE_RADIUS, "vsharp": vsharp}


def energy_ratio(residual, reference, roi):
    """Energy of ``residual`` over that of ``reference`` in ``roi``, both demeaned."""
    r = residual[roi] - residual[roi].mean()
    t = reference[roi] - reference[roi].mean()
    return float(np.dot(r, r) / np.dot(t, t))


def ellipsoid(shape, vox, semi_axes_mm):
    x, y, z = np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, vox, strict=True)], indexing="ij"
    )
    a, b, c = semi_axes_mm
    return (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 < 1, (x, y, z)


def ball(radius_mm, vox):
    h = [int(radius_mm / d) for d in vox]
    grid = np.meshgrid(
        *[np.arange(-k, k + 1) * d for k, d in zip(h, vox, strict=True)], indexing="ij"
    )
    return sum(g * g for g in grid) <= radius_mm**2 * (1 + 1e-9)


def test_default_radii():
    # 12 down to 6 mm in 2 mm steps, whatever the resolution up to 2 mm
    for vox in ((2, 2, 2), (1, 1, 1), (0.5, 0.5, 0.5), (1.0, 1.0, 1.2)):
        np.testing.assert_allclose(default_radii_mm(vox), [12, 10, 8, 6])
    # coarse voxels: the smallest sphere is >= 2 voxels and consecutive spheres a voxel apart
    np.testing.assert_allclose(default_radii_mm((0.9, 0.9, 2.5)), [11, 8.5, 6])
    np.testing.assert_allclose(default_radii_mm((4, 4, 4)), [12, 8])
    np.testing.assert_allclose(default_radii_mm((7, 7, 7)), [14])
    np.testing.assert_allclose(
        default_radii_mm((1, 1, 1), min_radius_mm=2, step_mm=1), range(12, 1, -1)
    )


@pytest.mark.parametrize(
    ("shape", "vox", "radius"),
    [((32, 30, 20), (1.0, 1.5, 2.0), 4.0), ((41, 36, 33), (1.0, 1.0, 1.0), 12.0)],
)
def test_smv_kernel_is_the_dft_of_a_normalised_sphere(shape, vox, radius):
    spec, count = smv_kernel(shape, vox, radius)
    # the voxels within the radius, counted directly
    h = [int(radius / d) + 1 for d in vox]
    offsets = (
        np.array(np.meshgrid(*[np.arange(-k, k + 1) for k in h], indexing="ij")).reshape(3, -1).T
    )
    expected = int(np.sum(np.sum((offsets * vox) ** 2, axis=1) <= radius**2))
    assert count == expected
    assert spec.dtype == np.float32 and spec.shape == (*shape[:2], shape[2] // 2 + 1)
    assert spec[0, 0, 0] == pytest.approx(1.0, abs=1e-6)
    # the cosine sums equal the FFT of the sphere placed at the origin
    sphere = np.zeros(shape)
    sphere[_sphere_offsets(radius, vox)] = 1.0 / count
    np.testing.assert_allclose(spec, scipy.fft.rfftn(sphere).real, atol=3e-7)
    with pytest.raises(ValueError, match="does not fit"):
        smv_kernel((20, 20, 20), (1, 1, 1), 10.0)


@pytest.mark.parametrize("method", ["vsharp", "resharp", "ismv"])
def test_returned_mask_is_eroded_by_smallest_sphere(method):
    shape, vox = (40, 36, 30), (1.0, 1.0, 1.5)
    mask, _ = ellipsoid(shape, vox, (15, 13, 17))
    mask[20:23, 10:14, 5:8] = False  # a notch
    field = np.zeros(shape, np.float32)
    options = (
        [{"radii_mm": [3.0]}, {"radii_mm": [6.0, 4.5, 3.0]}]
        if method == "vsharp"
        else [{"radius_mm": 3.0}]
    )
    expected = ndimage.binary_erosion(mask, structure=ball(3.0, vox), border_value=0)
    for kwargs in options:
        local, eroded = METHODS[method](field, mask, vox, **kwargs)
        np.testing.assert_array_equal(eroded, expected)
        assert local.dtype == np.float32 and not local.any()


@pytest.mark.parametrize("method", ["vsharp", "resharp", "ismv"])
def test_polynomial_harmonic_background_removed(method):
    # Linear and quadratic harmonic polynomials keep their mean value on a symmetric sphere of
    # cubic voxels, so every SMV method removes them up to rounding and solver tolerance.
    shape, vox = (48, 48, 40), (1.5, 1.5, 1.5)
    mask, (x, y, z) = ellipsoid(shape, vox, (30, 28, 25))
    rng = np.random.default_rng(3)
    local = ndimage.gaussian_filter(rng.normal(size=shape), 2).astype(np.float32)
    local *= mask
    harmonic = (0.3 + 0.02 * x - 0.01 * z + 1e-3 * (x * x - y * y) + 2e-3 * x * z).astype(
        np.float32
    )
    # tight tolerances, so that the iterative solvers stop at the same solution for both inputs
    kwargs = {} if method == "vsharp" else {"tol": 1e-6}
    func = METHODS[method]
    a, m = func(local, mask, vox, **kwargs)
    b, _ = func(local + harmonic, mask, vox, **kwargs)
    # measured max |a - b| / max |harmonic|: V-SHARP 7.5e-8, RESHARP 5.6e-7, iSMV 2.8e-7
    # (with the default tolerance 1e-4 the solver paths differ: 1.1e-4 and 2.7e-5)
    assert np.abs(a - b)[m].max() < 1e-5 * np.abs(harmonic).max()


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (1.0, 1.25, 2.0)])
def test_field_of_outside_sources_removed(vox):
    shape = (64, 56, 60)
    mask, (x, y, z) = ellipsoid(shape, vox, (22, 20, 24))
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
    # V-SHARP with its default radii (this small mask keeps 40 %); RESHARP and iSMV with 3 mm
    # spheres (65-69 % kept). Measured leaks (iso / aniso) of the background's own energy:
    # V-SHARP 1.9e-3 / 2.0e-3, RESHARP 7.7e-4 / 8.7e-4, iSMV 7.9e-4 / 1.1e-3; and of the local
    # field's energy from the background (linearity): 2-4e-4 for all.
    for name, kwargs in (
        ("vsharp", {}),
        ("resharp", {"radius_mm": 3.0}),
        ("ismv", {"radius_mm": 3.0}),
    ):
        func = METHODS[name]
        out_bg, roi = func(background, mask, vox, **kwargs)
        leak = energy_ratio(out_bg, background, roi)
        assert leak < 5e-3, name
        out_total, _ = func(local + background, mask, vox, **kwargs)
        out_local, _ = func(local, mask, vox, **kwargs)
        assert energy_ratio(out_total - out_local, local, roi) < 2e-3, name
        # spheres built from the wrong (isotropic) voxel size are ellipsoids in mm, over which
        # harmonic fields do not average to their centre value: measured 0.07-0.15, 50-130x
        # worse
        if vox[2] != vox[0]:
            if name == "vsharp":
                kwargs = {"radii_mm": default_radii_mm(vox)}
            wrong, _ = func(background, mask, (1.0, 1.0, 1.0), **kwargs)
            assert energy_ratio(wrong, background, roi) > 10 * leak, name


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


def _small_problem(seed):
    """A 12^3 grid with an ellipsoidal mask, a random field and 2-voxel spheres."""
    rng = np.random.default_rng(seed)
    shape, vox = (12, 13, 11), (1.0, 1.0, 1.0)
    mask, _ = ellipsoid(shape, vox, (5.0, 5.5, 4.5))
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.0).astype(np.float32)
    field += rng.normal(scale=0.1, size=shape).astype(np.float32)
    n = mask.size
    # the SMV as a dense matrix built from the sphere's offsets (linear convolution, zeros
    # outside the grid), independent of the FFTs under test
    offsets = np.stack(_sphere_offsets(2.0, vox), axis=1)
    idx = np.arange(n).reshape(shape)
    smv = np.zeros((n, n))
    for o in offsets:
        src = tuple(slice(max(0, -k), s - max(0, k)) for k, s in zip(o, shape, strict=True))
        dst = tuple(slice(max(0, k), s - max(0, -k)) for k, s in zip(o, shape, strict=True))
        smv[idx[dst].ravel(), idx[src].ravel()] += 1.0 / len(offsets)
    eroded = ndimage.binary_erosion(mask, structure=ball(2.0, vox), border_value=0)
    return field, mask, vox, smv, eroded


def test_resharp_matches_dense_tikhonov_solution():
    field, mask, vox, smv, eroded = _small_problem(6)
    lam = 1e-2
    mc = (np.eye(smv.shape[0]) - smv)[eroded.ravel()]  # M C: the rows of the eroded mask
    f = np.where(mask, field, 0).ravel().astype(float)
    a = mc.T @ mc + lam * np.eye(len(f))
    expected = np.linalg.solve(a, mc.T @ (mc @ f)).reshape(field.shape)
    local, roi = resharp(field, mask, vox, radius_mm=2.0, lambda_=lam, tol=1e-6)
    np.testing.assert_array_equal(roi, eroded)
    err = np.abs(local - expected)[roi].max() / np.abs(expected[roi]).max()
    assert err < 5e-5  # measured 6.4e-6 (8e-4 with the default tol 1e-4)


def test_ismv_matches_dense_solution_and_published_iteration():
    field, mask, vox, smv, eroded = _small_problem(7)
    e = eroded.ravel()
    shell = (mask & ~eroded).ravel()
    f = np.where(mask, field, 0).ravel().astype(float)
    # background on E: b = S (b + shell f) restricted to E
    s_ee = smv[np.ix_(e, e)]
    b = np.linalg.solve(np.eye(e.sum()) - s_ee, smv[np.ix_(e, shell)] @ f[shell])
    expected = np.zeros(field.size)
    expected[e] = f[e] - b
    expected = expected.reshape(field.shape)
    scale = np.abs(expected).max()
    for solver, kwargs in (("cg", {"tol": 1e-6}), ("fixed_point", {"tol": 1e-6, "max_iter": 2000})):
        local, roi = ismv(field, mask, vox, radius_mm=2.0, solver=solver, **kwargs)
        np.testing.assert_array_equal(roi, eroded)
        # measured 1.5e-7 (CG) and 4.1e-7 (fixed point)
        assert np.abs(local - expected).max() < 1e-4 * scale, solver
    # the published iteration stopped early has not converged yet: measured 6.1e-2
    early, _ = ismv(field, mask, vox, radius_mm=2.0, solver="fixed_point", max_iter=2)
    assert np.abs(early - expected).max() > 1e-2 * scale


def test_lcurve_corner_of_a_tikhonov_problem():
    # A diagonal problem with singular values 1 .. 1e-4, a smooth solution and noise of 1e-3:
    # too little damping amplifies the noise, too much loses the solution; the corner lies in
    # between.
    rng = np.random.default_rng(8)
    sv = np.logspace(0, -4, 200)
    truth = np.sqrt(sv)
    data = sv * truth + 1e-3 * rng.normal(size=sv.size)
    lambdas = np.logspace(-8, 0, 33)[::-1]
    solutions = [sv * data / (sv**2 + lam) for lam in lambdas]
    misfit = np.array([np.linalg.norm(sv * x - data) for x in solutions])
    norm = np.array([np.linalg.norm(x) for x in solutions])
    err = np.array([np.linalg.norm(x - truth) for x in solutions])
    corner = lcurve_corner(lambdas, misfit, norm)
    # measured: corner 5.6e-6 (error 1.30), best 1e-4 (0.53), ends 3.7 (lambda 1), 23 (1e-8)
    assert 1e-6 < lambdas[corner] < 1e-3
    assert err[corner] < 3 * err.min() and err[corner] < err[0] / 2 and err[corner] < err[-1] / 10


BAD_MASKS = {
    "empty": lambda m: np.zeros_like(m),
    "all true": lambda m: np.ones_like(m),
    "touches border": lambda m: m | (np.arange(m.shape[0]) == 0)[:, None, None],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_rejects_bad_input(method):
    func = METHODS[method]
    shape = (24, 24, 24)
    field = np.zeros(shape, np.float32)
    mask, _ = ellipsoid(shape, (1, 1, 1), (9, 9, 9))
    for make in BAD_MASKS.values():
        with pytest.raises(ValueError, match="mask"):
            func(field, make(mask), (1, 1, 1))
    nan_field = field.copy()
    nan_field[12, 12, 12] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        func(nan_field, mask, (1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        func(field, mask[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="voxel_size_mm"):
        func(field, mask, (1, 1))
    # a mask thinner than the sphere leaves nothing
    with pytest.raises(ValueError, match="too thin"):
        if method == "vsharp":
            func(field, mask, (1, 1, 1), radii_mm=[10.0])
        else:
            func(field, mask, (1, 1, 1), radius_mm=10.0)
    # a one-voxel "sphere"
    with pytest.raises(ValueError, match="single voxel"):
        if method == "vsharp":
            func(field, mask, (1, 1, 1), radii_mm=[0.5])
        else:
            func(field, mask, (1, 1, 1), radius_mm=0.5)


def test_rejects_bad_options():
    field = np.zeros((24, 24, 24), np.float32)
    mask, _ = ellipsoid(field.shape, (1, 1, 1), (9, 9, 9))
    for kwargs in ({"threshold": 1.5}, {"radii_mm": []}, {"radii_mm": [-2.0]}):
        with pytest.raises(ValueError):
            vsharp(field, mask, (1, 1, 1), **kwargs)
    for kwargs in ({"lambda_": 0.0}, {"lambda_": "gcv"}, {"tol": 0.0}, {"max_iter": 0}):
        with pytest.raises(ValueError):
            resharp(field, mask, (1, 1, 1), **kwargs)
    with pytest.raises(ValueError, match="lambdas"):
        resharp(field, mask, (1, 1, 1), lambda_="lcurve", lambdas=[1e-3, 1e-2])
    for kwargs in ({"solver": "jacobi"}, {"tol": -1.0}, {"max_iter": 0}):
        with pytest.raises(ValueError):
            ismv(field, mask, (1, 1, 1), **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
def test_simulated_background_only(sim_2mm, method):
    """Field of everything outside the brain (forward model of chi outside the mask)."""
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    outside = np.where(sim.mask, 0, sim.chi_ppm - 9.41).astype(np.float32)  # air-referenced
    background = forward_field(outside, vox, sim.b0_dir, n_threads=2)
    local, roi = METHODS[method](background, sim.mask, vox, n_threads=2)
    # measured 0.007-0.008 % of the background's energy in the returned mask for every method
    # (the brief asked < 5 %); the bound keeps a 10x margin
    assert energy_ratio(local, background, roi) < 1e-3


def test_simulated_total_field(sim_2mm):
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    truth = sim.local_field_ppm
    results = {}
    runs = (
        ("vsharp", vsharp, {}),
        ("vsharp 12->2", vsharp, {"radii_mm": (12, 10, 8, 6, 4, 2)}),
        ("sharp", sharp, {}),
        ("resharp", resharp, {}),
        ("ismv", ismv, {}),
    )
    for name, func, kwargs in runs:
        local, roi = func(sim.total_field_ppm, sim.mask, vox, n_threads=2, **kwargs)
        assert local.dtype == np.float32 and roi.dtype == bool and not local[~roi].any()
        results[name] = (nrmse_demeaned(local, truth, roi), correlation(local, truth, roi), roi)
    # Measured demeaned NRMSE / correlation in the returned mask at 2 mm (NRMSE at 1 mm,
    # 200 x 200 x 160, in brackets): V-SHARP 12, 10, 8, 6 mm 29.9 % / 0.954 (28.4 %); RESHARP
    # 6 mm, lambda 1e-3 32.3 % / 0.947 (31.2 %); iSMV 6 mm 31.0 % / 0.951 (28.5 %); SHARP 6 mm
    # 34.2 % / 0.940 (33.2 %). All four keep the brain eroded by 6 mm, 71 % of it. The old
    # V-SHARP default, down to one voxel (91 % kept), gives 48.0 % / 0.877: the outer voxels,
    # filtered with small spheres but divided by the largest kernel, lose most of their
    # low-frequency local field. (test_background_acceptance checks all six methods at 1.5 mm.)
    roi = results["vsharp"][2]
    np.testing.assert_array_equal(roi, ndimage.binary_erosion(sim.mask, ball(6.0, vox)))
    assert 0.68 < roi.sum() / sim.mask.sum() < 0.74  # measured 0.711
    for name in ("vsharp", "resharp", "ismv"):
        nrmse, corr, method_roi = results[name]
        np.testing.assert_array_equal(method_roi, roi)
        assert nrmse < 36 and corr > 0.93, name  # the brief asks < 40 %
    assert results["vsharp 12->2"][0] > 45  # measured 48.0 %
    # V-SHARP beats SHARP with its smallest sphere on the same voxels (by 4.3 points at 2 mm)
    assert results["vsharp"][0] < results["sharp"][0] - 3
    # deeper than 12 mm V-SHARP is more accurate: measured 18.7 %
    core = ndimage.binary_erosion(sim.mask, ball(12.0, vox))
    local, roi = vsharp(sim.total_field_ppm, sim.mask, vox, n_threads=2)
    assert nrmse_demeaned(local, truth, roi & core) < 22


def test_resharp_lcurve(sim_2mm):
    sim = sim_2mm
    vox = sim.params.voxel_size_mm
    lambdas = np.logspace(-4, -1, 7)
    local, roi = resharp(
        sim.total_field_ppm, sim.mask, vox, lambda_="lcurve", lambdas=lambdas, n_threads=2
    )
    # the corner is lambda = 1e-3 here (1.2e-3 on the default 12-value grid, at 2 and 1 mm):
    # the automatic choice reproduces the fixed default; measured difference 2e-4 of the
    # local field's energy (warm starts along the lambda path vs a cold start)
    fixed, _ = resharp(sim.total_field_ppm, sim.mask, vox, lambda_=1e-3, n_threads=2)
    assert energy_ratio(local - fixed, sim.local_field_ppm, roi) < 1e-3
