"""Benchmark rows of background field removal: SHARP, V-SHARP, RESHARP, iSMV, PDF and LBV.

Each method runs with its defaults on the simulator's true total field and true brain mask of
head model 0, at the two grids of the issue that set the targets (160 x 160 x 160 and
200 x 200 x 160) and at 2 mm (``--quick``). The head does not fit in 160 mm along y at 1 mm
(the brain alone spans 162 mm), so the 160^3 rows use 1.1 mm voxels (176 mm field of view).

Accuracy: ``local NRMSE`` is ``nrmse_demeaned`` of the local field against the simulator's true
local field inside the mask the method returns; ``mask kept`` is that mask's size as a
percentage of the brain mask's (the SMV methods leave out the outer 6 mm, LBV and PDF 4 mm,
LBV one voxel layer more for its boundary values).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ISO_1MM, ISO_2MM, Benchmark, load, save_truth, simulated_head

#: After the rows of run.py (0-49): background removal follows the phase steps.
ORDER = 50

#: function in qsmflow.algorithms.background -> (name in the table, whether it takes B0)
METHODS: dict[str, tuple[str, bool]] = {
    "sharp": ("SHARP", False),
    "vsharp": ("V-SHARP", False),
    "resharp": ("RESHARP", False),
    "ismv": ("iSMV", False),
    "pdf": ("PDF", True),
    "lbv": ("LBV", False),
}

#: (row suffix, matrix, voxel size mm, part of --quick)
GRIDS = (
    ("2mm", (100, 100, 80), ISO_2MM, True),
    ("160", (160, 160, 160), (1.1, 1.1, 1.1), False),
    ("200", (200, 200, 160), ISO_1MM, False),
)


def setup(bench: Benchmark, workdir: Path) -> dict:
    head = simulated_head(bench, ("total_field_ppm", "mask", "local_field_ppm"))
    head["truth"] = save_truth(workdir, local_field_ppm=head.pop("local_field_ppm"))
    return head


def _prepare(method: str) -> Callable[[dict, int], Callable[[], Any]]:
    def prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
        from qsmflow.algorithms import background

        func = getattr(background, method)
        args = [inputs["total_field_ppm"], inputs["mask"], inputs["voxel_mm"]]
        if METHODS[method][1]:
            args.append(inputs["b0_dir"])
        return lambda: func(*args, n_threads=n_threads)

    return prepare


def check(bench: Benchmark, inputs: dict, output: Any) -> str:
    """Demeaned NRMSE of the local field in the returned mask, and how much mask it kept."""
    from qsmflow.algorithms.metrics import nrmse_demeaned

    local, kept = output
    error = nrmse_demeaned(local, load(inputs["truth"])["local_field_ppm"], kept)
    kept_percent = 100 * kept.sum() / inputs["mask"].sum()
    return f"local NRMSE {error:.1f}% (mask kept {kept_percent:.1f}%)"


def rows() -> list[Benchmark]:
    return [
        Benchmark(
            f"background-{method}-{suffix}",
            f"background removal ({label})",
            matrix,
            vox,
            setup=setup,
            prepare=_prepare(method),
            check=check,
            quick=quick,
        )
        for suffix, matrix, vox, quick in GRIDS
        for method, (label, _) in METHODS.items()
    ]
