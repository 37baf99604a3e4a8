"""Shared pytest fixtures."""

from __future__ import annotations

import numpy as np
import pytest

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
