"""Simulator: BIDS layout, signal model, geometry of orientations, determinism, CLI errors."""

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.cli.simulate import main as simulate_main
from qsmflow.io.nifti import b0_direction_from_affine
from qsmflow.phantom import LABELS, make_head_model
from qsmflow.simulate import AcquisitionParams, rotation_matrix, simulate_acquisition

SMALL = AcquisitionParams(
    matrix=(59, 69, 53), voxel_size_mm=(3.0, 3.0, 3.0), echo_times_s=(0.004, 0.012, 0.020)
)
GT = "derivatives/qsmflow-simulate"


@pytest.fixture(scope="module")
def model():
    return make_head_model(11)


@pytest.fixture(scope="module")
def noise_free(model):
    params = AcquisitionParams(
        matrix=(59, 69, 53),
        voxel_size_mm=(3.0, 3.0, 3.0),
        echo_times_s=(0.004, 0.012, 0.020),
        snr=np.inf,
    )
    return simulate_acquisition(model, params, rng=np.random.default_rng(1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "bids"
    rc = simulate_main(
        [
            str(out),
            "--subjects",
            "2",
            "--sessions",
            "2",
            "--orientations",
            "2",
            "--echoes",
            "3",
            "--voxel-size",
            "3",
            "--oblique",
            "15",
            "--seed",
            "4",
        ]
    )
    assert rc == 0
    return out


def test_pybids_entities_and_metadata(dataset):
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(dataset, derivatives=True)
    assert layout.get_subjects() == ["01", "02"]
    assert layout.get_sessions() == ["01", "02"]
    assert layout.get_acquisitions() == ["ori1", "ori2"]
    files = layout.get(scope="raw", suffix="MEGRE", extension=".nii.gz")
    assert len(files) == 2 * 2 * 2 * 3 * 2
    for f in layout.get(
        scope="raw",
        subject="02",
        session="02",
        acquisition="ori2",
        suffix="MEGRE",
        extension=".nii.gz",
    ):
        meta = f.get_metadata()
        ents = f.get_entities()
        assert meta["MagneticFieldStrength"] == 3.0
        assert meta["EchoTime"] == pytest.approx([0.005, 0.010, 0.015][int(ents["echo"]) - 1])
        assert meta["Units"] == ("rad" if ents["part"] == "phase" else "arbitrary")
    chimaps = layout.get(scope="qsmflow-simulate", suffix="Chimap", extension=".nii.gz")
    assert len(chimaps) == 8
    masks = layout.get(scope="qsmflow-simulate", suffix="mask", desc="brain", extension=".nii.gz")
    assert len(masks) == 8


def test_b0_direction_recoverable_from_header(dataset):
    phase = dataset / "sub-01/ses-01/anat/sub-01_ses-01_acq-ori2_echo-1_part-phase_MEGRE.nii.gz"
    b0 = b0_direction_from_affine(nib.load(phase).affine)
    side = json.loads(
        (dataset / GT / "sub-01/ses-01/anat/sub-01_ses-01_acq-ori2_Chimap.json").read_text()
    )
    np.testing.assert_allclose(b0, side["B0DirectionVoxel"], atol=1e-6)
    t = np.deg2rad(15)  # the slab is tilted 15 degrees about x
    np.testing.assert_allclose(b0, [0, np.sin(t), np.cos(t)], atol=1e-6)


def test_orientations_rotate_the_anatomy(dataset):
    """Deep grey nuclei move with the head: world centroid of orientation 2 = R @ that of 1."""
    cents = {}
    for ori in ("ori1", "ori2"):
        img = nib.load(
            dataset / GT / f"sub-01/ses-01/anat/sub-01_ses-01_acq-{ori}_desc-phantom_dseg.nii.gz"
        )
        seg = np.asarray(img.dataobj)
        for lab in (2, 3, 7):  # pallidus, putamen, thalamus (both sides)
            vox = np.argwhere(seg == lab).mean(axis=0)
            cents[ori, lab] = img.affine[:3, :3] @ vox + img.affine[:3, 3]
    rot = rotation_matrix(20, 0)  # ORIENTATIONS_DEG[1]
    for lab in (2, 3, 7):
        np.testing.assert_allclose(cents["ori2", lab], rot @ cents["ori1", lab], atol=2.0)
    # and they really moved (the test can fail)
    assert np.linalg.norm(cents["ori2", 7] - cents["ori1", 7]) > 2.0


def test_segmentation_has_challenge_labels(noise_free):
    present = set(np.unique(noise_free.segmentation).tolist())
    assert set(LABELS) <= present | {16}  # the 2.5 mm calcification may vanish at 3 mm
    seg = noise_free.segmentation
    chi = noise_free.chi_ppm
    # iron-rich nuclei are paramagnetic relative to white matter; calcification, bone diamagnetic
    for lab in (1, 2, 3, 4, 5, 6):
        assert chi[seg == lab].mean() > chi[seg == 8].mean() + 0.03
    assert chi[seg == 2].mean() > chi[seg == 3].mean()  # pallidus > putamen
    assert chi[seg == 13].mean() < -1.5 and chi[seg == 14].mean() > 9


def test_phase_follows_the_design_model(noise_free):
    """phase(TE) = phase0 + 2 pi gamma_bar B0 TE field_ppm 1e-6 (DESIGN.md, qsm-forward's sign)."""
    sim = noise_free
    ok = sim.magnitude[..., -1] > 1e-3 * sim.magnitude.max()
    hz = GAMMA_BAR_MHZ_PER_T * sim.params.b0_tesla * sim.total_field_ppm
    for e, te in enumerate(sim.params.echo_times_s):
        model = sim.phase_offset_rad + 2 * np.pi * hz * te
        diff = np.angle(np.exp(1j * (sim.phase[..., e] - model)))
        assert np.abs(diff[ok]).max() < 1e-3
    # positive field -> phase grows with TE (sign of the model)
    d = np.angle(np.exp(1j * (sim.phase[..., 1] - sim.phase[..., 0])))
    small = ok & (np.abs(hz) < 0.4 / (2 * (0.012 - 0.004)))
    est_hz = d[small] / (2 * np.pi * 0.008)
    np.testing.assert_allclose(est_hz, hz[small], atol=0.05)


def test_phase_agrees_with_qsm_forward_signal(noise_free):
    qf = pytest.importorskip("qsm_forward.qsm_forward")
    sim = noise_free
    te = sim.params.echo_times_s[2]
    sig = qf.generate_signal(
        sim.total_field_ppm.astype(np.float64),
        B0=sim.params.b0_tesla,
        TE=te,
        phase_offset=sim.phase_offset_rad.astype(np.float64),
        R2star=0,
        M0=1,
    )
    ok = sim.mask
    diff = np.angle(np.exp(1j * (sim.phase[..., 2] - np.angle(sig))))
    # qsm-forward uses gamma_bar = 42.58 MHz/T; we use CODATA 42.577 -> tiny phase difference
    assert np.abs(diff[ok]).max() < 2e-3


def test_magnitude_decays_with_r2star(noise_free):
    sim = noise_free
    # CSF voxels far from field gradients: the decay between echoes is exp(-dTE R2*)
    seg = sim.segmentation
    grad = np.sqrt(sum(g**2 for g in np.gradient(sim.total_field_ppm)))
    sel = np.isin(seg, (8, 9)) & (grad < 0.005) & sim.mask
    ratio = sim.magnitude[..., 2][sel] / sim.magnitude[..., 0][sel]
    expected = np.exp(-(0.020 - 0.004) * sim.r2star_hz[sel])
    np.testing.assert_allclose(ratio, expected, rtol=0.02)


def test_background_field_is_harmonic_inside_brain(noise_free):
    sim = noise_free
    background = sim.total_field_ppm - sim.local_field_ppm
    inner = ndimage.binary_erosion(sim.mask, iterations=3)
    # a Gaussian-smoothed Laplacian ignores the Nyquist ringing that the k-space kernel puts on
    # the 9.4 ppm air/tissue steps of a voxelised head (measured ratio 0.04 at 3 mm)
    lap_bg = ndimage.gaussian_laplace(background, 1.0)[inner]
    lap_local = ndimage.gaussian_laplace(sim.local_field_ppm, 1.0)[inner]
    assert np.linalg.norm(lap_bg) < 0.1 * np.linalg.norm(lap_local)
    # and the background is strong, as in vivo near the sinuses
    assert background[sim.mask].std() > 3 * sim.local_field_ppm[sim.mask].std()


def test_noise_level_matches_snr(model):
    params = AcquisitionParams(
        matrix=(59, 69, 53), voxel_size_mm=(3.0, 3.0, 3.0), echo_times_s=(0.004,), snr=50.0
    )
    a = simulate_acquisition(model, params, rng=np.random.default_rng(5))
    b = simulate_acquisition(model, params, rng=np.random.default_rng(6))
    # phase offsets differ between rng draws: compare magnitudes (Rician ~ Gaussian at SNR 50)
    sigma = np.std((a.magnitude - b.magnitude)[..., 0][a.mask]) / np.sqrt(2)
    snr = a.magnitude[..., 0][a.mask].mean() / sigma
    assert 45 < snr < 55


def test_coil_combined_noise_level_matches_snr(model):
    params = AcquisitionParams(
        matrix=(59, 69, 53),
        voxel_size_mm=(3.0, 3.0, 3.0),
        echo_times_s=(0.004,),
        snr=40.0,
        n_coils=8,
    )
    rss = []
    for seed in (5, 6):
        sim = simulate_acquisition(model, params, rng=np.random.default_rng(seed))
        rss.append(np.sqrt((sim.magnitude[..., 0, :] ** 2).sum(-1)))
    mask = sim.mask
    sigma = np.std((rss[0] - rss[1])[mask]) / np.sqrt(2)
    assert 36 < rss[0][mask].mean() / sigma < 44


def test_deterministic_for_a_seed(model):
    a = simulate_acquisition(model, SMALL, rng=np.random.default_rng(3))
    b = simulate_acquisition(make_head_model(11), SMALL, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.phase, b.phase)
    np.testing.assert_array_equal(a.chi_ppm, b.chi_ppm)
    c = simulate_acquisition(make_head_model(12), SMALL, rng=np.random.default_rng(3))
    assert not np.array_equal(a.segmentation, c.segmentation)


def test_uncombined_coils(model):
    params = AcquisitionParams(
        matrix=(59, 69, 53),
        voxel_size_mm=(3.0, 3.0, 3.0),
        echo_times_s=(0.004, 0.010),
        snr=np.inf,
        n_coils=6,
    )
    sim = simulate_acquisition(model, params, rng=np.random.default_rng(2))
    assert sim.magnitude.shape == (59, 69, 53, 2, 6)
    assert sim.phase_offset_rad.shape == (59, 69, 53, 6)
    # each coil's phase = its own offset + the common field term
    hz = GAMMA_BAR_MHZ_PER_T * 3.0 * sim.total_field_ppm
    ok = sim.mask
    for c in range(6):
        model_ph = sim.phase_offset_rad[..., c] + 2 * np.pi * hz * 0.010
        assert np.abs(np.angle(np.exp(1j * (sim.phase[..., 1, c] - model_ph))))[ok].max() < 1e-3
    # coil offsets really differ from each other
    d = np.angle(np.exp(1j * (sim.phase_offset_rad[..., 0] - sim.phase_offset_rad[..., 3])))[ok]
    assert np.std(d) > 0.1 or abs(np.mean(d)) > 0.3
    # coil magnitudes are spatially different (sensitivity profiles)
    assert np.corrcoef(sim.magnitude[..., 0, 0][ok], sim.magnitude[..., 0, 3][ok])[0, 1] < 0.9


def test_cli_rejects_bad_options(tmp_path, capsys):
    for argv, opt in (
        (["--echoes", "0"], "--echoes"),
        (["--b0", "-3"], "--b0"),
        (["--voxel-size", "1", "2"], "--voxel-size"),
        (["--coils", "-1"], "--coils"),
        (["--orientations", "99"], "--orientations"),
    ):
        with pytest.raises(SystemExit) as exc:
            simulate_main([str(tmp_path / "x"), *argv])
        assert exc.value.code == 2
        assert opt in capsys.readouterr().err


def test_cli_never_overwrites_without_flag(tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert simulate_main([str(out), "--voxel-size", "4", "--echoes", "1"]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # even --overwrite does not delete a folder that is not a simulated dataset
    assert simulate_main([str(out), "--voxel-size", "4", "--echoes", "1", "--overwrite"]) == 1
    assert (out / "precious.txt").read_text() == "keep me"
    # but it replaces a dataset qsmflow-simulate wrote
    ds = tmp_path / "ds"
    assert simulate_main([str(ds), "--voxel-size", "4", "--echoes", "1"]) == 0
    assert simulate_main([str(ds), "--voxel-size", "4", "--echoes", "2", "--overwrite"]) == 0
    assert len(list(ds.glob("sub-01/anat/*_MEGRE.nii.gz"))) == 4


def test_cli_unwritable_path_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # /sys refuses new folders even to root; a read-only folder refuses ordinary users
    target = locked / "ds" if not _can_write(locked) else "/sys/qsmflow-test-ds"
    try:
        assert simulate_main([str(target), "--voxel-size", "4"]) == 1
        err = capsys.readouterr().err
        assert "cannot write" in err and len(err.strip().splitlines()) == 1
    finally:
        locked.chmod(0o700)


def test_cli_file_in_the_way_is_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert simulate_main([str(target / "ds"), "--voxel-size", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qsmflow-simulate: error:") and len(err.strip().splitlines()) == 1


def _can_write(folder):
    try:
        (folder / ".probe").write_text("")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


def _validate(path):
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install qsmflow[test])")
    proc = subprocess.run(
        [exe, str(path), "-r", "--format", "json"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(proc.stdout)
    issues = list(report["issues"]["issues"])
    for sub in report.get("derivativesSummary", {}).values():
        issues += sub["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    warnings = sorted(
        {f"{i['code']}:{i.get('subCode')}" for i in issues if i["severity"] == "warning"}
    )
    print("BIDS validator warnings:", warnings)
    return errors, warnings


def test_bids_validator_sessions_orientations_oblique(dataset):
    errors, warnings = _validate(dataset)
    assert errors == []
    assert len(report_ours := [w for w in warnings if "SIDECAR_KEY" in w]) <= 1, report_ours


def test_bids_validator_uncombined_coils(tmp_path):
    out = tmp_path / "coils"
    assert simulate_main([str(out), "--voxel-size", "4", "--echoes", "2", "--coils", "4"]) == 0
    assert nib.load(out / "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz").shape[-1] == 4
    errors, _ = _validate(out)
    assert errors == []


def test_partial_volume_is_the_block_mean_of_a_finer_point_sampled_grid(model):
    """``supersample=2`` on a 3 mm grid equals the 2x2x2 block means of the voxel-centre
    simulation on the aligned 1.5 mm grid (an independent evaluation of the same anatomy)."""
    common = {"echo_times_s": (0.01,), "snr": np.inf, "shim_order": -1}
    coarse = AcquisitionParams(matrix=(30, 36, 28), voxel_size_mm=(3.0,) * 3, **common)
    fine = AcquisitionParams(matrix=(60, 72, 56), voxel_size_mm=(1.5,) * 3, **common)
    rot = rotation_matrix(25.0, -10.0)
    kw = {"head_rotation": rot, "margin_mm": 3.0, "wm_anisotropy_ppm": 0.015}
    pv = simulate_acquisition(model, coarse, supersample=2, **kw)
    pt = simulate_acquisition(model, fine, **kw)

    def block(a):
        a = np.asarray(a, dtype=np.float64)
        return a.reshape(30, 2, 36, 2, 28, 2, *a.shape[3:]).mean(axis=(1, 3, 5))

    np.testing.assert_allclose(pv.chi_ppm, block(pt.chi_ppm), atol=2e-5)
    np.testing.assert_allclose(pv.r2star_hz, block(pt.r2star_hz), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(pv.mask, block(pt.mask) >= 0.5)
    np.testing.assert_allclose(pv.chi_tensor_ppm, block(pt.chi_tensor_ppm), atol=2e-5)
    # point sampling at 3 mm is a different (aliased) image of the same head
    point = simulate_acquisition(model, coarse, head_rotation=rot, margin_mm=3.0)
    assert np.abs(point.chi_ppm - pv.chi_ppm)[pv.mask].max() > 0.05
    with pytest.raises(ValueError, match="supersample"):
        simulate_acquisition(model, coarse, supersample=0)


def test_multi_orientation_datasets_are_partial_volume_by_default(dataset, tmp_path):
    assert "partial volume from 2^3 sub-voxel samples" in (dataset / "README.md").read_text()
    with pytest.raises(SystemExit):
        simulate_main([str(tmp_path / "x"), "--supersample", "9"])


def test_cli_anisotropic_white_matter_ground_truth(tmp_path, capsys):
    out = tmp_path / "aniso"
    argv = [str(out), "--voxel-size", "4", "--echoes", "1", "--wm-anisotropy", "0.015"]
    assert simulate_main(argv) == 0
    anat = out / GT / "sub-01/anat"
    tensor = nib.load(anat / "sub-01_desc-tensor_Chimap.nii.gz").get_fdata()
    chi = nib.load(anat / "sub-01_Chimap.nii.gz").get_fdata()
    chi33 = nib.load(anat / "sub-01_desc-chi33_Chimap.nii.gz").get_fdata()
    assert tensor.shape == chi.shape + (6,)
    np.testing.assert_allclose(tensor[..., [0, 3, 5]].mean(-1), chi, atol=1e-5)
    # B0 along z: chi33 is the zz component, which differs from the mean in white matter
    np.testing.assert_allclose(chi33, tensor[..., 5], atol=1e-6)
    assert np.abs(chi33 - chi).max() > 0.005
    with pytest.raises(SystemExit):
        simulate_main([str(tmp_path / "x"), "--wm-anisotropy", "-1"])
    assert "--wm-anisotropy" in capsys.readouterr().err
