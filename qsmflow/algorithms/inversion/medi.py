"""Morphology enabled dipole inversion (MEDI) and MEDI+0.

MEDI (Liu T et al., Magn Reson Med 2012; nonlinear data term: Liu T et al., Magn Reson Med
2013) solves

    min_x  lambda/2 || W (exp(i D x) - exp(i phi)) ||_2^2 + || M_G grad x ||_1
           [ + lambda_CSF || M_CSF (x - mean_CSF x) ||_2^2 ]                       (MEDI+0)

for ``x = s * chi`` (radians), ``phi = s * field_ppm`` and ``s = 2 pi gamma_bar B0 TE 1e-6``
rad/ppm (:func:`.ndi.phase_scale_rad_per_ppm`): the MEDI toolbox convention, where the field is
the phase accrued over the reference echo time and ``lambda`` weighs a phase misfit. ``W`` is
the inverse phase-noise SD (from the magnitude or a noise map) normalised to mean 1 in the
mask; ``M_G`` is 0 on the strongest magnitude edges (no TV there, so anatomical boundaries stay
sharp) and 1 elsewhere; ``grad`` are forward differences per mm. The last term (MEDI+0, Liu Z
et al., Magn Reson Med 2018) makes the ventricular CSF uniform, so that it can serve as the
zero reference.

Solver: Gauss-Newton outer iterations; the L1 term is handled by lagged diffusivity (IRLS):
``|g| ~ sqrt(|g|^2 + eps)`` with the weight ``1 / sqrt(|M_G grad x|^2 + eps)`` frozen at the
current iterate, so each step solves the symmetric positive definite system

    [lambda D W^2 D + grad^T M_G P M_G grad + 2 lambda_CSF Q] dx = -gradient(x)

with conjugate gradients (``Q`` the CSF projection ``M_CSF (I - mean_CSF)``). The Gauss-Newton
Hessian of the complex data term is exactly ``D W^2 D`` (``|exp(i D x)| = 1``). The volume is
cropped to the mask's bounding box with a zero margin and transformed with real FFTs; the
susceptibility is free (TV-regularised only) outside the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..background.smv import smv_kernel
from ..dipole import dipole_kernel
from ._common import check_inversion_inputs, divergence, gradient
from .direct import tkd_inverse_kernel
from .ndi import (
    _check_positive,
    _Grid,
    _magnitude_3d,
    phase_scale_rad_per_ppm,
)

__all__ = ["medi_edge_mask", "estimate_csf_mask", "medi", "medi_plus_zero"]


def medi_edge_mask(
    magnitude: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    percentage: float = 0.9,
) -> np.ndarray:
    """MEDI's gradient mask ``M_G``: 1 where the magnitude is smooth, 0 on its edges.

    The magnitude (zero outside ``mask``) is differentiated with forward differences per mm
    along each axis; the ``1 - percentage`` fraction of (voxel, axis) pairs inside the mask with
    the largest ``|d magnitude|`` are edges (0), the rest 1. MEDI's toolbox finds the same
    threshold by raising a noise level by 5 % steps until ``percentage`` of the voxels lie
    below it; here it is the exact quantile.

    Parameters
    ----------
    magnitude : (x, y, z) or (x, y, z, echo) array
        Magnitude (echoes combined by root-sum-of-squares).
    mask : (x, y, z) bool array
        Brain mask.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    percentage : float
        Fraction of voxel-axis pairs in the mask treated as non-edge (0 < p <= 1); MEDI's
        default 0.9.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (3, x, y, z) with values 0 (edge) or 1, per gradient axis.
    """
    roi = np.asarray(mask, dtype=bool)
    mag = _magnitude_3d(magnitude, roi.shape)
    if not 0 < percentage <= 1:
        raise ValueError(f"percentage must be in (0, 1], got {percentage}")
    grad = np.abs(gradient(np.where(roi, mag, np.float32(0)), voxel_size_mm))
    inside = grad[:, roi]
    threshold = np.quantile(inside, percentage) if inside.size else 0.0
    return (grad <= threshold).astype(np.float32)


def estimate_csf_mask(
    r2star_hz: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    threshold_hz: float = 5.0,
    erosion_mm: float = 10.0,
    min_volume_mm3: float = 100.0,
) -> np.ndarray:
    """Ventricular CSF mask for MEDI+0 from an R2* map (after Liu Z et al. 2018).

    CSF has the lowest R2* of the brain (about 2-4 Hz, against 15-30 Hz in tissue at 3 T).
    Voxels with ``R2* < threshold_hz`` inside the brain mask eroded by ``erosion_mm`` (which
    drops the sulcal CSF and the noisy brain edge, keeping the ventricles) are grouped into
    26-connected components; components smaller than ``min_volume_mm3`` (noise, partial-volume
    specks) are dropped.

    Parameters
    ----------
    r2star_hz : (x, y, z) array
        R2* map in Hz (s^-1), e.g. from :mod:`qsmflow.algorithms.echoes.relaxation`.
    mask : (x, y, z) bool array
        Brain mask.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    threshold_hz : float
        R2* below which a voxel counts as CSF; 5 Hz as in the MEDI+0 paper at 3 T (CSF R2* is
        nearly field independent; tissue R2* grows with B0, so the margin widens at 7 T).
    erosion_mm : float
        Distance from the mask edge (mm) inside which CSF is not sought.
    min_volume_mm3 : float
        Smallest kept component (mm^3).

    Returns
    -------
    numpy.ndarray
        bool CSF mask; empty when nothing qualifies.
    """
    roi = np.asarray(mask, dtype=bool)
    r2s = np.asarray(r2star_hz, dtype=np.float32)
    if r2s.shape != roi.shape:
        raise ValueError(f"r2star shape {r2s.shape} differs from the mask shape {roi.shape}")
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    inner = ndimage.distance_transform_edt(roi, sampling=vox) > erosion_mm
    cand = inner & np.isfinite(r2s) & (r2s < threshold_hz)
    labels, n = ndimage.label(cand, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return cand
    sizes = np.bincount(labels.ravel())[1:] * float(np.prod(vox))
    keep = np.flatnonzero(sizes >= min_volume_mm3) + 1
    return np.isin(labels, keep)


def _data_weight(
    roi: np.ndarray, magnitude: np.ndarray | None, noise_sd_ppm: np.ndarray | None
) -> np.ndarray:
    """``W``: inverse noise SD (or the magnitude) normalised to mean 1 in the mask."""
    if noise_sd_ppm is not None:
        sd = np.asarray(noise_sd_ppm, dtype=np.float32)
        if sd.shape != roi.shape:
            raise ValueError(f"noise_sd_ppm shape {sd.shape} differs from {roi.shape}")
        good = roi & np.isfinite(sd) & (sd > 0)
        w = np.zeros(roi.shape, dtype=np.float32)
        w[good] = 1.0 / sd[good]
    elif magnitude is not None:
        w = np.where(roi, magnitude, np.float32(0)).astype(np.float32)
    else:
        w = roi.astype(np.float32)
    mean = float(w[roi].mean())
    if not mean > 0:
        raise ValueError("the data weight (magnitude or 1/noise SD) is zero inside the mask")
    return w / np.float32(mean)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()))


def _cg(
    apply_a, rhs: np.ndarray, tol: float, max_iter: int, inv_diag: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """(Jacobi-preconditioned) conjugate gradients for ``A x = rhs`` from x = 0.

    Stops when the residual norm falls below ``tol`` times that of ``rhs``.
    """
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = r * inv_diag if inv_diag is not None else r
    p = z.copy()
    rz = _dot(r, z)
    stop = (tol * tol) * _dot(r, r)
    it = 0
    for it in range(1, max_iter + 1):
        ap = apply_a(p)
        pap = _dot(p, ap)
        if not pap > 0:
            it -= 1
            break
        step = rz / pap
        x += np.float32(step) * p
        r -= np.float32(step) * ap
        if _dot(r, r) <= stop:
            break
        z = r * inv_diag if inv_diag is not None else r
        rz_new = _dot(r, z)
        p *= np.float32(rz_new / rz)
        p += z
        rz = rz_new
    return x, it


def _csf_region(
    roi: np.ndarray,
    vox: tuple[float, float, float],
    lam_csf: float,
    csf_mask: np.ndarray | None,
    r2star_hz: np.ndarray | None,
) -> np.ndarray | None:
    """The MEDI+0 CSF region inside the mask, or None without the CSF term."""
    if lam_csf == 0:
        return None
    if csf_mask is not None:
        csf = np.asarray(csf_mask, dtype=bool)
        if csf.shape != roi.shape:
            raise ValueError(f"csf_mask shape {csf.shape} differs from {roi.shape}")
    elif r2star_hz is not None:
        csf = estimate_csf_mask(r2star_hz, roi, vox)
    else:
        raise ValueError("MEDI+0 (lam_csf > 0) needs csf_mask or r2star_hz")
    csf = csf & roi
    if not csf.any():
        raise ValueError("the CSF mask is empty inside the brain mask")
    return csf


def medi(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    noise_sd_ppm: np.ndarray | None = None,
    lam: float = 1000.0,
    percentage: float = 0.9,
    smv_radius_mm: float | None = None,
    lam_csf: float = 0.0,
    csf_mask: np.ndarray | None = None,
    r2star_hz: np.ndarray | None = None,
    reference_csf: bool = True,
    b0_tesla: float = 3.0,
    te_s: float = 0.005,
    eps: float = 1e-6,
    max_iter: int = 5,
    tol_norm_ratio: float = 0.05,
    cg_max_iter: int = 8,
    cg_tol: float = 0.01,
    tkd_init_threshold: float | None = 0.19,
    margin_mm: float = 4.0,
    precondition: bool = True,
    n_threads: int = 1,
) -> np.ndarray:
    """Morphology enabled dipole inversion with the nonlinear data term (MEDI, MEDI+0).

    See the module docstring for the functional and the solver. Outer Gauss-Newton steps stop
    when ``||dx|| / ||x|| < tol_norm_ratio`` or after ``max_iter``; each inner solve is
    Jacobi-preconditioned CG stopped at relative residual ``cg_tol`` or ``cg_max_iter``.

    Iterations and start. The MEDI toolbox starts from ``x = 0`` (where the lagged weight is
    ``1 / sqrt(eps)`` everywhere: a heavily smoothed first step) and solves each step to 1 %
    with up to 100 CG iterations, 10 outer steps, stopping at ``tol_norm_ratio = 0.1``; on the
    simulated 2 mm head (field noise 0.002 ppm) that took 290 CG iterations for a demeaned
    NRMSE of 23.6 %. Here the iteration starts from the TKD estimate (``tkd_init_threshold``,
    on the same, possibly SMV-filtered, kernel), so the first lagged weights already see the
    anatomy, and the steps are inexact: at most 8 CG iterations each, outer steps until the
    update is 5 % of ``x`` (3 steps on that head, 23.1 %; the zero start with the same budget
    gives 26.7 %). On the 160^3 1 mm head the default takes about 12 s on 2 cores.
    ``tkd_init_threshold=None, max_iter=10, cg_max_iter=100, tol_norm_ratio=0.1`` reproduces
    the toolbox's schedule.

    Choice of ``lam``. With this convention (below) the demeaned NRMSE on the 2 mm head was
    30.3, 25.0, 24.9, 29.7 and 37.2 % for ``lam`` = 300, 600, 1000, 2000 and 4000 (equivalent
    to the toolbox's 150-2000; its default 1000 is ``lam`` = 2000 here).

    Units and portability of ``lam``. The data term is a misfit of phase factors at the
    reference echo time ``te_s`` (phase ``s * field``), with ``W`` normalised to mean 1: the
    MEDI toolbox convention, in which a phase misfit does not depend on B0 or TE for a given
    phase SNR, so one ``lam`` serves different field strengths and echo times. The TV term is
    in radians per mm, so it is independent of the voxel size for a given anatomy. ``lam``
    here multiplies ``||.||^2 / 2``: the toolbox's ``lambda`` (which multiplies ``||.||^2``) is
    ``lam / 2``.

    Parameters
    ----------
    local_field_ppm : (x, y, z) array
        Local (background-free) field in ppm of B0.
    mask : (x, y, z) bool array
        Region where the field is valid; zero data weight outside it, zero output there.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    b0_dir : (3,) floats
        B0 direction in voxel coordinates (normalised here; oblique directions are exact).
    magnitude : (x, y, z) or (x, y, z, echo) array, optional
        Magnitude (echoes combined by root-sum-of-squares): the edge mask ``M_G`` and, unless
        ``noise_sd_ppm`` is given, the data weight ``W`` (phase noise SD ~ 1 / magnitude).
        Without it ``M_G = 1`` (plain weighted TV) and ``W = 1``.
    noise_sd_ppm : (x, y, z) array, optional
        Field noise SD in ppm (e.g. ``FieldFit.field_sd_ppm``); ``W = 1 / noise_sd`` (0 where
        it is not positive and finite).
    lam : float
        Data-term weight (see above).
    percentage : float
        Fraction of voxels treated as non-edge in ``M_G`` (:func:`medi_edge_mask`).
    smv_radius_mm : float, optional
        MEDI's ``smv`` option: the field and the kernel are high-pass filtered with ``1 - S``
        (``S`` the spherical mean of this radius) and the data term is restricted to the mask
        eroded by the sphere, which removes residual background field (smooth, harmonic)
        left by background removal. The output is then zero outside the eroded mask.
    lam_csf : float
        MEDI+0 weight of ``||M_CSF (x - mean_CSF x)||^2`` (x in radians); 0 disables it.
    csf_mask : (x, y, z) bool array, optional
        CSF region for MEDI+0; default :func:`estimate_csf_mask` from ``r2star_hz``.
    r2star_hz : (x, y, z) array, optional
        R2* map (Hz) for the CSF estimate.
    reference_csf : bool
        With MEDI+0, subtract the CSF mean from the result (the "+0": CSF is the zero
        reference).
    b0_tesla : float
        Field strength (T) for the phase scale.
    te_s : float
        Reference echo time (s) for the phase scale: the echo spacing of a multi-echo fit (the
        MEDI toolbox's ``delta_TE``) or the TE of a single echo. Default 5 ms.
    eps : float
        Lagged-diffusivity smoothing (rad/mm)^2 in ``sqrt(|M_G grad x|^2 + eps)``; MEDI's 1e-6.
    max_iter, tol_norm_ratio, cg_max_iter, cg_tol
        Outer and inner iteration controls (above).
    tkd_init_threshold : float or None
        Start from the TKD solution with this truncation (0.19); None starts from zero as the
        MEDI toolbox does.
    margin_mm : float
        Zero margin around the mask's bounding box before the FFTs (mm).
    precondition : bool
        Jacobi-precondition the CG solves (diagonal of the TV term plus ``lam mean(D^2)``
        times the local mean of ``W^2``).
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    numpy.ndarray
        float32 susceptibility in ppm, zero outside the mask (the eroded mask with
        ``smv_radius_mm``). Its mean is arbitrary unless MEDI+0 referencing is on.

    Raises
    ------
    ValueError
        For the input errors of ``check_inversion_inputs``, bad parameters, a CSF term without
        a CSF mask or R2* map, or an empty CSF mask.

    References
    ----------
    Liu T, Liu J, de Rochefort L, Spincemaille P, Khalidov I, Ledoux JR, Wang Y. Morphology
    enabled dipole inversion (MEDI) from a single-angle acquisition: comparison with COSMOS in
    human brain imaging. Magn Reson Med 2011;66:777-783.
    Liu J, Liu T, de Rochefort L, et al. Morphology enabled dipole inversion for quantitative
    susceptibility mapping using structural consistency between the magnitude image and the
    susceptibility map. NeuroImage 2012;59:2560-2568.
    Liu T, Wisnieff C, Lou M, Chen W, Spincemaille P, Wang Y. Nonlinear formulation of the
    magnetic field to source relationship for robust quantitative susceptibility mapping.
    Magn Reson Med 2013;69:467-476.
    Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y. MEDI+0: Morphology enabled dipole inversion
    with automatic uniform cerebrospinal fluid zero reference for quantitative susceptibility
    mapping. Magn Reson Med 2018;79:2795-2803.
    """
    field, roi = check_inversion_inputs(local_field_ppm, mask, voxel_size_mm, b0_dir)
    mag = _magnitude_3d(magnitude, field.shape)
    vox = tuple(float(v) for v in voxel_size_mm)
    lam = _check_positive("lam", lam)
    lam_csf = _check_positive("lam_csf", lam_csf, allow_zero=True)
    eps = _check_positive("eps", eps)
    tol_norm_ratio = _check_positive("tol_norm_ratio", tol_norm_ratio, allow_zero=True)
    cg_tol = _check_positive("cg_tol", cg_tol)
    if not 0 < percentage <= 1:
        raise ValueError(f"percentage must be in (0, 1], got {percentage}")
    if tkd_init_threshold is not None and not 0 < tkd_init_threshold <= 1:
        raise ValueError(f"tkd_init_threshold must be in (0, 1] or None, got {tkd_init_threshold}")
    if int(max_iter) < 1 or int(cg_max_iter) < 1:
        raise ValueError("max_iter and cg_max_iter must be >= 1")
    scale = phase_scale_rad_per_ppm(b0_tesla, te_s)
    csf = _csf_region(roi, vox, lam_csf, csf_mask, r2star_hz)

    grid = _Grid(roi, vox, margin_mm, n_threads)
    roi_g = grid.pad(roi, dtype=bool)
    kernel = dipole_kernel(grid.shape, vox, b0_dir, real=True)
    phi = grid.pad(np.where(roi, field, np.float32(0)) * np.float32(scale))
    data_g = roi_g  # where the data term acts
    if smv_radius_mm is not None:
        radius = _check_positive("smv_radius_mm", smv_radius_mm)
        sphere, count = smv_kernel(grid.shape, vox, radius)
        if count < 2:
            raise ValueError(f"smv_radius_mm = {radius} holds a single voxel")
        # voxels whose whole sphere lies in the mask (half a voxel's weight of FFT slack)
        data_g = roi_g & (grid.ifft(grid.fft(roi_g.astype(np.float32)) * sphere) > 1 - 0.5 / count)
        if not data_g.any():
            raise ValueError(f"no voxel of the mask is {radius} mm from its edge")
        high = np.float32(1) - sphere
        del sphere
        phi = grid.ifft(grid.fft(phi) * high)
        kernel = kernel * high
        del high
    w = _data_weight(roi, mag, noise_sd_ppm)
    w2 = grid.pad(w * w)
    del w
    w2[~data_g] = 0
    phi[~data_g] = 0

    if mag is not None:
        m_g = medi_edge_mask(grid.pad(mag), roi_g, vox, percentage=percentage)
    else:
        m_g = np.ones((3, *grid.shape), dtype=np.float32)
    csf_g = grid.pad(csf, dtype=bool) if csf is not None else None
    two_lam_csf = np.float32(2.0 * lam_csf)
    lam32 = np.float32(lam)
    # mean of D^2 over the full spectrum (the half spectrum's inner columns count twice)
    d2_mean = float(np.sum(np.sum(kernel * kernel, axis=(0, 1)) * grid.half_weights()))
    d2_mean /= float(np.prod(grid.shape))
    if precondition:
        # Jacobi diagonal of lam D W^2 D: sum_u d(u - v)^2 W_u^2 with d the dipole's point
        # spread, concentrated on the nearest neighbours; approximated by mean(D^2) times the
        # local mean of W^2 (non-zero next to the data region too, e.g. in the SMV shell, where
        # W^2 itself is 0 but the diagonal is not)
        diag_data = ndimage.uniform_filter(w2, size=3, mode="wrap")
        diag_data *= np.float32(lam * d2_mean)
        np.maximum(diag_data, np.float32(1e-3 * lam * d2_mean), out=diag_data)

    def dipole(v: np.ndarray) -> np.ndarray:
        return grid.ifft(grid.fft(v) * kernel)

    def csf_term(v: np.ndarray) -> np.ndarray:
        out = np.zeros_like(v)
        vals = v[csf_g]
        out[csf_g] = two_lam_csf * (vals - np.float32(vals.mean(dtype=np.float64)))
        return out

    if tkd_init_threshold is None:
        x = np.zeros(grid.shape, dtype=np.float32)
    else:
        x = grid.ifft(grid.fft(phi) * tkd_inverse_kernel(kernel, tkd_init_threshold))
        x[~data_g] = 0

    for _ in range(int(max_iter)):
        # lagged diffusivity: M_G P M_G with P = 1 / sqrt(|M_G grad x|^2 + eps) (M_G^2 = M_G)
        g = gradient(x, vox)
        g *= m_g
        tv_weight = m_g / np.sqrt(np.sum(g * g, axis=0) + np.float32(eps))
        del g

        def reg(v: np.ndarray, tv_weight=tv_weight) -> np.ndarray:
            gv = gradient(v, vox)
            gv *= tv_weight
            return -divergence(gv, vox)

        def apply_a(v: np.ndarray, reg=reg) -> np.ndarray:
            out = dipole(w2 * dipole(v))
            out *= lam32
            out += reg(v)
            if csf_g is not None:
                out += csf_term(v)
            return out

        residual = dipole(x)
        residual -= phi
        np.sin(residual, out=residual)
        residual *= w2
        rhs = dipole(residual)
        del residual
        rhs *= -lam32
        rhs -= reg(x)
        if csf_g is not None:
            rhs -= csf_term(x)

        inv_diag = None
        if precondition:
            diag = diag_data.copy()
            for axis, d in enumerate(vox):
                diag += (tv_weight[axis] + np.roll(tv_weight[axis], 1, axis=axis)) / np.float32(
                    d * d
                )
            if csf_g is not None:
                diag[csf_g] += two_lam_csf
            inv_diag = np.reciprocal(diag, out=diag)
        del tv_weight
        dx, _ = _cg(apply_a, rhs, cg_tol, int(cg_max_iter), inv_diag)
        del rhs, inv_diag
        x += dx
        x_norm = float(np.linalg.norm(x))
        if x_norm == 0 or float(np.linalg.norm(dx)) / x_norm < tol_norm_ratio:
            break

    chi = grid.unpad(x) / np.float32(scale)
    out_mask = grid.unpad(data_g)
    if csf is not None and reference_csf:
        chi -= np.float32(chi[csf].mean(dtype=np.float64))
    return np.where(out_mask, chi, np.float32(0)).astype(np.float32)


def medi_plus_zero(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    csf_mask: np.ndarray | None = None,
    r2star_hz: np.ndarray | None = None,
    lam_csf: float = 100.0,
    n_threads: int = 1,
    **kwargs,
) -> np.ndarray:
    """MEDI+0 (Liu Z et al., Magn Reson Med 2018): :func:`medi` with the uniform-CSF term.

    ``csf_mask`` (or, without it, :func:`estimate_csf_mask` of ``r2star_hz``) is the CSF
    region; ``lam_csf`` its weight (the MEDI toolbox default 100); the result is referenced to
    the CSF mean. Other keyword arguments go to :func:`medi`.
    """
    return medi(
        local_field_ppm,
        mask,
        voxel_size_mm,
        b0_dir,
        magnitude=magnitude,
        csf_mask=csf_mask,
        r2star_hz=r2star_hz,
        lam_csf=lam_csf,
        n_threads=n_threads,
        **kwargs,
    )
