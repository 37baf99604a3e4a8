"""Shared pieces of the dipole-inversion methods: input checks and finite-difference operators.

Gradients are forward differences with periodic boundaries on the (padded) grid, so that they
are diagonal in k-space: ``E_i(k) = (exp(2 pi i k_i / N_i) - 1) / d_i`` (the symbols used by the
closed-form ADMM updates of TV/MEDI-type methods). ``divergence`` is the negative adjoint of
``gradient``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["check_inversion_inputs", "gradient", "divergence", "gradient_symbols"]


def check_inversion_inputs(
    field: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float],
    *,
    magnitude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a local field (ppm), mask, voxel size and B0 direction; return float32/bool.

    Raises ``ValueError`` for wrong shapes, an empty mask, NaN/Inf inside the mask, bad voxel
    sizes or B0 direction; warns when the field's magnitude suggests it is not in ppm.
    """
    field = np.asarray(field)
    mask = np.asarray(mask)
    if field.ndim != 3:
        raise ValueError(f"local field must be a 3-D array, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} differs from field shape {field.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("the mask is empty; check the brain mask / background-removal mask")
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vox.size != 3 or not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive sizes, got {voxel_size_mm!r}")
    b = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
    if b.size != 3 or not np.all(np.isfinite(b)) or np.linalg.norm(b) < 1e-9:
        raise ValueError(f"b0_dir must be a non-zero 3-vector, got {b0_dir!r}")
    inside = field[mask]
    if not np.all(np.isfinite(inside)):
        raise ValueError("the local field has NaN or Inf inside the mask")
    p99 = float(np.percentile(np.abs(inside), 99)) if inside.size else 0.0
    if p99 > 5.0:
        warnings.warn(
            f"local field reaches {p99:.3g} (99th percentile of |field|) inside the mask; brain "
            "local fields are below ~1 ppm: is it in Hz or radians instead of ppm, or does it "
            "still contain the background field?",
            stacklevel=3,
        )
    if magnitude is not None and np.asarray(magnitude).shape != field.shape:
        raise ValueError(
            f"magnitude shape {np.asarray(magnitude).shape} differs from {field.shape}"
        )
    return field.astype(np.float32, copy=False), mask


def gradient(x: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Forward differences per mm along each axis, periodic; shape (3, *x.shape), float32."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty((3, *x.shape), dtype=np.float32)
    for axis in range(3):
        g = np.moveaxis(out[axis], axis, 0)
        xa = np.moveaxis(x, axis, 0)
        np.subtract(xa[1:], xa[:-1], out=g[:-1])  # slices, no full-array copies
        np.subtract(xa[:1], xa[-1:], out=g[-1:])  # periodic wrap
        g *= np.float32(1.0 / voxel_size_mm[axis])
    return out


def divergence(g: np.ndarray, voxel_size_mm: Sequence[float]) -> np.ndarray:
    """Backward-difference divergence, the negative adjoint of :func:`gradient`."""
    out = np.zeros(g.shape[1:], dtype=np.float32)
    o = [np.moveaxis(out, axis, 0) for axis in range(3)]
    for axis in range(3):
        ga = np.moveaxis(np.asarray(g[axis], dtype=np.float32), axis, 0)
        inv = np.float32(1.0 / voxel_size_mm[axis])
        oa = o[axis]
        oa[1:] += (ga[1:] - ga[:-1]) * inv
        oa[:1] += (ga[:1] - ga[-1:]) * inv
    return out


def gradient_symbols(
    shape: Sequence[int], voxel_size_mm: Sequence[float], *, real: bool = True
) -> list[np.ndarray]:
    """k-space symbols of :func:`gradient` (complex64, broadcastable; half spectrum if real)."""
    out = []
    for axis, (n, d) in enumerate(zip(shape, voxel_size_mm, strict=True)):
        m = n // 2 + 1 if (real and axis == 2) else n
        k = np.arange(m, dtype=np.float64)
        sym = (np.exp(2j * np.pi * k / n) - 1) / d
        view = [1, 1, 1]
        view[axis] = m
        out.append(sym.astype(np.complex64).reshape(view))
    return out
