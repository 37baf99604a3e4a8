"""A user's own Nipype workflow around qsmflow interfaces (IdentityInterface, DataSink)."""

from __future__ import annotations

import numpy as np
from nipype.interfaces import io as nio
from nipype.interfaces import utility as niu
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

from .conftest import INTERFACE_TES as TES
from .test_interfaces import load


def test_workflow_with_nipype_nodes_around(interface_data, tmp_path):
    """qsmflow interfaces wired with nipype's own IdentityInterface and DataSink."""
    wf = pe.Workflow(name="user_wf", base_dir=str(tmp_path / "work"))
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["phase", "mag", "tes", "b0"]), name="inputnode"
    )
    inputnode.inputs.phase = interface_data["phase"]
    inputnode.inputs.mag = interface_data["mag"]
    inputnode.inputs.tes = TES
    inputnode.inputs.b0 = 3.0
    mask = pe.Node(BrainMask(method="bet"), name="mask")
    unwrap = pe.Node(PhaseUnwrap(method="laplacian"), name="unwrap", n_procs=2)
    fit = pe.Node(EchoCombination(), name="fit")
    bfr = pe.Node(BackgroundRemoval(method="vsharp"), name="bfr", n_procs=2)
    inv = pe.Node(DipoleInversion(method="tkd", field_units="Hz", b0_tesla=3.0), name="inv")
    ref = pe.Node(ReferenceSusceptibility(), name="ref")
    to_hz = pe.Node(niu.IdentityInterface(fields=["field"]), name="passthrough")
    sink = pe.Node(nio.DataSink(base_directory=str(tmp_path / "out")), name="sink")
    wf.connect(
        [
            (inputnode, mask, [("mag", "in_magnitude")]),
            (
                inputnode,
                unwrap,
                [("phase", "in_phase"), ("mag", "in_magnitude"), ("tes", "echo_times")],
            ),
            (unwrap, fit, [("out_unwrapped", "in_phase")]),
            (inputnode, fit, [("mag", "in_magnitude"), ("tes", "echo_times"), ("b0", "b0_tesla")]),
            (mask, fit, [("out_mask", "in_mask")]),
            (fit, bfr, [("out_field_ppm", "in_field")]),
            (mask, bfr, [("out_mask", "in_mask")]),
            (bfr, to_hz, [("out_field", "field")]),
            (to_hz, inv, [("field", "in_field")]),
            (bfr, inv, [("out_mask", "in_mask")]),
            (inv, ref, [("out_chi", "in_chi")]),
            (bfr, ref, [("out_mask", "in_mask")]),
            (ref, sink, [("out_chi", "chi")]),
            (fit, sink, [("out_field", "field")]),
        ]
    )
    # the local field is in ppm; declaring it Hz at 3 T must scale chi by 1/(gamma_bar*3)
    wf.run(plugin="Linear")
    chi_files = sorted((tmp_path / "out" / "chi").glob("*.nii.gz"))
    assert len(chi_files) == 1
    chi = load(chi_files[0])
    sim = interface_data["sim"]
    scale = 1 / (42.57747892 * 3.0)
    corr = metrics.correlation(chi / scale, sim.chi_ppm, sim.mask & (chi != 0))
    assert corr > 0.4  # measured ~0.5 at 3 mm with this simple chain
    field = load(next((tmp_path / "out" / "field").glob("*.nii.gz")))
    assert np.abs(field[sim.mask]).max() > 10  # the fieldmap output is in Hz, not ppm

    # rerunning reuses Nipype's cache: nothing is recomputed
    before = chi_files[0].stat().st_mtime_ns
    node_out = next((tmp_path / "work" / "user_wf" / "inv").glob("*Chimap.nii.gz"))
    t_inv = node_out.stat().st_mtime_ns
    wf.run(plugin="Linear")
    assert node_out.stat().st_mtime_ns == t_inv
    assert chi_files[0].stat().st_mtime_ns >= before
