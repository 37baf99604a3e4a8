"""NIfTI loading and saving, voxel geometry and the B0 direction.

Writes are atomic (temporary file in the target folder, then ``os.replace``) so an interrupted
run never leaves a half-written image behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "voxel_sizes",
    "b0_direction_from_affine",
    "load_nifti",
    "load_echoes",
    "save_nifti",
    "read_json",
    "write_json",
    "atomic_path",
]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm: the column norms of the affine's 3x3 part."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def b0_direction_from_affine(
    affine: np.ndarray, b0_world: Sequence[float] = (0.0, 0.0, 1.0)
) -> np.ndarray:
    """Unit B0 direction in voxel (array) coordinates from a NIfTI affine.

    The world frame of a scanner-written NIfTI is the scanner's patient frame, whose z axis is the
    bore, so ``b0_world`` defaults to ``(0, 0, 1)``. With ``R = A[:3, :3] / voxel_sizes`` mapping
    unit array steps to world directions, the B0 direction along the array axes is
    ``inv(R) @ b0_world``, normalised. Works for oblique and rotated (and even sheared) affines.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape not in ((4, 4), (3, 3)):
        raise ValueError(f"affine must be 4x4 or 3x3, got shape {a.shape}")
    vox = voxel_sizes(a)
    if not np.all(vox > 1e-9):
        raise ValueError(f"affine is singular (voxel sizes {vox}); cannot derive the B0 direction")
    rot = a[:3, :3] / vox
    if abs(np.linalg.det(rot)) < 1e-6:
        raise ValueError("affine is singular; cannot derive the B0 direction")
    b = np.linalg.solve(rot, np.asarray(b0_world, dtype=np.float64))
    return b / np.linalg.norm(b)


def load_nifti(
    path: str | os.PathLike, *, dtype: Any = np.float32
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI image as an array of ``dtype`` (scaling applied) plus the image (for header).

    Raises a ``ValueError`` naming the file when it cannot be read as NIfTI.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64 if dtype is bool else None)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ValueError(
            f"{path}: cannot read as NIfTI ({exc}); expected a .nii or .nii.gz image"
        ) from exc
    if dtype is bool:
        return data > 0.5, img
    return np.asarray(data, dtype=dtype), img


def load_echoes(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    what: str = "image",
    allow_nan: bool = False,
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load multi-echo data as one float32 (x, y, z, echo) array plus the first image.

    ``paths`` is one 4-D file (echoes along the 4th axis), one 3-D file (a single echo) or a
    list of 3-D files, one per echo. Shapes and affines must agree across files; NaN/Inf are
    rejected unless ``allow_nan``. Errors name the offending file and say what was expected.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"no {what} files given")
    arrays, first = [], None
    for path in paths:
        data, img = load_nifti(path)
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4:
            raise ValueError(
                f"{path}: expected a 3-D image or a 4-D stack of echoes, got shape {data.shape}"
            )
        if first is None:
            first = img
        else:
            if data.shape[:3] != first.shape[:3]:
                raise ValueError(
                    f"{path}: shape {data.shape[:3]} differs from {paths[0]} {first.shape[:3]}; "
                    f"all {what} echoes must share one grid"
                )
            if not np.allclose(img.affine, first.affine, atol=1e-4):
                raise ValueError(
                    f"{path}: affine differs from {paths[0]}; all {what} echoes must share one "
                    "voxel-to-world transform"
                )
        if not allow_nan and not np.all(np.isfinite(data)):
            raise ValueError(f"{path}: {what} contains NaN or Inf values; fix or mask them first")
        arrays.append(data)
    assert first is not None
    return np.concatenate(arrays, axis=3), first


class atomic_path:
    """Context manager yielding a temporary path that replaces ``path`` only on success."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(self.path.suffixes)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is None:
            # mkstemp creates the file 0600; give it the mode a plain open() would (0666 less
            # the umask) so other users (and containers running as another uid) can read it
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    header: nib.Nifti1Header | None = None,
    xyzt_units: tuple[str, str] = ("mm", "sec"),
) -> Path:
    """Write ``data`` as a NIfTI-1 image atomically; bool arrays are stored as uint8.

    The qform and sform are both set to ``affine`` (code 1, scanner), as scanners write them.
    """
    arr = np.asarray(data)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=hdr)
    img.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units(*xyzt_units)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON sidecar; the error names the file and the problem."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc


def write_json(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)
