"""Benchmark row: overhead of running the BIDS App through SLURM instead of MultiProc.

Two simulated subjects (4 mm, 2 echoes, ``fast`` preset) are processed three times from scratch
with the same polling interval (0.5 s): MultiProc with ``--threads`` processes, ``--plugin
SLURM`` (one job per step) and ``--plugin SLURMGraph`` (the whole graph submitted at once; timed
until the queue is empty). Besides wall times, which follow the machine's load, the row gives
CPU seconds: of MultiProc's processes, of the jobs (bash ``time -p`` in the job template) and
of the submitting host. The cluster is the single-node SLURM of ``tests/test_slurm.py``
started on localhost (needs root and the Debian packages ``munge slurmctld slurmd
slurm-client``); without it the row says why it was skipped.
"""

from __future__ import annotations

import os
import resource
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


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _qsmflow(inputs: dict, out: Path, *extra: str, env: dict) -> tuple[float, float]:
    """Run the BIDS App; (wall s, CPU s of the submitting process and its children)."""
    cmd = [sys.executable, "-m", "qsmflow.cli.run", inputs["bids"], str(out), "participant"]
    cmd += ["--pipeline", "fast", "--plugin-args", inputs["poll"], *extra]
    start, cpu = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"qsmflow {' '.join(extra)} failed: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start, _children_cpu_s() - cpu


def _jobs_cpu_s(out: Path) -> float:
    """CPU seconds of the jobs, from the 'user'/'sys' lines bash's ``time -p`` (the job
    template) wrote to their logs in the work directory's batch folder."""
    total = 0.0
    for log in (out / "work" / "qsmflow_wf" / "batch").iterdir():
        if log.suffix in (".out", ".e"):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(("user ", "sys ")):
                    total += float(line.split()[1])
    return total


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
    template = work / "job.sh"
    template.write_text("#!/bin/bash\ntime -p \\\n")
    timed = ["--job-template", str(template)]

    def call() -> dict:
        if reason:
            return {"skipped": reason}
        with LocalSlurm() as cluster:
            env = cluster.env
            mp, mp_cpu = _qsmflow(inputs, work / "mp", "--nprocs", str(n_threads), env=env)
            sl, sl_cpu = _qsmflow(inputs, work / "slurm", "--plugin", "SLURM", *timed, env=env)
            n_slurm = len(cluster.jobs())
            start = time.perf_counter()
            _, gr_cpu = _qsmflow(inputs, work / "graph", "--plugin", "SLURMGraph", *timed, env=env)
            cluster.wait_empty()
            gr = time.perf_counter() - start
            n_graph = len(cluster.jobs()) - n_slurm
        return {
            "multiproc": (mp, mp_cpu),
            "slurm": (sl, sl_cpu, _jobs_cpu_s(work / "slurm"), n_slurm),
            "graph": (gr, gr_cpu, _jobs_cpu_s(work / "graph"), n_graph),
            "cpus": os.cpu_count(),
        }

    return call


def slurm_check(bench: Benchmark, inputs: dict, output: dict) -> str:
    if "skipped" in output:
        return f"skipped: {output['skipped']}"
    mp, mp_cpu = output["multiproc"]
    parts = [f"MultiProc {mp:.0f} s ({mp_cpu:.0f} CPU s)"]
    for name, key in (("SLURM", "slurm"), ("SLURMGraph", "graph")):
        wall, host_cpu, jobs_cpu, n_jobs = output[key]
        parts.append(
            f"{name} {wall:.0f} s (+{wall - mp:.0f} s; {n_jobs} jobs, {jobs_cpu:.0f} CPU s "
            f"in jobs + {host_cpu:.0f} on the submitting host)"
        )
    return "; ".join(parts) + f"; one node, {output['cpus']} CPUs"


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
