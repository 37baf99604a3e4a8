"""Vendor phase scaling and polarity.

Scanners store phase images as integers or scaled values rather than radians; qsmflow works in
radians in ``[-pi, pi)`` with the phase model of DESIGN.md section 2. This module converts the
known encodings (detected from the data range, or named) and flips the sign of phase for
scanners whose phase runs the other way: an explicit, documented step, never a silent one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["PHASE_ENCODINGS", "detect_phase_encoding", "flip_polarity", "phase_to_radians"]

_PI = np.float32(np.pi)
_TWO_PI = np.float32(2 * np.pi)


class _Encoding(NamedTuple):
    low: float
    high: float
    scale: float  # radians = (value - shift) * scale
    shift: float
    description: str


#: Known phase encodings: name -> (range, conversion, description).
PHASE_ENCODINGS: dict[str, _Encoding] = {
    "radians": _Encoding(-np.pi, np.pi, 1.0, 0.0, "radians in [-pi, pi]"),
    "0..2pi": _Encoding(0.0, 2 * np.pi, 1.0, 0.0, "radians in [0, 2 pi] (wrapped to [-pi, pi))"),
    "degrees": _Encoding(-180.0, 180.0, np.pi / 180, 0.0, "degrees in [-180, 180]"),
    "milliradians": _Encoding(
        -1000 * np.pi,
        1000 * np.pi,
        1e-3,
        0.0,
        "radians x 1000 in [-3142, 3142], as some GE and Philips exports store phase",
    ),
    "0..4095": _Encoding(
        0.0,
        4095.0,
        np.pi / 2048,
        2048.0,
        "12-bit unsigned (Siemens DICOM): 0 -> -pi, 2048 -> 0, 4095 -> pi - pi/2048",
    ),
    "-4096..4095": _Encoding(
        -4096.0,
        4095.0,
        np.pi / 4096,
        0.0,
        "Siemens phase after DICOM rescaling (slope 2, intercept -4096, as dcm2niix writes "
        "it): -4096 -> -pi, 0 -> 0",
    ),
}

# Values may exceed an encoding's range by this fraction of its width (float rounding).
_RANGE_TOL = 1e-4
# Auto-detection needs the data to fill at least this fraction of the encoding's range, as
# wrapped phase (with noise outside the head) does.
_MIN_COVERAGE = 0.75


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    if np.isinf(values).any():
        raise ValueError("phase contains infinite values")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("phase contains no finite values")
    return float(finite.min()), float(finite.max())


def _fits(enc: _Encoding, lo: float, hi: float) -> bool:
    tol = _RANGE_TOL * (enc.high - enc.low)
    return lo >= enc.low - tol and hi <= enc.high + tol


def detect_phase_encoding(data: np.ndarray) -> str:
    """Name of the encoding in :data:`PHASE_ENCODINGS` that the data's range matches.

    An encoding matches when every finite value lies within its range and the values span at
    least 75 % of it (wrapped phase covers nearly the whole range); the tightest match (the
    largest fraction covered) wins.

    Parameters
    ----------
    data : array
        Phase image(s) as stored by the scanner or converter.

    Returns
    -------
    str
        The encoding name.

    Raises
    ------
    ValueError
        When no encoding matches (the message gives the observed range), or when the data is
        complex, contains infinities or has no finite value.
    """
    arr = np.asarray(data)
    if np.iscomplexobj(arr):
        raise ValueError("phase must be real; take np.angle of complex data")
    lo, hi = _finite_range(arr)
    matches = []
    for name, enc in PHASE_ENCODINGS.items():
        coverage = (hi - lo) / (enc.high - enc.low)
        if _fits(enc, lo, hi) and coverage >= _MIN_COVERAGE:
            matches.append((coverage, name))
    if not matches:
        known = ", ".join(f"{n!r} ({e.description})" for n, e in PHASE_ENCODINGS.items())
        raise ValueError(
            f"phase values range from {lo:g} to {hi:g}, which matches no known encoding "
            f"(values within the range and spanning at least {_MIN_COVERAGE:.0%} of it): "
            f"{known}. Check that this is a phase image, or pass encoding= explicitly"
        )
    return max(matches)[1]


def _wrap(x: np.ndarray) -> np.ndarray:
    out = np.mod(x + _PI, _TWO_PI) - _PI
    out[out >= _PI] -= _TWO_PI  # float rounding can land exactly on +pi
    return out


def phase_to_radians(data: np.ndarray, *, encoding: str = "auto") -> np.ndarray:
    """Convert vendor-scaled phase to radians in ``[-pi, pi)``.

    Parameters
    ----------
    data : array
        Phase values as stored (any shape, real). NaN is kept as NaN.
    encoding : str
        ``"auto"`` (detect from the range, see :func:`detect_phase_encoding`) or a key of
        :data:`PHASE_ENCODINGS`: ``"radians"``, ``"0..2pi"``, ``"degrees"``,
        ``"milliradians"``, ``"0..4095"`` (Siemens 12-bit: ``(v - 2048) * pi / 2048``),
        ``"-4096..4095"`` (Siemens rescaled: ``v * pi / 4096``).

    Returns
    -------
    numpy.ndarray
        float32 phase in radians, in ``[-pi, pi)``.

    Raises
    ------
    ValueError
        Unknown encoding; values outside the named encoding's range; with ``"auto"``, a range
        that matches no encoding.

    Examples
    --------
    >>> phase_to_radians(np.array([0, 2048, 4095]), encoding="0..4095").round(4)
    array([-3.1416,  0.    ,  3.1401], dtype=float32)
    """
    arr = np.asarray(data)
    if np.iscomplexobj(arr):
        raise ValueError("phase must be real; take np.angle of complex data")
    if encoding == "auto":
        encoding = detect_phase_encoding(arr)
    if encoding not in PHASE_ENCODINGS:
        raise ValueError(
            f"unknown phase encoding {encoding!r}; use 'auto' or one of {list(PHASE_ENCODINGS)}"
        )
    enc = PHASE_ENCODINGS[encoding]
    lo, hi = _finite_range(arr)
    if not _fits(enc, lo, hi):
        raise ValueError(
            f"phase values range from {lo:g} to {hi:g}, outside the {encoding!r} encoding "
            f"({enc.description})"
        )
    # scale in float64, then wrap in float32 so that the result is < pi in float32 too
    rad = ((arr.astype(np.float64) - enc.shift) * enc.scale).astype(np.float32)
    return _wrap(rad)


def flip_polarity(phase_rad: np.ndarray) -> np.ndarray:
    """Negate phase (radians) for scanners whose phase runs opposite to qsmflow's convention.

    qsmflow's model is ``phase(TE) = phase0 + 2 pi gamma_bar B0 TE field`` (DESIGN.md section
    2): with the opposite sign, a paramagnetic source would come out diamagnetic. This is the
    one place that flips it; call it only where the data's convention is known to differ.

    Parameters
    ----------
    phase_rad : array
        Phase in radians (any shape).

    Returns
    -------
    numpy.ndarray
        float32 ``-phase`` wrapped to ``[-pi, pi)``.
    """
    arr = np.asarray(phase_rad)
    if np.iscomplexobj(arr):
        raise ValueError("phase must be real; for complex data use np.conj")
    return _wrap(-arr.astype(np.float32))
