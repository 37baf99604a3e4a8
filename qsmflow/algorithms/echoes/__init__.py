"""Multi-echo processing: field fit over TE, phase offsets, coil combination, R2*."""

from .fit import FieldFit, fit_field, fit_field_complex
from .relaxation import R2STAR_RANGE_HZ, r2star_arlo, r2star_loglinear

__all__ = [
    "FieldFit",
    "R2STAR_RANGE_HZ",
    "fit_field",
    "fit_field_complex",
    "r2star_arlo",
    "r2star_loglinear",
]
