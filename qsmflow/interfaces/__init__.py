"""Nipype interfaces for every QSM step; each loads files, calls qsmflow.algorithms, saves."""

from .background import BackgroundRemoval
from .bids import DerivativesDataSink
from .dicom import ConvertDicom, Dcm2niixVolume, SortDicom
from .echo_average import AverageEchoes, EchoFields
from .inversion import DipoleInversion, ReferenceSusceptibility
from .masking import BrainMask, TwoPassCombine
from .multi_orientation import COSMOS, STI, RegisterOrientations
from .phase import CoilCombination, EchoCombination, PhaseUnwrap
from .reports import QCReport

__all__ = [
    "AverageEchoes",
    "BackgroundRemoval",
    "BrainMask",
    "COSMOS",
    "CoilCombination",
    "ConvertDicom",
    "Dcm2niixVolume",
    "DerivativesDataSink",
    "DipoleInversion",
    "EchoFields",
    "EchoCombination",
    "PhaseUnwrap",
    "QCReport",
    "ReferenceSusceptibility",
    "RegisterOrientations",
    "STI",
    "SortDicom",
    "TwoPassCombine",
]
