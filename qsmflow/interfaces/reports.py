"""The per-subject QC report: PNG figures and one HTML page in the derivatives dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io.nifti import load_nifti, read_json

_LABEL_RE = re.compile(r"^sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*$")


class _QCReportInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Directory(
        mandatory=True, desc="root of the qsmflow derivatives dataset (<out>/qsmflow)"
    )
    subject = traits.Str(mandatory=True, desc="subject label, without 'sub-'")
    labels = traits.List(
        traits.Str,
        mandatory=True,
        desc="entity string of each acquisition (e.g. 'sub-01_acq-ori1'), one per acquisition",
    )
    magnitude = InputMultiObject(
        File(exists=True), mandatory=True, desc="first-echo magnitude (a.u.), one per acquisition"
    )
    mask = InputMultiObject(File(exists=True), mandatory=True, desc="brain mask, per acquisition")
    local_mask = InputMultiObject(
        File(exists=True), mandatory=True, desc="mask where the local field is valid, per acq."
    )
    field_hz = InputMultiObject(
        File(exists=True), mandatory=True, desc="total field (Hz), per acquisition"
    )
    local_field = InputMultiObject(
        File(exists=True), mandatory=True, desc="local field (local_field_units), per acq."
    )
    local_field_units = traits.Enum(
        "ppm", "Hz", usedefault=True, desc="units of local_field (qsm_wf: ppm; the sunk file: Hz)"
    )
    chi = InputMultiObject(
        File(exists=True), mandatory=True, desc="susceptibility (ppm), per acquisition"
    )
    chi_sidecar = InputMultiObject(
        File(exists=True),
        desc="JSON sidecar of each Chimap (default: the .json next to each chi file, if any)",
    )
    unwrapped_phase = InputMultiObject(
        File(exists=True),
        desc="unwrapped phase (rad), 3-D or 4-D (the last echo is shown), per acquisition",
    )
    segmentation = InputMultiObject(
        File(exists=True),
        desc="integer label image on the chi grid: one for all acquisitions or one per acquisition",
    )
    label_names = traits.Either(
        traits.Str,
        traits.Dict,
        desc="label -> region name, as a dict or a JSON object string (default: 'label <n>')",
    )


class _QCReportOutputSpec(TraitedSpec):
    out_report = File(desc="the HTML page, <out_dir>/sub-<subject>.html")
    out_figures = OutputMultiObject(
        File(), desc="PNG figures under <out_dir>/sub-<subject>/figures"
    )


def _sidecar_next_to(path: str) -> dict[str, Any] | None:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            candidate = Path(path).with_name(name[: -len(ext)] + ".json")
            return read_json(candidate) if candidate.exists() else None
    return None


def _parse_label_names(value) -> dict[int, str] | None:
    if not isdefined(value) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"label_names is not a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("label_names must map labels to names (a dict or JSON object)")
    try:
        return {int(k): str(v) for k, v in value.items()}
    except ValueError as exc:
        raise ValueError(f"label_names keys must be integer labels: {exc}") from exc


def _dseg_label_names(seg_path: str) -> dict[int, str] | None:
    """Region names of a BIDS ``_dseg`` image from its look-up table (``index``/``name`` TSV).

    The table is the file's own ``<stem>.tsv`` or, by BIDS inheritance, a dataset-level
    ``desc-<label>_dseg.tsv`` in a parent folder up to the dataset root; None when absent.
    """
    path = Path(seg_path)
    stem = path.name.split(".", 1)[0]
    candidates = [path.with_name(stem + ".tsv")]
    desc = next((p[5:] for p in stem.split("_") if p.startswith("desc-")), None)
    for parent in path.parents:
        candidates.append(parent / (f"desc-{desc}_dseg.tsv" if desc else "dseg.tsv"))
        if (parent / "dataset_description.json").exists():
            break
    for table in candidates:
        if table.is_file():
            lines = [ln.split("\t") for ln in table.read_text().splitlines() if ln.strip()]
            head = lines[0]
            if "index" in head and "name" in head:
                i, j = head.index("index"), head.index("name")
                try:
                    return {int(row[i]): row[j] for row in lines[1:]}
                except (ValueError, IndexError):
                    return None
    return None


def _volume(path: str, what: str, *, dtype: Any = np.float32, pick: int | None = None):
    data, img = load_nifti(path, dtype=dtype)
    if data.ndim == 4 and pick is not None:
        data = data[..., pick]
    if data.ndim != 3:
        raise ValueError(f"{path}: {what} must be a 3-D image, got shape {data.shape}")
    return data, img


def _figure_path(fig_dir: Path, label: str, desc: str) -> Path:
    """``<fig_dir>/<label>_desc-<desc>_qc.png``."""
    return fig_dir / f"{label}_desc-{desc}_qc.png"


def build_subject_report(
    *,
    out_dir: str | Path,
    subject: str,
    acquisitions: list[dict[str, Any]],
    segmentation: list[str] | None = None,
    label_names: dict[int, str] | None = None,
    local_field_units: str = "ppm",
) -> tuple[Path, list[Path]]:
    """Draw every figure and write ``<out_dir>/sub-<subject>.html``; returns (page, figures).

    Each acquisition is a dict with ``label`` and the files ``magnitude``, ``mask``,
    ``local_mask``, ``field_hz``, ``local_field``, ``chi`` and optionally ``unwrapped_phase``
    and ``chi_sidecar``.
    """
    from ..reports import figures as qcfig
    from ..reports.html import AcquisitionSection, ReportFigure, write_report

    out_dir = Path(out_dir)
    if not re.fullmatch(r"[A-Za-z0-9]+", subject):
        raise ValueError(f"subject label must be alphanumeric, got {subject!r}")
    fig_dir = out_dir / f"sub-{subject}" / "figures"
    if segmentation and len(segmentation) not in (1, len(acquisitions)):
        raise ValueError(
            f"give one segmentation for all acquisitions or one per acquisition "
            f"({len(acquisitions)}), not {len(segmentation)}"
        )
    sections, written = [], []
    for i, acq in enumerate(acquisitions):
        label = acq["label"]
        if not _LABEL_RE.match(label) or not label.startswith(f"sub-{subject}"):
            raise ValueError(
                f"acquisition label {label!r} must be a BIDS entity string starting with "
                f"'sub-{subject}' (e.g. 'sub-{subject}_acq-ori1')"
            )
        mag, img = _volume(acq["magnitude"], "magnitude", pick=0)
        affine = img.affine
        vols = {"magnitude": mag}
        for key, dtype in (
            ("mask", bool),
            ("local_mask", bool),
            ("field_hz", np.float32),
            ("local_field", np.float32),
            ("chi", np.float32),
        ):
            vols[key], _ = _volume(acq[key], key, dtype=dtype)
            if vols[key].shape != mag.shape:
                raise ValueError(
                    f"{acq[key]}: shape {vols[key].shape} differs from the magnitude "
                    f"{acq['magnitude']} {mag.shape}; all maps of {label} must share one grid"
                )

        figs: list[ReportFigure] = []
        views = "Axial, coronal and sagittal slices"
        path = qcfig.plot_magnitude(
            vols["magnitude"],
            affine,
            _figure_path(fig_dir, label, "magnitude"),
            mask=vols["mask"],
            local_mask=vols["local_mask"],
            title=f"{label}: magnitude (first echo)",
        )
        figs.append(
            ReportFigure(
                path,
                f"{views} of the first-echo magnitude of {label} with the brain mask outlined in "
                "orange and the local-field mask in blue",
                "First-echo magnitude; orange: brain mask; blue: mask where the local field "
                "(and susceptibility) is estimated.",
            )
        )
        if acq.get("unwrapped_phase"):
            phase, _ = _volume(acq["unwrapped_phase"], "unwrapped phase", pick=-1)
            path = qcfig.plot_phase(
                phase,
                affine,
                _figure_path(fig_dir, label, "phase"),
                mask=vols["mask"],
                title=f"{label}: unwrapped phase (last echo)",
            )
            figs.append(
                ReportFigure(
                    path,
                    f"{views} of the unwrapped phase of {label} in radians",
                    "Unwrapped phase of the last echo (rad), symmetric scale from the 1st/99th "
                    "percentiles in the brain mask. Residual wraps show as sharp 2\u03c0 jumps.",
                )
            )
        path = qcfig.plot_field(
            vols["field_hz"],
            affine,
            _figure_path(fig_dir, label, "field"),
            mask=vols["mask"],
            units="Hz",
            title=f"{label}: total field",
        )
        figs.append(
            ReportFigure(
                path,
                f"{views} of the total field of {label} in hertz inside the brain mask",
                "Total field (Hz) inside the brain mask; symmetric scale from the 1st/99th "
                "percentiles.",
            )
        )
        path = qcfig.plot_field(
            vols["local_field"],
            affine,
            _figure_path(fig_dir, label, "localfield"),
            mask=vols["local_mask"],
            centre_mask=vols["mask"],
            units=local_field_units,
            title=f"{label}: local field",
        )
        figs.append(
            ReportFigure(
                path,
                f"{views} of the local field of {label} in {local_field_units} "
                "inside the local-field mask",
                f"Local field ({local_field_units}) after background field removal; symmetric "
                "scale from the 1st/99th percentiles.",
            )
        )
        lo, hi = qcfig.CHI_RANGE_PPM
        path = qcfig.plot_chi(
            vols["chi"],
            affine,
            _figure_path(fig_dir, label, "chi"),
            mask=vols["mask"],
            title=f"{label}: susceptibility",
        )
        figs.append(
            ReportFigure(
                path,
                f"{views} of the susceptibility map of {label} in ppm, grey scale "
                f"from {lo} to {hi} ppm",
                f"Susceptibility \u03c7 (ppm), fixed grey scale {lo:+.2f} to {hi:+.2f} ppm "
                "(the same for every report).",
            )
        )
        written += [f.path for f in figs]

        notes = []
        sidecar = None
        if acq.get("chi_sidecar"):
            sidecar = read_json(acq["chi_sidecar"])
        else:
            sidecar = _sidecar_next_to(acq["chi"])
        if sidecar is None:
            notes.append("No JSON sidecar found next to the susceptibility map.")
        extra = {}
        for key, name in (("mask", "Brain mask"), ("field_hz", "Total field")):
            side = _sidecar_next_to(acq[key]) or {}
            if side.get("Method"):
                extra[name] = str(side["Method"])

        roi_rows = None
        if segmentation:
            seg_path = segmentation[0] if len(segmentation) == 1 else segmentation[i]
            seg, _ = _volume(seg_path, "segmentation")
            if seg.shape != mag.shape:
                raise ValueError(
                    f"{seg_path}: segmentation shape {seg.shape} differs from {label}'s grid "
                    f"{mag.shape}; give one segmentation per acquisition, on its grid"
                )
            roi_rows = qcfig.roi_statistics(vols["chi"], seg, label_names, mask=vols["local_mask"])
        outputs = [
            acq[k] for k in ("chi", "mask", "local_mask", "field_hz", "local_field", "magnitude")
        ]
        sections.append(
            AcquisitionSection(
                label=label,
                figures=figs,
                sidecar=sidecar,
                extra_methods=extra,
                roi_rows=roi_rows,
                outputs=[str(p) for p in outputs],
                notes=notes,
            )
        )
    page = write_report(
        out_dir / f"sub-{subject}.html", subject=subject, sections=sections, out_dir=out_dir
    )
    return page, written


class QCReport(SimpleInterface):
    """Per-subject QC report: orthogonal-slice PNGs of every acquisition and one HTML page.

    Writes ``<out_dir>/sub-<subject>.html`` and ``<out_dir>/sub-<subject>/figures/
    <label>_desc-<magnitude|phase|field|localfield|chi>_qc.png`` (the fMRIPrep layout). Chi is
    drawn on a fixed -0.15..+0.15 ppm grey scale; fields on symmetric robust scales. With a
    segmentation, a table of chi mean and SD per region (inside the local-field mask) is added.

    Inputs are lists with one entry per acquisition, in the order of ``labels``.
    """

    input_spec = _QCReportInputSpec
    output_spec = _QCReportOutputSpec

    def _run_interface(self, runtime):
        inp = self.inputs
        keys = ["magnitude", "mask", "local_mask", "field_hz", "local_field", "chi"]
        optional = [k for k in ("unwrapped_phase", "chi_sidecar") if isdefined(getattr(inp, k))]
        n = len(inp.labels)
        for key in keys + optional:
            if len(getattr(inp, key)) != n:
                raise ValueError(
                    f"{key} has {len(getattr(inp, key))} entries but labels has {n}; give one "
                    "per acquisition"
                )
        acquisitions = []
        for i, label in enumerate(inp.labels):
            acq = {"label": label}
            for key in keys + optional:
                acq[key] = getattr(inp, key)[i]
            acquisitions.append(acq)
        page, figs = build_subject_report(
            out_dir=inp.out_dir,
            subject=inp.subject,
            acquisitions=acquisitions,
            segmentation=list(inp.segmentation) if isdefined(inp.segmentation) else None,
            label_names=_parse_label_names(inp.label_names)
            or (_dseg_label_names(inp.segmentation[0]) if isdefined(inp.segmentation) else None),
            local_field_units=inp.local_field_units,
        )
        self._results["out_report"] = str(page)
        self._results["out_figures"] = [str(p) for p in figs]
        return runtime
