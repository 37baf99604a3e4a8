"""Dipole inversion: from the local field (ppm) to susceptibility (ppm).

Every method takes ``(local_field_ppm, mask, voxel_size_mm, b0_dir, *, ..., n_threads=1)`` and
returns chi in ppm, zero outside the mask. Modules: :mod:`.direct` (TKD, TSVD, Tikhonov).
"""

from .direct import tkd, tkd_inverse_kernel

__all__ = ["tkd", "tkd_inverse_kernel"]
