"""Acceptance of the deep-learning inversions (issue 11) on a subject never used in training.

Head model 0 (the 2 mm head of ``test_inversion_acceptance.py``, with the noise of a multi-echo
field fit at SNR 100) is the test subject; the shipped weights were trained on heads 100-107
(recorded in their provenance JSON, checked here). Reference numbers on this input: TKD 44.6 %,
TV-ADMM 15.8 % demeaned NRMSE.

Issue 11 asks MoDL-QSM and SpiNet-QSM to beat TV-ADMM with a deep-grey-matter slope within 0.1
of 1, and DIP to beat TKD. Measured with the shipped weights (CPU-trained, chosen by their
error on validation head 108, never on head 0): MoDL 14.5 % (DGM |1 - slope| 0.058), SpiNet
14.0 % (0.035), TV-ADMM 15.8 % (0.018), TKD 44.6 % (0.049).

DIP (no training) is tested on the same head simulated at 4 mm, where a CPU fit is affordable:
with the MoDIP data-fidelity step, 100 iterations reach 42.0 % against TKD's 49.5 % (a tuning
run with 7e-4 ppm noise gave 43.9 / 40.1 / 30.2 / 26.9 % after 100 / 150 / 300 / 500 iterations);
the 2 mm numbers are in the benchmark rows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qsmflow.algorithms import inversion
from qsmflow.algorithms.metrics import dgm_linearity, nrmse_demeaned
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

from .test_dl import _require_torch
from .test_inversion_acceptance import VOX, field_noise_sd_ppm, head  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(head):  # noqa: F811
    """chi of each method on the test head, computed once: name -> (NRMSE %, |1 - slope|)."""
    _require_torch()
    sim, field, _ = head
    out = {}
    chi = inversion.tv_admm(field, sim.mask, VOX, sim.b0_dir, magnitude=sim.magnitude, n_threads=2)
    out["tv"] = chi
    for kind in ("modl", "spinet"):
        out[kind] = getattr(inversion, kind)(field, sim.mask, VOX, sim.b0_dir, n_threads=2)
    return {
        k: (
            nrmse_demeaned(v, sim.chi_ppm, sim.mask),
            dgm_linearity(v, sim.chi_ppm, sim.segmentation),
        )
        for k, v in out.items()
    } | {"chi": out}


@pytest.mark.parametrize("kind", ["modl", "spinet"])
def test_test_subject_was_not_trained_on(kind):
    _require_torch()
    from qsmflow.dl.inference import shipped_weights

    meta = json.loads(shipped_weights(kind)[1].read_text())
    assert 0 not in meta["data"]["train_seeds"] and meta["data"]["validation"]["seed"] != 0


@pytest.mark.parametrize("kind", ["modl", "spinet"])
def test_unrolled_networks_beat_tv_admm_with_linear_dgm(head, results, kind):  # noqa: F811
    sim, _, err_tkd = head
    chi = results["chi"][kind]
    assert chi.dtype == np.float32 and np.all(np.isfinite(chi)) and not chi[~sim.mask].any()
    err, dgm = results[kind]
    err_tv = results["tv"][0]
    assert err < err_tv < err_tkd, f"{kind}: {err:.1f} % against TV-ADMM {err_tv:.1f} %"
    assert dgm < 0.1, f"{kind}: deep-grey-matter |1 - slope| {dgm:.3f}"


def test_dip_beats_tkd():
    _require_torch()
    vox = (4.0, 4.0, 4.0)
    params = AcquisitionParams(matrix=(44, 52, 40), voxel_size_mm=vox)
    sim = simulate_acquisition(make_head_model(0), params, rng=np.random.default_rng(0))
    noise = np.random.default_rng(11).standard_normal(sim.mask.shape) * field_noise_sd_ppm(sim)
    field = np.where(sim.mask, sim.local_field_ppm + noise, 0).astype(np.float32)
    chi_tkd = inversion.tkd(field, sim.mask, vox, sim.b0_dir, threshold=0.19)
    chi = inversion.dip(field, sim.mask, vox, sim.b0_dir, n_iter=100, n_threads=2)
    assert chi.dtype == np.float32 and not chi[~sim.mask].any()
    err, err_tkd = (nrmse_demeaned(c, sim.chi_ppm, sim.mask) for c in (chi, chi_tkd))
    assert err < err_tkd - 3, f"DIP {err:.1f} % against TKD {err_tkd:.1f} %"
