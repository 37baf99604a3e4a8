"""Nipype interfaces for DICOM to BIDS: dcm2niix for one volume, sorting and conversion steps.

:class:`Dcm2niixVolume` subclasses Nipype's own ``Dcm2niix`` wrapper; it converts one folder
holding the images of exactly one volume (qsmflow's sorter puts links to them there), so each
output is known to be that volume, whatever names dcm2niix gives its files.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from nipype.interfaces.dcm2nii import Dcm2niix, Dcm2niixInputSpec

__all__ = ["ConvertDicom", "Dcm2niixVolume", "SortDicom", "dcm2niix_executable"]


def dcm2niix_executable() -> str:
    """The dcm2niix binary: the one on PATH, else the one the PyPI package ``dcm2niix`` ships."""
    import shutil

    found = shutil.which("dcm2niix")
    if found:
        return found
    try:
        import dcm2niix
    except ImportError:
        raise FileNotFoundError(
            "dcm2niix not found: install it with 'pip install dcm2niix' (or put it on PATH)"
        ) from None
    return dcm2niix.bin


class _Dcm2niixVolumeInputSpec(Dcm2niixInputSpec):
    ignore_defaults = traits.Bool(
        True,
        usedefault=True,
        argstr="-g i",
        desc="ignore the user's dcm2niix defaults file (~/.dcm2nii.ini), so that every run "
        "converts the same way",
    )


class Dcm2niixVolume(Dcm2niix):
    """dcm2niix on a folder that holds one volume (uncompressed NIfTI, BIDS sidecar).

    Defaults differ from Nipype's ``Dcm2niix``: no compression (qsmflow rewrites the image
    anyway), slices merged regardless of per-slice differences (``-m 1``; the folder holds one
    volume by construction), Philips display values (``-p n``: RescaleSlope/Intercept, so that
    phase keeps the scanner's radian or milliradian scale; qsmflow asks for precise values,
    ``philips_float=True``, for magnitude), and the user's defaults file ignored (``-g i``).

    >>> Dcm2niixVolume(source_dir=".", out_filename="vol").cmdline  # doctest: +ELLIPSIS
    '...dcm2niix -b y -z n -x n -t n -g i -m 1 -w 1 -f vol -o . -p n -s n -v n .'
    """

    input_spec = _Dcm2niixVolumeInputSpec

    def __init__(self, **inputs):
        self._cmd = dcm2niix_executable()
        inputs.setdefault("compress", "n")
        inputs.setdefault("merge_imgs", 1)
        inputs.setdefault("philips_float", False)
        inputs.setdefault("name_conflicts", 1)
        super().__init__(**inputs)
        self.terminal_output = "allatonce"

    def _format_arg(self, opt, spec, val):
        if opt == "ignore_defaults":
            return spec.argstr if val else ""
        return super()._format_arg(opt, spec, val)


class _SortDicomInputSpec(BaseInterfaceInputSpec):
    dicom_dir = Directory(exists=True, mandatory=True, desc="folder of DICOM files (read only)")
    participant_label = traits.Str(desc="subject label for all data (without 'sub-')")
    session = traits.Str(desc="session label for all data (without 'ses-')")
    mapping_file = File(exists=True, desc="JSON mapping of patients, studies and series")
    repeats = traits.Enum(
        "run",
        "acq",
        usedefault=True,
        desc="repeated scans of a protocol as run-1, run-2 or as acq-ori1, acq-ori2",
    )


class _SortDicomOutputSpec(TraitedSpec):
    plan_file = File(exists=True, desc="pickled conversion plan (qsmflow.dicom.convert.Plan)")
    planned_files = traits.List(traits.Str, desc="BIDS paths (relative) that will be written")
    summary = traits.Str(desc="what was found, skipped and planned (text)")


class SortDicom(SimpleInterface):
    """Read DICOM headers, sort them into acquisitions and plan the BIDS names."""

    input_spec = _SortDicomInputSpec
    output_spec = _SortDicomOutputSpec

    def _run_interface(self, runtime):
        from ..dicom.convert import plan_dicom_to_bids

        plan = plan_dicom_to_bids(
            self.inputs.dicom_dir,
            participant_label=self.inputs.participant_label or None,
            session=self.inputs.session or None,
            mapping_file=self.inputs.mapping_file or None,
            repeats=self.inputs.repeats,
        )
        path = Path(runtime.cwd) / "dicom_plan.pkl"
        with open(path, "wb") as f:
            pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
        self._results["plan_file"] = str(path)
        self._results["planned_files"] = [str(p) for p in plan.planned_paths]
        self._results["summary"] = plan.summary()
        return runtime


class _ConvertDicomInputSpec(BaseInterfaceInputSpec):
    plan_file = File(exists=True, mandatory=True, desc="conversion plan from SortDicom")
    bids_dir = traits.Str(mandatory=True, desc="BIDS dataset folder (created or added to)")
    overwrite = traits.Bool(False, usedefault=True, desc="replace files that already exist")
    num_threads = traits.Int(1, usedefault=True, desc="parallel dcm2niix runs")
    phase_polarity = traits.Enum(
        "auto",
        "keep",
        "invert",
        usedefault=True,
        desc="phase sign: auto negates GE phase (opposite handedness to Siemens/Philips), keep "
        "writes the scanner's sign, invert negates all phase (rad)",
    )


class _ConvertDicomOutputSpec(TraitedSpec):
    bids_files = traits.List(File(exists=True), desc="NIfTI files written")


class ConvertDicom(SimpleInterface):
    """Convert a plan with dcm2niix into the BIDS dataset (phase in rad, coils stacked)."""

    input_spec = _ConvertDicomInputSpec
    output_spec = _ConvertDicomOutputSpec

    def _run_interface(self, runtime):
        from ..dicom.convert import convert_plan

        with open(self.inputs.plan_file, "rb") as f:
            plan = pickle.load(f)
        result = convert_plan(
            plan,
            self.inputs.bids_dir,
            work_dir=Path(runtime.cwd) / "dcm2niix",
            overwrite=self.inputs.overwrite,
            n_threads=max(1, int(self.inputs.num_threads)),
            phase_polarity=self.inputs.phase_polarity,
        )
        if result.failed:
            raise RuntimeError(
                "DICOM conversion failed for "
                + "; ".join(f"{label}: {why}" for label, why in result.failed)
            )
        self._results["bids_files"] = [os.fspath(p) for p in result.written]
        return runtime
