"""DICOM to BIDS: simulator -> vendor-flavoured DICOM -> qsmflow-dicom2bids -> BIDS, vs truth."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow.cli.dicom2bids import main as dicom2bids
from qsmflow.dicom.synthetic import (
    DicomFlavour,
    coil_element_names,
    dicom_geometry,
    write_simulated_dicom,
)
from qsmflow.io.nifti import b0_direction_from_affine
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, rotation_matrix, simulate_acquisition

TES = (0.004, 0.009, 0.014, 0.019)
MATRIX, VOXEL = (32, 40, 8), (5.0, 5.0, 5.0)


def _sim(n_coils=0, pitch=0.0, oblique=0.0, seed=0):
    params = AcquisitionParams(
        matrix=MATRIX, voxel_size_mm=VOXEL, echo_times_s=TES, n_coils=n_coils, oblique_deg=oblique
    )
    return simulate_acquisition(
        make_head_model(0),
        params,
        head_rotation=rotation_matrix(pitch, 0.0),
        rng=np.random.default_rng(seed),
        margin_mm=10.0,
    )


@pytest.fixture(scope="module")
def sims():
    ori1 = _sim()
    # a magnitude-only single-echo scan (written as a T1w): the first echo of ori1
    t1 = dataclasses.replace(
        ori1,
        params=dataclasses.replace(ori1.params, echo_times_s=(0.003,)),
        magnitude=ori1.magnitude[..., :1].copy(),
        phase=ori1.phase[..., :1].copy(),
    )
    return {
        "ori1": ori1,
        "ori2": _sim(pitch=20.0, oblique=12.0, seed=1),
        "coils": _sim(n_coils=2, seed=2),
        "t1": t1,
    }


#: subject label -> (flavour, simulation, protocol, acquisition time)
CASES = {
    "SIE": [
        (DicomFlavour("siemens"), "ori1", "gre_qsm", "120000.000000"),
        (DicomFlavour("siemens"), "ori2", "gre_qsm", "121500.000000"),
        (DicomFlavour("siemens", parts=("mag",)), "t1", "t1_mprage_sag", "123000.000000"),
    ],
    "SIECOIL": [(DicomFlavour("siemens"), "coils", "gre_qsm_uncombined", "120000.000000")],
    "SIEMF": [(DicomFlavour("siemens", multiframe=True), "ori2", "gre_qsm", "120000.000000")],
    "SIEMFCOIL": [(DicomFlavour("siemens", multiframe=True), "coils", "gre_qsm", "120000.000000")],
    "PHI": [  # two head orientations: run-1, run-2
        (DicomFlavour("philips"), "ori1", "FFE_4echo", "120000.000000"),
        (DicomFlavour("philips"), "ori2", "FFE_4echo", "121500.000000"),
    ],
    "PHIMF": [(DicomFlavour("philips", multiframe=True), "ori2", "FFE_4echo", "120000.000000")],
    "GE": [
        (DicomFlavour("ge", parts=("real", "imag")), "ori2", "QSM", "120000.000000"),
        (DicomFlavour("ge", parts=("real", "imag")), "ori1", "QSM", "121500.000000"),
    ],
    "GEMF": [
        (DicomFlavour("ge", multiframe=True, parts=("real", "imag")), "ori1", "QSM", "120000")
    ],
    "GEMP": [(DicomFlavour("ge"), "ori1", "QSM", "120000.000000")],
    # uncombined channels: GE real/imaginary and magnitude/phase with one series per channel,
    # GE multi-frame, Philips one series per element and multi-frame (standard coil macro)
    "GECOIL": [(DicomFlavour("ge", parts=("real", "imag")), "coils", "QSM", "120000.000000")],
    "GEMPCOIL": [(DicomFlavour("ge"), "coils", "QSM", "120000.000000")],
    "GEMFCOIL": [
        (DicomFlavour("ge", multiframe=True, parts=("real", "imag")), "coils", "QSM", "120000")
    ],
    "PHICOIL": [(DicomFlavour("philips"), "coils", "FFE_4echo", "120000.000000")],
    "PHIMFCOIL": [(DicomFlavour("philips", multiframe=True), "coils", "FFE_4echo", "120000")],
    # GE without the pi on every other slice (the detection must leave it alone)
    "GENOCHOP": [
        (DicomFlavour("ge", parts=("real", "imag"), slice_chop=False), "ori2", "QSM", "120000")
    ],
}
#: subjects whose DICOM holds real/imaginary pairs
COMPLEX_PAIRS = {"GE", "GEMF", "GECOIL", "GEMFCOIL", "GENOCHOP"}


def _vendor(subject: str) -> str:
    return {"SIE": "siemens", "PHI": "philips"}.get(subject[:3], "ge")


def _tree_digest(root: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dicom_dir(sims, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    for subject, acquisitions in CASES.items():
        for i, (flavour, sim, protocol, when) in enumerate(acquisitions):
            write_simulated_dicom(
                sims[sim],
                root / subject / f"s{i}",
                flavour,
                patient_id=subject,
                series_number=10 * i + 1,
                protocol=protocol,
                acquisition_time=when,
            )
    (root / "notes.txt").write_text("scanner export notes, not DICOM\n")
    good = next((root / "GEMP" / "s0").glob("*.dcm")).read_bytes()
    (root / "broken.dcm").write_bytes(good[: len(good) - 500])  # truncated pixel data
    return root


@pytest.fixture(scope="module")
def converted(dicom_dir, tmp_path_factory):
    """qsmflow-dicom2bids on the whole tree; returns (BIDS dir, exit code, stdout, digests)."""
    before = _tree_digest(dicom_dir)
    bids = tmp_path_factory.mktemp("bids") / "ds"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = dicom2bids([str(dicom_dir), str(bids), "--nprocs", "2"])
    return bids, code, out.getvalue(), before, _tree_digest(dicom_dir)


def _to_reference(data: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray):
    """Reorder ``data`` onto the reference voxel grid; also return the 3x3 signed permutation.

    The two affines must describe the same grid up to axis order and flips (dcm2niix may flip
    rows); anything else fails the assertion, so this also checks the geometry.
    """
    m = np.linalg.inv(ref_affine) @ affine
    perm = np.rint(m[:3, :3])
    assert np.allclose(m[:3, :3], perm, atol=1e-3), m
    assert np.allclose(m[:3, 3], np.rint(m[:3, 3]), atol=1e-2), m
    order = [int(np.argmax(np.abs(perm[:, j]))) for j in range(3)]  # out axis j -> ref axis
    out = np.transpose(data, list(np.argsort(order)) + list(range(3, data.ndim)))
    p = perm[:, np.argsort(order)]
    for axis in range(3):
        if p[axis, axis] < 0:
            out = np.flip(out, axis)
    return out, perm


def _load(bids: Path, name: str):
    img = nib.load(bids / name)
    side = json.loads((bids / name.replace(".nii.gz", ".json")).read_text())
    return np.asarray(img.dataobj, dtype=np.float32), img.affine, side


def _wrap(x):
    return np.angle(np.exp(1j * x))


# (subject, run) -> simulation key, and the phase quantisation step (rad) of each vendor
EXPECTED = {
    ("SIE", 1): "ori1",
    ("SIE", 2): "ori2",
    ("SIECOIL", None): "coils",
    ("SIEMF", None): "ori2",
    ("SIEMFCOIL", None): "coils",
    ("PHI", 1): "ori1",
    ("PHI", 2): "ori2",
    ("PHIMF", None): "ori2",
    ("GE", 1): "ori2",
    ("GE", 2): "ori1",
    ("GEMF", None): "ori1",
    ("GEMP", None): "ori1",
    ("GECOIL", None): "coils",
    ("GEMPCOIL", None): "coils",
    ("GEMFCOIL", None): "coils",
    ("PHICOIL", None): "coils",
    ("PHIMFCOIL", None): "coils",
    ("GENOCHOP", None): "ori2",
}
PHASE_STEP = {"SIE": np.pi / 2048, "PHI": 2 * np.pi / 4095, "GE": 1e-3}


def test_conversion_succeeds_and_lists_bad_files(converted):
    bids, code, stdout, *_ = converted
    assert code == 0, stdout
    assert "notes.txt" in stdout.split("non-DICOM")[1].split("\n")[1]
    corrupt = stdout.split("corrupt DICOM")[1].splitlines()[1]
    assert "broken.dcm" in corrupt and "truncated" in corrupt
    assert (bids / "dataset_description.json").exists()
    participants = (bids / "participants.tsv").read_text().split()
    assert sorted(participants[1:]) == sorted(f"sub-{s}" for s in CASES)


def test_input_folder_unchanged(converted):
    *_, before, after = converted
    assert before == after


@pytest.mark.parametrize(("subject", "run"), list(EXPECTED))
def test_round_trip_matches_simulation(converted, sims, subject, run):
    bids, code, *_ = converted
    assert code == 0
    sim = sims[EXPECTED[(subject, run)]]
    prefix = f"sub-{subject}/anat/sub-{subject}" + (f"_run-{run}" if run else "")
    mag_step = float(np.abs(sim.magnitude).max()) * 1.05 / 4095
    vendor = subject[:3] if subject[:3] in PHASE_STEP else subject[:2]
    complex_pair = subject in COMPLEX_PAIRS
    for e, te in enumerate(TES):
        mag, aff_m, side_m = _load(bids, f"{prefix}_echo-{e + 1}_part-mag_MEGRE.nii.gz")
        phase, aff_p, side_p = _load(bids, f"{prefix}_echo-{e + 1}_part-phase_MEGRE.nii.gz")
        assert side_p["EchoTime"] == pytest.approx(te) and side_m["EchoTime"] == pytest.approx(te)
        assert side_p["MagneticFieldStrength"] == pytest.approx(3.0)
        assert side_p["Units"] == "rad"
        # GE phase is negated on conversion (opposite handedness), the others kept
        assert side_p["PhasePolarityInverted"] is (_vendor(subject) == "ge")
        # GE's pi on every other slice detected and undone (absent for other vendors)
        chop = side_p.get("SliceChopCorrected")
        assert chop is (subject != "GENOCHOP" if _vendor(subject) == "ge" else None)
        mag, perm = _to_reference(mag, aff_m, sim.affine)
        phase, _ = _to_reference(phase, aff_p, sim.affine)
        # B0 along the same voxel direction as in the simulation (signs follow the axis flips)
        b0 = perm @ b0_direction_from_affine(aff_p)
        assert np.allclose(b0, sim.b0_dir, atol=1e-4)
        true_mag, true_phase = sim.magnitude[:, :, :, e], sim.phase[:, :, :, e]
        assert mag.shape == true_mag.shape
        assert phase.min() >= -np.pi - 1e-6 and phase.max() < np.pi
        if complex_pair:
            step = float(np.abs(sim.magnitude).max()) * 1.05 / 32000
            assert np.abs(mag - true_mag).max() <= step * 0.71 + 1e-6
            # real/imaginary rounding moves the phase by at most asin(step / (sqrt2 |s|))
            bound = np.arcsin(np.minimum(1, step * 0.71 / np.maximum(true_mag, 1e-12)))
            assert np.all(np.abs(_wrap(phase - true_phase)) <= bound + 1e-5)
        else:
            assert np.abs(mag - true_mag).max() <= mag_step / 2 * 1.001 + 1e-6
            err = np.abs(_wrap(phase - true_phase)).max()
            assert err <= PHASE_STEP[vendor] / 2 * 1.01 + 1e-6, err
        if "COIL" in subject:  # channels in the vendor's element order, along the 4th axis
            names = ",".join(coil_element_names(_vendor(subject), 2))
            assert side_p["ReceiveCoilActiveElements"] == names
            assert side_m["ReceiveCoilActiveElements"] == names
            assert phase.shape == mag.shape == (*MATRIX, 2)


def test_orientations_are_runs_with_their_own_b0_direction(converted, sims):
    bids, *_ = converted
    b0 = []
    for run in (1, 2):
        img = nib.load(bids / f"sub-SIE/anat/sub-SIE_run-{run}_echo-1_part-phase_MEGRE.nii.gz")
        b0.append(b0_direction_from_affine(img.affine))
    # the tilted slab's B0 direction is 12 degrees off the first one's
    angle = np.degrees(np.arccos(abs(float(b0[0] @ b0[1]))))
    assert angle == pytest.approx(12.0, abs=0.1)


def test_t1w_and_coil_dimension(converted, sims):
    bids, *_ = converted
    t1, aff, side = _load(bids, "sub-SIE/anat/sub-SIE_T1w.nii.gz")
    t1, _ = _to_reference(t1, aff, sims["t1"].affine)
    step = float(sims["t1"].magnitude.max()) * 1.05 / 4095
    assert np.abs(t1 - sims["t1"].magnitude[..., 0]).max() <= step / 2 * 1.001 + 1e-6
    for subject in (
        "SIECOIL",
        "SIEMFCOIL",
        "GECOIL",
        "GEMPCOIL",
        "GEMFCOIL",
        "PHICOIL",
        "PHIMFCOIL",
    ):
        coil = nib.load(bids / f"sub-{subject}/anat/sub-{subject}_echo-1_part-phase_MEGRE.nii.gz")
        assert coil.shape == (*MATRIX, 2)


def _validate(path: Path):
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install qsmflow[test])")
    proc = subprocess.run(
        [exe, str(path), "--format", "json"], capture_output=True, text=True, timeout=300
    )
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [i for i in issues if i["severity"] == "error"]
    warnings = sorted(
        {f"{i['code']}:{i.get('subCode')}" for i in issues if i["severity"] == "warning"}
    )
    print("BIDS validator warnings:", warnings)
    return errors, warnings


def test_bids_validator_zero_errors(converted):
    bids, *_ = converted
    errors, warnings = _validate(bids)
    assert errors == []
    # gzip headers carry no file name or time (a leak and not reproducible)
    assert not [w for w in warnings if w.startswith("GZIP_HEADER")]


def test_dry_run_writes_nothing(dicom_dir, tmp_path, capsys):
    target = tmp_path / "never"
    assert dicom2bids([str(dicom_dir / "GEMP"), str(target), "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "sub-GEMP/anat/sub-GEMP_echo-4_part-phase_MEGRE.nii.gz" in out
    assert "dry run" in out and not target.exists()
    assert "note: GE phase is negated" in out


def test_existing_files_are_kept_unless_overwrite(dicom_dir, tmp_path, capsys):
    bids = tmp_path / "ds"
    args = [str(dicom_dir / "GEMP"), str(bids), "--quiet", "--participant-label", "01"]
    assert dicom2bids(args) == 0
    target = bids / "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
    stamp = target.stat().st_mtime_ns
    capsys.readouterr()
    assert dicom2bids(args) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert target.stat().st_mtime_ns == stamp
    # adding another subject keeps the first and extends participants.tsv
    assert dicom2bids([str(dicom_dir / "PHI"), str(bids), "--quiet"]) == 0
    assert (bids / "participants.tsv").read_text().split()[1:] == ["sub-01", "sub-PHI"]
    assert dicom2bids([*args, "--overwrite"]) == 0
    assert target.stat().st_mtime_ns != stamp


@pytest.mark.parametrize(
    ("omit", "message"),
    [
        ([("phase", 2, 4)], "missing slices"),
        ([("mag", 4, k) for k in range(MATRIX[2])], "missing echoes"),
        ([(p, 3, k) for p in ("mag", "phase") for k in range(MATRIX[2])], "missing echoes"),
    ],
)
def test_incomplete_series_are_reported_not_converted(sims, tmp_path, capsys, omit, message):
    src = tmp_path / "dicom"
    write_simulated_dicom(sims["ori1"], src, DicomFlavour("philips"), patient_id="P1", omit=omit)
    bids = tmp_path / "ds"
    assert dicom2bids([str(src), str(bids), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "not converted" in captured.out and message in captured.out
    assert "nothing to convert" in captured.err
    assert not bids.exists()


def test_bad_arguments_give_one_line_errors(dicom_dir, tmp_path, capsys):
    assert dicom2bids([str(tmp_path / "missing"), str(tmp_path / "ds")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert dicom2bids([str(dicom_dir / "GE"), str(dicom_dir / "GE" / "out")]) == 1
    assert "inside DICOM_DIR" in capsys.readouterr().err
    bad = tmp_path / "map.json"
    bad.write_text('{"series": [{"acq": "x"}]}')
    assert dicom2bids([str(dicom_dir / "GE"), str(tmp_path / "ds"), "--mapping", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "'match'" in err
    assert dicom2bids([str(dicom_dir / "GE"), str(tmp_path / "ds"), "--session", "a_b"]) == 1
    assert "alphanumeric" in capsys.readouterr().err
    assert dicom2bids([str(dicom_dir), str(tmp_path / "ds"), "--participant-label", "01"]) == 1
    assert "patients" in capsys.readouterr().err


def test_mapping_file_sets_labels(dicom_dir, tmp_path, capsys):
    mapping = tmp_path / "map.json"
    mapping.write_text(
        json.dumps(
            {
                "participants": {"SIE": "07"},
                "sessions": {"20240102": "pre"},
                "series": [{"match": "t1_*", "skip": True}, {"match": "gre_qsm", "acq": "qsm"}],
            }
        )
    )
    code = dicom2bids(
        [str(dicom_dir / "SIE"), str(tmp_path / "x"), "--dry-run", "--mapping", str(mapping)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "sub-07/ses-pre/anat/sub-07_ses-pre_acq-qsm_run-2_echo-1_part-mag_MEGRE.nii.gz" in out
    assert "T1w.nii" not in out and "skipped by the rule" in out


def test_nipype_workflow_converts(dicom_dir, sims, tmp_path):
    from qsmflow.workflows import init_dicom_to_bids_wf

    wf = init_dicom_to_bids_wf(participant_label="wf", n_procs=2, phase_polarity="invert")
    wf.base_dir = str(tmp_path / "work dir")  # spaces in paths must not split arguments
    wf.inputs.inputnode.dicom_dir = str(dicom_dir / "PHIMF")
    wf.inputs.inputnode.bids_dir = str(tmp_path / "ds")
    wf.run()
    written = sorted((tmp_path / "ds" / "sub-wf" / "anat").glob("*.nii.gz"))
    assert len(written) == 8
    assert written[0].name == "sub-wf_echo-1_part-mag_MEGRE.nii.gz"
    side = json.loads((tmp_path / "ds/sub-wf/anat/sub-wf_echo-2_part-phase_MEGRE.json").read_text())
    assert side["Units"] == "rad" and side["EchoTime"] == pytest.approx(TES[1])
    # the option reaches the conversion: Philips phase negated on request, and recorded
    assert side["PhasePolarityInverted"] is True and "requested" in side["PhasePolarityNote"]
    phase, aff, _ = _load(tmp_path / "ds", "sub-wf/anat/sub-wf_echo-2_part-phase_MEGRE.nii.gz")
    truth = sims["ori2"].phase[..., 1]
    phase = _to_reference(phase, aff, sims["ori2"].affine)[0]
    assert np.abs(_wrap(phase + truth)).max() <= 2 * np.pi / 4095 / 2 * 1.01 + 1e-6


def test_dcm2niix_interface_runs(dicom_dir, tmp_path):
    from qsmflow.interfaces import Dcm2niixVolume

    cmd = Dcm2niixVolume(source_dir=".", out_filename="vol").cmdline
    assert "dcm2niix" in cmd and " -p n " in cmd and " -g i " in cmd and " -m 1 " in cmd
    src = dicom_dir / "SIEMF" / "s0"  # one multi-frame file per part: the phase series
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "phase.dcm").symlink_to(sorted(src.glob("*.dcm"))[1])
    out = tmp_path / "out"
    out.mkdir()
    res = Dcm2niixVolume(source_dir=str(folder), output_dir=str(out), out_filename="v").run()
    files = res.outputs.converted_files  # Nipype gives a string for a single file
    files = [files] if isinstance(files, str) else files
    images = [nib.load(f) for f in files if f.endswith(".nii")]
    assert sum(int(np.prod(img.shape[3:])) for img in images) == len(TES)  # 4 echoes
    assert all(img.shape[:3] == MATRIX for img in images)


def test_siemens_norm_copies_and_per_slice_times(sims, tmp_path, capsys):
    """A NORM copy of the magnitude series is not used; 2-D timing (one time per slice) pairs."""
    import pydicom
    from pydicom.uid import generate_uid

    src = tmp_path / "dicom"
    files = write_simulated_dicom(sims["ori1"], src, DicomFlavour("siemens"), patient_id="N")
    for path in files:
        ds = pydicom.dcmread(path)
        slice_no = int(round(float(ds.SliceLocation) / VOXEL[2]))
        ds.AcquisitionTime = f"1200{10 + slice_no:02d}.000000"  # interleaved 2-D timing
        ds.save_as(path)
        if "M" in ds.ImageType:
            ds.ImageType = [*ds.ImageType, "NORM"]
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[ds.SeriesInstanceUID, "norm"])
            ds.SeriesNumber = 9
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[ds.SOPInstanceUID, "norm"])
            ds.save_as(path.with_name("norm_" + path.name))
    bids = tmp_path / "ds"
    assert dicom2bids([str(src), str(bids), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "series 9" in out and "without NORM" in out
    assert len(list((bids / "sub-N/anat").glob("*_part-phase_MEGRE.nii.gz"))) == len(TES)
    assert not list((bids / "sub-N/anat").glob("*run-*"))


def test_unknown_phase_scaling_fails_that_scan_only(sims, tmp_path, capsys):
    """Phase whose values fit no known encoding: that scan is reported, nothing of it is left,
    and the other scans in the folder still convert."""
    import pydicom

    bad = write_simulated_dicom(sims["ori1"], tmp_path / "in" / "a", DicomFlavour("philips"))
    for path in bad:
        ds = pydicom.dcmread(path)
        ds.Manufacturer = "ACME"
        if "P" in ds.ImageType:
            ds.RescaleSlope, ds.RescaleIntercept = 0.25, 0.0  # 0..1024: no known phase range
        ds.save_as(path)
    write_simulated_dicom(sims["ori2"], tmp_path / "in" / "b", DicomFlavour("ge"), patient_id="OK")
    bids = tmp_path / "ds"
    assert dicom2bids([str(tmp_path / "in"), str(bids), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "failed: sub-QSM01" in err and "matches no known encoding" in err
    assert not [p for p in (bids / "sub-QSM01").rglob("*") if p.is_file()]
    assert len(list((bids / "sub-OK/anat").glob("*.nii.gz"))) == 2 * len(TES)


def _series(manufacturer: str):
    from qsmflow.dicom.sort import SeriesInfo

    return SeriesInfo(
        *("1.2.3", "1.2", "P", "P", "20240101", 1, "d", "p", manufacturer, 3.0, "120000"),
        image_type=("ORIGINAL", "PRIMARY", "P"),
        multiframe=False,
        rows=4,
        columns=4,
        pixel_spacing=(1.0, 1.0),
        transfer_syntax="1.2.840.10008.1.2.1",
    )


@pytest.mark.parametrize(
    ("manufacturer", "rescale", "encoding", "stored", "radians"),
    [
        ("SIEMENS", (2.0, -4096.0), "-4096..4095", [-4096, 0, 2048], [-np.pi, 0, np.pi / 2]),
        ("SIEMENS", (1.0, 0.0), "0..4095", [0, 2048, 3072], [-np.pi, 0, np.pi / 2]),
        ("Philips Medical Systems", (0.0015, -np.pi), "radians", [-np.pi, 0, 1.0], [-np.pi, 0, 1]),
        ("Philips", (1.534, -1000 * np.pi), "milliradians", [-3141, 0, 1000], [-3.141, 0, 1]),
        ("GE MEDICAL SYSTEMS", (1.0, 0.0), "milliradians", [-3141, 0, 1500], [-3.141, 0, 1.5]),
        ("ACME", (1.0, 0.0), "auto", [-180, 0, 90], [-np.pi, 0, np.pi / 2]),
    ],
)
def test_vendor_phase_encodings(manufacturer, rescale, encoding, stored, radians):
    from qsmflow.dicom.convert import _to_radians, phase_encoding

    assert phase_encoding(_series(manufacturer), rescale) == encoding
    # a wrapped phase image spans the encoding's whole range
    full = {"radians": np.pi, "milliradians": 1000 * np.pi, "auto": 180}
    values = np.array(stored, dtype=np.float32)
    if encoding in full:
        values = np.concatenate([values, [full[encoding] * 0.999]]).astype(np.float32)
    got = _to_radians(values, encoding, "test")[: len(radians)]
    np.testing.assert_allclose(got, radians, atol=1e-3)


def test_patient_ids_that_collide_as_labels_are_refused(sims, tmp_path, capsys):
    for pid in ("A-1", "A_1"):
        write_simulated_dicom(
            sims["ori1"], tmp_path / "in" / pid, DicomFlavour("ge"), patient_id=pid
        )
    assert dicom2bids([str(tmp_path / "in"), str(tmp_path / "ds"), "--dry-run"]) == 1
    assert "would all become sub-A1" in capsys.readouterr().err
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"participants": {"A-1": "a", "A_1": "b"}}))
    args = [str(tmp_path / "in"), str(tmp_path / "ds"), "--dry-run", "--mapping", str(mapping)]
    assert dicom2bids(args) == 0
    out = capsys.readouterr().out
    assert "sub-a/anat/sub-a_echo-1_part-mag_MEGRE" in out and "sub-b/anat/" in out


def test_orientations_as_acq_are_grouped_by_the_qsm_app(dicom_dir, tmp_path):
    """--repeats acq names head orientations acq-ori1/-ori2, which the BIDS App reads as one
    multi-orientation group of two acquisitions with their echo times and field strength."""
    from qsmflow.io.bids import collect_acquisitions
    from qsmflow.workflows.multi_orientation import group_orientations

    bids = tmp_path / "ds"
    assert dicom2bids([str(dicom_dir / "SIE"), str(bids), "--repeats", "acq", "--quiet"]) == 0
    assert (bids / "sub-SIE/anat/sub-SIE_acq-ori2_echo-4_part-phase_MEGRE.nii.gz").exists()
    assert (bids / "sub-SIE/anat/sub-SIE_T1w.nii.gz").exists()
    acquisitions, problems = collect_acquisitions(bids)
    assert problems == {}
    assert [a.acquisition for a in acquisitions] == ["ori1", "ori2"]
    assert acquisitions[0].echo_times_s == pytest.approx(list(TES))
    assert acquisitions[0].b0_tesla == pytest.approx(3.0)
    groups = group_orientations(acquisitions)
    assert [len(g) for g in groups.values()] == [2]


def test_coil_names_from_the_csa_header(sims, tmp_path):
    """Without (0051,100F), the Siemens coil element comes from the CSA image header."""
    import pydicom

    from qsmflow.dicom import find_acquisitions, scan_dicom

    files = write_simulated_dicom(sims["coils"], tmp_path, DicomFlavour("siemens"))
    for path in files[:: len(TES) * MATRIX[2]]:  # the first echo's files only need checking
        ds = pydicom.dcmread(path)
        assert ds.get((0x0051, 0x100F)) is not None
    for path in files:
        ds = pydicom.dcmread(path)
        del ds[(0x0051, 0x100F)]
        ds.save_as(path)
    (acq,) = find_acquisitions(scan_dicom(tmp_path))
    assert acq.coils == ["H1", "H2"] and acq.problems == []


def _field_hz(phase1: np.ndarray, phase2: np.ndarray) -> np.ndarray:
    """Frequency offset (Hz) from two echoes' phase (rad), DESIGN.md's phase model."""
    return _wrap(phase2 - phase1) / (2 * np.pi * (TES[1] - TES[0]))


def test_ge_phase_polarity_gives_the_siemens_field_sign(converted, sims, dicom_dir, tmp_path):
    """The same simulated field through the Siemens and the GE flavours (GE stores the other
    handedness) comes out of the conversion with the same sign, the sign of the true field;
    --phase-polarity keep gives the GE scanner's own (opposite) sign and says so."""
    import pydicom

    bids, *_ = converted
    sim = sims["ori1"]
    true_hz = sim.total_field_ppm * 1e-6 * 42.57747892e6 * sim.params.b0_tesla
    inside = sim.mask & (sim.magnitude[..., 1] > 0.2 * sim.magnitude[..., 1].max())

    def field(root: Path, prefix: str) -> np.ndarray:
        out = []
        for e in (1, 2):
            data, aff, _ = _load(root, f"{prefix}_echo-{e}_part-phase_MEGRE.nii.gz")
            out.append(_to_reference(data, aff, sim.affine)[0])
        return _field_hz(*out)

    fields = {
        "SIE": field(bids, "sub-SIE/anat/sub-SIE_run-1"),
        "GEMP": field(bids, "sub-GEMP/anat/sub-GEMP"),
        "GEMF": field(bids, "sub-GEMF/anat/sub-GEMF"),
    }
    for name, hz in fields.items():
        err = np.abs(hz - true_hz)[inside]
        assert np.median(err) < 0.5, (name, np.median(err))  # Hz; the field spans ~+-30 Hz
        assert np.corrcoef(hz[inside], true_hz[inside])[0, 1] > 0.99, name
    # the GE DICOM holds the opposite sign (what a GE scanner writes): milliradians of -phase
    ge_files = sorted((dicom_dir / "GEMP" / "s0").glob("*.dcm"))
    ds = next(d for d in map(pydicom.dcmread, ge_files) if d[0x0043, 0x102F].value == 1)
    echo = int(ds.EchoNumbers) - 1
    stored = ds.pixel_array.T.astype(np.float32) / 1000
    positions = dicom_geometry(sim.affine, MATRIX[2])[2]
    slice_k = next(
        i for i, pos in enumerate(positions) if np.allclose(pos, ds.ImagePositionPatient)
    )
    truth = sim.phase[:, :, slice_k, echo]
    assert np.abs(_wrap(stored + truth)).max() <= 0.5e-3 + 1e-6
    # keep: the scanner's sign, recorded in the sidecar
    keep = tmp_path / "keep"
    args = [str(dicom_dir / "GEMP"), str(keep), "--quiet", "--phase-polarity", "keep"]
    assert dicom2bids(args) == 0
    kept = field(keep, "sub-GEMP/anat/sub-GEMP")
    np.testing.assert_allclose(kept[inside], -fields["GEMP"][inside], atol=0.05)
    side = json.loads((keep / "sub-GEMP/anat/sub-GEMP_echo-1_part-phase_MEGRE.json").read_text())
    assert side["PhasePolarityInverted"] is False
    side = json.loads((bids / "sub-GEMP/anat/sub-GEMP_echo-1_part-phase_MEGRE.json").read_text())
    assert side["PhasePolarityInverted"] is True and "GE" in side["PhasePolarityNote"]
    # invert on Siemens integer phase: exactly the negated DICOM steps, still int16
    inv = tmp_path / "invert"
    args = [str(dicom_dir / "SIEMF"), str(inv), "--quiet", "--phase-polarity", "invert"]
    assert dicom2bids(args) == 0
    name = "sub-SIEMF/anat/sub-SIEMF_echo-3_part-phase_MEGRE.nii.gz"
    assert nib.load(inv / name).get_data_dtype() == np.int16
    data, aff, side = _load(inv, name)
    data = _to_reference(data, aff, sims["ori2"].affine)[0]
    err = np.abs(_wrap(data + sims["ori2"].phase[..., 2])).max()
    assert err <= np.pi / 4096 * 1.01 + 1e-6 and side["PhasePolarityInverted"] is True


@pytest.mark.parametrize("subject", ["SIECOIL", "GECOIL", "GEMPCOIL", "PHICOIL", "PHIMFCOIL"])
def test_coil_data_combine_with_mcpc3ds(converted, sims, subject):
    """The 4-D coil images of every vendor feed MCPC-3D-S (the pipeline's coil combination):
    the field of the combined phase matches the simulated field as well as the combination of
    the simulator's own channels does."""
    from qsmflow.algorithms.echoes.coils import mcpc3ds

    bids, *_ = converted
    sim = sims["coils"]
    mags, phases = [], []
    for e in range(len(TES)):
        prefix = f"sub-{subject}/anat/sub-{subject}_echo-{e + 1}"
        mag, aff, _ = _load(bids, f"{prefix}_part-mag_MEGRE.nii.gz")
        phase, _, _ = _load(bids, f"{prefix}_part-phase_MEGRE.nii.gz")
        mags.append(_to_reference(mag, aff, sim.affine)[0])
        phases.append(_to_reference(phase, aff, sim.affine)[0])
    mag = np.stack(mags, axis=3)  # (x, y, z, echo, coil)
    phase = np.stack(phases, axis=3)
    got = mcpc3ds(mag, phase, TES, VOXEL)
    ref = mcpc3ds(sim.magnitude, sim.phase, TES, VOXEL)
    true_hz = sim.total_field_ppm * 1e-6 * 42.57747892e6 * sim.params.b0_tesla
    inside = sim.mask & (ref.magnitude[..., 1] > 0.2 * ref.magnitude[..., 1].max())
    err = np.abs(_field_hz(got.phase_rad[..., 0], got.phase_rad[..., 1]) - true_hz)[inside]
    ref_err = np.abs(_field_hz(ref.phase_rad[..., 0], ref.phase_rad[..., 1]) - true_hz)[inside]
    assert np.median(err) <= np.median(ref_err) + 0.05, (np.median(err), np.median(ref_err))
    assert np.median(err) < 1.0  # Hz


def test_missing_channel_is_reported_not_converted(sims, tmp_path, capsys):
    """Philips channel series where one element lacks an echo: reported, nothing written, the
    input folder untouched."""
    import pydicom

    src = tmp_path / "dicom"
    for path in write_simulated_dicom(sims["coils"], src, DicomFlavour("philips")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if int(ds.SeriesNumber) == 2 and int(ds.EchoNumbers) == 3:
            path.unlink()
    before = _tree_digest(src)
    bids = tmp_path / "ds"
    assert dicom2bids([str(src), str(bids), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "not converted" in out and "lacks coil(s) ['E2']" in out
    assert not bids.exists()
    assert _tree_digest(src) == before


def test_corrupt_header_is_reported_by_path(sims, tmp_path, capsys):
    """A file that claims to be DICOM but whose header is garbage is reported by path (with
    the reason) and the good series next to it still converts."""
    src = tmp_path / "dicom"
    write_simulated_dicom(sims["ori1"], src / "good", DicomFlavour("philips"), patient_id="OK")
    rng = np.random.default_rng(0)
    meta = b"\0" * 128 + b"DICM"
    (src / "bad1.dcm").write_bytes(meta + b"\x02\x00\x10\x00UI\xff\x7f" + rng.bytes(300))
    sop = b"\x02\x00\x02\x00UI\x40\x00" + rng.bytes(64)  # a SOP class "UID" of garbage
    (src / "bad2.dcm").write_bytes(meta + sop + rng.bytes(200))
    bids = tmp_path / "ds"
    with warnings.catch_warnings():  # pydicom may warn about the garbage values
        warnings.simplefilter("ignore")
        assert dicom2bids([str(src), str(bids), "--quiet"]) == 0
    out = capsys.readouterr().out
    listed = out.split("2 corrupt DICOM file(s) (not used):")[1].splitlines()[1:3]
    assert sorted(line.split(":")[0].strip() for line in listed) == [
        str(src / "bad1.dcm"),
        str(src / "bad2.dcm"),
    ]
    assert all("damaged header" in line for line in listed)
    assert len(list((bids / "sub-OK/anat").glob("*.nii.gz"))) == 2 * len(TES)


@pytest.mark.parametrize("name", ["ori1", "ori2", "coils"])
def test_slice_chop_detection_on_simulations(sims, name):
    """Every echo of the simulated heads (axial, tilted and oblique, per channel) is detected
    as unchopped, and with pi on every other slice as chopped, whichever slices carry it."""
    from qsmflow.dicom.convert import detect_slice_chop

    signal = sims[name].complex_signal
    sign = np.where(np.arange(MATRIX[2]) % 2 == 1, -1, 1).astype(np.float32)
    for e in range(len(TES)):
        echo = signal[:, :, :, e]
        assert not detect_slice_chop(echo)
        chop = sign.reshape(1, 1, -1, *([1] * (echo.ndim - 3)))
        assert detect_slice_chop(echo * chop) and detect_slice_chop(echo * -chop)


def test_slice_chop_is_left_alone_in_2d_scans(sims, tmp_path):
    """The chop comes from the 3-D Fourier transform: a GE scan marked 2-D is not corrected
    (its odd slices keep their extra pi) and its sidecar makes no claim about it."""
    import pydicom

    sim = sims["ori1"]
    flavour = DicomFlavour("ge", multiframe=True, parts=("real", "imag"))
    (path,) = write_simulated_dicom(sim, tmp_path / "in", flavour, patient_id="TWOD")
    ds = pydicom.dcmread(path)
    ds.MRAcquisitionType = "2D"
    ds.save_as(path)
    assert dicom2bids([str(tmp_path / "in"), str(tmp_path / "ds"), "--quiet"]) == 0
    phase, aff, side = _load(
        tmp_path / "ds", "sub-TWOD/anat/sub-TWOD_echo-1_part-phase_MEGRE.nii.gz"
    )
    assert "SliceChopCorrected" not in side and side["PhasePolarityInverted"] is True
    phase = _to_reference(phase, aff, sim.affine)[0]
    diff = np.abs(_wrap(phase - sim.phase[..., 0]))
    strong = sim.magnitude[..., 0] > 0.2 * sim.magnitude[..., 0].max()
    iop, _, positions = dicom_geometry(sim.affine, MATRIX[2])
    along = [float(np.dot(np.cross(iop[:3], iop[3:]), pos)) for pos in positions]
    rank = np.argsort(np.argsort(along))  # order along the slice normal, as the writer chops
    for k in range(MATRIX[2]):
        expected = np.pi if rank[k] % 2 else 0.0
        assert np.allclose(diff[:, :, k][strong[:, :, k]], expected, atol=0.01), k


def test_channels_without_element_names_are_reported(sims, tmp_path, capsys):
    """GE channel series whose images lost their coil macro cannot be told apart: the scan is
    reported (naming the series) and not converted, never stacked in a guessed order."""
    import pydicom

    src = tmp_path / "dicom"
    for path in write_simulated_dicom(sims["coils"], src, DicomFlavour("ge")):
        ds = pydicom.dcmread(path)
        del ds.MRReceiveCoilSequence
        ds.save_as(path)
    assert dicom2bids([str(src), str(tmp_path / "ds"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "duplicate images at one slice position (from series 1, 2:" in out
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("subject", ["SIECOIL", "GECOIL", "PHIMFCOIL"])
def test_coil_files_feed_the_coil_combination_interface(
    converted, sims, subject, tmp_path, monkeypatch
):
    """The BIDS files as written (4-D per echo, echo times from the sidecars) go straight into
    qsmflow's CoilCombination interface (MCPC-3D-S); its field matches the simulated one."""
    from qsmflow.interfaces import CoilCombination

    bids, *_ = converted
    sim = sims["coils"]
    anat = bids / f"sub-{subject}/anat"
    stems = [f"sub-{subject}_echo-{e + 1}_part-" for e in range(len(TES))]
    sidecars = [json.loads((anat / f"{s}phase_MEGRE.json").read_text()) for s in stems]
    monkeypatch.chdir(tmp_path)  # the interface writes into the working folder
    res = CoilCombination(
        in_phase=[str(anat / f"{s}phase_MEGRE.nii.gz") for s in stems],
        in_magnitude=[str(anat / f"{s}mag_MEGRE.nii.gz") for s in stems],
        echo_times=[side["EchoTime"] for side in sidecars],
    ).run()
    img = nib.load(res.outputs.out_phase)
    combined = _to_reference(np.asarray(img.dataobj, np.float32), img.affine, sim.affine)[0]
    true_hz = sim.total_field_ppm * 1e-6 * 42.57747892e6 * sim.params.b0_tesla
    rss = np.sqrt((sim.magnitude[..., 1, :] ** 2).sum(-1))
    inside = sim.mask & (rss > 0.2 * rss.max())
    err = np.abs(_field_hz(combined[..., 0], combined[..., 1]) - true_hz)[inside]
    assert np.median(err) < 0.6, np.median(err)  # Hz (0.41 from the simulator's channels)
