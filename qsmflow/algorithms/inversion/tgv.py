"""Total generalized variation (TGV) dipole inversion with Langkammer's Laplacian data term.

TGV-QSM (Langkammer C, Bredies K, Poser BA, Barth M, Reishofer G, Fan AP, Bilgic B, Fazekas F,
Mainero C, Ropele S. Fast quantitative susceptibility mapping using 3D EPI and total generalized
variation. NeuroImage 2015;111:622-630) regularises the susceptibility with second-order TGV
(Bredies K, Kunisch K, Pock T. Total generalized variation. SIAM J Imaging Sci 2010;3:492-526),

    TGV(chi) = min_w  alpha1 ||grad chi - w||_1 + alpha0 ||E w||_1,

where ``w`` is a vector field and ``E w = (grad w + grad w^T) / 2`` its symmetrised gradient;
the pointwise norms are Euclidean (Frobenius for ``E w``). Affine ramps cost nothing through
``alpha0 ||E w||``, so smooth variations are kept without the staircases of TV.

**Data term (the paper's).** The dipole model is written in differential form: the Laplacian of
the field of a susceptibility distribution is ``wave(chi) = (1/3) Laplace(chi) - d_bb chi``
with ``d_bb`` the second derivative along the unit B0 direction ``b`` (``d_zz`` for axial
B0). The measured field ``f`` enters only through its Laplacian, and a phase correction
``phi`` (ppm here) is fitted jointly::

    min_{chi, phi, w}  1/2 ||phi||^2_M + alpha1 ||grad chi - w||_1 + alpha0 ||E w||_1
    subject to  wave(chi) - Laplace(phi) = Laplace(f)   on M_e,

with ``M`` the mask and ``M_e`` the voxels whose Laplacian stencil stays inside ``M`` (``M``
eroded by one voxel). ``phi`` is the residual ``D chi - f`` up to any function harmonic in
``M_e``: a harmonic background left in ``f`` (by an imperfect background removal, or none at
all) is annihilated by the Laplacian and does not enter ``chi``. As in the paper, chi and the
TGV terms live on the mask, the gradients being counted where their differences stay inside
it. (An affine chi is invisible to every term, as in the paper: its affine part is kept from
the starting point.)

**Discretisation.** The Laplacian is the three-point difference along each axis; ``wave`` is
that Laplacian applied to the dipole field, ``L(k) D(k)`` in k-space (:func:`wave_kernel`),
which is exact for any B0 direction and consistent with the dipole kernel of the other
methods. The authors apply a local stencil of ``(1/3) Laplace - d_zz`` instead; with mixed
second differences for an oblique B0 such a stencil misses ``Laplace f`` of the simulated
2 mm head by 55 % (20 % with axial B0), and the reconstruction degraded accordingly (70 %
against 37 % NRMSE). Forward differences for ``grad`` and the symmetrised gradient as in the
authors' code. Gradients are per mm and the field in ppm, so the alphas apply at any
resolution (the authors' de-dimensionalisation, ``alpha1 / h`` and ``alpha0 / h^2`` on
voxel-unit differences, is the same problem).

**Units of alpha.** The paper's parameters act on chi and phase in radians at the echo time.
Writing its problem in ppm divides the objective by ``s^2`` with ``s = 2 pi gamma_bar B0 TE``
(rad per ppm), i.e. ``alpha_ppm = alpha_rad / s``. The defaults are the published
``(alpha0, alpha1) = (0.0015, 0.0005)`` (the authors' code, also QSMxT's defaults) converted
with ``s`` of a 3 T acquisition at TE = 20 ms (16.05 rad/ppm): :data:`TGV_ALPHA_PPM`. For
other data, :func:`tgv_alpha_for_phase` converts with its own B0 and TE.

**Solver.** The saddle-point problem in ``(chi, phi, w)`` against the duals ``eta`` (the
constraint; unbounded), ``p`` (``|p| <= alpha1``) and ``q`` (``|q|_F <= alpha0``) is solved by
the first-order primal-dual method of Chambolle and Pock (J Math Imaging Vis 2011;40:120-145),
as in the paper, with one step size per block (Pock T, Chambolle A, ICCV 2011, diagonal
preconditioning). An iteration is two fused loops over the mask (compiled with numba) and two
real-FFT convolutions with ``wave`` on the mask's bounding box. Differences from the authors'
implementation, to make 1 mm whole-brain data fast on a few cores: (1) chi starts from a
closed-form gradient-Tikhonov inversion (Bilgic et al., Magn Reson Med 2014;72:1444) of the
field without its constant and linear parts over the mask, instead of zero; (2) larger steps
for ``chi``, ``w`` and ``eta`` than for ``phi`` (the authors' ``step_size``); (3) at most
:data:`TGV_MAX_ITER` iterations instead of 1000-3000, stopping earlier when the relative
change of chi per iteration falls below ``tol``; (4) all work happens on the mask's bounding
box.

**What to expect.** The Laplacian discards every field harmonic in the mask, and with it the
part of the brain's own field that is harmonic there, so chi is less well determined than
from a background-free field. On the simulated 2 mm head (true local field, SNR 100 field
noise, published alphas) the demeaned NRMSE is 27.3 % after 150 iterations (26.3 % after 200;
TKD 44.6 %; the former field-fitting variant reached 16.5 %). Its strength is a field that is
not background-free: after V-SHARP 46 % and after PDF 54 % (TKD 51.6 % / 58.3 %; the
field-fitting variant 72 % / 108 %). A constant or linear background changes nothing (start
and iteration ignore it); a higher-order harmonic one is ignored by the iteration but leaves
an imprint through the starting point that the iterations remove only slowly (0.08 ppm RMS of
quadratic and cubic solid harmonics, 8x the local field: 690 %), so the background removal
should still take out the bulk of the background.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import scipy.fft
from scipy import ndimage

from ... import GAMMA_BAR_MHZ_PER_T
from .._numba import jit, numba_threads
from ..dipole import dipole_kernel
from ..fft import padded_shape
from ._common import check_inversion_inputs, gradient_symbols

__all__ = ["tgv", "tgv_alpha_for_phase", "TGV_ALPHA_RAD", "TGV_ALPHA_PPM", "TGV_MAX_ITER"]

#: Published TGV-QSM regularisation (alpha0, alpha1) for chi in radians of phase.
TGV_ALPHA_RAD: tuple[float, float] = (0.0015, 0.0005)


def tgv_alpha_for_phase(
    echo_time_s: float,
    b0_tesla: float,
    alpha_rad: Sequence[float] = TGV_ALPHA_RAD,
) -> tuple[float, float]:
    """Convert TGV-QSM alphas from the paper's phase units (rad at ``echo_time_s``) to ppm.

    ``alpha_ppm = alpha_rad / (2 pi gamma_bar B0 TE)``; with a field in ppm and these alphas,
    :func:`tgv` solves the paper's problem for data of that echo time and field strength.
    """
    if not (echo_time_s > 0 and b0_tesla > 0):
        raise ValueError("echo_time_s and b0_tesla must be positive")
    a = tuple(float(v) for v in alpha_rad)
    if len(a) != 2:
        raise ValueError(f"alpha_rad must be (alpha0, alpha1), got {alpha_rad!r}")
    scale = 2.0 * math.pi * GAMMA_BAR_MHZ_PER_T * b0_tesla * echo_time_s
    return (a[0] / scale, a[1] / scale)


#: Default (alpha0, alpha1) for a field in ppm: the published values at 3 T, TE = 20 ms.
TGV_ALPHA_PPM: tuple[float, float] = tgv_alpha_for_phase(0.020, 3.0)

#: Default maximum number of primal-dual iterations.
TGV_MAX_ITER = 150

_MARGIN = 2  # voxels kept around the mask's bounding box (the mask never touches its edge)
# Step sizes (see _step_sizes): primal step of chi and w, and of phi, in units of the bound.
_TAU_CHI = 16.0
_TAU_PHI = 1.0
_RHO_ETA = 10.0  # dual step of eta relative to those of p and q
_INIT_LAMBDA = 0.0025  # gradient-Tikhonov weight of the starting point (per voxel^2)


# ---------------------------------------------------------------------------- numba kernels
def _dual_update(
    chib, phib, wb, wave_chib, lap_f, mask, me, m0, rows, p, q, eta, se, sp, sq, a1, a0, h, c
):
    """Dual ascent: eta on ``me`` (constraint residual), p (|p| <= a1) and q (|q|_F <= a0)
    on ``m0``.

    ``wave_chib`` is ``wave(chib)`` (computed with FFTs); ``h`` = (1/hx, 1/hy, 1/hz); ``c``
    the Laplacian's weights (1/hx^2, 1/hy^2, 1/hz^2). ``rows[i, j]`` is the range of k that
    holds every voxel of the mask in row (i, j); the loops skip the rest of the box.
    """
    nx, ny, nz = chib.shape
    inv_a1 = 1.0 / a1
    inv_a0 = 1.0 / a0
    hx, hy, hz = h[0], h[1], h[2]
    lx, ly, lz = c[0], c[1], c[2]
    for i in _prange(nx):
        ip = i + 1 if i + 1 < nx else 0
        im = i - 1 if i > 0 else nx - 1
        for j in range(ny):
            jp = j + 1 if j + 1 < ny else 0
            jm = j - 1 if j > 0 else ny - 1
            for k in range(rows[i, j, 0], rows[i, j, 1]):
                if not mask[i, j, k]:
                    continue
                kp = k + 1 if k + 1 < nz else 0
                km = k - 1 if k > 0 else nz - 1
                c0 = chib[i, j, k]
                if me[i, j, k]:
                    f0 = phib[i, j, k]
                    lap = (
                        lx * (phib[ip, j, k] + phib[im, j, k] - 2.0 * f0)
                        + ly * (phib[i, jp, k] + phib[i, jm, k] - 2.0 * f0)
                        + lz * (phib[i, j, kp] + phib[i, j, km] - 2.0 * f0)
                    )
                    eta[i, j, k] += se * (wave_chib[i, j, k] - lap - lap_f[i, j, k])
                if not m0[i, j, k]:
                    continue
                w0 = wb[0, i, j, k]
                w1 = wb[1, i, j, k]
                w2 = wb[2, i, j, k]
                px = p[0, i, j, k] + sp * ((chib[ip, j, k] - c0) * hx - w0)
                py = p[1, i, j, k] + sp * ((chib[i, jp, k] - c0) * hy - w1)
                pz = p[2, i, j, k] + sp * ((chib[i, j, kp] - c0) * hz - w2)
                s = math.sqrt(px * px + py * py + pz * pz) * inv_a1
                s = 1.0 / s if s > 1.0 else 1.0
                p[0, i, j, k] = px * s
                p[1, i, j, k] = py * s
                p[2, i, j, k] = pz * s
                # symmetrised gradient of w (forward differences), off-diagonals halved
                qxx = q[0, i, j, k] + sq * ((wb[0, ip, j, k] - w0) * hx)
                qyy = q[1, i, j, k] + sq * ((wb[1, i, jp, k] - w1) * hy)
                qzz = q[2, i, j, k] + sq * ((wb[2, i, j, kp] - w2) * hz)
                qxy = q[3, i, j, k] + sq * 0.5 * (
                    (wb[0, i, jp, k] - w0) * hy + (wb[1, ip, j, k] - w1) * hx
                )
                qxz = q[4, i, j, k] + sq * 0.5 * (
                    (wb[0, i, j, kp] - w0) * hz + (wb[2, ip, j, k] - w2) * hx
                )
                qyz = q[5, i, j, k] + sq * 0.5 * (
                    (wb[1, i, j, kp] - w1) * hz + (wb[2, i, jp, k] - w2) * hy
                )
                s = (
                    math.sqrt(
                        qxx * qxx
                        + qyy * qyy
                        + qzz * qzz
                        + 2.0 * (qxy * qxy + qxz * qxz + qyz * qyz)
                    )
                    * inv_a0
                )
                s = 1.0 / s if s > 1.0 else 1.0
                q[0, i, j, k] = qxx * s
                q[1, i, j, k] = qyy * s
                q[2, i, j, k] = qzz * s
                q[3, i, j, k] = qxy * s
                q[4, i, j, k] = qxz * s
                q[5, i, j, k] = qyz * s


def _primal_update(
    chi, phi, w, chib, phib, wb, p, q, eta, wave_eta, mask, rows, tc, tp, tw, h, c, change
):
    """Primal descent with over-relaxation on the mask; ``change[i]`` gets sums of dchi^2 and
    chi^2.

    ``wave_eta`` is ``wave(eta)``; ``eta`` is zero outside ``me`` and ``p``, ``q`` outside
    ``m0``, so these are the exact adjoints of the operators of :func:`_dual_update` (wave and
    Laplacian are symmetric; the backward-difference divergences are the negative adjoints of
    the forward differences).
    """
    nx, ny, nz = chi.shape
    hx, hy, hz = h[0], h[1], h[2]
    lx, ly, lz = c[0], c[1], c[2]
    keep = 1.0 / (1.0 + tp)
    for i in _prange(nx):
        ip = i + 1 if i + 1 < nx else 0
        im = i - 1 if i > 0 else nx - 1
        num = 0.0
        den = 0.0
        for j in range(ny):
            jp = j + 1 if j + 1 < ny else 0
            jm = j - 1 if j > 0 else ny - 1
            for k in range(rows[i, j, 0], rows[i, j, 1]):
                if not mask[i, j, k]:
                    continue
                kp = k + 1 if k + 1 < nz else 0
                km = k - 1 if k > 0 else nz - 1
                e0 = eta[i, j, k]
                ex = eta[ip, j, k] + eta[im, j, k] - 2.0 * e0
                ey = eta[i, jp, k] + eta[i, jm, k] - 2.0 * e0
                ez = eta[i, j, kp] + eta[i, j, km] - 2.0 * e0
                wave = wave_eta[i, j, k]
                div = (
                    (p[0, i, j, k] - p[0, im, j, k]) * hx
                    + (p[1, i, j, k] - p[1, i, jm, k]) * hy
                    + (p[2, i, j, k] - p[2, i, j, km]) * hz
                )
                old = chi[i, j, k]
                new = old + tc * (div - wave)
                chi[i, j, k] = new
                chib[i, j, k] = 2.0 * new - old
                num += (new - old) * (new - old)
                den += new * new
                # phi: the constraint enters as -Laplace(phi); prox of 1/2 ||phi||^2
                old = phi[i, j, k]
                new = (old + tp * (lx * ex + ly * ey + lz * ez)) * keep
                phi[i, j, k] = new
                phib[i, j, k] = 2.0 * new - old
                # -E^T q row by row: (xx, xy, xz), (xy, yy, yz), (xz, yz, zz)
                d0 = (
                    (q[0, i, j, k] - q[0, im, j, k]) * hx
                    + (q[3, i, j, k] - q[3, i, jm, k]) * hy
                    + (q[4, i, j, k] - q[4, i, j, km]) * hz
                )
                d1 = (
                    (q[3, i, j, k] - q[3, im, j, k]) * hx
                    + (q[1, i, j, k] - q[1, i, jm, k]) * hy
                    + (q[5, i, j, k] - q[5, i, j, km]) * hz
                )
                d2 = (
                    (q[4, i, j, k] - q[4, im, j, k]) * hx
                    + (q[5, i, j, k] - q[5, i, jm, k]) * hy
                    + (q[2, i, j, k] - q[2, i, j, km]) * hz
                )
                o0 = w[0, i, j, k]
                o1 = w[1, i, j, k]
                o2 = w[2, i, j, k]
                n0 = o0 + tw * (p[0, i, j, k] + d0)
                n1 = o1 + tw * (p[1, i, j, k] + d1)
                n2 = o2 + tw * (p[2, i, j, k] + d2)
                w[0, i, j, k] = n0
                w[1, i, j, k] = n1
                w[2, i, j, k] = n2
                wb[0, i, j, k] = 2.0 * n0 - o0
                wb[1, i, j, k] = 2.0 * n1 - o1
                wb[2, i, j, k] = 2.0 * n2 - o2
        change[i, 0] = num
        change[i, 1] = den


_prange = range
_compiled = False
_compile_lock = threading.Lock()


def _compile_kernels() -> None:
    """Swap the kernels for parallel numba dispatchers (once; compiled at the first call).

    numba is imported here, not at module import, so ``import qsmflow`` stays fast. Where the
    cache directory is not writable, the kernels are compiled in memory at each first call.
    """
    global _compiled, _prange, _dual_update, _primal_update
    with _compile_lock:
        if _compiled:
            return
        try:
            import numba
        except ImportError as exc:  # pragma: no cover - numba is a dependency
            raise ImportError("TGV inversion needs numba (pip install numba)") from exc
        _prange = numba.prange
        kernels = {}
        for name, fn in (("dual", _dual_update), ("primal", _primal_update)):
            kernels[name] = jit(fn, parallel=True, nogil=True)
        _dual_update, _primal_update = kernels["dual"], kernels["primal"]
        _compiled = True


# ---------------------------------------------------------------------------- helpers
def _bounding_box(
    mask: np.ndarray, margin: int
) -> tuple[tuple[slice, ...], tuple[slice, ...], tuple[int, ...]]:
    """The mask's bounding box grown by ``margin`` voxels: its slices in the input, the same
    voxels' slices in a new array of the grown shape, and that shape (the grown box may reach
    beyond the input, whose voxels there count as outside the mask)."""
    src, dst, shape = [], [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(idx[0]) - margin, int(idx[-1]) + 1 + margin
        a, b = max(lo, 0), min(hi, mask.shape[axis])
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
        shape.append(hi - lo)
    return tuple(src), tuple(dst), tuple(shape)


def _row_ranges(region: np.ndarray) -> np.ndarray:
    """(nx, ny, 2) int64: for each row (i, j) the half-open range of k covering ``region``."""
    nz = region.shape[2]
    has = region.any(axis=2)
    first = np.argmax(region, axis=2)
    last = nz - np.argmax(region[:, :, ::-1], axis=2)
    return np.stack([np.where(has, first, 0), np.where(has, last, 0)], axis=-1).astype(np.int64)


def _laplace_weights(voxel_size_mm: Sequence[float]) -> np.ndarray:
    """float32 ``(1/hx^2, 1/hy^2, 1/hz^2)``: the three-point Laplacian's weights (per mm^2)."""
    return np.array([1.0 / float(v) ** 2 for v in voxel_size_mm], dtype=np.float32)


def laplace_symbol(shape: Sequence[int], voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Half-spectrum symbol (float32, broadcastable) of the three-point Laplacian (per mm^2)."""
    out = np.zeros((1, 1, 1), np.float32)
    for axis, (n, h) in enumerate(zip(shape, voxel_size_mm, strict=True)):
        m = n // 2 + 1 if axis == 2 else n
        view = [1, 1, 1]
        view[axis] = m
        t = 2.0 * np.pi * np.arange(m) / n
        out = out + ((2.0 * np.cos(t) - 2.0) / float(h) ** 2).astype(np.float32).reshape(view)
    return out


def wave_kernel(
    shape: Sequence[int], voxel_size_mm: Sequence[float], b0_dir: Sequence[float]
) -> np.ndarray:
    """k-space symbol of ``wave``: the three-point Laplacian of the dipole field, ``L(k) D(k)``
    (half spectrum, float32).

    For band-limited data this is the discrete form of ``(1/3) Laplace - d_bb``: the
    Laplacian of a sampled field is exactly ``L(k)`` times its spectrum, and ``D(k)`` is the
    dipole kernel used by every method here (:func:`qsmflow.algorithms.dipole.dipole_kernel`),
    exact for any B0 direction. (A purely local second-difference stencil of
    ``(1/3) Laplace - d_bb`` differs from it by 20 % of ``|Laplace f|`` on the simulated 2 mm
    head with axial B0 and by 55 % with a 23 degree tilt, because its mixed differences are
    poor at high frequencies.)
    """
    return dipole_kernel(shape, voxel_size_mm, b0_dir, real=True) * laplace_symbol(
        shape, voxel_size_mm
    )


def _laplacian(f: np.ndarray, weights: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Three-point Laplacian (per mm^2) of ``f`` on ``region`` (zero elsewhere; periodic)."""
    out = np.zeros_like(f)
    for axis, c in enumerate(weights):
        out += c * (np.roll(f, 1, axis) + np.roll(f, -1, axis) - 2.0 * f)
    return np.where(region, out, np.float32(0)).astype(np.float32)


def _starting_point(
    field: np.ndarray,
    mask: np.ndarray,
    kernel: np.ndarray,
    voxel_size_mm: Sequence[float],
    n_threads: int,
) -> np.ndarray:
    """Closed-form gradient-Tikhonov inversion ``D f / (D^2 + lambda |G|^2)``, masked.

    ``G`` are the symbols of the forward differences per mm; ``lambda`` is
    :data:`_INIT_LAMBDA` per voxel^2 (0.0025 per mm^2 at 1 mm, 0.01 at 2 mm).
    """
    shape = field.shape
    reg = np.zeros(kernel.shape, np.float32)
    for sym in gradient_symbols(shape, voxel_size_mm, real=True):
        reg = reg + (sym.real * sym.real + sym.imag * sym.imag)
    h2 = float(np.prod(voxel_size_mm)) ** (2.0 / 3.0)
    denom = kernel * kernel + np.float32(_INIT_LAMBDA * h2) * reg
    denom[0, 0, 0] = 1.0  # D(0) = 0: the mean stays zero
    spec = scipy.fft.rfftn(field, workers=n_threads)
    spec *= kernel / denom
    out = scipy.fft.irfftn(spec, s=shape, workers=n_threads)
    return np.where(mask, out, 0).astype(np.float32)


def _remove_linear(f: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """``f`` minus its least-squares affine fit over the mask (zero outside the mask)."""
    idx = np.nonzero(mask)
    cols = [np.ones(idx[0].size)]
    cols += [(i - i.mean()) * float(h) for i, h in zip(idx, voxel_size_mm, strict=True)]
    basis = np.stack(cols, axis=1)
    vals = f[idx].astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, vals, rcond=None)
    out = np.zeros_like(f)
    out[idx] = (vals - basis @ coef).astype(np.float32)
    return out


def _step_sizes(voxel_size_mm: Sequence[float]) -> dict[str, float]:
    """Per-block steps satisfying the preconditioned Chambolle-Pock bound for this problem.

    With ``G = 4 sum h^-2`` (bounds ``||grad||^2``, ``||E||^2`` and ``||Laplace||``) and
    ``||wave|| <= 2 G / 3``, the operator ``(chi, phi, w) -> (wave chi - Laplace phi,
    grad chi - w, E w)`` scaled by the dual steps ``(s_eta, s, s)`` and primal steps
    ``(t_chi, t_phi, t_w)`` has norm < 1 when ``s * max(t_chi (2 rho (2 G / 3)^2 + 2 G),
    t_phi 2 rho G^2, t_w (2 + G)) < 1`` with ``s_eta = rho s``.
    """
    g = 4.0 * sum(1.0 / h**2 for h in voxel_size_mm)
    gw = 2.0 * g / 3.0
    bound = max(
        _TAU_CHI * (2.0 * _RHO_ETA * gw * gw + 2.0 * g),
        _TAU_PHI * 2.0 * _RHO_ETA * g * g,
        _TAU_CHI * (2.0 + g),
    )
    s = 0.98 / bound
    return {"chi": _TAU_CHI, "w": _TAU_CHI, "phi": _TAU_PHI, "eta": _RHO_ETA * s, "p": s, "q": s}


def _solve(
    f: np.ndarray,
    m: np.ndarray,
    voxel_size_mm: tuple[float, ...],
    b0_dir: Sequence[float],
    alpha0: float,
    alpha1: float,
    max_iter: int,
    tol: float,
    pad_factor: float,
    n_threads: int,
    *,
    order: int = 2,
    history: list | None = None,
) -> tuple[np.ndarray, int]:
    """Chambolle-Pock iterations on a box whose mask ``m`` stays >= 2 voxels from its faces.

    ``order=1`` keeps ``w = 0``, which turns the regulariser into TV (``alpha1 ||grad
    chi||_1``) with everything else equal, for comparisons. Returns chi on the box and the
    number of iterations run. ``history`` (tests) receives chi every 10 iterations.
    """
    shape = f.shape
    big = padded_shape(shape, pad_factor=pad_factor)
    kernel = wave_kernel(big, voxel_size_mm, b0_dir)
    crop = tuple(slice(0, n) for n in shape)

    def wave(x: np.ndarray) -> np.ndarray:
        spec = scipy.fft.rfftn(x, s=big, workers=n_threads)
        spec *= kernel
        out = scipy.fft.irfftn(spec, s=big, workers=n_threads, overwrite_x=True)
        return np.ascontiguousarray(out[crop])

    weights = _laplace_weights(voxel_size_mm)
    me = ndimage.binary_erosion(m)  # where the Laplacian's stencil stays inside the mask
    m0 = me  # and the forward differences of grad and E
    rows = _row_ranges(m)
    lap_f = _laplacian(f, weights, me)

    steps = _step_sizes(voxel_size_mm)
    if order == 1:
        steps["w"] = 0.0
    # start: closed-form inversion of the field without its constant and linear parts (which
    # the data term cannot see either: a linear background then changes nothing)
    dip = dipole_kernel(shape, voxel_size_mm, b0_dir, real=True)
    chi = _starting_point(_remove_linear(f, m, voxel_size_mm), m, dip, voxel_size_mm, n_threads)
    del dip
    chib = chi.copy()
    wave_chib = wave(chib)
    phi = np.zeros(shape, np.float32)
    phib = np.zeros(shape, np.float32)
    w = np.zeros((3, *shape), np.float32)
    wb = np.zeros_like(w)
    p = np.zeros_like(w)
    q = np.zeros((6, *shape), np.float32)
    eta = np.zeros(shape, np.float32)
    change = np.zeros((shape[0], 2), np.float64)
    h_inv = np.array([1.0 / h for h in voxel_size_mm], np.float32)
    s = {k: np.float32(v) for k, v in steps.items()}
    a1 = np.float32(alpha1)
    a0 = np.float32(alpha0)  # with w = 0 (order 1), q never moves and alpha0 does not matter

    _compile_kernels()
    n_done = 0
    with numba_threads(n_threads):
        for n_done in range(1, int(max_iter) + 1):  # noqa: B007 - n_done is reported
            _dual_update(
                chib, phib, wb, wave_chib, lap_f, m, me, m0, rows, p, q, eta,
                s["eta"], s["p"], s["q"], a1, a0, h_inv, weights,
            )  # fmt: skip
            wave_eta = wave(eta)
            _primal_update(
                chi, phi, w, chib, phib, wb, p, q, eta, wave_eta, m, rows,
                s["chi"], s["phi"], s["w"], h_inv, weights, change,
            )  # fmt: skip
            wave_chib = wave(chib)
            if history is not None and n_done % 10 == 0:
                history.append(chi.copy())
            num, den = change.sum(axis=0)
            if den > 0 and math.sqrt(num / den) < tol:
                break
    return chi, n_done


# ---------------------------------------------------------------------------- public
def tgv(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    alpha: Sequence[float] = TGV_ALPHA_PPM,
    max_iter: int = TGV_MAX_ITER,
    tol: float = 1e-3,
    pad_factor: float = 1.0,
    n_threads: int = 1,
) -> np.ndarray:
    """TGV-regularised dipole inversion on the field's Laplacian (Langkammer et al. 2015).

    Parameters
    ----------
    local_field_ppm : (x, y, z) array
        Field in ppm of B0, unwrapped: a local field, or one with a residual background
        (harmonic in the mask, which the Laplacian data term ignores; see module).
    mask : (x, y, z) bool array
        Region where the field is valid; chi is zero outside it.
    voxel_size_mm : (3,) floats
        Voxel size in mm (anisotropic sizes are handled exactly).
    b0_dir : (3,) floats
        B0 direction in voxel coordinates (any, oblique included).
    alpha : (alpha0, alpha1), optional
        Weights of the second-order (``||E w||``) and first-order (``||grad chi - w||``) terms
        for a field in ppm and gradients per mm; default :data:`TGV_ALPHA_PPM` (the published
        values for 3 T, TE = 20 ms; convert others with :func:`tgv_alpha_for_phase`).
        Larger values smooth more; their ratio (3 : 1 by default) sets how readily slopes
        are accepted over jumps.
    max_iter : int
        Maximum number of primal-dual iterations.
    tol : float
        Stop when ``||chi_k - chi_{k-1}|| / ||chi_k||`` falls below it (0: run ``max_iter``).
    pad_factor : float
        Padded length over that of the mask's bounding box (plus 2 voxels) for the periodic
        convolutions with ``wave`` (>= 1). ``wave`` is nearly local (the Laplacian of a
        dipole field), so 1 suffices.
    n_threads : int
        Threads for the compiled update loops and the FFTs.

    Returns
    -------
    numpy.ndarray
        float32 susceptibility in ppm, zero outside ``mask``; its mean is arbitrary (see
        :mod:`qsmflow.algorithms.reference`).

    References
    ----------
    Langkammer C, Bredies K, Poser BA, et al. Fast quantitative susceptibility mapping using 3D
    EPI and total generalized variation. NeuroImage 2015;111:622-630.
    Bredies K, Kunisch K, Pock T. Total generalized variation. SIAM J Imaging Sci
    2010;3:492-526.
    Chambolle A, Pock T. A first-order primal-dual algorithm for convex problems with
    applications to imaging. J Math Imaging Vis 2011;40:120-145.
    """
    return _tgv(
        local_field_ppm,
        mask,
        voxel_size_mm,
        b0_dir,
        alpha=alpha,
        max_iter=max_iter,
        tol=tol,
        pad_factor=pad_factor,
        n_threads=n_threads,
        order=2,
    )


def _tgv(
    local_field_ppm,
    mask,
    voxel_size_mm,
    b0_dir,
    *,
    alpha,
    max_iter,
    tol,
    pad_factor,
    n_threads,
    order,
    history=None,
):
    """:func:`tgv` with the regulariser's order selectable (1 = TV, for comparisons)."""
    field, roi = check_inversion_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    a = tuple(float(v) for v in np.ravel(alpha))
    if len(a) != 2 or not all(np.isfinite(v) and v > 0 for v in a):
        raise ValueError(f"alpha must be two positive numbers (alpha0, alpha1), got {alpha!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if not pad_factor >= 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    n_threads = max(int(n_threads), 1)
    vox = tuple(float(v) for v in np.ravel(voxel_size_mm))

    # Work on the mask's bounding box plus a margin, so that the periodic differences never
    # couple opposite faces of the mask.
    src, dst, box_shape = _bounding_box(roi, _MARGIN)
    m = np.zeros(box_shape, bool)
    m[dst] = roi[src]
    f = np.zeros(box_shape, np.float32)
    f[dst] = np.where(roi[src], field[src], 0)
    chi, _ = _solve(
        f, m, vox, b0_dir, a[0], a[1], int(max_iter), float(tol), pad_factor, n_threads,
        order=order, history=history,
    )  # fmt: skip
    out = np.zeros(field.shape, np.float32)
    out[src] = np.where(roi[src], chi[dst], 0)
    return out
