"""Tests for qsmflow.algorithms.echoes.phase_scaling (vendor phase encodings and polarity).

Known answers: phase in radians encoded the way each vendor stores it (integers rounded as a
scanner would) is detected and converted back to the same angle within the encoding's
quantisation step; ranges that fit no encoding, or fit one only partly, are rejected.
"""

from __future__ import annotations

import numpy as np
import pytest

from qsmflow.algorithms.echoes.phase_scaling import (
    PHASE_ENCODINGS,
    detect_phase_encoding,
    flip_polarity,
    phase_to_radians,
)


def angle_error(a, b):
    return np.abs(np.angle(np.exp(1j * (np.asarray(a, np.float64) - b))))


@pytest.fixture(scope="module")
def radians():
    """Wrapped phase covering [-pi, pi) (noise-like, as outside the head), plus the ends."""
    rng = np.random.default_rng(0)
    values = rng.uniform(-np.pi, np.pi, size=(12, 10, 8))
    values.flat[:2] = (-np.pi, np.pi - 1e-3)
    return values


def encode(rad, name):
    """The stored values of phase ``rad`` in encoding ``name`` (integers where vendors use them)."""
    if name == "radians":
        return rad.astype(np.float32)
    if name == "0..2pi":
        return np.mod(rad, 2 * np.pi).astype(np.float32)
    if name == "degrees":
        return np.degrees(rad).astype(np.float32)
    if name == "milliradians":
        return np.round(rad * 1000).astype(np.int16)
    if name == "0..4095":
        return np.clip(np.round(rad / np.pi * 2048 + 2048), 0, 4095).astype(np.uint16)
    if name == "-4096..4095":
        return np.clip(np.round(rad / np.pi * 4096), -4096, 4095).astype(np.int16)
    raise AssertionError(name)


# quantisation step of each encoding in radians (float encodings: float32 rounding)
STEP = {
    "radians": 1e-6,
    "0..2pi": 1e-6,
    "degrees": 1e-6,
    "milliradians": 1e-3,
    "0..4095": np.pi / 2048,
    "-4096..4095": np.pi / 4096,
}


def test_every_encoding_is_tested():
    assert set(STEP) == set(PHASE_ENCODINGS)


@pytest.mark.parametrize("name", list(STEP))
def test_round_trip_with_detection(radians, name):
    stored = encode(radians, name)
    assert detect_phase_encoding(stored) == name
    out = phase_to_radians(stored)
    assert out.dtype == np.float32 and out.shape == radians.shape
    assert out.min() >= -np.pi and out.max() < np.pi
    assert angle_error(out, radians).max() <= STEP[name] / 2 + 1e-5
    np.testing.assert_array_equal(phase_to_radians(stored, encoding=name), out)


def test_siemens_reference_values():
    np.testing.assert_allclose(
        phase_to_radians(np.array([0, 2048, 4095]), encoding="0..4095"),
        [-np.pi, 0, np.pi - np.pi / 2048],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        phase_to_radians(np.array([-4096, 0, 2048]), encoding="-4096..4095"),
        [-np.pi, 0, np.pi / 2],
        atol=1e-6,
    )


def test_result_is_below_pi_in_float32():
    out = phase_to_radians(np.array([np.pi - 1e-9, np.pi, -np.pi, 0.5]), encoding="radians")
    assert out.max() < np.float32(np.pi)
    np.testing.assert_allclose(out[[1, 2]], -np.pi, atol=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        np.linspace(0, 1, 50),  # a normalised magnitude image
        np.linspace(0, 65535, 50),  # 16-bit full range
        np.linspace(0, np.pi, 50),  # half of [-pi, pi] or of [0, 2 pi]: ambiguous
        np.linspace(-5000, 5000, 50),  # wider than any signed encoding
        np.full(50, 7.0),  # constant
        np.linspace(-1, 2000, 50),  # partly negative, small span
    ],
    ids=["unit", "uint16", "half-range", "too-wide", "constant", "odd-range"],
)
def test_auto_rejects_unknown_ranges(values):
    with pytest.raises(ValueError, match="matches no known encoding"):
        phase_to_radians(values)


def test_explicit_encoding_checks_range():
    with pytest.raises(ValueError, match="outside the 'radians' encoding"):
        phase_to_radians(np.array([0.0, 4095.0]), encoding="radians")
    with pytest.raises(ValueError, match="outside the '0..4095' encoding"):
        phase_to_radians(np.array([-3.0, 3.0]), encoding="0..4095")
    with pytest.raises(ValueError, match="unknown phase encoding"):
        phase_to_radians(np.zeros(3), encoding="grads")


def test_nan_kept_and_bad_values_rejected(radians):
    data = radians.copy()
    data[0, 0, 0] = np.nan
    out = phase_to_radians(data)
    assert np.isnan(out[0, 0, 0]) and np.isfinite(out).sum() == out.size - 1
    data[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        phase_to_radians(data)
    with pytest.raises(ValueError, match="no finite values"):
        phase_to_radians(np.full(4, np.nan))
    with pytest.raises(ValueError, match="real"):
        phase_to_radians(np.exp(1j * radians))


def test_flip_polarity(radians):
    flipped = flip_polarity(radians)
    assert flipped.dtype == np.float32
    assert flipped.min() >= -np.pi and flipped.max() < np.pi
    assert angle_error(flipped, -radians).max() < 1e-6
    assert angle_error(flip_polarity(flipped), radians).max() < 1e-6
    # the field a phase implies changes sign: exp(i * flipped) is the complex conjugate
    np.testing.assert_allclose(np.exp(1j * flipped), np.conj(np.exp(1j * radians)), atol=1e-6)
    with pytest.raises(ValueError, match="real"):
        flip_polarity(np.exp(1j * radians))
