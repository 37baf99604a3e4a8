"""Rigid registration of head orientations (first-echo magnitudes) to a reference orientation.

The transform ``T`` (4x4, world mm) maps reference world coordinates to moving world coordinates,
``x_moving = T x_reference``, so that ``moving(T x)`` is the moving image resampled on the
reference grid. It is found by maximising the normalised cross-correlation (NCC) of the two
magnitudes over the reference foreground, coarse to fine (block-averaged pyramids at about
8, 4, 2 mm and the native grid), with Powell's derivative-free search (Powell, Comput J 1964) over
a rotation vector (degrees) and a translation (mm) about the reference's centre of mass; the
coarsest level starts from the best of a small grid of pitch/roll tilts, so tilts of 30 degrees
and more are found. This is the classic intensity-based rigid registration (e.g. Jenkinson &
Smith, Med Image Anal 2001, for the multi-resolution search FLIRT uses).

A registration is reported as failed (not silently used) when the final NCC is below
``min_similarity``.

In the reference frame the B0 direction of a moving orientation is ``R^T b0_moving``, with ``R``
the rotation part of ``T``; expressed in the reference voxel axes it is what COSMOS and STI need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

__all__ = [
    "RegistrationResult",
    "rigid_matrix",
    "register_rigid",
    "apply_transform",
    "resample_field",
    "b0_direction_in_reference",
    "fsl_matrix_to_world",
    "normalized_cross_correlation",
    "transform_similarity",
]


@dataclass
class RegistrationResult:
    """Rigid transform (reference world -> moving world, 4x4 mm), NCC and success flag."""

    transform: np.ndarray
    similarity: float
    success: bool
    rotation_deg: np.ndarray
    translation_mm: np.ndarray


def rigid_matrix(params: Sequence[float], center_mm: Sequence[float]) -> np.ndarray:
    """4x4 ``x -> R (x - c) + c + t`` from ``(rx, ry, rz)`` rotation vector (deg) and ``t`` (mm)."""
    p = np.asarray(params, dtype=np.float64)
    c = np.asarray(center_mm, dtype=np.float64)
    rot = Rotation.from_rotvec(np.deg2rad(p[:3])).as_matrix()
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + p[3:6]
    return out


def normalized_cross_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally shaped arrays (0 when either is constant)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    # elementwise sums, not BLAS dot: no thread start-up per call in the optimiser's loop
    den = np.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def _downsample(img: np.ndarray, affine: np.ndarray, factor: int):
    """Block-average by ``factor`` per axis; returns the image and its affine."""
    if factor <= 1:
        return img.astype(np.float32, copy=False), np.asarray(affine, dtype=np.float64)
    shp = [n // factor for n in img.shape]
    cut = img[: shp[0] * factor, : shp[1] * factor, : shp[2] * factor].astype(np.float32)
    small = cut.reshape(shp[0], factor, shp[1], factor, shp[2], factor).mean(axis=(1, 3, 5))
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return small.astype(np.float32), np.asarray(affine, dtype=np.float64) @ scale


def _foreground(img: np.ndarray) -> np.ndarray:
    """Voxels above 15 % of the robust maximum (the head, not the background noise)."""
    hi = float(np.percentile(img, 99.5))
    return img > 0.15 * hi


class _Level:
    """Sample points of the reference and the moving image at one pyramid level."""

    def __init__(self, ref, ref_aff, mov, mov_aff, ref_mask, max_samples: int):
        fg = ref_mask if ref_mask is not None else _foreground(ref)
        idx = np.argwhere(fg)
        step = max(1, int(np.ceil(len(idx) / max_samples)))
        idx = idx[::step]
        self.ref_vals = ref[tuple(idx.T)].astype(np.float64)
        self.ref_world = (ref_aff[:3, :3] @ idx.T.astype(np.float64)) + ref_aff[:3, 3:4]
        self.mov = mov
        self.inv_mov = np.linalg.inv(mov_aff)

    def similarity(self, transform: np.ndarray) -> float:
        m = self.inv_mov @ transform
        coords = m[:3, :3] @ self.ref_world + m[:3, 3:4]
        vals = ndimage.map_coordinates(self.mov, coords, order=1, mode="constant", cval=0.0)
        return normalized_cross_correlation(self.ref_vals, vals)


def _centre_of_mass(img: np.ndarray, affine: np.ndarray) -> np.ndarray:
    w = np.where(_foreground(img), img, 0).astype(np.float64)
    com = np.asarray(ndimage.center_of_mass(w))
    return affine[:3, :3] @ com + affine[:3, 3]


def register_rigid(
    reference: np.ndarray,
    reference_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    reference_mask: np.ndarray | None = None,
    levels_mm: Sequence[float] = (8.0, 4.0, 2.0, 0.0),
    search_deg: float = 30.0,
    min_similarity: float = 0.6,
    max_samples: int = 20_000,
    tolerance_mm: float = 0.05,
) -> RegistrationResult:
    """Rigid transform taking reference world coordinates to moving world coordinates.

    Parameters
    ----------
    reference, moving : (x, y, z) arrays
        First-echo magnitudes (any positive scale; grids and voxel sizes may differ).
    reference_affine, moving_affine : (4, 4) arrays
        Voxel-to-world affines (mm).
    reference_mask : (x, y, z) bool, optional
        Where to compare the images (default: the reference foreground).
    levels_mm : floats
        Pyramid voxel sizes, coarse to fine; 0 means the native grid.
    search_deg : float
        Range of the initial pitch/roll grid search at the coarsest level (degrees).
    min_similarity : float
        Final NCC below which the registration is reported as failed.
    max_samples : int
        Points sampled per level.
    tolerance_mm : float
        Search tolerance (mm, and degrees) at the finest level; coarser levels scale it.
    """
    ref = np.asarray(reference, dtype=np.float32)
    mov = np.asarray(moving, dtype=np.float32)
    for name, img in (("reference", ref), ("moving", mov)):
        if img.ndim != 3:
            raise ValueError(f"{name} image must be 3-D (first-echo magnitude), got {img.shape}")
        if not np.all(np.isfinite(img)) or not np.any(img > 0):
            raise ValueError(f"{name} image must be finite and not all zero")
    ref_aff = np.asarray(reference_affine, dtype=np.float64)
    mov_aff = np.asarray(moving_affine, dtype=np.float64)
    vox_ref = float(np.sqrt((ref_aff[:3, :3] ** 2).sum(0)).min())
    vox_mov = float(np.sqrt((mov_aff[:3, :3] ** 2).sum(0)).min())
    centre = _centre_of_mass(ref, ref_aff)
    params = np.zeros(6)
    params[3:] = _centre_of_mass(mov, mov_aff) - centre
    first = True
    factors = []
    for level_mm in levels_mm:
        f_ref = max(1, int(round(level_mm / vox_ref))) if level_mm > 0 else 1
        f_mov = max(1, int(round(level_mm / vox_mov))) if level_mm > 0 else 1
        if (f_ref, f_mov) not in factors:  # a level at or below the voxel size is the last
            factors.append((f_ref, f_mov))
    for f_ref, f_mov in factors:
        r_img, r_aff = _downsample(ref, ref_aff, f_ref)
        m_img, m_aff = _downsample(mov, mov_aff, f_mov)
        r_mask = None
        if reference_mask is not None:
            r_mask = _downsample(np.asarray(reference_mask, np.float32), ref_aff, f_ref)[0] > 0.5
        level = _Level(r_img, r_aff, m_img, m_aff, r_mask, max_samples)

        def cost(p, level=level):
            return 1.0 - level.similarity(rigid_matrix(p, centre))

        if first and search_deg > 0:
            # coarse grid of tilts: the main rotations between head orientations are pitch/roll
            tilts = np.arange(-search_deg, search_deg + 1e-6, search_deg / 2)
            starts = [np.r_[a, b, 0.0, params[3:]] for a in tilts for b in tilts]
            params = min(starts, key=cost)
        first = False
        step = f_ref * vox_ref
        res = optimize.minimize(
            cost,
            params,
            method="Powell",
            options={
                "xtol": tolerance_mm * f_ref,
                "ftol": 1e-5,
                "direc": np.eye(6) * 0.5 * step,
                "maxfev": 600,
            },
        )
        params = np.asarray(res.x, dtype=np.float64)
    final = _Level(ref, ref_aff, mov, mov_aff, reference_mask, max_samples * 2)
    transform = rigid_matrix(params, centre)
    ncc = final.similarity(transform)
    return RegistrationResult(
        transform=transform,
        similarity=ncc,
        success=bool(ncc >= min_similarity),
        rotation_deg=params[:3].copy(),
        translation_mm=params[3:].copy(),
    )


def transform_similarity(
    reference: np.ndarray,
    reference_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    transform: np.ndarray,
    *,
    max_samples: int = 40_000,
) -> float:
    """NCC of the reference foreground and the moving image through ``transform``."""
    level = _Level(
        np.asarray(reference, np.float32),
        np.asarray(reference_affine, np.float64),
        np.asarray(moving, np.float32),
        np.asarray(moving_affine, np.float64),
        None,
        max_samples,
    )
    return level.similarity(np.asarray(transform, np.float64))


def apply_transform(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    transform: np.ndarray,
    *,
    order: int = 1,
    mask_threshold: float = 0.5,
) -> np.ndarray:
    """Resample ``moving`` on the reference grid through ``transform`` (ref world -> moving world).

    ``order`` is the spline order (0 nearest, 1 linear, 3 cubic); bool arrays (masks) are
    interpolated linearly and kept where the result is >= ``mask_threshold`` (0.5: nearest
    boundary; close to 1: only voxels whose whole neighbourhood is inside). Outside the moving
    field of view: 0 / False.
    """
    arr = np.asarray(moving)
    is_mask = arr.dtype == bool
    m = np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(transform, np.float64)
    m = m @ np.asarray(reference_affine, np.float64)
    out = ndimage.affine_transform(
        arr.astype(np.float32),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(int(n) for n in reference_shape),
        order=1 if is_mask else order,
        mode="constant",
        cval=0.0,
    )
    return out >= mask_threshold if is_mask else out.astype(np.float32)


def resample_field(
    field_ppm: np.ndarray,
    mask: np.ndarray,
    moving_affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    transform: np.ndarray,
    *,
    order: int = 3,
    mask_threshold: float = 0.999,
) -> tuple[np.ndarray, np.ndarray]:
    """A field (ppm) known inside ``mask`` and the mask, resampled on the reference grid.

    The field is undefined (stored as 0) outside its mask; a spline through that edge would
    mix the zeros into the brain's outer voxels (and ring at order 3). So the field is first
    extended outside the mask by its nearest in-mask value, then resampled with a spline of
    ``order`` (cubic by default: a linear interpolation blurs the field's fine structure), and
    the mask, interpolated linearly, is kept only where >= ``mask_threshold``: where the
    interpolated value draws on in-mask voxels alone. Returns the field (0 outside) and the mask.
    """
    f = np.asarray(field_ppm, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if f.shape != m.shape:
        raise ValueError(f"field shape {f.shape} differs from its mask's {m.shape}")
    if not m.any():
        raise ValueError("the mask of the field is empty; nothing to resample")
    if not m.all():
        nearest = ndimage.distance_transform_edt(~m, return_distances=False, return_indices=True)
        f = f[tuple(nearest)]
        del nearest
    out = apply_transform(
        f, moving_affine, reference_shape, reference_affine, transform, order=order
    )
    out_mask = apply_transform(
        m,
        moving_affine,
        reference_shape,
        reference_affine,
        transform,
        mask_threshold=mask_threshold,
    )
    return np.where(out_mask, out, np.float32(0)), out_mask


def b0_direction_in_reference(
    transform: np.ndarray,
    reference_affine: np.ndarray,
    moving_affine: np.ndarray | None = None,
    moving_b0_voxel: Sequence[float] | None = None,
) -> np.ndarray:
    """Unit B0 direction of a moving orientation in the reference voxel (array) frame.

    The moving B0 is the scanner z axis of its world frame unless ``moving_b0_voxel`` (in the
    moving voxel frame, e.g. from a ``B0_dir`` sidecar) is given with ``moving_affine``.
    """
    if moving_b0_voxel is not None:
        if moving_affine is None:
            raise ValueError("moving_b0_voxel needs moving_affine to map it to world axes")
        a = np.asarray(moving_affine, np.float64)[:3, :3]
        b_world = (a / np.sqrt((a**2).sum(0))) @ np.asarray(moving_b0_voxel, np.float64)
    else:
        b_world = np.array([0.0, 0.0, 1.0])
    rot = np.asarray(transform, np.float64)[:3, :3]
    d_ref_world = np.linalg.solve(rot, b_world)
    a_ref = np.asarray(reference_affine, np.float64)[:3, :3]
    b = np.linalg.solve(a_ref / np.sqrt((a_ref**2).sum(0)), d_ref_world)
    return b / np.linalg.norm(b)


def _fsl_scaled(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Voxel -> FSL scaled-mm coordinates (x flipped when the affine has positive determinant)."""
    a = np.asarray(affine, np.float64)
    vox = np.sqrt((a[:3, :3] ** 2).sum(0))
    flip = np.eye(4)
    if np.linalg.det(a[:3, :3]) > 0:
        flip[0, 0] = -1
        flip[0, 3] = shape[0] - 1
    return np.diag([*vox, 1.0]) @ flip


def fsl_matrix_to_world(
    flirt_matrix: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
) -> np.ndarray:
    """Convert a FLIRT matrix (moving -> reference, FSL scaled mm) to ``T`` (ref -> moving world).

    FLIRT works in voxel coordinates scaled by the voxel size, with the first axis flipped for
    images stored in neurological order (positive determinant); see the FSL FLIRT FAQ.
    """
    s_ref = _fsl_scaled(reference_shape, reference_affine)
    s_mov = _fsl_scaled(moving_shape, moving_affine)
    mov_from_ref_vox = np.linalg.inv(s_mov) @ np.linalg.inv(flirt_matrix) @ s_ref
    return (
        np.asarray(moving_affine, np.float64)
        @ mov_from_ref_vox
        @ np.linalg.inv(np.asarray(reference_affine, np.float64))
    )
