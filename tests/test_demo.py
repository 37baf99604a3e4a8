"""qsmflow-demo end to end: simulate, reconstruct, score; outputs are valid BIDS derivatives."""

import json

import pytest

from qsmflow.cli.demo import main as demo_main

from .test_simulate import _validate


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert demo_main([str(out), "--subjects", "1", "--voxel-size", "2", "--nprocs", "2"]) == 0
    return out


def test_demo_scores_are_sane(demo_run):
    scores = json.loads((demo_run / "scores.json").read_text())["sub-01"]
    # default pipeline (phase-quality mask, V-SHARP, TV-ADMM), measured at 2 mm: inside the
    # reconstructed (local-field) mask NRMSE 33 %, correlation 0.94, DGM |1-slope| 0.02,
    # deep grey NRMSE 18 %; over the whole true brain (eroded voxels count as zeros)
    # correlation 0.73 with coverage 0.70 (V-SHARP erodes 6 mm); mask Dice 0.99
    inside = scores["chi_in_local_mask"]
    assert inside["nrmse"] < 45
    assert inside["correlation"] > 0.85
    assert inside["dgm_linearity"] < 0.1
    assert inside["nrmse_dgm"] < 35
    whole = scores["chi"]
    assert whole["correlation"] > 0.6
    assert whole["coverage"] > 0.6
    assert scores["brain_mask_dice"] > 0.95
    assert scores["local_field_nrmse_percent"] < 45
    assert (demo_run / "qsmflow" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").exists()


def test_demo_outputs_pass_the_bids_validator(demo_run):
    deriv = demo_run / "qsmflow"
    assert (deriv / "sub-01/anat/sub-01_Chimap.nii.gz").exists()
    assert json.loads((deriv / "sub-01/anat/sub-01_Chimap.json").read_text())["Units"] == "ppm"
    assert json.loads((deriv / "sub-01/fmap/sub-01_fieldmap.json").read_text())["Units"] == "Hz"
    errors, warnings = _validate(deriv)
    assert errors == []
    assert warnings == []


def test_demo_refuses_to_overwrite(demo_run, capsys):
    assert demo_main([str(demo_run), "--voxel-size", "4"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_scores_agree_with_qsm_ci_on_the_simulated_labels(demo_run):
    """The simulator's segmentation uses the challenge label scheme, so qsm-ci's scorer runs
    unchanged on our outputs and gives the numbers the demo reports."""
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    import nibabel as nib
    import numpy as np

    gt = demo_run / "bids/derivatives/qsmflow-simulate/sub-01/anat"
    recon = nib.load(demo_run / "qsmflow/sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    truth = nib.load(gt / "sub-01_Chimap.nii.gz").get_fdata()
    mask = nib.load(gt / "sub-01_desc-brain_mask.nii.gz").get_fdata()
    seg = np.rint(nib.load(gt / "sub-01_desc-phantom_dseg.nii.gz").get_fdata()).astype(np.int32)
    theirs, _ = qsm_eval.score_arrays(recon, truth, mask, "chi", seg=seg)
    ours = json.loads((demo_run / "scores.json").read_text())["sub-01"]["chi"]
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
