"""Benchmark rows of the deep-learning inversions (issue 11): MoDL-QSM, SpiNet-QSM, DIP, training.

Inputs and accuracy as in ``rows_inversion.py`` (head model 0, never used in training, with the
noise of a multi-echo fit at SNR 100; demeaned NRMSE beside TKD's, deep-grey-matter slope).
MoDL and SpiNet run with the weights shipped in ``qsmflow/data/weights``; DIP with its CPU
default (300 Adam iterations, early stopping; 2 mm only: a 160^3 fit takes tens of minutes on
a CPU). Targets (issue 11): CPU inference at 160^3 under
60 s for MoDL/SpiNet. The training row times one epoch of ``qsmflow-train`` at the shipped
settings (25 steps, batch 2, 32^3 patches, K = 4, 8 CG iterations) on one 2 mm subject. On a
GPU machine the same rows run on the GPU (``device='auto'``); the table's host column says
which. Need PyTorch (``pip install 'qsmflow[dl]'``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ISO_2MM, MATRIX_2MM, Benchmark
from rows_inversion import check, setup, timed_inversion

#: after the classical inversions (60)
ORDER = 65

#: function in qsmflow.algorithms.inversion -> (name in the table, target s at 160^3 or None)
METHODS: dict[str, tuple[str, float | None]] = {
    "modl": ("MoDL-QSM", 60.0),
    "spinet": ("SpiNet-QSM", 60.0),
    "dip": ("DIP, 300 it.", None),
}

GRIDS = (
    ("2mm", MATRIX_2MM, ISO_2MM, True),
    ("160", (160, 160, 160), (1.1, 1.1, 1.1), False),
)

#: training settings of the shipped weights
TRAIN = {"steps": 25, "batch": 2, "patch": 32}


def _setup_train(bench: Benchmark, workdir: Path) -> dict:
    from qsmflow.dl.train import make_training_subject

    return {"subject": make_training_subject(101, bench.voxel_mm)}


def _prepare_train(inputs: dict, n_threads: int) -> Callable[[], Any]:
    import numpy as np
    import torch

    from qsmflow.dl.models import build_model
    from qsmflow.dl.train import relative_error, sample_batch

    torch.set_num_threads(n_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = {"channels": 16, "layers": 5, "iterations": 4, "cg_iter": 8, "lam": 0.05}
    model = build_model("modl", config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def call() -> tuple[float, float, str]:
        cpu0 = time.process_time()
        for _ in range(TRAIN["steps"]):
            field, op, chi, mask = sample_batch(
                inputs["subject"], rng, batch=TRAIN["batch"], patch=TRAIN["patch"],
                noise_ppm=(3e-4, 3e-3), max_tilt_deg=45.0, device=device,
            )  # fmt: skip
            loss = relative_error(model(field, op), chi, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item(), time.process_time() - cpu0, device

    return call


def _check_train(bench: Benchmark, inputs: dict, output: Any) -> str:
    loss, cpu_s, device = output
    return (
        f"one MoDL epoch ({TRAIN['steps']} steps, batch {TRAIN['batch']}, {TRAIN['patch']}^3) "
        f"on {device}, last loss {loss:.3f}, CPU {cpu_s:.1f} s"
    )


def rows() -> list[Benchmark]:
    out = []
    for method, (label, target) in METHODS.items():
        for suffix, matrix, vox, quick in GRIDS:
            if method == "dip" and suffix != "2mm":
                continue
            goal = f", < {target:g} s" if target and suffix == "160" else ""
            out.append(
                Benchmark(
                    f"dl-{method}-{suffix}",
                    f"inversion ({label}{goal})",
                    matrix,
                    vox,
                    setup,
                    timed_inversion(method, method == "dip"),
                    check,
                    quick=quick,
                )  # fmt: skip
            )
    out.append(
        Benchmark(
            "dl-train-epoch",
            "qsmflow-train (1 epoch)",
            MATRIX_2MM,
            ISO_2MM,
            _setup_train,
            _prepare_train,
            _check_train,
        )  # fmt: skip
    )
    return out
