"""Benchmark rows of the BIDS App's coil-combination node: ``CoilCombination`` (MCPC-3D-S,
Eckstein et al. 2018) on files, as ``init_coil_combine_wf`` runs it.

Inputs: the simulated head (model 0, SNR 80, 4 echoes) with 8 uncombined receive channels,
written as one gzipped 4-D NIfTI (x, y, z, coil) per echo and part, as ``qsmflow-dicom2bids``
and ``qsmflow-simulate --coils`` write them. The timed call reads them, combines and writes the
per-echo combined magnitude and phase (``write_stacks=False``, the workflow's setting), so
the row adds file I/O to the algorithm-only ``mcpc3ds`` rows of run.py; its peak memory is
compared with the node's ``mem_gb`` (``estimate_mem_gb`` with the coil count).

Accuracy: the echo-to-echo phase of the combined images against the simulated field,
``wrap(phi_e - phi_1 - 2 pi gamma_bar B0 (TE_e - TE_1) field)``, RMS over the brain and echoes
(no unwrapping needed; the channels' offsets cancel only if they were removed consistently).

Measured with ``--threads 2`` on a 2-CPU machine shared with other jobs (load 10-13): 2 mm
14.7 s, peak 0.50 GB (mem_gb 0.66), 0.027 rad; 1 mm 131 s, peak 2.43 GB (mem_gb 3.17),
0.023 rad. The algorithm alone (``mcpc3ds-2mm``, same load) took 3.5 s: most of the node's time
is reading and writing gzipped NIfTI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    ISO_1MM,
    ISO_2MM,
    MATRIX_PHASE_1MM,
    MATRIX_PHASE_2MM,
    Benchmark,
    load,
    save_truth,
    simulated_head,
)

#: After the phase rows of run.py (0-49), before background removal.
ORDER = 45

#: Receive channels and echoes (the issue's MCPC-3D-S target: 8 coils, 4 echoes).
N_COILS = 8


def coil_node_setup(bench: Benchmark, workdir: Path) -> dict:
    from qsmflow.io.nifti import save_nifti

    head = simulated_head(
        bench, ("magnitude", "phase", "mask", "total_field_ppm", "params"), n_coils=N_COILS
    )
    params = head.pop("params")
    affine = _affine(bench.voxel_mm)
    files: dict[str, list[str]] = {"mag": [], "phase": []}
    for e in range(len(params.echo_times_s)):
        for part, arr in (("mag", head["magnitude"]), ("phase", head["phase"])):
            path = workdir / f"sub-01_echo-{e + 1}_part-{part}_MEGRE.nii.gz"
            save_nifti(arr[..., e, :], affine, path)
            files[part].append(str(path))
    (workdir / "run").mkdir()
    return {
        "phase": files["phase"],
        "magnitude": files["mag"],
        "echo_times_s": list(params.echo_times_s),
        "b0_tesla": params.b0_tesla,
        "cwd": str(workdir / "run"),
        "truth": save_truth(workdir, mask=head["mask"], total_field_ppm=head["total_field_ppm"]),
    }


def _affine(voxel_mm):
    import numpy as np

    return np.diag([*voxel_mm, 1.0])


def coil_node_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.interfaces import CoilCombination

    iface = CoilCombination(
        in_phase=inputs["phase"],
        in_magnitude=inputs["magnitude"],
        echo_times=inputs["echo_times_s"],
        method="mcpc3ds",
        write_stacks=False,
        num_threads=n_threads,
    )

    def call() -> dict:
        out = iface.run(cwd=inputs["cwd"]).outputs
        return {"phase": list(out.out_phase_echoes), "magnitude": list(out.out_magnitude_echoes)}

    return call


def coil_node_check(bench: Benchmark, inputs: dict, output: dict) -> str:
    import numpy as np

    from qsmflow import GAMMA_BAR_MHZ_PER_T
    from qsmflow.io.nifti import load_nifti
    from qsmflow.workflows.qsm import estimate_mem_gb

    truth = load(inputs["truth"])
    mask, field = truth["mask"], truth["total_field_ppm"]
    tes = inputs["echo_times_s"]
    hz = field * np.float32(GAMMA_BAR_MHZ_PER_T * inputs["b0_tesla"])
    first = load_nifti(output["phase"][0])[0]
    errors = []
    for e in range(1, len(tes)):
        phase = load_nifti(output["phase"][e])[0]
        model = 2 * np.pi * hz * (tes[e] - tes[0])
        errors.append(np.angle(np.exp(1j * (phase - first - model)))[mask])
    rms = float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))
    mem = estimate_mem_gb(math.prod(bench.matrix), len(tes) * N_COILS, factor=3.5)
    return (
        f"echo-difference phase error {rms:.3f} rad RMS in the brain; node mem_gb {mem:.2f} GB "
        f"(compare the peak column)"
    )


def rows() -> list[Benchmark]:
    funcs = {"setup": coil_node_setup, "prepare": coil_node_prepare, "check": coil_node_check}
    step = f"CoilCombination node ({N_COILS} coils, files)"
    return [
        Benchmark("coil-node-2mm", step, MATRIX_PHASE_2MM, ISO_2MM, **funcs, quick=True),
        Benchmark("coil-node-1mm", step, MATRIX_PHASE_1MM, ISO_1MM, **funcs),
    ]
