"""Brain extraction with a deformable surface model: the BET algorithm.

Implements the Brain Extraction Tool of Smith (Human Brain Mapping 2002;17:143-155) on numpy
arrays, without FSL:

1. Robust intensity range ``t2`` / ``t98`` (2nd and 98th percentiles), the "brain/background"
   threshold ``t = t2 + 0.1 (t98 - t2)``, the centre of gravity of the voxels above ``t``
   (intensities clamped at ``t98``), the radius of a sphere with the volume of those voxels, and
   the median intensity ``tm`` of the voxels inside that sphere; only voxels between ``t`` and
   ``t98`` count for ``tm``, so the dark skull and the air inside the sphere (a large share of it
   on GRE magnitude, where the skull gives no signal) do not pull ``tm`` below the tissue level.
2. A tessellated sphere (an icosahedron subdivided four times: 2562 vertices, 5120 triangles) of
   half the estimated radius, centred on the centre of gravity.
3. ``n_iterations`` updates of every vertex by ``u = u1 + u2 + u3``, with ``s`` the vector from
   the vertex to the mean of its neighbours, ``n`` the outward unit normal, ``s_n = (s . n) n``,
   ``s_t = s - s_n`` and ``l`` the mean edge length of the mesh:

   * ``u1 = 0.5 s_t`` keeps the vertices evenly spaced;
   * ``u2 = f2 s_n`` smooths, with the sigmoid of the local curvature ``1/r = 2 |s_n| / l^2``:
     ``f2 = (1 + tanh(F (1/r - E))) / 2``, ``E = (1/r_min + 1/r_max) / 2``,
     ``F = 6 / (1/r_min - 1/r_max)``, ``r_min = 3.33 mm``, ``r_max = 10 mm``;
   * ``u3 = 0.05 f3 l n`` follows the image: along the inward normal the intensities
     ``I(0 .. d1)`` (``d1 = 20 mm``) and ``I(0 .. d2)`` (``d2 = d1 / 2``) give
     ``Imin = max(t2, min(tm, I(0..d1)))`` and ``Imax = min(tm, max(t, I(0..d2)))``, the local
     threshold ``tl = (Imax - t2) bt + t2`` and ``f3 = 2 (Imin - tl) / (Imax - t2)``: the
     surface grows where the darkest nearby intensity under it is above ``tl`` (brain), and
     shrinks where it is below (CSF, skull, background). Profiles are sampled every 1 mm (every
     voxel for voxels coarser than 1 mm) by trilinear interpolation, zero outside the image.

   ``bt`` is the fractional intensity threshold ``frac``; with a vertical gradient ``g`` it
   varies along the third array axis as ``bt' = bt (1 + g (z - z_cog) / r)`` (clipped to
   ``[0, 1]``), ``r`` being the estimated radius, so positive ``g`` gives a larger outline at the
   bottom and a smaller one at the top, as FSL's ``bet -g`` does.
4. Self-intersection check: as in the paper, a surface that has folded onto itself is evolved
   again from the sphere with a stronger smoothness term, here ``u2`` multiplied by 10 (then
   100) during the first three quarters of the iterations; up to two repeats. The test itself
   is a proximity test of this module (two vertices that were more than four edges apart on the
   initial sphere come closer than one mean edge length), not FSL's test and not an exact
   triangle-triangle intersection test.
5. The closed surface is filled into a mask: a voxel is inside when a ray from its centre along
   the third array axis crosses the surface an odd number of times (vectorised over triangles
   and voxel columns).

Everything is in millimetres: vertex ``i`` of an image with voxel sizes ``v`` sits at
``index * v`` (the array frame scaled by the voxel size, origin at the centre of voxel
``(0, 0, 0)``); map to scanner space with ``affine @ [p / v, 1]``. Anisotropic voxels are
handled by sampling the image at ``p / v``.

``robust`` (FSL ``-R``) re-runs BET from the centre of gravity of the previous mask until the
centre moves less than 1 mm (at most 5 runs). The updates run in one numba kernel (compiled at
the first call, cached on disk).

On GRE magnitude (first echo) the CSF between brain and skull is darker than tissue (T1
saturation at short TR) but much brighter than the skull, which gives no signal. With FSL's
default ``frac = 0.5`` the surface then settles at the inner skull (the intracranial volume,
outer CSF included) as FSL's ``bet`` would; higher ``frac`` (about 0.7) pulls it to the brain
surface on 2 mm data but lets sulcal CSF, which the ``Imin`` search sees as well, pull it into
the cortex at 1 mm. :func:`qsmflow.algorithms.masking.remove_outer_csf` takes the outer CSF out
of a BET mask instead.

Left out compared with FSL's ``bet2``: the skull and scalp surfaces (``betsurf``), the
thresholded output ``-t`` and the other output images (this module returns a mask and,
optionally, the mesh).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import numpy as np
from scipy.spatial import ConvexHull, cKDTree

from ._numba import jit

__all__ = ["bet", "icosphere", "mesh_to_mask", "robust_parameters", "self_intersects"]

# Smith 2002, section "Brain surface model": curvature limits (mm) of the smoothness sigmoid.
_R_MIN_MM = 3.33
_R_MAX_MM = 10.0
_E = 0.5 * (1.0 / _R_MIN_MM + 1.0 / _R_MAX_MM)
_F = 6.0 / (1.0 / _R_MIN_MM - 1.0 / _R_MAX_MM)
_D1_MM = 20.0  # inward search distance for Imin
_D2_MM = _D1_MM / 2.0  # inward search distance for Imax
_STEP_SMOOTH = 0.5  # weight of the tangential term u1
_STEP_INTENSITY = 0.05  # weight of the intensity term u3 (in units of the mean edge length)
_SUBDIVISIONS = 4  # 10 * 4**4 + 2 = 2562 vertices
_MAX_REPEATS = 2  # extra runs with stronger smoothing after a self-intersection
_ROBUST_MAX_RUNS = 5  # FSL -R: re-centre on the previous mask's centre of gravity
_log = logging.getLogger("qsmflow.bet")


def icosphere(subdivisions: int = _SUBDIVISIONS) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere tessellated from an icosahedron.

    Each subdivision splits every triangle into four at its edge midpoints, which are pushed onto
    the sphere; ``k`` subdivisions give ``10 * 4**k + 2`` vertices and ``20 * 4**k`` triangles.

    Returns
    -------
    vertices : (n, 3) float64
        Points on the unit sphere.
    faces : (m, 3) int
        Vertex indices of each triangle, counter-clockwise seen from outside (so
        ``cross(v1 - v0, v2 - v0)`` points outwards).
    """
    phi = (1.0 + np.sqrt(5.0)) / 2.0
    base = []
    for a in (-1.0, 1.0):
        for b in (-phi, phi):
            base += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    verts = np.asarray(base, dtype=np.float64)
    verts /= np.linalg.norm(verts, axis=1, keepdims=True)
    faces = ConvexHull(verts).simplices.astype(np.intp)
    faces = _orient_outwards(verts, faces)
    for _ in range(int(subdivisions)):
        verts, faces = _subdivide(verts, faces)
    return verts, faces


def _orient_outwards(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Flip triangles of a star-shaped (about the origin) mesh whose normals point inwards."""
    v0, v1, v2 = (verts[faces[:, i]] for i in range(3))
    inward = np.einsum("ij,ij->i", np.cross(v1 - v0, v2 - v0), v0 + v1 + v2) < 0
    faces = faces.copy()
    faces[inward] = faces[inward][:, ::-1]
    return faces


def _subdivide(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split each triangle into four, sharing the midpoint of each edge between its triangles."""
    n = verts.shape[0]
    # edges opposite to vertex 2, 0, 1 of each face: (0,1), (1,2), (2,0)
    e = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1).reshape(-1, 2)
    unique_edges, inverse = np.unique(np.sort(e, axis=1), axis=0, return_inverse=True)
    mid = verts[unique_edges[:, 0]] + verts[unique_edges[:, 1]]
    mid /= np.linalg.norm(mid, axis=1, keepdims=True)
    m = (inverse.reshape(-1) + n).reshape(-1, 3)  # midpoint index of edges 01, 12, 20
    a, b, c = faces[:, 0], faces[:, 1], faces[:, 2]
    ab, bc, ca = m[:, 0], m[:, 1], m[:, 2]
    new_faces = np.concatenate(
        [
            np.stack([a, ab, ca], axis=1),
            np.stack([ab, b, bc], axis=1),
            np.stack([ca, bc, c], axis=1),
            np.stack([ab, bc, ca], axis=1),
        ]
    )
    return np.concatenate([verts, mid]), new_faces


def _mesh_edges(faces: np.ndarray) -> np.ndarray:
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return np.unique(np.sort(e, axis=1), axis=0)


class _MeshArrays:
    """Connectivity of the tessellated sphere in the flat arrays the numba kernel walks."""

    def __init__(self, n_vertices: int, faces: np.ndarray) -> None:
        self.faces = np.ascontiguousarray(faces, dtype=np.int64)
        self.edges = np.ascontiguousarray(_mesh_edges(self.faces), dtype=np.int64)
        both = np.concatenate([self.edges, self.edges[:, ::-1]])
        both = both[np.lexsort((both[:, 1], both[:, 0]))]
        self.n_neighbours = np.bincount(both[:, 0], minlength=n_vertices).astype(np.int64)
        width = int(self.n_neighbours.max())
        slot = np.arange(both.shape[0]) - np.repeat(
            np.cumsum(self.n_neighbours) - self.n_neighbours, self.n_neighbours
        )
        self.neighbours = np.zeros((n_vertices, width), dtype=np.int64)
        self.neighbours[both[:, 0], slot] = both[:, 1]
        # vertex -> adjacent faces (CSR)
        flat = self.faces.ravel()
        order = np.argsort(flat, kind="stable")
        self.vf_index = np.ascontiguousarray(order // 3, dtype=np.int64)
        counts = np.bincount(flat, minlength=n_vertices)
        self.vf_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# ------------------------------------------------------------------------------ numba kernel
# Plain Python here; _compile_kernels() swaps it for a numba dispatcher at first use. The kernel
# is serial: a thousand short iterations of ~2,500 vertices gain little from threads and lose
# much at each iteration's barrier when the cores are shared.
_KERNELS = ("_k_evolve",)
_compiled = False
_compile_lock = threading.Lock()


def _k_evolve(  # pragma: no cover - numba
    verts, neighbours, n_neighbours, faces, vf_ptr, vf_index, edges, img, inv_vox, step_mm,
    n_d1, n_d2, t2, t, tm, frac, gradient, cog_z, radius, n_iterations, boost, boost_until,
):  # fmt: skip
    """``n_iterations`` BET updates of ``verts`` (mm) in place; ``img`` is zero-padded by 1.

    Per vertex: ``s`` (to the neighbour mean), its normal part ``s_n`` and tangential part
    ``s_t``, the curvature sigmoid ``f2``, the inward profile's ``Imin`` / ``Imax`` (trilinear
    samples every ``step_mm``), ``f3``, and the update ``0.5 s_t + f2 s_n + 0.05 f3 l n``.
    """
    n = verts.shape[0]
    m = faces.shape[0]
    face_n = np.empty((m, 3))
    update = np.empty((n, 3))
    hi_x = img.shape[0] - 1.001
    hi_y = img.shape[1] - 1.001
    hi_z = img.shape[2] - 1.001
    for it in range(n_iterations):
        for f in range(m):
            a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
            e1x = verts[b, 0] - verts[a, 0]
            e1y = verts[b, 1] - verts[a, 1]
            e1z = verts[b, 2] - verts[a, 2]
            e2x = verts[c, 0] - verts[a, 0]
            e2y = verts[c, 1] - verts[a, 1]
            e2z = verts[c, 2] - verts[a, 2]
            face_n[f, 0] = e1y * e2z - e1z * e2y
            face_n[f, 1] = e1z * e2x - e1x * e2z
            face_n[f, 2] = e1x * e2y - e1y * e2x
        total = 0.0
        for e in range(edges.shape[0]):
            a, b = edges[e, 0], edges[e, 1]
            dx = verts[a, 0] - verts[b, 0]
            dy = verts[a, 1] - verts[b, 1]
            dz = verts[a, 2] - verts[b, 2]
            total += math.sqrt(dx * dx + dy * dy + dz * dz)
        edge = total / edges.shape[0]
        boosted = boost > 1.0 and it < boost_until
        for i in range(n):
            nx = 0.0
            ny = 0.0
            nz = 0.0
            for q in range(vf_ptr[i], vf_ptr[i + 1]):
                nx += face_n[vf_index[q], 0]
                ny += face_n[vf_index[q], 1]
                nz += face_n[vf_index[q], 2]
            norm = max(math.sqrt(nx * nx + ny * ny + nz * nz), 1e-12)
            nx /= norm
            ny /= norm
            nz /= norm
            k = n_neighbours[i]
            sx = 0.0
            sy = 0.0
            sz = 0.0
            for q in range(k):
                j = neighbours[i, q]
                sx += verts[j, 0]
                sy += verts[j, 1]
                sz += verts[j, 2]
            sx = sx / k - verts[i, 0]
            sy = sy / k - verts[i, 1]
            sz = sz / k - verts[i, 2]
            sn = sx * nx + sy * ny + sz * nz
            # smoothness: sigmoid of the local curvature 1/r = 2 |s_n| / l^2
            f2 = 0.5 * (1.0 + math.tanh(_F * (2.0 * abs(sn) / (edge * edge) - _E)))
            if boosted:
                f2 = min(f2 * boost, 1.0)
            # intensity term: trilinear samples along the inward normal, zero outside the image
            px = verts[i, 0] * inv_vox[0] + 1.0
            py = verts[i, 1] * inv_vox[1] + 1.0
            pz = verts[i, 2] * inv_vox[2] + 1.0
            dx = -nx * inv_vox[0] * step_mm
            dy = -ny * inv_vox[1] * step_mm
            dz = -nz * inv_vox[2] * step_mm
            lo = np.inf
            hi = -np.inf
            for d in range(n_d1):
                x = min(max(px + d * dx, 0.0), hi_x)
                y = min(max(py + d * dy, 0.0), hi_y)
                z = min(max(pz + d * dz, 0.0), hi_z)
                ix = int(x)
                iy = int(y)
                iz = int(z)
                fx = x - ix
                fy = y - iy
                fz = z - iz
                v000 = img[ix, iy, iz]
                v100 = img[ix + 1, iy, iz]
                v010 = img[ix, iy + 1, iz]
                v110 = img[ix + 1, iy + 1, iz]
                c00 = v000 + (img[ix, iy, iz + 1] - v000) * fz
                c01 = v010 + (img[ix, iy + 1, iz + 1] - v010) * fz
                c10 = v100 + (img[ix + 1, iy, iz + 1] - v100) * fz
                c11 = v110 + (img[ix + 1, iy + 1, iz + 1] - v110) * fz
                c0 = c00 + (c01 - c00) * fy
                c1 = c10 + (c11 - c10) * fy
                v = c0 + (c1 - c0) * fx
                lo = min(lo, v)
                if d < n_d2:
                    hi = max(hi, v)
            i_min = max(t2, min(tm, lo))
            i_max = min(tm, max(t, hi))
            bt = frac
            if gradient != 0.0:
                bt = min(max(frac * (1.0 + gradient * (verts[i, 2] - cog_z) / radius), 0.0), 1.0)
            tl = (i_max - t2) * bt + t2
            f3 = 2.0 * (i_min - tl) / (i_max - t2)
            push = _STEP_INTENSITY * edge * f3
            update[i, 0] = _STEP_SMOOTH * (sx - sn * nx) + (f2 * sn + push) * nx
            update[i, 1] = _STEP_SMOOTH * (sy - sn * ny) + (f2 * sn + push) * ny
            update[i, 2] = _STEP_SMOOTH * (sz - sn * nz) + (f2 * sn + push) * nz
        for i in range(n):
            verts[i, 0] += update[i, 0]
            verts[i, 1] += update[i, 1]
            verts[i, 2] += update[i, 2]
    return verts


def _compile_kernels() -> None:
    """Swap the kernel above for a numba dispatcher (once; compiled at first use).

    numba is imported here so that ``import qsmflow`` stays light; ``cache=True`` keeps the
    machine code on disk, and where no cache is writable the kernel is compiled in memory.
    """
    global _compiled
    with _compile_lock:
        if _compiled:
            return
        try:
            import numba  # noqa: F401  (a clear message when it is missing)
        except ImportError as exc:  # pragma: no cover - numba is a dependency
            raise ImportError("the built-in BET needs numba (pip install numba)") from exc
        g = globals()
        for name in _KERNELS:
            g[name] = jit(g[name], nogil=True)
        _compiled = True


def robust_parameters(
    image: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    radius_mm: float | None = None,
    center_vox: Sequence[float] | None = None,
) -> dict[str, float | np.ndarray]:
    """BET's starting estimates (Smith 2002, "Estimation of basic image and brain parameters").

    Returns a dict with ``t2``, ``t98``, ``t`` (intensities), ``cog_mm`` ((3,) centre of gravity
    in the mm frame of :func:`bet`), ``radius_mm`` (radius of the sphere with the volume of the
    voxels above ``t``, or the given head radius) and ``tm`` (median intensity within that sphere).
    ``radius_mm`` and ``center_vox`` override the estimates as FSL's ``-r`` and ``-c`` do.
    """
    img = np.asarray(image, dtype=np.float32)
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    t2, t98 = (float(v) for v in np.percentile(img, [2.0, 98.0]))
    t = t2 + 0.1 * (t98 - t2)
    above = img > t
    n_above = int(np.count_nonzero(above))
    if n_above == 0:
        raise ValueError("BET: no voxel above the background threshold; is the image empty?")
    if center_vox is None:
        idx = np.nonzero(above)
        w = np.minimum(img[idx], np.float32(t98)).astype(np.float64)
        cog_vox = np.array([np.dot(w, ix) for ix in idx]) / w.sum()
    else:
        cog_vox = np.asarray(center_vox, dtype=np.float64)
        if cog_vox.shape != (3,):
            raise ValueError(f"center_vox must be 3 voxel coordinates, got {center_vox}")
    cog_mm = cog_vox * vox
    if radius_mm is None:
        volume = n_above * float(np.prod(vox))
        radius = float((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0))
    else:
        radius = float(radius_mm)
        if radius <= 0:
            raise ValueError(f"radius_mm must be positive, got {radius_mm}")
    # median of the voxels inside the sphere, restricted to a bounding box for speed
    lo = np.maximum(np.floor((cog_mm - radius) / vox).astype(int), 0)
    hi = np.minimum(np.ceil((cog_mm + radius) / vox).astype(int) + 1, img.shape)
    if np.any(hi <= lo):
        raise ValueError("BET: the initial sphere lies outside the image; check center_vox")
    box = img[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    axes = [(np.arange(a, b) * v - c) ** 2 for a, b, v, c in zip(lo, hi, vox, cog_mm, strict=True)]
    r2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    vals = box[(r2 <= radius * radius) & (box > t) & (box < t98)]
    tm = float(np.median(vals)) if vals.size else 0.5 * (t + t98)
    return {"t2": t2, "t98": t98, "t": t, "cog_mm": cog_mm, "radius_mm": radius, "tm": tm}


def _evolve(
    start: np.ndarray,
    mesh: _MeshArrays,
    padded: np.ndarray,
    vox: np.ndarray,
    params: dict,
    frac: float,
    vertical_gradient: float,
    n_iterations: int,
    smoothing_boost: float,
    step_mm: float,
) -> np.ndarray:
    """Run the BET surface evolution from ``start`` (mm); returns the evolved vertices."""
    _compile_kernels()
    n_d1 = int(np.floor(_D1_MM / step_mm + 1e-9)) + 1
    n_d2 = int(np.floor(_D2_MM / step_mm + 1e-9)) + 1
    verts = np.array(start, dtype=np.float64, order="C")
    _k_evolve(
        verts, mesh.neighbours, mesh.n_neighbours, mesh.faces, mesh.vf_ptr, mesh.vf_index,
        mesh.edges, padded, 1.0 / vox, float(step_mm), n_d1, n_d2, float(params["t2"]),
        float(params["t"]), float(params["tm"]), float(frac), float(vertical_gradient),
        float(params["cog_mm"][2]), float(params["radius_mm"]), int(n_iterations),
        float(smoothing_boost), int(0.75 * n_iterations),
    )  # fmt: skip
    return verts


def self_intersects(verts: np.ndarray, faces: np.ndarray, reference: np.ndarray) -> bool:
    """Whether the surface has folded onto itself.

    A fold brings parts of the mesh that are far apart along the surface into contact. The test
    looks for two vertices closer than the mean edge length of ``verts`` that were more than
    four mean edge lengths apart on ``reference`` (the initial sphere). On a smooth, evenly
    spaced surface such pairs do not occur even where the mesh is locally compressed.
    """
    edges = _mesh_edges(faces)

    def mean_edge(v: np.ndarray) -> float:
        d = v[edges[:, 0]] - v[edges[:, 1]]
        return float(np.sqrt(np.einsum("ij,ij->i", d, d)).mean())

    pairs = cKDTree(verts).query_pairs(mean_edge(verts), output_type="ndarray")
    if pairs.size == 0:
        return False
    apart = np.linalg.norm(reference[pairs[:, 0]] - reference[pairs[:, 1]], axis=1)
    return bool(np.any(apart > 4.0 * mean_edge(reference)))


def mesh_to_mask(
    verts_mm: np.ndarray, faces: np.ndarray, shape: Sequence[int], voxel_size_mm: Sequence[float]
) -> np.ndarray:
    """Voxels whose centres lie inside a closed triangle mesh (ray parity along axis 2).

    For every triangle, the voxel columns ``(i, j)`` whose centres fall inside its projection
    onto the first two axes get one crossing at the height of the triangle there; a voxel is
    inside when an odd number of crossings lie below its centre. Rays through shared edges and
    vertices are counted once (exact, consistently signed edge functions and a tie rule), so
    every column of a closed mesh has an even number of crossings; a column with an odd number
    (only possible for a mesh that is not closed) takes the intersection of its two neighbours
    along axis 0.

    Parameters
    ----------
    verts_mm : (n, 3) float
        Vertices in the mm frame of :func:`bet` (``index * voxel_size``).
    faces : (m, 3) int
    shape : (3,) int
        Output shape.
    voxel_size_mm : (3,) float

    Returns
    -------
    mask : bool array of ``shape``
    """
    shape = tuple(int(s) for s in shape)
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    p = np.asarray(verts_mm, dtype=np.float64) / vox
    tri = p[np.asarray(faces)]  # (m, 3 corners, 3 axes)
    x, y = tri[..., 0], tri[..., 1]
    i_lo = np.maximum(np.ceil(x.min(axis=1)).astype(np.int64), 0)
    i_hi = np.minimum(np.floor(x.max(axis=1)).astype(np.int64), shape[0] - 1)
    j_lo = np.maximum(np.ceil(y.min(axis=1)).astype(np.int64), 0)
    j_hi = np.minimum(np.floor(y.max(axis=1)).astype(np.int64), shape[1] - 1)
    ni = np.maximum(i_hi - i_lo + 1, 0)
    nj = np.maximum(j_hi - j_lo + 1, 0)
    count = ni * nj
    # one candidate (triangle, column) pair per voxel column in each triangle's bounding box
    tri_id = np.repeat(np.arange(tri.shape[0]), count)
    offset = np.arange(tri_id.size) - np.repeat(np.cumsum(count) - count, count)
    nj_rep = nj[tri_id]
    ci = i_lo[tri_id] + offset // np.maximum(nj_rep, 1)
    cj = j_lo[tri_id] + offset % np.maximum(nj_rep, 1)
    # Edge functions of the column centre for the three edges of each candidate's triangle. Each
    # is evaluated from the edge's lower-index end so that the two triangles sharing an edge get
    # exactly opposite values; with the tie rule below, a ray through a shared edge or vertex
    # then crosses exactly one of the triangles around it.
    fc = np.asarray(faces)[tri_id]
    px, py = ci.astype(np.float64), cj.astype(np.float64)
    edge_fn = []
    for a, b in ((1, 2), (2, 0), (0, 1)):  # edge opposite corner 0, 1, 2
        ia, ib = fc[:, a], fc[:, b]
        forward = ia < ib
        lo = np.where(forward, ia, ib)
        hi = np.where(forward, ib, ia)
        xl, yl = p[lo, 0], p[lo, 1]
        e = (p[hi, 0] - xl) * (py - yl) - (p[hi, 1] - yl) * (px - xl)
        edge_fn.append((np.where(forward, e, -e), p[ib, 0] - p[ia, 0], p[ib, 1] - p[ia, 1]))
    # orientation of each projected triangle; the area-weighted sum of edge functions is twice
    # the signed projected area, so it is the same for every column of a triangle
    area2 = edge_fn[0][0] + edge_fn[1][0] + edge_fn[2][0]
    orient = np.sign(area2)
    hit = orient != 0
    for e, dx, dy in edge_fn:
        e, dx, dy = e * orient, dx * orient, dy * orient
        # points on an edge belong to the triangle on one side only (a top-left style rule)
        owns = (dy > 0) | ((dy == 0) & (dx > 0))
        hit &= (e > 0) | ((e == 0) & owns)
    w = [e[hit] for e, _, _ in edge_fn]
    total = area2[hit]
    zc = p[fc[hit], 2]
    z = (w[0] * zc[:, 0] + w[1] * zc[:, 1] + w[2] * zc[:, 2]) / total
    ci, cj = ci[hit], cj[hit]
    # the crossing toggles every voxel centre above it
    k = np.clip(np.ceil(z), 0, shape[2]).astype(np.int64)
    toggles = np.bincount(
        (ci * shape[1] + cj) * (shape[2] + 1) + k, minlength=shape[0] * shape[1] * (shape[2] + 1)
    ).reshape(shape[0], shape[1], shape[2] + 1)
    parity = (np.cumsum(toggles, axis=2) & 1).astype(bool)
    mask = parity[..., : shape[2]]
    odd = parity[..., shape[2]]
    if np.any(odd):
        bi, bj = np.nonzero(odd)
        lo = np.maximum(bi - 1, 0)
        hi = np.minimum(bi + 1, shape[0] - 1)
        mask[bi, bj] = mask[lo, bj] & mask[hi, bj]
    return np.ascontiguousarray(mask)


def bet(
    image: np.ndarray,
    voxel_size_mm: Sequence[float],
    *,
    frac: float = 0.5,
    vertical_gradient: float = 0.0,
    radius_mm: float | None = None,
    center_vox: Sequence[float] | None = None,
    robust: bool = False,
    n_iterations: int = 1000,
    return_surface: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brain mask of a head image with the BET surface model (Smith, Hum Brain Mapp 2002).

    The options mirror FSL's ``bet``: ``frac`` is ``-f``, ``vertical_gradient`` is ``-g``,
    ``radius_mm`` is ``-r``, ``center_vox`` is ``-c`` and ``robust`` is ``-R``.

    Parameters
    ----------
    image : (x, y, z) array
        Head image with bright brain and dark skull, for example a first-echo GRE magnitude or a
        T1-weighted image. Non-finite values are treated as 0.
    voxel_size_mm : (3,) float
        Voxel sizes in mm.
    frac : float
        Fractional intensity threshold in (0, 1) (FSL ``-f``, default 0.5); smaller values give
        larger brain outlines. On GRE magnitude, where the CSF around the brain is darker than
        tissue but well above the skull, 0.5 puts the surface at the inner skull (the outer CSF
        included) and about 0.7 at the brain surface (see the module docstring).
    vertical_gradient : float
        Gradient of the fractional threshold along the third array axis, in [-1, 1] (FSL ``-g``,
        default 0): ``frac' = frac * (1 + g * (z - z_cog) / radius)``; positive values give a
        larger outline at the bottom (low z) and a smaller one at the top.
    radius_mm : float, optional
        Head radius in mm (FSL ``-r``); the initial sphere has half this radius. Estimated from
        the volume of the voxels above the background threshold when omitted.
    center_vox : (3,) float, optional
        Centre of the initial sphere in voxel coordinates (FSL ``-c``); the intensity-weighted
        centre of gravity when omitted.
    robust : bool
        Robust centre estimation (FSL ``-R``): run again from the centre of gravity of the
        previous mask until the centre moves less than 1 mm (at most 5 runs).
    n_iterations : int
        Surface updates per run (FSL uses 1000).
    return_surface : bool
        Also return the final mesh.

    Returns
    -------
    mask : (x, y, z) bool
        Voxels whose centres lie inside the brain surface.
    vertices_mm : (n, 3) float64, only with ``return_surface``
        Surface vertices in mm, in the array frame scaled by the voxel size (``index * voxel``).
    faces : (m, 3) int, only with ``return_surface``
        Triangles (vertex indices, counter-clockwise seen from outside).
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(
            f"bet expects a 3-D image, got shape {img.shape}; pass one echo (or an echo "
            "combination) of multi-echo data"
        )
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    if vox.shape != (3,) or np.any(vox <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive sizes, got {voxel_size_mm}")
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must lie in (0, 1), got {frac}")
    if not -1.0 <= vertical_gradient <= 1.0:
        raise ValueError(f"vertical_gradient must lie in [-1, 1], got {vertical_gradient}")
    if n_iterations < 0:
        raise ValueError(f"n_iterations must be >= 0, got {n_iterations}")
    img = np.nan_to_num(img.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if not np.any(img > 0):
        raise ValueError("bet: the image has no positive voxel (all zero?); expected a head image")

    unit, faces = icosphere(_SUBDIVISIONS)
    mesh = _MeshArrays(unit.shape[0], faces)
    padded = np.ascontiguousarray(np.pad(img, 1))
    # profile samples every 1 mm as in the paper, or every voxel for voxels coarser than that
    step_mm = max(1.0, float(vox.min()))
    centre = center_vox
    for _ in range(_ROBUST_MAX_RUNS if robust else 1):
        params = robust_parameters(img, vox, radius_mm=radius_mm, center_vox=centre)
        start = params["cog_mm"] + 0.5 * params["radius_mm"] * unit
        for repeat in range(_MAX_REPEATS + 1):
            boost = 1.0 if repeat == 0 else 10.0**repeat
            verts = _evolve(
                start, mesh, padded, vox, params, frac, vertical_gradient, n_iterations, boost,
                step_mm,
            )  # fmt: skip
            if not self_intersects(verts, mesh.faces, start):
                break
            _log.info(
                "BET: surface self-intersects; evolving again with %gx smoothing", 10.0 * boost
            )
        mask = mesh_to_mask(verts, mesh.faces, img.shape, vox)
        if not robust or not mask.any():
            break
        new_centre = np.array([ix.mean() for ix in np.nonzero(mask)])
        if np.linalg.norm((new_centre - params["cog_mm"] / vox) * vox) < 1.0:
            break
        centre = new_centre
    if return_surface:
        return mask, verts, mesh.faces
    return mask
