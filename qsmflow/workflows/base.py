"""Dataset and subject workflows: one :func:`init_qsm_wf` per acquisition plus BIDS sinks."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces import DerivativesDataSink, QCReport
from ..io.bids import Acquisition
from .multi_orientation import group_orientations, init_multi_orientation_wf
from .qsm import COIL_COMBINE_METHODS, init_qsm_wf

_METHOD_TEXT = {
    "vsharp": "V-SHARP (Wu et al. 2012)",
    "sharp": "SHARP (Schweser et al. 2011)",
    "resharp": "RESHARP (Sun & Wilman 2014)",
    "ismv": "iSMV (Wen et al. 2014)",
    "pdf": "PDF (Liu et al. 2011)",
    "lbv": "LBV (Zhou et al. 2014)",
    "tkd": "TKD (Shmueli et al. 2009), threshold 0.19, Schweser 2013 correction",
    "tsvd": "TSVD (Wharton et al. 2010)",
    "tikhonov": "Tikhonov, gradient penalty (Bilgic et al. 2014)",
    "ilsqr": "iLSQR (Li et al. 2015)",
    "star": "star-QSM (Wei et al. 2015)",
    "medi": "MEDI (Liu et al. 2012), nonlinear data term",
    "ndi": "NDI (Polak et al. 2020)",
    "tgv": "TGV (Langkammer et al. 2015), Laplacian data term",
    "tv": "TV-ADMM (Bilgic et al. 2014; FANSI, Milovic et al. 2018)",
    "rts": "RTS (Kames et al. 2018)",
    "dip": "Deep Image Prior (Ulyanov et al. 2018) with MoDIP data fidelity (Xiong et al. 2023)",
    "modl": "MoDL-QSM (Feng et al. 2021), qsmflow's shipped weights",
    "spinet": "SpiNet-QSM (Vaddadi et al. 2024), qsmflow's shipped weights",
    "region-growing": "region-growing unwrapping (ROMEO-like, Dymerska et al. 2021)",
    "laplacian": "Laplacian unwrapping (Schofield & Zhu 2003)",
    "bet": "BET (Smith 2002): FSL bet when installed, else the built-in implementation",
    "fsl-bet": "FSL bet (Smith 2002)",
    "phase-quality": "phase-quality mask: ROMEO-like quality map and magnitude thresholds, "
    "closing and hole filling",
    "magnitude-threshold": "magnitude threshold relative to the local tissue level, closing and "
    "hole filling",
    "threshold": "Otsu threshold with hole filling",
}


_COMBINE_TEXT = {
    "fit": "one total field from a weighted linear fit of the unwrapped phase over echo times",
    "echo-average": "echo-wise background removal and inversion of each echo's field (fitted "
    "phase offset removed), averaged over the echoes on the voxels valid in every echo",
}


_COIL_TEXT = {
    "mcpc3ds": "MCPC-3D-S (Eckstein et al. 2018)",
    "aspire": "ASPIRE (Eckstein et al. 2018)",
}


def coil_combination_text(method: str, n_coils: int) -> str:
    """Sidecar text of the coil combination of ``n_coils`` uncombined channels."""
    return (
        f"{_COIL_TEXT[method]}: the phase offset of each of the {n_coils} receive channels, from "
        "the first two echoes, smoothed (Gaussian, 4 mm) and removed before the channels' "
        "complex sum (weights: channel magnitude squared); magnitude: root sum of squares"
    )


def check_coil_combination(pipeline: dict[str, Any], acq: Acquisition) -> str:
    """The coil-combination method for ``acq``; ASPIRE's echo times are checked up front."""
    method = pipeline.get("coil_combine", "mcpc3ds")
    if method not in COIL_COMBINE_METHODS:
        raise ValueError(
            f"pipeline option coil_combine = {method!r} is not one of "
            f"{', '.join(COIL_COMBINE_METHODS)}"
        )
    tes = acq.echo_times_s
    if acq.n_coils and method == "aspire" and abs(tes[1] - 2 * tes[0]) > 0.01 * tes[1]:
        raise ValueError(
            f"{acq.label}: coil_combine 'aspire' needs TE2 = 2 * TE1, but the echo times are "
            f"{tes[0] * 1e3:g} and {tes[1] * 1e3:g} ms; use coil_combine 'mcpc3ds' (any echo "
            "times) in the pipeline"
        )
    return method


def _sinks(
    pipeline: dict[str, Any], acq: Acquisition
) -> list[tuple[str, str, str | None, str, dict]]:
    """(qsm_wf output, suffix, desc, datatype, sidecar) for every derivative written."""
    unwrap = _METHOD_TEXT[pipeline["unwrap_method"]]
    if acq.mask is not None:
        mask_meta = {"Method": f"reused from the derivatives file {acq.mask}"}
    else:
        mask_meta = {"Method": _METHOD_TEXT[pipeline["mask_method"]]}
    # uncombined receive channels: every map derived from the combined images says how
    coil_meta, mag_text = {}, "First-echo magnitude"
    if acq.n_coils:
        method = pipeline.get("coil_combine", "mcpc3ds")
        coil_meta = {"CoilCombination": coil_combination_text(method, acq.n_coils)}
        mag_text = f"First-echo magnitude, root sum of squares of {acq.n_coils} receive channels"
    return [
        (
            "chi",
            "Chimap",
            None,
            "anat",
            {
                "Units": "ppm",
                "Description": "Magnetic susceptibility",
                "InversionMethod": _METHOD_TEXT[pipeline["inversion_method"]],
                "BackgroundFieldRemoval": _METHOD_TEXT[pipeline["bfr_method"]],
                "EchoCombination": _COMBINE_TEXT[pipeline["combine"]],
                "TwoPass": pipeline["two_pass"],
                "Reference": "mean over the background-removal mask",
                "SkullStripped": True,
                **coil_meta,
            },
        ),
        (
            "mask",
            "mask",
            "brain",
            "anat",
            {
                "Type": "Brain",
                "Description": "Brain mask",
                **mask_meta,
            },
        ),
        (
            "local_mask",
            "mask",
            "local",
            "anat",
            {
                "Type": "ROI",
                "Description": "Region where the local field (and chi) is valid",
            },
        ),
        (
            "r2star",
            "R2starmap",
            None,
            "anat",
            {"Units": "Hz", "Description": "R2* (log-linear fit)", **coil_meta},
        ),
        (
            "field_hz",
            "fieldmap",
            None,
            "fmap",
            {
                "Units": "Hz",
                "Description": "Total field",
                "Method": f"{unwrap}; weighted linear fit over echo times",
                **coil_meta,
            },
        ),
        ("magnitude", "magnitude", None, "fmap", {"Description": mag_text, **coil_meta}),
        (
            "local_field",
            "fieldmap",
            "local",
            "fmap",
            {
                "Units": "Hz",
                "Description": "Local field",
                "Method": _METHOD_TEXT[pipeline["bfr_method"]],
                **coil_meta,
            },
        ),
        ("magnitude", "magnitude", "local", "fmap", {"Description": mag_text, **coil_meta}),
    ]


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", label)


def init_subject_wf(
    *,
    acquisitions: Sequence[Acquisition],
    output_dir: str | Path,
    raw_root: str | Path,
    pipeline: dict[str, Any],
    n_threads: int = 1,
    name: str | None = None,
) -> pe.Workflow:
    """All acquisitions of one subject, each reconstructed and written as BIDS derivatives.

    Parameters
    ----------
    acquisitions : sequence of Acquisition
        The subject's multi-echo GRE acquisitions (:func:`qsmflow.io.bids.collect_acquisitions`).
    output_dir : path
        Root of the derivatives dataset (``<out>/qsmflow``).
    raw_root : path
        Root of the raw BIDS dataset (for ``bids:raw:`` sources in the sidecars).
    pipeline : dict
        Validated pipeline options (:mod:`qsmflow.workflows.pipelines`).
    n_threads : int
        Threads per node.
    """
    if not acquisitions:
        raise ValueError("init_subject_wf needs at least one acquisition")
    subject = acquisitions[0].subject
    wf = pe.Workflow(name=name or f"sub_{_safe(subject)}_wf")
    n_acq = len(acquisitions)
    report_fields = (
        "magnitude",
        "mask",
        "local_mask",
        "field_hz",
        "local_field",
        "chi",
        "unwrapped",
    )
    merges = {f: pe.Node(niu.Merge(n_acq), name=f"collect_{f}") for f in report_fields}
    largest = max(math.prod(a.shape) for a in acquisitions)
    report = pe.Node(
        QCReport(
            out_dir=str(output_dir),
            subject=subject,
            labels=[a.label for a in acquisitions],
            local_field_units="Hz",
        ),
        name="ds_report",
        mem_gb=round(0.3 + 8 * 4 * largest / 1e9, 2),
    )
    for field, merge in merges.items():
        wf.connect(merge, "out", report, "unwrapped_phase" if field == "unwrapped" else field)
    segs = [a.segmentation for a in acquisitions]
    if all(segs):
        report.inputs.segmentation = segs
    qsm_wfs: dict[int, pe.Workflow] = {}
    for index, acq in enumerate(acquisitions, start=1):
        tag = _safe(acq.label.removeprefix(f"sub-{subject}").strip("_")) or "main"
        qsm = init_qsm_wf(
            n_voxels=math.prod(acq.shape),
            n_echoes=len(acq.phase),
            mask_method=pipeline["mask_method"],
            bet_frac=pipeline["bet_frac"],
            bet_exclude_csf=pipeline["bet_exclude_csf"],
            unwrap_method=pipeline["unwrap_method"],
            unwrap_mode=pipeline["unwrap_mode"],
            combine=pipeline["combine"],
            bfr_method=pipeline["bfr_method"],
            inversion_method=pipeline["inversion_method"],
            two_pass=pipeline["two_pass"],
            existing_mask=acq.mask is not None,
            n_coils=acq.n_coils,
            coil_combine=check_coil_combination(pipeline, acq),
            n_threads=n_threads,
            name=f"qsm_{tag}_wf",
        )
        qsm.inputs.inputnode.phase = list(acq.phase)
        qsm.inputs.inputnode.magnitude = list(acq.magnitude)
        qsm.inputs.inputnode.echo_times = list(acq.echo_times_s)
        qsm.inputs.inputnode.b0_tesla = acq.b0_tesla
        if acq.mask is not None:
            qsm.inputs.inputnode.mask = acq.mask
        common = {"MagneticFieldStrength": acq.b0_tesla, "EchoTime": list(acq.echo_times_s)}
        for field, suffix, desc, datatype, meta in _sinks(pipeline, acq):
            sink = pe.Node(
                DerivativesDataSink(
                    base_directory=str(output_dir),
                    source_file=acq.phase[0],
                    raw_root=str(raw_root),
                    suffix=suffix,
                    datatype=datatype,
                    metadata={**common, **meta},
                    **({"desc": desc} if desc else {}),
                ),
                name=f"ds_{tag}_{suffix}_{desc or 'main'}",
                mem_gb=0.1,
            )
            # the local field is sunk in Hz (BIDS fieldmap units)
            src = "local_field_hz" if field == "local_field" else field
            wf.connect(qsm, f"outputnode.{src}", sink, "in_file")
            if field == "mask" and acq.mask is None:  # the method that actually ran
                wf.connect(qsm, "brain_mask.out_sidecar", sink, "in_metadata_file")
            # the report shows the files as written (it reads their sidecars)
            if field in merges and not (suffix == "magnitude" and desc):
                wf.connect(sink, "out_file", merges[field], f"in{index}")
        wf.connect(qsm, "outputnode.unwrapped", merges["unwrapped"], f"in{index}")
        qsm_wfs[id(acq)] = qsm
    if pipeline["multi_orientation"]:
        _connect_multi_orientation(
            wf, acquisitions, qsm_wfs, pipeline, output_dir, raw_root, n_threads
        )
    return wf


def _connect_multi_orientation(wf, acquisitions, qsm_wfs, pipeline, output_dir, raw_root, n):
    """COSMOS/STI for every group of >= 2 orientations (acquisitions differing only in the
    pipeline's ``orientation_entity``), fed by each orientation's QSM workflow."""
    entity = pipeline["orientation_entity"]
    for members in group_orientations(acquisitions, entity).values():
        if len(members) < 2:
            continue
        first = members[0]
        tag = _safe(first.label.removeprefix(f"sub-{first.subject}").strip("_")) or "main"
        multi = init_multi_orientation_wf(
            n_orientations=len(members),
            n_voxels=max(math.prod(a.shape) for a in members),
            group_entity=entity,
            output_dir=str(output_dir),
            raw_root=str(raw_root),
            source_files=[a.phase[0] for a in members],
            n_threads=n,
            name=f"multi_orientation_{tag}_wf",
        )
        for field, port in (
            ("magnitude", "magnitudes"),
            ("local_field", "local_fields"),
            ("local_mask", "masks"),
        ):
            merge = pe.Node(niu.Merge(len(members)), name=f"orientations_{tag}_{field}")
            for i, acq in enumerate(members, start=1):
                wf.connect(qsm_wfs[id(acq)], f"outputnode.{field}", merge, f"in{i}")
            wf.connect(merge, "out", multi, f"inputnode.{port}")


def init_qsmflow_wf(
    *,
    acquisitions: Sequence[Acquisition],
    output_dir: str | Path,
    raw_root: str | Path,
    pipeline: dict[str, Any],
    n_threads: int = 1,
    name: str = "qsmflow_wf",
) -> pe.Workflow:
    """The dataset: one :func:`init_subject_wf` per subject (independent, so they run in
    parallel under MultiProc or as separate jobs under SLURM)."""
    wf = pe.Workflow(name=name)
    by_subject: dict[str, list[Acquisition]] = {}
    for acq in acquisitions:
        by_subject.setdefault(acq.subject, []).append(acq)
    for _, acqs in sorted(by_subject.items()):
        wf.add_nodes(
            [
                init_subject_wf(
                    acquisitions=acqs,
                    output_dir=output_dir,
                    raw_root=raw_root,
                    pipeline=pipeline,
                    n_threads=n_threads,
                )
            ]
        )
    return wf
