"""Shared pytest fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow.io.nifti import save_nifti
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, SimulatedAcquisition, simulate_acquisition

#: Protocol of the cached 2 mm simulation (the simulator's default TEs, B0 and SNR).
SIM_2MM_PARAMS = AcquisitionParams(matrix=(88, 104, 80), voxel_size_mm=(2.0, 2.0, 2.0))


@pytest.fixture(scope="session")
def sim_2mm() -> SimulatedAcquisition:
    """One simulated 2 mm multi-echo acquisition of head model 0 (about 2 s, cached).

    It is shared by every test in the session, so its arrays are made read-only.
    """
    sim = simulate_acquisition(
        make_head_model(0), SIM_2MM_PARAMS, rng=np.random.default_rng(0), n_threads=2
    )
    for value in vars(sim).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return sim


#: Echo times (s) of the interface fixture.
INTERFACE_TES = [0.005, 0.010, 0.015, 0.020]


@pytest.fixture(scope="session")
def interface_data(tmp_path_factory):
    """A 3 mm simulated head written as one 3-D NIfTI per echo and part, plus truth."""
    root = tmp_path_factory.mktemp("ifdata")
    sim = simulate_acquisition(
        make_head_model(2),
        AcquisitionParams(
            matrix=(59, 69, 53), voxel_size_mm=(3.0, 3.0, 3.0), echo_times_s=tuple(INTERFACE_TES)
        ),
        rng=np.random.default_rng(1),
    )
    files = {"mag": [], "phase": []}
    for e in range(len(INTERFACE_TES)):
        for part, arr in (("mag", sim.magnitude), ("phase", sim.phase)):
            path = root / f"sub-01_echo-{e + 1}_part-{part}_MEGRE.nii.gz"
            save_nifti(arr[..., e], sim.affine, path)
            files[part].append(str(path))
    save_nifti(sim.mask, sim.affine, root / "truemask.nii.gz")
    save_nifti(sim.total_field_ppm, sim.affine, root / "total_ppm.nii.gz")
    save_nifti(sim.local_field_ppm, sim.affine, root / "local_ppm.nii.gz")
    return {"root": root, "sim": sim, **files}
