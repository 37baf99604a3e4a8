"""Benchmark rows of brain masking: BET with the outer CSF removed or at f = 0.7, phase quality.

The ``bet-2mm`` / ``bet-1mm`` rows of run.py run the built-in BET with FSL's defaults (f = 0.5),
which outline the intracranial volume on GRE magnitude: the CSF between brain and skull (3.5 mm
in the simulator, left out of its brain mask) is at ~60 % of the tissue intensity on the first
echo, above BET's local threshold. The rows here run BET (f = 0.5) followed by
:func:`qsmflow.algorithms.masking.remove_outer_csf` (``BrainMask(exclude_csf=True)``), and BET at
f = 0.7, which stops near the brain surface at 2 mm but cuts into the cortex at 1 mm, where the
sulci are resolved; on head model 0 at 3 T / SNR 80 and at 7 T / SNR 20, and the
phase-quality mask (:func:`qsmflow.algorithms.masking.phase_quality_map` of the 4 echoes, then
:func:`~qsmflow.algorithms.masking.phase_quality_mask` with the first-echo magnitude); both
steps are timed together. numba compilation is not timed (``prepare`` warms the kernels up).

Accuracy: Dice with the simulator's true brain mask (and with the intracranial mask for BET);
for masks also ``DGM in`` (percentage of the deep grey matter voxels, labels 1-7, inside the
mask) and ``holes`` (voxels that hole filling would add: 0 for a mask without cavities).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from common import (
    ISO_1MM,
    ISO_2MM,
    MATRIX_1MM,
    MATRIX_2MM,
    Benchmark,
    load,
    save_truth,
    simulated_head,
)

#: Brain masking runs on the magnitude before the phase steps' rows.
ORDER = 15

#: (row suffix, matrix, voxel size mm, part of --quick)
GRIDS = (("2mm", MATRIX_2MM, ISO_2MM, True), ("1mm", MATRIX_1MM, ISO_1MM, False))


def _from_run(name: str) -> Callable[..., Any]:
    """run.py's BET row function ``name``, imported when called (run.py imports this module)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        import run

        return getattr(run, name)(*args, **kwargs)

    return call


bet_setup = _from_run("bet_setup")
bet_prepare = _from_run("bet_prepare")
bet_check = _from_run("bet_check")


def bet_csf_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    """BET with FSL's defaults, then the outer CSF taken out (both timed)."""
    from qsmflow.algorithms.masking import remove_outer_csf

    bet_call = bet_prepare(inputs, n_threads)
    image, vox = inputs["magnitude_echo1"], inputs["voxel_mm"]
    return lambda: remove_outer_csf(image, bet_call(), vox)


def quality_setup(bench: Benchmark, workdir: Path) -> dict:
    head = simulated_head(bench, ("phase", "magnitude", "mask", "segmentation"))
    from qsmflow.simulate import AcquisitionParams

    return {
        "phase": head["phase"],
        "magnitude": head["magnitude"],
        "echo_times_s": AcquisitionParams().echo_times_s,
        "voxel_mm": head["voxel_mm"],
        "truth": save_truth(workdir, mask=head["mask"], segmentation=head["segmentation"]),
    }


def quality_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    import numpy as np

    from qsmflow.algorithms import masking

    rng = np.random.default_rng(0)
    tiny = rng.uniform(-3, 3, (8, 8, 8, 2)).astype(np.float32)
    masking.phase_quality_map(tiny, magnitude=np.ones_like(tiny), echo_times_s=(0.005, 0.01))

    def call() -> Any:
        quality = masking.phase_quality_map(
            inputs["phase"], magnitude=inputs["magnitude"], echo_times_s=inputs["echo_times_s"]
        )
        return masking.phase_quality_mask(
            quality, inputs["voxel_mm"], magnitude=inputs["magnitude"][..., 0]
        )

    return call


def quality_check(bench: Benchmark, inputs: dict, mask: Any) -> str:
    """Dice with the true brain mask, deep grey matter coverage and enclosed holes."""
    import numpy as np
    from scipy import ndimage

    truth = load(inputs["truth"])
    true = truth["mask"]
    dice = 2 * np.count_nonzero(mask & true) / (np.count_nonzero(mask) + np.count_nonzero(true))
    dgm = np.isin(truth["segmentation"], (1, 2, 3, 4, 5, 6, 7))
    covered = 100 * np.count_nonzero(mask & dgm) / np.count_nonzero(dgm)
    holes = np.count_nonzero(ndimage.binary_fill_holes(mask) & ~mask)
    return f"Dice {dice:.3f} vs true mask, DGM in {covered:.2f}%, holes {holes}"


def rows() -> list[Benchmark]:
    out = []
    for suffix, matrix, vox, quick in GRIDS:
        out += [
            Benchmark(
                f"bet-csf-{suffix}",
                "brain extraction (BET + outer CSF removed)",
                matrix,
                vox,
                setup=bet_setup,
                prepare=bet_csf_prepare,
                check=bet_check,
                quick=quick,
            ),
            Benchmark(
                f"bet-csf-7T-snr20-{suffix}",
                "brain extraction (BET + CSF removed, 7 T, SNR 20)",
                matrix,
                vox,
                setup=partial(bet_setup, b0_tesla=7.0, snr=20.0),
                prepare=bet_csf_prepare,
                check=bet_check,
                quick=quick,
            ),
            Benchmark(
                f"bet-f07-{suffix}",
                "brain extraction (BET f=0.7)",
                matrix,
                vox,
                setup=bet_setup,
                prepare=partial(bet_prepare, frac=0.7),
                check=bet_check,
                quick=quick,
            ),
            Benchmark(
                f"bet-f07-7T-snr20-{suffix}",
                "brain extraction (BET f=0.7, 7 T, SNR 20)",
                matrix,
                vox,
                setup=partial(bet_setup, b0_tesla=7.0, snr=20.0),
                prepare=partial(bet_prepare, frac=0.7),
                check=bet_check,
                quick=quick,
            ),
            Benchmark(
                f"phase-quality-mask-{suffix}",
                "brain mask (phase quality)",
                matrix,
                vox,
                setup=quality_setup,
                prepare=quality_prepare,
                check=quality_check,
                quick=quick,
            ),
        ]
    return out
