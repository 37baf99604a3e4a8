"""Multi-echo gradient-echo simulation of the analytic head phantom, written as a BIDS dataset.

Forward model (DESIGN.md section 2):

* total field (ppm) = dipole convolution of the whole head's susceptibility, referenced to the
  air around the head, computed on a grid extended beyond the field of view so the neck and the
  outside air shape the background field, then shimmed with 2nd-order spherical harmonics over
  the brain as a scanner would;
* local field (ppm) = dipole convolution of the brain's own susceptibility (demeaned over the
  brain mask), the part background-field removal should recover;
* complex signal per echo ``M0 * spgr(R1, TR, flip) * exp(-TE * R2*) * dephasing(TE)
  * exp(i * (phase0 + 2 * pi * gamma_bar * B0 * TE * field_ppm * 1e-6))`` with a smooth,
  echo-independent ``phase0``; ``dephasing`` is the intravoxel sinc attenuation from the field
  gradient across each voxel; optional receive coils multiply their complex sensitivities
  (coil-specific phase offsets); complex Gaussian noise gives the requested SNR.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import GAMMA_BAR_MHZ_PER_T, __version__
from .algorithms.dipole import forward_field
from .io.bids import bids_path, write_dataset_description, write_tsv
from .io.nifti import b0_direction_from_affine, save_nifti, write_json
from .phantom import (
    CHI_AIR_PPM,
    LABELS,
    HeadModel,
    label_points,
    make_head_model,
    tissue_maps,
)

__all__ = [
    "AcquisitionParams",
    "SimulatedAcquisition",
    "ORIENTATIONS_DEG",
    "MULTI_ORIENTATION_SUPERSAMPLE",
    "acquisition_affine",
    "rotation_matrix",
    "simulate_acquisition",
    "simulate_dataset",
]

#: Head tilts (degrees about the scanner's x (left-right, pitch) and y (anterior-posterior, roll)
#: axes) used for orientations 1, 2, ... in multi-orientation datasets. The first five (tilts of
#: 15-20 degrees) are a COSMOS protocol (Liu et al., MRM 2009 used tilts of up to ~25 degrees);
#: from the sixth on, B0 is tilted by 30 degrees in the head (pitch, roll, and both at 21.5
#: degrees), the larger tilts STI needs to separate the tensor components (Liu, MRM 2010;
#: Li et al., NeuroImage 2012) and the range the registration is specified for. The sixth tilts
#: about both axes: pitch-only and roll-only tilts never sense the xy tensor component, so any
#: first six orientations (the minimum for STI) determine the tensor.
ORIENTATIONS_DEG: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (20.0, 0.0),
    (0.0, 18.0),
    (-15.0, 0.0),
    (0.0, -18.0),
    (21.5, 21.5),
    (30.0, 0.0),
    (0.0, 30.0),
    (-21.5, 21.5),
    (21.5, -21.5),
    (-30.0, 0.0),
    (0.0, -30.0),
)

#: Sub-voxel sampling (per axis) of multi-orientation datasets by default (see
#: :func:`simulate_acquisition`'s ``supersample``); single-orientation datasets use 1.
MULTI_ORIENTATION_SUPERSAMPLE = 2


@dataclass(frozen=True)
class AcquisitionParams:
    """Protocol of one simulated multi-echo GRE acquisition.

    Attributes
    ----------
    matrix : (3,) int
        Image matrix (x, y, z).
    voxel_size_mm : (3,) float
        Voxel size in mm.
    echo_times_s : tuple of float
        Echo times in seconds.
    b0_tesla : float
        Main field strength in Tesla.
    snr : float
        Mean first-echo magnitude in the brain over the noise standard deviation (of the
        coil-combined image); ``inf`` for noise-free data.
    n_coils : int
        0 writes coil-combined images; N > 0 writes N uncombined receive channels.
    oblique_deg : float
        Slab tilt about the left-right axis (an AC-PC-style oblique), degrees.
    repetition_time_s, flip_angle_deg : float
        Spoiled-GRE timing for T1 weighting.
    shim_order : int
        Order of the spherical-harmonic shim applied over the brain (0 to 2; -1 disables).
    """

    matrix: tuple[int, int, int] = (176, 208, 160)
    voxel_size_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    echo_times_s: tuple[float, ...] = (0.005, 0.010, 0.015, 0.020)
    b0_tesla: float = 3.0
    snr: float = 80.0
    n_coils: int = 0
    oblique_deg: float = 0.0
    repetition_time_s: float = 0.030
    flip_angle_deg: float = 15.0
    shim_order: int = 2

    def __post_init__(self) -> None:
        if len(self.matrix) != 3 or min(self.matrix) < 8:
            raise ValueError(f"matrix must be 3 sizes >= 8, got {self.matrix}")
        if len(self.voxel_size_mm) != 3 or min(self.voxel_size_mm) <= 0:
            raise ValueError(f"voxel_size_mm must be 3 positive sizes, got {self.voxel_size_mm}")
        tes = np.asarray(self.echo_times_s)
        if tes.size < 1 or np.any(tes <= 0) or np.any(np.diff(tes) <= 0):
            raise ValueError(
                f"echo_times_s must be positive and increasing, got {self.echo_times_s}"
            )
        if self.b0_tesla <= 0:
            raise ValueError(f"b0_tesla must be positive, got {self.b0_tesla}")
        if not self.snr > 0:
            raise ValueError(f"snr must be positive, got {self.snr}")
        if self.n_coils < 0:
            raise ValueError(f"n_coils must be >= 0, got {self.n_coils}")
        if self.shim_order not in (-1, 0, 1, 2):
            raise ValueError(f"shim_order must be -1, 0, 1 or 2, got {self.shim_order}")


@dataclass
class SimulatedAcquisition:
    """Arrays of one simulated acquisition (all in the acquisition's voxel grid).

    ``magnitude`` and ``phase`` (rad) have shape (x, y, z, echo) or (x, y, z, echo, coil).
    Fields and chi are in ppm; ``r2star_hz`` in Hz; ``phase_offset_rad`` is the echo-independent
    phase (per coil when uncombined: (x, y, z, coil)).
    """

    params: AcquisitionParams
    affine: np.ndarray
    b0_dir: np.ndarray
    magnitude: np.ndarray
    phase: np.ndarray
    chi_ppm: np.ndarray
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    mask: np.ndarray
    segmentation: np.ndarray
    r2star_hz: np.ndarray
    m0: np.ndarray
    phase_offset_rad: np.ndarray
    coil_sensitivity: np.ndarray | None = None
    head_rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    #: with anisotropic white matter: tensor (x, y, z, 6) ppm in the voxel frame (components
    #: xx, xy, xz, yy, yz, zz) and unit fibre directions (x, y, z, 3), zero outside WM
    chi_tensor_ppm: np.ndarray | None = None
    fibre_dir: np.ndarray | None = None

    @property
    def complex_signal(self) -> np.ndarray:
        return (self.magnitude * np.exp(1j * self.phase)).astype(np.complex64)

    @property
    def chi33_ppm(self) -> np.ndarray:
        """Apparent susceptibility along B0, ``b0^T X b0`` (ppm); ``chi_ppm`` if isotropic."""
        if self.chi_tensor_ppm is None:
            return self.chi_ppm
        from .algorithms.multi_orientation.sti import project_tensor

        return project_tensor(self.chi_tensor_ppm, self.b0_dir)


def rotation_matrix(
    pitch_deg: float = 0.0, roll_deg: float = 0.0, yaw_deg: float = 0.0
) -> np.ndarray:
    """Rotation about x (pitch), then y (roll), then z (yaw); angles in degrees."""
    a, b, c = np.deg2rad([pitch_deg, roll_deg, yaw_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def acquisition_affine(
    matrix: Sequence[int],
    voxel_size_mm: Sequence[float],
    *,
    oblique_deg: float = 0.0,
    center_mm: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Voxel-to-scanner affine (RAS, mm) of a slab centred on ``center_mm``, tilted about x."""
    rot = rotation_matrix(pitch_deg=oblique_deg)
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(voxel_size_mm, dtype=np.float64)
    centre_vox = (np.asarray(matrix, dtype=np.float64) - 1) / 2
    aff[:3, 3] = np.asarray(center_mm, dtype=np.float64) - aff[:3, :3] @ centre_vox
    return aff


def _grid_world(affine: np.ndarray, shape: Sequence[int], start: Sequence[int]):
    """World coordinates (three float32 arrays) of voxel centres ``start + index``."""
    axes = [np.arange(s, s + n, dtype=np.float32) for s, n in zip(start, shape, strict=True)]
    i, j, k = np.meshgrid(*axes, indexing="ij", copy=False)
    a = affine.astype(np.float32)
    return tuple(a[r, 0] * i + a[r, 1] * j + a[r, 2] * k + a[r, 3] for r in range(3))


def _solid_harmonics(x: np.ndarray, y: np.ndarray, z: np.ndarray, order: int) -> np.ndarray:
    """Real solid harmonics up to ``order`` (<= 2) as columns, coordinates in dm."""
    cols = [np.ones_like(x)]
    if order >= 1:
        cols += [x, y, z]
    if order >= 2:
        cols += [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    return np.stack(cols, axis=1)


def _eval_harmonics(world, coef: np.ndarray, order: int) -> np.ndarray:
    """Evaluate ``sum_i coef[i] * harmonic_i`` on a grid without stacking the basis."""
    x, y, z = (w / np.float32(100) for w in world)
    terms = [
        lambda: 1.0,
        lambda: x,
        lambda: y,
        lambda: z,
        lambda: x * y,
        lambda: x * z,
        lambda: y * z,
        lambda: x * x - y * y,
        lambda: 2 * z * z - x * x - y * y,
    ]
    out = np.zeros(x.shape, dtype=np.float32)
    for c, term in zip(coef.astype(np.float32), terms[: len(coef)], strict=False):
        out += c * term()
    return out


def _coil_sensitivities(world, n_coils: int, rng: np.random.Generator) -> np.ndarray:
    """Complex receive sensitivities (x, y, z, coil) of loops on a cylinder around the head.

    Magnitude falls off like a small loop's on-axis field, (1 + (d/d0)^2)^-1.5; the phase is a
    smooth, coil-specific function (constant plus a term growing with distance), which is what
    MCPC-3D-S (Eckstein et al., MRM 2018) has to remove.
    """
    n_rings = 1 if n_coils <= 8 else 2
    per_ring = int(np.ceil(n_coils / n_rings))
    out = np.empty(world[0].shape + (n_coils,), dtype=np.complex64)
    for c in range(n_coils):
        ring, idx = divmod(c, per_ring)
        ang = 2 * np.pi * (idx + 0.5 * ring) / per_ring
        pos = (120 * np.cos(ang), 135 * np.sin(ang), 25.0 - 50.0 * ring if n_rings == 2 else 5.0)
        d = np.sqrt(sum((world[i] - np.float32(pos[i])) ** 2 for i in range(3)))
        mag = (1 + (d / np.float32(90.0)) ** 2) ** -1.5
        ph = np.float32(rng.uniform(-np.pi, np.pi)) + d * np.float32(
            rng.uniform(0.8, 1.6) * np.pi / 150
        )
        out[..., c] = mag * np.exp(1j * ph)
    return out


def _phase_offset(world, rng: np.random.Generator) -> np.ndarray:
    """A smooth echo-independent phase (rad): random constant plus low-order variation."""
    x, y, z = (w / np.float32(100.0) for w in world)
    coef = rng.uniform(-0.6, 0.6, size=6).astype(np.float32)
    return (
        np.float32(rng.uniform(-np.pi, np.pi))
        + coef[0] * x
        + coef[1] * y
        + coef[2] * z
        + coef[3] * x * x
        + coef[4] * y * y
        + coef[5] * z * z
    ).astype(np.float32)


def _partial_volume_tissue(model, head, step, s: int, b0_tesla: float, *, anisotropy: bool):
    """Tissue of voxels averaged over ``s^3`` sub-voxel points (partial-volume simulation).

    ``head`` are the head-frame coordinates (three flat float32 arrays, mm) of the voxel centres
    and ``step`` (3, 3) the head-frame displacement per voxel index. The sub-voxel points are
    the centres of an ``s x s x s`` split of each voxel, processed one offset at a time, so
    memory stays that of a point-sampled simulation plus the running sums. Returns the most
    frequent label, the mean signed distance to the brain (mm), the brain fraction, mean maps
    and (with ``anisotropy``) the mean of ``[in WM] (n n^T - I / 3)`` (n, 6), head frame.
    """
    from .anisotropy import fibre_tensor
    from .phantom import WM

    n = head[0].size
    offsets = (np.arange(s, dtype=np.float32) + np.float32(0.5)) / np.float32(s) - np.float32(0.5)
    counts = np.zeros((max(LABELS) + 1, n), dtype=np.uint8)
    flat = np.arange(n, dtype=np.int64)
    sums = {k: np.zeros(n, np.float32) for k in ("chi_ppm", "m0", "r2star_hz", "r1_hz")}
    sd_sum = np.zeros(n, np.float32)
    inside = np.zeros(n, np.uint16)
    aniso = np.zeros((n, 6), np.float32) if anisotropy else None
    scale = model.scale.astype(np.float32)
    for oi in offsets:
        for oj in offsets:
            for ok in offsets:
                d = step @ np.array([oi, oj, ok], dtype=np.float32)
                pts = [head[r] + d[r] for r in range(3)]
                lab, sd = label_points(model, *pts)
                maps = tissue_maps(model, lab, *pts, b0_tesla=b0_tesla)
                counts.reshape(-1)[lab.astype(np.int64) * n + flat] += 1
                for k, acc in sums.items():
                    acc += maps[k]
                sd_sum += sd
                inside += sd < 0
                if aniso is not None:
                    wm = np.flatnonzero(lab == WM)
                    aniso[wm] += fibre_tensor(*(pts[r][wm] / scale[r] for r in range(3)))
                del pts, lab, sd, maps
    inv = np.float32(1.0 / s**3)
    labels = counts.argmax(axis=0).astype(np.int8)
    del counts
    for acc in sums.values():
        acc *= inv
    if aniso is not None:
        aniso *= inv
    return labels, sd_sum * inv, inside.astype(np.float32) * inv, sums, aniso


def simulate_acquisition(
    model: HeadModel,
    params: AcquisitionParams,
    *,
    head_rotation: np.ndarray | None = None,
    head_shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
    rng: np.random.Generator | None = None,
    margin_mm: float = 32.0,
    n_threads: int = 1,
    wm_anisotropy_ppm: float = 0.0,
    supersample: int = 1,
) -> SimulatedAcquisition:
    """Simulate one multi-echo GRE acquisition of ``model`` with protocol ``params``.

    Parameters
    ----------
    model : HeadModel
        The subject's head (see :func:`qsmflow.phantom.make_head_model`).
    params : AcquisitionParams
        Protocol.
    head_rotation : (3, 3) array
        Rotation of the head in the scanner (head frame -> scanner frame); identity by default.
    head_shift_mm : (3,) float
        Position of the head centre in scanner coordinates.
    rng : numpy Generator
        Source of phase offsets, coil phases and noise.
    margin_mm : float
        Extra simulated extent around the field of view for the background field.
    n_threads : int
        FFT workers.
    wm_anisotropy_ppm : float
        chi_parallel - chi_perpendicular of white matter (ppm); 0 (default) keeps the phantom
        isotropic. Non-zero adds a tensor about a fibre direction field
        (:mod:`qsmflow.anisotropy`) to the fields; ``chi_ppm`` stays the mean susceptibility.
    supersample : int
        1 (default) labels tissue at voxel centres. ``s`` > 1 samples the anatomy at ``s^3``
        sub-voxel points and averages chi, M0, R2*, R1 (and the white-matter tensor), so every
        head orientation sees a partial-volume image of the same continuous head; the brain mask
        is then where the brain fills at least half the voxel and the segmentation the most
        frequent label. The ground truth (``chi_ppm``, tensor) is averaged the same way.
    """
    if int(supersample) != supersample or not 1 <= supersample <= 6:
        raise ValueError(f"supersample must be an integer from 1 to 6, got {supersample!r}")
    supersample = int(supersample)
    rng = np.random.default_rng(0) if rng is None else rng
    rot = np.eye(3) if head_rotation is None else np.asarray(head_rotation, dtype=np.float64)
    shape = tuple(int(n) for n in params.matrix)
    vox = np.asarray(params.voxel_size_mm, dtype=np.float64)
    affine = acquisition_affine(shape, vox, oblique_deg=params.oblique_deg)
    b0_dir = b0_direction_from_affine(affine)

    # Extended grid: the head (and neck) beyond the field of view shape the background field.
    margin = [int(np.ceil(margin_mm / v)) for v in vox]
    ext_shape = tuple(n + 2 * m for n, m in zip(shape, margin, strict=True))
    crop = tuple(slice(m, m + n) for m, n in zip(margin, shape, strict=True))
    world = _grid_world(affine, ext_shape, [-m for m in margin])
    shift = np.asarray(head_shift_mm, dtype=np.float32)
    rt = rot.T.astype(np.float32)
    centred = [world[i] - shift[i] for i in range(3)]
    head = [sum(rt[r, c] * centred[c] for c in range(3)).ravel() for r in range(3)]
    del centred
    aniso_head = None
    if supersample == 1:
        labels, brain_sd = label_points(model, *head)
        maps = tissue_maps(model, labels, *head, b0_tesla=params.b0_tesla)
        brain_frac = None
    else:
        step = rt @ (affine[:3, :3].astype(np.float32))  # head-frame mm per voxel index
        labels, brain_sd, brain_frac, maps, aniso_head = _partial_volume_tissue(
            model, head, step, supersample, params.b0_tesla, anisotropy=bool(wm_anisotropy_ppm)
        )
    labels = labels.reshape(ext_shape)
    chi_ext = maps["chi_ppm"].reshape(ext_shape)
    head_fov = [h.reshape(ext_shape)[crop] for h in head] if wm_anisotropy_ppm else None
    if aniso_head is not None:
        aniso_head = np.ascontiguousarray(aniso_head.reshape(ext_shape + (6,))[crop])
    del head

    # Total field: susceptibility relative to the surrounding air (zero outside the grid).
    # Away from the brain the sources get partial-volume edges: a voxelised 9.4 ppm air/bone
    # step would otherwise ring under the k-space kernel (non-harmonic ripples inside the
    # brain that no scanner produces); the brain and a rim around it stay voxel-exact, so the
    # local field is exactly that of the ground-truth chi.
    brain_sd = brain_sd.reshape(ext_shape)
    mask_ext = brain_sd < 0 if brain_frac is None else brain_frac.reshape(ext_shape) >= 0.5
    del brain_frac
    sources = chi_ext - np.float32(CHI_AIR_PPM)
    ramp = np.clip((brain_sd - 1.5 * vox.max()) / (2.0 * vox.max()), 0, 1).astype(np.float32)
    del brain_sd
    sources += ramp * (ndimage.gaussian_filter(sources, 0.7) - sources)
    del ramp
    total_ext = forward_field(sources, vox, b0_dir, pad_factor=1.25, n_threads=n_threads)
    del sources
    total = np.ascontiguousarray(total_ext[crop])
    del total_ext
    seg = np.ascontiguousarray(labels[crop])
    chi = np.ascontiguousarray(chi_ext[crop])
    m0 = maps["m0"].reshape(ext_shape)[crop]
    r2s = maps["r2star_hz"].reshape(ext_shape)[crop]
    r1 = maps["r1_hz"].reshape(ext_shape)[crop]
    del chi_ext, labels, maps
    w_fov = tuple(np.ascontiguousarray(w[crop]) for w in world)
    del world
    mask = np.ascontiguousarray(mask_ext[crop])
    del mask_ext

    # Local field: the brain's own sources, demeaned so no uniform-chi field is attributed to it.
    chi_brain = np.where(mask, chi - np.float32(chi[mask].mean()), np.float32(0))
    local = forward_field(chi_brain, vox, b0_dir, pad_factor=2.0, n_threads=n_threads)
    del chi_brain
    tensor = fibres = None
    if wm_anisotropy_ppm:
        from .anisotropy import anisotropic_wm
        from .phantom import WM

        head_to_voxel = (affine[:3, :3] / vox).T @ rot
        tensor, fibres, aniso_field = anisotropic_wm(
            chi,
            seg == WM,
            head_fov,
            model.scale,
            head_to_voxel,
            wm_anisotropy_ppm,
            vox,
            b0_dir,
            aniso_head=aniso_head,
            n_threads=n_threads,
        )
        del head_fov, aniso_head
        total += aniso_field
        local += aniso_field

    if params.shim_order >= 0:
        idx = np.flatnonzero(mask.ravel())[:: max(1, int(mask.sum()) // 200_000)]
        basis = _solid_harmonics(
            *(w.ravel()[idx] / np.float32(100) for w in w_fov), params.shim_order
        )
        coef, *_ = np.linalg.lstsq(
            basis.astype(np.float64), total.ravel()[idx].astype(np.float64), rcond=None
        )
        total -= _eval_harmonics(w_fov, coef, params.shim_order)

    hz_per_ppm = np.float32(GAMMA_BAR_MHZ_PER_T * params.b0_tesla)
    grads = np.gradient(total)  # ppm per voxel along each axis
    tes = np.asarray(params.echo_times_s, dtype=np.float32)
    e1 = np.exp(-np.float32(params.repetition_time_s) * r1)
    fa = np.deg2rad(params.flip_angle_deg)
    steady = m0 * np.float32(np.sin(fa)) * (1 - e1) / (1 - np.float32(np.cos(fa)) * e1)
    phase0 = _phase_offset(w_fov, rng)
    n_e = tes.size
    signal = np.empty(shape + (n_e,), dtype=np.complex64)
    for e, te in enumerate(tes):
        deph = np.ones(shape, dtype=np.float32)
        for g in grads:
            deph *= np.abs(np.sinc(g * hz_per_ppm * te)).astype(np.float32)
        mag = steady * np.exp(-te * r2s) * deph
        ph = phase0 + np.float32(2 * np.pi) * hz_per_ppm * te * total
        signal[..., e] = mag * np.exp(1j * ph)
    del grads

    sens = None
    ref_level = float(np.abs(signal[..., 0])[mask].mean())
    if params.n_coils > 0:
        sens = _coil_sensitivities(w_fov, params.n_coils, rng)
        rss = np.sqrt((np.abs(sens) ** 2).sum(axis=-1))
        sens /= np.float32(np.mean(rss[mask]))
        signal = signal[..., None] * sens[..., None, :]
        offsets = (phase0[..., None] + np.angle(sens)).astype(np.float32)
        # the root-sum-of-squares image has noise SD ~ the per-channel sigma (high SNR), so
        # sigma = RSS level / SNR gives the requested SNR after coil combination
        ref_level = float(np.sqrt((np.abs(signal[..., 0, :]) ** 2).sum(-1))[mask].mean())
        sigma = ref_level / params.snr
    else:
        offsets = phase0
        sigma = ref_level / params.snr
    if np.isfinite(sigma) and sigma > 0:
        # sigma per real/imaginary channel: the magnitude image then has noise SD sigma
        noise = rng.standard_normal(signal.shape + (2,), dtype=np.float32) * np.float32(sigma)
        signal += noise[..., 0] + 1j * noise[..., 1]
        del noise
    return SimulatedAcquisition(
        params=params,
        affine=affine,
        b0_dir=b0_dir,
        magnitude=np.abs(signal).astype(np.float32),
        phase=np.angle(signal).astype(np.float32),
        chi_ppm=chi,
        total_field_ppm=total.astype(np.float32),
        local_field_ppm=np.where(mask, local, np.float32(0)).astype(np.float32),
        mask=mask,
        segmentation=seg.astype(np.int16),
        r2star_hz=r2s.astype(np.float32),
        m0=np.ascontiguousarray(m0),
        phase_offset_rad=offsets,
        coil_sensitivity=sens,
        head_rotation=rot,
        chi_tensor_ppm=tensor,
        fibre_dir=fibres,
    )


# ------------------------------------------------------------------------------ BIDS writing
_GROUND_TRUTH = "qsmflow-simulate"
_DSEG_DESCRIPTION = "Head phantom labels, QSM challenge 2.0 scheme (desc-phantom_dseg.tsv)"
_README = """# qsmflow simulated multi-echo GRE dataset

Written by `qsmflow-simulate` (qsmflow {version}) from an analytic head phantom: scalp, skull,
air sinuses, grey/white matter, CSF, deep grey nuclei, veins and a calcification. Ground truth
(susceptibility in ppm, total and local field maps in Hz, brain mask, segmentation, R2*) is in
`derivatives/{gt}/`. Simulation settings: {settings}.
"""


def _raw_sidecar(params: AcquisitionParams, echo: int, part: str, coil: bool) -> dict:
    te = params.echo_times_s[echo]
    side = {
        "Manufacturer": "qsmflow",
        "ManufacturersModelName": "qsmflow-simulate",
        "DeviceSerialNumber": "0",
        "StationName": "qsmflow-simulate",
        "SoftwareVersions": f"qsmflow {__version__}",
        "InstitutionName": "qsmflow (simulated data)",
        "InstitutionAddress": "n/a",
        "InstitutionalDepartmentName": "n/a",
        "ReceiveCoilName": f"simulated {max(params.n_coils, 1)}-channel head coil",
        "ReceiveCoilActiveElements": ",".join(f"H{c + 1}" for c in range(max(params.n_coils, 1))),
        "MatrixCoilMode": "none",
        "CoilCombinationMethod": "none (uncombined)" if coil else "complex sum",
        "SequenceName": "qsmflow_megre3d",
        "PulseSequenceDetails": "simulated 3D multi-echo spoiled GRE, monopolar readout",
        "NonlinearGradientCorrection": False,
        "DwellTime": 1e-5,
        "MagneticFieldStrength": params.b0_tesla,
        "MRAcquisitionType": "3D",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "PulseSequenceType": "Multi-echo spoiled gradient echo",
        "EchoTime": round(float(te), 6),
        "EchoNumber": echo + 1,
        "EchoTrainLength": len(params.echo_times_s),
        "RepetitionTime": params.repetition_time_s,
        "FlipAngle": params.flip_angle_deg,
        "ImageType": ["ORIGINAL", "PRIMARY", "M" if part == "mag" else "P", "ND"],
        "SkullStripped": False,
        "Units": "arbitrary" if part == "mag" else "rad",
    }
    return side


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out_dir}: directory exists and is not empty; pass --overwrite to replace a "
                "dataset written by qsmflow-simulate, or choose another OUT_DIR"
            )
        desc = out_dir / "dataset_description.json"
        if not desc.exists() or "qsmflow-simulate" not in desc.read_text():
            raise FileExistsError(
                f"{out_dir}: not a dataset written by qsmflow-simulate; refusing to delete it "
                "even with --overwrite; choose another OUT_DIR"
            )


def simulate_dataset(
    out_dir: str | os.PathLike,
    *,
    params: AcquisitionParams | None = None,
    n_subjects: int = 1,
    n_sessions: int = 1,
    n_orientations: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    n_threads: int = 1,
    progress=None,
    wm_anisotropy_ppm: float = 0.0,
    supersample: int | None = None,
) -> Path:
    """Write a simulated BIDS dataset with ground truth under ``derivatives/qsmflow-simulate``.

    The dataset is assembled in a temporary sibling folder and moved into place at the end, so
    an interrupted run leaves no partial dataset. Deterministic for a given ``seed``.

    ``wm_anisotropy_ppm`` > 0 simulates anisotropic white matter (see
    :func:`simulate_acquisition`) and adds the true tensor (``desc-tensor_Chimap``, 4-D, six
    components) and chi33 (``desc-chi33_Chimap``) to the ground truth of each orientation.

    ``supersample`` (see :func:`simulate_acquisition`) defaults to
    :data:`MULTI_ORIENTATION_SUPERSAMPLE` when ``n_orientations`` > 1, so the head orientations
    (and their ground truth) are partial-volume images of one continuous head and agree with
    each other after registration, and to 1 (voxel-centre labels) for single-orientation data.

    Returns the dataset path.
    """
    params = AcquisitionParams() if params is None else params
    for name, val, lo in (
        ("n_subjects", n_subjects, 1),
        ("n_sessions", n_sessions, 1),
        ("n_orientations", n_orientations, 1),
    ):
        if int(val) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {val}")
    if n_orientations > len(ORIENTATIONS_DEG):
        raise ValueError(f"n_orientations must be <= {len(ORIENTATIONS_DEG)}, got {n_orientations}")
    if supersample is None:
        supersample = MULTI_ORIENTATION_SUPERSAMPLE if n_orientations > 1 else 1
    if int(supersample) != supersample or not 1 <= supersample <= 6:
        raise ValueError(f"supersample must be an integer from 1 to 6, got {supersample!r}")
    out_dir = Path(out_dir).absolute()
    _check_output_dir(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            __import__("tempfile").mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent)
        )
    except OSError as exc:
        raise PermissionError(f"{out_dir}: cannot write here ({exc.strerror})") from exc
    try:
        _write_dataset(
            staging,
            params,
            n_subjects,
            n_sessions,
            n_orientations,
            seed,
            n_threads,
            progress,
            wm_anisotropy_ppm=wm_anisotropy_ppm,
            supersample=int(supersample),
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_dataset(
    root,
    params,
    n_subjects,
    n_sessions,
    n_orientations,
    seed,
    n_threads,
    progress,
    *,
    wm_anisotropy_ppm=0.0,
    supersample=1,
):
    settings = (
        f"{n_subjects} subject(s), {n_sessions} session(s), {n_orientations} orientation(s), "
        f"matrix {tuple(params.matrix)}, voxel {tuple(params.voxel_size_mm)} mm, "
        f"TE {tuple(params.echo_times_s)} s, B0 {params.b0_tesla} T, SNR {params.snr}, "
        f"coils {params.n_coils}, oblique {params.oblique_deg} deg, seed {seed}"
    )
    if wm_anisotropy_ppm:
        settings += f", white-matter anisotropy {wm_anisotropy_ppm} ppm"
    if supersample > 1:
        settings += f", partial volume from {supersample}^3 sub-voxel samples"

    generated = {"Name": "qsmflow-simulate", "Version": __version__}
    write_dataset_description(
        root,
        "qsmflow simulated head phantom",
        generated_by=generated,
        extra={
            "License": "CC0",
            "HowToAcknowledge": "Cite qsmflow.",
            "Authors": ["qsmflow developers", "qsmflow-simulate"],
        },
    )
    (root / "README.md").write_text(
        _README.format(version=__version__, gt=_GROUND_TRUTH, settings=settings)
    )
    gt_root = root / "derivatives" / _GROUND_TRUTH
    write_dataset_description(
        gt_root,
        "qsmflow-simulate ground truth",
        dataset_type="derivative",
        generated_by={**generated, "Description": settings},
        source_datasets=[{"URL": "../../"}],
        extra={"Authors": ["qsmflow developers", "qsmflow-simulate"]},
    )
    (gt_root / "README.md").write_text(
        "# qsmflow-simulate ground truth\n\nTrue susceptibility (ppm), field maps (Hz), brain "
        "masks, segmentations and R2* (Hz) of the simulated acquisitions in the parent dataset.\n"
    )
    write_json({"Description": _DSEG_DESCRIPTION}, gt_root / "desc-phantom_dseg.json")
    write_tsv(
        [{"index": k, "name": v.replace(" ", "")} for k, v in LABELS.items()],
        gt_root / "desc-phantom_dseg.tsv",
        ["index", "name"],
    )
    subjects = [f"{s + 1:02d}" for s in range(n_subjects)]
    write_tsv(
        [{"participant_id": f"sub-{s}"} for s in subjects],
        root / "participants.tsv",
        ["participant_id"],
    )
    write_json(
        {"participant_id": {"Description": "Simulated subject (one random head phantom)"}},
        root / "participants.json",
    )

    total = n_subjects * n_sessions * n_orientations
    done = 0
    for s_idx, sub in enumerate(subjects):
        model = make_head_model(seed * 1000 + s_idx)
        for ses_idx in range(n_sessions):
            ses = f"{ses_idx + 1:02d}" if n_sessions > 1 else None
            pose_rng = np.random.default_rng([seed, s_idx, ses_idx, 7])
            # repositioning between sessions: a few mm and degrees
            jitter = pose_rng.uniform(-3, 3, size=3) if ses_idx else np.zeros(3)
            shift = pose_rng.uniform(-3, 3, size=3) if ses_idx else np.zeros(3)
            for o_idx in range(n_orientations):
                acq = f"ori{o_idx + 1}" if n_orientations > 1 else None
                pitch, roll = ORIENTATIONS_DEG[o_idx]
                rot = rotation_matrix(pitch + jitter[0], roll + jitter[1], jitter[2])
                rng = np.random.default_rng([seed, s_idx, ses_idx, o_idx])
                sim = simulate_acquisition(
                    model,
                    params,
                    head_rotation=rot,
                    head_shift_mm=shift,
                    rng=rng,
                    n_threads=n_threads,
                    wm_anisotropy_ppm=wm_anisotropy_ppm,
                    supersample=supersample,
                )
                ent = {"sub": sub, "ses": ses, "acq": acq}
                _write_acquisition(root, gt_root, ent, sim, pitch, roll)
                done += 1
                if progress is not None:
                    progress(done, total, ent)


def _write_acquisition(
    root: Path, gt_root: Path, ent: dict, sim: SimulatedAcquisition, pitch: float, roll: float
) -> None:
    p = sim.params
    coil = p.n_coils > 0
    for e in range(len(p.echo_times_s)):
        for part, data in (("mag", sim.magnitude), ("phase", sim.phase)):
            rel = bids_path({**ent, "echo": e + 1, "part": part}, "MEGRE")
            save_nifti(data[..., e, :] if coil else data[..., e], sim.affine, root / rel)
            write_json(
                _raw_sidecar(p, e, part, coil),
                root / rel.with_name(rel.name.replace(".nii.gz", ".json")),
            )

    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * p.b0_tesla
    source = bids_path({**ent, "echo": 1, "part": "mag"}, "MEGRE").as_posix()
    common = {
        "MagneticFieldStrength": p.b0_tesla,
        "B0DirectionVoxel": [round(float(v), 8) for v in sim.b0_dir],
        "HeadRotationDeg": {"pitch": pitch, "roll": roll},
        "SkullStripped": False,
        "SpatialReference": f"bids:raw:{source}",
        "Sources": [f"bids:raw:{source}"],
    }
    first_mag = np.sqrt((sim.magnitude[..., 0, :] ** 2).sum(-1)) if coil else sim.magnitude[..., 0]
    outputs = [
        (
            sim.chi_ppm,
            "Chimap",
            {},
            "anat",
            {
                "Units": "ppm",
                "Description": "True magnetic susceptibility relative to water (CSF = 0 ppm)",
            },
        ),
        (
            sim.mask,
            "mask",
            {"desc": "brain"},
            "anat",
            {"Type": "Brain", "Description": "True brain mask"},
        ),
        (sim.segmentation, "dseg", {"desc": "phantom"}, "anat", {"Description": _DSEG_DESCRIPTION}),
        (sim.r2star_hz, "R2starmap", {}, "anat", {"Units": "Hz", "Description": "True R2*"}),
    ]
    if sim.chi_tensor_ppm is not None:
        outputs += _tensor_outputs(sim)
    for desc, field_ppm, text in (
        ("total", sim.total_field_ppm, "True total field (background + local, after shimming)"),
        ("local", sim.local_field_ppm, "True local field of the brain's own sources"),
    ):
        outputs += [
            (
                field_ppm * np.float32(hz_per_ppm),
                "fieldmap",
                {"desc": desc},
                "fmap",
                {"Units": "Hz", "Description": text + f"; ppm = Hz / {hz_per_ppm:.4f}"},
            ),
            (
                first_mag,
                "magnitude",
                {"desc": desc},
                "fmap",
                {"Description": "First-echo magnitude (arbitrary units) for the field map"},
            ),
        ]
    for data, suffix, extra_ent, datatype, side in outputs:
        rel = bids_path({**ent, **extra_ent}, suffix, datatype=datatype)
        save_nifti(data, sim.affine, gt_root / rel)
        write_json(
            {**side, **common}, gt_root / rel.with_name(rel.name.replace(".nii.gz", ".json"))
        )


def _tensor_outputs(sim: SimulatedAcquisition) -> list:
    """Ground truth of anisotropic white matter: the tensor (4-D) and chi33 along B0."""
    frame = "voxel (array) axes of this image; components xx, xy, xz, yy, yz, zz"
    return [
        (
            sim.chi_tensor_ppm,
            "Chimap",
            {"desc": "tensor"},
            "anat",
            {
                "Units": "ppm",
                "Description": "True susceptibility tensor (mean = Chimap; anisotropic WM)",
                "TensorComponents": ["xx", "xy", "xz", "yy", "yz", "zz"],
                "TensorFrame": frame,
            },
        ),
        (
            sim.chi33_ppm,
            "Chimap",
            {"desc": "chi33"},
            "anat",
            {"Units": "ppm", "Description": "True apparent susceptibility along B0 (chi33)"},
        ),
    ]
