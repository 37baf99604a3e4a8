"""Susceptibility referencing: QSM gives chi up to a constant; fix it by a reference region.

The local field carries no information about the mean susceptibility (the dipole kernel is zero
at k = 0), so every inversion returns chi relative to an arbitrary offset. Referencing subtracts
the mean of chi over a region assumed to have a known (zero) susceptibility: the whole brain
(:func:`reference_to_mean`), chosen segmentation labels (:func:`reference_to_labels`) or
cerebrospinal fluid (:func:`reference_to_csf`, the usual choice, e.g. Straub et al., Magn Reson
Med 2017;78:204-214; Liu Z et al., "MEDI+0", Magn Reson Med 2018;79:2795-2803).

:func:`reference_to_labels` and :func:`reference_to_csf` also return a metadata dictionary for
the output's JSON sidecar::

    {"Reference": "<what the region is>", "ReferenceValuePpm": <subtracted mean, ppm>,
     "ReferenceVoxels": <number of voxels averaged>}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .masking import erode_mm, otsu_threshold

__all__ = [
    "reference_to_mean",
    "reference_to_labels",
    "reference_to_csf",
    "estimate_csf_region",
    "CSF_R2STAR_THRESHOLD_HZ",
]

#: R2* below which a voxel counts as CSF (MEDI+0, Liu Z et al. 2018: 5 s^-1 at 3 T). Tissue
#: R2* at 3 T is ~15-25 Hz (grey/white matter) and higher in iron-rich nuclei and veins.
CSF_R2STAR_THRESHOLD_HZ = 5.0


def reference_to_mean(
    chi_ppm: np.ndarray, mask: np.ndarray, *, region: np.ndarray | None = None
) -> np.ndarray:
    """Subtract the mean susceptibility of a reference region.

    Parameters
    ----------
    chi_ppm : (x, y, z) array
        Susceptibility in ppm.
    mask : (x, y, z) bool array
        Brain mask; the output is zero outside it.
    region : (x, y, z) bool array, optional
        Reference region (e.g. CSF); default ``mask`` (the whole-brain mean).

    Returns
    -------
    numpy.ndarray
        float32 ``chi - mean(chi[region])`` inside ``mask``, zero outside.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    roi = np.asarray(mask, dtype=bool)
    ref = roi if region is None else np.asarray(region, dtype=bool)
    if roi.shape != chi.shape or ref.shape != chi.shape:
        raise ValueError(
            f"chi {chi.shape}, mask {roi.shape} and region {ref.shape} must share one shape"
        )
    if not ref.any():
        raise ValueError("the reference region is empty")
    offset = chi[ref].mean(dtype=np.float64)
    return np.where(roi, chi - np.float32(offset), 0).astype(np.float32)


def _check(chi_ppm: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chi = np.asarray(chi_ppm, dtype=np.float32)
    roi = np.asarray(mask, dtype=bool)
    if chi.ndim != 3:
        raise ValueError(f"chi must be a 3-D array, got shape {chi.shape}")
    if roi.shape != chi.shape:
        raise ValueError(f"mask shape {roi.shape} differs from chi shape {chi.shape}")
    if not roi.any():
        raise ValueError("the mask is empty")
    return chi, roi


def _referenced(
    chi: np.ndarray, roi: np.ndarray, region: np.ndarray, description: str
) -> tuple[np.ndarray, dict]:
    """Subtract the mean of ``chi`` over ``region & roi``; return it with the sidecar entries."""
    ref = region & roi
    n = int(np.count_nonzero(ref))
    if n == 0:
        raise ValueError(f"the reference region ({description}) has no voxel inside the mask")
    values = chi[ref]
    if not np.all(np.isfinite(values)):
        raise ValueError("chi has NaN or Inf inside the reference region")
    offset = float(values.mean(dtype=np.float64))
    out = np.where(roi, chi - np.float32(offset), 0).astype(np.float32)
    meta = {"Reference": description, "ReferenceValuePpm": offset, "ReferenceVoxels": n}
    return out, meta


def reference_to_labels(
    chi_ppm: np.ndarray,
    mask: np.ndarray,
    segmentation: np.ndarray,
    labels: int | Sequence[int],
) -> tuple[np.ndarray, dict]:
    """Subtract the mean susceptibility over the voxels of some segmentation labels.

    Parameters
    ----------
    chi_ppm : (x, y, z) array
        Susceptibility in ppm.
    mask : (x, y, z) bool array
        Brain mask; the output is zero outside it and only voxels inside it are averaged.
    segmentation : (x, y, z) int array
        Label map (e.g. the :data:`qsmflow.algorithms.metrics.SEGMENTATION_LABELS` scheme).
    labels : int or sequence of int
        Labels pooled into one reference region (all their voxels weigh equally).

    Returns
    -------
    chi : numpy.ndarray
        float32 referenced susceptibility (ppm), zero outside ``mask``.
    metadata : dict
        ``Reference`` ("segmentation labels 10" ...), ``ReferenceValuePpm`` (the mean that was
        subtracted), ``ReferenceVoxels``.
    """
    chi, roi = _check(chi_ppm, mask)
    seg = np.asarray(segmentation)
    if seg.shape != chi.shape:
        raise ValueError(f"segmentation shape {seg.shape} differs from chi shape {chi.shape}")
    wanted = np.atleast_1d(np.asarray(labels)).ravel()
    if wanted.size == 0:
        raise ValueError("no reference labels given")
    if np.issubdtype(seg.dtype, np.floating):
        seg = np.rint(seg).astype(np.int64)
    wanted_list = [int(v) for v in wanted]
    region = np.isin(seg, wanted_list)
    name = "segmentation label" + ("s " if len(wanted_list) > 1 else " ")
    return _referenced(chi, roi, region, name + ", ".join(map(str, wanted_list)))


def estimate_csf_region(
    mask: np.ndarray,
    *,
    magnitude: np.ndarray | None = None,
    r2star: np.ndarray | None = None,
    voxel_size_mm: Sequence[float] | None = None,
    r2star_threshold_hz: float = CSF_R2STAR_THRESHOLD_HZ,
    erosion_mm: float = 5.0,
) -> np.ndarray:
    """Estimate a CSF mask from R2* and/or magnitude, away from the brain edge.

    Candidates are taken inside ``mask`` eroded by ``erosion_mm`` (the outer CSF layer is thin,
    partial-volumed with dura and bone and has the least reliable local field; the eroded
    region keeps the ventricles and deep sulci):

    - ``r2star`` (Hz): voxels with ``0 <= R2* < r2star_threshold_hz`` (MEDI+0's criterion,
      Liu Z et al. 2018; tissue is ~15-25 Hz at 3 T, CSF ~2-4 Hz).
    - ``magnitude`` 3-D: a late-echo magnitude, where CSF (long T2*) is the brightest
      tissue; CSF is its upper Otsu class inside the eroded mask. This needs a late echo
      (TE well beyond tissue T2*, roughly >= 30-40 ms at 3 T): at short TE, T1 saturation can
      leave CSF darker than tissue, and the estimate is then wrong.
    - ``magnitude`` 4-D (x, y, z, echo): the decay ratio ``|S(last echo)| / |S(first echo)|``
      (slow decay = low R2*, independent of T1 and coil weighting); CSF is its upper Otsu
      class inside the eroded mask.

    With both inputs a voxel must pass both tests. Finally a binary opening (6-connected
    cross) removes isolated voxels and one-voxel-thin strands, which are mostly noise or
    partial volume; if that leaves nothing, the unopened set is returned.

    Parameters
    ----------
    mask : (x, y, z) bool array
        Brain mask.
    magnitude : (x, y, z) or (x, y, z, echo) array, optional
        Late-echo magnitude or multi-echo magnitude (any scale).
    r2star : (x, y, z) array, optional
        R2* map in Hz.
    voxel_size_mm : (3,) floats, optional
        Voxel size for the erosion; ``None`` takes 1 mm isotropic voxels.
    r2star_threshold_hz : float
        CSF threshold on R2*.
    erosion_mm : float
        Distance from the mask edge (mm) within which no voxel is taken.

    Returns
    -------
    numpy.ndarray
        bool CSF mask (empty if nothing qualifies).
    """
    roi = np.asarray(mask, dtype=bool)
    if roi.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {roi.shape}")
    if magnitude is None and r2star is None:
        raise ValueError("estimating a CSF mask needs magnitude and/or r2star")
    if not r2star_threshold_hz > 0:
        raise ValueError(f"r2star_threshold_hz must be positive, got {r2star_threshold_hz}")
    vox = (1.0, 1.0, 1.0) if voxel_size_mm is None else tuple(voxel_size_mm)
    inner = erode_mm(roi, erosion_mm, vox)
    if not inner.any():
        raise ValueError(
            f"nothing of the mask is left after eroding by {erosion_mm} mm; lower erosion_mm"
        )
    csf = inner.copy()
    if r2star is not None:
        r2 = np.asarray(r2star, dtype=np.float32)
        if r2.shape != roi.shape:
            raise ValueError(f"r2star shape {r2.shape} differs from mask shape {roi.shape}")
        with np.errstate(invalid="ignore"):
            csf &= np.isfinite(r2) & (r2 >= 0) & (r2 < r2star_threshold_hz)
    if magnitude is not None:
        mag = np.asarray(magnitude, dtype=np.float32)
        if mag.shape[:3] != roi.shape or mag.ndim not in (3, 4):
            raise ValueError(
                f"magnitude must be (x, y, z) or (x, y, z, echo) with (x, y, z) = {roi.shape}, "
                f"got {mag.shape}"
            )
        if mag.ndim == 4:
            if mag.shape[3] < 2:
                raise ValueError("a 4-D magnitude needs at least two echoes")
            first = np.abs(mag[..., 0])
            with np.errstate(divide="ignore", invalid="ignore"):
                score = np.where(first > 0, np.abs(mag[..., -1]) / first, np.nan)
        else:
            score = np.abs(mag)
        values = score[inner]
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError("the magnitude has no finite value inside the eroded mask")
        with np.errstate(invalid="ignore"):
            csf &= np.isfinite(score) & (score > otsu_threshold(values))
    opened = ndimage.binary_opening(csf)
    return opened if opened.any() else csf


def reference_to_csf(
    chi_ppm: np.ndarray,
    mask: np.ndarray,
    *,
    csf_mask: np.ndarray | None = None,
    magnitude: np.ndarray | None = None,
    r2star: np.ndarray | None = None,
    voxel_size_mm: Sequence[float] | None = None,
    r2star_threshold_hz: float = CSF_R2STAR_THRESHOLD_HZ,
    erosion_mm: float = 5.0,
) -> tuple[np.ndarray, dict]:
    """Reference susceptibility to the mean of cerebrospinal fluid (CSF = 0 ppm).

    The CSF region is ``csf_mask`` when given (e.g. from a segmentation); otherwise it is
    estimated from ``r2star`` and/or ``magnitude`` by :func:`estimate_csf_region` (low R2*, or
    the bright / slowly decaying class of the magnitude, inside the mask eroded by
    ``erosion_mm``). Only voxels inside ``mask`` are averaged.

    Parameters
    ----------
    chi_ppm : (x, y, z) array
        Susceptibility in ppm.
    mask : (x, y, z) bool array
        Brain mask; the output is zero outside it.
    csf_mask : (x, y, z) bool array, optional
        CSF region; takes precedence over ``magnitude`` / ``r2star``.
    magnitude, r2star, voxel_size_mm, r2star_threshold_hz, erosion_mm
        See :func:`estimate_csf_region`.

    Returns
    -------
    chi : numpy.ndarray
        float32 referenced susceptibility (ppm), zero outside ``mask``.
    metadata : dict
        ``Reference`` (how the CSF region was obtained), ``ReferenceValuePpm`` (the CSF mean
        that was subtracted), ``ReferenceVoxels``.

    Raises
    ------
    ValueError
        For mismatched shapes, no way to find CSF, or an empty CSF region.
    """
    chi, roi = _check(chi_ppm, mask)
    if csf_mask is not None:
        region = np.asarray(csf_mask, dtype=bool)
        if region.shape != chi.shape:
            raise ValueError(f"csf_mask shape {region.shape} differs from chi shape {chi.shape}")
        return _referenced(chi, roi, region, "CSF (given mask)")
    region = estimate_csf_region(
        roi,
        magnitude=magnitude,
        r2star=r2star,
        voxel_size_mm=voxel_size_mm,
        r2star_threshold_hz=r2star_threshold_hz,
        erosion_mm=erosion_mm,
    )
    how = []
    if r2star is not None:
        how.append(f"R2* < {r2star_threshold_hz:g} Hz")
    if magnitude is not None:
        kind = "echo decay ratio" if np.ndim(magnitude) == 4 else "late-echo magnitude"
        how.append(f"upper Otsu class of the {kind}")
    description = (
        f"CSF (estimated: {' and '.join(how)}, inside the mask eroded by {erosion_mm:g} mm)"
    )
    return _referenced(chi, roi, region, description)
