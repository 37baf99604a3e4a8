"""Susceptibility tensor imaging (STI; Liu, Magn Reson Med 2010;63:1471).

A susceptibility tensor ``X`` (symmetric 3x3, ppm) seen with the unit field direction ``h`` (voxel
frame) gives the relative field (ppm), in k-space,

    b(k) = 1/3 h^T X(k) h - (k . h) (k^T X(k) h) / |k|^2,            b(0) = 0,

which reduces to the scalar dipole kernel ``1/3 - (k . h)^2 / |k|^2`` for ``X = chi I``. With the
six independent components ``(xx, xy, xz, yy, yz, zz)`` the field is ``sum_c C_c(k) X_c(k)``.
Fields from several head orientations (all in the reference voxel frame) give, per k, an
overdetermined linear system for the six components; Liu (2010) solves it with LSQR (Paige &
Saunders, ACM TOMS 1982). The tensor's eigen-decomposition gives the mean magnetic susceptibility
(MMS, the trace / 3), the principal eigenvector (along white-matter fibres, where the tensor is
least diamagnetic) and the magnetic susceptibility anisotropy ``MSA = chi1 - (chi2 + chi3) / 2``
(Li et al., NeuroImage 2012;59:2088). ``chi33`` is ``h_ref^T X h_ref``, the apparent
susceptibility along the reference B0 direction.

All arrays are float32; components are stacked on the last axis in :data:`TENSOR_COMPONENTS`
order.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft

from .._numba import jit, numba_threads
from ..dipole import normalize_b0_dir
from ..fft import crop_centered, kspace_grid, pad_centered, padded_shape

__all__ = [
    "TENSOR_COMPONENTS",
    "STIResult",
    "tensor_kernels",
    "tensor_forward_field",
    "project_tensor",
    "tensor_eigen",
    "deviatoric_norm_matrix",
    "check_orientations",
    "sti",
]

#: Order of the six independent tensor components on the last axis.
TENSOR_COMPONENTS: tuple[str, ...] = ("xx", "xy", "xz", "yy", "yz", "zz")
_PAIRS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
_DIAG = (0, 3, 5)

#: Minimum number of orientations for the unregularised tensor fit (six unknowns per voxel).
MIN_STI_ORIENTATIONS = 6


# ------------------------------------------------------------------------------- forward model
class _KGrid:
    """Spatial frequencies of a padded grid (real-FFT half spectrum), shared by all kernels."""

    def __init__(self, shape: Sequence[int], voxel_size_mm: Sequence[float]):
        self.shape = tuple(int(n) for n in shape)
        ks = kspace_grid(self.shape, voxel_size_mm, real=True)
        # Cross terms k_a k_b that involve a Nyquist bin are dropped (their sign is ambiguous)
        # and squares k_a^2 kept; this keeps every kernel real-even, so real-FFT products are
        # exact, and the isotropic case equal to dipole_kernel.
        self.ks = ks
        self.kz = []
        for axis, (k, n) in enumerate(zip(ks, self.shape, strict=True)):
            k = k.copy()
            if n % 2 == 0:
                k.reshape(-1)[n // 2 if axis < 2 else -1] = 0.0
            self.kz.append(k)
        k2 = ks[0] * ks[0] + ks[1] * ks[1] + ks[2] * ks[2]
        k2[0, 0, 0] = 1.0
        self.inv_k2 = (np.float32(1.0) / k2).astype(np.float32)
        self.inv_k2[0, 0, 0] = 0.0
        self.kshape = self.inv_k2.shape

    def projections(self, h: np.ndarray) -> list[np.ndarray]:
        """``g_a = (k . h) k_a / |k|^2`` for a = x, y, z (float32, half spectrum)."""
        kh = self.kz[0] * np.float32(h[0]) + self.kz[1] * np.float32(h[1])
        kh = kh + self.kz[2] * np.float32(h[2])
        q = kh * self.inv_k2
        out = []
        for a in range(3):
            nyq_sq = self.ks[a] * self.ks[a] - self.kz[a] * self.kz[a]  # k_a^2 at Nyquist only
            out.append(q * self.kz[a] + np.float32(h[a]) * nyq_sq * self.inv_k2)
        return out


def _component_kernel(c: int, h: np.ndarray, g: list[np.ndarray]) -> np.ndarray:
    """Coefficient ``C_c(k)`` of tensor component ``c`` in the field for direction ``h``."""
    a, b = _PAIRS[c]
    if a == b:
        out = np.float32(h[a] * h[a] / 3.0) - g[a] * np.float32(h[a])
    else:
        out = np.float32(2.0 * h[a] * h[b] / 3.0) - g[a] * np.float32(h[b])
        out -= g[b] * np.float32(h[a])
    out[0, 0, 0] = 0.0
    return out


def tensor_kernels(
    shape: Sequence[int], voxel_size_mm: Sequence[float], b0_dir: Sequence[float]
) -> np.ndarray:
    """STI kernels ``C_c(k)`` (6, kx, ky, kz // 2 + 1) of the six components, float32.

    Summed with ``X_c = chi`` on the diagonal and 0 elsewhere they give the scalar dipole kernel.
    """
    h = normalize_b0_dir(b0_dir)
    grid = _KGrid(shape, voxel_size_mm)
    g = grid.projections(h)
    return np.stack([_component_kernel(c, h, g) for c in range(6)])


def _check_tensor(tensor: np.ndarray, name: str = "tensor") -> np.ndarray:
    t = np.asarray(tensor, dtype=np.float32)
    if t.ndim != 4 or t.shape[-1] != 6:
        raise ValueError(
            f"{name} must have shape (x, y, z, 6) with components {TENSOR_COMPONENTS}, "
            f"got {t.shape}"
        )
    return t


def tensor_forward_field(
    tensor_ppm: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    pad_factor: float = 2.0,
    n_threads: int = 1,
) -> np.ndarray:
    """Relative field (ppm) of a susceptibility tensor map (ppm) for B0 along ``b0_dir``.

    The STI forward model (Liu 2010), evaluated on a zero-padded grid (``pad_factor`` per axis)
    with real FFTs, one component at a time.

    Parameters
    ----------
    tensor_ppm : (x, y, z, 6) array
        Tensor components in :data:`TENSOR_COMPONENTS` order, voxel frame, ppm.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    b0_dir : (3,) floats
        B0 direction in voxel coordinates.
    """
    t = _check_tensor(tensor_ppm, "tensor_ppm")
    shape = t.shape[:3]
    big = padded_shape(shape, pad_factor=pad_factor)
    h = normalize_b0_dir(b0_dir)
    grid = _KGrid(big, voxel_size_mm)
    g = grid.projections(h)
    spec = None
    for c in range(6):
        comp = t[..., c]
        if not np.any(comp):
            continue
        s = scipy.fft.rfftn(pad_centered(np.ascontiguousarray(comp), big), workers=n_threads)
        s *= _component_kernel(c, h, g)
        spec = s if spec is None else spec + s
    if spec is None:
        return np.zeros(shape, dtype=np.float32)
    field = scipy.fft.irfftn(spec, s=big, workers=n_threads)
    return np.ascontiguousarray(crop_centered(field, shape), dtype=np.float32)


def project_tensor(tensor_ppm: np.ndarray, direction: Sequence[float]) -> np.ndarray:
    """``d^T X d`` (ppm) for a unit direction ``d`` (voxel frame): chi33 when ``d`` is B0."""
    t = _check_tensor(tensor_ppm, "tensor_ppm")
    d = normalize_b0_dir(direction)
    out = np.zeros(t.shape[:3], dtype=np.float32)
    for c, (a, b) in enumerate(_PAIRS):
        w = d[a] * d[b] * (1.0 if a == b else 2.0)
        if w != 0.0:
            out += np.float32(w) * t[..., c]
    return out


def tensor_eigen(
    tensor_ppm: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (x, y, z, 3; descending, ppm) and eigenvectors (x, y, z, 3, 3).

    ``eigenvectors[..., :, i]`` is the unit eigenvector of ``eigenvalues[..., i]`` (voxel frame);
    the first is the principal direction. Voxels outside ``mask`` are zero.
    """
    t = _check_tensor(tensor_ppm, "tensor_ppm")
    shape = t.shape[:3]
    sel = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    m = np.zeros((int(sel.sum()), 3, 3), dtype=np.float32)
    vals = t[sel]
    for c, (a, b) in enumerate(_PAIRS):
        m[:, a, b] = vals[:, c]
        m[:, b, a] = vals[:, c]
    w, v = np.linalg.eigh(m)  # ascending
    evals = np.zeros(shape + (3,), dtype=np.float32)
    evecs = np.zeros(shape + (3, 3), dtype=np.float32)
    evals[sel] = w[:, ::-1]
    evecs[sel] = v[:, :, ::-1]
    return evals, evecs


# ------------------------------------------------------------------------------ inverse problem
def deviatoric_norm_matrix() -> np.ndarray:
    """6x6 ``W`` with ``x^T W x = ||X - tr(X) I / 3||_F^2`` for component vectors ``x``."""
    w = np.zeros((6, 6))
    for i in _DIAG:
        for j in _DIAG:
            w[i, j] = (1.0 if i == j else 0.0) - 1.0 / 3.0
    for i in (1, 2, 4):
        w[i, i] = 2.0
    return w


def check_orientations(b0_dirs: Sequence[Sequence[float]], *, what: str = "STI") -> np.ndarray:
    """Unit B0 directions (n, 3); raises when fewer than 2 or all (nearly) the same."""
    dirs = np.array([normalize_b0_dir(b) for b in b0_dirs])
    if len(dirs) < 2:
        raise ValueError(
            f"{what} needs at least 2 head orientations (got {len(dirs)}); use a single-"
            "orientation dipole inversion for one"
        )
    cosines = np.abs(dirs @ dirs.T)
    if np.all(cosines > np.cos(np.deg2rad(2.0))):
        raise ValueError(
            f"{what}: all {len(dirs)} B0 directions lie within 2 degrees of each other; the "
            "orientations must differ (tilt the head by 10-30 degrees between acquisitions)"
        )
    return dirs


def _outer_rank(dirs: np.ndarray) -> int:
    """Rank of the per-voxel system ``h^T X h`` over the directions (<= 6)."""
    rows = np.array([[h[a] * h[b] * (1 if a == b else 2) for a, b in _PAIRS] for h in dirs])
    s = np.linalg.svd(rows, compute_uv=False)
    return int(np.sum(s > 1e-3 * s[0]))


@dataclass
class STIResult:
    """Outputs of :func:`sti` (ppm; voxel frame of the reference orientation).

    ``tensor`` (x, y, z, 6) in :data:`TENSOR_COMPONENTS` order; ``chi33`` along the reference
    B0; ``mms`` mean magnetic susceptibility; ``eigenvalues`` (x, y, z, 3) descending and
    ``eigenvectors`` (x, y, z, 3, 3) (columns); ``msa`` = chi1 - (chi2 + chi3) / 2;
    ``iterations`` of LSQR.
    """

    tensor: np.ndarray
    chi33: np.ndarray
    mms: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    msa: np.ndarray
    iterations: int


# ------------------------------------------------------------------------------ numba kernels
# Plain Python here; _compile() swaps them for parallel numba dispatchers at the first call. They
# evaluate the STI kernels C_c(k) on the fly from the frequency axes (no kernel arrays stored).
# ``z*`` are the frequency axes with the Nyquist bin zeroed for the cross terms (see _KGrid).
_prange = range
_compiled = False
_compile_lock = threading.Lock()


def _k_coefficients(hx, hy, hz, zx, zy, zz, nx, ny, nz, inv, c):  # pragma: no cover - numba
    kh = (zx * hx + zy * hy + zz * hz) * inv
    gx = kh * zx + hx * nx * inv
    gy = kh * zy + hy * ny * inv
    gz = kh * zz + hz * nz * inv
    c[0] = hx * hx / 3.0 - gx * hx
    c[1] = 2.0 * hx * hy / 3.0 - gx * hy - gy * hx
    c[2] = 2.0 * hx * hz / 3.0 - gx * hz - gz * hx
    c[3] = hy * hy / 3.0 - gy * hy
    c[4] = 2.0 * hy * hz / 3.0 - gy * hz - gz * hy
    c[5] = hz * hz / 3.0 - gz * hz


def _k_forward(xhat, h, kx, ky, kz, nyq, out):  # pragma: no cover - numba
    """out[o] = sum_c C_oc xhat[c] for every orientation o (k-space fields)."""
    nx, ny, nz = xhat.shape[1], xhat.shape[2], xhat.shape[3]
    for i in _prange(nx):
        c = np.empty(6, dtype=np.float64)
        zx = 0.0 if i == nyq[0] else kx[i]
        nx2 = kx[i] * kx[i] - zx * zx
        for j in range(ny):
            zy = 0.0 if j == nyq[1] else ky[j]
            ny2 = ky[j] * ky[j] - zy * zy
            for k in range(nz):
                zz = 0.0 if k == nyq[2] else kz[k]
                nz2 = kz[k] * kz[k] - zz * zz
                k2 = kx[i] * kx[i] + ky[j] * ky[j] + kz[k] * kz[k]
                if k2 == 0.0:
                    for o in range(h.shape[0]):
                        out[o, i, j, k] = 0.0
                    continue
                inv = 1.0 / k2
                for o in range(h.shape[0]):
                    _k_coefficients(h[o, 0], h[o, 1], h[o, 2], zx, zy, zz, nx2, ny2, nz2, inv, c)
                    acc = 0j
                    for q in range(6):
                        acc += c[q] * xhat[q, i, j, k]
                    out[o, i, j, k] = acc


def _k_adjoint(u, h, kx, ky, kz, nyq, out):  # pragma: no cover - numba
    """out[c] = sum_o C_oc u[o] (the adjoint of _k_forward; C is real)."""
    nx, ny, nz = u.shape[1], u.shape[2], u.shape[3]
    for i in _prange(nx):
        c = np.empty(6, dtype=np.float64)
        acc = np.empty(6, dtype=np.complex128)
        zx = 0.0 if i == nyq[0] else kx[i]
        nx2 = kx[i] * kx[i] - zx * zx
        for j in range(ny):
            zy = 0.0 if j == nyq[1] else ky[j]
            ny2 = ky[j] * ky[j] - zy * zy
            for k in range(nz):
                zz = 0.0 if k == nyq[2] else kz[k]
                nz2 = kz[k] * kz[k] - zz * zz
                k2 = kx[i] * kx[i] + ky[j] * ky[j] + kz[k] * kz[k]
                for q in range(6):
                    acc[q] = 0.0
                if k2 > 0.0:
                    inv = 1.0 / k2
                    for o in range(h.shape[0]):
                        _k_coefficients(
                            h[o, 0], h[o, 1], h[o, 2], zx, zy, zz, nx2, ny2, nz2, inv, c
                        )
                        for q in range(6):
                            acc[q] += c[q] * u[o, i, j, k]
                for q in range(6):
                    out[q, i, j, k] = acc[q]


def _k_whiten(spec, h, kx, ky, kz, nyq, penalty, eps, adjoint, out):  # pragma: no cover
    """Per k, with ``N = C^T C + penalty + eps I = L L^T``: ``out = L^-T spec`` (or ``L^-1``)."""
    nx, ny, nz = spec.shape[1], spec.shape[2], spec.shape[3]
    for i in _prange(nx):
        c = np.empty(6, dtype=np.float64)
        n = np.empty((6, 6), dtype=np.float64)
        r = np.empty(6, dtype=np.complex128)
        zx = 0.0 if i == nyq[0] else kx[i]
        nx2 = kx[i] * kx[i] - zx * zx
        for j in range(ny):
            zy = 0.0 if j == nyq[1] else ky[j]
            ny2 = ky[j] * ky[j] - zy * zy
            for k in range(nz):
                zz = 0.0 if k == nyq[2] else kz[k]
                nz2 = kz[k] * kz[k] - zz * zz
                k2 = kx[i] * kx[i] + ky[j] * ky[j] + kz[k] * kz[k]
                if k2 == 0.0:
                    for q in range(6):
                        out[q, i, j, k] = 0.0
                    continue
                inv = 1.0 / k2
                for a in range(6):
                    r[a] = spec[a, i, j, k]
                    for b in range(6):
                        n[a, b] = penalty[a, b]
                    n[a, a] += eps
                for o in range(h.shape[0]):
                    _k_coefficients(h[o, 0], h[o, 1], h[o, 2], zx, zy, zz, nx2, ny2, nz2, inv, c)
                    for a in range(6):
                        for b in range(a, 6):
                            n[a, b] += c[a] * c[b]
                # Cholesky N = L L^T, stored as n[b, a] = L[a, b] in the upper triangle
                for a in range(6):
                    d = n[a, a]
                    for q in range(a):
                        d -= n[q, a] * n[q, a]
                    d = np.sqrt(max(d, 1e-30))
                    n[a, a] = d
                    for b in range(a + 1, 6):
                        e = n[a, b]
                        for q in range(a):
                            e -= n[q, a] * n[q, b]
                        n[a, b] = e / d
                if adjoint:  # L y = r
                    for a in range(6):
                        for q in range(a):
                            r[a] -= n[q, a] * r[q]
                        r[a] /= n[a, a]
                else:  # L^T x = r
                    for a in range(5, -1, -1):
                        for q in range(a + 1, 6):
                            r[a] -= n[a, q] * r[q]
                        r[a] /= n[a, a]
                for q in range(6):
                    out[q, i, j, k] = r[q]


_KERNELS = ("_k_coefficients", "_k_forward", "_k_adjoint", "_k_whiten")


def _compile() -> None:
    """Swap the kernels above for numba dispatchers (once; cached on disk where possible)."""
    global _compiled, _prange
    with _compile_lock:
        if _compiled:
            return
        import numba

        _prange = numba.prange
        g = globals()
        for name in _KERNELS:
            parallel = name != "_k_coefficients"
            g[name] = jit(g[name], parallel=parallel)
        _compiled = True


class _MaskedSystem:
    """The image-space STI system ``A X = (M F^-1 C_o F M X)_o`` on a padded grid."""

    def __init__(self, mask, voxel_size_mm, dirs, pad_factor, n_threads, penalty, eps):
        self.penalty = np.ascontiguousarray(penalty, dtype=np.float64)
        self.eps = float(eps)
        self.mask = mask
        self.shape = mask.shape
        self.big = padded_shape(mask.shape, pad_factor=pad_factor)
        ks = kspace_grid(self.big, voxel_size_mm, real=True)
        self.k = [np.ascontiguousarray(k.reshape(-1), dtype=np.float64) for k in ks]
        self.nyq = np.array(
            [n // 2 if n % 2 == 0 else -1 for n in self.big[:2]]
            + [self.k[2].size - 1 if self.big[2] % 2 == 0 else -1],
            dtype=np.int64,
        )
        self.h = np.ascontiguousarray(dirs, dtype=np.float64)
        self.kshape = (self.k[0].size, self.k[1].size, self.k[2].size)
        self.n_threads = n_threads

    def fft(self, vols) -> np.ndarray:
        """Real FFTs of the masked volumes, zero-padded."""
        out = np.empty((len(vols),) + self.kshape, dtype=np.complex64)
        for q, v in enumerate(vols):
            v = pad_centered(np.where(self.mask, v, np.float32(0)), self.big)
            out[q] = scipy.fft.rfftn(v, workers=self.n_threads)
        return out

    def ifft(self, spec) -> np.ndarray:
        """Inverse real FFTs, cropped and masked."""
        out = np.empty((spec.shape[0],) + self.shape, dtype=np.float32)
        for q in range(spec.shape[0]):
            img = scipy.fft.irfftn(spec[q], s=self.big, workers=self.n_threads)
            out[q] = np.where(self.mask, crop_centered(img, self.shape), np.float32(0))
        return out

    def _whiten(self, spec: np.ndarray, adjoint: bool) -> np.ndarray:
        out = np.empty_like(spec)
        _k_whiten(spec, self.h, *self.k, self.nyq, self.penalty, self.eps, adjoint, out)
        return out

    def fields(self, x: np.ndarray) -> np.ndarray:
        """Tensor -> masked fields of every orientation (ppm)."""
        spec = self.fft(x)
        out = np.empty((self.h.shape[0],) + self.kshape, dtype=np.complex64)
        _k_forward(spec, self.h, *self.k, self.nyq, out)
        del spec
        return self.ifft(out)

    def fields_adjoint(self, u: np.ndarray) -> np.ndarray:
        spec = self.fft(u)
        out = np.empty((6,) + self.kshape, dtype=np.complex64)
        _k_adjoint(spec, self.h, *self.k, self.nyq, out)
        del spec
        return self.ifft(out)

    def initial(self, data: np.ndarray) -> np.ndarray:
        """Per-k (unmasked) least squares ``X = M F^-1 N^-1 C^T F M b``."""
        spec = self.fft(data)
        rhs = np.empty((6,) + self.kshape, dtype=np.complex64)
        _k_adjoint(spec, self.h, *self.k, self.nyq, rhs)
        del spec
        return self.ifft(self._whiten(self._whiten(rhs, adjoint=True), adjoint=False))


def _lsqr(matvec, rmatvec, b, x0, max_iter: int, tol: float, damp_op=None):
    """LSQR (Paige & Saunders, ACM TOMS 1982) for ``min ||A x - b||^2 + ||P x||^2`` from ``x0``.

    ``damp_op`` (optional) is ``P`` as a pair (apply, apply_adjoint) on x-shaped arrays; it is
    handled as extra rows of the system. Returns the solution and the number of iterations.
    """

    def a_op(x):
        out = [matvec(x)]
        if damp_op is not None:
            out.append(damp_op[0](x))
        return out

    def at_op(u):
        out = rmatvec(u[0])
        if damp_op is not None:
            out += damp_op[1](u[1])
        return out

    def norm(vs):
        # float64 sums of squares; no BLAS (its threads oversubscribe numba's and the FFT's)
        return float(np.sqrt(sum(float(np.sum(v * v, dtype=np.float64)) for v in vs)))

    r0 = a_op(x0)
    u = [b - r0[0]] + ([-r0[1]] if damp_op is not None else [])
    del r0
    beta = norm(u)
    x = x0.copy()
    if beta == 0.0:
        return x, 0
    u = [a / np.float32(beta) for a in u]
    v = at_op(u)
    alpha = norm([v])
    if alpha == 0.0:
        return x, 0
    v /= np.float32(alpha)
    w = v.copy()
    phibar, rhobar = beta, alpha
    arnorm0 = alpha * beta
    it = 0
    while it < max_iter:
        it += 1
        av = a_op(v)
        u = [a - np.float32(alpha) * b_ for a, b_ in zip(av, u, strict=True)]
        del av
        beta = norm(u)
        if beta > 0:
            u = [a / np.float32(beta) for a in u]
        v = at_op(u) - np.float32(beta) * v
        alpha = norm([v])
        if alpha > 0:
            v /= np.float32(alpha)
        rho = float(np.hypot(rhobar, beta))
        c, s = rhobar / rho, beta / rho
        theta = s * alpha
        rhobar = -c * alpha
        phi = c * phibar
        phibar = s * phibar
        x += np.float32(phi / rho) * w
        w = v - np.float32(theta / rho) * w
        # stop when the normal-equation residual ||A^T r|| has dropped by ``tol``
        if phibar * alpha * abs(c) <= tol * arnorm0 or alpha == 0 or beta == 0:
            break
    return x, it


def sti(
    fields_ppm: Sequence[np.ndarray],
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dirs: Sequence[Sequence[float]],
    *,
    regularization: float = 0.0,
    reference_b0: Sequence[float] | None = None,
    max_iter: int = 13,
    tol: float = 1e-3,
    kspace_damping: float = 1e-3,
    mean_iter: int = 8,
    init_mean: np.ndarray | None = None,
    pad_factor: float = 1.0,
    n_threads: int = 1,
) -> STIResult:
    """Susceptibility tensor from local fields of several head orientations (Liu 2010).

    Two stages: (1) the k-space system of all orientations, which decouples per spatial
    frequency, is solved per k in closed form (normal equations of the six components, damped by
    ``kspace_damping`` per orientation) and its mean (trace / 3) is replaced by masked COSMOS
    (``mean_iter`` CG iterations, or ``init_mean``), which the zero-filled k-space solution gets
    wrong near the mask edge; (2) LSQR (as in Liu 2010) refines it on the image-space
    system ``min_X sum_i ||M (F^-1 C_i F M X - b_i)||^2`` in which fields are used only inside
    the mask ``M`` (outside it they are unknown, not zero) and the tensor is supported in it.
    With ``regularization`` (lambda) > 0 both stages add ``lambda ||X - tr(X) I / 3||^2``, a
    Tikhonov penalty on the anisotropic (traceless) part, which makes fewer than 6 orientations
    usable: the mean susceptibility is then determined as in COSMOS, the anisotropy is damped.

    Parameters
    ----------
    fields_ppm : sequence of (x, y, z) arrays
        Local fields (ppm), all already in the reference voxel frame (registered).
    mask : (x, y, z) bool
        Region where every field is valid (the intersection of the registered masks).
    voxel_size_mm : (3,) floats
        Voxel size of the reference grid, mm.
    b0_dirs : sequence of (3,) floats
        B0 direction of each orientation in the reference voxel frame.
    regularization : float
        Weight lambda of the anisotropy penalty (0: plain STI, needs >= 6 orientations).
    reference_b0 : (3,) floats
        Direction of chi33 (default: the first orientation's B0).
    max_iter, tol : int, float
        LSQR iteration limit (0: the k-space solution only) and the relative normal-equation
        residual to stop at.
    kspace_damping : float
        Damping (per orientation) of the per-k normal equations of the first stage.
    mean_iter : int
        CG iterations of the masked COSMOS start for the mean susceptibility (0: none).
    init_mean : (x, y, z) array, optional
        A mean susceptibility (ppm) to start from instead (e.g. a COSMOS map).
    pad_factor : float
        Zero padding per axis before the FFT (1: fast FFT lengths only). Fields and tensor are
        confined to the mask, so the circular wrap-around of the far field costs little: on the
        2 mm benchmark head chi33 NRMSE is 15.0 % without padding and 14.9 % with 1.25x, at
        about 60 % of the time.
    n_threads : int
        FFT workers.
    """
    fields = [np.asarray(f, dtype=np.float32) for f in fields_ppm]
    mask = np.asarray(mask, dtype=bool)
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    if len(fields) != len(b0_dirs):
        raise ValueError(
            f"got {len(fields)} fields but {len(b0_dirs)} B0 directions; give one per field"
        )
    if regularization == 0 and len(fields) < MIN_STI_ORIENTATIONS:
        raise ValueError(
            f"STI needs at least {MIN_STI_ORIENTATIONS} head orientations to solve for the 6 "
            f"tensor components, got {len(fields)}; acquire more orientations or set "
            "regularization > 0 for the regularised variant"
        )
    dirs = check_orientations(b0_dirs, what="STI")
    if regularization == 0 and _outer_rank(dirs) < 6:
        raise ValueError(
            f"STI: the {len(dirs)} B0 directions do not determine the 6 tensor components "
            "(they are too similar or coplanar); use more distinct head tilts or set "
            "regularization > 0"
        )
    for i, f in enumerate(fields):
        if f.shape != mask.shape:
            raise ValueError(
                f"field {i} has shape {f.shape} but the mask has {mask.shape}; resample every "
                "orientation to the reference grid first (RegisterOrientations)"
            )
    data = np.stack([np.where(mask, f, np.float32(0)) for f in fields])
    del fields
    w = deviatoric_norm_matrix()
    penalty = regularization * w
    system = _MaskedSystem(
        mask, voxel_size_mm, dirs, pad_factor, n_threads, penalty, kspace_damping * len(dirs)
    )
    damp = None
    if regularization > 0:
        scale = np.float32(np.sqrt(regularization))
        off = np.float32(np.sqrt(2.0))

        def deviatoric(x):
            out = x * scale
            trace = (x[0] + x[3] + x[5]) * (scale / np.float32(3))
            for c in _DIAG:
                out[c] -= trace
            for c in (1, 2, 4):
                out[c] *= off
            return out

        damp = (deviatoric, deviatoric)
    _compile()
    with numba_threads(n_threads):
        x = system.initial(data)
        if init_mean is None and mean_iter > 0:
            from .cosmos import cosmos_cg

            init_mean = cosmos_cg(
                list(data), mask, voxel_size_mm, dirs, max_iter=mean_iter, n_threads=n_threads
            )
        if init_mean is not None:
            shift = np.where(mask, init_mean, np.float32(0)) - (x[0] + x[3] + x[5]) / np.float32(3)
            for c in _DIAG:
                x[c] += shift
            del shift
        iters = 0
        if max_iter > 0:
            x, iters = _lsqr(system.fields, system.fields_adjoint, data, x, max_iter, tol, damp)
    del data
    tensor = np.ascontiguousarray(np.moveaxis(x, 0, -1))
    del x
    ref = dirs[0] if reference_b0 is None else normalize_b0_dir(reference_b0)
    evals, evecs = tensor_eigen(tensor, mask)
    mms = (tensor[..., 0] + tensor[..., 3] + tensor[..., 5]) / np.float32(3)
    msa = evals[..., 0] - np.float32(0.5) * (evals[..., 1] + evals[..., 2])
    return STIResult(
        tensor=tensor,
        chi33=project_tensor(tensor, ref),
        mms=mms.astype(np.float32),
        eigenvalues=evals,
        eigenvectors=evecs,
        msa=msa.astype(np.float32),
        iterations=iters,
    )
