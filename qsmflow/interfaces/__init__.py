"""Nipype interfaces for every QSM step; each loads files, calls qsmflow.algorithms, saves."""

from .background import BackgroundRemoval
from .bids import DerivativesDataSink
from .inversion import DipoleInversion, ReferenceSusceptibility
from .masking import BrainMask
from .phase import CoilCombination, EchoCombination, PhaseUnwrap
from .reports import QCReport

__all__ = [
    "BackgroundRemoval",
    "BrainMask",
    "CoilCombination",
    "DerivativesDataSink",
    "DipoleInversion",
    "EchoCombination",
    "PhaseUnwrap",
    "QCReport",
    "ReferenceSusceptibility",
]
