"""Nipype interfaces: each runs on files, and they drop into a plain Nipype workflow."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nipype.pipeline import engine as pe

from qsmflow.algorithms import metrics
from qsmflow.interfaces import (
    BackgroundRemoval,
    BrainMask,
    DipoleInversion,
    EchoCombination,
    PhaseUnwrap,
    ReferenceSusceptibility,
)
from qsmflow.io.nifti import save_nifti
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

TES = [0.005, 0.010, 0.015, 0.020]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 3 mm simulated head written as one 3-D NIfTI per echo and part, plus truth."""
    root = tmp_path_factory.mktemp("ifdata")
    sim = simulate_acquisition(
        make_head_model(2),
        AcquisitionParams(
            matrix=(59, 69, 53), voxel_size_mm=(3.0, 3.0, 3.0), echo_times_s=tuple(TES)
        ),
        rng=np.random.default_rng(1),
    )
    files = {"mag": [], "phase": []}
    for e in range(len(TES)):
        for part, arr in (("mag", sim.magnitude), ("phase", sim.phase)):
            path = root / f"sub-01_echo-{e + 1}_part-{part}_MEGRE.nii.gz"
            save_nifti(arr[..., e], sim.affine, path)
            files[part].append(str(path))
    save_nifti(sim.mask, sim.affine, root / "truemask.nii.gz")
    save_nifti(sim.total_field_ppm, sim.affine, root / "total_ppm.nii.gz")
    save_nifti(sim.local_field_ppm, sim.affine, root / "local_ppm.nii.gz")
    return {"root": root, "sim": sim, **files}


def load(path):
    return np.asarray(nib.load(path).dataobj)


def test_background_removal_units_and_outputs(data, tmp_path):
    sim = data["sim"]
    res = BackgroundRemoval(
        in_field=str(data["root"] / "total_ppm.nii.gz"),
        in_mask=str(data["root"] / "truemask.nii.gz"),
        method="vsharp",
    ).run(cwd=str(tmp_path))
    local = load(res.outputs.out_field)
    valid = load(res.outputs.out_mask) > 0
    assert valid.sum() < sim.mask.sum()  # V-SHARP erodes
    direct = metrics.nrmse_demeaned(local, sim.local_field_ppm, valid)
    # the same field in Hz with b0_tesla gives the same local field in ppm
    hz = tmp_path / "total_hz.nii.gz"
    save_nifti(sim.total_field_ppm * np.float32(42.57747892 * 3), sim.affine, hz)
    (tmp_path / "hz").mkdir()
    (tmp_path / "nob0").mkdir()
    res_hz = BackgroundRemoval(
        in_field=str(hz),
        in_mask=str(data["root"] / "truemask.nii.gz"),
        field_units="Hz",
        b0_tesla=3.0,
    ).run(cwd=str(tmp_path / "hz"))
    np.testing.assert_allclose(load(res_hz.outputs.out_field), local, atol=1e-5)
    assert direct < 80
    with pytest.raises(ValueError, match="b0_tesla"):
        BackgroundRemoval(
            in_field=str(hz), in_mask=str(data["root"] / "truemask.nii.gz"), field_units="Hz"
        ).run(cwd=str(tmp_path / "nob0"))


def test_mismatched_echo_affines_name_the_file(data, tmp_path):
    moved = tmp_path / "moved_echo2.nii.gz"
    img = nib.load(data["phase"][1])
    aff = img.affine.copy()
    aff[0, 3] += 5
    save_nifti(np.asarray(img.dataobj), aff, moved)
    with pytest.raises(ValueError, match="moved_echo2"):
        PhaseUnwrap(in_phase=[data["phase"][0], str(moved)], echo_times=TES[:2]).run(
            cwd=str(tmp_path)
        )


def test_echo_times_in_ms_rejected(data, tmp_path):
    with pytest.raises(ValueError, match="seconds"):
        PhaseUnwrap(in_phase=data["phase"], echo_times=[5.0, 10.0, 15.0, 20.0]).run(
            cwd=str(tmp_path)
        )


def test_nan_phase_rejected(data, tmp_path):
    bad = tmp_path / "nan_phase.nii.gz"
    arr = load(data["phase"][0]).astype(np.float32)
    arr[10, 10, 10] = np.nan
    save_nifti(arr, nib.load(data["phase"][0]).affine, bad)
    with pytest.raises(ValueError, match="nan_phase"):
        PhaseUnwrap(in_phase=str(bad)).run(cwd=str(tmp_path))


def test_reference_records_the_subtracted_mean(data, tmp_path):
    sim = data["sim"]
    chi_path = tmp_path / "chi.nii.gz"
    save_nifti(sim.chi_ppm, sim.affine, chi_path)
    csf = tmp_path / "csf.nii.gz"
    save_nifti(sim.segmentation == 10, sim.affine, csf)
    res = ReferenceSusceptibility(
        in_chi=str(chi_path), in_mask=str(data["root"] / "truemask.nii.gz"), in_reference=str(csf)
    ).run(cwd=str(tmp_path))
    expected = float(sim.chi_ppm[(sim.segmentation == 10) & sim.mask].mean())
    assert res.outputs.reference_ppm == pytest.approx(expected, abs=1e-6)
    out = load(res.outputs.out_chi)
    assert abs(out[(sim.segmentation == 10) & sim.mask].mean()) < 1e-5


def test_num_threads_follows_node_n_procs():
    node = pe.Node(BackgroundRemoval(), name="bfr", n_procs=3)
    assert node.inputs.num_threads == 3 and node.n_procs == 3


def test_every_trait_is_described():
    for iface in (
        BackgroundRemoval,
        BrainMask,
        DipoleInversion,
        EchoCombination,
        PhaseUnwrap,
        ReferenceSusceptibility,
    ):
        for spec in (iface.input_spec(), iface.output_spec()):
            for name, trait in spec.traits().items():
                if name in ("trait_added", "trait_modified"):
                    continue
                assert trait.desc, f"{iface.__name__}.{name} has no desc"
