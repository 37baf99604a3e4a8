"""Background field removal: from the total field to the local field of the brain's sources.

Every method takes the total field (ppm), the brain mask and the voxel size (plus the B0
direction where the physics needs it) and returns ``(local_field_ppm, valid_mask)``, the mask
being the region where the local field is valid (eroded where the method implies it).

Modules: :mod:`.smv` (spherical-mean-value methods: SHARP, V-SHARP, RESHARP, iSMV),
:mod:`.pdf` (projection onto dipole fields), :mod:`.lbv` (Laplacian boundary value).
"""

from .lbv import lbv, lbv_interior
from .pdf import noise_weights, pdf
from .smv import default_radii_mm, erode_edge, ismv, resharp, sharp, smv_kernel, vsharp

__all__ = [
    "default_radii_mm",
    "erode_edge",
    "ismv",
    "lbv",
    "lbv_interior",
    "noise_weights",
    "pdf",
    "resharp",
    "sharp",
    "smv_kernel",
    "vsharp",
]
