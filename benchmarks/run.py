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

To add a row, write its three functions and append a :class:`Benchmark` to ``ROWS`` (the one
registry, at the end of the row definitions). This orchestrating process imports only the standard
library, so it adds nothing to a child's peak memory.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import pickle
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

MATRIX_1MM = (176, 208, 160)
MATRIX_2MM = (88, 104, 80)
ISO_1MM = (1.0, 1.0, 1.0)
ISO_2MM = (2.0, 2.0, 2.0)

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


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
def simulated_head(bench: Benchmark, fields: Sequence[str] = ("chi_ppm", "mask")) -> dict:
    """Arrays of one simulated acquisition of head model 0 on ``bench``'s grid.

    Returns ``fields`` of :class:`qsmflow.simulate.SimulatedAcquisition` plus ``b0_dir`` and
    ``voxel_mm``. Reusable by rows of later steps (``fields=("local_field_ppm", ...)``).
    """
    from qsmflow.phantom import make_head_model
    from qsmflow.simulate import AcquisitionParams, simulate_acquisition

    params = AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm)
    sim = simulate_acquisition(make_head_model(0), params, n_threads=os.cpu_count() or 1)
    out = {name: getattr(sim, name) for name in fields}
    out.update(b0_dir=tuple(float(v) for v in sim.b0_dir), voxel_mm=bench.voxel_mm)
    return out


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


# ------------------------------------------------------------------------------ registry
def _rows() -> tuple[Benchmark, ...]:
    forward = {"setup": forward_setup, "prepare": forward_prepare, "check": forward_check}
    simulate = {"setup": simulate_setup, "prepare": simulate_prepare, "check": simulate_check}
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
    )


#: Every row, in table order. Later steps add their rows here.
ROWS: tuple[Benchmark, ...] = _rows()
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in ROWS}
assert len(BENCHMARKS) == len(ROWS), "benchmark names must be unique"


# ------------------------------------------------------------------------------ child processes
def _load(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def _dump(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def _peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def _child_setup(name: str, workdir: Path) -> None:
    _dump(BENCHMARKS[name].setup(BENCHMARKS[name], workdir), workdir / "inputs.pkl")


def _child_measure(name: str, workdir: Path, n_threads: int) -> tuple[float, float]:
    call = BENCHMARKS[name].prepare(_load(workdir / "inputs.pkl"), n_threads)
    t0 = time.perf_counter()
    output = call()
    seconds = time.perf_counter() - t0
    peak_gb = _peak_rss_gb()
    _dump(output, workdir / "output.pkl")
    return seconds, peak_gb


def _child_check(name: str, workdir: Path) -> str:
    bench = BENCHMARKS[name]
    return bench.check(bench, _load(workdir / "inputs.pkl"), _load(workdir / "output.pkl"))


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
            print(f"{b.name:16s} {b.step} {'x'.join(map(str, b.matrix))}{' (quick)' * b.quick}")
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
