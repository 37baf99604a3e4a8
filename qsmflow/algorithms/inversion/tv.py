"""Total-variation dipole inversion by ADMM, with a linear or a nonlinear (complex) data term.

The problem solved is

    chi = argmin  data(D chi, f)  +  lambda * || M grad chi ||_1

with ``D chi = ifft(D(k) fft(chi))`` the field of chi (ppm), ``f`` the local field (ppm), ``grad``
forward differences per mm and ``M`` optional per-voxel gradient weights (0 across magnitude
edges). Two data terms are offered:

* ``"linear"``: ``1/2 || W (D chi - f) ||^2`` (Bilgic et al. 2014; with the weights ``W`` and the
  extra splitting variable of Milovic et al. 2018);
* ``"nonlinear"``: ``|| W (exp(i s f) - exp(i s D chi)) ||^2 / s^2`` with ``s`` the phase per ppm
  (``s = 2 pi gamma_bar B0 TE 1e-6`` rad/ppm), the complex-exponential term of FANSI (Milovic et
  al. 2018). Dividing by ``s^2`` makes it equal ``1/2 || W (D chi - f) ||^2`` to second order, so
  ``lambda`` means the same for both terms; it differs where the phase error is large (veins,
  calcifications, noisy voxels), where the complex term saturates instead of growing
  quadratically.

ADMM splits ``z = grad chi`` (soft thresholding) and ``y = D chi`` (a per-voxel data-term step:
closed form for the linear term, Newton iterations for the nonlinear one), so that the chi
update is a division in k-space by ``mu D^2 + rho |E|^2`` (``E`` the symbols of the forward
differences, :func:`._common.gradient_symbols`). The volume is cropped to the mask's bounding
box and padded to a fast FFT length with a margin (:mod:`qsmflow.algorithms.fft`); the
gradients are periodic on that grid.

Units: chi and fields in ppm, voxel sizes in mm, so ``lambda`` is in ppm * mm (the data term sums
ppm^2 per voxel, the TV term ppm/mm per voxel) and ``rho`` in mm^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from ... import GAMMA_BAR_MHZ_PER_T
from ..dipole import dipole_kernel
from ..fft import crop_centered, pad_centered, padded_shape
from ._common import check_inversion_inputs, divergence, gradient, gradient_symbols

__all__ = [
    "tv_admm",
    "tv_lambda_lcurve",
    "data_weights",
    "edge_weights",
    "phase_per_ppm",
    "TV_LAMBDA_PPM_MM",
]

#: Default TV weight per mm of mean voxel size (ppm); ``lambda = TV_LAMBDA_PPM_MM * mean(vox)``.
TV_LAMBDA_PPM_MM = 2.0e-4


def phase_per_ppm(b0_tesla: float, te_s: float) -> float:
    """Phase (rad) accrued per ppm of field at echo time ``te_s`` and field ``b0_tesla``.

    ``2 pi gamma_bar B0 TE`` with gamma_bar in MHz/T: the MHz and the ppm's 1e-6 cancel.
    """
    if not b0_tesla > 0 or not te_s > 0:
        raise ValueError(f"b0_tesla and te_s must be positive, got {b0_tesla}, {te_s}")
    return 2.0 * np.pi * GAMMA_BAR_MHZ_PER_T * b0_tesla * te_s


def data_weights(magnitude: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
    """Data-fidelity weights: the magnitude divided by its mean in ``mask``, 0 outside.

    The phase noise of a voxel is inversely proportional to its magnitude, so weighting the
    field residual by the magnitude whitens it. Without a magnitude the weights are the mask.
    float32, same shape as ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    if magnitude is None:
        return mask.astype(np.float32)
    mag = np.abs(np.asarray(magnitude, dtype=np.float32))
    inside = mag[mask]
    if not np.all(np.isfinite(inside)):
        raise ValueError("the magnitude has NaN or Inf inside the mask")
    mean = float(inside.mean())
    if mean <= 0:
        raise ValueError("the magnitude is zero everywhere inside the mask")
    return np.where(mask, mag / np.float32(mean), np.float32(0)).astype(np.float32)


def edge_weights(
    magnitude: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    edge_fraction: float = 0.3,
) -> np.ndarray:
    """Binary gradient weights that leave magnitude edges unpenalised (MEDI-style).

    The magnitude's forward differences are taken per axis; inside the mask the largest
    ``edge_fraction`` of them (per axis) are marked as edges and get weight 0, everything else
    weight 1 (Liu T et al., Magn Reson Med 2011;66:777, "morphology enabled dipole inversion";
    Milovic et al. 2018 use the same weighting in FANSI). Differences that cross the mask
    boundary are not edges: the boundary is no tissue interface.

    Returns
    -------
    numpy.ndarray
        float32 weights of shape ``(3, *mask.shape)``.
    """
    if not 0 <= edge_fraction < 1:
        raise ValueError(f"edge_fraction must be in [0, 1), got {edge_fraction}")
    mask = np.asarray(mask, dtype=bool)
    mag = np.where(mask, np.abs(np.asarray(magnitude, dtype=np.float32)), np.float32(0))
    grad = np.abs(gradient(mag, voxel_size_mm))
    weights = np.ones(grad.shape, dtype=np.float32)
    if edge_fraction == 0:
        return weights
    for axis in range(3):
        both = mask & np.roll(mask, -1, axis=axis)
        values = grad[axis][both]
        if values.size == 0:
            continue
        level = np.quantile(values, 1.0 - edge_fraction)
        weights[axis][both & (grad[axis] > level)] = 0.0
    return weights


@dataclass
class _Problem:
    """A TV inversion on its padded working grid (everything float32 / complex64)."""

    box: tuple[slice, ...]  # bounding box of the mask in the input volume
    box_shape: tuple[int, ...]
    shape: tuple[int, ...]  # padded working grid
    vox: tuple[float, float, float]
    inside: np.ndarray  # flat indices of mask voxels on the working grid
    f_in: np.ndarray  # field at those voxels (ppm)
    w2_in: np.ndarray  # squared data weights there
    tv_w: np.ndarray | float  # gradient weights, (3, *shape) or 1.0
    kernel: np.ndarray  # D(k), half spectrum
    lap: np.ndarray  # |E(k)|^2, half spectrum (1/mm^2)
    n_threads: int


@dataclass
class _State:
    """ADMM variables carried between calls (warm starts along an L-curve)."""

    chi: np.ndarray
    dchi: np.ndarray  # D chi
    u: np.ndarray  # scaled dual of z = grad chi, (3, *shape)
    zu: np.ndarray  # z - u
    y_in: np.ndarray  # data-split variable y = D chi at mask voxels
    uy_in: np.ndarray  # its scaled dual
    info: dict = field(default_factory=dict)


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def _prepare(
    field: np.ndarray,
    roi: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float],
    *,
    magnitude: np.ndarray | None,
    data_weighting: bool,
    magnitude_weighting: bool,
    edge_fraction: float,
    pad_voxels: int,
    n_threads: int,
) -> _Problem:
    vox = tuple(float(v) for v in np.asarray(voxel_size_mm, dtype=np.float64).reshape(3))
    idx = [np.flatnonzero(roi.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
    box_shape = tuple(s.stop - s.start for s in box)
    shape = padded_shape(box_shape, pad_factor=1.0, min_margin=int(pad_voxels))
    roi_p = pad_centered(roi[box], shape)
    inside = np.flatnonzero(roi_p)
    f_in = pad_centered(field[box], shape).reshape(-1)[inside]
    weights = data_weights(
        magnitude[box] if (magnitude is not None and data_weighting) else None, roi[box]
    )
    w2_in = pad_centered(weights, shape).reshape(-1)[inside] ** 2
    tv_w: np.ndarray | float = 1.0
    if magnitude is not None and magnitude_weighting and edge_fraction > 0:
        mag_p = pad_centered(np.asarray(magnitude, dtype=np.float32)[box], shape)
        tv_w = edge_weights(mag_p, roi_p, vox, edge_fraction=edge_fraction)
    kernel = dipole_kernel(shape, vox, b0_dir, real=True)
    lap = np.zeros(kernel.shape, dtype=np.float32)
    for sym in gradient_symbols(shape, vox, real=True):
        lap = lap + (sym.real * sym.real + sym.imag * sym.imag).astype(np.float32)
    return _Problem(
        box=box,
        box_shape=box_shape,
        shape=shape,
        vox=vox,
        inside=inside,
        f_in=f_in.astype(np.float32),
        w2_in=w2_in.astype(np.float32),
        tv_w=tv_w,
        kernel=kernel,
        lap=lap,
        n_threads=int(n_threads),
    )


def _initial_state(prob: _Problem) -> _State:
    return _State(
        chi=np.zeros(prob.shape, np.float32),
        dchi=np.zeros(prob.shape, np.float32),
        u=np.zeros((3, *prob.shape), np.float32),
        zu=np.zeros((3, *prob.shape), np.float32),
        y_in=prob.f_in.copy(),
        uy_in=np.zeros_like(prob.f_in),
    )


def _data_step(
    prob: _Problem,
    r: np.ndarray,
    y_prev: np.ndarray,
    mu: float,
    phase_scale: float | None,
    newton_iter: int,
) -> np.ndarray:
    """argmin_y data(y) + mu/2 (y - r)^2 per mask voxel (linear: closed form; else Newton)."""
    w2, f = prob.w2_in, prob.f_in
    if phase_scale is None:
        return (w2 * f + np.float32(mu) * r) / (w2 + np.float32(mu))
    # Nonlinear: data(y) = w2 (1 - cos(s (y - f))) / s^2. Newton from the previous y; where the
    # curvature w2 cos + mu is not positive (phase error beyond pi/2) the step uses the bound
    # w2 + mu on the curvature instead, which always descends.
    s = np.float32(phase_scale)
    mu32 = np.float32(mu)
    y = y_prev.copy()
    for _ in range(newton_iter):
        arg = s * (y - f)
        sin, cos = np.sin(arg), np.cos(arg)
        grad = w2 * sin / s + mu32 * (y - r)
        curv = np.where(cos > 0, w2 * cos, w2) + mu32
        step = grad / curv
        y -= step
        if float(np.abs(step).max(initial=0.0)) < 1e-6:
            break
    return y


def _admm(
    prob: _Problem,
    state: _State,
    *,
    lambda_: float,
    rho: float,
    mu: float,
    max_iter: int,
    tol: float,
    phase_scale: float | None,
    newton_iter: int,
) -> _State:
    """Run scaled ADMM from ``state`` (updated in place and returned)."""
    shape, vox, nt = prob.shape, prob.vox, prob.n_threads
    kernel = prob.kernel
    denom = np.float32(mu) * kernel * kernel + np.float32(rho) * prob.lap
    denom[0, 0, 0] = 1.0  # D(0) = E(0) = 0: the mean of chi is not determined; keep it 0
    inv_denom = (1.0 / denom).astype(np.float32)
    inv_denom[0, 0, 0] = 0.0
    thr = np.float32(lambda_ / rho) * prob.tv_w
    if np.ndim(thr) == 0:
        thr = np.float32(thr)
    inside = prob.inside
    chi, u, zu = state.chi, state.u, state.zu
    y_in, uy_in = state.y_in, state.uy_in
    dchi = state.dchi
    update = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        # chi update: (mu D^2 + rho |E|^2) X = rho F(grad^T (z - u)) + mu D F(y - u_y), where
        # y - u_y is D chi outside the mask (no data there: y = D chi, u_y = 0).
        q = dchi
        q.reshape(-1)[inside] = y_in - uy_in
        spec = scipy.fft.rfftn(q, workers=nt)
        spec *= kernel
        spec *= np.float32(mu)
        spec -= np.float32(rho) * scipy.fft.rfftn(divergence(zu, vox), workers=nt)
        spec *= inv_denom
        chi_new = scipy.fft.irfftn(spec, s=shape, workers=nt)
        diff = chi_new - chi
        norm = float(np.sqrt(np.dot(chi_new.reshape(-1), chi_new.reshape(-1))))
        update = float(np.sqrt(np.dot(diff.reshape(-1), diff.reshape(-1)))) / max(norm, 1e-30)
        chi = chi_new
        del diff, chi_new
        # z update (soft threshold) and its dual: v = grad chi + u, u' = clip(v), z = v - u'
        v = gradient(chi, vox)
        v += u
        np.clip(v, -thr, thr, out=u)
        v -= u
        v -= u
        zu = v  # z - u'
        # y update at mask voxels, and its dual; outside the mask y = D chi exactly
        spec *= kernel
        dchi = scipy.fft.irfftn(spec, s=shape, workers=nt)
        del spec
        r = dchi.reshape(-1)[inside] + uy_in
        y_in = _data_step(prob, r, y_in, mu, phase_scale, newton_iter)
        uy_in = r - y_in
        if update < tol:
            break
    state.chi, state.dchi, state.u, state.zu, state.y_in, state.uy_in = (
        chi,
        dchi,
        u,
        zu,
        y_in,
        uy_in,
    )
    state.info = {"iterations": it, "update": update}
    return state


def _objective_terms(prob: _Problem, chi: np.ndarray) -> tuple[float, float]:
    """Weighted data residual ||W (D chi - f)|| (ppm) and weighted TV sum |M grad chi| over the
    working grid."""
    spec = scipy.fft.rfftn(chi, workers=prob.n_threads)
    spec *= prob.kernel
    dchi = scipy.fft.irfftn(spec, s=prob.shape, workers=prob.n_threads).reshape(-1)[prob.inside]
    res = dchi - prob.f_in
    residual = float(np.sqrt(np.dot(res * prob.w2_in, res)))
    tv = float(np.sum(np.abs(gradient(chi, prob.vox) * prob.tv_w), dtype=np.float64))
    return residual, tv


def _lcurve_corner(residual: np.ndarray, regnorm: np.ndarray) -> int:
    """Index of the point of maximum curvature of the log-log L-curve (Hansen 1992).

    The curve is parametrised by the index (log-spaced lambdas); curvature from centred
    differences. End points are never chosen.
    """
    x = np.log(np.asarray(residual, dtype=np.float64))
    y = np.log(np.asarray(regnorm, dtype=np.float64))
    dx, dy = np.gradient(x), np.gradient(y)
    ddx, ddy = np.gradient(dx), np.gradient(dy)
    kappa = (dx * ddy - ddx * dy) / np.maximum((dx * dx + dy * dy) ** 1.5, 1e-30)
    kappa[0] = kappa[-1] = -np.inf
    return int(np.argmax(kappa))


def _finish(prob: _Problem, roi: np.ndarray, chi_p: np.ndarray) -> np.ndarray:
    out = np.zeros(roi.shape, np.float32)
    out[prob.box] = crop_centered(chi_p, prob.box_shape)
    out[~roi] = 0.0
    return out


def _validate_options(
    rho: float, mu: float, max_iter: int, tol: float, data_term: str, newton_iter: int
) -> None:
    _check_positive("rho", rho)
    _check_positive("mu", mu)
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if data_term not in ("linear", "nonlinear"):
        raise ValueError(f"data_term must be 'linear' or 'nonlinear', got {data_term!r}")
    if int(newton_iter) < 1:
        raise ValueError(f"newton_iter must be >= 1, got {newton_iter}")


def tv_lambda_lcurve(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    lambdas: Sequence[float] | None = None,
    rho: float | None = None,
    mu: float = 1.0,
    iter_per_lambda: int = 40,
    data_weighting: bool = True,
    magnitude_weighting: bool = True,
    edge_fraction: float = 0.3,
    pad_voxels: int = 8,
    n_threads: int = 1,
) -> tuple[float, dict[str, np.ndarray]]:
    """Pick the TV weight at the corner of the L-curve (linear data term).

    The problem of :func:`tv_admm` is solved for each ``lambda`` (from the largest down, each
    solve warm-started from the previous one, ``iter_per_lambda`` ADMM iterations), and the
    lambda where the curve ``(log ||W (D chi - f)||, log ||M grad chi||_1)`` bends most is
    returned (Hansen PC, SIAM Rev 1992;34:561; used for TV-QSM by Bilgic et al., Magn Reson Med
    2014;72:1444).

    Parameters
    ----------
    local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude
        As for :func:`tv_admm`.
    lambdas : sequence of float, optional
        Candidate weights (ppm * mm), at least 5 and log-spaced for the curvature to mean
        anything; default 9 values from 1/10 to 10 times the default lambda.
    rho, mu, data_weighting, magnitude_weighting, edge_fraction, pad_voxels, n_threads
        As for :func:`tv_admm`; ``rho`` defaults to ``lambda`` times the factor used there,
        taken at the geometric middle of ``lambdas``.
    iter_per_lambda : int
        ADMM iterations per candidate.

    Returns
    -------
    lambda_ : float
        The weight at the corner.
    curve : dict
        ``lambdas``, ``residual`` (ppm, weighted 2-norm) and ``tv`` (weighted 1-norm of the
        gradient, ppm/mm summed over voxels), in the order of ``lambdas`` sorted descending.
    """
    field, roi = check_inversion_inputs(
        local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude=magnitude
    )
    vox_mean = float(np.mean(np.asarray(voxel_size_mm, dtype=np.float64)))
    if lambdas is None:
        lambdas = TV_LAMBDA_PPM_MM * vox_mean * np.logspace(-1, 1, 9)
    lams = np.sort(np.asarray(lambdas, dtype=np.float64).reshape(-1))[::-1]
    if lams.size < 5 or np.any(~np.isfinite(lams)) or np.any(lams <= 0):
        raise ValueError("lambdas must hold at least 5 positive values")
    if rho is None:
        rho = _default_rho(float(np.exp(np.mean(np.log(lams)))), vox_mean)
    _validate_options(rho, mu, iter_per_lambda, 0.0, "linear", 1)
    prob = _prepare(
        field,
        roi,
        voxel_size_mm,
        b0_dir,
        magnitude=magnitude,
        data_weighting=data_weighting,
        magnitude_weighting=magnitude_weighting,
        edge_fraction=edge_fraction,
        pad_voxels=pad_voxels,
        n_threads=n_threads,
    )
    state = _initial_state(prob)
    residual, tv = [], []
    for lam in lams:
        state = _admm(
            prob,
            state,
            lambda_=float(lam),
            rho=rho,
            mu=mu,
            max_iter=int(iter_per_lambda),
            tol=0.0,
            phase_scale=None,
            newton_iter=1,
        )
        res, reg = _objective_terms(prob, state.chi)
        residual.append(res)
        tv.append(reg)
    best = _lcurve_corner(np.array(residual), np.array(tv))
    curve = {"lambdas": lams, "residual": np.array(residual), "tv": np.array(tv)}
    return float(lams[best]), curve


#: rho = RHO_PER_LAMBDA * lambda / mean voxel size ... see tv_admm
_RHO_MM2 = 1.0


def _default_rho(lambda_: float, vox_mean: float) -> float:
    return _RHO_MM2 * vox_mean * vox_mean


def tv_admm(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    lambda_: float | str | None = None,
    rho: float | None = None,
    mu: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-3,
    data_term: str = "linear",
    magnitude_weighting: bool = True,
    data_weighting: bool = True,
    edge_fraction: float = 0.3,
    b0_tesla: float = 3.0,
    te_s: float = 0.02,
    newton_iter: int = 3,
    pad_voxels: int = 8,
    n_threads: int = 1,
) -> np.ndarray:
    """Total-variation regularised dipole inversion solved by ADMM (linear or nonlinear).

    Solves ``argmin_chi data(D chi, f) + lambda ||M grad chi||_1`` (see the module docstring)
    by ADMM with the splits ``z = grad chi`` and ``y = D chi``: the chi update is a k-space
    division, the z update a soft threshold and the y update per voxel (closed form for the
    linear term, Newton steps for the nonlinear one), as in FANSI (Milovic et al. 2018); without
    weights the linear case is the fast TV method of Bilgic et al. (2014).

    Parameters
    ----------
    local_field_ppm : (x, y, z) array
        Local (background-free) field in ppm of B0.
    mask : (x, y, z) bool array
        Region where the field is valid; the output is zero outside it.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    b0_dir : (3,) floats
        B0 direction in voxel coordinates.
    magnitude : (x, y, z) array, optional
        Magnitude image (any scale; e.g. the root-sum-of-squares over echoes). Gives the data
        weights (:func:`data_weights`, ``data_weighting``) and the gradient weights
        (:func:`edge_weights`, ``magnitude_weighting``).
    lambda_ : float, "auto" or None
        TV weight in ppm * mm. None: ``TV_LAMBDA_PPM_MM * mean(voxel_size_mm)`` (2e-4 ppm per mm
        of voxel size), chosen on simulated heads with a field noise of ~0.002 ppm (the noise
        of a 3 T multi-echo scan at SNR ~ 30-100 in ppm). The factor of the voxel size keeps
        the soft threshold ``lambda / rho`` on the *voxel-to-voxel jump* (``grad`` is per mm)
        the same at every resolution. The noise in ppm falls as the field strength rises
        (more SNR and more phase per ppm): at 7 T about half the 3 T value works. "auto":
        the L-curve corner of :func:`tv_lambda_lcurve` (about 9 extra solves).
    rho : float, optional
        ADMM penalty of the gradient split, mm^2; default ``mean(voxel_size_mm)^2`` so that
        ``rho |E|^2`` is of order one at every resolution.
    mu : float
        ADMM penalty of the data split (dimensionless: the data weights have mean 1).
    max_iter : int
        Maximum ADMM iterations.
    tol : float
        Stop when the relative change of chi between iterations, ``||dchi|| / ||chi||``, is
        below this.
    data_term : {"linear", "nonlinear"}
        Quadratic field residual, or the complex-exponential (phase) residual.
    magnitude_weighting : bool
        With ``magnitude``: leave the strongest magnitude edges unregularised (MEDI-style
        gradient weights).
    data_weighting : bool
        With ``magnitude``: weight the data term by the normalised magnitude.
    edge_fraction : float
        Fraction of in-mask voxel differences (per axis) treated as edges.
    b0_tesla, te_s : float
        Field strength (T) and echo time (s) that set the phase per ppm of the nonlinear term,
        ``phase = 2 pi gamma_bar B0 TE 1e-6 * field_ppm`` (16 rad/ppm at 3 T, 20 ms). For a
        multi-echo field use the echo time whose phase noise the data weights describe (e.g.
        the magnitude-weighted mean TE). Unused for the linear term.
    newton_iter : int
        Newton steps per ADMM iteration for the nonlinear y update (warm-started).
    pad_voxels : int
        Margin (voxels) around the mask's bounding box on the periodic working grid.
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    numpy.ndarray
        float32 susceptibility in ppm, zero outside ``mask``; its mean is arbitrary.

    References
    ----------
    Bilgic B, Fan AP, Polimeni JR, Cauley SF, Bianciardi M, Adalsteinsson E, Wald LL, Setsompop
    K. Fast quantitative susceptibility mapping with L1-regularization and automatic parameter
    selection. Magn Reson Med 2014;72:1444-1459.
    Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear susceptibility
    inversion with variational regularization. Magn Reson Med 2018;80:814-821.
    Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI) from a
    single-angle acquisition. Magn Reson Med 2011;66:777-783.
    """
    field, roi = check_inversion_inputs(
        local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude=magnitude
    )
    vox_mean = float(np.mean(np.asarray(voxel_size_mm, dtype=np.float64)))
    if rho is None:
        rho = _default_rho(0.0, vox_mean)
    _validate_options(rho, mu, max_iter, tol, data_term, newton_iter)
    if isinstance(lambda_, str):
        if lambda_ != "auto":
            raise ValueError(f"lambda_ must be a positive number, None or 'auto', got {lambda_!r}")
        lambda_, _ = tv_lambda_lcurve(
            field,
            roi,
            voxel_size_mm,
            b0_dir,
            magnitude=magnitude,
            rho=rho,
            mu=mu,
            data_weighting=data_weighting,
            magnitude_weighting=magnitude_weighting,
            edge_fraction=edge_fraction,
            pad_voxels=pad_voxels,
            n_threads=n_threads,
        )
    elif lambda_ is None:
        lambda_ = TV_LAMBDA_PPM_MM * vox_mean
    lambda_ = _check_positive("lambda_", lambda_)
    phase_scale = phase_per_ppm(b0_tesla, te_s) if data_term == "nonlinear" else None
    prob = _prepare(
        field,
        roi,
        voxel_size_mm,
        b0_dir,
        magnitude=magnitude,
        data_weighting=data_weighting,
        magnitude_weighting=magnitude_weighting,
        edge_fraction=edge_fraction,
        pad_voxels=pad_voxels,
        n_threads=n_threads,
    )
    state = _admm(
        prob,
        _initial_state(prob),
        lambda_=lambda_,
        rho=rho,
        mu=mu,
        max_iter=max_iter,
        tol=tol,
        phase_scale=phase_scale,
        newton_iter=newton_iter,
    )
    return _finish(prob, roi, state.chi)
