"""Multi-echo processing: field fit over TE, phase offsets, coil combination, bipolar
correction, vendor phase scaling, R2*."""

from .bipolar import BipolarCorrection, bipolar_correction
from .coils import CoilCombination, aspire, mcpc3ds
from .fit import FieldFit, fit_field, fit_field_complex
from .per_echo import average_echo_maps, echo_fields_ppm
from .phase_scaling import PHASE_ENCODINGS, detect_phase_encoding, flip_polarity, phase_to_radians
from .relaxation import R2STAR_RANGE_HZ, r2star_arlo, r2star_loglinear

__all__ = [
    "PHASE_ENCODINGS",
    "R2STAR_RANGE_HZ",
    "BipolarCorrection",
    "CoilCombination",
    "FieldFit",
    "aspire",
    "average_echo_maps",
    "bipolar_correction",
    "detect_phase_encoding",
    "echo_fields_ppm",
    "fit_field",
    "fit_field_complex",
    "flip_polarity",
    "mcpc3ds",
    "phase_to_radians",
    "r2star_arlo",
    "r2star_loglinear",
]
