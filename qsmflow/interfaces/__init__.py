"""Nipype interfaces for every QSM step; each loads files, calls qsmflow.algorithms, saves."""

from .background import BackgroundRemoval
from .inversion import DipoleInversion, ReferenceSusceptibility
from .masking import BrainMask
from .phase import EchoCombination, PhaseUnwrap

__all__ = [
    "BackgroundRemoval",
    "BrainMask",
    "DipoleInversion",
    "EchoCombination",
    "PhaseUnwrap",
    "ReferenceSusceptibility",
]
