"""Input checks shared by the background-removal methods."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_inputs(
    field: np.ndarray, mask: np.ndarray, voxel_size_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a total field and its mask; return them as float32 and bool arrays.

    Raises ``ValueError`` for non-3-D fields, shape mismatches, bad voxel sizes, empty or
    all-true masks, masks touching the border of the volume, and NaN/Inf inside the mask, each
    with a message that says what to fix.
    """
    field = np.asarray(field)
    mask = np.asarray(mask)
    if field.ndim != 3:
        raise ValueError(f"field must be a 3-D array, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask shape {mask.shape} differs from field shape {field.shape}")
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vox.size != 3 or not np.all(np.isfinite(vox)) or np.any(vox <= 0):
        raise ValueError(f"voxel_size_mm must be 3 positive sizes, got {voxel_size_mm!r}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("the mask is empty; check the brain-masking step or the mask file")
    if mask.all():
        raise ValueError(
            "the mask covers the whole volume; background removal needs a brain mask with "
            "background around it"
        )
    faces = (mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1])
    if any(f.any() for f in faces):
        raise ValueError(
            "the mask touches the border of the volume; pad the images or erode the mask so "
            "the brain does not reach the edge of the field of view"
        )
    if not np.all(np.isfinite(field[mask])):
        raise ValueError("the field contains NaN or Inf inside the mask; check the field map")
    return field.astype(np.float32, copy=False), mask
