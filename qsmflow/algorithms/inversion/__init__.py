"""Dipole inversion: from the local field (ppm) to susceptibility (ppm).

Every method takes ``(local_field_ppm, mask, voxel_size_mm, b0_dir, *, ..., n_threads=1)`` and
returns chi in ppm, zero outside the mask. Modules: :mod:`.direct` (TKD, TSVD, Tikhonov),
:mod:`.ilsqr`, :mod:`.star` (star-QSM), :mod:`.medi` (MEDI, MEDI+0), :mod:`.ndi`, :mod:`.tgv`,
:mod:`.tv` (TV-ADMM / FANSI), :mod:`.rts`, :mod:`.deep` (DIP, MoDL-QSM, SpiNet-QSM;
need PyTorch); lambda rules: :mod:`qsmflow.algorithms.regularization`.
"""

from ..regularization import discrepancy_lambda, lcurve_corner, lcurve_inflection, tikhonov_norms
from .deep import dip, modl, spinet
from .direct import (
    TIKHONOV_LAMBDA,
    tikhonov,
    tikhonov_filter,
    tikhonov_lambda,
    tkd,
    tkd_inverse_kernel,
    tsvd,
    tsvd_inverse_kernel,
)
from .ilsqr import ILSQRSteps, ilsqr, ilsqr_steps, lsqr
from .medi import estimate_csf_mask, medi, medi_edge_mask, medi_plus_zero
from .ndi import ndi, phase_scale_rad_per_ppm
from .rts import rts
from .star import star_qsm
from .tgv import TGV_ALPHA_PPM, TGV_ALPHA_RAD, tgv, tgv_alpha_for_phase
from .tv import tv_admm, tv_lambda_lcurve

__all__ = [
    "ILSQRSteps",
    "TGV_ALPHA_PPM",
    "TGV_ALPHA_RAD",
    "TIKHONOV_LAMBDA",
    "discrepancy_lambda",
    "dip",
    "estimate_csf_mask",
    "ilsqr",
    "ilsqr_steps",
    "lcurve_corner",
    "lcurve_inflection",
    "lsqr",
    "medi",
    "medi_edge_mask",
    "medi_plus_zero",
    "modl",
    "ndi",
    "phase_scale_rad_per_ppm",
    "rts",
    "spinet",
    "star_qsm",
    "tgv",
    "tgv_alpha_for_phase",
    "tikhonov",
    "tikhonov_filter",
    "tikhonov_lambda",
    "tikhonov_norms",
    "tkd",
    "tkd_inverse_kernel",
    "tsvd",
    "tv_admm",
    "tv_lambda_lcurve",
    "tsvd_inverse_kernel",
]
