"""Tests for qsmflow.algorithms.inversion.rts (rapid two-step dipole inversion).

Known answers: step 1 is the LSMR iterate, i.e. the minimiser of ``||A^T (b - A x)||`` over the
Krylov space ``K_k(A^T A, A^T b)``, computed here independently in k-space; step 2 fills the
ill-conditioned cone (the result beats step 1 alone); on the noisy simulated 2 mm head RTS with
the published parameters beats TKD; an oblique B0 works as well as an axial one; bad input
raises ValueError. Measured values are quoted next to each threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow.algorithms.dipole import dipole_kernel, forward_field
from qsmflow.algorithms.fft import crop_centered, pad_centered
from qsmflow.algorithms.inversion.direct import tkd
from qsmflow.algorithms.inversion.rts import _working_grid, rts, rts_well_conditioned
from qsmflow.algorithms.metrics import dgm_linearity, nrmse_demeaned


def krylov_lsmr_reference(field, kernel_full, k):
    """k-th LSMR iterate for the diagonal k-space system D X = F f, by direct minimisation."""
    b = np.fft.fftn(field.astype(np.float64), norm="ortho").ravel()
    d = kernel_full.astype(np.float64).ravel()
    basis = [d ** (2 * j + 1) * b for j in range(k)]
    cols = np.stack([d * d * v for v in basis], axis=1)  # A^T A v_j
    target = d * b  # A^T b
    mat = np.concatenate([cols.real, cols.imag])
    rhs = np.concatenate([target.real, target.imag])
    coef = np.linalg.lstsq(mat, rhs, rcond=None)[0]
    x = sum(c * v for c, v in zip(coef, basis, strict=True)).reshape(field.shape)
    return np.fft.ifftn(x, norm="ortho").real


@pytest.mark.parametrize("k", [1, 2, 4])
def test_step1_is_the_lsmr_iterate(k):
    shape, vox, b0 = (16, 14, 12), (1.0, 1.2, 1.5), (0.2, -0.1, 1.0)
    rng = np.random.default_rng(k)
    field = rng.normal(size=shape).astype(np.float32)
    got = rts_well_conditioned(field, dipole_kernel(shape, vox, b0, real=True), lsmr_iter=k)
    ref = krylov_lsmr_reference(field, dipole_kernel(shape, vox, b0, real=False), k)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())


def blobs(shape=(48, 48, 48)):
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = x * x + y * y + z * z < 20**2
    chi = np.zeros(shape, np.float32)
    chi[(x - 5) ** 2 + y * y + z * z < 36] = 0.1
    chi[x * x + (y + 6) ** 2 + (z - 3) ** 2 < 16] = -0.05
    chi[np.abs(x + 7) + np.abs(y - 4) + np.abs(z) < 5] = 0.2
    return chi, mask


def test_step2_fills_the_cone():
    chi, mask = blobs()
    vox = (1.0, 1.0, 1.0)
    field = forward_field(chi, vox, (0, 0, 1))
    out = rts(field, mask, vox, lsmr_iter=4, n_threads=2)
    assert out.dtype == np.float32 and not out[~mask].any()
    box, box_shape, shape = _working_grid(mask, 4)
    step1 = rts_well_conditioned(
        pad_centered(np.where(mask, field, 0)[box], shape), dipole_kernel(shape, vox), lsmr_iter=4
    )
    only1 = np.zeros(mask.shape, np.float32)
    only1[box] = crop_centered(step1, box_shape)
    only1[~mask] = 0
    # measured (4 LSMR iterations, as published): step 1 alone 47.8 %, RTS 32.4 %; with the
    # default 15 iterations RTS reaches 10.7 %
    assert nrmse_demeaned(out, chi, mask) < nrmse_demeaned(only1, chi, mask) - 10
    assert nrmse_demeaned(rts(field, mask, vox, n_threads=2), chi, mask) < 15


@pytest.fixture(scope="module")
def noisy(sim_2mm):
    sim = sim_2mm
    mag = sim.magnitude[..., 0]
    mean_mag = float(mag[sim.mask].mean())
    sd = 0.002 * mean_mag / np.maximum(mag, 0.2 * mean_mag)
    noise = (np.random.default_rng(7).normal(size=mag.shape) * sd).astype(np.float32)
    return sim, noise


def test_noisy_head(noisy):
    sim, noise = noisy
    vox, mask, truth = sim.params.voxel_size_mm, sim.mask, sim.chi_ppm
    field = sim.local_field_ppm + noise
    chi = rts(field, mask, vox, sim.b0_dir, n_threads=2)
    assert chi.dtype == np.float32 and np.all(np.isfinite(chi)) and not chi[~mask].any()
    ref = nrmse_demeaned(tkd(field, mask, vox, sim.b0_dir, threshold=0.19), truth, mask)
    # measured: RTS 34.5 % (TKD 54.3 %), DGM |1 - slope| 0.086; with the published 4 LSMR
    # iterations 44.5 % and 0.22 (the well-conditioned k-space left underestimated)
    err = nrmse_demeaned(chi, truth, mask)
    assert err < ref - 15
    assert dgm_linearity(chi, truth, sim.segmentation) < 0.15
    # oblique B0 (27 degrees): measured 37.2 %
    chi_brain = np.where(mask, truth - truth[mask].mean(), 0).astype(np.float32)
    b_obl = np.array([0.3, -0.4, 1.0]) / np.linalg.norm([0.3, -0.4, 1.0])
    field_obl = forward_field(chi_brain, vox, b_obl, n_threads=2) + noise
    err_obl = nrmse_demeaned(rts(field_obl, mask, vox, b_obl, n_threads=2), truth, mask)
    assert abs(err_obl - err) < 5


def test_rejects_bad_input():
    shape = (12, 12, 12)
    field = np.zeros(shape, np.float32)
    mask = np.zeros(shape, bool)
    mask[3:9, 3:9, 3:9] = True
    vox = (1.0, 1.0, 1.0)
    for kw in (
        dict(delta=0.0),
        dict(delta=0.7),
        dict(mu=0.0),
        dict(rho=0.0),
        dict(rho=-10.0),
        dict(tol=-1.0),
        dict(max_iter=0),
        dict(lsmr_iter=0),
        dict(gamma=0.0),
    ):
        with pytest.raises(ValueError):
            rts(field, mask, vox, **kw)
    bad = field.copy()
    bad[5, 5, 5] = np.inf
    with pytest.raises(ValueError):
        rts(bad, mask, vox)
    with pytest.raises(ValueError):
        rts(field, np.zeros(shape, bool), vox)
