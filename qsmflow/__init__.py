"""qsmflow: Quantitative Susceptibility Mapping workflows for BIDS datasets."""

__version__ = "0.1.0"

#: Gyromagnetic ratio over 2*pi for 1H, in MHz/T (CODATA 2018).
GAMMA_BAR_MHZ_PER_T = 42.57747892
