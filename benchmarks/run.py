"""Speed, peak-memory and accuracy table for qsmflow's steps.

Usage::

    python benchmarks/run.py [--threads N] [--quick] [--only NAME ...] [--list]

Every row runs in three fresh processes (``multiprocessing`` spawn), so no row inherits memory
from another and the measured process holds only the row's inputs:

1. ``setup`` builds the inputs (for example a simulated head) and pickles them to a scratch folder;
2. ``prepare`` (in the measured process) imports what the call needs and returns a zero-argument
   callable; the callable alone is timed with ``time.perf_counter``, and the process's peak
   resident memory (``ru_maxrss``, which includes the interpreter, numpy/scipy and the inputs) is
   read right after it;
3. ``check`` compares the output with a reference and returns the accuracy text.

To add rows for a new step, write a module ``benchmarks/rows_<step>.py`` with ``ORDER`` and
``rows()`` (see :func:`_module_rows`); shared helpers live in ``benchmarks/common.py``. This
orchestrating process imports only the standard library (qsmflow is imported by the children), so
it adds nothing to a child's peak memory.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmark the checkout, installed or not
    sys.path.insert(0, str(REPO_ROOT))
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # row modules import ``common``
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402
    ISO_1MM,
    ISO_2MM,
    MATRIX_1MM,
    MATRIX_2MM,
    MATRIX_PHASE_1MM,
    MATRIX_PHASE_2MM,
    Benchmark,
    dump,
    load,
    save_truth,
    simulated_head,
)

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


# ------------------------------------------------------------------------------ forward model
def forward_setup(bench: Benchmark, workdir: Path) -> dict:
    inputs = simulated_head(bench, ("chi_ppm", "mask"))
    # chi relative to the air around the head (the corner voxel), as the simulator does, so
    # the zero padding outside the volume continues the surrounding medium.
    chi = inputs.pop("chi_ppm")
    inputs["chi"] = chi - chi[-1, -1, -1]
    return inputs


def forward_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.dipole import forward_field

    chi, vox, b0 = inputs["chi"], inputs["voxel_mm"], inputs["b0_dir"]
    return lambda: forward_field(chi, vox, b0, n_threads=n_threads)


def forward_check(bench: Benchmark, inputs: dict, field: Any) -> str:
    """Relative difference to ``qsm_forward.generate_field`` inside the brain mask.

    qsm-forward builds its kernel with an 'xy' meshgrid (voxel sizes and B0 components of axes
    0 and 1 swapped), pads to 2x with the corner value at the far end and sets D(0) = 1/3, so
    the comparison uses isotropic voxels and B0 along axis 2 and removes each field's mean over
    the mask before comparing.
    """
    import numpy as np

    try:
        from qsm_forward.qsm_forward import generate_field
    except ImportError:
        return "qsm-forward not installed"
    vox, b0 = inputs["voxel_mm"], inputs["b0_dir"]
    if len(set(vox)) != 1 or not np.allclose(b0, (0.0, 0.0, 1.0)):
        return "n/a (qsm-forward needs isotropic voxels and B0 along z)"
    mask = inputs["mask"]
    ref = generate_field(inputs["chi"].astype(np.float64), voxel_size=list(vox), B0_dir=list(b0))
    ours = np.asarray(field, dtype=np.float64)[mask]
    ref = ref[mask]
    ours -= ours.mean()
    ref -= ref.mean()
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    return f"rel diff {100 * rel:.2f}% vs qsm-forward"


# ------------------------------------------------------------------------------ simulator
def simulate_setup(bench: Benchmark, workdir: Path) -> dict:
    from qsmflow.simulate import AcquisitionParams

    return {
        "out_dir": workdir / "dataset",
        "params": AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm),
    }


def simulate_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.simulate import simulate_dataset

    out_dir, params = inputs["out_dir"], inputs["params"]
    return lambda: simulate_dataset(out_dir, params=params, n_threads=n_threads)


def _bids_errors(root: Path) -> int | None:
    """Number of errors the BIDS validator reports, or None when no validator is installed."""
    import json

    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = next(
        filter(
            None,
            (shutil.which(name, path=path) for name in ("bids-validator-deno", "bids-validator")),
        ),
        None,
    )
    if exe is None:
        return None
    proc = subprocess.run([exe, str(root), "--json"], capture_output=True, text=True, timeout=600)
    try:
        issues = json.loads(proc.stdout)["issues"]
    except (ValueError, KeyError):
        return max(1, proc.returncode)
    if isinstance(issues.get("issues"), list):  # bids-validator 2.x / deno
        return sum(i.get("severity") == "error" for i in issues["issues"])
    return len(issues.get("errors", []))  # legacy node validator


def simulate_check(bench: Benchmark, inputs: dict, root: Any) -> str:
    """BIDS validity and the first-echo SNR in the brain measured against the requested SNR.

    Air (phantom label AIR) has no signal, so its magnitude is Rayleigh noise with
    ``E[M^2] = 2 sigma^2``, sigma being the standard deviation of the real and imaginary channels
    (which is also the magnitude's noise standard deviation where there is signal).
    """
    import nibabel as nib
    import numpy as np

    from qsmflow.phantom import AIR

    root = Path(root)
    params = inputs["params"]
    n_raw = len(list((root / "sub-01" / "anat").glob("*_MEGRE.nii.gz")))
    if n_raw != 2 * len(params.echo_times_s):
        return f"BIDS: {n_raw} MEGRE images, expected {2 * len(params.echo_times_s)}"
    errors = _bids_errors(root)
    if errors is None:
        bids = "BIDS not validated"
    else:
        bids = "BIDS ok" if errors == 0 else f"BIDS {errors} errors"

    gt = root / "derivatives" / "qsmflow-simulate" / "sub-01" / "anat"
    mag = np.asanyarray(nib.load(root / "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz").dataobj)
    brain = np.asanyarray(nib.load(gt / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    air = np.asanyarray(nib.load(gt / "sub-01_desc-phantom_dseg.nii.gz").dataobj) == AIR
    sigma = np.sqrt(np.mean(mag[air].astype(np.float64) ** 2) / 2)
    snr = mag[brain].mean() / sigma
    return f"{bids}, SNR {snr:.1f} (asked {params.snr:g})"


# ------------------------------------------------------------------------------ brain extraction
def bet_setup(bench: Benchmark, workdir: Path, **params: Any) -> dict:
    head = simulated_head(bench, ("magnitude", "mask", "segmentation"), **params)
    return {
        "magnitude_echo1": head["magnitude"][..., 0].copy(),
        "voxel_mm": head["voxel_mm"],
        "truth": save_truth(workdir, mask=head["mask"], segmentation=head["segmentation"]),
    }


def _warm_up_bet() -> None:
    """Compile (or load from numba's cache) the BET kernel on a tiny ball, untimed."""
    import numpy as np

    from qsmflow.algorithms.bet import bet

    r = np.linalg.norm(np.indices((24, 24, 24)) - 11.5, axis=0)
    bet(np.where(r < 8, 1.0, 0.0).astype(np.float32), (2.0, 2.0, 2.0), n_iterations=2)


def bet_prepare(inputs: dict, n_threads: int, **options: Any) -> Callable[[], Any]:
    from qsmflow.algorithms.bet import bet

    _warm_up_bet()
    image, vox = inputs["magnitude_echo1"], inputs["voxel_mm"]
    return lambda: bet(image, vox, **options)


def intracranial_mask(mask: Any, segmentation: Any) -> Any:
    """The brain mask plus the CSF and veins between brain and skull: one filled piece."""
    import numpy as np
    from scipy import ndimage

    inside = ndimage.binary_fill_holes(mask | np.isin(segmentation, (10, 11)))
    labels, _ = ndimage.label(inside)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def bet_check(bench: Benchmark, inputs: dict, mask: Any) -> str:
    """Dice with the true brain mask and with the intracranial mask (brain + outer CSF)."""
    import numpy as np

    truth = load(inputs["truth"])
    true = truth["mask"]
    cranial = intracranial_mask(true, truth["segmentation"])

    def dice(a: Any, b: Any) -> float:
        return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))

    return f"Dice {dice(mask, true):.3f} vs true mask ({dice(mask, cranial):.3f} intracranial)"


# ------------------------------------------------------------------------------ unwrapping + fit
#: V-SHARP radii of the unwrapping rows' check: the error the unwrapping leaves is judged after
#: the background-field removal that would follow it.
UNWRAP_CHECK_RADII_MM = (10.0, 6.0)


def unwrap_setup(bench: Benchmark, workdir: Path) -> dict:
    fields = ("magnitude", "phase", "mask", "params")
    truth = ("total_field_ppm", "local_field_ppm", "phase_offset_rad")
    head = simulated_head(bench, fields + truth)
    params = head.pop("params")
    head.update(echo_times_s=tuple(params.echo_times_s), b0_tesla=params.b0_tesla)
    head["truth"] = save_truth(workdir, **{name: head.pop(name) for name in truth})
    return head


def _fit(phase: Any, inputs: dict) -> Any:
    from qsmflow.algorithms.echoes import fit_field

    fit = fit_field(
        phase,
        inputs["magnitude"],
        inputs["echo_times_s"],
        b0_tesla=inputs["b0_tesla"],
        mask=inputs["mask"],
        weighting="mag2",
    )
    return fit.field_ppm


def unwrap_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.unwrap import laplacian_unwrap_echo_differences

    phase, vox = inputs["phase"], inputs["voxel_mm"]
    return lambda: _fit(laplacian_unwrap_echo_differences(phase, vox, n_threads=n_threads), inputs)


def _noise_free_phase(truth: dict, echo_times_s: Sequence[float], b0_tesla: float) -> Any:
    """The simulator's phase without noise and unwrapped, (x, y, z, echo) float32.

    ``phase_offset + 2 pi gamma_bar B0 TE total_field`` from the ground truth's
    ``phase_offset_rad`` (x, y, z) and ``total_field_ppm``.
    """
    import numpy as np

    from qsmflow import GAMMA_BAR_MHZ_PER_T

    rad_per_ppm = np.float32(2 * np.pi * GAMMA_BAR_MHZ_PER_T * b0_tesla)
    tes = np.asarray(echo_times_s, dtype=np.float32)
    return truth["phase_offset_rad"][..., None] + rad_per_ppm * (
        truth["total_field_ppm"][..., None] * tes
    )


def _nearest_branch(wrapped: Any, reference: Any) -> Any:
    """``wrapped`` plus the multiples of 2 pi that bring it closest to ``reference``.

    With ``reference`` the noise-free unwrapped phase, this is the measured (noisy) phase
    unwrapped perfectly: what an ideal unwrapper would return.
    """
    import numpy as np

    two_pi = np.float32(2 * np.pi)
    return wrapped + two_pi * np.round((reference - wrapped) / two_pi)


def unwrap_check(bench: Benchmark, inputs: dict, field_ppm: Any) -> str:
    """Local-field NRMSE after V-SHARP of the fitted field, and of a perfectly unwrapped one.

    Laplacian unwrapping is exact only up to a harmonic error, which background removal takes
    away, so the fitted total field itself is no fair measure; the local field V-SHARP (radii
    :data:`UNWRAP_CHECK_RADII_MM`, true brain mask) leaves is. The reference repeats the fit on
    the measured phase unwrapped perfectly, with the 2 pi multiples of the noise-free phase
    ``phase_offset + 2 pi gamma_bar B0 TE total_field``: what V-SHARP and noise alone leave.
    """
    from qsmflow.algorithms.background import vsharp
    from qsmflow.algorithms.metrics import nrmse_demeaned

    truth = load(inputs["truth"])
    mask, vox = inputs["mask"], inputs["voxel_mm"]

    def local_nrmse(field: Any) -> float:
        local, kept = vsharp(field, mask, vox, radii_mm=UNWRAP_CHECK_RADII_MM)
        return nrmse_demeaned(local, truth["local_field_ppm"], kept)

    noise_free = _noise_free_phase(truth, inputs["echo_times_s"], inputs["b0_tesla"])
    ideal = _nearest_branch(inputs["phase"], noise_free)
    return (
        f"local NRMSE {local_nrmse(field_ppm):.1f}% after V-SHARP "
        f"(ideal unwrap {local_nrmse(_fit(ideal, inputs)):.1f}%)"
    )


# ------------------------------------------------------------------------------ phase processing
# Rows of the phase steps one at a time (issue targets at 200 x 200 x 160, 1 mm, 4 echoes, 2
# cores: Laplacian unwrapping < 2 s, region growing < 10 s per echo, field fit < 5 s,
# MCPC-3D-S with 8 coils < 30 s). Inputs: the simulated head at SNR 80 (the default), coil-
# combined except for MCPC-3D-S. "Exact" compares with the measured phase unwrapped perfectly
# (:func:`_nearest_branch` of the noise-free phase).
_PHASE_TRUTH = ("total_field_ppm", "phase_offset_rad")


def _phase_head(bench: Benchmark, fields: Sequence[str], **params: Any) -> dict:
    """:func:`simulated_head` with ``params`` split into ``echo_times_s`` and ``b0_tesla``."""
    head = simulated_head(bench, (*fields, "params"), **params)
    acq = head.pop("params")
    head.update(echo_times_s=tuple(acq.echo_times_s), b0_tesla=acq.b0_tesla)
    return head


def _exact(unwrapped: Any, noise_free: Any, mask: Any) -> tuple[float, int, int]:
    """Brain voxels unwrapped exactly (percent), the others (count) and the global 2 pi offset.

    ``unwrapped`` differs from the measured phase by multiples of 2 pi (congruent unwrappers);
    a voxel is exact when it lies on the branch nearest the noise-free phase plus the 2 pi
    multiple most brain voxels share (the global offset, which no unwrapper can know).
    """
    import numpy as np

    turns = np.round((unwrapped[mask] - noise_free[mask]) / np.float32(2 * np.pi)).astype(np.int64)
    values, counts = np.unique(turns, return_counts=True)
    best = int(np.argmax(counts))
    return 100.0 * counts[best] / turns.size, int(turns.size - counts[best]), int(values[best])


def _warm_up_region_growing(n_echo: int = 0) -> None:
    """Compile (or load from numba's cache) the region-growing kernels on a tiny volume."""
    import numpy as np

    from qsmflow.algorithms.unwrap import region_growing_unwrap, unwrap_multi_echo

    rng = np.random.default_rng(0)
    shape = (8, 8, 8, max(n_echo, 1))
    phase = rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
    mag = np.ones(shape, dtype=np.float32)
    mask = np.ones(shape[:3], dtype=bool)
    if n_echo:
        tes = [0.005 * (e + 1) for e in range(n_echo)]
        unwrap_multi_echo(phase, ISO_1MM, tes, magnitude=mag, mask=mask)
    else:
        region_growing_unwrap(phase[..., 0], ISO_1MM, magnitude=mag[..., 0], mask=mask)


def laplacian_unwrap_setup(bench: Benchmark, workdir: Path) -> dict:
    head = _phase_head(bench, ("phase", "mask", "local_field_ppm", *_PHASE_TRUTH))
    phase = head.pop("phase")[..., 0].copy()
    truth = {name: head.pop(name) for name in ("mask", "local_field_ppm", *_PHASE_TRUTH)}
    noise_free = _noise_free_phase(truth, head["echo_times_s"][:1], head["b0_tesla"])[..., 0]
    truth["ideal"] = _nearest_branch(phase, noise_free)
    del truth["phase_offset_rad"], truth["total_field_ppm"]
    head.update(phase_echo1=phase, truth=save_truth(workdir, **truth))
    return head


def laplacian_unwrap_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.unwrap import laplacian_unwrap

    phase, vox = inputs["phase_echo1"], inputs["voxel_mm"]
    return lambda: laplacian_unwrap(phase, vox, n_threads=n_threads)


def laplacian_unwrap_check(bench: Benchmark, inputs: dict, unwrapped: Any) -> str:
    """Non-harmonic part of the unwrapping error, relative to the true local field.

    The error ``unwrapped - ideal`` (ideal: the measured first echo unwrapped perfectly),
    converted to ppm, goes through V-SHARP (radii :data:`UNWRAP_CHECK_RADII_MM`, true brain
    mask); V-SHARP is linear, so what it leaves is exactly the error this unwrapping adds to the
    local field. Reported as the norm of that residual over the norm of the true local field
    (both demeaned) in V-SHARP's eroded mask; "before" is the same ratio for the raw error in
    the whole mask (mostly harmonic, which V-SHARP removes).
    """
    import numpy as np

    from qsmflow import GAMMA_BAR_MHZ_PER_T
    from qsmflow.algorithms.background import vsharp

    truth = load(inputs["truth"])
    mask = truth["mask"]
    rad_per_ppm = 2 * np.pi * GAMMA_BAR_MHZ_PER_T * inputs["b0_tesla"] * inputs["echo_times_s"][0]
    error_ppm = (unwrapped - truth["ideal"]) / np.float32(rad_per_ppm)
    local_error, kept = vsharp(
        error_ppm,
        mask,
        inputs["voxel_mm"],
        radii_mm=UNWRAP_CHECK_RADII_MM,
        n_threads=os.cpu_count() or 1,
    )

    def ratio(error: Any, region: Any) -> float:
        e = error[region].astype(np.float64)
        t = truth["local_field_ppm"][region].astype(np.float64)
        return 100 * np.linalg.norm(e - e.mean()) / np.linalg.norm(t - t.mean())

    return (
        f"non-harmonic error {ratio(local_error, kept):.1f}% of local field after V-SHARP "
        f"({ratio(error_ppm, mask):.0f}% before)"
    )


def region_growing_setup(bench: Benchmark, workdir: Path) -> dict:
    head = _phase_head(bench, ("magnitude", "phase", "mask", *_PHASE_TRUTH))
    truth = {name: head.pop(name) for name in _PHASE_TRUTH}
    noise_free = _noise_free_phase(truth, head["echo_times_s"][:1], head["b0_tesla"])[..., 0]
    head["phase_echo1"] = head.pop("phase")[..., 0].copy()
    head["magnitude_echo1"] = head.pop("magnitude")[..., 0].copy()
    head["truth"] = save_truth(workdir, noise_free=noise_free)
    return head


def region_growing_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.unwrap import region_growing_unwrap

    _warm_up_region_growing()  # numba compilation is not timed
    phase, mag, mask = inputs["phase_echo1"], inputs["magnitude_echo1"], inputs["mask"]
    vox = inputs["voxel_mm"]
    return lambda: region_growing_unwrap(phase, vox, magnitude=mag, mask=mask)


def region_growing_check(bench: Benchmark, inputs: dict, unwrapped: Any) -> str:
    """Percentage of brain voxels unwrapped exactly (see :func:`_exact`)."""
    noise_free = load(inputs["truth"])["noise_free"]
    exact, wrong, _ = _exact(unwrapped, noise_free, inputs["mask"])
    return f"{exact:.3f}% of brain voxels exact ({wrong} wrong)"


def multi_echo_unwrap_setup(bench: Benchmark, workdir: Path) -> dict:
    head = _phase_head(bench, ("magnitude", "phase", "mask", *_PHASE_TRUTH))
    head["truth"] = save_truth(workdir, **{name: head.pop(name) for name in _PHASE_TRUTH})
    return head


def multi_echo_unwrap_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.unwrap import unwrap_multi_echo

    phase, mag, mask = inputs["phase"], inputs["magnitude"], inputs["mask"]
    vox, tes = inputs["voxel_mm"], inputs["echo_times_s"]
    _warm_up_region_growing(len(tes))  # numba compilation is not timed
    return lambda: unwrap_multi_echo(
        phase,
        vox,
        tes,
        magnitude=mag,
        mask=mask,
        method="region-growing",
        mode="template",
        n_threads=n_threads,
    )


def multi_echo_unwrap_check(bench: Benchmark, inputs: dict, unwrapped: Any) -> str:
    """Lowest percentage over the echoes of exact brain voxels, and whether the echoes agree.

    Each echo is scored with :func:`_exact`; for a field fit the echoes must also share
    one global 2 pi offset ("one branch"), which the per-echo scores alone do not show.
    """
    noise_free = _noise_free_phase(
        load(inputs["truth"]), inputs["echo_times_s"], inputs["b0_tesla"]
    )
    scores = [
        _exact(unwrapped[..., e], noise_free[..., e], inputs["mask"])
        for e in range(unwrapped.shape[3])
    ]
    worst = min(range(len(scores)), key=lambda e: scores[e][0])
    branch = "one branch" if len({k for *_, k in scores}) == 1 else "echoes on different branches"
    exact, wrong, _ = scores[worst]
    return f"min {exact:.3f}% of brain voxels exact (echo {worst + 1}: {wrong} wrong), {branch}"


def field_fit_setup(bench: Benchmark, workdir: Path) -> dict:
    head = _phase_head(bench, ("magnitude", "phase", "mask", *_PHASE_TRUTH))
    truth = {name: head.pop(name) for name in _PHASE_TRUTH}
    noise_free = _noise_free_phase(truth, head["echo_times_s"], head["b0_tesla"])
    head["unwrapped"] = _nearest_branch(head.pop("phase"), noise_free)
    head["truth"] = save_truth(workdir, total_field_ppm=truth["total_field_ppm"])
    return head


def field_fit_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.echoes import fit_field

    phase, mag, mask = inputs["unwrapped"], inputs["magnitude"], inputs["mask"]
    tes, b0 = inputs["echo_times_s"], inputs["b0_tesla"]
    return lambda: fit_field(phase, mag, tes, b0_tesla=b0, mask=mask).field_ppm


def field_fit_check(bench: Benchmark, inputs: dict, field_ppm: Any) -> str:
    """Plain NRMSE of the fitted field against the true total field in the brain mask."""
    from qsmflow.algorithms.metrics import nrmse

    true = load(inputs["truth"])["total_field_ppm"]
    return f"field NRMSE {nrmse(field_ppm, true, inputs['mask']):.2f}% (oracle unwrap)"


#: Receive channels of the MCPC-3D-S rows.
MCPC_COILS = 8


def mcpc3ds_setup(bench: Benchmark, workdir: Path) -> dict:
    import numpy as np

    fields = ("magnitude", "phase", "mask", "total_field_ppm", "phase_offset_rad")
    head = _phase_head(bench, (*fields, "coil_sensitivity"), n_coils=MCPC_COILS)
    sens = head.pop("coil_sensitivity")
    head["truth"] = save_truth(
        workdir,
        mask=head.pop("mask"),
        total_field_ppm=head.pop("total_field_ppm"),
        coil_offsets_rad=head.pop("phase_offset_rad"),  # (x, y, z, coil)
        coil_weights=np.square(np.abs(sens)),
    )
    return head


def mcpc3ds_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.echoes import mcpc3ds

    mag, phase = inputs["magnitude"], inputs["phase"]
    tes, vox = inputs["echo_times_s"], inputs["voxel_mm"]
    return lambda: mcpc3ds(mag, phase, tes, vox, n_threads=n_threads)


def mcpc3ds_check(bench: Benchmark, inputs: dict, combined: Any) -> str:
    """Field NRMSE from the combined phase, unwrapped perfectly, against the true total field.

    Without noise the combined phase would be ``r + 2 pi gamma_bar B0 TE total_field`` with
    ``r = angle(sum_c |s_c|^2 exp(i (theta_c - theta_c_est)))``: the channels' true offsets
    ``theta_c`` (simulator) minus the smoothed estimates, weighted like the combination
    (channel magnitude squared, proportional to the squared sensitivity ``|s_c|^2``). The
    combined phase is put on the branch nearest that, fitted with :func:`fit_field` (its
    intercept absorbs ``r``) in the true brain mask and compared with the true total field.
    """
    import numpy as np

    from qsmflow.algorithms.echoes import fit_field
    from qsmflow.algorithms.metrics import nrmse

    truth = load(inputs["truth"])
    residual = np.zeros(truth["total_field_ppm"].shape, dtype=np.complex64)
    for c in range(truth["coil_offsets_rad"].shape[3]):
        diff = truth["coil_offsets_rad"][..., c] - combined.phase_offsets_rad[..., c]
        residual += truth["coil_weights"][..., c] * np.exp(1j * diff)
    truth["phase_offset_rad"] = np.angle(residual).astype(np.float32)
    del residual
    noise_free = _noise_free_phase(truth, inputs["echo_times_s"], inputs["b0_tesla"])
    unwrapped = _nearest_branch(combined.phase_rad, noise_free)
    del noise_free
    fit = fit_field(
        unwrapped,
        combined.magnitude,
        inputs["echo_times_s"],
        b0_tesla=inputs["b0_tesla"],
        mask=truth["mask"],
    )
    error = nrmse(fit.field_ppm, truth["total_field_ppm"], truth["mask"])
    return f"field NRMSE {error:.2f}% (oracle unwrap of the combined phase)"


# ------------------------------------------------------------------------------ background removal
def vsharp_setup(bench: Benchmark, workdir: Path) -> dict:
    head = simulated_head(bench, ("total_field_ppm", "mask", "local_field_ppm"))
    head["truth"] = save_truth(workdir, local_field_ppm=head.pop("local_field_ppm"))
    return head


def vsharp_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.background import vsharp

    field, mask, vox = inputs["total_field_ppm"], inputs["mask"], inputs["voxel_mm"]
    return lambda: vsharp(field, mask, vox, n_threads=n_threads)


def vsharp_check(bench: Benchmark, inputs: dict, output: Any) -> str:
    """Demeaned NRMSE of the local field in V-SHARP's eroded mask, and how much mask it kept."""
    from qsmflow.algorithms.metrics import nrmse_demeaned

    local, kept = output
    error = nrmse_demeaned(local, load(inputs["truth"])["local_field_ppm"], kept)
    kept_percent = 100 * kept.sum() / inputs["mask"].sum()
    return f"local NRMSE {error:.1f}% (mask kept {kept_percent:.1f}%)"


# ------------------------------------------------------------------------------ dipole inversion
def tkd_setup(bench: Benchmark, workdir: Path) -> dict:
    head = simulated_head(bench, ("local_field_ppm", "mask", "chi_ppm"))
    head["truth"] = save_truth(workdir, chi_ppm=head.pop("chi_ppm"))
    return head


def tkd_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.inversion import tkd

    field, mask = inputs["local_field_ppm"], inputs["mask"]
    vox, b0 = inputs["voxel_mm"], inputs["b0_dir"]
    return lambda: tkd(field, mask, vox, b0, n_threads=n_threads)


def tkd_check(bench: Benchmark, inputs: dict, chi: Any) -> str:
    """Demeaned NRMSE and XSIM of chi in the true brain mask, from the true local field.

    TKD's mean is arbitrary, so for XSIM (which compares values as they are) the map is first
    shifted to the true chi's mean over the mask.
    """
    from qsmflow.algorithms.metrics import nrmse_demeaned, xsim

    mask = inputs["mask"]
    true = load(inputs["truth"])["chi_ppm"]
    shifted = (chi + (true[mask].mean() - chi[mask].mean())) * mask
    return f"chi NRMSE {nrmse_demeaned(chi, true, mask):.1f}%, XSIM {xsim(shifted, true, mask):.3f}"


# ------------------------------------------------------------------------------ registry
def _rows() -> tuple[Benchmark, ...]:
    forward = {"setup": forward_setup, "prepare": forward_prepare, "check": forward_check}
    simulate = {"setup": simulate_setup, "prepare": simulate_prepare, "check": simulate_check}
    bet = {"setup": bet_setup, "prepare": bet_prepare, "check": bet_check}
    unwrap = {"setup": unwrap_setup, "prepare": unwrap_prepare, "check": unwrap_check}
    lap = {
        "setup": laplacian_unwrap_setup,
        "prepare": laplacian_unwrap_prepare,
        "check": laplacian_unwrap_check,
    }
    rg = {
        "setup": region_growing_setup,
        "prepare": region_growing_prepare,
        "check": region_growing_check,
    }
    multi = {
        "setup": multi_echo_unwrap_setup,
        "prepare": multi_echo_unwrap_prepare,
        "check": multi_echo_unwrap_check,
    }
    fit = {"setup": field_fit_setup, "prepare": field_fit_prepare, "check": field_fit_check}
    mcpc = {"setup": mcpc3ds_setup, "prepare": mcpc3ds_prepare, "check": mcpc3ds_check}
    phase_rows = (
        ("mcpc3ds", "MCPC-3D-S (8 coils, 4 echoes)", mcpc),
        ("laplacian-unwrap", "Laplacian unwrap (1 echo)", lap),
        ("region-growing", "region growing (1 echo)", rg),
        ("multi-echo-unwrap", "region growing, 4-echo template", multi),
        ("field-fit", "field fit (4 echoes)", fit),
    )
    vsharp = {"setup": vsharp_setup, "prepare": vsharp_prepare, "check": vsharp_check}
    tkd = {"setup": tkd_setup, "prepare": tkd_prepare, "check": tkd_check}
    return (
        Benchmark("forward-2mm", "forward model", MATRIX_2MM, ISO_2MM, **forward, quick=True),
        Benchmark("forward-1mm", "forward model", MATRIX_1MM, ISO_1MM, **forward),
        Benchmark(
            "simulate-2mm",
            "simulator (1 subject, 4 echoes)",
            MATRIX_2MM,
            ISO_2MM,
            **simulate,
            quick=True,
        ),
        Benchmark(
            "simulate-1mm", "simulator (1 subject, 4 echoes)", MATRIX_1MM, ISO_1MM, **simulate
        ),
        Benchmark("bet-2mm", "brain extraction (BET)", MATRIX_2MM, ISO_2MM, **bet, quick=True),
        Benchmark("bet-1mm", "brain extraction (BET)", MATRIX_1MM, ISO_1MM, **bet),
        *(
            Benchmark(f"{name}-{size}", step, matrix, vox, **funcs, quick=quick)
            for name, step, funcs in phase_rows
            for size, matrix, vox, quick in (
                ("2mm", MATRIX_PHASE_2MM, ISO_2MM, True),
                ("1mm", MATRIX_PHASE_1MM, ISO_1MM, False),
            )
        ),
        Benchmark(
            "unwrap-2mm", "unwrap + field fit (4 echoes)", MATRIX_2MM, ISO_2MM, **unwrap, quick=True
        ),
        Benchmark("unwrap-1mm", "unwrap + field fit (4 echoes)", MATRIX_1MM, ISO_1MM, **unwrap),
        Benchmark(
            "vsharp-2mm", "background removal (V-SHARP)", MATRIX_2MM, ISO_2MM, **vsharp, quick=True
        ),
        Benchmark("vsharp-1mm", "background removal (V-SHARP)", MATRIX_1MM, ISO_1MM, **vsharp),
        Benchmark("tkd-2mm", "dipole inversion (TKD)", MATRIX_2MM, ISO_2MM, **tkd, quick=True),
        Benchmark("tkd-1mm", "dipole inversion (TKD)", MATRIX_1MM, ISO_1MM, **tkd),
    )


def _module_rows() -> list[Benchmark]:
    """Rows of the ``benchmarks/rows_*.py`` modules, ordered by each module's ``ORDER``.

    A row module defines ``ORDER`` (an int placing it in pipeline order; the rows above are at
    0-49) and ``rows() -> list[Benchmark]``, importing its helpers from ``common``.
    """
    import importlib

    modules = [importlib.import_module(f.stem) for f in sorted(BENCH_DIR.glob("rows_*.py"))]
    modules.sort(key=lambda m: m.ORDER)
    return [row for m in modules for row in m.rows()]


#: Every row, in table order (pipeline order). New steps add a ``rows_<step>.py`` module.
ROWS: tuple[Benchmark, ...] = (*_rows(), *_module_rows())
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in ROWS}
assert len(BENCHMARKS) == len(ROWS), "benchmark names must be unique"


# ------------------------------------------------------------------------------ child processes
def _peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _child_setup(name: str, workdir: Path) -> None:
    dump(BENCHMARKS[name].setup(BENCHMARKS[name], workdir), workdir / "inputs.pkl")


def _child_measure(name: str, workdir: Path, n_threads: int) -> tuple[float, float]:
    call = BENCHMARKS[name].prepare(load(workdir / "inputs.pkl"), n_threads)
    t0 = time.perf_counter()
    output = call()
    seconds = time.perf_counter() - t0
    peak_gb = _peak_rss_gb()
    dump(output, workdir / "output.pkl")
    return seconds, peak_gb


def _child_check(name: str, workdir: Path) -> str:
    bench = BENCHMARKS[name]
    return bench.check(bench, load(workdir / "inputs.pkl"), load(workdir / "output.pkl"))


def _in_fresh_process(func: Callable, *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(func, *args).result()


@dataclass
class Result:
    bench: Benchmark
    seconds: float | None = None
    peak_gb: float | None = None
    accuracy: str = ""
    failed: bool = False


def run_benchmark(bench: Benchmark, n_threads: int, scratch: Path | None = None) -> Result:
    """Run one row (setup, measured call, check), each in a fresh spawned process."""
    result = Result(bench)
    with tempfile.TemporaryDirectory(prefix=f"qsmflow-bench-{bench.name}-", dir=scratch) as tmp:
        workdir = Path(tmp)
        phase = "setup"
        try:
            _in_fresh_process(_child_setup, bench.name, workdir)
            phase = "call"
            result.seconds, result.peak_gb = _in_fresh_process(
                _child_measure, bench.name, workdir, n_threads
            )
            phase = "check"
            result.accuracy = _in_fresh_process(_child_check, bench.name, workdir)
        except Exception as exc:  # a failed row is reported, the others still run
            result.failed = True
            result.accuracy = f"{phase} failed: {type(exc).__name__}: {exc}".splitlines()[0]
            traceback.print_exc(file=sys.stderr)
    return result


# ------------------------------------------------------------------------------ table
COLUMNS = ("step", "matrix", "voxel (mm)", "seconds", "peak GB", "accuracy")
_WIDTHS = (32, 11, 10, 8, 7)


def _cells(r: Result) -> tuple[str, ...]:
    b = r.bench
    vox = [f"{v:g}" for v in b.voxel_mm]
    return (
        b.step,
        "x".join(str(n) for n in b.matrix),
        vox[0] if len(set(vox)) == 1 else "x".join(vox),
        "-" if r.seconds is None else f"{r.seconds:.2f}",
        "-" if r.peak_gb is None else f"{r.peak_gb:.2f}",
        r.accuracy,
    )


def _line(cells: Sequence[str]) -> str:
    n = len(_WIDTHS)
    padded = [c.ljust(w) for c, w in zip(cells[:n], _WIDTHS, strict=True)] + list(cells[n:])
    return "| " + " | ".join(padded) + " |"


def select(patterns: Sequence[str] | None, quick: bool) -> list[Benchmark]:
    """Rows matching any pattern (exact name, ``<step>`` prefix, or glob) and ``--quick``."""
    rows = [b for b in ROWS if b.quick or not quick]
    if not patterns:
        return rows

    def match(name: str, pat: str) -> bool:
        return name == pat or name.startswith(pat + "-") or fnmatch.fnmatchcase(name, pat)

    unknown = [p for p in patterns if not any(match(b.name, p) for b in ROWS)]
    if unknown:
        raise SystemExit(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return [b for b in rows if any(match(b.name, p) for p in patterns)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads per step (default 2)")
    parser.add_argument("--quick", action="store_true", help="only the 2 mm rows")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="rows to run: a name, a step prefix (forward) or a glob; repeatable "
        "or comma-separated (see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--scratch", type=Path, help="folder for temporary files (default: TMPDIR)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.list:
        for b in ROWS:
            print(f"{b.name:22s} {b.step} {'x'.join(map(str, b.matrix))}{' (quick)' * b.quick}")
        return 0
    patterns = [p for item in args.only or [] for p in item.split(",") if p]
    rows = select(patterns, args.quick)
    for var in _THREAD_ENV:  # inherited by the spawned children
        os.environ[var] = str(args.threads)

    from qsmflow import __version__

    print(
        f"qsmflow {__version__}, Python {platform.python_version()}, {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, --threads {args.threads}"
    )
    print(_line(COLUMNS))
    print(_line(["-" * w for w in _WIDTHS] + ["-" * len(COLUMNS[-1])]))
    failed = False
    for bench in rows:
        result = run_benchmark(bench, args.threads, args.scratch)
        failed |= result.failed
        print(_line(_cells(result)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
