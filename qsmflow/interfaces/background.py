"""Background field removal interface."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec, isdefined, traits

from .. import GAMMA_BAR_MHZ_PER_T
from ..algorithms import background
from ..io.nifti import load_nifti, save_nifti, voxel_sizes
from ._common import (
    ThreadedInputSpec,
    b0_direction,
    field_to_ppm,
    load_field_and_mask,
    output_path,
)

#: method -> (function name in qsmflow.algorithms.background, needs B0 direction,
#:            interface option -> function keyword)
METHODS: dict[str, tuple[str, bool, dict[str, str]]] = {
    "sharp": ("sharp", False, {"radius_mm": "radius_mm", "threshold": "threshold"}),
    "vsharp": ("vsharp", False, {"radii_mm": "radii_mm", "threshold": "threshold"}),
    "resharp": ("resharp", False, {"radius_mm": "radius_mm", "regularization": "lambda_"}),
    "ismv": ("ismv", False, {"radius_mm": "radius_mm", "tol": "tol", "max_iter": "max_iter"}),
    "pdf": ("pdf", True, {"tol": "tol", "max_iter": "max_iter", "erode_mm": "erode_mm"}),
    "lbv": ("lbv", False, {"tol": "tol", "max_iter": "max_cycles", "erode_mm": "erode_mm"}),
}


class _BackgroundRemovalInputSpec(ThreadedInputSpec):
    in_field = File(exists=True, mandatory=True, desc="total field map (NIfTI), ppm or Hz")
    field_units = traits.Enum("ppm", "Hz", usedefault=True, desc="units of in_field")
    b0_tesla = traits.Float(
        desc="main field strength in Tesla (needed when field_units='Hz'; adds out_field_hz)"
    )
    in_mask = File(exists=True, mandatory=True, desc="brain mask (NIfTI)")
    in_field_sd = File(
        exists=True,
        desc="noise standard deviation of in_field (NIfTI, any unit, e.g. EchoCombination's "
        "out_field_sd); pdf weights its fit by 1/sd as Liu et al. 2011 (other methods: unused)",
    )
    method = traits.Enum(
        "vsharp",
        *(m for m in METHODS if m != "vsharp"),
        usedefault=True,
        desc="background removal method (default vsharp)",
    )
    b0_direction = traits.Tuple(
        traits.Float,
        traits.Float,
        traits.Float,
        desc="B0 direction in voxel coordinates (default: from the affine)",
    )
    radius_mm = traits.Float(desc="SMV sphere radius in mm (sharp, resharp, ismv)")
    radii_mm = traits.List(traits.Float, desc="SMV sphere radii in mm, large to small (vsharp)")
    threshold = traits.Float(desc="TSVD truncation of the SMV deconvolution (sharp, vsharp)")
    regularization = traits.Float(desc="Tikhonov weight lambda (resharp)")
    tol = traits.Float(desc="relative convergence tolerance (ismv, pdf, lbv)")
    max_iter = traits.Int(desc="maximum iterations (ismv, pdf) or multigrid cycles (lbv)")
    erode_mm = traits.Float(
        desc="depth in mm of the mask's edge left out of out_mask (pdf, lbv; default 4 mm; "
        "lbv imposes its boundary values at that depth)"
    )


class _BackgroundRemovalOutputSpec(TraitedSpec):
    out_field = File(exists=True, desc="local field in ppm")
    out_field_hz = File(desc="local field in Hz (BIDS _fieldmap); written when b0_tesla is set")
    out_mask = File(exists=True, desc="mask where the local field is valid (eroded as implied)")


class BackgroundRemoval(SimpleInterface):
    """Remove the background field: SHARP, V-SHARP, RESHARP, iSMV, PDF or LBV."""

    input_spec = _BackgroundRemovalInputSpec
    output_spec = _BackgroundRemovalOutputSpec

    def _run_interface(self, runtime):
        field, mask, img = load_field_and_mask(self.inputs.in_field, self.inputs.in_mask)
        mask_affine = nib.load(self.inputs.in_mask).affine
        if not np.allclose(mask_affine, img.affine, atol=1e-4):
            raise ValueError(
                f"{self.inputs.in_mask}: the mask's affine differs from that of the field "
                f"{self.inputs.in_field}; the mask must be on the field's voxel grid "
                "(resample it, or make it from an image of the same acquisition)"
            )
        field = field_to_ppm(field, self.inputs.field_units, self.inputs.b0_tesla)
        func_name, needs_b0, options = METHODS[self.inputs.method]
        kwargs = {
            kw: getattr(self.inputs, name)
            for name, kw in options.items()
            if isdefined(getattr(self.inputs, name))
        }
        func = getattr(background, func_name)
        args = [field, mask, voxel_sizes(img.affine)]
        if needs_b0:
            args.append(b0_direction(self.inputs, img.affine))
        if self.inputs.method == "pdf" and isdefined(self.inputs.in_field_sd):
            try:
                sd = load_nifti(self.inputs.in_field_sd)[0]
                kwargs["weights"] = background.noise_weights(sd, mask)
            except ValueError as err:
                raise ValueError(f"{self.inputs.in_field_sd}: {err}") from err
        try:
            local, valid = func(*args, n_threads=self.inputs.num_threads, **kwargs)
        except ValueError as err:
            # the algorithms name the array and parameter; say which files they came from
            raise ValueError(
                f"{self.inputs.method} background removal of {self.inputs.in_field} with mask "
                f"{self.inputs.in_mask}: {err}"
            ) from err
        self._results["out_field"] = output_path(runtime.cwd, self.inputs.in_field, "local")
        self._results["out_mask"] = output_path(runtime.cwd, self.inputs.in_field, "localmask")
        save_nifti(local, img.affine, self._results["out_field"], header=img.header)
        save_nifti(valid, img.affine, self._results["out_mask"])
        if isdefined(self.inputs.b0_tesla):
            self._results["out_field_hz"] = output_path(
                runtime.cwd, self.inputs.in_field, "localHz"
            )
            hz = local * np.float32(GAMMA_BAR_MHZ_PER_T * self.inputs.b0_tesla)
            save_nifti(hz, img.affine, self._results["out_field_hz"], header=img.header)
        return runtime
