"""An analytic head phantom for QSM simulation.

The head is described in a head-fixed frame (mm, RAS: +x right, +y anterior, +z superior, origin
near the centre of the brain) by implicit surfaces (approximate signed distances of ellipsoids,
cylinders and half-spaces). Evaluating the labels at the world coordinates of any voxel grid,
through any head rotation, gives a consistent anatomy for every resolution, slab angle and head
orientation, without resampling a voxelised template.

Anatomy: scalp/face/neck (muscle), skull and skull base (bone), air outside and in the frontal,
sphenoid, ethmoid, maxillary and mastoid sinuses, nasal cavity and ear canals; inside the skull
CSF, a folded cortical ribbon of grey matter around random sulci, white matter, ventricles, the
deep grey nuclei, cerebellum and brainstem, venous sinuses and cortical veins, one calcification.
Labels follow the QSM challenge 2.0 head phantom scheme (Marques et al., MRM 2021) as used by the
``qsm-ci`` scorer. Tissue values are typical literature values at 3 T (susceptibility relative to
water/CSF in ppm; R2* in Hz; R1 in Hz; M0 relative to CSF).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "LABELS",
    "TISSUE",
    "CHI_AIR_PPM",
    "HeadModel",
    "make_head_model",
    "label_points",
    "tissue_maps",
]

#: Segmentation labels (QSM challenge 2.0 head phantom, as in the qsm-ci scorer).
LABELS: dict[int, str] = {
    1: "Caudate",
    2: "Globus pallidus",
    3: "Putamen",
    4: "Red nucleus",
    5: "Dentate nucleus",
    6: "Substantia nigra",
    7: "Thalamus",
    8: "White matter",
    9: "Grey matter",
    10: "CSF",
    11: "Blood",
    13: "Bone",
    14: "Air",
    15: "Muscle",
    16: "Calcification",
}
CAUDATE, PALLIDUS, PUTAMEN, RED_NUCLEUS, DENTATE, NIGRA, THALAMUS = 1, 2, 3, 4, 5, 6, 7
WM, GM, CSF, BLOOD, BONE, AIR, MUSCLE, CALCIFICATION = 8, 9, 10, 11, 13, 14, 15, 16

#: Susceptibility of air relative to water, ppm (Schenck, Med Phys 1996: water -9.05, air +0.36).
CHI_AIR_PPM = 9.41

#: label -> (chi ppm rel. water, M0 rel. CSF, R2* Hz at 3 T, R1 Hz at 3 T).
TISSUE: dict[int, tuple[float, float, float, float]] = {
    CAUDATE: (0.060, 0.80, 22.0, 0.80),
    PALLIDUS: (0.190, 0.72, 45.0, 1.00),
    PUTAMEN: (0.050, 0.78, 28.0, 0.85),
    RED_NUCLEUS: (0.140, 0.70, 35.0, 1.00),
    DENTATE: (0.120, 0.72, 35.0, 1.00),
    NIGRA: (0.160, 0.70, 40.0, 1.00),
    THALAMUS: (0.030, 0.75, 22.0, 0.90),
    WM: (-0.030, 0.68, 22.0, 1.18),
    GM: (0.015, 0.80, 18.0, 0.70),
    CSF: (0.000, 1.00, 3.0, 0.25),
    BLOOD: (0.350, 0.85, 40.0, 0.60),
    BONE: (-2.100, 0.05, 400.0, 2.00),
    AIR: (CHI_AIR_PPM, 0.00, 0.0, 0.00),
    MUSCLE: (0.000, 0.70, 35.0, 0.70),
    CALCIFICATION: (-1.500, 0.30, 150.0, 1.00),
}

_BRAIN_LABELS = (CAUDATE, PALLIDUS, PUTAMEN, RED_NUCLEUS, DENTATE, NIGRA, THALAMUS, WM, GM)


# --------------------------------------------------------------------------- implicit surfaces
def _sd_ellipsoid(p: tuple[np.ndarray, ...], c, a) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid."""
    q = [(p[i] - np.float32(c[i])) / np.float32(a[i]) for i in range(3)]
    k0 = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
    k1 = np.sqrt(sum((q[i] / np.float32(a[i])) ** 2 for i in range(3)))
    return k0 * (k0 - 1) / np.maximum(k1, np.float32(1e-6))


def _in_ellipsoid(p: tuple[np.ndarray, ...], c, a) -> np.ndarray:
    """True inside an axis-aligned ellipsoid (exact, cheaper than the distance)."""
    acc = None
    for i in range(3):
        q = (p[i] - np.float32(c[i])) * np.float32(1.0 / a[i])
        acc = q * q if acc is None else acc + q * q
    return acc < 1


def _sd_zcylinder(p, c_xy, a_xy, z_lo, z_hi) -> np.ndarray:
    """Elliptic cylinder along z between ``z_lo`` and ``z_hi`` (mm)."""
    qx = (p[0] - np.float32(c_xy[0])) / np.float32(a_xy[0])
    qy = (p[1] - np.float32(c_xy[1])) / np.float32(a_xy[1])
    r = np.sqrt(qx * qx + qy * qy)
    side = (r - 1) * np.float32(min(a_xy))
    return np.maximum(side, np.maximum(np.float32(z_lo) - p[2], p[2] - np.float32(z_hi)))


def _dist_to_polyline(p, pts: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) from points to a polyline given as (n, 3) vertices."""
    out = np.full(p[0].shape, np.inf, dtype=np.float32)
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        ab = (b - a).astype(np.float32)
        denom = np.float32(max(float(ab @ ab), 1e-9))
        ap = [p[i] - np.float32(a[i]) for i in range(3)]
        t = np.clip((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / denom, 0, 1)
        d2 = sum((ap[i] - t * ab[i]) ** 2 for i in range(3))
        np.minimum(out, d2, out=out)
    return np.sqrt(out)


# ------------------------------------------------------------------------------- head model
@dataclass
class HeadModel:
    """One subject's head: random anatomy details drawn from a seed.

    Attributes
    ----------
    scale : (3,) float
        Head size relative to the template along x, y, z.
    veins : list of (vertices (n, 3) mm, radius mm)
        Venous sinuses and cortical veins as tubes, in template coordinates.
    noise_origin_mm, noise_spacing_mm : origin and spacing of the noise grids (template frame).
    sulcal_noise : 3-D float32
        Smooth random field scaled to ~mm units near its zero set; sulci lie on that set.
    texture : 3-D float32
        Smooth unit-variance random field for within-tissue variation of chi, R2* and M0.
    """

    scale: np.ndarray
    veins: list[tuple[np.ndarray, float]]
    noise_origin_mm: np.ndarray
    noise_spacing_mm: float
    sulcal_noise: np.ndarray
    texture: np.ndarray
    calcification_mm: np.ndarray = field(default_factory=lambda: np.array([-30.0, 22.0, 26.0]))


_CEREBRUM_C, _CEREBRUM_A = (0.0, -3.0, 10.0), (66.0, 82.0, 52.0)


def _cortical_vein(rng: np.random.Generator) -> np.ndarray:
    """A random vein running over the upper cerebral surface, 1.5 mm below it."""
    c, a = np.array(_CEREBRUM_C), np.array(_CEREBRUM_A)
    theta = rng.uniform(0, 2 * np.pi)
    elev = rng.uniform(0.05, 0.9)
    u = np.array([np.cos(theta) * np.cos(elev), np.sin(theta) * np.cos(elev), np.sin(elev)])
    direction = rng.normal(size=3)
    pts = []
    for _ in range(14):
        q = u / np.linalg.norm(u)
        # point on the ellipsoid along q, pulled 1.5 mm inwards
        r = 1.0 / np.sqrt(np.sum((q / a) ** 2))
        pts.append(c + q * (r - 1.5))
        direction = direction - q * (direction @ q) + rng.normal(scale=0.35, size=3)
        direction /= np.linalg.norm(direction)
        u = q + direction * (5.0 / r)
    return np.asarray(pts)


def make_head_model(seed: int = 0, *, resolution_mm: float = 1.5) -> HeadModel:
    """Draw one subject's head from ``seed`` (deterministic)."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.95, 1.04) * rng.uniform(0.98, 1.02, size=3)
    # Noise grids cover the template head with margin.
    lo, hi = np.array([-110.0, -130.0, -150.0]), np.array([110.0, 130.0, 110.0])
    shape = tuple(int(n) for n in np.ceil((hi - lo) / resolution_mm) + 1)
    white = rng.standard_normal(shape, dtype=np.float32)
    sulcal = ndimage.gaussian_filter(white, 3.2 / resolution_mm)
    grad = np.sqrt(sum(g * g for g in np.gradient(sulcal, resolution_mm)))
    sulcal /= np.median(grad[np.abs(sulcal) < 0.5 * sulcal.std()])  # ~ mm near the zero set
    texture = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), 2.0 / resolution_mm
    )
    texture /= texture.std()

    sss_t = np.deg2rad(np.linspace(20, 195, 24))
    sss = np.stack([np.zeros_like(sss_t), -3 + 86 * np.cos(sss_t), 10 + 56 * np.sin(sss_t)], axis=1)
    veins: list[tuple[np.ndarray, float]] = [(sss, 3.5)]
    for side in (-1, 1):
        transverse = np.array(
            [[0, -88, 0], [side * 30, -80, -8], [side * 50, -55, -15], [side * 55, -30, -30]], float
        )
        veins.append((transverse, 3.0))
        internal = np.array([[side * 2.5, 5, 20], [side * 2.5, -25, 18], [0, -40, 21]], float)
        veins.append((internal, 1.5))
    veins.append((np.array([[0, -40, 21], [0, -85, 0]], float), 2.5))  # straight sinus
    for _ in range(10):
        veins.append((_cortical_vein(rng), float(rng.uniform(1.0, 1.5))))
    return HeadModel(
        scale=scale.astype(np.float64),
        veins=veins,
        noise_origin_mm=lo,
        noise_spacing_mm=resolution_mm,
        sulcal_noise=sulcal.astype(np.float32),
        texture=texture.astype(np.float32),
    )


def _sample(grid: np.ndarray, model: HeadModel, p) -> np.ndarray:
    idx = [
        (p[i] - np.float32(model.noise_origin_mm[i])) / np.float32(model.noise_spacing_mm)
        for i in range(3)
    ]
    return ndimage.map_coordinates(grid, idx, order=1, mode="nearest").astype(np.float32)


def _brain_sd(p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance to the brain envelope, plus the cerebrum and cerebellum parts."""
    x, y, z = p
    ell = _sd_ellipsoid(p, _CEREBRUM_C, _CEREBRUM_A)
    anterior_fossa = np.minimum(-20 - z, y - 20)  # no brain below z=-20 in front of y=20
    midline_base = np.minimum(np.minimum(20 - np.abs(x), -14 - z), y + 15)
    cerebrum = np.maximum(ell, np.maximum(anterior_fossa, midline_base))
    cerebellum = _sd_ellipsoid(p, (0, -52, -30), (50, 31, 20))
    brainstem = _sd_zcylinder(p, (0, -20), (12, 12), -70, 5)
    return np.minimum(np.minimum(cerebrum, cerebellum), brainstem), cerebrum, brainstem


def label_points(
    model: HeadModel, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Segmentation labels (int8) and signed distance to the brain envelope (mm, float32).

    Head-frame points are equal-length 1-D arrays in mm. The brain mask is ``distance < 0``:
    the brain envelope with parenchyma, ventricles, sulcal CSF and the veins inside it.
    """
    s = model.scale.astype(np.float32)
    p = (x.astype(np.float32) / s[0], y.astype(np.float32) / s[1], z.astype(np.float32) / s[2])
    labels = np.full(p[0].shape, AIR, dtype=np.int8)

    brain_sd, cerebrum_sd, brainstem_sd = _brain_sd(p)
    lower_head = _in_ellipsoid(p, (0, -5, -35), (68, 82, 36))
    face = _in_ellipsoid(p, (0, 50, -45), (55, 50, 40))
    neck = _sd_zcylinder(p, (0, -15), (48, 52), -400, -30) < 0
    head = np.flatnonzero((brain_sd < 17) | lower_head | face | neck)
    labels[head] = MUSCLE
    ph = tuple(v[head] for v in p)
    bsd = brain_sd[head]
    hl = labels[head]
    skull_base = _in_ellipsoid(ph, (0, 0, -36), (58, 60, 14)) & lower_head[head]
    hl[(bsd < 10.5) | skull_base] = BONE
    for c, a in [
        ((0, 82, 28), (14, 4, 10)),  # frontal
        ((0, 22, -32), (11, 11, 9)),  # sphenoid
        ((0, 66, -50), (7, 24, 16)),  # nasal cavity
        ((-9, 55, -22), (5, 14, 8)),  # ethmoid
        ((9, 55, -22), (5, 14, 8)),
        ((-26, 52, -58), (12, 16, 14)),  # maxillary
        ((26, 52, -58), (12, 16, 14)),
        ((-52, -20, -38), (8, 9, 8)),  # mastoid
        ((52, -20, -38), (8, 9, 8)),
        ((-64, -12, -38), (10, 4, 4)),  # ear canals, open to the outside
        ((64, -12, -38), (10, 4, 4)),
    ]:
        hl[_in_ellipsoid(ph, c, a) & (bsd >= 3.5)] = AIR
    hl[bsd < 3.5] = CSF
    labels[head] = hl
    del ph, bsd, hl

    inside = np.flatnonzero(brain_sd < 0)
    q = tuple(v[inside] for v in p)
    depth = -brain_sd[inside]
    in_cortex = brainstem_sd[inside] > 0
    n = np.abs(_sample(model.sulcal_noise, model, q))
    lab = np.full(inside.shape, WM, dtype=np.int8)
    gm = (depth < 2.6) | ((n < 2.9) & (depth < 14.5))
    sulcus = (n < 0.7) & (depth < 12)
    # interhemispheric fissure above the corpus callosum and between the frontal/occipital poles
    upper = (cerebrum_sd[inside] < 0) & ((q[2] > 28) | (np.abs(q[1] + 3) > 52)) & (q[2] > -12)
    gm |= upper & (np.abs(q[0]) < 3.8)
    sulcus |= upper & (np.abs(q[0]) < 1.0)
    lab[gm & in_cortex] = GM
    lab[sulcus & in_cortex] = CSF
    for label, c, a in [
        (THALAMUS, (-11, -14, 6), (8, 14, 8)),
        (THALAMUS, (11, -14, 6), (8, 14, 8)),
        (CAUDATE, (-18, 12, 14), (4.5, 10, 7)),
        (CAUDATE, (18, 12, 14), (4.5, 10, 7)),
        (PUTAMEN, (-26, 4, 3), (5, 13, 9)),
        (PUTAMEN, (26, 4, 3), (5, 13, 9)),
        (PALLIDUS, (-19, 1, 0), (3.5, 8, 5)),
        (PALLIDUS, (19, 1, 0), (3.5, 8, 5)),
        (NIGRA, (-10, -15, -12), (3, 8, 2.5)),
        (NIGRA, (10, -15, -12), (3, 8, 2.5)),
        (RED_NUCLEUS, (-5, -20, -8), (3.5, 3.5, 3.5)),
        (RED_NUCLEUS, (5, -20, -8), (3.5, 3.5, 3.5)),
        (DENTATE, (-16, -55, -30), (6, 7, 5)),
        (DENTATE, (16, -55, -30), (6, 7, 5)),
        (CSF, (-11, 2, 16), (6, 24, 7)),  # lateral ventricles
        (CSF, (11, 2, 16), (6, 24, 7)),
        (CSF, (-16, -28, 10), (5, 12, 6)),  # occipital horns
        (CSF, (16, -28, 10), (5, 12, 6)),
        (CSF, (0, -8, 2), (1.5, 12, 8)),  # third ventricle
        (CSF, (0, -38, -30), (6, 4, 4)),  # fourth ventricle
    ]:
        lab[_in_ellipsoid(q, c, a)] = label
    lab[np.sqrt(sum((q[i] - model.calcification_mm[i]) ** 2 for i in range(3))) < 2.5] = (
        CALCIFICATION
    )
    labels[inside] = lab

    # Veins may cross the brain surface (sinuses lie in the dura, cortical veins in sulci).
    near = np.flatnonzero(brain_sd < 8)
    qn = tuple(v[near] for v in p)
    vein = np.zeros(near.shape, dtype=bool)
    for pts, radius in model.veins:
        lo, hi = pts.min(axis=0) - radius, pts.max(axis=0) + radius
        box = np.flatnonzero(
            (qn[0] > lo[0])
            & (qn[0] < hi[0])
            & (qn[1] > lo[1])
            & (qn[1] < hi[1])
            & (qn[2] > lo[2])
            & (qn[2] < hi[2])
        )
        if box.size:
            d = _dist_to_polyline(tuple(v[box] for v in qn), pts)
            vein[box[d < radius]] = True
    labels[near[vein]] = BLOOD
    return labels, brain_sd.astype(np.float32)


def tissue_maps(
    model: HeadModel,
    labels: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    *,
    b0_tesla: float = 3.0,
) -> dict[str, np.ndarray]:
    """Per-point chi (ppm rel. water), M0, R2* (Hz) and R1 (Hz) with smooth tissue texture.

    R2* is scaled linearly with field strength from its 3 T value (the susceptibility-driven part
    of R2* grows about linearly with B0; Peters et al., MRI 2007).
    """
    table = np.zeros((int(max(TISSUE)) + 1, 4), dtype=np.float32)
    for lab, vals in TISSUE.items():
        table[lab] = vals
    chi = table[labels, 0].copy()
    m0 = table[labels, 1].copy()
    r2s = table[labels, 2] * np.float32(b0_tesla / 3.0)
    r1 = table[labels, 3].copy()
    soft = np.isin(labels, (*_BRAIN_LABELS, BLOOD))
    s = model.scale.astype(np.float32)
    p = tuple(v[soft].astype(np.float32) / s[i] for i, v in enumerate((x, y, z)))
    t = _sample(model.texture, model, p)
    chi[soft] += np.float32(0.008) * t
    r2s[soft] *= 1 + np.float32(0.06) * t
    m0[soft] *= 1 + np.float32(0.03) * t
    return {"chi_ppm": chi, "m0": m0, "r2star_hz": r2s.astype(np.float32), "r1_hz": r1}
