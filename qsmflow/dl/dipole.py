"""Dipole forward model and a batched conjugate-gradient solver in PyTorch.

The kernel is the one of :func:`qsmflow.algorithms.dipole.dipole_kernel` (``D(k) = 1/3 -
(k . b)^2 / |k|^2``, ``D(0) = 0``, true voxel sizes, B0 direction ``b`` in voxel coordinates),
evaluated once in numpy and moved to torch, so the two forward models agree to float32
precision. Volumes are zero-padded (centred) to fast real-FFT lengths of the grid chosen by
:func:`qsmflow.algorithms.fft.padded_shape`; ``torch.fft.rfftn`` does the convolution.

The data-consistency problem of the unrolled networks (MoDL, Aggarwal et al., IEEE TMI 2019;
MoDL-QSM, Feng et al., NeuroImage 2021; SpiNet-QSM, Vaddadi et al., MAGMA 2024) is

    min_x ||W (A x - f)||^2 + lambda * R(x),    A = crop . F^-1 D F . pad,

whose normal equations ``(A^H W^2 A + lambda H) x = A^H W^2 f + lambda H z`` are solved by
:func:`conjugate_gradient` (Hestenes & Stiefel, J Res NBS 1952), batched over the first axis and
differentiable by autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..algorithms.dipole import dipole_kernel
from ..algorithms.fft import padded_shape
from ._torch import require_torch

__all__ = ["DipoleOperator", "conjugate_gradient", "kernel_tensor"]


def kernel_tensor(
    shape: Sequence[int], voxel_size_mm: Sequence[float], b0_dir: Sequence[float], *, device=None
):
    """Half-spectrum dipole kernel (float32 tensor, shape ``(x, y, z // 2 + 1)``)."""
    torch = require_torch()
    k = dipole_kernel(tuple(int(n) for n in shape), voxel_size_mm, b0_dir, real=True)
    return torch.from_numpy(np.ascontiguousarray(k)).to(device)


def _pad_widths(shape: Sequence[int], big: Sequence[int]) -> list[int]:
    """``torch.nn.functional.pad`` widths (last axis first) that centre ``shape`` in ``big``."""
    out: list[int] = []
    for n, b in zip(reversed(tuple(shape)), reversed(tuple(big)), strict=True):
        lo = (b - n) // 2
        out += [lo, b - n - lo]
    return out


class DipoleOperator:
    """Batched forward model ``A x = crop(F^-1 D F pad(x))`` with weights ``W`` (ppm -> ppm).

    Parameters
    ----------
    shape : (3,) int
        Spatial grid of the unknown and of the field (voxels).
    kernels : tensor (B, 1, X, Y, Z // 2 + 1) or (X, Y, Z // 2 + 1)
        Dipole kernels on the padded grid ``padded`` (one per batch item, or shared).
    padded : (3,) int
        Padded FFT grid.
    weights : tensor (B, 1, *shape), optional
        Data weights ``W`` (e.g. the mask); 1 when omitted.
    support : tensor (B, 1, *shape), optional
        Support of the susceptibility (0/1, e.g. the brain mask): ``A x = A (M x)``; everywhere
        when omitted.
    """

    def __init__(self, shape, kernels, padded, weights=None, support=None):
        self.shape = tuple(int(n) for n in shape)
        self.padded = tuple(int(n) for n in padded)
        self.kernels = kernels
        self.weights = weights
        self.support = support
        self._pad = _pad_widths(self.shape, self.padded)
        self._crop = tuple(
            slice((b - n) // 2, (b - n) // 2 + n)
            for n, b in zip(self.shape, self.padded, strict=True)
        )

    @classmethod
    def build(
        cls,
        shape: Sequence[int],
        voxel_size_mm: Sequence[float],
        b0_dirs: Sequence[Sequence[float]] | Sequence[float],
        *,
        weights=None,
        support=None,
        pad_factor: float = 1.5,
        device=None,
    ) -> DipoleOperator:
        """Operator for one voxel size and one or several (per batch item) B0 directions."""
        torch = require_torch()
        padded = padded_shape(shape, pad_factor=pad_factor)
        dirs = np.asarray(b0_dirs, dtype=np.float64)
        if dirs.ndim == 1:
            kernels = kernel_tensor(padded, voxel_size_mm, dirs, device=device)
        else:
            kernels = torch.stack(
                [kernel_tensor(padded, voxel_size_mm, d, device=device) for d in dirs]
            )[:, None]
        return cls(shape, kernels, padded, weights, support)

    def convolve(self, x):
        """Dipole convolution of ``x`` (B, C, *shape) on the padded grid, cropped back."""
        torch = require_torch()
        big = torch.nn.functional.pad(x, self._pad)
        spec = torch.fft.rfftn(big, dim=(-3, -2, -1)) * self.kernels
        out = torch.fft.irfftn(spec, s=self.padded, dim=(-3, -2, -1))
        return out[(..., *self._crop)]

    def restrict(self, x):
        """``M x``: zero outside the support."""
        return x if self.support is None else x * self.support

    def forward(self, x):
        """``W A M x``: the weighted field (ppm) of susceptibility ``x`` (ppm)."""
        y = self.convolve(self.restrict(x))
        return y if self.weights is None else y * self.weights

    def adjoint(self, y):
        """``M A^H W y`` (D is real and even, so A^H = A with pad/crop swapped)."""
        return self.restrict(self.convolve(y if self.weights is None else y * self.weights))

    def normal(self, x):
        """``A^H W^2 A x``."""
        return self.adjoint(self.forward(x))


def _dot(a, b):
    return (a * b).flatten(1).sum(dim=1).view(-1, *([1] * (a.dim() - 1)))


def conjugate_gradient(apply_a: Callable, b, x0=None, *, n_iter: int = 10, tol: float = 0.0):
    """Solve ``A x = b`` for a symmetric positive-definite ``A``, batched over axis 0.

    ``apply_a`` maps a tensor shaped like ``b`` to ``A`` applied to it. Plain CG (Hestenes &
    Stiefel 1952) with a fixed number of iterations (differentiable) that stops early only when
    every batch item's relative residual is below ``tol``.
    """
    torch = require_torch()
    x = torch.zeros_like(b) if x0 is None else x0
    r = b - apply_a(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _dot(r, r)
    b2 = _dot(b, b).clamp_min(1e-30)
    for _ in range(n_iter):
        if tol > 0 and bool(torch.all(rs <= (tol * tol) * b2)):
            break
        ap = apply_a(p)
        alpha = rs / _dot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x
