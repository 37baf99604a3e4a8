"""Background field removal with spherical mean value (SMV) filters: SHARP, V-SHARP, RESHARP, iSMV.

A field produced by sources outside the mask is harmonic inside it, so it equals its own
spherical mean there: ``(delta - s_r) * b = 0`` at every voxel whose sphere of radius ``r`` lies
inside the mask, i.e. on the mask eroded by ``r``. The four methods differ in how they undo the
high-pass filter ``delta - s_r`` on that eroded mask:

* SHARP (Schweser et al., NeuroImage 2011): truncated-SVD division in k-space.
* V-SHARP (Wu et al., Magn Reson Med 2012): as SHARP, with large spheres in the interior and
  smaller ones towards the mask edge, so less of the brain is eroded.
* RESHARP (Sun & Wilman, Magn Reson Med 2014): Tikhonov-regularised least squares on the eroded
  mask, solved with conjugate gradients.
* iSMV (Wen et al., Magn Reson Med 2014): the background is the SMV-harmonic function of the
  eroded mask whose values on the removed shell are the total field; found by iterating the SMV.

All convolutions are real FFTs of the mask's bounding box on a grid padded by
:mod:`qsmflow.algorithms.fft`. A sphere centred in the eroded mask lies inside the mask, so the
filtered values there never see the wrapped-around copies; only the global TSVD division of
SHARP/V-SHARP gets a margin of the largest radius.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.fft

from ..fft import crop_centered, pad_centered, padded_shape
from ..regularization import lcurve_corner
from ._validate import check_inputs

__all__ = ["default_radii_mm", "smv_kernel", "sharp", "vsharp", "resharp", "ismv"]

#: V-SHARP sphere radii (mm): the largest, the smallest and the spacing (see default_radii_mm).
VSHARP_MAX_RADIUS_MM = 12.0
VSHARP_MIN_RADIUS_MM = 6.0
VSHARP_STEP_MM = 2.0


def default_radii_mm(
    voxel_size_mm: Sequence[float],
    *,
    max_radius_mm: float = VSHARP_MAX_RADIUS_MM,
    min_radius_mm: float = VSHARP_MIN_RADIUS_MM,
    step_mm: float = VSHARP_STEP_MM,
) -> np.ndarray:
    """V-SHARP sphere radii (mm), largest first: 12, 10, 8, 6 mm for voxels up to 2 mm.

    The radii are ``r_min, r_min + s, ...`` up to ``max_radius_mm``, returned largest first,
    with ``r_min = max(min_radius_mm, 2 d)`` and ``s = max(step_mm, d)``, ``d`` the largest
    voxel size: a sphere is never narrower than two voxels (a one-voxel "sphere" is a 7-point
    stencil) and consecutive spheres always differ by a voxel. For voxels of 2 mm or less the
    radii are fixed in mm, so the returned mask (the brain eroded by ``r_min``) and the accuracy
    do not depend on the resolution.

    Why 12 down to 6 mm: V-SHARP divides by the largest kernel ``1 - S_R(k)``, but a voxel near
    the edge was filtered with a smaller sphere ``r``; below the spatial frequency ``1 / R`` its
    local field is then scaled by about ``(r / R)^2``. Keeping ``r_min / R = 1/2`` bounds that
    loss, while ``R = 12 mm`` (the STI Suite default) keeps the TSVD truncation to the lowest
    frequencies. On the simulated head the demeaned NRMSE of the local field (in the returned
    mask) is 31 % at 2 mm and 28 % at 1 mm with these radii (29.5-32.7 % over four simulated
    heads at 2 mm), against 47-53 % when the smallest sphere is one or two voxels as in
    common implementations (SEPIA one voxel, QSM.jl two) and 38-40 % with ``r_min = 4 mm``;
    the 2 mm step costs nothing against a one-voxel step (28.2 vs 28.4 % at 1 mm) and halves
    the work at 1 mm. The price is the erosion: 6 mm of the brain's edge (29 % of its voxels)
    is not returned.
    """
    d = float(max(voxel_size_mm))
    r_min = max(float(min_radius_mm), 2.0 * d)
    step = max(float(step_mm), d)
    if r_min > max_radius_mm:
        return np.array([r_min])
    n = int(np.floor((max_radius_mm - r_min) / step + 1e-9))
    return (r_min + step * np.arange(n, -1, -1)).astype(np.float64)


def _default_radius_mm(voxel_size_mm: Sequence[float], radius_mm: float) -> float:
    """A single-sphere default: ``radius_mm``, a whole number of the largest voxel size."""
    d = float(max(voxel_size_mm))
    return d * max(1, int(round(radius_mm / d)))


def _default_erosion_mm(voxel_size_mm: Sequence[float]) -> float:
    """The smallest V-SHARP sphere, also the RESHARP and iSMV default: 6 mm, >= two voxels."""
    return float(default_radii_mm(voxel_size_mm)[-1])


def _sphere_offsets(radius_mm: float, voxel_size_mm: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Integer voxel offsets (three 1-D arrays) whose centres lie within ``radius_mm``."""
    half = [int(np.floor(radius_mm / d + 1e-9)) for d in voxel_size_mm]
    axes = [np.arange(-h, h + 1) for h in half]
    grid = np.meshgrid(*axes, indexing="ij")
    r2 = sum((g * d) ** 2 for g, d in zip(grid, voxel_size_mm, strict=True))
    inside = r2 <= radius_mm * radius_mm * (1 + 1e-9)
    return tuple(g[inside] for g in grid)


def smv_kernel(
    shape: Sequence[int], voxel_size_mm: Sequence[float], radius_mm: float
) -> tuple[np.ndarray, int]:
    """Spherical mean value kernel on the real-FFT grid of ``shape``.

    The sphere is built in image space from the true voxel sizes (voxel centres within
    ``radius_mm`` of the origin, weights ``1 / count``) with its centre at index 0. Its DFT is
    evaluated exactly as a sum of products of cosines: the sphere is even along each axis, so
    ``S(k) = sum_o w_o prod_i cos(2 pi k_i o_i / n_i) / count`` over the offsets ``o >= 0`` of
    one octant with their multiplicities ``w_o`` (2 per non-zero component): three small
    tensor contractions instead of an FFT of the whole grid.

    Returns
    -------
    spectrum : numpy.ndarray
        float32 half spectrum ``S(k)`` (shape of ``scipy.fft.rfftn``; real, since the sphere is
        symmetric); ``S(0) = 1``.
    count : int
        Number of voxels in the sphere.
    """
    shape = tuple(int(n) for n in shape)
    offsets = _sphere_offsets(radius_mm, voxel_size_mm)
    count = offsets[0].size
    half = [int(np.abs(o).max()) for o in offsets]
    for h, n in zip(half, shape, strict=True):
        if 2 * h + 1 > n:
            raise ValueError(f"a {radius_mm} mm sphere does not fit in a grid of shape {shape}")
    # Folding the sphere into its first octant counts each offset's sign images, 2 per
    # non-zero component: exactly the weight of the product of cosines.
    weights = np.zeros([h + 1 for h in half], dtype=np.float64)
    np.add.at(weights, tuple(np.abs(o) for o in offsets), 1.0 / count)
    cosines = []
    for axis, (n, h) in enumerate(zip(shape, half, strict=True)):
        k = np.arange(n // 2 + 1 if axis == 2 else n)
        cosines.append(np.cos(2.0 * np.pi * np.outer(k, np.arange(h + 1)) / n))
    spec = np.tensordot(weights, cosines[2], axes=([2], [1]))  # (a, b, kz)
    spec = np.einsum("jb,abk->ajk", cosines[1], spec)  # (a, ky, kz)
    spec = cosines[0].astype(np.float32) @ spec.astype(np.float32).reshape(half[0] + 1, -1)
    return spec.reshape(shape[0], shape[1], shape[2] // 2 + 1), count


class _BoxGrid:
    """The bounding box of a mask (one voxel larger) on a fast real-FFT grid.

    ``margin`` voxels of zeros are added on each side by :func:`..fft.padded_shape`; the methods
    whose results are read only on the eroded mask need none.
    """

    def __init__(self, mask: np.ndarray, margin: int, n_threads: int) -> None:
        box = []
        for axis, n in enumerate(mask.shape):
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
            box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, n)))
        self.box = tuple(box)
        self.box_shape = tuple(s.stop - s.start for s in self.box)
        self.full_shape = mask.shape
        self.shape = padded_shape(self.box_shape, pad_factor=1.0, min_margin=margin)
        self.workers = n_threads

    def pad(self, vol: np.ndarray) -> np.ndarray:
        """The box of a full-size volume, zero-padded to the grid (float32)."""
        return pad_centered(np.ascontiguousarray(vol[self.box], dtype=np.float32), self.shape)

    def unpad(self, arr: np.ndarray) -> np.ndarray:
        """A grid array placed back in a full-size volume (zero outside the box)."""
        out = np.zeros(self.full_shape, dtype=arr.dtype)
        out[self.box] = crop_centered(arr, self.box_shape)
        return out

    def fft(self, arr: np.ndarray) -> np.ndarray:
        return scipy.fft.rfftn(arr, workers=self.workers)

    def ifft(self, spec: np.ndarray) -> np.ndarray:
        return scipy.fft.irfftn(spec, s=self.shape, workers=self.workers)

    def sphere(
        self, voxel_size_mm: Sequence[float], radius_mm: float, *, inside: bool = False
    ) -> tuple[np.ndarray, int]:
        """The SMV kernel on the grid; with ``inside``, a sphere wider than the mask (which
        leaves no eroded voxel) is an error."""
        half = [int(np.floor(radius_mm / d + 1e-9)) for d in voxel_size_mm]
        if inside and any(2 * h + 3 > n for h, n in zip(half, self.box_shape, strict=True)):
            # the box is the mask's extent plus one voxel on each side
            raise _empty_erosion(radius_mm)
        spec, count = smv_kernel(self.shape, voxel_size_mm, radius_mm)
        if count < 2:
            raise ValueError(
                f"a {radius_mm} mm sphere holds a single voxel; use radii >= one voxel"
            )
        return spec, count

    def erode(self, mask_spec: np.ndarray, mask: np.ndarray, sphere: np.ndarray, count: int):
        """Voxels of ``mask`` whose whole sphere lies in ``mask`` (from the mask's spectrum)."""
        # The sphere's mean of the mask is 1 exactly where the sphere is inside; half a voxel's
        # weight of slack absorbs the FFT rounding.
        return (self.ifft(mask_spec * sphere) > 1.0 - 0.5 / count) & mask


def erode_edge(
    mask: np.ndarray, voxel_size_mm: Sequence[float], depth_mm: float, *, n_threads: int = 1
) -> np.ndarray:
    """The voxels of ``mask`` farther than ``depth_mm`` from every voxel outside it.

    Binary erosion by the sphere of voxel offsets within ``depth_mm`` (true voxel sizes), the
    same erosion as the SMV methods' (and as :func:`qsmflow.algorithms.masking.erode_mm`),
    computed as one FFT convolution of the mask's bounding box with the sphere: about ten times
    faster than a Euclidean distance transform at 1 mm. ``depth_mm`` smaller than every voxel
    size returns a copy of the mask. The mask must not touch the border of the volume.
    """
    roi = np.asarray(mask, bool)
    if not depth_mm >= 0:
        raise ValueError(f"the erosion depth must be >= 0 mm, got {depth_mm}")
    if depth_mm < min(voxel_size_mm) or not roi.any():
        return roi.copy()
    grid = _BoxGrid(roi, 0, n_threads)
    half = [int(np.floor(depth_mm / d + 1e-9)) for d in voxel_size_mm]
    if any(2 * h + 3 > n for h, n in zip(half, grid.box_shape, strict=True)):
        return np.zeros_like(roi)  # thinner than the sphere: nothing is left
    m = grid.pad(roi) > 0.5
    sphere, count = smv_kernel(grid.shape, voxel_size_mm, depth_mm)
    return grid.unpad(grid.erode(grid.fft(m.astype(np.float32)), m, sphere, count))


def _prepare(
    total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    field, roi = check_inputs(total_field_ppm, mask, voxel_size_mm)
    vox = tuple(float(v) for v in voxel_size_mm)
    return np.where(roi, field, np.float32(0)), roi, vox


def _empty_erosion(radius_mm: float) -> ValueError:
    return ValueError(
        f"no voxel of the mask is {radius_mm} mm from its edge: the mask is too thin for this "
        "sphere; use a smaller radius"
    )


def vsharp(
    total_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radii_mm: Sequence[float] | None = None,
    threshold: float = 0.05,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """V-SHARP background field removal (Wu et al. 2012), variable-radius SHARP.

    For each radius ``r`` (largest first) the masked total field is filtered with
    ``delta - s_r``; each voxel keeps the result of the largest sphere that fits inside the
    mask around it. The combined field is deconvolved with the largest kernel, dividing by
    ``1 - S_rmax(k)`` where ``|1 - S_rmax(k)| >= threshold`` and setting the rest to zero
    (truncated SVD, Schweser et al. 2011), and masked with the mask eroded by the smallest
    sphere. Convolutions are FFTs of the mask's bounding box padded (by
    :mod:`qsmflow.algorithms.fft`) by the largest radius.

    Parameters
    ----------
    total_field_ppm : (x, y, z) array
        Unwrapped total field (ppm; any unit works, the filter is linear).
    mask : (x, y, z) bool array
        Region of interest (brain mask).
    voxel_size_mm : (3,) floats
        Voxel size in mm; spheres are built from the true (possibly anisotropic) sizes.
    radii_mm : sequence of float, optional
        Sphere radii in mm; default :func:`default_radii_mm` (12, 10, 8, 6 mm for voxels up to
        2 mm; see there why). Sorted largest first here. A radius smaller than every voxel
        size (sphere of one voxel) is rejected.
    threshold : float
        TSVD truncation level for ``|1 - S(k)|`` of the largest kernel.
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    local_field_ppm : numpy.ndarray
        float32 local field (same unit as the input), zero outside ``eroded_mask``.
    eroded_mask : numpy.ndarray
        bool mask eroded by the smallest sphere (6 mm by default): where the local field is
        valid.

    Raises
    ------
    ValueError
        For the input errors of :func:`._validate.check_inputs`, bad radii or threshold, and a
        mask with no voxel farther than the smallest radius from its edge.

    References
    ----------
    Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed sensing.
    Magn Reson Med 2012;67:137-147.
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of intrinsic magnetic
    tissue properties using MRI signal phase. NeuroImage 2011;54:2789-2807.
    """
    field, roi, vox = _prepare(total_field_ppm, mask, voxel_size_mm)
    radii = default_radii_mm(vox) if radii_mm is None else np.asarray(radii_mm, float)
    radii = np.sort(np.unique(radii.reshape(-1)))[::-1]
    if radii.size == 0 or radii[-1] <= 0:
        raise ValueError(f"radii_mm must be positive, got {radii_mm!r}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")

    grid = _BoxGrid(roi, int(np.ceil(radii[0] / min(vox))) + 1, n_threads)
    m = grid.pad(roi) > 0.5
    field_spec = grid.fft(grid.pad(field))
    mask_spec = grid.fft(m.astype(np.float32))

    combined = np.zeros(grid.shape, dtype=np.float32)
    filled = np.zeros(grid.shape, dtype=bool)
    largest = None
    for r in radii:
        sphere, count = grid.sphere(vox, r)
        eroded = grid.erode(mask_spec, m, sphere, count)
        high_pass = 1.0 - sphere
        del sphere
        new = eroded & ~filled
        if new.any():
            combined[new] = grid.ifft(field_spec * high_pass)[new]
            filled |= new
        if largest is None:
            largest = high_pass
    if not eroded.any():
        raise _empty_erosion(radii[-1])

    # Deconvolve the largest kernel with truncated SVD.
    keep = np.abs(largest) >= threshold
    inv = np.zeros_like(largest)
    np.divide(1.0, largest, out=inv, where=keep)
    local = grid.ifft(grid.fft(combined) * inv)
    local = np.where(eroded, local, np.float32(0)).astype(np.float32, copy=False)
    return grid.unpad(local), grid.unpad(eroded)


def sharp(
    total_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radius_mm: float | None = None,
    threshold: float = 0.05,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """SHARP background field removal (Schweser et al. 2011): V-SHARP with one radius.

    Parameters
    ----------
    total_field_ppm, mask, voxel_size_mm, threshold, n_threads
        As for :func:`vsharp`.
    radius_mm : float, optional
        Sphere radius in mm; default about 6 mm, a whole number of the largest voxel size.

    Returns
    -------
    local_field_ppm, eroded_mask
        As for :func:`vsharp`; the mask is eroded by ``radius_mm``.

    References
    ----------
    Schweser F, Deistung A, Lehr BW, Reichenbach JR. NeuroImage 2011;54:2789-2807.
    """
    if radius_mm is None:
        radius_mm = _default_radius_mm(voxel_size_mm, 6.0)
    return vsharp(
        total_field_ppm,
        mask,
        voxel_size_mm,
        radii_mm=[radius_mm],
        threshold=threshold,
        n_threads=n_threads,
    )


# --------------------------------------------------------------------------------------------
# RESHARP
# --------------------------------------------------------------------------------------------

#: RESHARP default Tikhonov weight (see resharp).
RESHARP_LAMBDA = 1e-3


def _cg(
    apply_a: Callable[[np.ndarray], np.ndarray],
    rhs: np.ndarray,
    x: np.ndarray,
    dot: Callable[[np.ndarray, np.ndarray], float],
    tol: float,
    max_iter: int,
    precondition: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, int, float]:
    """(Preconditioned) conjugate gradients for a self-adjoint positive definite ``apply_a``
    (inner product ``dot``); stops when ``||rhs - A x|| <= tol ||rhs||``. Returns x, the
    number of iterations and the relative residual."""
    rhs_norm = np.sqrt(dot(rhs, rhs))
    if rhs_norm == 0:
        return np.zeros_like(x), 0, 0.0
    r = rhs - apply_a(x)
    z = r if precondition is None else precondition(r)
    p = z.copy()
    rz = dot(r, z)
    rr = dot(r, r) if precondition is not None else rz
    it = 0
    while it < max_iter and np.sqrt(rr) > tol * rhs_norm:
        ap = apply_a(p)
        alpha = rz / dot(p, ap)
        x += alpha * p
        r -= alpha * ap
        z = r if precondition is None else precondition(r)
        rz_new = dot(r, z)
        rr = dot(r, r) if precondition is not None else rz_new
        p *= rz_new / rz
        p += z
        rz = rz_new
        it += 1
    return x, it, float(np.sqrt(rr) / rhs_norm)


class _ResharpProblem:
    """Normal equations of RESHARP, ``(C^T M C + lambda) x = C^T M C f``, in k-space.

    ``C`` (multiplication by ``1 - S(k)``) is diagonal in k-space, so keeping the unknown as
    its half spectrum costs one inverse and one forward real FFT per product (``M`` is applied
    in image space). The inner product weights the half spectrum so that it equals the image
    inner product up to the constant ``N``; the operator is then self-adjoint.
    """

    def __init__(self, grid: _BoxGrid, field: np.ndarray, eroded: np.ndarray, high_pass):
        self.grid = grid
        self.eroded = eroded
        self.c = high_pass
        self.field_spec = grid.fft(field)
        self.rhs = self.normal(self.field_spec)

    def dot(self, a: np.ndarray, b: np.ndarray) -> float:
        # Every half-spectrum bin stands for itself and its conjugate, except the planes
        # kz = 0 and kz = Nyquist, which are their own conjugates.
        total = 2.0 * np.vdot(a, b).real - np.vdot(a[..., 0], b[..., 0]).real
        if self.grid.shape[2] % 2 == 0:
            total -= np.vdot(a[..., -1], b[..., -1]).real
        return float(total)

    def filtered(self, spec: np.ndarray) -> np.ndarray:
        """``M C x`` in image space."""
        out = self.grid.ifft(spec * self.c)
        out *= self.eroded
        return out

    def normal(self, spec: np.ndarray) -> np.ndarray:
        """``C^T M C x`` in k-space."""
        out = self.grid.fft(self.filtered(spec))
        out *= self.c
        return out

    def solve(self, lam: float, x0: np.ndarray, tol: float, max_iter: int):
        def apply_a(spec: np.ndarray) -> np.ndarray:
            out = self.normal(spec)
            out += lam * spec
            return out

        # Jacobi in k-space: the diagonal of the operator in the interior of M.
        diag = (self.c * self.c + lam).astype(np.float32)

        def precondition(spec: np.ndarray) -> np.ndarray:
            return spec / diag

        return _cg(apply_a, self.rhs, x0, self.dot, tol, max_iter, precondition)

    def norms(self, spec: np.ndarray) -> tuple[float, float]:
        """Data misfit ``||M C (x - f)||`` and solution norm ``||x||`` (image space)."""
        misfit = self.filtered(spec - self.field_spec)
        x = self.grid.ifft(spec)
        return float(np.linalg.norm(misfit)), float(np.linalg.norm(x))


def resharp(
    total_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radius_mm: float | None = None,
    lambda_: float | str = RESHARP_LAMBDA,
    tol: float = 1e-4,
    max_iter: int = 200,
    lambdas: Sequence[float] | None = None,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """RESHARP background field removal (Sun & Wilman 2014): SHARP with Tikhonov regularisation.

    With ``C = delta - s_r`` (convolution with the SMV high-pass) and ``M`` the mask eroded by
    the sphere, the local field minimises::

        ||M (C f_local - C f_total)||^2 + lambda ||f_local||^2

    Only the voxels of ``M`` enter the data term, where ``C`` annihilates the harmonic
    background exactly. The normal equations ``(C^T M C + lambda I) f_local = C^T M C f_total``
    are solved with conjugate gradients from zero, as in the paper; the unknown is kept as its
    half spectrum, so that ``C`` is a product in k-space and each iteration costs one pair of
    real FFTs (``M`` is applied in image space), and CG is preconditioned by the operator's
    k-space diagonal in the interior of ``M``, ``1 / ((1 - S(k))^2 + lambda)``, which changes
    the path, not the solution. The result is returned on ``M``. Unlike the TSVD of SHARP,
    the Tikhonov term damps, rather than discards, the components the data term does not
    see.

    Parameters
    ----------
    total_field_ppm : (x, y, z) array
        Unwrapped total field (ppm; any unit works, the problem is linear).
    mask : (x, y, z) bool array
        Region of interest (brain mask).
    voxel_size_mm : (3,) floats
        Voxel size in mm; the sphere is built from the true (possibly anisotropic) sizes.
    radius_mm : float, optional
        Sphere radius in mm; default 6 mm (at least two voxels), the smallest sphere of
        :func:`vsharp`, so both return the same mask: the mask eroded by the sphere.
    lambda_ : float or "lcurve"
        Tikhonov weight, dimensionless (``1 - S(k)`` runs from 0 to about 1.1 whatever the
        voxel size). Default 1e-3: the L-curve corner of the simulated head at both 2 and 1 mm
        (1.2e-3 on the default candidates), with a demeaned local-field NRMSE of 33 % (2 mm)
        and 31 % (1 mm) in the returned mask; 1e-2 gives 40.5 %, and 1e-4 29 % once converged
        but converges far more slowly (at the default ``tol`` it is still 11 % away from its
        solution). ``"lcurve"`` picks it automatically: the
        problem is solved for each of ``lambdas`` (largest first, each solution starting the
        next) and the corner of the L-curve, the point of maximum curvature of
        ``(log ||M C (f_local - f_total)||, log ||f_local||)`` against ``log lambda``
        (Hansen, SIAM Rev 1992), is kept; this costs one solve per candidate (5-6x the time of
        a fixed lambda).
    tol : float
        Relative residual of the normal equations, ``||rhs - A x|| / ||rhs||``, at which CG
        stops; the default 1e-4 is within 1 % of the converged local field (1e-3 would be 13 %
        away).
    max_iter : int
        Maximum CG iterations (per value of lambda).
    lambdas : sequence of float, optional
        Candidates for ``lambda_="lcurve"``; default 12 values from 1e-4 to 1 (log-spaced).
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    local_field_ppm : numpy.ndarray
        float32 local field (same unit as the input), zero outside ``eroded_mask``.
    eroded_mask : numpy.ndarray
        bool mask eroded by the sphere of ``radius_mm``: where the data term holds and the
        local field is returned.

    Raises
    ------
    ValueError
        For the input errors of :func:`._validate.check_inputs`, a non-positive lambda,
        tolerance or iteration count, and a mask too thin for the sphere.

    References
    ----------
    Sun H, Wilman AH. Background field removal using spherical mean value filtering and
    Tikhonov regularization. Magn Reson Med 2014;71:1151-1157.
    Hansen PC. Analysis of discrete ill-posed problems by means of the L-curve. SIAM Rev
    1992;34:561-580.
    """
    field, roi, vox = _prepare(total_field_ppm, mask, voxel_size_mm)
    if radius_mm is None:
        radius_mm = _default_erosion_mm(vox)
    auto = isinstance(lambda_, str)
    if auto and lambda_ != "lcurve":
        raise ValueError(f"lambda_ must be a positive number or 'lcurve', got {lambda_!r}")
    if not auto and not float(lambda_) > 0:
        raise ValueError(f"lambda_ must be positive, got {lambda_}")
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got {tol}, {max_iter}")

    grid = _BoxGrid(roi, 0, n_threads)
    m = grid.pad(roi) > 0.5
    sphere, count = grid.sphere(vox, radius_mm, inside=True)
    eroded = grid.erode(grid.fft(m.astype(np.float32)), m, sphere, count)
    if not eroded.any():
        raise _empty_erosion(radius_mm)
    problem = _ResharpProblem(grid, grid.pad(field), eroded.astype(np.float32), 1.0 - sphere)
    del sphere

    x = np.zeros_like(problem.rhs)
    if auto:
        lam_grid = np.logspace(-4, 0, 12) if lambdas is None else np.asarray(lambdas, float)
        lam_grid = np.sort(lam_grid.reshape(-1))[::-1]
        if lam_grid.size < 3 or not np.all(lam_grid > 0):
            raise ValueError("lambdas must hold at least 3 positive values")
        solutions, misfits, norms = [], [], []
        for lam in lam_grid:
            x, _, _ = problem.solve(float(lam), x.copy(), tol, max_iter)
            solutions.append(x)
            misfit, norm = problem.norms(x)
            misfits.append(misfit)
            norms.append(norm)
        x = solutions[lcurve_corner(lam_grid, misfits, norms)]
    else:
        x, _, _ = problem.solve(float(lambda_), x, tol, max_iter)
    local = grid.ifft(x)
    local = np.where(eroded, local, np.float32(0)).astype(np.float32, copy=False)
    return grid.unpad(local), grid.unpad(eroded)


# --------------------------------------------------------------------------------------------
# iSMV
# --------------------------------------------------------------------------------------------


def ismv(
    total_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radius_mm: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 500,
    solver: str = "cg",
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Iterative spherical mean value background removal (iSMV, Wen et al. 2014).

    Let ``E`` be the mask eroded by the sphere and ``shell = mask - E``. The background ``b``
    has the mean value property on ``E`` (``b = s_r * b`` there), and on the shell it is
    taken equal to the total field, the local field being assumed to vanish at the edge of the
    brain. Wen et al. compute it with the iteration::

        b_0 = f,    b_{k+1} = E (s_r * b_k) + shell * f,

    which converges because the SMV of a function that vanishes outside ``E`` is a strict
    contraction on ``E``. The local field is ``f_local = E (f - b)``. Equivalently ``f_local``
    solves the SHARP equation ``E (delta - s_r) * f_local = E (delta - s_r) * f`` on ``E`` with
    ``f_local = 0`` on the shell, so the iteration *is* the deconvolution step of SHARP, done
    without its TSVD threshold.

    The fixed point solves the symmetric positive definite system
    ``(I - E S E) b = E S (shell f)``; by default it is found with conjugate gradients, which
    reaches the same solution in far fewer SMV products than the plain iteration (whose
    contraction factor approaches 1 as ``(r / brain size)^2``). ``solver="fixed_point"`` runs
    the published iteration itself.

    Parameters
    ----------
    total_field_ppm : (x, y, z) array
        Unwrapped total field (ppm; any unit works, the problem is linear).
    mask : (x, y, z) bool array
        Region of interest (brain mask).
    voxel_size_mm : (3,) floats
        Voxel size in mm; the sphere is built from the true (possibly anisotropic) sizes.
    radius_mm : float, optional
        Sphere radius in mm; default 6 mm (at least two voxels), the smallest sphere of
        :func:`vsharp`, so both return the same mask. The shell of that
        width is where the local field is assumed zero, and that assumption, not the radius
        as such, limits the accuracy: the local field is strongest at the edge of the brain,
        and its boundary values spread into the interior as a harmonic error. On the simulated
        head the demeaned NRMSE in the returned mask is 32 % (2 mm) and 29 % (1 mm) with
        6 mm, 42 % and 40 % with 4 mm.
    tol : float
        Relative residual ``||E S (shell f) - (I - E S E) b|| / ||E S (shell f)||`` at which
        the solver stops. For the fixed-point iteration the residual at ``b_k`` is exactly the
        change of the next step, ``b_{k+1} - b_k``, the published stopping quantity, so the
        tolerance means the same for both solvers. The default 1e-4 is within 0.3 % of the
        converged local field (27 CG iterations at 2 and 1 mm; 1e-3 is 2.7 % away; the plain
        iteration needs some 500 to converge at 2 mm).
    max_iter : int
        Maximum iterations (SMV products); raise it for ``solver="fixed_point"``.
    solver : {"cg", "fixed_point"}
        Conjugate gradients (default) or the published fixed-point iteration.
    n_threads : int
        Workers for ``scipy.fft``.

    Returns
    -------
    local_field_ppm : numpy.ndarray
        float32 local field (same unit as the input), zero outside ``eroded_mask``.
    eroded_mask : numpy.ndarray
        bool mask eroded by the sphere of ``radius_mm`` (``E``): where the local field is
        valid; the shell outside it is where the boundary values were imposed.

    Raises
    ------
    ValueError
        For the input errors of :func:`._validate.check_inputs`, an unknown solver, a
        non-positive tolerance or iteration count, and a mask too thin for the sphere.

    References
    ----------
    Wen Y, Zhou D, Liu T, Spincemaille P, Wang Y. An iterative spherical mean value method for
    background field removal in MRI. Magn Reson Med 2014;72:1065-1071.
    """
    field, roi, vox = _prepare(total_field_ppm, mask, voxel_size_mm)
    if radius_mm is None:
        radius_mm = _default_erosion_mm(vox)
    if solver not in ("cg", "fixed_point"):
        raise ValueError(f"solver must be 'cg' or 'fixed_point', got {solver!r}")
    if not tol > 0 or max_iter < 1:
        raise ValueError(f"tol must be > 0 and max_iter >= 1, got {tol}, {max_iter}")

    grid = _BoxGrid(roi, 0, n_threads)
    m = grid.pad(roi) > 0.5
    sphere, count = grid.sphere(vox, radius_mm, inside=True)
    eroded = grid.erode(grid.fft(m.astype(np.float32)), m, sphere, count)
    if not eroded.any():
        raise _empty_erosion(radius_mm)
    f = grid.pad(field)
    e = eroded.astype(np.float32)
    shell_f = np.where(eroded, np.float32(0), f)  # f is already zero outside the mask

    def smv_on_e(x: np.ndarray) -> np.ndarray:
        out = grid.ifft(grid.fft(x) * sphere)
        out *= e
        return out

    b = f * e  # the published start, b_0 = f
    rhs = smv_on_e(shell_f)
    if solver == "cg":

        def apply_a(x: np.ndarray) -> np.ndarray:
            return x - smv_on_e(x)

        def dot(a: np.ndarray, c: np.ndarray) -> float:
            return float(np.dot(a.ravel(), c.ravel()))

        b, _, _ = _cg(apply_a, rhs, b, dot, tol, max_iter)
    else:
        # The change of one iteration, E S (b + shell f) - b, is the residual of the system.
        stop = tol * float(np.linalg.norm(rhs))
        for _ in range(max_iter):
            b_next = smv_on_e(b)
            b_next += rhs
            change = float(np.linalg.norm(b_next - b))
            b = b_next
            if change <= stop:
                break
    local = np.where(eroded, f - b, np.float32(0)).astype(np.float32, copy=False)
    return grid.unpad(local), grid.unpad(eroded)
