"""Combination of multi-channel (uncombined receive coil) multi-echo phase.

Each receive channel ``c`` sees the phase ``phi_c(TE) = theta_c + omega * TE`` where ``omega``
(rad/s) is the off-resonance shared by every channel and ``theta_c`` the channel's own,
echo-independent phase offset (its receive phase plus the transmit/common offset). A complex sum
of raw channels cancels where the offsets disagree (open-ended "singularities" in the combined
phase), so the offsets are estimated, smoothed, and removed before the channels are summed.
Both methods here follow Eckstein et al. (Magn Reson Med 2018):

* **ASPIRE** needs ``TE2 = 2 * TE1``: then ``theta_c = 2 * phi_c(TE1) - phi_c(TE2)`` exactly, from
  complex products (no unwrapping).
* **MCPC-3D-S** works for any echo times: the phase difference between echoes 1 and 2, taken
  from the Hermitian inner product of the two echoes summed over channels (which has no offset),
  is unwrapped spatially, scaled to ``TE1`` and subtracted from each channel's first-echo phase;
  the ``-S`` variant smooths each channel's offset before removing it.

Phase model as in DESIGN.md section 2; phase in radians, echo times in seconds, voxel sizes and
smoothing widths in mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ..unwrap import laplacian_unwrap

__all__ = ["CoilCombination", "aspire", "mcpc3ds"]

# Voxels per slab when looping over the first axis (bounds the temporaries to a few 100 MB).
_SLAB_VOXELS = 1 << 21
# Padding of the Laplacian unwrapping of the echo-1-to-2 phase difference.
_LAP_PAD = 1.25


class CoilCombination(NamedTuple):
    """Result of :func:`mcpc3ds` and :func:`aspire` (float32 arrays).

    Attributes
    ----------
    magnitude : (x, y, z, echo)
        Root-sum-of-squares magnitude over the channels.
    phase_rad : (x, y, z, echo)
        Combined phase in radians, in ``[-pi, pi]``, with the channels' phase offsets removed.
    phase_offsets_rad : (x, y, z, coil)
        The smoothed phase offset of each channel that was removed, in ``[-pi, pi]``.
    """

    magnitude: np.ndarray
    phase_rad: np.ndarray
    phase_offsets_rad: np.ndarray


def _check_inputs(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times_s: Sequence[float],
    voxel_size_mm: Sequence[float],
    sigma_mm: float | Sequence[float],
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    mag = np.asarray(magnitude)
    ph = np.asarray(phase)
    if ph.ndim != 5:
        raise ValueError(f"phase must be 5-D (x, y, z, echo, coil), got shape {ph.shape}")
    if mag.shape != ph.shape:
        raise ValueError(f"magnitude shape {mag.shape} differs from phase shape {ph.shape}")
    if np.iscomplexobj(mag) or np.iscomplexobj(ph):
        raise ValueError("magnitude and phase must be real arrays")
    tes = np.asarray(echo_times_s, dtype=np.float64).reshape(-1)
    if tes.size != ph.shape[3]:
        raise ValueError(f"{tes.size} echo times for {ph.shape[3]} echoes")
    if tes.size < 2:
        raise ValueError("need at least 2 echoes to estimate the channels' phase offsets")
    if not np.all(np.isfinite(tes)) or np.any(tes <= 0) or not tes[1] > tes[0]:
        raise ValueError(f"echo times must be positive with TE2 > TE1, got {tes.tolist()} s")
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vox.size != 3 or not np.all(vox > 0):
        raise ValueError(f"voxel_size_mm must be 3 positive sizes, got {voxel_size_mm!r}")
    sig = np.broadcast_to(np.asarray(sigma_mm, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(sig)) or np.any(sig < 0):
        raise ValueError(f"sigma_mm must be >= 0 (one value or three), got {sigma_mm!r}")
    sel = None
    if mask is not None:
        sel = np.asarray(mask, dtype=bool)
        if sel.shape != ph.shape[:3]:
            raise ValueError(f"mask shape {sel.shape} differs from image shape {ph.shape[:3]}")
        if not sel.any():
            raise ValueError("mask is empty")
    return mag, ph, tes, sig / vox, sel


def _slabs(n: int, plane: int, multiple: int = 1) -> list[slice]:
    """Slices of the first axis, about ``_SLAB_VOXELS / plane`` rows each (whole ``multiple``s)."""
    step = max(1, _SLAB_VOXELS // max(plane, 1) // multiple) * multiple
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _run(fn, items, n_threads: int) -> None:
    if n_threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(max_workers=min(n_threads, len(items))) as pool:
            list(pool.map(fn, items))
    else:
        for item in items:
            fn(item)


def _block_factors(sigma_vox: np.ndarray) -> tuple[int, int, int]:
    """Block size per axis for smoothing on a coarse grid (1: smooth at full resolution)."""
    return tuple(max(1, int(s // 2)) if s >= 4 else 1 for s in sigma_vox)


def _block_mean(z: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Means over blocks of ``factors`` voxels of the first three axes (zero-padded at the end)."""
    if all(f == 1 for f in factors):
        return z
    shape = z.shape[:3]
    padded = [-(-n // f) * f for n, f in zip(shape, factors, strict=True)]
    if padded != list(shape):
        zp = np.zeros(tuple(padded) + z.shape[3:], dtype=z.dtype)
        zp[: shape[0], : shape[1], : shape[2]] = z
        z = zp
    split = []
    for n, f in zip(padded, factors, strict=True):
        split += [n // f, f]
    blocks = z.reshape(tuple(split) + z.shape[3:])
    return blocks.sum(axis=(1, 3, 5)) * np.float32(1 / np.prod(factors))


def _upsample_axis(coarse: np.ndarray, factor: int, n: int, axis: int) -> np.ndarray:
    """Linear interpolation from block centres to the ``n`` fine voxels along ``axis``.

    Fine voxel ``j * factor + r`` lies at coarse coordinate ``j + (r + 0.5) / factor - 0.5``;
    beyond the outermost block centres the value is held constant.
    """
    c = np.moveaxis(coarse, axis, 0)
    n_c = c.shape[0]
    cp = np.concatenate([c[:1], c, c[-1:]], axis=0)  # edge padding
    out = np.empty((n_c, factor) + c.shape[1:], dtype=coarse.dtype)
    for r in range(factor):
        t = (r + 0.5) / factor - 0.5
        if t < 0:  # between blocks j - 1 and j
            out[:, r] = cp[:n_c] * np.float32(-t) + cp[1 : n_c + 1] * np.float32(1 + t)
        else:  # between blocks j and j + 1
            out[:, r] = cp[1 : n_c + 1] * np.float32(1 - t) + cp[2:] * np.float32(t)
    out = out.reshape((n_c * factor,) + c.shape[1:])[:n]
    return np.moveaxis(out, 0, axis)


def _smooth_complex(z: np.ndarray, sigma_vox: np.ndarray) -> np.ndarray:
    """Approximately Gaussian smoothing (sigma in voxels per axis) of a complex volume.

    Zero-valued voxels carry no weight, so the phase of the result is a weighted average of
    the phase of ``z`` (weights ``|z|``). Kernels of 4 voxels or more run on a grid coarsened
    by block averaging (blocks of ``floor(sigma / 2)`` voxels), interpolated back linearly;
    the coarse kernel is narrowed so that box, Gaussian and linear interpolation together
    have the requested variance (box ``f^2 / 12`` and interpolation ``f^2 / 6`` for blocks of
    ``f`` voxels).
    """
    factors = _block_factors(sigma_vox)
    coarse = _block_mean(z, factors)
    return _finish_smoothing(coarse, sigma_vox, factors, z.shape)


def _finish_smoothing(coarse, sigma_vox, factors, shape) -> np.ndarray:
    """Gaussian smoothing of block means, then interpolation back to ``shape``."""
    f = np.asarray(factors, dtype=np.float64)
    sigma_c = np.sqrt(np.maximum(sigma_vox**2 - np.where(f > 1, f**2 / 4, 0), 0)) / f
    sm = np.empty_like(coarse)
    if np.any(sigma_c > 0):
        sm.real = ndimage.gaussian_filter(coarse.real, sigma_c, mode="constant", truncate=3.0)
        sm.imag = ndimage.gaussian_filter(coarse.imag, sigma_c, mode="constant", truncate=3.0)
    else:
        sm[...] = coarse
    for axis in range(3):
        if factors[axis] > 1:
            sm = _upsample_axis(sm, factors[axis], shape[axis], axis)
    return sm


def _smoothed_offsets(
    raw_offsets,
    mag: np.ndarray,
    sel: np.ndarray | None,
    sigma_vox: np.ndarray,
    n_threads: int,
) -> np.ndarray:
    """Smooth each channel's offset as the complex field ``|S_c(TE1)| exp(i theta_c)``.

    ``raw_offsets(sl)`` returns the unsmoothed offsets (rad) of all channels for the slab
    ``sl`` of the first axis, shape (n, y, z, coil). The weighted phasors are built and
    block-summed slab by slab (contiguous reads); each channel is then smoothed on its own.
    """
    nx, ny, nz, _, n_coils = mag.shape
    factors = _block_factors(sigma_vox)
    coarse_shape = tuple(-(-n // f) for n, f in zip((nx, ny, nz), factors, strict=True))
    coarse = np.empty(coarse_shape + (n_coils,), dtype=np.complex64)
    f0 = factors[0]

    def build(sl: slice) -> None:
        theta = raw_offsets(sl)
        w = np.asarray(mag[sl, :, :, 0, :], dtype=np.float32)
        if sel is not None:
            w = w * sel[sl][..., None]
        z = np.empty(theta.shape, dtype=np.complex64)
        z.real = w * np.cos(theta)
        z.imag = w * np.sin(theta)
        del theta, w
        coarse[sl.start // f0 : -(-sl.stop // f0)] = _block_mean(z, factors)

    _run(build, _slabs(nx, ny * nz * n_coils, f0), n_threads)
    out = np.empty((nx, ny, nz, n_coils), dtype=np.float32)

    def smooth(c: int) -> None:
        z = _finish_smoothing(
            np.ascontiguousarray(coarse[..., c]), sigma_vox, factors, (nx, ny, nz)
        )
        out[..., c] = np.arctan2(z.imag, z.real)

    _run(smooth, list(range(n_coils)), n_threads)
    return out


def _combine(
    mag: np.ndarray, phase: np.ndarray, offsets: np.ndarray, n_threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offset-corrected, magnitude-weighted complex sum over channels, slab by slab.

    Each channel's phasor ``exp(i (phi_c - theta_c))`` is weighted by ``m_c^2`` (the
    sensitivity-matched sum, SNR-optimal for channels of equal noise); the magnitude is the
    root sum of squares.
    """
    nx, ny, nz, n_echo, n_coils = phase.shape
    out_mag = np.empty((nx, ny, nz, n_echo), dtype=np.float32)
    out_phase = np.empty((nx, ny, nz, n_echo), dtype=np.float32)

    def one(sl: slice) -> None:
        m = np.asarray(mag[sl], dtype=np.float32)
        arg = np.asarray(phase[sl], dtype=np.float32) - offsets[sl][..., None, :]
        w = m * m
        re = np.einsum("...c,...c->...", w, np.cos(arg))
        im = np.einsum("...c,...c->...", w, np.sin(arg))
        out_phase[sl] = np.arctan2(im, re)
        out_mag[sl] = np.sqrt(w.sum(axis=-1))

    _run(one, _slabs(nx, ny * nz * n_echo * n_coils), n_threads)
    return out_mag, out_phase


def mcpc3ds(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times_s: Sequence[float],
    voxel_size_mm: Sequence[float],
    *,
    sigma_mm: float | Sequence[float] = 4.0,
    mask: np.ndarray | None = None,
    n_threads: int = 1,
) -> CoilCombination:
    """MCPC-3D-S coil combination of multi-echo phase (Eckstein et al. 2018).

    1. ``dphi = angle(sum_c S_c(TE2) conj(S_c(TE1)))``: the phase accumulated between echoes 1
       and 2, free of channel offsets (Hermitian inner product over channels).
    2. ``theta_c = phi_c(TE1) - k * dphi_true`` with ``k = TE1 / (TE2 - TE1)``. Writing
       ``k = n + f`` with ``n`` the nearest integer, ``n * dphi_true`` equals ``n * dphi``
       modulo 2*pi, so only ``f * dphi_true`` (``|f| <= 1/2``) needs spatial unwrapping, done
       with :func:`qsmflow.algorithms.unwrap.laplacian_unwrap`; for ``TE1 = TE2 - TE1`` (and
       any integer ``k``) nothing is unwrapped and the offsets are exact.
    3. ``exp(i theta_c)`` weighted by the channel's first-echo magnitude (and by ``mask``) is
       smoothed with a Gaussian of ``sigma_mm`` (the "-S" of MCPC-3D-S); its phase is the
       offset that is removed from every echo.
    4. ``combined = sum_c m_c^2 exp(i (phi_c - theta_c))`` per echo (phasors weighted by the
       channel magnitude squared: the sensitivity-matched sum with the magnitude as
       sensitivity estimate, SNR-optimal for channels of equal noise; on the simulation it gave
       a 9 % lower field error than weights ``m_c``); the combined magnitude is the root sum
       of squares.

    On Laplacian non-congruence: the Laplacian solution ``L`` differs from the unwrapped
    ``dphi`` by an error ``h`` that is harmonic where the phase is smooth but reaches about
    pi near the steep fields above the sinuses (simulated head, TE2 - TE1 = 5 ms). ``h`` is
    the same for every channel, so the channels stay aligned and the combination is unharmed;
    it stays in the combined phase as an echo-independent offset ``f * h`` (smoothed), which a
    field fit with an intercept (:func:`qsmflow.algorithms.echoes.fit_field`) absorbs. Making
    ``L`` congruent (``L + wrap(dphi - L)``) would be exact where ``|h| < pi`` but turns the
    places where ``|h| > pi`` into steps of ``2 pi f`` in every offset, which the smoothing
    turns into jumps of up to pi in the combined phase; on the simulated head (TE 5 / 15 ms,
    ``f = 1/2``) that raised the field error from 1.4 % to 4-11 %, so it is not done.

    Parameters
    ----------
    magnitude, phase : (x, y, z, echo, coil) arrays
        Per-channel magnitude (any scale) and wrapped phase (radians).
    echo_times_s : sequence of float
        Echo times in seconds (the first two are used for the offsets).
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    sigma_mm : float or (3,) floats
        Standard deviation of the Gaussian that smooths each channel's offset, in mm (0: no
        smoothing). Wide kernels are applied on a block-averaged grid (see Notes).
    mask : (x, y, z) bool array, optional
        Voxels whose offsets are trusted (e.g. a head mask); only they feed the smoothing.
        Offsets are extrapolated smoothly a few ``sigma_mm`` beyond it (0 farther away).
        Default: every voxel, weighted by its magnitude.
    n_threads : int
        Threads for the FFTs and for the per-channel and per-slab loops.

    Returns
    -------
    CoilCombination
        ``magnitude`` (x, y, z, echo) root sum of squares, ``phase_rad`` (x, y, z, echo)
        combined phase, ``phase_offsets_rad`` (x, y, z, coil) the smoothed offsets removed.

    Notes
    -----
    The default ``sigma_mm`` was chosen on the simulated 8-channel head (2 mm, SNR 100): the
    error of the smoothed offsets against the true ones was 0.054 rad (RMS in the brain)
    without smoothing, 0.011 rad at 4 mm, 0.028 rad at 7 mm and 0.049 rad at 10 mm (wider
    kernels average the curvature of the coil phase; weighting by magnitude also shifts the
    average towards the coil). Use a wider kernel for noisier data.

    Smoothing with ``sigma`` of 4 voxels or more is done on a grid coarsened by block averages
    of ``floor(sigma / 2)`` voxels and interpolated back linearly, with a narrower Gaussian so
    the total width matches (within a few percent of the exact Gaussian, and much faster).
    The channels are processed in slabs of the first axis, so the working memory stays small:
    for 200 x 200 x 160 voxels, 4 echoes and 8 channels (1.6 GB of float32 input), 0.2 GB
    beyond the 0.4 GB of outputs, and about 6 s with 2 threads (8 s with 1). With ``sigma``
    below 4 voxels the weighted phasors of all channels are held at full resolution
    (8 bytes per voxel and channel).

    References
    ----------
    Eckstein K, Dymerska B, Bachrata B, Bogner W, Poljanc K, Trattnig S, Robinson SD.
    Computationally efficient combination of multi-channel phase data from multi-echo
    acquisitions (ASPIRE). Magn Reson Med 2018;79:2996-3006.
    """
    mag, ph, tes, sigma_vox, sel = _check_inputs(
        magnitude, phase, echo_times_s, voxel_size_mm, sigma_mm, mask
    )
    n_threads = max(1, int(n_threads))
    nx, ny, nz, _, n_coils = ph.shape

    # Hermitian inner product of echoes 1 and 2 summed over channels: phase omega * (TE2 - TE1).
    hip_re = np.zeros((nx, ny, nz), dtype=np.float32)
    hip_im = np.zeros((nx, ny, nz), dtype=np.float32)
    for sl in _slabs(nx, ny * nz * n_coils):
        m = np.asarray(mag[sl, :, :, 0], dtype=np.float32) * mag[sl, :, :, 1]
        d = np.asarray(ph[sl, :, :, 1], dtype=np.float32) - ph[sl, :, :, 0]
        hip_re[sl] = np.einsum("...c,...c->...", m, np.cos(d))
        hip_im[sl] = np.einsum("...c,...c->...", m, np.sin(d))
    dphi = np.arctan2(hip_im, hip_re)
    del hip_re, hip_im
    # theta_c = phi_c(TE1) - k * dphi_true with k = TE1 / (TE2 - TE1). Split k = n + f with n the
    # nearest integer: n * dphi_true = n * dphi modulo 2 pi (no unwrapping needed), and only the
    # fraction |f| <= 1/2 multiplies the spatially unwrapped difference.
    k = tes[0] / (tes[1] - tes[0])
    n = float(np.round(k))
    f = k - n
    common = np.float32(n) * dphi
    if abs(f) > 1e-3:
        lap = laplacian_unwrap(dphi, voxel_size_mm, pad_factor=_LAP_PAD, n_threads=n_threads)
        common += np.float32(f) * lap
        del lap
    else:
        common += np.float32(f) * dphi
    del dphi

    def raw_offsets(sl: slice) -> np.ndarray:
        return np.asarray(ph[sl, :, :, 0, :], dtype=np.float32) - common[sl][..., None]

    offsets = _smoothed_offsets(raw_offsets, mag, sel, sigma_vox, n_threads)
    out_mag, out_phase = _combine(mag, ph, offsets, n_threads)
    return CoilCombination(out_mag, out_phase, offsets)


def aspire(
    magnitude: np.ndarray,
    phase: np.ndarray,
    echo_times_s: Sequence[float],
    voxel_size_mm: Sequence[float],
    *,
    sigma_mm: float | Sequence[float] = 4.0,
    mask: np.ndarray | None = None,
    te_rtol: float = 0.01,
    n_threads: int = 1,
) -> CoilCombination:
    """ASPIRE coil combination of multi-echo phase (Eckstein et al. 2018).

    For echo times with ``TE2 = 2 * TE1`` each channel's offset follows without unwrapping:
    ``theta_c = 2 phi_c(TE1) - phi_c(TE2) = angle(S_c(TE1)^2 conj(S_c(TE2)))``. As in
    :func:`mcpc3ds`, ``exp(i theta_c)`` weighted by the first-echo magnitude is smoothed with a
    Gaussian of ``sigma_mm`` and removed from every echo, and the channels are summed with
    weights ``m_c^2``.

    Parameters
    ----------
    magnitude, phase : (x, y, z, echo, coil) arrays
        Per-channel magnitude (any scale) and wrapped phase (radians).
    echo_times_s : sequence of float
        Echo times in seconds; the second must be twice the first.
    voxel_size_mm : (3,) floats
        Voxel size in mm.
    sigma_mm : float or (3,) floats
        Gaussian smoothing of the offsets, in mm (0: none).
    mask : (x, y, z) bool array, optional
        Voxels whose offsets feed the smoothing (see :func:`mcpc3ds`).
    te_rtol : float
        Accepted relative deviation ``|TE2 - 2 TE1| / TE2``. A deviation ``d`` leaves
        ``omega * d * TE2`` of field-dependent phase in the offsets.
    n_threads : int
        Threads for the per-channel and per-slab loops.

    Returns
    -------
    CoilCombination
        As for :func:`mcpc3ds`.

    Raises
    ------
    ValueError
        When ``TE2`` is not ``2 * TE1`` (within ``te_rtol``); use :func:`mcpc3ds` then.

    References
    ----------
    Eckstein K, Dymerska B, Bachrata B, Bogner W, Poljanc K, Trattnig S, Robinson SD.
    Computationally efficient combination of multi-channel phase data from multi-echo
    acquisitions (ASPIRE). Magn Reson Med 2018;79:2996-3006.
    """
    mag, ph, tes, sigma_vox, sel = _check_inputs(
        magnitude, phase, echo_times_s, voxel_size_mm, sigma_mm, mask
    )
    if abs(tes[1] - 2 * tes[0]) > te_rtol * tes[1]:
        raise ValueError(
            f"ASPIRE needs TE2 = 2 * TE1, got TE1 = {tes[0] * 1e3:g} ms and TE2 = "
            f"{tes[1] * 1e3:g} ms (relative tolerance {te_rtol}); use mcpc3ds for these echo "
            "times"
        )
    n_threads = max(1, int(n_threads))

    def raw_offsets(sl: slice) -> np.ndarray:
        p1 = np.asarray(ph[sl, :, :, 0, :], dtype=np.float32)
        return 2 * p1 - ph[sl, :, :, 1, :]

    offsets = _smoothed_offsets(raw_offsets, mag, sel, sigma_vox, n_threads)
    out_mag, out_phase = _combine(mag, ph, offsets, n_threads)
    return CoilCombination(out_mag, out_phase, offsets)
