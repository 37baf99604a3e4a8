"""Real scanner DICOM shipped in PyPI packages (pydicom, pydicom-data) converts without error."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow.cli.dicom2bids import main as dicom2bids

from .test_dicom import _validate

#: file -> (package, participant label)
REAL_FILES = {
    "MR_small.dcm": ("pydicom", "mrsmall"),
    "MR_small_bigendian.dcm": ("pydicom", "mrsmallbe"),
    "MR_small_RLE.dcm": ("pydicom", "mrsmallrle"),
    "MR_small_jp2klossless.dcm": ("pydicom", "mrsmalljp2k"),
    "emri_small.dcm": ("pydicom-data", "emri"),
    "emri_small_big_endian.dcm": ("pydicom-data", "emribe"),
    "emri_small_RLE.dcm": ("pydicom-data", "emrirle"),
    "emri_small_jpeg_2k_lossless.dcm": ("pydicom-data", "emrijp2k"),
    "emri_small_jpeg_ls_lossless.dcm": ("pydicom-data", "emrijpls"),
    "MR2_UNCR.dcm": ("pydicom-data", "mr2"),
    "MR2_J2KR.dcm": ("pydicom-data", "mr2jp2k"),
    "MR-SIEMENS-DICOM-WithOverlays.dcm": ("pydicom-data", "siemens"),
}


def _locate(name: str, package: str) -> Path:
    """Path of a test file inside the installed package (never downloaded)."""
    if package == "pydicom":
        from pydicom.data import get_testdata_file

        return Path(get_testdata_file(name))
    data_store = pytest.importorskip("data_store", reason="pydicom-data is not installed")
    path = Path(data_store.__file__).parent / "data" / name
    if not path.exists():
        pytest.skip(f"{name} is not in this pydicom-data version")
    return path


@pytest.fixture(scope="module")
def real_dataset(tmp_path_factory):
    """Each real file converted (as T1w, by a mapping rule) into one BIDS dataset."""
    root = tmp_path_factory.mktemp("real")
    mapping = root / "map.json"
    mapping.write_text(json.dumps({"series": [{"match": "*", "suffix": "T1w"}]}))
    bids = root / "bids"
    results = {}
    for name, (package, label) in REAL_FILES.items():
        src = _locate(name, package)
        folder = root / "in" / label
        folder.mkdir(parents=True)
        (folder / name).symlink_to(src)
        code = dicom2bids(
            [str(folder), str(bids), "--participant-label", label, "--mapping", str(mapping)]
            + ["--quiet"]
        )
        results[name] = (code, src, bids / f"sub-{label}/anat/sub-{label}_T1w.nii.gz")
    return bids, results


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_file_converts(real_dataset, name):
    import pydicom

    _, results = real_dataset
    code, src, nifti = results[name]
    assert code == 0
    img = nib.load(nifti)
    ds = pydicom.dcmread(src)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    assert sorted(img.shape[:2]) == sorted((ds.Rows, ds.Columns))
    assert int(np.prod(img.shape[2:])) == frames
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception:  # no decoder for this transfer syntax in the test environment
        return
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    expected = np.sort((pixels * slope + inter).ravel())
    got = np.sort(np.asarray(img.dataobj, dtype=np.float64).ravel())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_real_files_validate(real_dataset):
    bids, _ = real_dataset
    assert _validate(bids)[0] == []


def test_dicomdir_tree_of_philips_localizers(tmp_path, capsys):
    """A DICOMDIR tree with several series: the DICOMDIR file is listed, series convert."""
    from pydicom.data import get_testdata_file

    tree = Path(get_testdata_file("DICOMDIR")).parent / "98892003"
    if not tree.is_dir():
        pytest.skip("pydicom's DICOMDIR test tree is not installed")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"series": [{"match": "*", "suffix": "T1w"}]}))
    code = dicom2bids([str(tree), str(tmp_path / "ds"), "--mapping", str(mapping), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    written = sorted((tmp_path / "ds").rglob("*_T1w.nii.gz"))
    assert len(written) == out.count("_T1w.nii.gz") > 3
    assert _validate(tmp_path / "ds")[0] == []
