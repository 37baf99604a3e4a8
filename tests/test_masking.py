"""Threshold masks (Otsu, percentile, fixed), hole filling, largest component, mm morphology."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmflow.algorithms.masking import (
    check_head_image,
    close_mm,
    dilate_mm,
    erode_mm,
    fill_holes,
    foreground_otsu_threshold,
    largest_component,
    local_mean,
    magnitude_tissue_mask,
    otsu_threshold,
    phase_quality_map,
    phase_quality_mask,
    reliable_mask,
    remove_outer_csf,
    threshold_mask,
    two_pass_combine,
)


def _distance(shape, voxel, centre_mm):
    grid = np.indices(shape).reshape(len(shape), -1).T * np.asarray(voxel)
    return np.linalg.norm(grid - np.asarray(centre_mm), axis=1).reshape(shape)


def _ball_structure(radius_mm, voxel):
    half = [int(np.floor(radius_mm / v)) for v in voxel]
    offsets = np.indices([2 * h + 1 for h in half]).reshape(3, -1).T - half
    inside = np.linalg.norm(offsets * np.asarray(voxel), axis=1) <= radius_mm
    return inside.reshape([2 * h + 1 for h in half])


def _between_class_variance_reference(values, thresholds):
    """Brute force: the between-class variance of splitting ``values`` at each threshold."""
    out = []
    for t in thresholds:
        low, high = values[values <= t], values[values > t]
        if low.size == 0 or high.size == 0:
            out.append(0.0)
            continue
        w0, w1 = low.size / values.size, high.size / values.size
        out.append(w0 * w1 * (low.mean() - high.mean()) ** 2)
    return np.asarray(out)


# -------------------------------------------------------------------------------------- Otsu
@pytest.mark.parametrize("fraction_high", [0.2, 0.5, 0.8])
def test_otsu_threshold_lies_between_two_noisy_levels(fraction_high):
    rng = np.random.default_rng(0)
    n = 40_000
    high = rng.random(n) < fraction_high
    values = np.where(high, 3.0, 1.0) + rng.normal(0, 0.25, n)
    t = otsu_threshold(values)
    assert 1.5 < t < 2.5
    # misclassification is small at this separation (4 SD between the levels)
    assert np.mean((values > t) != high) < 0.01


def test_otsu_threshold_maximises_between_class_variance():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(10, 2, 3000), rng.normal(25, 5, 1000)])
    t = otsu_threshold(values, n_bins=256)
    candidates = np.linspace(values.min(), values.max(), 257)[1:-1]  # the bin edges
    sigma_b = _between_class_variance_reference(values, candidates)
    best = candidates[np.argmax(sigma_b)]
    assert abs(t - best) <= 1.5 * (values.max() - values.min()) / 256
    assert _between_class_variance_reference(values, [t])[0] >= 0.999 * sigma_b.max()


def test_otsu_threshold_ignores_non_finite_and_handles_constant():
    values = np.array([1.0, 1.0, 5.0, 5.0, np.nan, np.inf])
    assert 1.0 <= otsu_threshold(values) < 5.0
    assert otsu_threshold(np.full(10, 2.5)) == 2.5
    with pytest.raises(ValueError):
        otsu_threshold(np.array([np.nan]))


# ---------------------------------------------------------------------------- threshold_mask
def test_threshold_mask_fills_hole_in_sphere():
    r = _distance((40, 40, 40), (1, 1, 1), (20, 19.5, 20.3))
    ball = r < 14
    image = np.where(ball & (r > 5), 100.0, 5.0)  # a shell: dark cavity inside a bright ball
    filled = threshold_mask(image)
    np.testing.assert_array_equal(filled, ball)
    unfilled = threshold_mask(image, fill_holes=False)
    np.testing.assert_array_equal(unfilled, ball & (r > 5))


def test_threshold_mask_methods():
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 1, (20, 20, 20))
    pct = threshold_mask(
        image, method="percentile", value=75, fill_holes=False, largest_component=False
    )
    assert pct.mean() == pytest.approx(0.25, abs=0.005)
    fixed = threshold_mask(
        image, method="fixed", value=0.9, fill_holes=False, largest_component=False
    )
    np.testing.assert_array_equal(fixed, image > 0.9)
    image[0, 0, 0] = np.nan
    assert not threshold_mask(image, method="fixed", value=-1.0)[0, 0, 0]


def test_threshold_mask_keeps_largest_component():
    image = np.zeros((30, 30, 30))
    image[2:8, 2:8, 2:8] = 1.0  # 216 voxels
    image[15:25, 15:25, 15:25] = 1.0  # 1000 voxels
    mask = threshold_mask(image, method="fixed", value=0.5)
    assert mask.sum() == 1000 and mask[20, 20, 20]
    both = threshold_mask(image, method="fixed", value=0.5, largest_component=False)
    assert both.sum() == 1216
    np.testing.assert_array_equal(largest_component(both), mask)


def test_threshold_mask_erodes_in_mm():
    vox = (1.0, 1.5, 2.5)
    r = _distance((60, 40, 24), vox, (30.2, 29.6, 30.1))
    image = np.where(r < 22, 1.0, 0.0)
    mask = threshold_mask(image, method="fixed", value=0.5, voxel_size_mm=vox, erode_mm=6.0)
    np.testing.assert_array_equal(mask, erode_mm(r < 22, 6.0, vox))
    with pytest.raises(ValueError):
        threshold_mask(image, erode_mm=2.0)  # no voxel size


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "otsu", "value": 3.0},
        {"method": "percentile"},
        {"method": "percentile", "value": 120},
        {"method": "fixed"},
        {"method": "mean"},
        {"erode_mm": -1.0, "voxel_size_mm": (1, 1, 1)},
    ],
)
def test_threshold_mask_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        threshold_mask(np.ones((5, 5, 5)), **kwargs)


# ------------------------------------------------------------------------------ morphology
def test_fill_holes_fills_enclosed_cavity_only():
    r = _distance((30, 30, 30), (1, 1, 1), (15, 15, 15))
    shell = (r < 12) & (r > 6)
    np.testing.assert_array_equal(fill_holes(shell), r < 12)
    open_shell = shell.copy()
    open_shell[15, 15, 15:] = False  # a channel from the cavity to the border
    filled = fill_holes(open_shell)
    assert not filled[15, 15, 15]


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (0.8, 1.2, 2.0)])
def test_erode_mm_shrinks_sphere_radius_by_r(vox):
    shape = tuple(int(np.ceil(64 / v)) for v in vox)
    centre = (31.7, 32.2, 32.9)
    r = _distance(shape, vox, centre)
    big_r, erode_r = 24.0, 7.0
    eroded = erode_mm(r <= big_r, erode_r, vox)
    # the result is the ball of radius R - r, up to one voxel
    assert np.all(eroded[r <= big_r - erode_r])
    assert not np.any(eroded[r > big_r - erode_r + max(vox)])
    equivalent_radius = (3 * eroded.sum() * np.prod(vox) / (4 * np.pi)) ** (1 / 3)
    assert equivalent_radius == pytest.approx(big_r - erode_r, abs=0.5 * max(vox))


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (0.7, 1.1, 1.9)])
def test_erode_and_dilate_match_ball_structuring_element(vox):
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((30, 28, 22)), 2.0) > 0.5
    ball = _ball_structure(3.25, vox)
    np.testing.assert_array_equal(
        erode_mm(mask, 3.25, vox), ndimage.binary_erosion(mask, structure=ball, border_value=0)
    )
    np.testing.assert_array_equal(
        dilate_mm(mask, 3.25, vox), ndimage.binary_dilation(mask, structure=ball)
    )


def test_morphology_edge_cases():
    mask = np.zeros((6, 6, 6), bool)
    mask[2:4, 2:4, 2:4] = True
    np.testing.assert_array_equal(erode_mm(mask, 0.0, (1, 1, 1)), mask)
    assert not erode_mm(mask, 1.0, (1, 1, 1)).any()
    assert not dilate_mm(np.zeros((4, 4, 4), bool), 2.0, (1, 1, 1)).any()
    full = np.ones((5, 5, 5), bool)
    eroded = erode_mm(full, 1.0, (1, 1, 1))  # outside the array counts as outside the mask
    assert eroded.sum() == 27
    with pytest.raises(ValueError):
        erode_mm(mask, 1.0, (1, 1))
    with pytest.raises(ValueError):
        dilate_mm(mask, -1.0, (1, 1, 1))


# ------------------------------------------------------------- foreground Otsu and closing
def test_foreground_otsu_splits_the_upper_two_of_three_levels():
    rng = np.random.default_rng(10)
    levels = np.repeat([0.0, 0.5, 1.0], [50_000, 20_000, 30_000])
    values = levels + rng.normal(0, 0.05, levels.size)
    first = otsu_threshold(values)
    second = foreground_otsu_threshold(values)
    assert 0.05 < first < 0.45
    assert 0.6 < second < 0.9
    assert np.mean((values > second) != (levels == 1.0)) < 0.01


def test_close_mm_bridges_a_narrow_gap_and_keeps_a_ball():
    vox = (1.0, 1.0, 2.0)
    r = _distance((50, 50, 26), vox, (25.2, 24.8, 25.6))
    ball = r < 18
    np.testing.assert_array_equal(close_mm(ball, 3.0, vox), ball)  # a convex set is closed
    cut = ball.copy()
    cut[:, 24:26, :] = False  # a 2 mm slit through the ball
    closed = close_mm(cut, 3.0, vox)
    assert np.all(closed[ball & (r < 16)])
    assert not np.any(closed & ~ball)
    with pytest.raises(ValueError):
        close_mm(ball, -1.0, vox)


def test_threshold_mask_otsu_foreground_with_closing():
    r = _distance((60, 60, 60), (1, 1, 1), (30, 30, 30))
    image = np.where(r < 20, 1.0, np.where(r < 24, 0.55, np.where(r < 28, 0.05, 0.0)))
    image = image + np.random.default_rng(11).normal(0, 0.03, image.shape)
    image[29:31, :, 40:] = 0.55  # a 'sulcus' of CSF cut into the top of the 'brain'
    mask = threshold_mask(image, method="otsu-foreground", voxel_size_mm=(1, 1, 1), close_mm=3.0)
    brain = r < 20
    assert 2 * np.count_nonzero(mask & brain) / (mask.sum() + brain.sum()) > 0.98
    assert np.all(mask[29:31, 30, 40:48])  # the sulcus is bridged


# ------------------------------------------------------------------------- head checks
def test_check_head_image_errors():
    vox = (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="3-D"):
        check_head_image(np.ones((8, 8, 8, 2)), vox, name="mag.nii.gz")
    with pytest.raises(ValueError, match="mag.nii.gz: the image is all zero"):
        check_head_image(np.zeros((20, 20, 20)), vox, name="mag.nii.gz")
    noise = np.abs(np.random.default_rng(12).normal(size=(60, 60, 60)))
    with pytest.raises(ValueError, match="no head found"):
        check_head_image(noise, vox)


def test_check_head_image_accepts_the_simulated_head(sim_2mm):
    check_head_image(sim_2mm.magnitude[..., 0], (2.0, 2.0, 2.0))


# ----------------------------------------------------------------- phase-quality masks
@pytest.fixture(scope="module")
def quality(sim_2mm):
    return phase_quality_map(
        sim_2mm.phase, magnitude=sim_2mm.magnitude, echo_times_s=sim_2mm.params.echo_times_s
    )


def test_phase_quality_map_is_high_in_brain_low_in_air(sim_2mm, quality):
    seg = sim_2mm.segmentation
    assert quality.shape == sim_2mm.mask.shape and quality.dtype == np.float32
    assert np.median(quality[np.isin(seg, (8, 9))]) > 0.8
    assert np.median(quality[seg == 14]) < 0.2  # air
    with pytest.raises(ValueError, match="echo_times_s"):
        phase_quality_map(sim_2mm.phase)


def test_phase_quality_mask_matches_the_brain(sim_2mm, quality):
    mask = phase_quality_mask(quality, (2.0, 2.0, 2.0), magnitude=sim_2mm.magnitude[..., 0])
    truth = sim_2mm.mask
    assert 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum()) > 0.95  # ~0.99
    # deep grey matter (labels 1-7) lies inside the mask, and the mask has no cavities
    dgm = np.isin(sim_2mm.segmentation, (1, 2, 3, 4, 5, 6, 7))
    depth = ndimage.distance_transform_edt(truth, sampling=(2.0, 2.0, 2.0))
    assert np.all(mask[dgm & (depth > 4.0)])
    assert np.count_nonzero(dgm & ~mask) < 0.002 * np.count_nonzero(dgm)
    np.testing.assert_array_equal(fill_holes(mask), mask)


def test_reliable_mask_leaves_out_veins(sim_2mm, quality):
    mask = phase_quality_mask(quality, (2.0, 2.0, 2.0), magnitude=sim_2mm.magnitude[..., 0])
    reliable = reliable_mask(quality, mask)
    assert not np.any(reliable & ~mask)
    assert 0.8 < reliable.sum() / mask.sum() < 0.99
    seg = sim_2mm.segmentation
    blood = (seg == 11) & mask
    tissue = np.isin(seg, (8, 9)) & mask
    # veins (short T2*, fast phase) are left out far more often than tissue
    assert np.mean(~reliable[blood]) > 2 * np.mean(~reliable[tissue])  # 0.14 vs 0.05
    with pytest.raises(ValueError, match="shape"):
        reliable_mask(quality, mask[:-1])


# ------------------------------------------------------------------------------ two pass
def test_two_pass_combine_rule():
    rng = np.random.default_rng(13)
    a = rng.normal(size=(6, 7, 8)).astype(np.float32)
    b = rng.normal(size=(6, 7, 8)).astype(np.float32)
    filled = np.zeros((6, 7, 8), bool)
    filled[1:5, 1:6, 1:7] = True
    reliable = filled.copy()
    reliable[2:4, 2:4, 2:4] = False  # a 'vein' inside the brain
    out = two_pass_combine(a, b, filled, reliable)
    np.testing.assert_array_equal(out[reliable], b[reliable])
    np.testing.assert_array_equal(out[filled & ~reliable], a[filled & ~reliable])
    assert np.all(out[~filled] == 0)
    with pytest.raises(ValueError, match="inside the filled mask"):
        two_pass_combine(a, b, reliable, filled)
    with pytest.raises(ValueError, match="shape"):
        two_pass_combine(a, b[:-1], filled, reliable)


def test_two_pass_reduces_streaking_from_unreliable_voxels(sim_2mm, quality):
    """Noisy field in the unreliable voxels streaks through a filled-mask inversion only."""
    from qsmflow.algorithms.inversion import tkd

    vox = (2.0, 2.0, 2.0)
    mask = phase_quality_mask(quality, vox, magnitude=sim_2mm.magnitude[..., 0])
    reliable = reliable_mask(quality, mask)
    bad = mask & ~reliable
    field = np.where(mask, sim_2mm.local_field_ppm, 0).astype(np.float32)
    rng = np.random.default_rng(14)
    corrupted = field.copy()
    corrupted[bad] += rng.normal(0, 0.3, np.count_nonzero(bad)).astype(np.float32)
    b0 = sim_2mm.b0_dir
    chi_filled = tkd(corrupted * mask, mask, vox, b0)
    chi_reliable = tkd(corrupted * reliable, reliable, vox, b0)
    chi = two_pass_combine(chi_filled, chi_reliable, mask, reliable)
    truth = np.where(mask, sim_2mm.chi_ppm - sim_2mm.chi_ppm[mask].mean(), 0)
    sel = reliable & (ndimage.distance_transform_edt(~bad, sampling=vox) > 4.0)

    def rmse(x):
        return float(np.sqrt(np.mean((x - x[sel].mean() - truth + truth[sel].mean())[sel] ** 2)))

    assert rmse(chi) < 0.8 * rmse(chi_filled)


# ------------------------------------------------------------------- BrainMask interface
def _dice_file(path, truth):
    mask = nib.load(path).get_fdata() > 0.5
    return 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum())


@pytest.fixture
def no_fsl(monkeypatch, tmp_path):
    """PATH without any ``bet`` and no FSLDIR."""
    import os
    import shutil

    monkeypatch.delenv("FSLDIR", raising=False)
    keep = [
        p for p in os.environ.get("PATH", "").split(os.pathsep) if not (Path(p) / "bet").exists()
    ]
    monkeypatch.setenv("PATH", os.pathsep.join(keep))
    assert shutil.which("bet") is None


def test_brain_mask_bet_falls_back_to_builtin_and_says_so(
    interface_data, tmp_path, no_fsl, monkeypatch
):
    from qsmflow.interfaces import masking as iface

    messages = []
    monkeypatch.setattr(iface.IFLOGGER, "warning", lambda msg, *a: messages.append(msg % a))
    res = iface.BrainMask(in_magnitude=interface_data["mag"], method="bet", exclude_csf=True).run(
        cwd=str(tmp_path)
    )
    assert res.outputs.method_used == "bet"
    assert any("built-in BET" in m for m in messages)
    side = json.loads(Path(res.outputs.out_sidecar).read_text())
    assert side["MethodUsed"] == "bet" and side["MethodRequested"] == "bet"
    assert side["Parameters"]["frac"] == 0.5 and side["Parameters"]["exclude_csf"]
    assert _dice_file(res.outputs.out_mask, interface_data["sim"].mask) > 0.95
    brain = nib.load(res.outputs.out_brain).get_fdata()
    mask = nib.load(res.outputs.out_mask).get_fdata() > 0.5
    assert np.all(brain[~mask] == 0) and np.all(brain[mask] >= 0) and brain.max() > 0


def test_brain_mask_fsl_bet_without_fsl_is_an_error(interface_data, tmp_path, no_fsl):
    from qsmflow.interfaces import BrainMask

    with pytest.raises(RuntimeError, match="needs FSL's bet"):
        BrainMask(in_file=interface_data["mag"], method="fsl-bet").run(cwd=str(tmp_path))


def test_fsl_bet_command_line(tmp_path):
    from qsmflow.interfaces.masking import fsl_bet_interface

    src = tmp_path / "mag.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), src)
    iface = fsl_bet_interface(
        str(src),
        str(tmp_path / "mag_brain.nii.gz"),
        frac=0.7,
        vertical_gradient=0.1,
        radius_mm=80.4,
        center_vox=[40.2, 50, 30],
        robust=True,
    )
    args = iface.cmdline.split()
    assert args[0] == "bet"  # nipype gives the input relative to the working directory
    assert Path(args[1]).resolve() == src.resolve()
    assert args[2] == str(tmp_path / "mag_brain.nii.gz")
    joined = " ".join(args[3:])
    for part in ("-f 0.70", "-g 0.10", "-m", "-r 80", "-c 40 50 30", "-R"):
        assert part in joined
    plain = fsl_bet_interface(str(src), str(tmp_path / "b.nii.gz")).cmdline.split()
    assert plain[3:] == ["-f", "0.50", "-m"]


_FAKE_BET = """#!{python}
import sys
import nibabel as nib
import numpy as np
src, out = sys.argv[1], sys.argv[2]
frac = float(sys.argv[sys.argv.index("-f") + 1])
img = nib.load(src)
data = img.get_fdata()
mask = data > frac * np.percentile(data, 99)
stem = out[: -len(".nii.gz")]
nib.save(nib.Nifti1Image(data * mask, img.affine), out)
nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), stem + "_mask.nii.gz")
"""


def test_brain_mask_bet_runs_fsl_when_bet_is_on_path(interface_data, tmp_path, monkeypatch):
    """A stand-in ``bet`` on PATH: BrainMask must call it (FSL's interface) and use its mask."""
    import os
    import sys

    from qsmflow.interfaces import BrainMask

    bindir = tmp_path / "fslbin"
    bindir.mkdir()
    fake = bindir / "bet"
    fake.write_text(_FAKE_BET.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    res = BrainMask(in_file=interface_data["mag"], method="bet", frac=0.3).run(cwd=str(work))
    assert res.outputs.method_used == "fsl-bet"
    side = json.loads(Path(res.outputs.out_sidecar).read_text())
    assert side["MethodUsed"] == "fsl-bet" and side["Command"].split()[0] == "bet"
    assert "-f 0.30" in side["Command"]
    first = interface_data["sim"].magnitude[..., 0]
    expected = first > 0.3 * np.percentile(first, 99)
    got = nib.load(res.outputs.out_mask).get_fdata() > 0.5
    np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(__import__("shutil").which("bet") is None, reason="FSL's bet is not installed")
def test_brain_mask_with_real_fsl_bet(interface_data, tmp_path):
    from qsmflow.interfaces import BrainMask

    res = BrainMask(in_file=interface_data["mag"], method="fsl-bet").run(cwd=str(tmp_path))
    assert res.outputs.method_used == "fsl-bet"
    assert _dice_file(res.outputs.out_mask, interface_data["sim"].mask) > 0.85


def test_brain_mask_phase_quality(interface_data, tmp_path):
    from qsmflow.interfaces import BrainMask

    res = BrainMask(
        in_file=interface_data["mag"],
        in_phase=interface_data["phase"],
        echo_times=[0.005, 0.010, 0.015, 0.020],
        method="phase-quality",
    ).run(cwd=str(tmp_path))
    sim = interface_data["sim"]
    assert res.outputs.method_used == "phase-quality"
    assert _dice_file(res.outputs.out_mask, sim.mask) > 0.95
    reliable = nib.load(res.outputs.out_reliable_mask).get_fdata() > 0.5
    mask = nib.load(res.outputs.out_mask).get_fdata() > 0.5
    assert not np.any(reliable & ~mask) and reliable.sum() > 0.7 * mask.sum()
    q = nib.load(res.outputs.out_quality).get_fdata()
    assert q.min() >= 0 and q.max() <= 1
    side = json.loads(Path(res.outputs.out_sidecar).read_text())
    assert side["Parameters"]["threshold_method"] == "otsu"


def test_brain_mask_magnitude_threshold_and_legacy_threshold(interface_data, tmp_path):
    from qsmflow.interfaces import BrainMask

    sim = interface_data["sim"]
    new = BrainMask(in_file=interface_data["mag"], method="magnitude-threshold").run(
        cwd=str(tmp_path)
    )
    assert _dice_file(new.outputs.out_mask, sim.mask) > 0.95
    old = BrainMask(in_magnitude=interface_data["mag"], method="threshold").run(cwd=str(tmp_path))
    assert old.outputs.method_used == "magnitude-threshold"
    assert (
        json.loads(Path(old.outputs.out_sidecar).read_text())["Parameters"]["threshold_method"]
        == "otsu"
    )


def test_brain_mask_bad_input(interface_data, tmp_path):
    from qsmflow.interfaces import BrainMask

    affine = interface_data["sim"].affine
    zero = tmp_path / "zero.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 30), np.float32), affine), zero)
    with pytest.raises(ValueError, match="zero.nii.gz: the image is all zero"):
        BrainMask(in_file=str(zero), method="bet").run(cwd=str(tmp_path))
    noise = tmp_path / "noise.nii.gz"
    rng = np.random.default_rng(15)
    nib.save(
        nib.Nifti1Image(np.abs(rng.normal(size=(40, 40, 40))).astype(np.float32), affine), noise
    )
    with pytest.raises(ValueError, match="noise.nii.gz: no head found"):
        BrainMask(in_file=str(noise), method="magnitude-threshold").run(cwd=str(tmp_path))
    five_d = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 2, 2), np.float32), affine), five_d)
    with pytest.raises(ValueError, match="five.nii.gz: expected a 3-D image or a 4-D"):
        BrainMask(in_file=str(five_d)).run(cwd=str(tmp_path))
    with pytest.raises(ValueError, match="needs in_phase"):
        BrainMask(in_file=interface_data["mag"], method="phase-quality").run(cwd=str(tmp_path))
    degrees = tmp_path / "deg.nii.gz"
    nib.save(
        nib.Nifti1Image(np.full(interface_data["sim"].mask.shape, 90.0, np.float32), affine),
        degrees,
    )
    with pytest.raises(ValueError, match="radians"):
        BrainMask(
            in_file=interface_data["mag"][0], in_phase=str(degrees), method="phase-quality"
        ).run(cwd=str(tmp_path))


def test_two_pass_combine_interface(tmp_path):
    from qsmflow.interfaces import TwoPassCombine

    rng = np.random.default_rng(16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a = rng.normal(size=(8, 9, 10)).astype(np.float32)
    b = rng.normal(size=(8, 9, 10)).astype(np.float32)
    filled = np.zeros((8, 9, 10), np.uint8)
    filled[1:7, 1:8, 1:9] = 1
    reliable = filled.copy()
    reliable[3:5, 3:5, 3:5] = 0
    paths = {}
    for name, arr in (("a", a), ("b", b), ("f", filled), ("r", reliable)):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), paths[name])
    res = TwoPassCombine(
        in_chi_filled=paths["a"],
        in_chi_reliable=paths["b"],
        in_filled_mask=paths["f"],
        in_reliable_mask=paths["r"],
    ).run(cwd=str(tmp_path))
    out = nib.load(res.outputs.out_chi).get_fdata()
    np.testing.assert_allclose(out, two_pass_combine(a, b, filled > 0, reliable > 0), atol=1e-6)
    four_d = str(tmp_path / "four.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10, 2), np.float32), affine), four_d)
    with pytest.raises(ValueError, match="in_chi_reliable .*four.nii.gz: shape"):
        TwoPassCombine(
            in_chi_filled=paths["a"],
            in_chi_reliable=four_d,
            in_filled_mask=paths["f"],
            in_reliable_mask=paths["r"],
        ).run(cwd=str(tmp_path))


def test_remove_outer_csf_on_a_layered_ball():
    vox = (1.5, 1.5, 1.5)
    r = _distance((50, 50, 50), vox, (37.0, 37.5, 36.8))
    image = np.where(r < 24, 1.0, np.where(r < 28, 0.6, 0.02))  # 'brain', 'CSF', 'skull'
    image = image + np.random.default_rng(17).normal(0, 0.04, image.shape)
    image[r < 5] = 0.6  # a 'ventricle': filled back in
    out = remove_outer_csf(image, r < 28, vox)
    brain = r < 24
    assert 2 * np.count_nonzero(out & brain) / (out.sum() + brain.sum()) > 0.98
    assert np.all(out[r < 5])
    with pytest.raises(ValueError, match="empty"):
        remove_outer_csf(image, np.zeros(image.shape, bool), vox)
    with pytest.raises(ValueError, match="shape"):
        remove_outer_csf(image, brain[:-1], vox)


def test_brain_mask_takes_one_4d_file_and_rss(interface_data, tmp_path):
    from qsmflow.interfaces import BrainMask

    sim = interface_data["sim"]
    stack = tmp_path / "mag4d.nii.gz"
    nib.save(nib.Nifti1Image(sim.magnitude, sim.affine), stack)
    res = BrainMask(in_file=str(stack), method="magnitude-threshold", echo_combination="rss").run(
        cwd=str(tmp_path)
    )
    brain = nib.load(res.outputs.out_brain).get_fdata()
    rss = np.sqrt((sim.magnitude.astype(np.float64) ** 2).sum(axis=3))
    mask = nib.load(res.outputs.out_mask).get_fdata() > 0.5
    np.testing.assert_allclose(brain[mask], rss[mask], rtol=1e-5)
    assert _dice_file(res.outputs.out_mask, sim.mask) > 0.9


def test_two_pass_combine_interface_keeps_masks_nested(tmp_path):
    from qsmflow.interfaces import TwoPassCombine

    affine = np.eye(4)
    a = np.full((6, 6, 6), 1.0, np.float32)
    b = np.full((6, 6, 6), 2.0, np.float32)
    filled = np.zeros((6, 6, 6), np.uint8)
    filled[1:5, 1:5, 1:5] = 1
    reliable = np.zeros((6, 6, 6), np.uint8)
    reliable[2:6, 2:6, 2:6] = 1  # sticks out of the filled mask
    paths = []
    for name, arr in (("a", a), ("b", b), ("f", filled), ("r", reliable)):
        paths.append(str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(arr, affine), paths[-1])
    out = nib.load(
        TwoPassCombine(
            in_chi_filled=paths[0],
            in_chi_reliable=paths[1],
            in_filled_mask=paths[2],
            in_reliable_mask=paths[3],
        )
        .run(cwd=str(tmp_path))
        .outputs.out_chi
    ).get_fdata()
    assert out[5, 5, 5] == 0 and out[3, 3, 3] == 2.0 and out[1, 1, 1] == 1.0


# ------------------------------------------------------------------- receive-field shading
def _shading(mask, vox):
    """Receive-field shading bright at the periphery: 0.55 at the centre to ~1.5 at the edge."""
    idx = np.indices(mask.shape).astype(np.float32)
    centre = [ix[mask].mean() for ix in idx]
    r = np.sqrt(sum(((idx[i] - centre[i]) * vox[i] / 70.0) ** 2 for i in range(3)))
    return (0.55 + 0.6 * np.clip(r, 0, 1.3) ** 2).astype(np.float32)


def test_local_mean_recovers_a_smooth_field():
    vox = (2.0, 2.0, 2.0)
    r = _distance((48, 48, 48), vox, (47.0, 48.0, 46.0))
    tissue = r < 40
    field = _shading(tissue, vox)
    level = local_mean(field * 3.0, tissue, vox, sigma_mm=12.0)
    inner = r < 30
    # smoothing lifts the minimum of the curved field a little (~9 % at sigma 12 mm) ...
    np.testing.assert_allclose(level[inner], 3.0 * field[inner], rtol=0.12)
    # ... far less than a constant level would be off
    constant = 3.0 * field[tissue].mean()
    assert np.max(np.abs(constant / (3.0 * field[inner]) - 1)) > 0.2


def test_masks_are_robust_to_receive_field_shading(sim_2mm, quality):
    vox = (2.0, 2.0, 2.0)
    truth = sim_2mm.mask
    shaded = sim_2mm.magnitude[..., 0] * _shading(truth, vox)

    def dice(m):
        return 2 * np.count_nonzero(m & truth) / (m.sum() + truth.sum())

    # the shading is strong enough to defeat a global threshold ...
    assert dice(threshold_mask(shaded, method="otsu-foreground", voxel_size_mm=vox)) < 0.9
    # ... but not the local tissue level (measured 0.99 each)
    assert dice(magnitude_tissue_mask(shaded, vox)) > 0.97
    assert dice(phase_quality_mask(quality, vox, magnitude=shaded)) > 0.97
    intracranial = ndimage.binary_dilation(truth, iterations=2)  # brain + 4 mm of CSF
    assert dice(remove_outer_csf(shaded, intracranial, vox)) > 0.97


def test_brain_mask_rejects_phase_given_as_magnitude(interface_data, tmp_path):
    from qsmflow.interfaces import BrainMask

    with pytest.raises(ValueError, match="is it a phase image"):
        BrainMask(in_file=interface_data["phase"], method="magnitude-threshold").run(
            cwd=str(tmp_path)
        )
