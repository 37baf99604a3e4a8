"""Brain-mask interface: the built-in BET or magnitude thresholding."""

from __future__ import annotations

from nipype.interfaces.base import File, InputMultiObject, SimpleInterface, TraitedSpec, traits

from ..algorithms import masking
from ..algorithms.bet import bet
from ..io.nifti import load_echoes, save_nifti, voxel_sizes
from ._common import ThreadedInputSpec, first_file, output_path


class _BrainMaskInputSpec(ThreadedInputSpec):
    in_magnitude = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="magnitude image(s); the first echo (or 3-D image) is used",
    )
    method = traits.Enum(
        "bet",
        "threshold",
        usedefault=True,
        desc="built-in BET (Smith 2002) or Otsu threshold + hole filling",
    )
    frac = traits.Range(
        0.0, 1.0, 0.5, usedefault=True, desc="BET fractional intensity threshold (FSL -f)"
    )
    vertical_gradient = traits.Range(
        -1.0, 1.0, 0.0, usedefault=True, desc="BET vertical gradient in f (FSL -g)"
    )
    erode_mm = traits.Float(0.0, usedefault=True, desc="erode the mask by this radius (mm)")


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8 NIfTI)")


class BrainMask(SimpleInterface):
    """Brain mask from a magnitude image (built-in BET or thresholding)."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        mag, ref = load_echoes(self.inputs.in_magnitude, what="magnitude")
        vox = voxel_sizes(ref.affine)
        first = mag[..., 0]
        if self.inputs.method == "bet":
            mask = bet(
                first, vox, frac=self.inputs.frac, vertical_gradient=self.inputs.vertical_gradient
            )
            if self.inputs.erode_mm > 0:
                mask = masking.erode_mm(mask, self.inputs.erode_mm, vox)
        else:
            mask = masking.threshold_mask(
                first, method="otsu", voxel_size_mm=vox, erode_mm=self.inputs.erode_mm
            )
        self._results["out_mask"] = output_path(
            runtime.cwd, first_file(self.inputs.in_magnitude), "mask"
        )
        save_nifti(mask, ref.affine, self._results["out_mask"])
        return runtime
