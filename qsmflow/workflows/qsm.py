"""QSM of one acquisition: mask, unwrap, field fit, background removal, inversion, reference."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces import (
    AverageEchoes,
    BackgroundRemoval,
    BrainMask,
    CoilCombination,
    DipoleInversion,
    EchoCombination,
    EchoFields,
    PhaseUnwrap,
    ReferenceSusceptibility,
    TwoPassCombine,
)

#: Fields of :func:`init_qsm_wf`'s output node.
QSM_OUTPUTS = (
    "chi",
    "mask",
    "local_mask",
    "field_hz",
    "local_field",
    "local_field_hz",
    "r2star",
    "magnitude",
    "unwrapped",
)


def estimate_mem_gb(n_voxels: int, n_echoes: int = 1, *, factor: float = 1.0) -> float:
    """Memory (GB) a node needs: ``factor`` float32 copies of the 4-D data plus 0.3 GB overhead.

    The factors used in :func:`init_qsm_wf` come from the benchmarks' peak-memory column on
    1 mm heads (e.g. TKD on 5.9 M voxels peaks at 0.8 GB: ~22 float32 copies with padding).
    """
    return round(0.3 + factor * n_voxels * max(n_echoes, 1) * 4 / 1e9, 2)


#: Coil-combination methods (``CoilCombination``): MCPC-3D-S for any echo times, ASPIRE for
#: TE2 = 2 TE1 (Eckstein et al. 2018).
COIL_COMBINE_METHODS = ("mcpc3ds", "aspire")


def init_coil_combine_wf(
    *,
    n_voxels: int,
    n_echoes: int,
    n_coils: int,
    method: str = "mcpc3ds",
    use_mask: bool = False,
    n_threads: int = 1,
    name: str = "coil_combine_wf",
) -> pe.Workflow:
    """Combine uncombined receive channels into one magnitude and phase per echo.

    MCPC-3D-S (``method="mcpc3ds"``, any echo times) or ASPIRE (``"aspire"``, needs
    TE2 = 2 TE1): each channel's phase offset is estimated from the first two echoes,
    smoothed and removed before the channels are summed (Eckstein et al., Magn Reson Med
    2018;79:2996-3006).

    Inputs (``inputnode``): ``phase``, ``magnitude`` (one 4-D file (x, y, z, coil) per echo,
    phase in radians), ``echo_times`` (s), ``mask`` (read only with ``use_mask=True``: the
    voxels whose offsets feed the smoothing). Outputs (``outputnode``): ``phase`` (rad) and
    ``magnitude`` (root sum of squares) as lists of 3-D per-echo files.

    Parameters
    ----------
    n_voxels, n_echoes, n_coils : int
        Size of the data, for the node's ``mem_gb``.
    method : {"mcpc3ds", "aspire"}
    use_mask : bool
        Connect ``inputnode.mask`` (e.g. a reused brain mask) to the offset smoothing.
    n_threads : int
        Threads (FFT workers, per-coil loops); the node's ``n_procs``.
    """
    if method not in COIL_COMBINE_METHODS:
        raise ValueError(
            f"coil_combine must be one of {', '.join(COIL_COMBINE_METHODS)}, not {method!r}"
        )
    if n_coils < 1:
        raise ValueError(f"init_coil_combine_wf needs n_coils >= 1, got {n_coils}")
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["phase", "magnitude", "echo_times", "mask"]),
        name="inputnode",
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=["phase", "magnitude"]), name="outputnode")
    # peak: the 5-D magnitude and phase (2 copies of echoes x coils), one file being read, the
    # outputs and slab temporaries; measured 3.3-3.6 copies (2 and 1.5 mm heads, 4 echoes,
    # 8 coils: 0.37 GB above the imports for 0.10 GB of data, 0.78 GB for 0.24 GB)
    combine = pe.Node(
        CoilCombination(method=method, write_stacks=False),
        name="coil_combine",
        n_procs=n_threads,
        mem_gb=estimate_mem_gb(n_voxels, n_echoes * n_coils, factor=3.5),
    )
    wf.connect([
        (inputnode, combine, [("phase", "in_phase"), ("magnitude", "in_magnitude"),
                              ("echo_times", "echo_times")]),
        (combine, outputnode, [("out_phase_echoes", "phase"),
                               ("out_magnitude_echoes", "magnitude")]),
    ])  # fmt: skip
    if use_mask:
        wf.connect(inputnode, "mask", combine, "in_mask")
    return wf


def init_qsm_wf(
    *,
    n_voxels: int,
    n_echoes: int,
    mask_method: str = "phase-quality",
    bet_frac: float = 0.5,
    bet_exclude_csf: bool = True,
    unwrap_method: str = "region-growing",
    unwrap_mode: str = "template",
    combine: str = "fit",
    bfr_method: str = "vsharp",
    inversion_method: str = "tkd",
    two_pass: bool = False,
    existing_mask: bool = False,
    n_coils: int = 0,
    coil_combine: str = "mcpc3ds",
    n_threads: int = 1,
    name: str = "qsm_wf",
) -> pe.Workflow:
    """QSM of one multi-echo acquisition.

    Inputs (``inputnode``): ``phase`` and ``magnitude`` (lists of per-echo NIfTI files, phase in
    radians; with ``n_coils`` > 0 each file is 4-D with the receive coils along the 4th axis),
    ``echo_times`` (s), ``b0_tesla`` (T), ``mask`` (a brain mask to reuse, read only with
    ``existing_mask=True``). Outputs (``outputnode``): ``chi`` (ppm, referenced to the mean
    of the valid mask), ``mask`` (brain), ``local_mask`` (where the local field is valid),
    ``field_hz`` (total field, Hz), ``local_field`` (ppm), ``local_field_hz`` (Hz), ``r2star``
    (Hz), ``magnitude`` (first echo), ``unwrapped`` (phase, rad).

    Parameters
    ----------
    n_voxels, n_echoes : int
        Size of the data, for each node's ``mem_gb``.
    mask_method, bet_frac, bet_exclude_csf : brain masking (``BrainMask``; ``bet_exclude_csf``
        takes the CSF between brain and skull out of a BET mask).
    unwrap_method, unwrap_mode : phase unwrapping (``PhaseUnwrap``).
    combine : {"fit", "echo-average"}
        ``fit``: one total field from a weighted fit over TE, then one background removal and
        one inversion. ``echo-average``: each echo's field (phase offset of the fit removed) gets
        its own background removal and inversion, and the echo-wise chi and local-field maps are
        averaged over the voxels valid in every echo (as done for 9-echo bipolar protocols).
    bfr_method : background removal (``BackgroundRemoval``).
    inversion_method : dipole inversion (``DipoleInversion``).
    two_pass : bool
        Two-pass artefact reduction (Stewart et al. 2022; needs ``mask_method="phase-quality"``
        and ``combine="fit"``): background removal and inversion run once with the filled mask
        and once with the mask of reliable-phase voxels (no hole filling, so veins and other
        unreliable voxels are left out); chi is the reliable pass inside its mask and the
        filled pass elsewhere.
    existing_mask : bool
        Reuse ``inputnode.mask`` (e.g. from a derivatives dataset) instead of computing one.
    n_coils : int
        0 for coil-combined images; N > 0 for uncombined data with N receive channels, which
        :func:`init_coil_combine_wf` combines first (the combined per-echo magnitude and phase
        feed masking, unwrapping and the field fit; ``magnitude`` is the combined first echo).
    coil_combine : {"mcpc3ds", "aspire"}
        Coil combination method (used only with ``n_coils`` > 0): MCPC-3D-S or ASPIRE
        (Eckstein et al. 2018).
    n_threads : int
        Threads per node (FFT workers); the node's ``n_procs``.
    """
    if combine not in ("fit", "echo-average"):
        raise ValueError(f"combine must be 'fit' or 'echo-average', not {combine!r}")
    if coil_combine not in COIL_COMBINE_METHODS:
        raise ValueError(
            f"coil_combine must be one of {', '.join(COIL_COMBINE_METHODS)}, not {coil_combine!r}"
        )
    if two_pass and (mask_method != "phase-quality" or combine != "fit" or existing_mask):
        raise ValueError(
            "two_pass needs mask_method='phase-quality', combine='fit' and a computed mask "
            "(the second pass uses the phase-quality reliable-voxel mask)"
        )
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["phase", "magnitude", "echo_times", "b0_tesla", "mask"]),
        name="inputnode",
    )
    outputnode = pe.Node(niu.IdentityInterface(fields=list(QSM_OUTPUTS)), name="outputnode")
    first_mag = pe.Node(niu.Select(index=[0]), name="first_mag")
    # per-echo magnitude and phase: the inputs, or the coil-combined images of uncombined data
    if n_coils:
        data = init_coil_combine_wf(
            n_voxels=n_voxels,
            n_echoes=n_echoes,
            n_coils=n_coils,
            method=coil_combine,
            use_mask=existing_mask,
            n_threads=n_threads,
        )
        wf.connect([
            (inputnode, data, [("phase", "inputnode.phase"), ("magnitude", "inputnode.magnitude"),
                               ("echo_times", "inputnode.echo_times")]),
        ])  # fmt: skip
        if existing_mask:
            wf.connect(inputnode, "mask", data, "inputnode.mask")
        phase, magnitude = "outputnode.phase", "outputnode.magnitude"
    else:
        data, phase, magnitude = inputnode, "phase", "magnitude"

    def node(iface, node_name, factor, echoes=1, iterfield=None):
        kwargs = {
            "name": node_name,
            "n_procs": n_threads,
            "mem_gb": estimate_mem_gb(n_voxels, echoes, factor=factor),
        }
        if iterfield:
            return pe.MapNode(iface, iterfield=iterfield, **kwargs)
        return pe.Node(iface, **kwargs)

    # factors: peak memory over the float32 data size, from the benchmarks at 1 mm
    if existing_mask:
        brain_mask = pe.Node(niu.IdentityInterface(fields=["out_mask"]), name="brain_mask")
        wf.connect(inputnode, "mask", brain_mask, "out_mask")
    else:
        masker = BrainMask(method=mask_method, frac=bet_frac, exclude_csf=bet_exclude_csf)
        echoes = n_echoes if mask_method == "phase-quality" else 1
        brain_mask = node(masker, "brain_mask", 6, echoes)
        wf.connect(data, magnitude, brain_mask, "in_file")
        if mask_method == "phase-quality":
            wf.connect([
                (data, brain_mask, [(phase, "in_phase")]),
                (inputnode, brain_mask, [("echo_times", "echo_times")]),
            ])  # fmt: skip
    unwrap = node(PhaseUnwrap(method=unwrap_method, mode=unwrap_mode), "unwrap", 8, n_echoes)
    fit = node(EchoCombination(), "fit_field", 4, n_echoes)
    reference = node(ReferenceSusceptibility(), "reference", 3)

    wf.connect([
        (data, first_mag, [(magnitude, "inlist")]),
        (data, unwrap, [(phase, "in_phase"), (magnitude, "in_magnitude")]),
        (inputnode, unwrap, [("echo_times", "echo_times")]),
        (brain_mask, unwrap, [("out_mask", "in_mask")]),
        (unwrap, fit, [("out_unwrapped", "in_phase")]),
        (unwrap, outputnode, [("out_unwrapped", "unwrapped")]),
        (data, fit, [(magnitude, "in_magnitude")]),
        (inputnode, fit, [("echo_times", "echo_times"), ("b0_tesla", "b0_tesla")]),
        (brain_mask, fit, [("out_mask", "in_mask")]),
        (reference, outputnode, [("out_chi", "chi")]),
        (brain_mask, outputnode, [("out_mask", "mask")]),
        (fit, outputnode, [("out_field", "field_hz"), ("out_r2star", "r2star")]),
        (first_mag, outputnode, [("out", "magnitude")]),
    ])  # fmt: skip

    if combine == "fit":
        bfr = node(BackgroundRemoval(method=bfr_method), "background", 10)
        invert = node(DipoleInversion(method=inversion_method), "inversion", 25)
        wf.connect([
            (fit, bfr, [("out_field_ppm", "in_field"), ("out_field_sd", "in_field_sd")]),
            (brain_mask, bfr, [("out_mask", "in_mask")]),
            (inputnode, bfr, [("b0_tesla", "b0_tesla")]),
            (bfr, invert, [("out_field", "in_field"), ("out_mask", "in_mask")]),
            (inputnode, invert, [("b0_tesla", "b0_tesla")]),
            (first_mag, invert, [("out", "in_magnitude")]),
            (bfr, reference, [("out_mask", "in_mask")]),
            (bfr, outputnode, [("out_mask", "local_mask"), ("out_field", "local_field"),
                               ("out_field_hz", "local_field_hz")]),
        ])  # fmt: skip
        if not two_pass:
            wf.connect(invert, "out_chi", reference, "in_chi")
            return wf
        bfr2 = node(BackgroundRemoval(method=bfr_method), "background_reliable", 10)
        invert2 = node(DipoleInversion(method=inversion_method), "inversion_reliable", 25)
        combine_passes = node(TwoPassCombine(), "two_pass", 3)
        wf.connect([
            (fit, bfr2, [("out_field_ppm", "in_field"), ("out_field_sd", "in_field_sd")]),
            (brain_mask, bfr2, [("out_reliable_mask", "in_mask")]),
            (bfr2, invert2, [("out_field", "in_field"), ("out_mask", "in_mask")]),
            (inputnode, invert2, [("b0_tesla", "b0_tesla")]),
            (first_mag, invert2, [("out", "in_magnitude")]),
            (invert, combine_passes, [("out_chi", "in_chi_filled")]),
            (invert2, combine_passes, [("out_chi", "in_chi_reliable")]),
            (bfr, combine_passes, [("out_mask", "in_filled_mask")]),
            (bfr2, combine_passes, [("out_mask", "in_reliable_mask")]),
            (combine_passes, reference, [("out_chi", "in_chi")]),
        ])  # fmt: skip
        return wf

    echo_fields = node(EchoFields(), "echo_fields", 2, n_echoes)
    bfr = node(BackgroundRemoval(method=bfr_method), "background", 10, iterfield=["in_field"])
    invert = node(
        DipoleInversion(method=inversion_method),
        "inversion",
        25,
        iterfield=["in_field", "in_mask"],
    )
    mean_chi = node(AverageEchoes(), "average_chi", 1, n_echoes)
    mean_field = node(AverageEchoes(), "average_local_field", 1, n_echoes)
    mean_field_hz = node(AverageEchoes(), "average_local_field_hz", 1, n_echoes)
    wf.connect([
        (unwrap, echo_fields, [("out_unwrapped", "in_phase")]),
        (inputnode, echo_fields, [("echo_times", "echo_times"), ("b0_tesla", "b0_tesla")]),
        (fit, echo_fields, [("out_phase_offset", "in_phase_offset")]),
        (echo_fields, bfr, [("out_fields", "in_field")]),
        (brain_mask, bfr, [("out_mask", "in_mask")]),
        (inputnode, bfr, [("b0_tesla", "b0_tesla")]),
        (bfr, invert, [("out_field", "in_field"), ("out_mask", "in_mask")]),
        (inputnode, invert, [("b0_tesla", "b0_tesla")]),
        (first_mag, invert, [("out", "in_magnitude")]),
        (invert, mean_chi, [("out_chi", "in_files")]),
        (bfr, mean_chi, [("out_mask", "in_masks")]),
        (bfr, mean_field, [("out_field", "in_files"), ("out_mask", "in_masks")]),
        (bfr, mean_field_hz, [("out_field_hz", "in_files"), ("out_mask", "in_masks")]),
        (mean_chi, reference, [("out_file", "in_chi"), ("out_mask", "in_mask")]),
        (mean_chi, outputnode, [("out_mask", "local_mask")]),
        (mean_field, outputnode, [("out_file", "local_field")]),
        (mean_field_hz, outputnode, [("out_file", "local_field_hz")]),
    ])  # fmt: skip
    return wf
