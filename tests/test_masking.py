"""Threshold masks (Otsu, percentile, fixed), hole filling, largest component, mm morphology."""

import numpy as np
import pytest
from scipy import ndimage

from qsmflow.algorithms.masking import (
    dilate_mm,
    erode_mm,
    fill_holes,
    largest_component,
    otsu_threshold,
    threshold_mask,
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
