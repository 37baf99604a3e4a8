"""Benchmark row: overhead of running the BIDS App through SLURM instead of MultiProc.

Two simulated subjects (4 mm, 2 echoes, ``fast`` preset) are processed three times from scratch
with the same polling interval (0.5 s): MultiProc with ``--threads`` processes, ``--plugin
SLURM`` (one job per step) and ``--plugin SLURMGraph`` (the whole graph submitted at once; timed
until the queue is empty). The cluster is the single-node SLURM of ``tests/test_slurm.py``
started on localhost (needs root and the Debian packages ``munge slurmctld slurmd
slurm-client``); without it the row says why it was skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import Benchmark

#: Place in the table: after the whole-run rows.
ORDER = 90

REPO = Path(__file__).resolve().parents[1]


def _qsmflow(inputs: dict, out: Path, *extra: str, env: dict | None = None) -> float:
    cmd = [sys.executable, "-m", "qsmflow.cli.run", inputs["bids"], str(out), "participant"]
    cmd += ["--pipeline", "fast", "--plugin-args", inputs["poll"], *extra]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"qsmflow {' '.join(extra)} failed: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def slurm_setup(bench: Benchmark, workdir: Path) -> dict:
    from qsmflow.cli.simulate import main as simulate_main

    bids = workdir / "bids"
    argv = [str(bids), "--subjects", "2", "--voxel-size", "4", "--echoes", "2", "--seed", "5"]
    if simulate_main(argv) != 0:
        raise RuntimeError("simulation failed")
    poll = workdir / "poll.yml"
    poll.write_text("poll_sleep_duration: 0.5\njob_finished_timeout: 2\n")
    return {"bids": str(bids), "poll": str(poll), "workdir": str(workdir)}


def slurm_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    sys.path.insert(0, str(REPO))
    from tests.test_slurm import LocalSlurm

    reason = LocalSlurm.unavailable()
    work = Path(inputs["workdir"])

    def call() -> dict:
        if reason:
            return {"skipped": reason}
        with LocalSlurm() as cluster:
            env = cluster.env
            multiproc = _qsmflow(inputs, work / "mp", "--nprocs", str(n_threads), env=env)
            slurm = _qsmflow(inputs, work / "slurm", "--plugin", "SLURM", env=env)
            n_slurm = len(cluster.jobs())
            start = time.perf_counter()
            _qsmflow(inputs, work / "graph", "--plugin", "SLURMGraph", env=env)
            cluster.wait_empty()
            graph = time.perf_counter() - start
            n_graph = len(cluster.jobs()) - n_slurm
        return {
            "multiproc_s": multiproc,
            "slurm_s": slurm,
            "graph_s": graph,
            "slurm_jobs": n_slurm,
            "graph_jobs": n_graph,
            "cpus": os.cpu_count(),
        }

    return call


def slurm_check(bench: Benchmark, inputs: dict, output: dict) -> str:
    if "skipped" in output:
        return f"skipped: {output['skipped']}"
    mp, sl, gr = output["multiproc_s"], output["slurm_s"], output["graph_s"]
    return (
        f"MultiProc {mp:.0f} s; SLURM {sl:.0f} s ({output['slurm_jobs']} jobs, "
        f"+{sl - mp:.0f} s, x{sl / mp:.1f}); SLURMGraph {gr:.0f} s ({output['graph_jobs']} jobs, "
        f"+{gr - mp:.0f} s); single node, {output['cpus']} CPUs"
    )


def rows() -> list[Benchmark]:
    funcs = {"setup": slurm_setup, "prepare": slurm_prepare, "check": slurm_check}
    return [
        Benchmark(
            "slurm-overhead-4mm",
            "SLURM / SLURMGraph vs MultiProc (2 subjects)",
            (44, 52, 40),
            (4.0, 4.0, 4.0),
            **funcs,
        )
    ]
