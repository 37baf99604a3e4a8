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
    CoilCombination,
    DipoleInversion,
    EchoCombination,
    PhaseUnwrap,
    ReferenceSusceptibility,
)
from qsmflow.io.nifti import save_nifti
from qsmflow.phantom import make_head_model
from qsmflow.simulate import AcquisitionParams, simulate_acquisition

from .conftest import INTERFACE_TES as TES


def load(path):
    return np.asarray(nib.load(path).dataobj)


def test_background_removal_units_and_outputs(interface_data, tmp_path):
    sim = interface_data["sim"]
    res = BackgroundRemoval(
        in_field=str(interface_data["root"] / "total_ppm.nii.gz"),
        in_mask=str(interface_data["root"] / "truemask.nii.gz"),
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
        in_mask=str(interface_data["root"] / "truemask.nii.gz"),
        field_units="Hz",
        b0_tesla=3.0,
    ).run(cwd=str(tmp_path / "hz"))
    np.testing.assert_allclose(load(res_hz.outputs.out_field), local, atol=1e-5)
    assert direct < 80
    with pytest.raises(ValueError, match="b0_tesla"):
        BackgroundRemoval(
            in_field=str(hz),
            in_mask=str(interface_data["root"] / "truemask.nii.gz"),
            field_units="Hz",
        ).run(cwd=str(tmp_path / "nob0"))


def test_mismatched_echo_affines_name_the_file(interface_data, tmp_path):
    moved = tmp_path / "moved_echo2.nii.gz"
    img = nib.load(interface_data["phase"][1])
    aff = img.affine.copy()
    aff[0, 3] += 5
    save_nifti(np.asarray(img.dataobj), aff, moved)
    with pytest.raises(ValueError, match="moved_echo2"):
        PhaseUnwrap(in_phase=[interface_data["phase"][0], str(moved)], echo_times=TES[:2]).run(
            cwd=str(tmp_path)
        )


def test_echo_times_in_ms_rejected(interface_data, tmp_path):
    with pytest.raises(ValueError, match="seconds"):
        PhaseUnwrap(in_phase=interface_data["phase"], echo_times=[5.0, 10.0, 15.0, 20.0]).run(
            cwd=str(tmp_path)
        )


def test_nan_phase_rejected(interface_data, tmp_path):
    bad = tmp_path / "nan_phase.nii.gz"
    arr = load(interface_data["phase"][0]).astype(np.float32)
    arr[10, 10, 10] = np.nan
    save_nifti(arr, nib.load(interface_data["phase"][0]).affine, bad)
    with pytest.raises(ValueError, match="nan_phase"):
        PhaseUnwrap(in_phase=str(bad)).run(cwd=str(tmp_path))


def test_reference_records_the_subtracted_mean(interface_data, tmp_path):
    sim = interface_data["sim"]
    chi_path = tmp_path / "chi.nii.gz"
    save_nifti(sim.chi_ppm, sim.affine, chi_path)
    csf = tmp_path / "csf.nii.gz"
    save_nifti(sim.segmentation == 10, sim.affine, csf)
    res = ReferenceSusceptibility(
        in_chi=str(chi_path),
        in_mask=str(interface_data["root"] / "truemask.nii.gz"),
        in_reference=str(csf),
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
        CoilCombination,
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


def test_region_growing_interface_is_exact(interface_data, tmp_path):
    """PhaseUnwrap(method='region-growing') adds exact 2 pi multiples matching the truth."""
    sim = interface_data["sim"]
    res = PhaseUnwrap(
        in_phase=interface_data["phase"],
        in_magnitude=interface_data["mag"],
        echo_times=TES,
        in_mask=str(interface_data["root"] / "truemask.nii.gz"),
        method="region-growing",
    ).run(cwd=str(tmp_path))
    out = load(res.outputs.out_unwrapped)
    assert out.shape == sim.phase.shape
    hz = 42.57747892 * 3.0 * sim.total_field_ppm
    for e, te in enumerate(TES):
        truth = sim.phase_offset_rad + 2 * np.pi * hz * te
        k = np.round((out[..., e] - truth) / (2 * np.pi))[sim.mask]
        values, counts = np.unique(k, return_counts=True)
        assert counts.max() / k.size > 0.999  # one global 2 pi offset, >= 99.9 % exact


def test_coil_combination_interface(tmp_path):
    """CoilCombination on per-echo 4-D coil files removes the coil offsets (MCPC-3D-S)."""
    tes = [0.005, 0.010, 0.015]
    sim = simulate_acquisition(
        make_head_model(4),
        AcquisitionParams(
            matrix=(59, 69, 53),
            voxel_size_mm=(3.0, 3.0, 3.0),
            echo_times_s=tuple(tes),
            n_coils=6,
            snr=100,
        ),
        rng=np.random.default_rng(2),
    )
    files = {"mag": [], "phase": []}
    for e in range(len(tes)):
        for part, arr in (("mag", sim.magnitude), ("phase", sim.phase)):
            path = tmp_path / f"echo-{e + 1}_part-{part}.nii.gz"
            save_nifti(arr[..., e, :], sim.affine, path)
            files[part].append(str(path))
    (tmp_path / "run").mkdir()
    res = CoilCombination(in_phase=files["phase"], in_magnitude=files["mag"], echo_times=tes).run(
        cwd=str(tmp_path / "run")
    )
    phase = load(res.outputs.out_phase)
    assert phase.shape == sim.magnitude.shape[:4]
    assert load(res.outputs.out_phase_offsets).shape[-1] == 6
    # after offset removal the combined phase follows one field: 2*phi(TE2) - phi(TE3) - phi(TE1)
    # ~ 0 for equally spaced echoes (a plain complex sum of the coils would not satisfy this)
    m = sim.mask & (sim.magnitude[..., 2, :].sum(-1) > 0.1 * sim.magnitude.sum(-1).max() / 3)
    curvature = np.angle(np.exp(1j * (2 * phase[..., 1] - phase[..., 0] - phase[..., 2])))[m]
    assert np.sqrt(np.mean(curvature**2)) < 0.1
    plain = np.angle((sim.magnitude * np.exp(1j * sim.phase)).sum(-1))
    # the offset-free combined phase at TE1 is close to the field term alone (smooth residual)
    hz = 42.57747892 * 3.0 * sim.total_field_ppm
    resid = np.angle(np.exp(1j * (phase[..., 0] - 2 * np.pi * hz * tes[0])))[m]
    offset_single = np.angle(np.exp(1j * (plain[..., 0] - 2 * np.pi * hz * tes[0])))[m]
    assert np.std(resid) < 0.3 * np.std(offset_single)


def test_echo_combination_outputs(interface_data, tmp_path):
    """EchoCombination on exactly unwrapped phase: Hz and ppm agree, R2* is in Hz."""
    sim = interface_data["sim"]
    hz = 42.57747892 * 3.0 * sim.total_field_ppm
    unwrapped = []
    for e, te in enumerate(TES):
        truth = sim.phase_offset_rad + 2 * np.pi * hz * te
        ph = sim.phase[..., e] + 2 * np.pi * np.round((truth - sim.phase[..., e]) / (2 * np.pi))
        path = tmp_path / f"unwrapped_echo-{e + 1}.nii.gz"
        save_nifti(ph, sim.affine, path)
        unwrapped.append(str(path))
    res = EchoCombination(
        in_phase=unwrapped,
        in_magnitude=interface_data["mag"],
        echo_times=TES,
        b0_tesla=3.0,
        in_mask=str(interface_data["root"] / "truemask.nii.gz"),
    ).run(cwd=str(tmp_path))
    f_hz, f_ppm = load(res.outputs.out_field), load(res.outputs.out_field_ppm)
    np.testing.assert_allclose(f_hz[sim.mask], f_ppm[sim.mask] * 42.57747892 * 3.0, rtol=1e-4)
    assert metrics.nrmse(f_ppm, sim.total_field_ppm, sim.mask) < 3.0
    r2s = load(res.outputs.out_r2star)[sim.mask & (sim.segmentation == 8)]
    assert 15 < np.median(r2s) < 40  # white matter R2* at 3 T, Hz
    assert load(res.outputs.out_field_sd)[sim.mask].mean() > 0


@pytest.mark.parametrize("method", ["sharp", "vsharp", "resharp", "ismv", "pdf", "lbv"])
def test_every_background_method_runs_through_the_interface(interface_data, tmp_path, method):
    sim = interface_data["sim"]
    res = BackgroundRemoval(
        in_field=str(interface_data["root"] / "total_ppm.nii.gz"),
        in_mask=str(interface_data["root"] / "truemask.nii.gz"),
        method=method,
    ).run(cwd=str(tmp_path))
    local = load(res.outputs.out_field)
    valid = load(res.outputs.out_mask) > 0
    assert valid.any() and not (valid & ~sim.mask).any()
    # every method removes most of the background (3 mm, so loose): correlation with truth
    assert metrics.correlation(local, sim.local_field_ppm, valid) > 0.6


@pytest.mark.parametrize(
    "method", ["tkd", "tsvd", "tikhonov", "ilsqr", "star", "medi", "ndi", "tgv", "tv", "rts"]
)
def test_every_inversion_method_runs_through_the_interface(interface_data, tmp_path, method):
    sim = interface_data["sim"]
    local = tmp_path / "local.nii.gz"
    save_nifti(sim.local_field_ppm, sim.affine, local)
    res = DipoleInversion(
        in_field=str(local), in_mask=str(interface_data["root"] / "truemask.nii.gz"), method=method
    ).run(cwd=str(tmp_path))
    chi = load(res.outputs.out_chi)
    assert np.all(chi[~sim.mask] == 0)
    # every method recovers the susceptibility pattern from the true local field (3 mm: loose)
    assert metrics.correlation(chi, sim.chi_ppm, sim.mask) > 0.6
