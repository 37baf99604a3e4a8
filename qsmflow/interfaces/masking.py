"""Brain-mask interfaces: FSL BET or the built-in BET, phase-quality and magnitude-threshold
masks, and the two-pass combination of QSMxT (Stewart et al., MRM 2022)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from nipype import logging
from nipype.interfaces import fsl
from nipype.interfaces.base import (
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..algorithms import masking
from ..algorithms.bet import bet
from ..io.nifti import load_echoes, load_nifti, save_nifti, voxel_sizes, write_json
from ._common import ThreadedInputSpec, first_file, output_path

IFLOGGER = logging.getLogger("nipype.interface")

#: What ``BrainMask.method`` selects. "threshold" is the older magnitude threshold (Otsu, hole
#: filling, no closing), kept for existing pipelines; it is "magnitude-threshold" with
#: ``threshold_method="otsu"`` and ``close_mm=0``.
MASK_METHODS = ("bet", "fsl-bet", "phase-quality", "magnitude-threshold", "threshold")

_DESCRIPTIONS = {
    "fsl-bet": "FSL BET (Smith 2002) through nipype.interfaces.fsl.BET",
    "bet": "built-in BET (Smith 2002 surface model, qsmflow.algorithms.bet)",
    "phase-quality": "threshold of the ROMEO phase-quality map, closing and hole filling "
    "(QSMxT, Stewart et al. 2022)",
    "magnitude-threshold": "tissue/CSF split of the magnitude relative to the local tissue level "
    "(or a fixed, percentile or Otsu threshold), closing and hole filling",
}


def find_fsl_bet() -> str | None:
    """Path of FSL's ``bet`` (on ``PATH`` or in ``$FSLDIR/bin``), or None when FSL is absent."""
    found = shutil.which("bet")
    if found:
        return found
    fsldir = os.environ.get("FSLDIR")
    if fsldir:
        candidate = Path(fsldir) / "bin" / "bet"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def fsl_bet_interface(
    in_file: str,
    out_file: str,
    *,
    frac: float = 0.5,
    vertical_gradient: float = 0.0,
    radius_mm: float | None = None,
    center_vox: list[float] | None = None,
    robust: bool = False,
    bet_path: str | None = None,
) -> fsl.BET:
    """A configured ``nipype.interfaces.fsl.BET`` that writes ``out_file`` and its ``_mask``.

    FSL's option names: ``-f`` frac, ``-g`` vertical gradient, ``-r`` radius (mm, integer),
    ``-c`` centre (voxels, integers), ``-R`` robust centre estimation; ``-m`` makes the mask.
    When ``bet_path`` lies outside ``PATH`` (``$FSLDIR/bin``), its folder is put first on the
    command's ``PATH``.
    """
    iface = fsl.BET(output_type="NIFTI_GZ")
    iface.inputs.in_file = in_file
    iface.inputs.out_file = out_file
    iface.inputs.mask = True
    iface.inputs.frac = float(frac)
    if vertical_gradient:
        iface.inputs.vertical_gradient = float(vertical_gradient)
    if radius_mm is not None:
        iface.inputs.radius = int(round(radius_mm))
    if center_vox is not None:
        iface.inputs.center = [int(round(c)) for c in center_vox]
    if robust:
        iface.inputs.robust = True
    if bet_path and shutil.which("bet") != bet_path:
        folder = str(Path(bet_path).parent)
        iface.inputs.environ = {"PATH": folder + os.pathsep + os.environ.get("PATH", "")}
    return iface


class _BrainMaskInputSpec(ThreadedInputSpec):
    in_file = InputMultiObject(
        File(exists=True),
        mandatory=True,
        xor=["in_magnitude"],
        desc="magnitude: one 3-D NIfTI, one 4-D NIfTI of echoes, or one 3-D NIfTI per echo",
    )
    in_magnitude = InputMultiObject(
        File(exists=True),
        mandatory=True,
        xor=["in_file"],
        desc="older name of in_file (kept for existing workflows)",
    )
    in_phase = InputMultiObject(
        File(exists=True),
        desc="wrapped phase in radians matching in_file (needed by method='phase-quality')",
    )
    echo_times = traits.List(
        traits.Float, desc="echo times in seconds (phase-quality with multi-echo in_phase)"
    )
    method = traits.Enum(
        *MASK_METHODS,
        usedefault=True,
        desc="'bet': FSL BET when installed, else the built-in BET; 'fsl-bet': FSL only (error "
        "without FSL); 'phase-quality': ROMEO quality threshold; 'magnitude-threshold' (or "
        "'threshold'): magnitude threshold",
    )
    echo_combination = traits.Enum(
        "first",
        "rss",
        usedefault=True,
        desc="image for BET and magnitude thresholds: the first echo or the root sum of squares "
        "over echoes",
    )
    frac = traits.Range(
        0.0, 1.0, 0.5, usedefault=True, desc="BET fractional intensity threshold (FSL -f)"
    )
    vertical_gradient = traits.Range(
        -1.0, 1.0, 0.0, usedefault=True, desc="BET vertical gradient in f (FSL -g)"
    )
    radius = traits.Float(desc="BET head radius in mm (FSL -r)")
    center = traits.List(
        traits.Float, minlen=3, maxlen=3, desc="BET initial centre in voxels (FSL -c)"
    )
    robust = traits.Bool(
        False, usedefault=True, desc="BET robust centre estimation (FSL -R), iterates BET"
    )
    exclude_csf = traits.Bool(
        False,
        usedefault=True,
        desc="bet/fsl-bet: take the CSF between brain and skull out of the BET mask (Otsu split "
        "of the magnitude inside it, 3 mm closing, hole filling); on GRE magnitude BET itself "
        "outlines the inner skull",
    )
    threshold_method = traits.Enum(
        "tissue",
        "otsu-foreground",
        "otsu",
        "percentile",
        "fixed",
        desc="threshold of the quality map (phase-quality, default 'otsu') or of the magnitude "
        "(magnitude-threshold, default 'tissue': brain tissue brighter than CSF and scalp relative "
        "to the local tissue level, robust to receive-field shading)",
    )
    threshold_value = traits.Float(
        desc="percentile (0-100) or fixed threshold (quality in [0, 1], magnitude in its units)"
    )
    magnitude_threshold = traits.Bool(
        True,
        usedefault=True,
        desc="phase-quality: also require the first-echo magnitude to be in the bright (tissue) "
        "class relative to the local tissue level, which leaves out the CSF around the brain "
        "(its phase is as smooth as tissue's)",
    )
    close_mm = traits.Float(
        desc="closing radius in mm for threshold masks (default 3: bridges sulci)"
    )
    fill_holes = traits.Bool(True, usedefault=True, desc="fill enclosed holes of threshold masks")
    erode_mm = traits.Float(0.0, usedefault=True, desc="erode the final mask by this radius (mm)")


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8 NIfTI)")
    out_brain = File(exists=True, desc="masked magnitude (the image the mask was made from)")
    out_quality = File(desc="phase-quality map in [0, 1] (method='phase-quality')")
    out_reliable_mask = File(
        desc="mask voxels that pass the quality threshold, no hole filling: the second-pass mask "
        "of the two-pass reconstruction (method='phase-quality')"
    )
    out_sidecar = File(exists=True, desc="JSON sidecar: the method that actually ran, options")
    method_used = traits.Str(desc="'fsl-bet', 'bet', 'phase-quality' or 'magnitude-threshold'")


class BrainMask(SimpleInterface):
    """Brain mask of a (multi-echo) GRE acquisition.

    ``method="bet"`` runs FSL's ``bet`` when it is installed and the built-in BET (Smith 2002)
    otherwise, saying so in the log; ``"fsl-bet"`` demands FSL. ``"phase-quality"`` thresholds
    the ROMEO phase-quality map of ``in_phase`` (QSMxT, Stewart et al. 2022) and also writes the
    unfilled "reliable" mask for the two-pass reconstruction (:class:`TwoPassCombine`).
    ``"magnitude-threshold"`` thresholds the magnitude. The sidecar ``out_sidecar`` records the
    method that ran.

    On GRE magnitude BET (FSL's and the built-in, default ``frac=0.5``) outlines the inner skull:
    the CSF around the brain is darker than tissue but far brighter than the skull.
    ``exclude_csf=True`` takes that CSF out afterwards
    (:func:`qsmflow.algorithms.masking.remove_outer_csf`); the phase-quality and
    magnitude-threshold masks leave it out by themselves.
    """

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _magnitude_files(self):
        return self.inputs.in_file if isdefined(self.inputs.in_file) else self.inputs.in_magnitude

    def _run_interface(self, runtime):
        files = self._magnitude_files()
        source = first_file(files)
        mag, ref = load_echoes(files, what="magnitude")
        vox = voxel_sizes(ref.affine)
        negative = np.count_nonzero(mag < 0) / mag.size
        if negative > 0.01:
            raise ValueError(
                f"in_file {source}: {100 * negative:.0f} % of the magnitude is negative; is it a "
                "phase image? give the magnitude (part-mag) files"
            )
        if negative:  # a few small negatives from filtering or interpolation
            mag = np.maximum(mag, np.float32(0))
        if self.inputs.echo_combination == "rss" and mag.shape[3] > 1:
            image = np.sqrt(np.sum(mag * mag, axis=3, dtype=np.float32))
        else:
            image = mag[..., 0]
        masking.check_head_image(image, vox, name=f"in_file {source}")

        method = "magnitude-threshold" if self.inputs.method == "threshold" else self.inputs.method
        params: dict = {}
        extra: dict = {}
        if method in ("bet", "fsl-bet"):
            params = self._bet_params()
            bet_path = find_fsl_bet()
            if method == "fsl-bet" and bet_path is None:
                raise RuntimeError(
                    "method='fsl-bet' needs FSL's bet, which was not found (no 'bet' on PATH and "
                    "no $FSLDIR/bin/bet); install FSL and set FSLDIR, or use method='bet' for "
                    "the built-in BET"
                )
            if bet_path is not None:
                mask, version = self._run_fsl(runtime, image, ref, source, bet_path, params)
                method, extra = "fsl-bet", {"FSLVersion": version, "Command": self._cmdline}
            else:
                IFLOGGER.warning(
                    "BrainMask: FSL's bet not found (no 'bet' on PATH, FSLDIR unset); using the "
                    "built-in BET (qsmflow.algorithms.bet)"
                )
                mask = bet(
                    image,
                    vox,
                    frac=params["frac"],
                    vertical_gradient=params["vertical_gradient"],
                    radius_mm=params.get("radius"),
                    center_vox=params.get("center"),
                    robust=params["robust"],
                )
            if self.inputs.exclude_csf:
                mask = masking.remove_outer_csf(image, mask, vox)
                params["exclude_csf"] = True
        elif method == "phase-quality":
            mask, quality, reliable, params = self._phase_quality(mag, vox, source)
            for name, arr in (("quality", quality), ("reliablemask", reliable)):
                path = output_path(runtime.cwd, source, name)
                save_nifti(arr, ref.affine, path)
                self._results["out_reliable_mask" if name == "reliablemask" else "out_quality"] = (
                    path
                )
        else:
            legacy = self.inputs.method == "threshold"
            params = self._threshold_params("otsu" if legacy else "tissue", 0.0 if legacy else 3.0)
            if params["threshold_method"] == "tissue":
                mask = masking.magnitude_tissue_mask(
                    image, vox, close_mm=params["close_mm"], fill_holes=params["fill_holes"]
                )
            else:
                mask = masking.threshold_mask(
                    image,
                    method=params["threshold_method"],
                    value=params.get("threshold_value"),
                    fill_holes=params["fill_holes"],
                    voxel_size_mm=vox,
                    close_mm=params["close_mm"],
                )
        if self.inputs.erode_mm > 0:
            mask = masking.erode_mm(mask, self.inputs.erode_mm, vox)
            params["erode_mm"] = float(self.inputs.erode_mm)
        if not mask.any():
            raise ValueError(
                f"in_file {source}: the {method} mask is empty; check the image and the options "
                f"{params}"
            )

        self._results["method_used"] = method
        out_mask = output_path(runtime.cwd, source, "mask")
        save_nifti(mask, ref.affine, out_mask)
        self._results["out_mask"] = out_mask
        out_brain = output_path(runtime.cwd, source, "brain")
        save_nifti(np.where(mask, image, np.float32(0)), ref.affine, out_brain)
        self._results["out_brain"] = out_brain
        sidecar = {
            "Type": "Brain",
            "Method": _DESCRIPTIONS[method],
            "MethodUsed": method,
            "MethodRequested": self.inputs.method,
            "Parameters": params,
            "EchoCombination": self.inputs.echo_combination,
            "Sources": [str(f) for f in (files if isinstance(files, list) else [files])],
            **extra,
        }
        self._results["out_sidecar"] = str(
            write_json(sidecar, out_mask[: -len(".nii.gz")] + ".json")
        )
        return runtime

    def _bet_params(self) -> dict:
        params = {
            "frac": float(self.inputs.frac),
            "vertical_gradient": float(self.inputs.vertical_gradient),
            "robust": bool(self.inputs.robust),
        }
        if not 0.0 < params["frac"] < 1.0:
            raise ValueError(f"frac must lie strictly between 0 and 1, got {params['frac']}")
        if isdefined(self.inputs.radius):
            if self.inputs.radius <= 0:
                raise ValueError(
                    f"radius must be a positive head radius in mm, got {self.inputs.radius}"
                )
            params["radius"] = float(self.inputs.radius)
        if isdefined(self.inputs.center):
            params["center"] = [float(c) for c in self.inputs.center]
        return params

    def _threshold_params(self, default_method: str, default_close: float) -> dict:
        method = (
            self.inputs.threshold_method
            if isdefined(self.inputs.threshold_method)
            else default_method
        )
        params = {
            "threshold_method": method,
            "close_mm": float(self.inputs.close_mm)
            if isdefined(self.inputs.close_mm)
            else default_close,
            "fill_holes": bool(self.inputs.fill_holes),
        }
        if isdefined(self.inputs.threshold_value):
            if method in ("otsu", "otsu-foreground", "tissue"):
                raise ValueError(
                    f"threshold_value is not used by threshold_method={method!r}; choose "
                    "'percentile' or 'fixed', or leave threshold_value unset"
                )
            params["threshold_value"] = float(self.inputs.threshold_value)
        elif method in ("percentile", "fixed"):
            raise ValueError(f"threshold_method={method!r} needs threshold_value")
        return params

    def _phase_quality(self, mag, vox, source):
        if not isdefined(self.inputs.in_phase):
            raise ValueError(
                "method='phase-quality' needs in_phase (wrapped phase in radians, same echoes "
                "as in_file)"
            )
        phase, _ = load_echoes(self.inputs.in_phase, what="phase")
        phase_src = first_file(self.inputs.in_phase)
        if phase.shape[:3] != mag.shape[:3]:
            raise ValueError(
                f"in_phase {phase_src}: shape {phase.shape[:3]} differs from in_file {source} "
                f"{mag.shape[:3]}"
            )
        if phase.shape[3] != mag.shape[3]:
            raise ValueError(
                f"in_phase {phase_src} has {phase.shape[3]} echoes but in_file {source} has "
                f"{mag.shape[3]}; give the same echoes"
            )
        tes = None
        if phase.shape[3] > 1:
            if not isdefined(self.inputs.echo_times):
                raise ValueError("echo_times (seconds) are needed for multi-echo in_phase")
            tes = [float(t) for t in self.inputs.echo_times]
            if len(tes) != phase.shape[3]:
                raise ValueError(
                    f"echo_times has {len(tes)} values for {phase.shape[3]} echoes of in_phase"
                )
            if max(tes) > 1.0:
                raise ValueError(f"echo_times look like milliseconds ({tes}); give seconds")
        if np.nanmax(np.abs(phase)) > 4.0:
            raise ValueError(
                f"in_phase {phase_src}: values up to {np.nanmax(np.abs(phase)):.1f}; expected "
                "wrapped phase in radians [-pi, pi] (rescale vendor units first)"
            )
        params = self._threshold_params("otsu", 3.0)
        if params["threshold_method"] == "tissue":
            raise ValueError(
                "threshold_method='tissue' is for magnitude-threshold; the quality map takes "
                "'otsu', 'otsu-foreground', 'percentile' or 'fixed'"
            )
        params["magnitude_threshold"] = bool(self.inputs.magnitude_threshold)
        quality = masking.phase_quality_map(phase, magnitude=mag, echo_times_s=tes)
        mask = masking.phase_quality_mask(
            quality,
            vox,
            magnitude=mag[..., 0] if params["magnitude_threshold"] else None,
            method=params["threshold_method"],
            value=params.get("threshold_value"),
            close_mm=params["close_mm"],
            fill_holes=params["fill_holes"],
        )
        reliable = masking.reliable_mask(quality, mask)
        params["reliable_threshold_method"] = "otsu-foreground"
        return mask, quality, reliable, params

    def _run_fsl(self, runtime, image, ref, source, bet_path, params):
        bet_in = output_path(runtime.cwd, source, "betinput")
        save_nifti(image, ref.affine, bet_in, header=ref.header)
        out_file = output_path(runtime.cwd, source, "fslbet")
        iface = fsl_bet_interface(
            bet_in,
            out_file,
            frac=params["frac"],
            vertical_gradient=params["vertical_gradient"],
            radius_mm=params.get("radius"),
            center_vox=params.get("center"),
            robust=params["robust"],
            bet_path=bet_path,
        )
        self._cmdline = iface.cmdline
        IFLOGGER.info("BrainMask: running FSL: %s", self._cmdline)
        result = iface.run(cwd=runtime.cwd)
        mask_file = result.outputs.mask_file
        mask = load_nifti(mask_file, dtype=bool)[0]
        if mask.shape != image.shape:
            raise RuntimeError(
                f"FSL bet wrote a mask of shape {mask.shape}, expected {image.shape}"
            )
        return mask, fsl.Info.version()


class _TwoPassCombineInputSpec(ThreadedInputSpec):
    in_chi_filled = File(
        exists=True, mandatory=True, desc="susceptibility (ppm) reconstructed on the filled mask"
    )
    in_chi_reliable = File(
        exists=True,
        mandatory=True,
        desc="susceptibility (ppm) reconstructed on the reliable (unfilled) mask",
    )
    in_filled_mask = File(exists=True, mandatory=True, desc="hole-filled brain mask")
    in_reliable_mask = File(
        exists=True, mandatory=True, desc="reliable-voxel mask (inside the filled mask)"
    )


class _TwoPassCombineOutputSpec(TraitedSpec):
    out_chi = File(exists=True, desc="combined susceptibility map (ppm)")


class TwoPassCombine(SimpleInterface):
    """Combine the two passes of QSMxT's artefact reduction (Stewart et al., MRM 2022).

    The reliable-mask map inside the reliable mask, the filled-mask map in the filled holes
    (see :func:`qsmflow.algorithms.masking.two_pass_combine`); zero outside the filled mask.
    Give each pass's own final mask (after background removal); reliable voxels outside the
    filled mask are dropped with a warning.
    """

    input_spec = _TwoPassCombineInputSpec
    output_spec = _TwoPassCombineOutputSpec

    def _run_interface(self, runtime):
        chi_filled, img = load_nifti(self.inputs.in_chi_filled)
        arrays = {}
        for name in ("in_chi_reliable", "in_filled_mask", "in_reliable_mask"):
            path = getattr(self.inputs, name)
            arrays[name] = load_nifti(path, dtype=bool if "mask" in name else np.float32)[0]
            if arrays[name].shape != chi_filled.shape:
                raise ValueError(
                    f"{name} {path}: shape {arrays[name].shape} differs from in_chi_filled "
                    f"{self.inputs.in_chi_filled} {chi_filled.shape}"
                )
        filled, reliable = arrays["in_filled_mask"], arrays["in_reliable_mask"]
        outside = np.count_nonzero(reliable & ~filled)
        if outside:
            # background removal erodes each pass's mask on its own; keep the nesting
            IFLOGGER.warning(
                "TwoPassCombine: %d reliable-mask voxels lie outside the filled mask; ignored",
                outside,
            )
            reliable = reliable & filled
        chi = masking.two_pass_combine(chi_filled, arrays["in_chi_reliable"], filled, reliable)
        path = output_path(runtime.cwd, self.inputs.in_chi_filled, "twopass")
        save_nifti(chi, img.affine, path, header=img.header)
        self._results["out_chi"] = path
        return runtime
