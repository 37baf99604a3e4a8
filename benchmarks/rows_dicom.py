"""Benchmark rows of DICOM to BIDS: a simulated 4-echo Siemens-style scan stored as classic DICOM
(one file per slice; magnitude and phase series), sorted from its headers and converted with
dcm2niix into BIDS (phase scaled to radians), as ``qsmflow-dicom2bids --nprocs N`` does; and the
same scan GE-style (``-ge`` rows: one series of real/imaginary images with GE's handedness and
pi on every other slice), which adds the complex-to-polar step, the phase polarity inversion and
the slice-chop detection and correction.

The measured call is :func:`qsmflow.dicom.convert.dicom_to_bids` (header reading, sorting,
naming, one dcm2niix run per volume, phase scaling, gzipped NIfTI and sidecars). Accuracy: the
largest phase and magnitude differences from the simulated images, against the DICOM
quantisation (pi/2048 per phase step, 1/4095 of the range for magnitude); for GE real/imaginary
data the phase error is taken where the magnitude exceeds 10 % of its maximum (rounding the
real and imaginary parts moves the phase by up to asin(step / |s|), large only in the noise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import Benchmark, load, save_truth

#: Place in the table: conversion comes before every processing step.
ORDER = 5

N_SLICES = 176


def dicom_setup(bench: Benchmark, workdir: Path) -> dict:
    import os

    from qsmflow.dicom.synthetic import DicomFlavour, write_simulated_dicom
    from qsmflow.phantom import make_head_model
    from qsmflow.simulate import AcquisitionParams, simulate_acquisition

    params = AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm)
    sim = simulate_acquisition(make_head_model(0), params, n_threads=os.cpu_count() or 1)
    dicom_dir = workdir / "dicom"
    ge = "-ge-" in bench.name
    flavour = DicomFlavour("ge", parts=("real", "imag")) if ge else DicomFlavour("siemens")
    files = write_simulated_dicom(sim, dicom_dir, flavour, patient_id="BENCH")
    truth = save_truth(
        workdir,
        magnitude=sim.magnitude,
        phase=sim.phase,
        affine=sim.affine,
        mag_step=float(sim.magnitude.max()) * 1.05 / (32000 if ge else 4095),
    )
    return {
        "dicom_dir": str(dicom_dir),
        "bids_dir": str(workdir / "bids"),
        "n_files": len(files),
        "truth": truth,
        "ge": ge,
    }


def dicom_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.dicom.convert import dicom_to_bids

    def call() -> dict:
        plan, result = dicom_to_bids(inputs["dicom_dir"], inputs["bids_dir"], n_threads=n_threads)
        if result.failed:
            raise RuntimeError(f"conversion failed: {result.failed}")
        return {"written": [str(p) for p in result.written], "n_planned": len(plan.planned)}

    return call


def _on_truth_grid(data: np.ndarray, affine: np.ndarray, ref: np.ndarray) -> np.ndarray:
    m = np.linalg.inv(ref) @ affine
    perm = np.rint(m[:3, :3])
    order = [int(np.argmax(np.abs(perm[:, j]))) for j in range(3)]
    out = np.transpose(data, np.argsort(order))
    p = perm[:, np.argsort(order)]
    for axis in range(3):
        if p[axis, axis] < 0:
            out = np.flip(out, axis)
    return out


def dicom_check(bench: Benchmark, inputs: dict, output: dict) -> str:
    import nibabel as nib

    truth = load(inputs["truth"])
    worst_phase = worst_mag = 0.0
    for path in output["written"]:
        img = nib.load(path)
        echo = int(Path(path).name.split("_echo-")[1].split("_")[0]) - 1
        data = _on_truth_grid(np.asarray(img.dataobj, np.float32), img.affine, truth["affine"])
        if "part-phase" in path:
            diff = np.angle(np.exp(1j * (data - truth["phase"][..., echo])))
            if inputs.get("ge"):  # real/imaginary rounding: phase exact only where |s| is large
                mag = truth["magnitude"][..., echo]
                diff = diff[mag > 0.1 * mag.max()]
            worst_phase = max(worst_phase, float(np.abs(diff).max()))
        else:
            worst_mag = max(worst_mag, float(np.abs(data - truth["magnitude"][..., echo]).max()))
    if inputs.get("ge"):
        return (
            f"{inputs['n_files']} files -> {len(output['written'])} NIfTI; max |phase err| "
            f"(|s| > 10 % max) {worst_phase:.2e} rad; max |mag err| "
            f"{worst_mag / truth['mag_step']:.2f} steps of the real/imag quantisation"
        )
    return (
        f"{inputs['n_files']} files -> {len(output['written'])} NIfTI; max |phase err| "
        f"{worst_phase:.2e} rad (step/2 {np.pi / 4096:.2e}); max |mag err| "
        f"{worst_mag / truth['mag_step']:.2f} steps"
    )


def rows() -> list[Benchmark]:
    funcs = {"setup": dicom_setup, "prepare": dicom_prepare, "check": dicom_check}
    return [
        Benchmark(
            "dicom2bids-2mm",
            f"DICOM sort + dcm2niix (4 echoes x 2 parts x {N_SLICES // 2} slices)",
            (88, 104, N_SLICES // 2),
            (2.0, 2.0, 2.0),
            quick=True,
            **funcs,
        ),
        Benchmark(
            "dicom2bids-1mm",
            f"DICOM sort + dcm2niix (4 echoes x 2 parts x {N_SLICES} slices)",
            (176, 208, N_SLICES),
            (1.0, 1.0, 1.0),
            **funcs,
        ),
        Benchmark(
            "dicom2bids-ge-1mm",
            f"DICOM sort + dcm2niix, GE real/imag (4 echoes x 2 parts x {N_SLICES} slices)",
            (176, 208, N_SLICES),
            (1.0, 1.0, 1.0),
            **funcs,
        ),
    ]
