"""Anisotropic white-matter susceptibility for the head phantom (opt-in in the simulator).

White matter is given a cylindrically symmetric susceptibility tensor about the local fibre
direction ``n`` (Liu, Magn Reson Med 2010;63:1471; Wisnieff et al., NeuroImage 2013;70:363):

    X = chi_iso I + delta_chi (n n^T - I / 3),     delta_chi = chi_parallel - chi_perpendicular,

so the mean susceptibility (trace / 3) is the isotropic phantom value and the largest eigenvalue
lies along the fibre. The default ``delta_chi`` = 0.015 ppm is within the white-matter
anisotropies measured in vivo (about 0.01-0.02 ppm; Li, Vikram, Lim, Jones, Farrell & van Zijl,
NeuroImage 2012;62:314, and Li, Wu, Avram & Liu, NeuroImage 2012;59:2088).

The fibre direction field is smooth and loosely anatomical, in the head frame (mm, RAS): left-right
across the midline (corpus callosum), superior-inferior lateral to it in the central region and in
the brainstem (corticospinal tract / corona radiata, fanning outwards), anterior-posterior
elsewhere (longitudinal association bundles); directions blend as a weighted vector sum, which
has no sign flips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .algorithms.multi_orientation.sti import TENSOR_COMPONENTS, tensor_forward_field

__all__ = [
    "WM_ANISOTROPY_PPM",
    "fibre_directions",
    "fibre_tensor",
    "rotate_tensor",
    "wm_tensor",
    "anisotropic_wm",
]

#: Default chi_parallel - chi_perpendicular of white matter, ppm (see the module docstring).
WM_ANISOTROPY_PPM = 0.015

_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def fibre_directions(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Unit fibre directions (n, 3) float32 at head-frame template points (mm, 1-D arrays)."""
    x, y, z = (np.asarray(v, dtype=np.float32) for v in (x, y, z))

    def sigmoid(t):
        return np.float32(1) / (np.float32(1) + np.exp(-t))

    above_stem = sigmoid((z + np.float32(5)) / np.float32(5))
    w_lr = np.exp(-((x / np.float32(16)) ** 2)) * above_stem
    lateral = np.exp(-(((np.abs(x) - np.float32(23)) / np.float32(8)) ** 2))
    w_si = lateral * np.exp(-(((y + np.float32(8)) / np.float32(24)) ** 2)) * above_stem
    w_si += np.exp(-((x / np.float32(14)) ** 2)) * (np.float32(1) - above_stem)
    w_ap = np.float32(0.35) + np.float32(0.65) * (
        np.float32(1) - np.exp(-((x / np.float32(40)) ** 2))
    )
    w_ap *= np.float32(1) - np.float32(0.8) * np.maximum(w_lr, w_si)
    fan = np.float32(0.35) * np.tanh(x / np.float32(10))  # corona radiata fans outwards
    n = np.stack([w_lr + w_si * fan, w_ap, w_si], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return n.astype(np.float32)


def fibre_tensor(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Traceless fibre tensor ``n n^T - I / 3`` (n, 6) at head-frame template points (mm).

    Components in ``TENSOR_COMPONENTS`` order; averaged over the white-matter part of a voxel
    (partial-volume simulation) it gives the voxel's anisotropic susceptibility per ppm of
    ``delta_chi``.
    """
    n = fibre_directions(x, y, z)
    out = np.empty(n.shape[:1] + (len(TENSOR_COMPONENTS),), dtype=np.float32)
    for c, (a, b) in enumerate(_PAIRS):
        out[:, c] = n[:, a] * n[:, b] - (np.float32(1 / 3) if a == b else np.float32(0))
    return out


def rotate_tensor(tensor: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """``Q X Q^T`` for tensors (..., 6) in ``TENSOR_COMPONENTS`` order and a 3x3 rotation ``Q``."""
    t = np.asarray(tensor, dtype=np.float32)
    q = np.asarray(rotation, dtype=np.float64)
    full = [[None] * 3 for _ in range(3)]
    for c, (a, b) in enumerate(_PAIRS):
        full[a][b] = full[b][a] = t[..., c]
    out = np.zeros(t.shape, dtype=np.float32)
    for c, (a, b) in enumerate(_PAIRS):
        for i in range(3):
            for j in range(3):
                w = q[a, i] * q[b, j]
                if w != 0.0:
                    out[..., c] += np.float32(w) * full[i][j]
    return out


def wm_tensor(
    chi_iso_ppm: np.ndarray, fibre_dir: np.ndarray, wm_mask: np.ndarray, delta_chi_ppm: float
) -> np.ndarray:
    """Tensor (x, y, z, 6) ppm: ``chi I`` everywhere plus ``delta_chi (n n^T - I/3)`` in WM.

    Components are in ``TENSOR_COMPONENTS`` order (xx, xy, xz, yy, yz, zz), in the frame of
    ``fibre_dir`` (x, y, z, 3).
    """
    chi = np.asarray(chi_iso_ppm, dtype=np.float32)
    n = np.asarray(fibre_dir, dtype=np.float32)
    wm = np.asarray(wm_mask, dtype=bool)
    out = np.zeros(chi.shape + (len(TENSOR_COMPONENTS),), dtype=np.float32)
    dchi = np.float32(delta_chi_ppm)
    for c, (a, b) in enumerate(_PAIRS):
        aniso = n[..., a] * n[..., b] - (np.float32(1 / 3) if a == b else np.float32(0))
        out[..., c] = np.where(wm, dchi * aniso, np.float32(0))
        if a == b:
            out[..., c] += chi
    return out


def anisotropic_wm(
    chi_iso_ppm: np.ndarray,
    wm_mask: np.ndarray,
    head_points: Sequence[np.ndarray],
    model_scale: Sequence[float],
    head_to_voxel: np.ndarray,
    delta_chi_ppm: float,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float],
    *,
    aniso_head: np.ndarray | None = None,
    n_threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tensor, fibre directions and the field of the anisotropic part for one acquisition.

    Parameters
    ----------
    chi_iso_ppm, wm_mask : (x, y, z) arrays
        Isotropic susceptibility (ppm) and white matter on the acquisition grid.
    head_points : three (x, y, z) arrays
        Head-frame coordinates (mm) of the voxel centres.
    model_scale : (3,) float
        The head model's size scaling (template points are ``head_points / scale``).
    head_to_voxel : (3, 3) array
        Rotation taking head-frame vectors to the voxel (array) frame.
    delta_chi_ppm : float
        chi_parallel - chi_perpendicular, ppm.
    aniso_head : (x, y, z, 6) array, optional
        Partial-volume simulation: the sub-voxel average of ``[in WM] (n n^T - I / 3)`` in the
        head frame (see :func:`fibre_tensor`); replaces the evaluation at voxel centres for the
        tensor (fibre directions stay those at the centres of ``wm_mask`` voxels).

    Returns
    -------
    tensor (x, y, z, 6) ppm, fibre directions (x, y, z, 3) in the voxel frame (zero outside
    WM), and the field (ppm) of the traceless WM part for B0 along ``b0_dir``.
    """
    wm = np.asarray(wm_mask, dtype=bool)
    s = np.asarray(model_scale, dtype=np.float32)
    pts = [np.asarray(p)[wm] / s[i] for i, p in enumerate(head_points)]
    n_head = fibre_directions(*pts)
    n_vox = n_head @ np.asarray(head_to_voxel, dtype=np.float32).T
    fibres = np.zeros(wm.shape + (3,), dtype=np.float32)
    fibres[wm] = n_vox
    if aniso_head is None:
        tensor_aniso = wm_tensor(np.zeros(wm.shape, np.float32), fibres, wm, delta_chi_ppm)
    else:
        tensor_aniso = rotate_tensor(aniso_head, head_to_voxel) * np.float32(delta_chi_ppm)
    field = tensor_forward_field(
        tensor_aniso, voxel_size_mm, b0_dir, pad_factor=2.0, n_threads=n_threads
    )
    for c in (0, 3, 5):
        tensor_aniso[..., c] += np.asarray(chi_iso_ppm, dtype=np.float32)
    return tensor_aniso, fibres, field
