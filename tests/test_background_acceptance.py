"""Acceptance of the background-removal methods on a simulated head at 1.5 mm.

The simulator's total field holds the background of the air, skull, scalp and neck around the
brain (computed beyond the field of view, then shimmed to 2nd order); its true local field is
the field of the brain's own (demeaned) susceptibility. Every method's local field is scored
by the demeaned NRMSE inside the mask that method returns, against that truth.

1.5 mm is the coarsest grid at which the best method passes the brief's 30 % with a margin of
more than a point (at 2 mm V-SHARP, the best, scores 29.9 %; at 1 mm 28.4 %). Each method's own
tests check it at 2 mm on the shared fixture.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow.algorithms.background import ismv, lbv, pdf, resharp, sharp, vsharp
from qsmflow.algorithms.metrics import nrmse_demeaned
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

pytestmark = pytest.mark.slow

VOX = (1.5, 1.5, 1.5)


@pytest.fixture(scope="module")
def head_1p5mm():
    """Head model 0 at 1.5 mm (118 x 138 x 106; the 1 mm protocol's field of view)."""
    params = AcquisitionParams(matrix=(118, 138, 106), voxel_size_mm=VOX)
    return simulate_acquisition(
        make_head_model(0), params, rng=np.random.default_rng(0), n_threads=2
    )


def test_local_field_accuracy(head_1p5mm):
    sim = head_1p5mm
    runs = {
        "sharp": lambda f, m: sharp(f, m, VOX, n_threads=2),
        "vsharp": lambda f, m: vsharp(f, m, VOX, n_threads=2),
        "resharp": lambda f, m: resharp(f, m, VOX, n_threads=2),
        "ismv": lambda f, m: ismv(f, m, VOX, n_threads=2),
        "pdf": lambda f, m: pdf(f, m, VOX, sim.b0_dir, n_threads=2),
        "lbv": lambda f, m: lbv(f, m, VOX, n_threads=2),
    }
    nrmse, kept = {}, {}
    for name, run in runs.items():
        local, roi = run(sim.total_field_ppm, sim.mask)
        assert roi.any() and not (roi & ~sim.mask).any(), name
        assert not local[~roi].any(), name
        nrmse[name] = nrmse_demeaned(local, sim.local_field_ppm, roi)
        kept[name] = roi.sum() / sim.mask.sum()
    # Measured demeaned NRMSE (fraction of the brain mask returned): SHARP 33.1 % (0.72),
    # V-SHARP 28.6 % (0.72), RESHARP 31.4 % (0.72), iSMV 28.9 % (0.72), PDF 33.0 % (0.82),
    # LBV 29.4 % (0.76). The brief: each of V-SHARP, RESHARP, iSMV, PDF and LBV below 40 %,
    # the best below 30 %.
    for name in ("vsharp", "resharp", "ismv", "pdf", "lbv"):
        assert nrmse[name] < 40, (name, nrmse[name])
    assert min(nrmse[n] for n in ("vsharp", "resharp", "ismv", "pdf", "lbv")) < 30, nrmse
    # the SMV methods keep the brain eroded by 6 mm; LBV and PDF keep more of it
    assert 0.68 < kept["vsharp"] < 0.76
    assert kept["lbv"] > kept["vsharp"] and kept["pdf"] > kept["lbv"]
