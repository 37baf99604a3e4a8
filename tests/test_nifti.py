"""NIfTI geometry: B0 direction from affines, atomic writes."""

import nibabel as nib
import numpy as np
import pytest

from qsmflow.io.nifti import b0_direction_from_affine, load_nifti, save_nifti, voxel_sizes
from qsmflow.simulate import rotation_matrix


def test_axis_aligned_affine():
    np.testing.assert_allclose(b0_direction_from_affine(np.diag([0.8, 0.8, 2.0, 1.0])), [0, 0, 1])


def test_flipped_axes_lps_like():
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(b0_direction_from_affine(aff), [0, 0, 1], atol=1e-12)
    aff = np.diag([1.0, 1.0, -2.0, 1.0])  # slices stored top to bottom
    np.testing.assert_allclose(b0_direction_from_affine(aff), [0, 0, -1], atol=1e-12)


def test_oblique_about_x():
    theta = np.deg2rad(20)
    rot = rotation_matrix(pitch_deg=20)
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 1.2, 2.5])
    # voxel axis j points along (0, cos, sin), k along (0, -sin, cos): B0 = sin*j + cos*k
    np.testing.assert_allclose(
        b0_direction_from_affine(aff), [0, np.sin(theta), np.cos(theta)], atol=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_random_rotations_and_anisotropic_voxels(seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    vox = rng.uniform(0.5, 3.0, size=3)
    aff = np.eye(4)
    aff[:3, :3] = q @ np.diag(vox)
    aff[:3, 3] = rng.normal(size=3) * 50
    b = b0_direction_from_affine(aff)
    assert abs(np.linalg.norm(b) - 1) < 1e-12
    np.testing.assert_allclose(voxel_sizes(aff), vox, rtol=1e-12)
    # a unit step along b in voxel space (scaled by voxel sizes) points along world z
    world = aff[:3, :3] @ (b / vox)
    np.testing.assert_allclose(world / np.linalg.norm(world), [0, 0, 1], atol=1e-12)


def test_header_roundtrip_keeps_b0(tmp_path):
    aff = np.eye(4)
    aff[:3, :3] = rotation_matrix(12, -7, 30) @ np.diag([1.0, 1.0, 1.5])
    path = save_nifti(np.zeros((4, 5, 6), np.float32), aff, tmp_path / "x.nii.gz")
    data, img = load_nifti(path)
    np.testing.assert_allclose(
        b0_direction_from_affine(img.affine), b0_direction_from_affine(aff), atol=1e-6
    )
    assert img.get_qform(coded=True)[1] == 1 and img.get_sform(coded=True)[1] == 1
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was renamed away


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), target)
    assert list(tmp_path.iterdir()) == []


def test_bad_file_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        load_nifti(bad)
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        load_nifti(tmp_path / "missing.nii")


def test_singular_affine_rejected():
    with pytest.raises(ValueError, match="singular"):
        b0_direction_from_affine(np.diag([1.0, 1.0, 0.0, 1.0]) + np.eye(4) * 0)


def test_written_files_get_the_usual_permissions(tmp_path):
    """Atomic writes must not leave mkstemp's 0600 mode: other users read BIDS outputs."""
    import os
    import stat

    from qsmflow.io.nifti import save_nifti, write_json

    old = os.umask(0o022)
    try:
        img = save_nifti(np.zeros((2, 2, 2), np.float32), np.eye(4), tmp_path / "a.nii.gz")
        side = write_json({"Units": "ppm"}, tmp_path / "a.json")
    finally:
        os.umask(old)
    for path in (img, side):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
