"""Deep-learning dipole inversions: Deep Image Prior, MoDL-QSM and SpiNet-QSM (need PyTorch).

* :func:`dip` - Deep Image Prior (Ulyanov et al., CVPR 2018) fitted per volume to the local
  field through the dipole model (no training data), with MoDIP's data-fidelity step (Xiong
  et al. 2023).
* :func:`modl` - MoDL-QSM (Feng et al., NeuroImage 2021): unrolled CNN denoiser + CG data
  consistency with a learned lambda.
* :func:`spinet` - SpiNet-QSM (Vaddadi et al., MAGMA 2024): unrolled majorisation-minimisation
  with a learned Schatten p-norm regulariser (0 < p <= 2) and CG per iteration.

``modl`` and ``spinet`` use the weights shipped in ``qsmflow/data/weights`` (trained with
``qsmflow-train`` on simulated heads; provenance in the JSON next to them) unless ``weights``
names another file. The networks live in :mod:`qsmflow.dl`; this module only checks the inputs
and calls them. Install PyTorch with ``pip install 'qsmflow[dl]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._common import check_inversion_inputs
from .ndi import _magnitude_3d

__all__ = ["dip", "modl", "spinet"]


def dip(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    n_iter: int | None = None,
    learning_rate: float = 0.003,
    tv_weight: float = 0.0,
    dc_iter: int = 5,
    dc_lambda: float = 0.02,
    noise_ppm: float | None = None,
    patience: int = 50,
    seed: int = 0,
    device: str = "auto",
    n_threads: int = 1,
) -> np.ndarray:
    """Deep Image Prior QSM: chi (ppm, float32, zero outside ``mask``) from the local field (ppm).

    A 3-D encoder-decoder with a fixed noise input (``seed``) is optimised (Adam,
    ``learning_rate``) so that the dipole field of its output matches the field in the mask,
    weighted by the normalised ``magnitude`` when given, plus ``tv_weight`` times its total
    variation (ppm/mm). The output is refined by ``dc_iter`` conjugate-gradient steps on
    ``||W (A x - f)||^2 + dc_lambda ||x - G(z)||^2`` inside the fit (MoDIP's data-fidelity
    module; 0 = plain DIP). Early stopping: ``n_iter`` iterations (default 300 on CPU, 2000 on GPU),
    the residual reaching ``noise_ppm`` (field noise SD, if known), or ``patience`` iterations
    without improvement. ``device``: 'auto' (CUDA when available), 'cpu' or 'cuda'.
    """
    from ...dl.inference import dip_inversion

    # a 4-D (x, y, z, echo) magnitude is combined by root-sum-of-squares, as in TV/MEDI/NDI
    magnitude = _magnitude_3d(magnitude, np.shape(local_field_ppm))
    field, mask = check_inversion_inputs(
        local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude=magnitude
    )
    return dip_inversion(
        field, mask, voxel_size_mm, b0_dir, magnitude=magnitude, n_iter=n_iter,
        learning_rate=learning_rate, tv_weight=tv_weight, dc_iter=dc_iter, dc_lambda=dc_lambda,
        noise_ppm=noise_ppm,
        patience=patience, seed=seed, device=device, n_threads=n_threads,
    )  # fmt: skip


def _unrolled(kind, local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude, weights, device,
              n_threads):  # fmt: skip
    from ...dl.inference import unrolled_inversion

    magnitude = _magnitude_3d(magnitude, np.shape(local_field_ppm))
    field, mask = check_inversion_inputs(
        local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude=magnitude
    )
    return unrolled_inversion(
        kind, field, mask, voxel_size_mm, b0_dir, weights=weights, device=device,
        n_threads=n_threads,
    )  # fmt: skip


def modl(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    n_threads: int = 1,
) -> np.ndarray:
    """MoDL-QSM (Feng et al., NeuroImage 2021): chi (ppm, float32, zero outside ``mask``).

    Runs the trained network (``weights``: a ``qsmflow-train`` output, default the shipped
    weights) on the mask's bounding box at any voxel size and B0 direction. ``magnitude`` is
    checked but not used: the network was trained with the mask as the data weight.
    """
    return _unrolled(
        "modl", local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude, weights, device, n_threads
    )


def spinet(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    voxel_size_mm: Sequence[float],
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    magnitude: np.ndarray | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    n_threads: int = 1,
) -> np.ndarray:
    """SpiNet-QSM (Vaddadi et al., MAGMA 2024): chi (ppm, float32, zero outside ``mask``).

    Runs the trained network (learned Schatten p and lambda; ``weights`` as in :func:`modl`)
    on the mask's bounding box at any voxel size and B0 direction. ``magnitude`` is checked but
    not used (trained with the mask as the data weight).
    """
    return _unrolled(
        "spinet", local_field_ppm, mask, voxel_size_mm, b0_dir, magnitude, weights, device,
        n_threads,
    )  # fmt: skip
