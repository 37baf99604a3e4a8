"""Multi-echo processing: field fit over TE, phase offsets, coil combination, R2*."""

from .fit import FieldFit, fit_field

__all__ = ["FieldFit", "fit_field"]
