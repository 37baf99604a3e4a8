"""Tests for qsmflow.interfaces.BackgroundRemoval: options reach the algorithms, units, errors.

Known answers: the interface's outputs equal the algorithm called directly on the same arrays;
a field in Hz with its field strength gives the same local field as in ppm; bad files (grids
that differ, NaN, empty / full / border-touching masks) raise errors that name the files.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmflow import GAMMA_BAR_MHZ_PER_T
from qsmflow.algorithms.background import lbv, noise_weights, pdf
from qsmflow.interfaces import BackgroundRemoval
from qsmflow.io.nifti import save_nifti

VOX = (2.0, 2.0, 2.0)
AFFINE = np.diag([*VOX, 1.0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An ellipsoidal mask and a smooth field with a harmonic background, as NIfTI (ppm)."""
    root = tmp_path_factory.mktemp("bfr")
    shape = (36, 40, 32)
    x, y, z = np.meshgrid(
        *[(np.arange(n) - n / 2) * d for n, d in zip(shape, VOX, strict=True)], indexing="ij"
    )
    mask = (x / 26) ** 2 + (y / 30) ** 2 + (z / 22) ** 2 < 1
    rng = np.random.default_rng(0)
    local = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * mask
    field = (local + 0.02 * x + 1e-3 * (x * x - y * y)).astype(np.float32)
    paths = {"field_path": root / "field.nii.gz", "mask_path": root / "mask.nii.gz"}
    save_nifti(field, AFFINE, paths["field_path"])
    save_nifti(mask, AFFINE, paths["mask_path"])
    return {"root": root, "field": field, "mask": mask, **paths}


def run(files, tmp_path, **inputs):
    inputs.setdefault("in_field", str(files["field_path"]))
    inputs.setdefault("in_mask", str(files["mask_path"]))
    tmp_path.mkdir(parents=True, exist_ok=True)
    res = BackgroundRemoval(**inputs).run(cwd=str(tmp_path))
    local = nib.load(res.outputs.out_field).get_fdata(dtype=np.float32)
    valid = nib.load(res.outputs.out_mask).get_fdata() > 0.5
    return res, local, valid


def test_options_reach_the_algorithms(files, tmp_path):
    # LBV with its boundary 2 mm deep (default 4 mm)
    _, local, valid = run(files, tmp_path, method="lbv", erode_mm=2.0)
    expected, roi = lbv(files["field"], files["mask"], VOX, erode_mm=2.0)
    np.testing.assert_array_equal(valid, roi)
    np.testing.assert_allclose(local, expected, atol=1e-6)
    default, _ = lbv(files["field"], files["mask"], VOX)
    assert np.abs(default - expected)[roi & (default != 0)].max() > 1e-3
    # PDF with an explicit B0 direction (the affine's would be z) and no erosion
    b0 = (0.3, 0.0, 1.0)
    _, local, valid = run(files, tmp_path, method="pdf", erode_mm=0.0, b0_direction=b0)
    expected, roi = pdf(files["field"], files["mask"], VOX, b0)
    np.testing.assert_array_equal(valid, files["mask"])
    np.testing.assert_allclose(local[roi], expected[roi], atol=1e-6)


def test_pdf_noise_weights_from_a_file(files, tmp_path):
    # a noise SD that is large on one side: the weighted fit differs from the unweighted one
    x = np.arange(files["mask"].shape[0])[:, None, None]
    sd = np.broadcast_to(np.where(x > 18, 10.0, 0.1), files["mask"].shape).astype(np.float32)
    path = files["root"] / "field_sd.nii.gz"
    save_nifti(sd, AFFINE, path)
    _, local, valid = run(files, tmp_path, method="pdf", in_field_sd=str(path))
    weights = noise_weights(sd, files["mask"])
    expected, roi = pdf(files["field"], files["mask"], VOX, (0, 0, 1), weights=weights)
    np.testing.assert_array_equal(valid, roi)
    np.testing.assert_allclose(local, expected, atol=1e-6)
    plain, _ = pdf(files["field"], files["mask"], VOX, (0, 0, 1))
    assert np.abs(plain - expected)[roi].max() > 1e-3 * np.abs(expected[roi]).max()
    # an SD map on another grid names its file
    bad = files["root"] / "field_sd_small.nii.gz"
    save_nifti(sd[:-1], AFFINE, bad)
    with pytest.raises(ValueError, match="field_sd_small"):
        run(files, tmp_path / "bad", method="pdf", in_field_sd=str(bad))


def test_field_in_hz(files, tmp_path):
    b0_tesla = 3.0
    hz = files["field"] * np.float32(GAMMA_BAR_MHZ_PER_T * b0_tesla)
    path = files["root"] / "field_hz.nii.gz"
    save_nifti(hz, AFFINE, path)
    res, local_hz, _ = run(
        files, tmp_path, in_field=str(path), field_units="Hz", b0_tesla=b0_tesla, method="ismv"
    )
    _, local_ppm, _ = run(files, tmp_path / "ppm", method="ismv")
    np.testing.assert_allclose(local_hz, local_ppm, atol=1e-5 * np.abs(local_ppm).max())
    out_hz = nib.load(res.outputs.out_field_hz).get_fdata()
    expected_hz = local_ppm * GAMMA_BAR_MHZ_PER_T * b0_tesla
    np.testing.assert_allclose(out_hz, expected_hz, atol=1e-4 * np.abs(expected_hz).max())
    with pytest.raises(ValueError, match="b0_tesla"):
        run(files, tmp_path / "nob0", in_field=str(path), field_units="Hz")


@pytest.mark.parametrize("method", ["vsharp", "pdf", "lbv"])
def test_bad_files_name_the_files(files, tmp_path, method):
    root = files["root"]
    mask = files["mask"]
    cases = {
        "empty": (files["field"], np.zeros_like(mask), AFFINE, "empty"),
        "full": (files["field"], np.ones_like(mask), AFFINE, "whole volume"),
        "border": (files["field"], mask | (np.arange(36) == 0)[:, None, None], AFFINE, "border"),
        "nan": (np.where(mask, np.nan, 0).astype(np.float32), mask, AFFINE, "NaN"),
        "shape": (files["field"], mask[:-1], AFFINE, "shape"),
        "affine": (files["field"], mask, np.diag([2.0, 2.0, 2.5, 1.0]), "affine"),
    }
    for name, (field, bad_mask, mask_affine, message) in cases.items():
        field_path = root / f"{method}_{name}_field.nii.gz"
        mask_path = root / f"{method}_{name}_mask.nii.gz"
        save_nifti(field, AFFINE, field_path)
        save_nifti(bad_mask, mask_affine, mask_path)
        with pytest.raises(ValueError, match=message) as info:
            run(
                files,
                tmp_path / name,
                in_field=str(field_path),
                in_mask=str(mask_path),
                method=method,
            )
        assert mask_path.name in str(info.value), name
