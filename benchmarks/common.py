"""What every benchmark row shares: the :class:`Benchmark` record, grids and input helpers.

Row modules (``benchmarks/rows_*.py``) import from here; ``run.py`` collects their rows.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATRIX_1MM = (176, 208, 160)
MATRIX_2MM = (88, 104, 80)
ISO_1MM = (1.0, 1.0, 1.0)
ISO_2MM = (2.0, 2.0, 2.0)
#: Grid of the phase-processing rows (unwrapping, field fit, coil combination), as in the issue
#: that set their targets: 200 x 200 x 160 at 1 mm, 4 echoes, 2 cores.
MATRIX_PHASE_1MM = (200, 200, 160)
MATRIX_PHASE_2MM = (100, 100, 80)


@dataclass(frozen=True)
class Benchmark:
    """One row of the table.

    Attributes
    ----------
    name : str
        Unique id, used by ``--only`` (``<step>-<size>``, e.g. ``forward-1mm``).
    step : str
        Text for the "step" column.
    matrix, voxel_mm : (3,) tuples
        Image matrix and voxel size in mm of the row's data.
    setup : callable(bench, workdir) -> dict
        Builds the inputs (not measured). Runs in its own process; the dict is pickled.
        ``workdir`` is a scratch folder removed after the row.
    prepare : callable(inputs, n_threads) -> callable()
        Runs in the measured process before the clock starts: imports and binds arguments.
        The returned zero-argument callable is what is timed; its result goes to ``check``.
    check : callable(bench, inputs, output) -> str
        Accuracy text (not measured), in its own process.
    quick : bool
        Part of ``--quick``.
    """

    name: str
    step: str
    matrix: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    setup: Callable[[Benchmark, Path], dict]
    prepare: Callable[[dict, int], Callable[[], Any]]
    check: Callable[[Benchmark, dict, Any], str]
    quick: bool = False


# ------------------------------------------------------------------------------ shared inputs
def simulated_head(
    bench: Benchmark, fields: Sequence[str] = ("chi_ppm", "mask"), **params: Any
) -> dict:
    """Arrays of one simulated acquisition of head model 0 on ``bench``'s grid.

    Returns ``fields`` of :class:`qsmflow.simulate.SimulatedAcquisition` plus ``b0_dir`` and
    ``voxel_mm``. Reusable by rows of later steps (``fields=("local_field_ppm", ...)``).
    ``params`` overrides other :class:`qsmflow.simulate.AcquisitionParams` fields (``n_coils``,
    ``snr``, ...); the noise comes from ``numpy.random.default_rng(0)``.
    """
    from qsmflow.phantom import make_head_model
    from qsmflow.simulate import AcquisitionParams, simulate_acquisition

    params = AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm, **params)
    sim = simulate_acquisition(make_head_model(0), params, n_threads=os.cpu_count() or 1)
    out = {name: getattr(sim, name) for name in fields}
    out.update(b0_dir=tuple(float(v) for v in sim.b0_dir), voxel_mm=bench.voxel_mm)
    return out


def save_truth(workdir: Path, **arrays: Any) -> Path:
    """Pickle ground-truth arrays for ``check`` to a file of their own; returns its path.

    Put the path (not the arrays) in the inputs, so that the measured process, which loads the
    inputs, does not hold references it never uses and its peak memory stays the call's own.
    """
    path = workdir / "truth.pkl"
    dump(arrays, path)
    return path


def load(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def dump(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
