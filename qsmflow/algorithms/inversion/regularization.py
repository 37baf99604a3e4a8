"""Choosing a regularisation weight: L-curve corner and discrepancy principle.

The closed-form Tikhonov inversion is diagonal in k-space, so its data misfit and penalty norms
for a whole grid of weights follow from one spectrum by Parseval's theorem, without a single
inverse FFT (:func:`tikhonov_norms`). The two selection rules work on any pair of norm curves:

* :func:`lcurve_corner`: the weight at the maximum curvature of the L-curve
  ``(log ||A chi - f||, log ||R chi||)`` (Hansen & O'Leary, SIAM J Sci Comput 1993;14:1487);
* :func:`discrepancy_lambda`: the weight whose misfit equals the expected norm of the noise
  (Morozov's discrepancy principle; Morozov, Soviet Math Dokl 1966;7:414).

Both are known to over-regularise QSM somewhat (Milovic et al., Magn Reson Med 2021;85:1931):
the L-curve corner removes the streaks at the price of some contrast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["tikhonov_norms", "lcurve_corner", "discrepancy_lambda"]

# Elements per block of the vectorised norm evaluation: (n_lambdas, block) float32 temporaries.
_BLOCK = 1 << 16


def tikhonov_norms(
    power: np.ndarray,
    kernel_sq: np.ndarray,
    penalty: np.ndarray | float,
    lambdas: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Misfit and penalty norms of the Tikhonov solutions for a grid of weights.

    For ``chi(k) = D(k) F(k) / (D(k)^2 + lam R(k))`` the residual is
    ``D chi - F = -F lam R / (D^2 + lam R)`` and ``R^(1/2) chi = F D R^(1/2) / (D^2 + lam R)``,
    so both squared norms are weighted sums of ``|F|^2`` over k-space. Where the denominator
    is zero (``D = R = 0``, the DC term of the gradient penalty) the solution and the residual
    are taken as zero, as in the inversion itself.

    Parameters
    ----------
    power : array
        ``|F(k)|^2`` times the Parseval weight of each stored frequency (for a real-FFT half
        spectrum: 2 for the columns that stand for two frequencies, 1 otherwise, divided by
        the number of voxels), so that sums give image-space squared norms.
    kernel_sq : array
        ``D(k)^2``, broadcastable to ``power``.
    penalty : array or float
        ``R(k) >= 0`` (1 for the identity, ``|E(k)|^2`` for the gradient), broadcastable.
    lambdas : sequence of float
        Regularisation weights (> 0).

    Returns
    -------
    residual_norms, penalty_norms : numpy.ndarray
        float64 ``||D chi - f||`` and ``||R^(1/2) chi||`` per weight (units of the field, and
        of the field per unit of ``R^(1/2)``).
    """
    lam = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if lam.size == 0 or np.any(~np.isfinite(lam)) or np.any(lam <= 0):
        raise ValueError("lambdas must be positive finite numbers")
    p, d2, r = np.broadcast_arrays(
        np.asarray(power, np.float32),
        np.asarray(kernel_sq, np.float32),
        np.asarray(penalty, np.float32),
    )
    p, d2, r = p.reshape(-1), d2.reshape(-1), r.reshape(-1)
    lam32 = lam.astype(np.float32)[:, None]
    res = np.zeros(lam.size)
    pen = np.zeros(lam.size)
    for start in range(0, p.size, _BLOCK):
        sl = slice(start, start + _BLOCK)
        pb, d2b, rb = p[sl], d2[sl], r[sl]
        lr = lam32 * rb  # (n_lambdas, block)
        den = d2b + lr
        inv = np.divide(1.0, den, out=np.zeros_like(den), where=den > 0)
        inv *= inv
        # residual: |F|^2 (lam R)^2 / den^2; penalty: |F|^2 D^2 R / den^2
        res += ((lr * lr * inv) @ pb).astype(np.float64)
        pen += (inv @ (pb * d2b * rb)).astype(np.float64)
    return np.sqrt(res), np.sqrt(pen)


def lcurve_corner(
    lambdas: Sequence[float],
    residual_norms: Sequence[float],
    penalty_norms: Sequence[float],
) -> int:
    """Index of the L-curve corner: maximum curvature of ``(log residual, log penalty)``.

    The curve is parametrised by ``log lambda``; derivatives are central differences on the
    (sorted, need not be uniform) grid. The corner is the point of largest signed curvature
    with the orientation of an L (misfit grows and penalty falls with lambda); the end points
    are never chosen.

    Parameters
    ----------
    lambdas : sequence of float
        Weights (> 0), at least 5.
    residual_norms, penalty_norms : sequence of float
        Norms at each weight (> 0).

    Returns
    -------
    int
        Index into ``lambdas`` of the corner.

    References
    ----------
    Hansen PC, O'Leary DP. The use of the L-curve in the regularization of discrete ill-posed
    problems. SIAM J Sci Comput 1993;14:1487-1503.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    rho = np.asarray(residual_norms, dtype=np.float64)
    eta = np.asarray(penalty_norms, dtype=np.float64)
    if not (lam.shape == rho.shape == eta.shape) or lam.ndim != 1 or lam.size < 5:
        raise ValueError("lcurve_corner needs at least 5 (lambda, residual, penalty) triples")
    if np.any(lam <= 0) or np.any(rho <= 0) or np.any(eta <= 0):
        raise ValueError("lambdas and norms must be positive for the log-log L-curve")
    order = np.argsort(lam)
    t = np.log(lam[order])
    x = np.log(rho[order])
    y = np.log(eta[order])
    dx, dy = np.gradient(x, t), np.gradient(y, t)
    ddx, ddy = np.gradient(dx, t), np.gradient(dy, t)
    speed = (dx * dx + dy * dy) ** 1.5
    kappa = np.where(speed > 0, (dx * ddy - ddx * dy) / np.where(speed > 0, speed, 1.0), 0.0)
    kappa[[0, -1]] = -np.inf
    return int(order[int(np.argmax(kappa))])


def discrepancy_lambda(
    lambdas: Sequence[float],
    residual_norms: Sequence[float],
    noise_norm: float,
) -> float:
    """Weight whose misfit equals ``noise_norm`` (Morozov's discrepancy principle).

    The misfit of a Tikhonov solution grows monotonically with lambda; the crossing is
    interpolated linearly in ``(log lambda, log residual)`` between grid points.

    Parameters
    ----------
    lambdas : sequence of float
        Weights (> 0), sorted or not.
    residual_norms : sequence of float
        ``||A chi - f||`` at each weight.
    noise_norm : float
        Expected norm of the noise in the data, e.g. ``sqrt(n_voxels) * sigma`` (same units as
        the residuals); a safety factor slightly above 1 is customary.

    Returns
    -------
    float
        The weight; ValueError if the target lies outside the range of the curve.

    References
    ----------
    Morozov VA. On the solution of functional equations by the method of regularization.
    Soviet Math Dokl 1966;7:414-417.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    rho = np.asarray(residual_norms, dtype=np.float64)
    if lam.shape != rho.shape or lam.ndim != 1 or lam.size < 2:
        raise ValueError("discrepancy_lambda needs at least 2 (lambda, residual) pairs")
    if not noise_norm > 0:
        raise ValueError(f"noise_norm must be positive, got {noise_norm}")
    order = np.argsort(lam)
    t = np.log(lam[order])
    x = np.log(np.maximum(rho[order], np.finfo(float).tiny))
    # enforce monotonicity against round-off before interpolating
    x = np.maximum.accumulate(x)
    target = np.log(noise_norm)
    if target < x[0] or target > x[-1]:
        raise ValueError(
            f"the noise norm {noise_norm:.3g} is outside the misfit range "
            f"[{np.exp(x[0]):.3g}, {np.exp(x[-1]):.3g}] of the lambda grid; widen the grid "
            "or check the noise level"
        )
    i = int(np.searchsorted(x, target, side="left"))
    if i == 0:
        return float(lam[order][0])
    t0, t1, x0, x1 = t[i - 1], t[i], x[i - 1], x[i]
    frac = 0.0 if x1 == x0 else (target - x0) / (x1 - x0)
    return float(np.exp(t0 + frac * (t1 - t0)))
