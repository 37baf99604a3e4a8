"""Multi-orientation QSM: rigid registration of head orientations, COSMOS and STI.

* :mod:`.registration` - rigid registration of each orientation's magnitude to the reference
  (normalised cross-correlation, multi-resolution Powell search), resampling of fields and masks
  and the B0 direction of every orientation in the reference voxel frame;
* :mod:`.cosmos` - Calculation Of Susceptibility through Multiple Orientation Sampling
  (Liu et al., Magn Reson Med 2009;61:196), closed-form k-space and masked CG solutions;
* :mod:`.sti` - Susceptibility Tensor Imaging (Liu, Magn Reson Med 2010;63:1471): the tensor
  forward model, LSQR tensor fit, chi33, mean susceptibility, eigen-decomposition, anisotropy.
"""

from .cosmos import cosmos, cosmos_cg, cosmos_closed_form
from .registration import (
    RegistrationResult,
    apply_transform,
    b0_direction_in_reference,
    fsl_matrix_to_world,
    register_rigid,
    resample_field,
    rigid_matrix,
)
from .sti import (
    TENSOR_COMPONENTS,
    STIResult,
    project_tensor,
    sti,
    tensor_eigen,
    tensor_forward_field,
    tensor_kernels,
)

__all__ = [
    "RegistrationResult",
    "STIResult",
    "TENSOR_COMPONENTS",
    "apply_transform",
    "b0_direction_in_reference",
    "cosmos",
    "cosmos_cg",
    "cosmos_closed_form",
    "fsl_matrix_to_world",
    "project_tensor",
    "register_rigid",
    "resample_field",
    "rigid_matrix",
    "sti",
    "tensor_eigen",
    "tensor_forward_field",
    "tensor_kernels",
]
