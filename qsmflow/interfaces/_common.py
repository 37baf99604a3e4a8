"""Helpers shared by qsmflow's Nipype interfaces (file naming, common traits)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, isdefined, traits

from ..io.nifti import b0_direction_from_affine, load_nifti


class ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(
        1, usedefault=True, nohash=True, desc="threads for FFTs and compiled loops (Nipype n_procs)"
    )


def output_path(cwd: str | os.PathLike, source: str | os.PathLike, suffix: str) -> str:
    """``<cwd>/<source stem>_<suffix>.nii.gz`` (the stem drops .nii/.nii.gz)."""
    name = Path(source).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return str(Path(cwd) / f"{name}_{suffix}.nii.gz")


def first_file(value) -> str:
    return value[0] if isinstance(value, list | tuple) else value


def b0_direction(inputs, affine: np.ndarray) -> np.ndarray:
    """B0 direction in voxel coordinates: the ``b0_direction`` input if set, else the affine's."""
    if isdefined(getattr(inputs, "b0_direction", traits.Undefined)):
        b = np.asarray(inputs.b0_direction, dtype=np.float64)
        return b / np.linalg.norm(b)
    return b0_direction_from_affine(affine)


def field_to_ppm(field: np.ndarray, units: str, b0_tesla, name: str = "in_field") -> np.ndarray:
    """Convert a field map in ``units`` ('ppm' or 'Hz') to ppm; Hz needs ``b0_tesla``."""
    from .. import GAMMA_BAR_MHZ_PER_T

    if units == "ppm":
        return field
    if not isdefined(b0_tesla) or b0_tesla is None or b0_tesla <= 0:
        raise ValueError(f"{name} is in Hz: set b0_tesla (Tesla) to convert it to ppm")
    return field / np.float32(GAMMA_BAR_MHZ_PER_T * b0_tesla)


def load_field_and_mask(field_file: str, mask_file: str):
    """Load a field map and its mask; the error names both files when the grids differ."""
    field, img = load_nifti(field_file)
    mask, mask_img = load_nifti(mask_file, dtype=bool)
    if field.shape != mask.shape:
        raise ValueError(
            f"{mask_file}: mask shape {mask.shape} differs from field {field_file} shape "
            f"{field.shape}"
        )
    if not np.allclose(mask_img.affine, img.affine, atol=1e-3):
        raise ValueError(
            f"{mask_file}: mask affine differs from the affine of {field_file}; the mask must be "
            "on the field's grid (resample it, e.g. with nearest neighbour, first)"
        )
    return field, mask, img
