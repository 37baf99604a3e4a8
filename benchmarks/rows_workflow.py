"""Benchmark rows of whole runs: ``qsmflow-demo`` (simulate two 1.5 mm heads, run the BIDS App
on both in parallel with ``--nprocs 2``, score them).

The demo starts worker processes (Nipype MultiProc), so the measured call runs it as a
subprocess and the row's peak memory is the largest process of the run (``RUSAGE_CHILDREN``
``ru_maxrss``: the biggest single worker or the main process, not their sum).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import Benchmark

#: Place in the table: after every single-step row.
ORDER = 80

MATRIX_DEMO = (117, 139, 107)  # the demo's grid: 176 x 208 x 160 mm at 1.5 mm
ISO_DEMO = (1.5, 1.5, 1.5)


def demo_setup(bench: Benchmark, workdir: Path) -> dict:
    return {"out_dir": str(workdir / "demo"), "voxel_mm": bench.voxel_mm[0]}


def demo_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    cmd = [
        sys.executable,
        "-m",
        "qsmflow.cli.demo",
        inputs["out_dir"],
        "--voxel-size",
        str(inputs["voxel_mm"]),
        "--nprocs",
        str(n_threads),
    ]
    repo = str(Path(__file__).resolve().parents[1])

    def call() -> dict:
        env = {**os.environ, "PYTHONPATH": repo}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"qsmflow-demo failed: {proc.stderr.strip().splitlines()[-1:]}")
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return {"peak_child_gb": peak_kib * 1024 / 1e9}

    return call


def demo_check(bench: Benchmark, inputs: dict, output: dict) -> str:
    scores = json.loads((Path(inputs["out_dir"]) / "scores.json").read_text())
    subs = [k for k in scores if k.startswith("sub-")]
    nrmse = ", ".join(f"{scores[s]['chi']['nrmse']:.1f}" for s in subs)
    t = scores["timings_s"]
    return (
        f"chi NRMSE {nrmse}% ({len(subs)} subjects); simulate {t['simulate']:.0f} s + "
        f"qsmflow {t['qsmflow']:.0f} s; largest process {output['peak_child_gb']:.2f} GB"
    )


def rows() -> list[Benchmark]:
    funcs = {"setup": demo_setup, "prepare": demo_prepare, "check": demo_check}
    return [Benchmark("demo-1.5mm", "qsmflow-demo (2 subjects)", MATRIX_DEMO, ISO_DEMO, **funcs)]
