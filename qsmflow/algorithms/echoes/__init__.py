"""Multi-echo processing: field fit over TE, phase offsets, coil combination, bipolar
correction, vendor phase scaling, R2*."""

from .bipolar import BipolarCorrection, bipolar_correction
from .coils import CoilCombination, aspire, mcpc3ds
from .fit import FieldFit, fit_field, fit_field_complex
from .phase_scaling import PHASE_ENCODINGS, detect_phase_encoding, flip_polarity, phase_to_radians
from .relaxation import R2STAR_RANGE_HZ, r2star_arlo, r2star_loglinear

__all__ = [
    "PHASE_ENCODINGS",
    "R2STAR_RANGE_HZ",
    "BipolarCorrection",
    "CoilCombination",
    "FieldFit",
    "aspire",
    "bipolar_correction",
    "detect_phase_encoding",
    "fit_field",
    "fit_field_complex",
    "flip_polarity",
    "mcpc3ds",
    "phase_to_radians",
    "r2star_arlo",
    "r2star_loglinear",
]
