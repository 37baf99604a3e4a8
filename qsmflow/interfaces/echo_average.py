"""Interfaces of the echo-average route: per-echo field maps and the mean of echo-wise maps."""

from __future__ import annotations

from nipype.interfaces.base import (
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..algorithms.echoes import average_echo_maps, echo_fields_ppm
from ..io.nifti import load_echoes, load_nifti, save_nifti
from ._common import ThreadedInputSpec, first_file, output_path


class _EchoFieldsInputSpec(ThreadedInputSpec):
    in_phase = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="unwrapped phase in radians: one 4-D NIfTI or one 3-D NIfTI per echo",
    )
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times in seconds")
    b0_tesla = traits.Float(mandatory=True, desc="main field strength in Tesla")
    in_phase_offset = File(
        exists=True, desc="echo-independent phase offset in radians, removed before dividing by TE"
    )


class _EchoFieldsOutputSpec(TraitedSpec):
    out_fields = OutputMultiObject(File(exists=True), desc="one field map per echo, in ppm")


class EchoFields(SimpleInterface):
    """Each echo's field in ppm: ``(phase_e - phase0) / (2 pi gamma_bar B0 TE_e)``."""

    input_spec = _EchoFieldsInputSpec
    output_spec = _EchoFieldsOutputSpec

    def _run_interface(self, runtime):
        phase, ref = load_echoes(self.inputs.in_phase, what="unwrapped phase")
        offset = None
        if isdefined(self.inputs.in_phase_offset):
            offset = load_nifti(self.inputs.in_phase_offset)[0]
        fields = echo_fields_ppm(
            phase, self.inputs.echo_times, self.inputs.b0_tesla, phase_offset_rad=offset
        )
        src = first_file(self.inputs.in_phase)
        paths = []
        for i in range(fields.shape[3]):
            path = output_path(runtime.cwd, src, f"echo{i + 1}fieldppm")
            save_nifti(fields[..., i], ref.affine, path, header=ref.header)
            paths.append(path)
        self._results["out_fields"] = paths
        return runtime


class _AverageEchoesInputSpec(ThreadedInputSpec):
    in_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="echo-wise 3-D maps on one grid (e.g. chi, ppm)"
    )
    in_masks = InputMultiObject(
        File(exists=True), desc="where each map is valid; the mean is kept on their intersection"
    )
    weights = traits.List(traits.Float, desc="non-negative weight per echo (default equal)")


class _AverageEchoesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="weighted mean of the maps (same unit as the inputs)")
    out_mask = File(exists=True, desc="intersection of in_masks (all voxels without masks)")


class AverageEchoes(SimpleInterface):
    """Weighted mean of echo-wise maps, zero outside the voxels valid in every echo."""

    input_spec = _AverageEchoesInputSpec
    output_spec = _AverageEchoesOutputSpec

    def _run_interface(self, runtime):
        maps, imgs = zip(*(load_nifti(f) for f in self.inputs.in_files), strict=True)
        masks = None
        if isdefined(self.inputs.in_masks):
            masks = [load_nifti(f, dtype=bool)[0] for f in self.inputs.in_masks]
        weights = self.inputs.weights if isdefined(self.inputs.weights) else None
        for path, m in zip(self.inputs.in_files, maps, strict=True):
            if m.ndim != 3:
                raise ValueError(f"{path}: expected a 3-D map, got shape {m.shape}")
        mean, valid = average_echo_maps(maps, masks, weights)
        src, ref = self.inputs.in_files[0], imgs[0]
        self._results["out_file"] = output_path(runtime.cwd, src, "echomean")
        self._results["out_mask"] = output_path(runtime.cwd, src, "echomeanmask")
        save_nifti(mean, ref.affine, self._results["out_file"], header=ref.header)
        save_nifti(valid.astype("uint8"), ref.affine, self._results["out_mask"], header=ref.header)
        return runtime


__all__ = ["AverageEchoes", "EchoFields"]
