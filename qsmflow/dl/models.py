"""Networks: DIP generator, MoDL-QSM and SpiNet-QSM (PyTorch; importing this module needs torch).

* :class:`DIPGenerator` - Deep Image Prior (Ulyanov et al., CVPR 2018) for dipole inversion:
  a small 3-D encoder-decoder with skip connections mapping a fixed noise input to chi; its
  weights are fitted per volume to the measured field, by default through a data-fidelity
  step as in MoDIP (Xiong et al., 2023) (see :func:`.inference.dip_inversion`).
* :class:`MoDLQSM` - Feng et al., NeuroImage 2021 (after MoDL, Aggarwal et al., IEEE TMI 2019):
  K unrolled iterations ``z_k = R_w(x_k)``, ``x_{k+1} = argmin ||W(A x - f)||^2 + lambda ||x -
  z_k||^2`` with one residual CNN ``R_w`` shared by all iterations, a learnable ``lambda`` and
  a conjugate-gradient data-consistency step.
* :class:`SpiNetQSM` - Vaddadi et al., MAGMA 2024 (after SpiNet, Rastogi & Yalavarthy, Med
  Phys 2021): ``min ||W(A x - f)||^2 + lambda ||N_w(x)||_Sp^p`` with the noise estimate
  ``N_w(x) = x - R_w(x)`` and a learnable Schatten p-norm, 0 < p <= 2 (each axial slice a
  matrix). Majorisation-minimisation: at ``x_k`` the p-norm is bounded by the quadratic
  ``(p / 2) tr((X - Z_k) H_k (X - Z_k)^T)`` with ``H_k = (N_k^T N_k + eps I)^((p - 2) / 2)``,
  ``Z_k = R_w(x_k)``; the bound is minimised by CG. ``p`` and ``lambda`` are learned.

Susceptibility enters and leaves the networks in ppm; the CNNs see ``chi * CHI_SCALE``.
"""

from __future__ import annotations

import math

from ._torch import require_torch
from .dipole import DipoleOperator, conjugate_gradient

torch = require_torch()
nn = torch.nn

__all__ = ["CHI_SCALE", "DIPGenerator", "MoDLQSM", "ResidualDenoiser", "SpiNetQSM", "build_model"]

#: ppm -> network units (brain chi spans about +-0.1 ppm)
CHI_SCALE = 10.0


class ResidualDenoiser(nn.Module):
    """``R(x) = x + CNN(x)``: ``layers`` 3x3x3 convolutions with ``channels`` features, ReLU.

    The last convolution starts at zero, so an untrained network is the identity.
    """

    def __init__(self, channels: int = 16, layers: int = 5):
        super().__init__()
        if layers < 2:
            raise ValueError(f"layers must be >= 2, got {layers}")
        mods: list = [nn.Conv3d(1, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(layers - 2):
            mods += [nn.Conv3d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        last = nn.Conv3d(channels, 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        mods.append(last)
        # channels-last weights make oneDNN run the 3-D convolutions without layout reorders
        # (about 10x faster on CPU); loaded state dicts keep this layout
        self.net = nn.Sequential(*mods).to(memory_format=torch.channels_last_3d)

    def forward(self, x):
        y = self.net((x * CHI_SCALE).contiguous(memory_format=torch.channels_last_3d))
        return x + y.contiguous() / CHI_SCALE


class _Unrolled(nn.Module):
    """Common parts of the unrolled networks: denoiser, lambda, the first DC solve."""

    def __init__(self, channels: int, layers: int, iterations: int, cg_iter: int, lam: float):
        super().__init__()
        self.config = {
            "channels": int(channels),
            "layers": int(layers),
            "iterations": int(iterations),
            "cg_iter": int(cg_iter),
            "lam": float(lam),
        }
        self.denoiser = ResidualDenoiser(channels, layers)
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam), dtype=torch.float32))
        self.iterations = int(iterations)
        self.cg_iter = int(cg_iter)

    @property
    def lam(self):
        return torch.exp(self.log_lam)

    def start(self, field, op: DipoleOperator):
        """``b = A^H W f`` and the Tikhonov start ``(A^H W^2 A + lambda I)^-1 b``."""
        b = op.adjoint(field)
        lam = self.lam

        def apply(v):
            return op.normal(v) + lam * op.restrict(v)

        return b, conjugate_gradient(apply, b, n_iter=self.cg_iter)


class MoDLQSM(_Unrolled):
    """MoDL-QSM (Feng et al., NeuroImage 2021): chi (ppm) from a weighted local field (ppm)."""

    kind = "modl"

    def __init__(
        self, channels: int = 16, layers: int = 5, iterations: int = 4, cg_iter: int = 8,
        lam: float = 0.05,
    ):  # fmt: skip
        super().__init__(channels, layers, iterations, cg_iter, lam)

    def forward(self, field, op: DipoleOperator):
        """``field`` (B, 1, *shape) ppm, already weighted by ``W``; returns chi (ppm)."""
        b, x = self.start(field, op)
        lam = self.lam

        def apply(v):
            return op.normal(v) + lam * op.restrict(v)

        for _ in range(self.iterations):
            z = op.restrict(self.denoiser(x))
            x = conjugate_gradient(apply, b + lam * z, x, n_iter=self.cg_iter)
        return x


def schatten_weights(noise, p, eps_rel: float = 1e-2):
    """MM weights ``H = (N^T N + eps I)^((p - 2) / 2)`` per axial slice (B, Z, Y, Y).

    ``noise`` is (B, 1, X, Y, Z) in network units. The eigen-decomposition is taken without
    gradient (stable training); the gradient reaches ``p`` through the eigenvalue powers.
    """
    mats = noise[:, 0].permute(0, 3, 1, 2)  # (B, Z, X, Y): one X-by-Y matrix per slice
    with torch.no_grad():
        gram = mats.transpose(-1, -2) @ mats
        s, v = torch.linalg.eigh(gram.double())
        s = s.clamp_min(0)
        eps = eps_rel * s.mean(dim=(-1, -2), keepdim=True).clamp_min(1e-12) + 1e-8
        s = (s + eps).float()
        v = v.float()
    power = s ** ((p - 2) / 2)
    # normalise so the mean weight is one: lambda keeps its meaning whatever the noise level
    power = power / power.mean(dim=(-1, -2), keepdim=True).detach()
    return (v * power[..., None, :]) @ v.transpose(-1, -2)


def apply_slice_weights(x, h):
    """``X H`` for each axial slice matrix of ``x`` (B, 1, X, Y, Z)."""
    mats = x[:, 0].permute(0, 3, 1, 2)
    return (mats @ h).permute(0, 2, 3, 1)[:, None]


class SpiNetQSM(_Unrolled):
    """SpiNet-QSM (Vaddadi et al., MAGMA 2024): learnable Schatten p-norm (0 < p <= 2)."""

    kind = "spinet"

    def __init__(
        self, channels: int = 16, layers: int = 5, iterations: int = 4, cg_iter: int = 8,
        lam: float = 0.05, p: float = 1.0,
    ):  # fmt: skip
        super().__init__(channels, layers, iterations, cg_iter, lam)
        if not 0 < p <= 2:
            raise ValueError(f"p must be in (0, 2], got {p}")
        self.config["p"] = float(p)
        # p = 2 sigmoid(theta) keeps 0 < p < 2 (p = 2 is the limit, the MoDL quadratic)
        q = min(p / 2, 1 - 1e-4)
        self.p_logit = nn.Parameter(torch.tensor(math.log(q / (1 - q)), dtype=torch.float32))

    @property
    def p(self):
        return 2 * torch.sigmoid(self.p_logit)

    def forward(self, field, op: DipoleOperator):
        """``field`` (B, 1, *shape) ppm, already weighted by ``W``; returns chi (ppm)."""
        b, x = self.start(field, op)
        lam, p = self.lam, self.p
        for _ in range(self.iterations):
            z = op.restrict(self.denoiser(x))
            h = schatten_weights((x - z) * CHI_SCALE, p)
            scale = lam * p / 2

            def apply(v, h=h, scale=scale):
                return op.normal(v) + scale * op.restrict(apply_slice_weights(op.restrict(v), h))

            rhs = b + scale * op.restrict(apply_slice_weights(z, h))
            x = conjugate_gradient(apply, rhs, x, n_iter=self.cg_iter)
        return x


class DIPGenerator(nn.Module):
    """Deep Image Prior generator: 3-D encoder-decoder with skips -> chi (ppm).

    The noise input (1, ``in_channels``, X, Y, Z), fixed during the fit, goes through one
    full-resolution block, is encoded at half and quarter resolution (convolution, batch norm,
    leaky ReLU, as in Ulyanov et al.) and decoded with skip connections back to full
    resolution; a 1x1x1 convolution gives chi. Only the narrow ``channels[0]`` layers run on the
    full grid, which keeps a fit affordable on a CPU while the output can still follow
    voxel-scale detail. X, Y, Z: multiples of 4.
    """

    def __init__(self, in_channels: int = 4, channels: tuple[int, int, int] = (8, 16, 16)):
        super().__init__()
        c0, c1, c2 = channels
        self.in_channels = int(in_channels)

        def block(cin, cout, stride=1):
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
                nn.BatchNorm3d(cout),
                nn.LeakyReLU(0.2, True),
            )

        self.enc0 = block(in_channels, c0)
        self.enc1 = nn.Sequential(block(c0, c1, 2), block(c1, c1))
        self.enc2 = nn.Sequential(block(c1, c2, 2), block(c2, c2))
        self.dec1 = block(c2 + c1, c1)
        self.dec0 = block(c1 + c0, c0)
        self.out = nn.Conv3d(c0, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.to(memory_format=torch.channels_last_3d)  # fast oneDNN convolutions on CPU

    def forward(self, z):
        z = z.contiguous(memory_format=torch.channels_last_3d)
        e0 = self.enc0(z)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        d1 = self.dec1(torch.cat([self.up(e2), e1], dim=1))
        d0 = self.dec0(torch.cat([self.up(d1), e0], dim=1))
        return self.out(d0) / CHI_SCALE


def build_model(kind: str, config: dict):
    """A MoDL-QSM (``kind='modl'``) or SpiNet-QSM (``'spinet'``) network from its config."""
    if kind == "modl":
        cfg = {k: v for k, v in config.items() if k != "p"}
        return MoDLQSM(**cfg)
    if kind == "spinet":
        return SpiNetQSM(**config)
    raise ValueError(f"unknown model kind {kind!r}: expected 'modl' or 'spinet'")
