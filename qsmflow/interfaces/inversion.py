"""Dipole inversion and susceptibility referencing interfaces."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import File, SimpleInterface, TraitedSpec, isdefined, traits

from ..algorithms import inversion, reference
from ..io.nifti import load_nifti, save_nifti, voxel_sizes
from ._common import (
    ThreadedInputSpec,
    b0_direction,
    field_to_ppm,
    load_field_and_mask,
    output_path,
)

#: method -> (function in qsmflow.algorithms.inversion, interface option -> keyword)
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "tkd": ("tkd", {"threshold": "threshold"}),
    "tsvd": ("tsvd", {"threshold": "threshold"}),
    "tikhonov": ("tikhonov", {"regularization": "lambda_", "tikhonov_penalty": "regularization"}),
    "ilsqr": ("ilsqr", {}),
    "star": ("star_qsm", {}),
    "medi": ("medi", {"regularization": "lam", "b0_tesla": "b0_tesla"}),
    "ndi": ("ndi", {"b0_tesla": "b0_tesla", "support_constraint": "support"}),
    "tgv": ("tgv", {}),
    "tv": ("tv_admm", {"regularization": "lambda_", "b0_tesla": "b0_tesla"}),
    "rts": ("rts", {}),
    "dip": ("dip", {}),
    "modl": ("modl", {"dl_weights": "weights"}),
    "spinet": ("spinet", {"dl_weights": "weights"}),
}

#: methods that use the magnitude image (weights / edges) when in_magnitude is given
USES_MAGNITUDE = {"medi", "ndi", "tv", "dip"}


class _DipoleInversionInputSpec(ThreadedInputSpec):
    in_field = File(exists=True, mandatory=True, desc="local field map (NIfTI), ppm or Hz")
    field_units = traits.Enum("ppm", "Hz", usedefault=True, desc="units of in_field")
    b0_tesla = traits.Float(desc="main field strength in Tesla (needed when field_units='Hz')")
    in_mask = File(exists=True, mandatory=True, desc="mask where the local field is valid")
    in_magnitude = File(exists=True, desc="magnitude image for weighted methods (optional)")
    method = traits.Enum(*METHODS, usedefault=True, desc="dipole inversion method")
    b0_direction = traits.Tuple(
        traits.Float,
        traits.Float,
        traits.Float,
        desc="B0 direction in voxel coordinates (default: from the affine)",
    )
    threshold = traits.Float(desc="k-space threshold of the truncated inverse kernel (tkd, tsvd)")
    regularization = traits.Either(
        traits.Float,
        traits.Enum("lcurve", "inflection", "discrepancy"),
        desc="regularisation weight lambda, or an automatic rule (tikhonov)",
    )
    tikhonov_penalty = traits.Enum(
        "gradient", "identity", desc="Tikhonov penalty: gradient (mm^2 lambda) or identity"
    )
    support_constraint = traits.Bool(
        desc="ndi: keep the sources within 2 mm of the mask (default on; off runs the "
        "unconstrained descent, which loses the field's harmonic part)"
    )
    dl_weights = File(
        exists=True,
        desc="modl, spinet: trained weights (.pt from qsmflow-train); default the shipped ones",
    )


class _DipoleInversionOutputSpec(TraitedSpec):
    out_chi = File(exists=True, desc="susceptibility in ppm (BIDS _Chimap)")


class DipoleInversion(SimpleInterface):
    """Susceptibility (ppm) from the local field by dipole inversion."""

    input_spec = _DipoleInversionInputSpec
    output_spec = _DipoleInversionOutputSpec

    def _run_interface(self, runtime):
        field, mask, img = load_field_and_mask(self.inputs.in_field, self.inputs.in_mask)
        if not np.all(np.isfinite(field[mask])):
            raise ValueError(f"{self.inputs.in_field}: NaN or Inf inside the mask")
        field = field_to_ppm(field, self.inputs.field_units, self.inputs.b0_tesla)
        func_name, options = METHODS[self.inputs.method]
        kwargs = {
            kw: getattr(self.inputs, n)
            for n, kw in options.items()
            if isdefined(getattr(self.inputs, n))
        }
        if self.inputs.method in USES_MAGNITUDE and isdefined(self.inputs.in_magnitude):
            kwargs["magnitude"] = load_nifti(self.inputs.in_magnitude)[0]
        chi = getattr(inversion, func_name)(
            field,
            mask,
            voxel_sizes(img.affine),
            b0_direction(self.inputs, img.affine),
            n_threads=self.inputs.num_threads,
            **kwargs,
        )
        self._results["out_chi"] = output_path(runtime.cwd, self.inputs.in_field, "Chimap")
        save_nifti(chi, img.affine, self._results["out_chi"], header=img.header)
        return runtime


class _ReferenceInputSpec(ThreadedInputSpec):
    in_chi = File(exists=True, mandatory=True, desc="susceptibility map in ppm")
    in_mask = File(exists=True, mandatory=True, desc="brain mask; output is zero outside it")
    in_reference = File(
        exists=True, desc="reference region mask (e.g. CSF); default the brain mask"
    )


class _ReferenceOutputSpec(TraitedSpec):
    out_chi = File(exists=True, desc="referenced susceptibility in ppm")
    reference_ppm = traits.Float(
        desc="mean susceptibility of the reference region (subtracted), ppm"
    )


class ReferenceSusceptibility(SimpleInterface):
    """Subtract the mean susceptibility of a reference region (default: the whole mask)."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        chi, img = load_nifti(self.inputs.in_chi)
        mask = load_nifti(self.inputs.in_mask, dtype=bool)[0]
        region = (
            load_nifti(self.inputs.in_reference, dtype=bool)[0]
            if isdefined(self.inputs.in_reference)
            else None
        )
        sel = mask if region is None else region & mask
        if not sel.any():
            raise ValueError(
                f"{self.inputs.in_reference}: reference region is empty inside the mask"
            )
        self._results["reference_ppm"] = float(chi[sel].mean())
        out = reference.reference_to_mean(chi, mask, region=region)
        self._results["out_chi"] = output_path(runtime.cwd, self.inputs.in_chi, "referenced")
        save_nifti(out, img.affine, self._results["out_chi"], header=img.header)
        return runtime
