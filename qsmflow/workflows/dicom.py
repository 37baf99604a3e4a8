"""Nipype workflow: a DICOM folder into a BIDS dataset (:func:`init_dicom_to_bids_wf`)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.dicom import ConvertDicom, SortDicom

__all__ = ["init_dicom_to_bids_wf"]


def init_dicom_to_bids_wf(
    *,
    participant_label: str | None = None,
    session: str | None = None,
    mapping_file: str | None = None,
    repeats: str = "run",
    overwrite: bool = False,
    phase_polarity: str = "auto",
    n_procs: int = 1,
    name: str = "dicom_to_bids_wf",
) -> pe.Workflow:
    """Sort DICOM headers, plan the BIDS names, convert with dcm2niix.

    Parameters
    ----------
    participant_label, session : str
        Labels for all data (default: from the headers).
    mapping_file : str
        JSON rules for labels (see :mod:`qsmflow.dicom.naming`).
    repeats : {"run", "acq"}
        Repeated scans of one protocol (head orientations) as ``run-<n>`` or ``acq-ori<n>``.
    overwrite : bool
        Replace files that already exist in the BIDS dataset.
    phase_polarity : {"auto", "keep", "invert"}
        Phase sign: ``auto`` negates GE phase (opposite handedness to Siemens and Philips).
    n_procs : int
        Parallel dcm2niix runs.

    Inputs
    ------
    dicom_dir
        Folder of DICOM files (read only).
    bids_dir
        BIDS dataset to create or add to.

    Outputs
    -------
    bids_files
        NIfTI files written.
    summary
        What was found, skipped and planned (text).
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["dicom_dir", "bids_dir"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["bids_files", "summary"]), name="outputnode")
    sort = pe.Node(SortDicom(repeats=repeats), name="sort_dicom", mem_gb=0.5, n_procs=1)
    if participant_label:
        sort.inputs.participant_label = participant_label
    if session:
        sort.inputs.session = session
    if mapping_file:
        sort.inputs.mapping_file = mapping_file
    convert = pe.Node(
        ConvertDicom(overwrite=overwrite, num_threads=n_procs, phase_polarity=phase_polarity),
        name="convert_dicom",
        mem_gb=1.0 + 0.25 * n_procs,
        n_procs=n_procs,
    )
    workflow.connect([
        (inputnode, sort, [("dicom_dir", "dicom_dir")]),
        (inputnode, convert, [("bids_dir", "bids_dir")]),
        (sort, convert, [("plan_file", "plan_file")]),
        (sort, outputnode, [("summary", "summary")]),
        (convert, outputnode, [("bids_files", "bids_files")]),
    ])  # fmt: skip
    return workflow
