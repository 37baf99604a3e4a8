"""Nipype workflow builders: :func:`init_qsm_wf` (one acquisition), :func:`init_subject_wf`,
:func:`init_qsmflow_wf` (the dataset)."""

from .base import init_qsmflow_wf, init_subject_wf
from .dicom import init_dicom_to_bids_wf
from .multi_orientation import init_multi_orientation_wf
from .qsm import init_qsm_wf

__all__ = [
    "init_dicom_to_bids_wf",
    "init_multi_orientation_wf",
    "init_qsm_wf",
    "init_qsmflow_wf",
    "init_subject_wf",
]
