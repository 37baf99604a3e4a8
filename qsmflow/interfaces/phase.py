"""Phase interfaces: unwrapping and multi-echo field estimation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..algorithms import unwrap
from ..algorithms.echoes import aspire, fit_field, mcpc3ds, r2star_loglinear
from ..io.nifti import load_echoes, load_nifti, save_nifti, voxel_sizes
from ._common import ThreadedInputSpec, first_file, output_path


def _check_echo_times(echo_times, n_echo: int) -> list[float]:
    tes = [float(t) for t in echo_times]
    if len(tes) != n_echo:
        raise ValueError(f"echo_times has {len(tes)} values for {n_echo} echoes")
    if any(t <= 0 for t in tes) or any(b <= a for a, b in zip(tes, tes[1:], strict=False)):
        raise ValueError(f"echo_times must be positive and increasing (seconds), got {tes}")
    if max(tes) > 1.0:
        raise ValueError(f"echo_times look like milliseconds ({tes}); give them in seconds")
    return tes


class _PhaseUnwrapInputSpec(ThreadedInputSpec):
    in_phase = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="wrapped phase in radians: one 3-D/4-D NIfTI or one 3-D NIfTI per echo",
    )
    in_magnitude = InputMultiObject(
        File(exists=True), desc="magnitude images matching in_phase (region growing weights)"
    )
    echo_times = traits.List(traits.Float, desc="echo times in seconds (multi-echo input)")
    method = traits.Enum(
        "laplacian",
        "region-growing",
        usedefault=True,
        desc="spatial unwrapper: Laplacian (smooth, not congruent) or region growing (exact 2 pi)",
    )
    mode = traits.Enum(
        "template",
        "individual",
        usedefault=True,
        desc="multi-echo: unwrap one echo spatially and the rest over TE, or each echo spatially",
    )
    in_mask = File(exists=True, desc="optional mask (region growing unwraps inside it)")


class _PhaseUnwrapOutputSpec(TraitedSpec):
    out_unwrapped = File(exists=True, desc="unwrapped phase in radians (same shape as in_phase)")


class PhaseUnwrap(SimpleInterface):
    """Unwrap single- or multi-echo phase (radians).

    ``laplacian``: Schofield & Zhu 2003 (multi-echo template mode: first echo plus
    Laplacian-unwrapped consecutive echo differences). ``region-growing``: quality-guided
    unwrapping (ROMEO-like, Dymerska et al. 2021), exact multiples of 2 pi; multi-echo data are
    unwrapped from a template echo over TE (``mode="template"``) or echo by echo.
    """

    input_spec = _PhaseUnwrapInputSpec
    output_spec = _PhaseUnwrapOutputSpec

    def _run_interface(self, runtime):
        phase, ref = load_echoes(self.inputs.in_phase, what="phase")
        vox = voxel_sizes(ref.affine)
        n_echo = phase.shape[3]
        tes = None
        if n_echo > 1:
            if not isdefined(self.inputs.echo_times):
                raise ValueError("echo_times (seconds) are needed for multi-echo in_phase")
            tes = _check_echo_times(self.inputs.echo_times, n_echo)
        mag = None
        if isdefined(self.inputs.in_magnitude):
            mag, _ = load_echoes(self.inputs.in_magnitude, what="magnitude")
            if mag.shape != phase.shape:
                raise ValueError(
                    f"in_magnitude shape {mag.shape} differs from in_phase {phase.shape}"
                )
        mask = (
            load_nifti(self.inputs.in_mask, dtype=bool)[0]
            if isdefined(self.inputs.in_mask)
            else None
        )
        n = self.inputs.num_threads
        if n_echo == 1:
            if self.inputs.method == "laplacian":
                out = unwrap.laplacian_unwrap(phase[..., 0], vox, n_threads=n)
            else:
                out = unwrap.region_growing_unwrap(
                    phase[..., 0], vox, magnitude=None if mag is None else mag[..., 0], mask=mask
                )
            out = out[..., None]
        else:
            out = unwrap.unwrap_multi_echo(
                phase,
                vox,
                tes,
                magnitude=mag,
                mask=mask,
                method=self.inputs.method,
                mode=self.inputs.mode,
                n_threads=n,
            )
        path = output_path(runtime.cwd, first_file(self.inputs.in_phase), "unwrapped")
        save_nifti(out[..., 0] if n_echo == 1 else out, ref.affine, path, header=ref.header)
        self._results["out_unwrapped"] = path
        return runtime


class _EchoCombinationInputSpec(ThreadedInputSpec):
    in_phase = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="UNWRAPPED phase in radians: one 4-D NIfTI or one 3-D NIfTI per echo",
    )
    in_magnitude = InputMultiObject(
        File(exists=True), mandatory=True, desc="magnitude images matching in_phase"
    )
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times in seconds")
    b0_tesla = traits.Float(mandatory=True, desc="main field strength in Tesla")
    in_mask = File(exists=True, desc="optional mask; outputs are zero outside it")
    weighting = traits.Enum(
        "mag2", "mag2te2", "none", usedefault=True, desc="least-squares weights of the TE fit"
    )


class _EchoCombinationOutputSpec(TraitedSpec):
    out_field = File(exists=True, desc="total field in Hz (BIDS _fieldmap)")
    out_field_ppm = File(exists=True, desc="total field in ppm of B0")
    out_phase_offset = File(exists=True, desc="echo-independent phase offset in radians")
    out_residual = File(exists=True, desc="weighted RMS fit residual in radians (reliability)")
    out_field_sd = File(exists=True, desc="predicted noise SD of the field in ppm (reliability)")
    out_r2star = File(exists=True, desc="R2* in Hz (1/s) from the magnitudes (log-linear fit)")


class EchoCombination(SimpleInterface):
    """Total field from multi-echo unwrapped phase by a weighted linear fit over TE.

    ``phase(TE) = phase0 + 2 pi gamma_bar B0 TE field_ppm 1e-6``; outputs the field in Hz and
    ppm, the phase offset, the fit residual and an R2* map from the magnitudes.
    """

    input_spec = _EchoCombinationInputSpec
    output_spec = _EchoCombinationOutputSpec

    def _run_interface(self, runtime):
        phase, ref = load_echoes(self.inputs.in_phase, what="phase")
        mag, _ = load_echoes(self.inputs.in_magnitude, what="magnitude")
        if mag.shape != phase.shape:
            raise ValueError(f"in_magnitude shape {mag.shape} differs from in_phase {phase.shape}")
        tes = _check_echo_times(self.inputs.echo_times, phase.shape[3])
        if phase.shape[3] < 2:
            raise ValueError("EchoCombination needs at least two echoes")
        mask = (
            load_nifti(self.inputs.in_mask, dtype=bool)[0]
            if isdefined(self.inputs.in_mask)
            else None
        )
        fit = fit_field(
            phase,
            mag,
            tes,
            b0_tesla=self.inputs.b0_tesla,
            mask=mask,
            weighting=self.inputs.weighting,
        )
        r2s = r2star_loglinear(mag, tes, mask=mask)
        src = first_file(self.inputs.in_phase)
        outs = {
            "out_field": (fit.field_hz, "fieldmap"),
            "out_field_ppm": (fit.field_ppm, "fieldppm"),
            "out_phase_offset": (fit.phase_offset_rad, "phaseoffset"),
            "out_residual": (fit.residual_rad, "residual"),
            "out_field_sd": (fit.field_sd_ppm, "fieldsd"),
            "out_r2star": (r2s, "R2starmap"),
        }
        for key, (data, suffix) in outs.items():
            path = output_path(runtime.cwd, src, suffix)
            save_nifti(data, ref.affine, path, header=ref.header)
            self._results[key] = path
        return runtime


__all__ = ["CoilCombination", "EchoCombination", "PhaseUnwrap"]


class _CoilCombinationInputSpec(ThreadedInputSpec):
    in_phase = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="uncombined phase in radians, one 4-D NIfTI per echo (receive coils along axis 4)",
    )
    in_magnitude = InputMultiObject(
        File(exists=True), mandatory=True, desc="uncombined magnitudes matching in_phase"
    )
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times in seconds")
    method = traits.Enum(
        "mcpc3ds",
        "aspire",
        usedefault=True,
        desc="MCPC-3D-S (any TEs) or ASPIRE (TE2 = 2 TE1); Eckstein et al. 2018",
    )
    sigma_mm = traits.Float(4.0, usedefault=True, desc="smoothing of the coil phase offsets, mm")
    in_mask = File(exists=True, desc="optional mask for the offset smoothing weights")
    write_stacks = traits.Bool(
        True,
        usedefault=True,
        desc="also write the 4-D out_phase, out_magnitude and out_phase_offsets (False: only the "
        "per-echo files, a third of the writing)",
    )


class _CoilCombinationOutputSpec(TraitedSpec):
    out_phase = File(exists=True, desc="combined phase in radians, 4-D (echoes)")
    out_magnitude = File(exists=True, desc="combined (root-sum-of-squares) magnitude, 4-D")
    out_phase_echoes = traits.List(
        File(exists=True), desc="combined phase in radians, one 3-D NIfTI per echo"
    )
    out_magnitude_echoes = traits.List(
        File(exists=True), desc="combined (root-sum-of-squares) magnitude, one 3-D NIfTI per echo"
    )
    out_phase_offsets = File(exists=True, desc="per-coil phase offsets in radians, 4-D (coils)")


def _load_coil_echoes(phase_files, mag_files) -> tuple[np.ndarray, np.ndarray, object]:
    """Stack per-echo coil files into float32 (x, y, z, echo, coil) magnitude and phase.

    The 5-D arrays are allocated once and filled file by file, so the peak is the two arrays
    plus one file being read.
    """
    if len(phase_files) != len(mag_files):
        raise ValueError(
            f"in_phase has {len(phase_files)} file(s) but in_magnitude {len(mag_files)}; give "
            "one uncombined magnitude file per phase echo"
        )
    mag = phase = ref = None
    for e, (p_file, m_file) in enumerate(zip(phase_files, mag_files, strict=True)):
        for kind, path in (("phase", p_file), ("magnitude", m_file)):
            data, img = load_echoes(path, what=kind)  # (x, y, z, coil)
            if ref is None:
                ref, shape = img, data.shape
                phase = np.empty(shape[:3] + (len(phase_files), shape[3]), dtype=np.float32)
                mag = np.empty_like(phase)
            elif data.shape != shape:
                raise ValueError(
                    f"{path}: shape {data.shape} (x, y, z, coil) differs from {phase_files[0]} "
                    f"{shape}; every echo and part needs the same grid and number of coils"
                )
            elif not np.allclose(img.affine, ref.affine, atol=1e-4):
                raise ValueError(f"{path}: affine differs from {phase_files[0]}; one grid needed")
            (phase if kind == "phase" else mag)[:, :, :, e] = data
            del data
    return mag, phase, ref


class CoilCombination(SimpleInterface):
    """Combine uncombined receive channels with coil phase-offset removal (MCPC-3D-S/ASPIRE).

    Eckstein et al., Magn Reson Med 2018;79:2996-3006. Inputs: one 4-D file (x, y, z, coil) per
    echo and part. Outputs: the combined phase (rad) and root-sum-of-squares magnitude, both as
    4-D (echo) files and as one 3-D file per echo, and the removed per-coil phase offsets (rad).
    """

    input_spec = _CoilCombinationInputSpec
    output_spec = _CoilCombinationOutputSpec

    def _run_interface(self, runtime):
        phase_files, mag_files = list(self.inputs.in_phase), list(self.inputs.in_magnitude)
        tes = _check_echo_times(self.inputs.echo_times, len(phase_files))
        if len(tes) < 2:
            raise ValueError(
                "coil combination needs at least two echoes (the coil phase offsets come from "
                f"the first two), got {len(tes)}"
            )
        mag, phase, ref = _load_coil_echoes(phase_files, mag_files)
        mask = (
            load_nifti(self.inputs.in_mask, dtype=bool)[0]
            if isdefined(self.inputs.in_mask)
            else None
        )
        func = mcpc3ds if self.inputs.method == "mcpc3ds" else aspire
        res = func(
            mag,
            phase,
            tes,
            voxel_sizes(ref.affine),
            sigma_mm=self.inputs.sigma_mm,
            mask=mask,
            n_threads=self.inputs.num_threads,
        )
        del mag, phase
        src = first_file(phase_files)
        stacks = (
            ("out_phase", res.phase_rad, "combinedphase"),
            ("out_magnitude", res.magnitude, "combinedmag"),
            ("out_phase_offsets", res.phase_offsets_rad, "coiloffsets"),
        )
        for key, data, suffix in stacks if self.inputs.write_stacks else ():
            path = output_path(runtime.cwd, src, suffix)
            save_nifti(data, ref.affine, path, header=ref.header)
            self._results[key] = path
        for key, data, files in (
            ("out_phase_echoes", res.phase_rad, phase_files),
            ("out_magnitude_echoes", res.magnitude, mag_files),
        ):
            paths = []
            unique = len({Path(f).name for f in files}) == len(files)
            for e, source in enumerate(files):
                suffix = "coilcombined" if unique else f"coilcombined{e + 1}"
                path = output_path(runtime.cwd, source, suffix)
                save_nifti(data[..., e], ref.affine, path, header=ref.header)
                paths.append(path)
            self._results[key] = paths
        return runtime
