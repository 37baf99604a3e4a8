"""Workflows and the qsmflow BIDS App: build every preset, run end to end, resume, bad input."""

from __future__ import annotations

import json
import math
import re

import nibabel as nib
import numpy as np
import pytest

from qsmflow.algorithms import metrics
from qsmflow.algorithms.background import vsharp
from qsmflow.algorithms.echoes import fit_field
from qsmflow.algorithms.inversion import tv_admm
from qsmflow.algorithms.masking import phase_quality_map, phase_quality_mask
from qsmflow.algorithms.reference import reference_to_mean
from qsmflow.algorithms.unwrap import unwrap_multi_echo
from qsmflow.cli.run import main as qsmflow_main
from qsmflow.cli.simulate import main as simulate_main
from qsmflow.io.bids import Acquisition
from qsmflow.workflows import init_qsm_wf, init_qsmflow_wf
from qsmflow.workflows.pipelines import load_pipeline, presets, validate_pipeline

from .test_simulate import _validate

GT = "derivatives/qsmflow-simulate"


def _fake_acq(sub, shape=(100, 120, 90)):
    return Acquisition(
        subject=sub,
        session=None,
        acquisition=None,
        run=None,
        phase=[
            f"/data/sub-{sub}/anat/sub-{sub}_echo-{e}_part-phase_MEGRE.nii.gz" for e in (1, 2, 3)
        ],
        magnitude=[
            f"/data/sub-{sub}/anat/sub-{sub}_echo-{e}_part-mag_MEGRE.nii.gz" for e in (1, 2, 3)
        ],
        echo_times_s=[0.005, 0.01, 0.015],
        b0_tesla=3.0,
        shape=shape,
    )


@pytest.mark.parametrize("preset", sorted(presets()))
def test_every_preset_builds(preset, tmp_path):
    _, pipeline = load_pipeline(preset)
    wf = init_qsmflow_wf(
        acquisitions=[_fake_acq("01"), _fake_acq("02")],
        output_dir=tmp_path,
        raw_root="/data",
        pipeline=pipeline,
        n_threads=2,
    )
    names = wf.list_node_names()
    assert any("sub_01_wf" in n for n in names) and any("sub_02_wf" in n for n in names)
    graph = wf._create_flat_graph()
    nodes = list(graph.nodes())
    assert len(nodes) > 20
    heavy = [n for n in nodes if n.name in ("inversion", "background", "unwrap")]
    for node in heavy:
        assert node.n_procs == 2
        # mem_gb follows the data size: > 0.3 GB overhead for 1.08 M voxels
        assert node.mem_gb > 0.3


def test_mem_gb_scales_with_data():
    small = init_qsm_wf(n_voxels=64**3, n_echoes=4)
    big = init_qsm_wf(n_voxels=math.prod((200, 200, 160)), n_echoes=4)
    data_small = small.get_node("inversion").mem_gb - 0.3
    data_big = big.get_node("inversion").mem_gb - 0.3
    assert data_big > 20 * data_small  # 24x the voxels
    assert big.get_node("unwrap").mem_gb > big.get_node("reference").mem_gb


def test_user_pipeline_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bfr_method": "magic"}))
    with pytest.raises(ValueError, match="bfr_method"):
        load_pipeline(str(bad))
    with pytest.raises(ValueError, match="unknown option"):
        validate_pipeline({"invert": "tkd"})
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"bfr_method": "pdf"}))
    name, opts = load_pipeline(str(good))
    assert name == "mine" and opts["bfr_method"] == "pdf" and opts["unwrap_method"]


@pytest.fixture(scope="module")
def app_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    bids = root / "bids"
    assert (
        simulate_main(
            [str(bids), "--subjects", "2", "--voxel-size", "3", "--echoes", "3", "--seed", "7"]
        )
        == 0
    )
    out = root / "out"
    argv = [str(bids), str(out), "participant", "--nprocs", "2"]
    assert qsmflow_main(argv) == 0
    return bids, out, argv


def test_app_outputs_are_valid_bids(app_run):
    _, out, _ = app_run
    deriv = out / "qsmflow"
    for sub in ("01", "02"):
        assert (deriv / f"sub-{sub}/anat/sub-{sub}_Chimap.nii.gz").exists()
        side = json.loads(
            (deriv / f"sub-{sub}/fmap/sub-{sub}_desc-local_fieldmap.json").read_text()
        )
        assert side["Units"] == "Hz"
    # the QC report: one page per subject, its figures exist (and are BIDS-ignored)
    for sub in ("01", "02"):
        html = (deriv / f"sub-{sub}.html").read_text()
        for src in re.findall(r'src="([^"]+)"', html):
            assert (deriv / src).exists(), src
        assert len(list((deriv / f"sub-{sub}/figures").glob("*.png"))) >= 4
    errors, warnings = _validate(deriv)
    assert errors == []
    assert warnings == []
    assert json.loads((out / "qsmflow-command.json").read_text())["command"].startswith("qsmflow ")


def test_app_matches_the_algorithms_run_directly(app_run):
    """Acceptance: the workflow's chi is within 10 NRMSE points of the same algorithms on arrays."""
    bids, out, _ = app_run
    anat = bids / "sub-01/anat"
    mag = np.stack(
        [nib.load(anat / f"sub-01_echo-{e}_part-mag_MEGRE.nii.gz").get_fdata() for e in (1, 2, 3)],
        -1,
    ).astype(np.float32)
    phase = np.stack(
        [
            nib.load(anat / f"sub-01_echo-{e}_part-phase_MEGRE.nii.gz").get_fdata()
            for e in (1, 2, 3)
        ],
        -1,
    ).astype(np.float32)
    img = nib.load(anat / "sub-01_echo-1_part-phase_MEGRE.nii.gz")
    vox, tes = (3.0, 3.0, 3.0), [0.005, 0.010, 0.015]
    quality = phase_quality_map(phase, magnitude=mag, echo_times_s=tes)
    mask = phase_quality_mask(quality, vox, magnitude=mag[..., 0])
    unwrapped = unwrap_multi_echo(phase, vox, tes, magnitude=mag, mask=mask)
    fit = fit_field(unwrapped, mag, tes, b0_tesla=3.0, mask=mask)
    local, lmask = vsharp(fit.field_ppm, mask, vox)
    chi = tv_admm(local, lmask, vox, (0, 0, 1), magnitude=mag[..., 0], b0_tesla=3.0)
    direct = reference_to_mean(chi, lmask)

    truth = nib.load(bids / GT / "sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    brain = nib.load(bids / GT / "sub-01/anat/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    wf_chi = nib.load(out / "qsmflow/sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    assert np.allclose(
        nib.load(out / "qsmflow/sub-01/anat/sub-01_Chimap.nii.gz").affine, img.affine
    )
    n_wf = metrics.score(wf_chi, truth, brain)["nrmse"]
    n_direct = metrics.score(direct, truth, brain)["nrmse"]
    assert abs(n_wf - n_direct) < 10


def test_rerun_reuses_finished_nodes(app_run):
    _, out, argv = app_run
    result = next((out / "work").rglob("inversion/*Chimap*.nii.gz"))
    before = result.stat().st_mtime_ns
    assert qsmflow_main(argv) == 0
    assert result.stat().st_mtime_ns == before


def test_bad_subject_is_skipped_and_others_run(tmp_path, capsys):
    bids = tmp_path / "bids"
    assert simulate_main([str(bids), "--subjects", "2", "--voxel-size", "4", "--echoes", "2"]) == 0
    side = bids / "sub-02/anat/sub-02_echo-1_part-phase_MEGRE.json"
    meta = json.loads(side.read_text())
    del meta["EchoTime"]
    side.write_text(json.dumps(meta))
    assert qsmflow_main([str(bids), str(tmp_path / "out"), "participant", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "skipping sub-02" in captured.err and "EchoTime" in captured.err
    assert "sub-01: 2 echoes" in captured.out


def test_not_a_bids_dataset(tmp_path, capsys):
    (tmp_path / "notbids").mkdir()
    assert qsmflow_main([str(tmp_path / "notbids"), str(tmp_path / "out"), "participant"]) == 1
    err = capsys.readouterr().err
    assert "not a BIDS dataset" in err and "Traceback" not in err


def test_list_pipelines(capsys):
    assert qsmflow_main(["--list-pipelines"]) == 0
    assert "default" in capsys.readouterr().out
