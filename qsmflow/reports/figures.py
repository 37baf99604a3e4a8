"""QC figures: orthogonal slices of QSM maps drawn with matplotlib, plus ROI statistics.

Every plotting function takes arrays and an affine and writes one PNG (atomically), returning its
path. Figures are built on a bare :class:`matplotlib.figure.Figure` with an Agg canvas under
matplotlib's default style, so nothing touches pyplot's global state, the user's backend or the
user's rcParams.

Slices are taken through the brain mask's centre of mass after reorienting the volume to the
closest RAS+ axes with the affine, and drawn in neurological order with their orientation
labelled: axial and coronal views have the patient's left on the image's left, axial views have
anterior up and sagittal views have anterior on the right. Oblique acquisitions are drawn along
their closest anatomical axes (the title says so).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..io.nifti import atomic_path, voxel_sizes

__all__ = [
    "CHI_RANGE_PPM",
    "Outline",
    "SliceView",
    "orthogonal_slices",
    "plot_orthogonal",
    "plot_magnitude",
    "plot_field",
    "plot_phase",
    "plot_chi",
    "roi_statistics",
]

#: Fixed display range of susceptibility maps (ppm), so reports of different runs compare by eye.
CHI_RANGE_PPM: tuple[float, float] = (-0.15, 0.15)

#: Outline colours (colour-blind safe: Okabe & Ito 2008 orange and sky blue).
BRAIN_MASK_COLOUR = "#E69F00"
LOCAL_MASK_COLOUR = "#56B4E9"


@dataclass(frozen=True)
class Outline:
    """A mask drawn as a contour over the image."""

    mask: np.ndarray
    colour: str
    label: str


def _ras_transform(affine: np.ndarray) -> np.ndarray:
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))


def _to_ras(arr: np.ndarray, transform: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(np.asarray(arr), transform)


def _centre_voxel(mask: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
    """Voxel (array) index of the mask's centre of mass; the grid centre for an empty mask."""
    if mask is not None and np.any(mask):
        idx = np.argwhere(mask)
        centre = idx.mean(axis=0)
    else:
        centre = (np.asarray(shape[:3]) - 1) / 2.0
    return np.clip(np.rint(centre).astype(int), 0, np.asarray(shape[:3]) - 1)


def _check_3d(name: str, arr: np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D array, got shape {arr.shape}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(shape)} (same grid)")
    return arr


@dataclass(frozen=True)
class SliceView:
    """One 2-D view, ready for ``imshow(data, origin="lower", aspect=aspect)``.

    ``labels`` are the anatomical directions at the (left, right, bottom, top) image edges.
    """

    name: str
    data: np.ndarray
    labels: tuple[str, str, str, str]
    aspect: float
    position: str


def orthogonal_slices(
    volume: np.ndarray, affine: np.ndarray, centre_ijk: Sequence[int]
) -> list[SliceView]:
    """Axial, coronal and sagittal slices of ``volume`` through voxel ``centre_ijk``.

    The volume is reoriented to the closest RAS+ axes of ``affine`` (flips and axis swaps only,
    no resampling), so that with ``origin="lower"`` the axial view has anterior at the top, the
    coronal and sagittal views superior at the top, the axial and coronal views the patient's
    left on the left and the sagittal view anterior on the right, whatever the voxel order.
    ``aspect`` (row height / column width) comes from the voxel sizes; ``position`` gives the
    slice's world coordinate in mm.
    """
    volume = _check_3d("volume", volume)
    shape = volume.shape
    ijk = np.asarray(centre_ijk, dtype=int)
    transform = _ras_transform(affine)
    world = (np.asarray(affine, dtype=np.float64) @ np.append(ijk, 1.0))[:3]
    vox_in = voxel_sizes(affine)
    centre = np.empty(3, dtype=int)
    vox = np.empty(3)
    for axis, (out_axis, flip) in enumerate(transform):
        out_axis = int(out_axis)
        centre[out_axis] = shape[axis] - 1 - ijk[axis] if flip < 0 else ijk[axis]
        vox[out_axis] = vox_in[axis]
    ras = _to_ras(volume, transform)
    return [
        SliceView(
            "Axial",
            ras[:, :, centre[2]].T,
            ("L", "R", "P", "A"),
            vox[1] / vox[0],
            f"z = {world[2]:+.0f} mm",
        ),
        SliceView(
            "Coronal",
            ras[:, centre[1], :].T,
            ("L", "R", "I", "S"),
            vox[2] / vox[0],
            f"y = {world[1]:+.0f} mm",
        ),
        SliceView(
            "Sagittal",
            ras[centre[0], :, :].T,
            ("P", "A", "I", "S"),
            vox[2] / vox[1],
            f"x = {world[0]:+.0f} mm",
        ),
    ]


def plot_orthogonal(
    image: np.ndarray,
    affine: np.ndarray,
    out_png: str | os.PathLike,
    *,
    centre_mask: np.ndarray | None = None,
    display_mask: np.ndarray | None = None,
    outlines: Sequence[Outline] = (),
    cmap: str = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
    cbar_label: str | None = None,
    cbar_extend: str = "neither",
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Axial, coronal and sagittal slices of ``image`` through ``centre_mask``'s centre of mass.

    Parameters
    ----------
    image : (x, y, z) array
        The map to draw (any units).
    affine : (4, 4) array
        Voxel-to-world transform (orients the views and sets the voxel aspect ratio).
    out_png : path
        PNG file to write (atomically; folders are created).
    centre_mask : (x, y, z) bool array, optional
        Slices cross at its centre of mass (the grid centre when absent or empty).
    display_mask : (x, y, z) bool array, optional
        Voxels outside it are drawn black (NaN and Inf always are).
    outlines : sequence of Outline
        Masks drawn as coloured contours, with a legend.
    cmap, vmin, vmax : colour map and display range (``None``: matplotlib's min/max).
    cbar_label : str, optional
        Draw a colour bar with this label (put the units in it).
    cbar_extend : {'neither', 'both', 'min', 'max'}
        Arrow ends on the colour bar, to show that values beyond the range are clipped.
    title : str, optional
        Figure title.
    dpi : int
        Resolution of the PNG (the figure is 10 x 3.6 inches).

    Returns
    -------
    Path of the PNG written.
    """
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image = _check_3d("image", image).astype(np.float32)
    shape = image.shape
    if display_mask is not None:
        display_mask = _check_3d("display_mask", display_mask, shape).astype(bool)
        image = np.where(display_mask, image, np.float32(np.nan))
    if centre_mask is not None:
        centre_mask = _check_3d("centre_mask", centre_mask, shape).astype(bool)
    for o in outlines:
        _check_3d(f"outline {o.label!r}", o.mask, shape)

    ijk = _centre_voxel(centre_mask, shape)
    views = orthogonal_slices(image, affine, ijk)
    outline_views = [(orthogonal_slices(o.mask.astype(bool), affine, ijk), o) for o in outlines]

    with matplotlib.style.context("default"):
        fig = Figure(figsize=(10, 3.6), dpi=dpi, facecolor="white")
        FigureCanvasAgg(fig)
        ratios = [1, 1, 1] + ([0.05] if cbar_label else [])
        grid = fig.add_gridspec(
            1,
            len(ratios),
            width_ratios=ratios,
            wspace=0.3,
            left=0.03,
            right=0.93 if cbar_label else 0.97,
            bottom=0.13,
            top=0.86,
        )
        cmap_obj = matplotlib.colormaps[cmap].with_extremes(bad="black")
        mappable = None
        for i, view in enumerate(views):
            ax = fig.add_subplot(grid[0, i])
            ax.set_facecolor("black")
            mappable = ax.imshow(
                np.ma.masked_invalid(view.data),
                cmap=cmap_obj,
                vmin=vmin,
                vmax=vmax,
                origin="lower",
                aspect=view.aspect,
                interpolation="nearest",
            )
            for outline_view, o in outline_views:
                sl = outline_view[i].data
                if sl.any() and not sl.all():
                    ax.contour(sl, levels=[0.5], colors=[o.colour], linewidths=1.0)
            left, right, bottom, top = view.labels
            style = {"transform": ax.transAxes, "fontsize": 11, "fontweight": "bold"}
            ax.text(-0.03, 0.5, left, ha="right", va="center", **style)
            ax.text(1.03, 0.5, right, ha="left", va="center", **style)
            ax.text(0.5, -0.03, bottom, ha="center", va="top", **style)
            ax.text(0.5, 1.03, top, ha="center", va="bottom", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{view.name}, {view.position}", labelpad=16, fontsize=9)
        if cbar_label and mappable is not None:
            cax = fig.add_subplot(grid[0, 3])
            cbar = fig.colorbar(mappable, cax=cax, extend=cbar_extend)
            cbar.set_label(cbar_label)
        if outlines:
            handles = [Line2D([], [], color=o.colour, lw=2, label=o.label) for o in outlines]
            fig.legend(handles=handles, loc="lower right", ncol=len(handles), frameon=False)
        full_title = title or ""
        if np.degrees(nib.affines.obliquity(affine)).max() > 1.0:
            full_title += " (oblique: views along the closest anatomical axes)"
        if full_title:
            fig.suptitle(full_title, fontsize=12)
        out_png = Path(out_png)
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    return out_png


def _robust_limit(values: np.ndarray, percentile: float = 99.0) -> float:
    """Half-width of a symmetric display range: the larger of |p_low| and |p_high|."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    lo, hi = np.percentile(values, [100.0 - percentile, percentile])
    lim = float(max(abs(lo), abs(hi)))
    return lim if lim > 0 else 1.0


def plot_magnitude(
    magnitude: np.ndarray,
    affine: np.ndarray,
    out_png: str | os.PathLike,
    *,
    mask: np.ndarray,
    local_mask: np.ndarray | None = None,
    title: str = "Magnitude (first echo)",
) -> Path:
    """Magnitude in grey (0.5-99.5th percentile range) with the brain mask outlined in orange
    and, when given, the local-field mask in blue."""
    magnitude = _check_3d("magnitude", magnitude)
    finite = magnitude[np.isfinite(magnitude)]
    lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    outlines = [Outline(np.asarray(mask, bool), BRAIN_MASK_COLOUR, "brain mask")]
    if local_mask is not None:
        outlines.append(
            Outline(np.asarray(local_mask, bool), LOCAL_MASK_COLOUR, "local-field mask")
        )
    return plot_orthogonal(
        magnitude,
        affine,
        out_png,
        centre_mask=mask,
        outlines=outlines,
        cmap="gray",
        vmin=float(lo),
        vmax=float(hi) if hi > lo else float(lo) + 1.0,
        title=title,
    )


def plot_field(
    field: np.ndarray,
    affine: np.ndarray,
    out_png: str | os.PathLike,
    *,
    mask: np.ndarray,
    units: str,
    centre_mask: np.ndarray | None = None,
    title: str = "Field",
    percentile: float = 99.0,
) -> Path:
    """A field map inside ``mask`` on a symmetric blue-red scale of +-max(|p1|, |p99|) of the
    values in the mask (``percentile`` sets p99), with a colour bar in ``units``."""
    field = _check_3d("field", field)
    mask = np.asarray(mask, bool)
    lim = _robust_limit(field[mask], percentile)
    return plot_orthogonal(
        field,
        affine,
        out_png,
        centre_mask=mask if centre_mask is None else centre_mask,
        display_mask=mask,
        cmap="RdBu_r",
        vmin=-lim,
        vmax=lim,
        cbar_label=f"field ({units})",
        cbar_extend="both",
        title=title,
    )


def plot_phase(
    phase: np.ndarray,
    affine: np.ndarray,
    out_png: str | os.PathLike,
    *,
    mask: np.ndarray,
    title: str = "Unwrapped phase",
    percentile: float = 99.0,
) -> Path:
    """Unwrapped phase (radians) over the whole field of view, so wraps left near the brain's
    edge stay visible, on a symmetric scale from the values in ``mask``, mask outlined."""
    phase = _check_3d("phase", phase)
    mask = np.asarray(mask, bool)
    lim = _robust_limit(phase[mask], percentile)
    return plot_orthogonal(
        phase,
        affine,
        out_png,
        centre_mask=mask,
        outlines=[Outline(mask, BRAIN_MASK_COLOUR, "brain mask")],
        cmap="RdBu_r",
        vmin=-lim,
        vmax=lim,
        cbar_label="phase (rad)",
        cbar_extend="both",
        title=title,
    )


def plot_chi(
    chi: np.ndarray,
    affine: np.ndarray,
    out_png: str | os.PathLike,
    *,
    mask: np.ndarray | None = None,
    title: str = "Susceptibility",
) -> Path:
    """Susceptibility in grey on the FIXED range :data:`CHI_RANGE_PPM` (never autoscaled, so
    maps of different subjects and methods compare by eye), with a colour bar in ppm."""
    return plot_orthogonal(
        _check_3d("chi", chi),
        affine,
        out_png,
        centre_mask=mask,
        cmap="gray",
        vmin=CHI_RANGE_PPM[0],
        vmax=CHI_RANGE_PPM[1],
        cbar_label="\u03c7 (ppm)",
        cbar_extend="both",
        title=title,
    )


def roi_statistics(
    values: np.ndarray,
    segmentation: np.ndarray,
    label_names: Mapping[int, str] | None = None,
    *,
    mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Mean and standard deviation of ``values`` in each labelled region.

    Parameters
    ----------
    values : (x, y, z) array
        The map (e.g. chi in ppm).
    segmentation : (x, y, z) integer array
        Region labels on the same grid; 0 is background.
    label_names : mapping int -> str, optional
        Regions to report, in this order, with their names. Default: every non-zero label present,
        named ``"label <n>"``.
    mask : (x, y, z) bool array, optional
        Only voxels inside it count (pass the local-field mask: chi outside it is not estimated).

    Returns
    -------
    list of dict
        One row per region: ``label`` (int), ``name``, ``n_voxels``, ``mean`` and ``sd`` (sample
        standard deviation, ddof=1; ``None`` when the region has fewer voxels than needed).
    """
    values = _check_3d("values", values)
    segmentation = _check_3d("segmentation", segmentation, values.shape)
    seg = np.rint(segmentation).astype(np.int64)
    valid = np.isfinite(values)
    if mask is not None:
        valid &= _check_3d("mask", mask, values.shape).astype(bool)
    if label_names is None:
        label_names = {int(k): f"label {int(k)}" for k in np.unique(seg) if k != 0}
    rows = []
    for label, name in label_names.items():
        v = values[(seg == int(label)) & valid].astype(np.float64)
        rows.append(
            {
                "label": int(label),
                "name": str(name),
                "n_voxels": int(v.size),
                "mean": float(v.mean()) if v.size else None,
                "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            }
        )
    return rows
