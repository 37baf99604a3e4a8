"""Whole-volume inference of the deep-learning inversions (any matrix, voxel size, B0 direction).

The volume is cropped to the mask's bounding box (plus a margin), resampled when its voxel size
is far from the sizes the networks were trained on, and inverted on that grid with the dipole
kernel of the true voxel size and B0 direction (the FFT grid is padded to fast lengths inside
:class:`qsmflow.dl.dipole.DipoleOperator`); the result is put back on the input grid, float32,
zero outside the mask. Weights are read from ``qsmflow/data/weights/<kind>.pt`` (or a given
file) with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from ._torch import require_torch

__all__ = [
    "apply_unrolled",
    "dip_inversion",
    "load_weights",
    "shipped_weights",
    "unrolled_inversion",
    "voxel_size_for_network",
]

#: the network sees voxel sizes within [range / FAR, range * FAR] as they are; outside, the
#: volume is resampled to the nearest size of the training range
FAR = 1.5


def shipped_weights(kind: str) -> tuple[Path, Path]:
    """Paths of the packaged weights ``<kind>.pt`` and their provenance ``<kind>.json``."""
    base = Path(str(importlib.resources.files("qsmflow") / "data" / "weights"))
    return base / f"{kind}.pt", base / f"{kind}.json"


def load_weights(kind: str, path: str | Path | None = None, *, device=None):
    """The trained network ``kind`` ('modl' or 'spinet') in eval mode, and its provenance dict.

    ``path`` defaults to the weights shipped in the package.
    """
    torch = require_torch(kind)
    from .models import build_model

    meta: dict = {}
    if path is None:
        path, meta_path = shipped_weights(kind)
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"weights for method {kind!r} not found at {path}; train them with "
            f"'qsmflow-train {kind} OUT_DIR' and pass weights='OUT_DIR/{kind}.pt'"
        )
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("model") != kind:
        found = ck.get("model") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path}: holds weights for {found!r}, expected {kind!r}")
    model = build_model(kind, ck["config"])
    model.load_state_dict(ck["state_dict"])
    return model.to(device).eval(), meta


def voxel_size_for_network(
    voxel_size_mm: Sequence[float], trained_range_mm: tuple[float, float]
) -> tuple[float, ...] | None:
    """Voxel size to resample to, or None when ``voxel_size_mm`` is near the trained range."""
    lo, hi = trained_range_mm
    vox = np.asarray(voxel_size_mm, dtype=np.float64)
    if np.all(vox >= lo / FAR) and np.all(vox <= hi * FAR):
        return None
    return tuple(float(v) for v in np.clip(vox, lo, hi))


def _box(mask: np.ndarray, margin: int, multiple: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin``; sizes rounded up to ``multiple`` (may
    extend past the array, which :func:`_extract` pads with zeros)."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0) - margin, idx.max(0) + 1 + margin
    out = []
    for a, b in zip(lo, hi, strict=True):
        size = int(-(-(b - a) // multiple) * multiple)
        start = int(a - (size - (b - a)) // 2)
        out.append(slice(start, start + size))
    return tuple(out)


def _extract(arr: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    out = np.zeros([s.stop - s.start for s in box], dtype=arr.dtype)
    src = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, arr.shape, strict=True))
    dst = tuple(slice(a.start - s.start, a.stop - s.start) for a, s in zip(src, box, strict=True))
    out[dst] = arr[src]
    return out


def _insert(small: np.ndarray, box: tuple[slice, ...], shape: Sequence[int]) -> np.ndarray:
    out = np.zeros(tuple(shape), dtype=np.float32)
    src = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, shape, strict=True))
    dst = tuple(slice(a.start - s.start, a.stop - s.start) for a, s in zip(src, box, strict=True))
    out[src] = small[dst]
    return out


class _Grid:
    """Crop (and resample) a volume for a network, and put results back."""

    def __init__(self, mask, voxel_size_mm, *, margin=4, multiple=1, trained_range_mm=None):
        self.shape = mask.shape
        self.vox = tuple(float(v) for v in voxel_size_mm)
        target = voxel_size_for_network(self.vox, trained_range_mm) if trained_range_mm else None
        self.box = _box(mask, margin, 1 if target else multiple)
        self.crop_shape = tuple(s.stop - s.start for s in self.box)
        self.net_vox = self.vox if target is None else target
        if target is None:
            self.net_shape = self.crop_shape
        else:
            n = [
                max(8, round(c * v / t))
                for c, v, t in zip(self.crop_shape, self.vox, target, strict=True)
            ]
            self.net_shape = tuple(int(-(-k // multiple) * multiple) for k in n)
            # the exact spacing that maps the crop onto net_shape
            self.net_vox = tuple(
                c * v / k for c, v, k in zip(self.crop_shape, self.vox, self.net_shape, strict=True)
            )
        self.mask = self.to_net(mask.astype(np.float32)) > 0.5

    def to_net(self, arr: np.ndarray) -> np.ndarray:
        small = _extract(np.asarray(arr, dtype=np.float32), self.box)
        if self.net_shape == self.crop_shape:
            return small
        zoom = [k / c for k, c in zip(self.net_shape, self.crop_shape, strict=True)]
        return ndimage.zoom(small, zoom, order=1, grid_mode=True, mode="grid-constant")

    def from_net(self, arr: np.ndarray) -> np.ndarray:
        if self.net_shape != self.crop_shape:
            zoom = [c / k for k, c in zip(self.net_shape, self.crop_shape, strict=True)]
            arr = ndimage.zoom(arr, zoom, order=1, grid_mode=True, mode="grid-constant")
        return _insert(arr.astype(np.float32), self.box, self.shape)


@contextlib.contextmanager
def _threads(torch, n_threads: int):
    """Run with ``torch.set_num_threads(n_threads)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n_threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(torch, device: str):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _trained_range(meta: dict) -> tuple[float, float]:
    sizes = np.asarray(meta.get("data", {}).get("voxel_sizes_mm", [[1.0], [2.5]]), dtype=float)
    return float(sizes.min()), float(sizes.max())


def unrolled_inversion(
    kind: str,
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float],
    *,
    weights: str | Path | None = None,
    pad_factor: float = 1.5,
    device: str = "auto",
    n_threads: int = 1,
) -> np.ndarray:
    """Run a trained MoDL-QSM / SpiNet-QSM network on a whole volume; chi in ppm (float32)."""
    torch = require_torch(kind)
    dev = _device(torch, device)
    with _threads(torch, n_threads):
        model, meta = load_weights(kind, weights, device=dev)
        return apply_unrolled(
            model, local_field_ppm, mask, voxel_size_mm, b0_dir,
            trained_range_mm=_trained_range(meta), pad_factor=pad_factor, device=dev,
        )  # fmt: skip


def apply_unrolled(
    model,
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float],
    *,
    trained_range_mm: tuple[float, float] | None = None,
    pad_factor: float = 1.5,
    device="cpu",
) -> np.ndarray:
    """chi (ppm) of an unrolled ``model`` (on ``device``) applied to a whole volume.

    The volume is cropped to the mask (and resampled when its voxel size is far outside
    ``trained_range_mm``); torch's current thread count is used.
    """
    torch = require_torch()
    from .dipole import DipoleOperator

    grid = _Grid(mask, voxel_size_mm, trained_range_mm=trained_range_mm)
    m = torch.from_numpy(grid.mask.astype(np.float32))[None, None].to(device)
    f = torch.from_numpy(grid.to_net(local_field_ppm))[None, None].to(device) * m
    op = DipoleOperator.build(
        grid.net_shape, grid.net_vox, b0_dir, weights=m, support=m, pad_factor=pad_factor,
        device=device,
    )  # fmt: skip
    with torch.inference_mode():
        chi = model(f, op)[0, 0].cpu().numpy()
    out = grid.from_net(chi)
    return np.where(mask, out, np.float32(0)).astype(np.float32)


def _tv(x, voxel_size_mm):
    """Anisotropic total variation (mean |forward difference| per mm) of (1, 1, X, Y, Z)."""
    total = 0
    for axis, d in zip((2, 3, 4), voxel_size_mm, strict=True):
        total = total + x.diff(dim=axis).abs().mean() / d
    return total


def dip_inversion(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float],
    *,
    magnitude: np.ndarray | None = None,
    n_iter: int | None = None,
    learning_rate: float = 0.003,
    tv_weight: float = 0.0,
    dc_iter: int = 5,
    dc_lambda: float = 0.02,
    noise_ppm: float | None = None,
    patience: int = 50,
    ema: float = 0.9,
    seed: int = 0,
    pad_factor: float = 1.5,
    device: str = "auto",
    n_threads: int = 1,
) -> np.ndarray:
    """Deep Image Prior dipole inversion; chi in ppm (float32), zero outside the mask.

    Fits a randomly initialised :class:`qsmflow.dl.models.DIPGenerator` (fixed noise input,
    ``seed``) with Adam so that ``||W (A x - f)||^2 / ||W f||^2 + tv_weight * TV(x)`` is minimal
    (W: the mask, times the normalised magnitude when given; TV in ppm/mm). ``x`` is the
    generator's output ``g`` refined by ``dc_iter`` conjugate-gradient steps (started at ``g``,
    differentiated through) on ``||W (A x - f)||^2 + dc_lambda ||x - g||^2``, the
    data-fidelity module of MoDIP (Xiong et al., 2023): the well-conditioned part of chi
    then comes from the data within a few iterations and the network supplies what the dipole
    kernel's cone does not determine. ``dc_iter=0`` is the plain DIP of Ulyanov et al. (CVPR
    2018), ``x = g``. Stops after ``n_iter`` iterations (default 300 on CPU, 2000 on GPU), when
    the weighted residual RMS reaches ``noise_ppm`` (the discrepancy principle), or when the
    loss has not improved for ``patience`` iterations; returns the exponential moving average
    (``ema``) of ``x``.
    """
    torch = require_torch("dip")
    from .dipole import DipoleOperator, conjugate_gradient
    from .models import DIPGenerator

    dev = _device(torch, device)
    if n_iter is None:
        n_iter = 2000 if dev.startswith("cuda") else 300
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    if dc_iter < 0 or dc_lambda <= 0:
        raise ValueError(f"need dc_iter >= 0 and dc_lambda > 0, got {dc_iter}, {dc_lambda}")
    grid = _Grid(mask, voxel_size_mm, margin=4, multiple=4)
    w = grid.mask.astype(np.float32)
    if magnitude is not None:
        mag = grid.to_net(np.asarray(magnitude, dtype=np.float32))
        scale = float(np.mean(mag[grid.mask])) or 1.0
        w = w * np.clip(mag / scale, 0.0, 3.0)
    with _threads(torch, n_threads):
        gen = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        net = DIPGenerator().to(dev)
        z = (0.1 * torch.rand((1, net.in_channels, *grid.net_shape), generator=gen)).to(dev)
        m = torch.from_numpy(grid.mask.astype(np.float32))[None, None].to(dev)
        wt = torch.from_numpy(w)[None, None].to(dev)
        f = torch.from_numpy(grid.to_net(local_field_ppm))[None, None].to(dev) * wt
        op = DipoleOperator.build(
            grid.net_shape, grid.net_vox, b0_dir, weights=wt, support=m, pad_factor=pad_factor,
            device=dev,
        )  # fmt: skip
        norm = f.pow(2).sum().clamp_min(1e-20)
        n_in = m.sum()
        opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
        avg, best, since = None, float("inf"), 0
        b = op.adjoint(f)

        def data_fidelity(g):
            return conjugate_gradient(
                lambda v: op.normal(v) + dc_lambda * op.restrict(v), b + dc_lambda * g, g,
                n_iter=dc_iter,
            )  # fmt: skip

        for _ in range(n_iter):
            x = net(z) * m
            if dc_iter:
                x = data_fidelity(x)
            resid = op.forward(x) - f
            loss = resid.pow(2).sum() / norm
            if tv_weight > 0:
                loss = loss + tv_weight * _tv(x, grid.net_vox)
            opt.zero_grad()
            loss.backward()
            opt.step()
            x = x.detach()
            avg = x if avg is None else ema * avg + (1 - ema) * x
            value = loss.item()
            if value < best * (1 - 1e-3):
                best, since = value, 0
            else:
                since += 1
            rms = float(torch.sqrt(resid.detach().pow(2).sum() / n_in))
            if (noise_ppm is not None and rms <= noise_ppm) or since >= patience:
                break
        chi = avg[0, 0].cpu().numpy()
    out = grid.from_net(chi)
    return np.where(mask, out, np.float32(0)).astype(np.float32)
