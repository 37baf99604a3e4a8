"""Multi-orientation interfaces: register head orientations, COSMOS and STI.

Fields are in ppm; B0 directions are unit vectors in the reference voxel frame. A registered
field is written with a JSON sidecar whose ``B0_dir`` holds its B0 direction in the reference
frame, which :class:`COSMOS` and :class:`STI` read when ``b0_directions`` is not given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..algorithms.multi_orientation import (
    apply_transform,
    b0_direction_in_reference,
    cosmos,
    fsl_matrix_to_world,
    register_rigid,
    resample_field,
    sti,
)
from ..algorithms.multi_orientation.registration import transform_similarity
from ..io.nifti import load_nifti, read_json, save_nifti, voxel_sizes, write_json
from ._common import ThreadedInputSpec, output_path
from .bids import DerivativesDataSink

__all__ = ["RegisterOrientations", "COSMOS", "STI", "MultiOrientationDataSink", "flirt_interface"]


def _sidecar(path: str) -> Path:
    p = Path(path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_suffix(".json")


def _sidecar_b0(path: str) -> np.ndarray | None:
    side = _sidecar(path)
    if not side.exists():
        return None
    value = read_json(side).get("B0_dir")
    return None if value is None else np.asarray(value, dtype=np.float64)


def fsl_available() -> bool:
    """True when FSL's ``flirt`` is on the PATH."""
    return shutil.which("flirt") is not None


def flirt_interface(moving: str, reference: str, out_matrix: str):
    """Nipype FLIRT for a 6-dof registration of ``moving`` to ``reference`` (correlation ratio)."""
    from nipype.interfaces import fsl

    return fsl.FLIRT(
        in_file=moving,
        reference=reference,
        dof=6,
        cost="corratio",
        searchr_x=[-40, 40],
        searchr_y=[-40, 40],
        searchr_z=[-40, 40],
        out_matrix_file=out_matrix,
        out_file=str(Path(out_matrix).with_suffix("")) + "_flirt.nii.gz",
        output_type="NIFTI_GZ",
    )


# ------------------------------------------------------------------------------ registration
class _RegisterInputSpec(ThreadedInputSpec):
    in_reference = File(exists=True, mandatory=True, desc="first-echo magnitude of the reference")
    in_moving = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="first-echo magnitude of each orientation (may include the reference itself)",
    )
    in_fields = InputMultiObject(
        File(exists=True), desc="local field (ppm) of each orientation, resampled to the reference"
    )
    in_masks = InputMultiObject(File(exists=True), desc="mask of each orientation, resampled")
    reference_mask = File(exists=True, desc="where to compare the magnitudes (default: head)")
    method = traits.Enum(
        "auto", "builtin", "flirt", usedefault=True, desc="FSL FLIRT when available (auto)"
    )
    min_similarity = traits.Float(
        0.6, usedefault=True, desc="normalised cross-correlation below which registration fails"
    )
    on_failure = traits.Enum(
        "error", "drop", usedefault=True, desc="raise on a failed orientation, or leave it out"
    )
    interpolation_order = traits.Range(
        low=1,
        high=5,
        value=3,
        usedefault=True,
        desc="spline order for the fields (3: cubic; with in_masks the field is first extended "
        "beyond its mask and the resampled mask keeps only fully supported voxels)",
    )


class _RegisterOutputSpec(TraitedSpec):
    out_transforms = OutputMultiObject(
        File(exists=True), desc="4x4 rigid transforms (reference world -> moving world, mm), text"
    )
    out_b0_directions = traits.List(
        traits.Tuple(traits.Float, traits.Float, traits.Float),
        desc="B0 direction of each kept orientation in the reference voxel frame",
    )
    out_fields = OutputMultiObject(File(exists=True), desc="fields on the reference grid (ppm)")
    out_masks = OutputMultiObject(File(exists=True), desc="masks on the reference grid")
    out_similarity = traits.List(traits.Float, desc="final NCC of every orientation")
    out_report = File(exists=True, desc="JSON: per-orientation similarity, success, transform")
    out_sidecar = File(
        exists=True,
        desc="JSON for the sidecars of the combined maps: a 'Registration' entry (method, "
        "minimum similarity, and per kept orientation its NCC and 4x4 transform in mm)",
    )


class RegisterOrientations(SimpleInterface):
    """Rigidly register each orientation's magnitude to the reference; resample fields/masks.

    Uses FSL FLIRT (6 dof) through Nipype when ``method`` is ``flirt`` (or ``auto`` with FSL
    installed), else :func:`qsmflow.algorithms.multi_orientation.register_rigid`. A registration
    whose similarity is below ``min_similarity`` is reported per orientation and either raises
    (``on_failure='error'``) or is left out (``'drop'``); it is never used silently.

    With ``in_masks``, each field is resampled by
    :func:`qsmflow.algorithms.multi_orientation.resample_field` (extended past its mask, then a
    spline of ``interpolation_order``) and each mask keeps only the voxels whose interpolation
    draws on the inside of the orientation's own mask.
    """

    input_spec = _RegisterInputSpec
    output_spec = _RegisterOutputSpec

    def _register(self, ref, ref_img, moving_path, idx, cwd):
        mov, mov_img = load_nifti(moving_path)
        if str(Path(moving_path).resolve()) == str(Path(self.inputs.in_reference).resolve()) or (
            mov.shape == ref.shape
            and np.allclose(mov_img.affine, ref_img.affine)
            and np.array_equal(mov, ref)
        ):
            return np.eye(4), 1.0, True
        method = self.inputs.method
        if method == "auto":
            method = "flirt" if fsl_available() else "builtin"
        if method == "flirt":
            mat = str(Path(cwd) / f"orientation{idx + 1}_flirt.mat")
            flirt_interface(moving_path, self.inputs.in_reference, mat).run(cwd=cwd)
            transform = fsl_matrix_to_world(
                np.loadtxt(mat), ref.shape, ref_img.affine, mov.shape, mov_img.affine
            )
            ncc = transform_similarity(ref, ref_img.affine, mov, mov_img.affine, transform)
            return transform, ncc, ncc >= self.inputs.min_similarity
        ref_mask = None
        if isdefined(self.inputs.reference_mask):
            ref_mask = load_nifti(self.inputs.reference_mask, dtype=bool)[0]
        res = register_rigid(
            ref,
            ref_img.affine,
            mov,
            mov_img.affine,
            reference_mask=ref_mask,
            min_similarity=self.inputs.min_similarity,
        )
        return res.transform, res.similarity, res.success

    def _run_interface(self, runtime):
        ref, ref_img = load_nifti(self.inputs.in_reference)
        moving = list(self.inputs.in_moving)
        for name in ("in_fields", "in_masks"):
            value = getattr(self.inputs, name)
            if isdefined(value) and len(value) != len(moving):
                raise ValueError(
                    f"{name}: got {len(value)} files for {len(moving)} in_moving images; give "
                    "one per orientation, in the same order"
                )
        report, transforms, dirs, fields, masks, sims = [], [], [], [], [], []
        failed = []
        for idx, path in enumerate(moving):
            transform, ncc, ok = self._register(ref, ref_img, path, idx, runtime.cwd)
            sims.append(float(ncc))
            report.append(
                {
                    "moving": str(path),
                    "similarity": round(float(ncc), 4),
                    "success": bool(ok),
                    "transform": np.round(transform, 6).tolist(),
                }
            )
            if not ok:
                failed.append((path, ncc))
                continue
            mov_img = load_nifti(path)[1]
            tpath = str(Path(runtime.cwd) / f"orientation{idx + 1}_to_reference.txt")
            np.savetxt(tpath, transform, fmt="%.8f", header="reference world -> moving world (mm)")
            transforms.append(tpath)
            b0 = b0_direction_in_reference(
                transform, ref_img.affine, mov_img.affine, _sidecar_b0(path)
            )
            dirs.append(tuple(float(v) for v in b0))
            order = self.inputs.interpolation_order
            have_fields = isdefined(self.inputs.in_fields)
            if isdefined(self.inputs.in_masks):
                mpath = self.inputs.in_masks[idx]
                mask, m_img = load_nifti(mpath, dtype=bool)
                if have_fields:
                    fpath = self.inputs.in_fields[idx]
                    field, f_img = load_nifti(fpath)
                    if field.shape != mask.shape:
                        raise ValueError(
                            f"{fpath}: field shape {field.shape} differs from its mask {mpath} "
                            f"{mask.shape}; give each orientation's field and mask on one grid"
                        )
                    out_field, out = resample_field(
                        field, mask, f_img.affine, ref.shape, ref_img.affine, transform, order=order
                    )
                else:
                    out = apply_transform(mask, m_img.affine, ref.shape, ref_img.affine, transform)
                mout = output_path(runtime.cwd, mpath, f"ori{idx + 1}reg")
                save_nifti(out, ref_img.affine, mout)
                masks.append(mout)
            elif have_fields:
                fpath = self.inputs.in_fields[idx]
                field, f_img = load_nifti(fpath)
                out_field = apply_transform(
                    field, f_img.affine, ref.shape, ref_img.affine, transform, order=order
                )
            if have_fields:
                fout = output_path(runtime.cwd, self.inputs.in_fields[idx], f"ori{idx + 1}reg")
                save_nifti(out_field, ref_img.affine, fout)
                write_json({"Units": "ppm", "B0_dir": list(dirs[-1])}, _sidecar(fout))
                fields.append(fout)
        rpath = str(Path(runtime.cwd) / "registration_report.json")
        write_json({"MinSimilarity": self.inputs.min_similarity, "Orientations": report}, rpath)
        spath = str(Path(runtime.cwd) / "registration_sidecar.json")
        registration = {
            "Method": self.inputs.method,
            "MinSimilarity": self.inputs.min_similarity,
            "Similarity": [r["similarity"] for r in report],
            "Used": [r["success"] for r in report],
            "TransformsMm": [r["transform"] for r in report],
            "Description": "per orientation, in the order of Sources: normalised "
            "cross-correlation of its first-echo magnitude with the reference after rigid "
            "registration, whether it was used, and the transform (reference world -> "
            "orientation world, mm)",
        }
        write_json({"Registration": registration}, spath)
        if failed and self.inputs.on_failure == "error":
            lines = "; ".join(f"{p}: NCC {s:.3f}" for p, s in failed)
            raise RuntimeError(
                f"registration to {self.inputs.in_reference} failed for {len(failed)} "
                f"orientation(s) (similarity below {self.inputs.min_similarity}): {lines}. Check "
                "those images (same subject? first-echo magnitude?), try method='flirt', or set "
                "on_failure='drop' to leave them out"
            )
        self._results.update(
            out_transforms=transforms,
            out_b0_directions=dirs,
            out_similarity=sims,
            out_report=rpath,
            out_sidecar=spath,
        )
        if isdefined(self.inputs.in_fields):
            self._results["out_fields"] = fields
        if isdefined(self.inputs.in_masks):
            self._results["out_masks"] = masks
        return runtime


# ------------------------------------------------------------------------------ COSMOS / STI
class _MultiFieldInputSpec(ThreadedInputSpec):
    in_fields = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="local fields (ppm) of every orientation, already in the reference frame",
    )
    in_masks = InputMultiObject(
        File(exists=True), mandatory=True, desc="masks (one per field, or one for all)"
    )
    b0_directions = traits.List(
        traits.Tuple(traits.Float, traits.Float, traits.Float),
        desc="B0 direction of each field in the reference voxel frame (default: sidecar B0_dir)",
    )


def _load_orientations(
    inputs, *, per_orientation: bool = False
) -> tuple[list[np.ndarray], np.ndarray, object, list, list | None]:
    """Fields, the joint mask, the first image, the B0 directions and the per-field masks.

    The joint mask is the intersection of the masks, or with ``per_orientation`` (and one mask
    per field) their union, each field then being valid in its own mask (returned as the last
    item; None otherwise). Checks that the grids agree.
    """
    paths = list(inputs.in_fields)
    masks = list(inputs.in_masks)
    if len(masks) not in (1, len(paths)):
        raise ValueError(
            f"in_masks: give one mask or one per field ({len(paths)}), got {len(masks)}"
        )
    fields, first = [], None
    for path in paths:
        data, img = load_nifti(path)
        if first is None:
            first = img
        elif data.shape != first.shape or not np.allclose(img.affine, first.affine, atol=1e-3):
            raise ValueError(
                f"{path}: grid {data.shape} (affine differs: "
                f"{not np.allclose(img.affine, first.affine, atol=1e-3)}) does not match "
                f"{paths[0]} {first.shape}; every orientation must be resampled to the reference "
                "grid first (RegisterOrientations)"
            )
        fields.append(data)
    per_orientation = per_orientation and len(masks) == len(paths) and len(paths) > 1
    joint = np.zeros(first.shape, dtype=bool) if per_orientation else np.ones(first.shape, bool)
    each = []
    for path in masks:
        mask = load_nifti(path, dtype=bool)[0]
        if mask.shape != first.shape:
            raise ValueError(f"{path}: mask shape {mask.shape} differs from fields {first.shape}")
        if per_orientation:
            joint |= mask
            each.append(mask)
        else:
            joint &= mask
    if per_orientation and not np.logical_and.reduce(each).any():
        joint[:] = False
    if not joint.any():
        raise ValueError("the masks of the orientations do not overlap; check the registration")
    if isdefined(inputs.b0_directions) and inputs.b0_directions:
        dirs = [np.asarray(d, dtype=np.float64) for d in inputs.b0_directions]
        if len(dirs) != len(paths):
            raise ValueError(f"b0_directions: got {len(dirs)} for {len(paths)} fields")
    else:
        dirs = []
        for path in paths:
            b0 = _sidecar_b0(path)
            if b0 is None:
                raise ValueError(
                    f"{path}: no b0_directions given and no B0_dir in its sidecar "
                    f"{_sidecar(path).name}; register the orientations with RegisterOrientations "
                    "(which writes it) or pass b0_directions"
                )
            dirs.append(b0)
    return fields, joint, first, dirs, (each if per_orientation else None)


class _COSMOSInputSpec(_MultiFieldInputSpec):
    method = traits.Enum("cg", "closed-form", usedefault=True, desc="masked CG or closed form")
    max_iter = traits.Int(30, usedefault=True, desc="CG iterations (method 'cg')")
    joint_mask = traits.Enum(
        "union",
        "intersection",
        usedefault=True,
        desc="with one mask per field: 'union' solves for chi in the union and fits each field "
        "only inside its own mask (CG); 'intersection' uses the voxels all masks share",
    )


class _COSMOSOutputSpec(TraitedSpec):
    out_chi = File(exists=True, desc="COSMOS susceptibility in ppm")


class COSMOS(SimpleInterface):
    """COSMOS susceptibility (ppm) from registered multi-orientation local fields (Liu 2009)."""

    input_spec = _COSMOSInputSpec
    output_spec = _COSMOSOutputSpec

    def _run_interface(self, runtime):
        cg = self.inputs.method == "cg"
        fields, mask, img, dirs, each = _load_orientations(
            self.inputs, per_orientation=cg and self.inputs.joint_mask == "union"
        )
        kwargs = {"max_iter": self.inputs.max_iter} if cg else {}
        if each is not None:
            kwargs["weights"] = [m.astype(np.float32) for m in each]
        chi = cosmos(
            fields,
            mask,
            voxel_sizes(img.affine),
            dirs,
            method=self.inputs.method,
            n_threads=self.inputs.num_threads,
            **kwargs,
        )
        out = output_path(runtime.cwd, self.inputs.in_fields[0], "cosmos")
        save_nifti(chi, img.affine, out)
        self._results["out_chi"] = out
        return runtime


class _STIInputSpec(_MultiFieldInputSpec):
    regularization = traits.Float(
        0.0, usedefault=True, desc="anisotropy penalty lambda (0: plain STI, >= 6 orientations)"
    )
    max_iter = traits.Int(13, usedefault=True, desc="LSQR iterations")


class _STIOutputSpec(TraitedSpec):
    out_chi33 = File(exists=True, desc="chi33 along the reference B0 (ppm)")
    out_tensor = File(exists=True, desc="tensor, 4-D: xx, xy, xz, yy, yz, zz (ppm)")
    out_mms = File(exists=True, desc="mean magnetic susceptibility (ppm)")
    out_eigenvalues = File(exists=True, desc="eigenvalues, 4-D descending (ppm)")
    out_eigenvectors = File(exists=True, desc="eigenvectors, 4-D: v1 (3), v2 (3), v3 (3)")
    out_msa = File(exists=True, desc="anisotropy chi1 - (chi2 + chi3) / 2 (ppm)")


class STI(SimpleInterface):
    """Susceptibility tensor imaging from registered multi-orientation fields (Liu 2010)."""

    input_spec = _STIInputSpec
    output_spec = _STIOutputSpec

    def _run_interface(self, runtime):
        fields, mask, img, dirs, _ = _load_orientations(self.inputs)
        res = sti(
            fields,
            mask,
            voxel_sizes(img.affine),
            dirs,
            regularization=self.inputs.regularization,
            max_iter=self.inputs.max_iter,
            n_threads=self.inputs.num_threads,
        )
        src = self.inputs.in_fields[0]
        n = mask.shape
        for key, suffix, data in (
            ("out_chi33", "sti33", res.chi33),
            ("out_tensor", "stitensor", res.tensor),
            ("out_mms", "stimms", res.mms),
            ("out_eigenvalues", "stieigval", res.eigenvalues),
            ("out_eigenvectors", "stieigvec", res.eigenvectors.swapaxes(3, 4).reshape(*n, 9)),
            ("out_msa", "stimsa", res.msa),
        ):
            out = output_path(runtime.cwd, src, suffix)
            save_nifti(data, img.affine, out)
            self._results[key] = out
        return runtime


# ------------------------------------------------------------------------------ derivatives
class MultiOrientationDataSink(DerivativesDataSink):
    """:class:`DerivativesDataSink` for maps combining orientations (set ``drop_entities`` to
    the grouping entity and ``sources`` to every orientation's raw file).

    ``sub-01_ses-1_acq-ori1_MEGRE`` with ``drop_entities=['acq']`` and ``desc='cosmos'`` gives
    ``sub-01_ses-1_desc-cosmos_Chimap``.
    """
