"""How the BIDS App executes its workflow: Nipype plugin, plugin arguments, per-node job
resources, checks of the batch system before any work starts, and failure reports.

Nipype runs the graph through a plugin: ``Linear`` and ``MultiProc`` on one machine, or a batch
system where every node becomes a job (``SLURM`` submits one ``sbatch`` per node and polls
``squeue``; ``SLURMGraph`` submits the whole graph at once with ``--dependency=afterok`` and
returns; ``PBS``/``PBSGraph``, ``SGE``/``SGEGraph`` and ``LSF`` are the equivalents for other
schedulers). Each node's ``mem_gb`` and ``n_procs`` become its SLURM job's ``--mem`` and
``--cpus-per-task``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

#: plugin -> the keys of ``--plugin-args`` that Nipype's plugin reads, with their types
PLUGIN_ARGS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "Linear": {},
    "MultiProc": {
        "n_procs": int,
        "memory_gb": (int, float),
        "n_gpu_procs": int,
        "raise_insufficient": bool,
        "scheduler": str,
        "mp_context": str,
    },
    "SLURM": {
        "sbatch_args": str,
        "template": str,
        "max_jobs": int,
        "retry_timeout": (int, float),
        "max_tries": int,
        "jobid_re": str,
    },
    "SLURMGraph": {"sbatch_args": str, "template": str, "dont_resubmit_completed_jobs": bool},
    "PBS": {
        "qsub_args": str,
        "template": str,
        "max_jobs": int,
        "retry_timeout": (int, float),
        "max_tries": int,
        "max_jobname_len": int,
    },
    "PBSGraph": {"qsub_args": str, "template": str, "dont_resubmit_completed_jobs": bool},
    "SGE": {
        "qsub_args": str,
        "template": str,
        "max_jobs": int,
        "retry_timeout": (int, float),
        "max_tries": int,
    },
    "SGEGraph": {"qsub_args": str, "template": str, "dont_resubmit_completed_jobs": bool},
    "LSF": {
        "bsub_args": str,
        "template": str,
        "max_jobs": int,
        "retry_timeout": (int, float),
        "max_tries": int,
    },
}

#: ``--plugin-args`` keys that go to Nipype's ``[execution]`` configuration instead (seconds):
#: how often the plugin polls its workers or the queue, and how long a batch plugin waits for a
#: finished job's result file to appear on the shared file system
EXECUTION_ARGS: dict[str, type | tuple[type, ...]] = {
    "poll_sleep_duration": (int, float),
    "job_finished_timeout": (int, float),
}

#: batch plugin -> the scheduler commands it runs (checked before any work starts)
SCHEDULER_COMMANDS: dict[str, tuple[str, ...]] = {
    "SLURM": ("sbatch", "squeue"),
    "SLURMGraph": ("sbatch",),
    "PBS": ("qsub", "qstat"),
    "PBSGraph": ("qsub",),
    "SGE": ("qsub", "qstat"),
    "SGEGraph": ("qsub",),
    "LSF": ("bsub", "bjobs"),
}

#: plugins that submit the whole graph and return before the jobs have run
GRAPH_PLUGINS = ("SLURMGraph", "PBSGraph", "SGEGraph")

#: the smallest memory a job asks for (MiB): a Python interpreter with Nipype and qsmflow
#: imported takes ~100 MB before it touches any data
MIN_JOB_MEM_MIB = 256

_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2})$")


def plugin_name(text: str) -> str:
    """argparse type: a plugin name from :data:`PLUGIN_ARGS`, case-insensitive."""
    for name in PLUGIN_ARGS:
        if name.lower() == text.lower():
            return name
    raise argparse.ArgumentTypeError(
        f"unknown plugin {text!r}; choose one of {', '.join(PLUGIN_ARGS)}"
    )


def slurm_time(text: str) -> str:
    """argparse type: a SLURM time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``)."""
    if not _SLURM_TIME.match(text):
        raise argparse.ArgumentTypeError(
            f"expected a SLURM time limit such as 90, 01:30:00 or 1-12:00:00, got {text!r}"
        )
    return text


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--plugin``, ``--plugin-args``, ``--slurm-*`` and ``--job-template`` to a parser."""
    g = parser.add_argument_group("execution (Nipype plugins, clusters)")
    g.add_argument(
        "--plugin",
        type=plugin_name,
        metavar="NAME",
        help=f"Nipype execution plugin: {', '.join(PLUGIN_ARGS)} (default Linear; MultiProc "
        "with --nprocs > 1, or inside a SLURM allocation, sized from the allocation)",
    )
    g.add_argument(
        "--plugin-args",
        metavar="FILE.yml",
        help="YAML (or JSON) mapping of the plugin's arguments, e.g. sbatch_args, max_jobs, "
        "template; also poll_sleep_duration and job_finished_timeout (s)",
    )
    g.add_argument("--slurm-account", metavar="NAME", help="sbatch --account for every job")
    g.add_argument("--slurm-partition", metavar="NAME", help="sbatch --partition for every job")
    g.add_argument(
        "--slurm-time",
        type=slurm_time,
        metavar="TIME",
        help="sbatch --time for every job (e.g. 01:00:00)",
    )
    g.add_argument(
        "--job-template",
        metavar="FILE",
        help="batch script header for every job (#SBATCH lines, module loads); a last line "
        "ending in a backslash prefixes each job's command, e.g. 'apptainer exec img.sif \\'",
    )


@dataclass
class Execution:
    """A checked execution plan: Nipype plugin, its arguments and ``[execution]`` options."""

    plugin: str
    plugin_args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def batch(self) -> bool:
        """True when nodes run as batch jobs (the work and output folders must be shared)."""
        return self.plugin in SCHEDULER_COMMANDS

    @property
    def detached(self) -> bool:
        """True when the plugin returns once the jobs are submitted, before they run."""
        return self.plugin in GRAPH_PLUGINS


def load_plugin_args(path: str | Path) -> dict[str, Any]:
    """Read a ``--plugin-args`` file: a YAML or JSON mapping of argument -> value."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"--plugin-args {path}: cannot read the file ({exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--plugin-args {path}: not valid JSON ({exc})") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--plugin-args {path}: not valid YAML ({exc})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(
            f"--plugin-args {path}: expected a mapping of plugin arguments "
            f"(key: value lines), got {type(data).__name__}"
        )
    return data


def validate_plugin_args(
    plugin: str, values: Mapping[str, Any], *, source: str = "--plugin-args"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split and check plugin arguments: (Nipype plugin_args, Nipype [execution] options).

    Unknown keys are an error listing the keys the plugin accepts; values must have the
    expected type.
    """
    allowed = {**PLUGIN_ARGS[plugin], **EXECUTION_ARGS}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(
            f"{source}: unknown argument(s) {', '.join(unknown)} for plugin {plugin}; "
            f"allowed: {', '.join(allowed)}"
        )
    plugin_args, config = {}, {}
    for key, value in values.items():
        expected = allowed[key]
        types = expected if isinstance(expected, tuple) else (expected,)
        # bool is an int in Python, but 'max_jobs: true' is a mistake
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ValueError(f"{source}: {key} must be {names}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            if key not in ("n_gpu_procs",):
                raise ValueError(f"{source}: {key} must be positive, got {value!r}")
        if key in EXECUTION_ARGS:
            config[key] = value
        else:
            plugin_args[key] = value
    return plugin_args, config


def allocation_resources(environ: Mapping[str, str]) -> tuple[int, float | None, str] | None:
    """CPUs, memory (GB) and job id of the SLURM allocation this process runs in, or None.

    ``SLURM_CPUS_PER_TASK`` (``srun -c``) wins over ``SLURM_CPUS_ON_NODE``; memory comes from
    ``SLURM_MEM_PER_NODE`` or ``SLURM_MEM_PER_CPU`` (both MiB) and is None without either.
    """
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    cpus_text = environ.get("SLURM_CPUS_PER_TASK") or environ.get("SLURM_CPUS_ON_NODE")
    try:
        cpus = max(1, int(cpus_text)) if cpus_text else 1
    except ValueError:
        cpus = 1
    mem_gb = None
    try:
        if environ.get("SLURM_MEM_PER_NODE"):
            mem_gb = int(environ["SLURM_MEM_PER_NODE"]) / 1024
        elif environ.get("SLURM_MEM_PER_CPU"):
            mem_gb = int(environ["SLURM_MEM_PER_CPU"]) * cpus / 1024
    except ValueError:
        mem_gb = None
    return cpus, mem_gb, job


def _run_command(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def check_scheduler(
    plugin: str,
    *,
    partition: str | None = None,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[[list[str]], subprocess.CompletedProcess] = _run_command,
) -> None:
    """Fail early, with what to do, when the plugin's batch system cannot take jobs.

    Checks that the submit/status commands are on PATH and, for SLURM, that the controller
    answers ``scontrol ping`` and that ``partition`` exists (``sinfo``).
    """
    for command in SCHEDULER_COMMANDS.get(plugin, ()):
        if which(command) is None:
            raise ValueError(
                f"--plugin {plugin}: '{command}' not found on PATH; run qsmflow on a login "
                f"node of the cluster (or load its scheduler module), or choose --plugin "
                "MultiProc to run on this machine"
            )
    if plugin not in ("SLURM", "SLURMGraph"):
        return
    if which("scontrol") is not None:
        try:
            ping = run(["scontrol", "ping"])
        except subprocess.TimeoutExpired:
            ping = None
        text = "" if ping is None else (ping.stdout + ping.stderr).strip()
        if ping is None or ping.returncode != 0 or not re.search(r"\bis UP\b", text):
            text = text.splitlines()[0] if text else ""
            raise ValueError(
                f"--plugin {plugin}: the SLURM controller does not answer ('scontrol ping': "
                f"{text or 'timed out'}); check that slurmctld is running and that SLURM_CONF "
                f"(now {os.environ.get('SLURM_CONF', 'unset')}) names this cluster's slurm.conf"
            )
    if partition:
        listing = run(["sinfo", "--noheader", "--format=%P"])
        if listing.returncode != 0:
            raise ValueError(
                f"--plugin {plugin}: 'sinfo' failed ({listing.stderr.strip()}); is the SLURM "
                "controller reachable?"
            )
        names = [p.strip().rstrip("*") for p in listing.stdout.split()]
        if partition not in names:
            raise ValueError(
                f"--slurm-partition {partition}: no such partition; this cluster has "
                f"{', '.join(names) or 'none'}"
            )


def _read_template(path: str | Path) -> str:
    """A job template's text, ending without a newline so that a last line ending in a
    backslash continues onto the job's command (Nipype appends '\\n<python> <script>')."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"job template {path}: cannot read the file ({exc})") from exc
    if not text.startswith("#!"):
        raise ValueError(
            f"job template {path}: a batch script must start with a '#!' line (e.g. '#!/bin/bash')"
        )
    return text.rstrip("\n")


def plan_execution(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    check: bool = True,
) -> Execution:
    """Turn the command line into a checked :class:`Execution` (nothing runs yet).

    ``args`` has ``plugin``, ``plugin_args``, ``nprocs``, ``mem_gb``, ``slurm_account``,
    ``slurm_partition``, ``slurm_time`` and ``job_template``. ``check`` asks the batch system
    whether it can take jobs (:func:`check_scheduler`).
    """
    environ = os.environ if environ is None else environ
    allocation = allocation_resources(environ)
    nprocs, mem_gb = args.nprocs, args.mem_gb
    plugin = args.plugin
    if plugin is None:
        if allocation and nprocs is None:
            nprocs = allocation[0]
        plugin = "MultiProc" if (nprocs or 1) > 1 else "Linear"
    slurm_options = {
        "--slurm-account": ("--account", args.slurm_account),
        "--slurm-partition": ("--partition", args.slurm_partition),
        "--slurm-time": ("--time", args.slurm_time),
    }
    given = [opt for opt, (_, value) in slurm_options.items() if value]
    if given and plugin not in ("SLURM", "SLURMGraph"):
        raise ValueError(
            f"{', '.join(given)} need --plugin SLURM or SLURMGraph (the plugin is {plugin}); "
            "for other batch systems put the options in --plugin-args (qsub_args, bsub_args)"
        )
    if args.job_template and plugin not in SCHEDULER_COMMANDS:
        raise ValueError(
            f"--job-template needs a batch plugin ({', '.join(SCHEDULER_COMMANDS)}); "
            f"the plugin is {plugin}"
        )
    source = f"--plugin-args {args.plugin_args}" if args.plugin_args else "--plugin-args"
    values = load_plugin_args(args.plugin_args) if args.plugin_args else {}
    plugin_args, config = validate_plugin_args(plugin, values, source=source)

    notes = []
    if plugin == "MultiProc":
        from_allocation = allocation is not None
        if "n_procs" not in plugin_args:
            plugin_args["n_procs"] = nprocs or (allocation[0] if from_allocation else 1)
        if "memory_gb" not in plugin_args:
            if mem_gb:
                plugin_args["memory_gb"] = mem_gb
            elif from_allocation and allocation[1]:
                # leave a tenth for the Python process that schedules the nodes
                plugin_args["memory_gb"] = round(0.9 * allocation[1], 2)
        plugin_args.setdefault("raise_insufficient", False)
        # workers start from a clean server process, not a fork of this one: a fork of a
        # process whose OpenMP/numba/BLAS thread pools are running can die or hang in the child
        plugin_args.setdefault("mp_context", "forkserver")
        notes.append(f"{plugin_args['n_procs']} processes")
        if "memory_gb" in plugin_args:
            notes.append(f"{plugin_args['memory_gb']} GB")
        if from_allocation and args.nprocs is None:
            notes.append(f"sized from SLURM allocation {allocation[2]}")
    elif plugin in SCHEDULER_COMMANDS:
        if args.nprocs or args.mem_gb:
            print(
                "qsmflow: note: --nprocs/--mem-gb size MultiProc only; with a batch plugin each "
                "job asks for its own node's CPUs and memory",
                file=sys.stderr,
            )
        if plugin in ("SLURM", "SLURMGraph"):
            extra = " ".join(f"{flag}={value}" for flag, value in slurm_options.values() if value)
            if plugin == "SLURMGraph" and "kill-on-invalid-dep" not in plugin_args.get(
                "sbatch_args", ""
            ):
                # a failed job cancels the jobs waiting on it (else they pend forever)
                extra = f"--kill-on-invalid-dep=yes {extra}"
            if extra:
                plugin_args["sbatch_args"] = f"{plugin_args.get('sbatch_args', '')} {extra}".strip()
        if args.job_template:
            plugin_args["template"] = _read_template(args.job_template)
        elif Path(plugin_args.get("template", "")).is_file():
            plugin_args["template"] = _read_template(plugin_args["template"])
        if plugin in GRAPH_PLUGINS:
            # a rerun submits only the nodes whose results are not in the work directory
            plugin_args.setdefault("dont_resubmit_completed_jobs", True)
        submit_args = next((plugin_args[k] for k in plugin_args if k.endswith("sub_args")), "")
        submit_args = submit_args or plugin_args.get("sbatch_args", "")
        if submit_args:
            notes.append(f"jobs submitted with '{submit_args}'")
        if "template" in plugin_args:
            notes.append(f"template {args.job_template or 'from --plugin-args'}")
        if check:
            check_scheduler(plugin, partition=args.slurm_partition)
    description = plugin + (f" ({'; '.join(notes)})" if notes else "")
    return Execution(plugin=plugin, plugin_args=plugin_args, config=config, description=description)


def _is_local_node(node) -> bool:
    """Bookkeeping nodes (lists, selections, BIDS sinks) take milliseconds: batch plugins run
    them on the submitting host instead of paying a job's start-up for each."""
    from nipype.interfaces import utility as niu

    from ..interfaces import DerivativesDataSink

    local = (niu.IdentityInterface, niu.Merge, niu.Select, niu.Split, DerivativesDataSink)
    return isinstance(node.interface, local)


def sbatch_resources(mem_gb: float, n_procs: int) -> str:
    """sbatch options for a node: ``--cpus-per-task`` and ``--mem`` (MiB, Nipype GB = GiB)."""
    mem_mib = max(MIN_JOB_MEM_MIB, math.ceil(mem_gb * 1024))
    return f"--cpus-per-task={max(1, int(n_procs))} --mem={mem_mib}M"


def set_job_resources(wf, plugin: str) -> dict[str, str]:
    """Give every node of ``wf`` its batch job's resources; returns node name -> sbatch options.

    Under SLURM/SLURMGraph each node's ``mem_gb``/``n_procs`` become ``--mem``/``--cpus-per-task``
    in the node's ``plugin_args['sbatch_args']`` (added to the plugin-wide ``sbatch_args``).
    Bookkeeping nodes run on the submitting host (``run_without_submitting``) under the
    plugins that honour it (``SLURM``, ``PBS``, ``SGE``, ``LSF``; graph plugins submit all).
    """
    if plugin not in SCHEDULER_COMMANDS:
        return {}
    requests = {}
    for name in wf.list_node_names():
        node = wf.get_node(name)
        if _is_local_node(node):
            node.run_without_submitting = True
            if plugin not in GRAPH_PLUGINS:
                continue
        if plugin in ("SLURM", "SLURMGraph"):
            request = sbatch_resources(node.mem_gb, node.n_procs)
            # SLURMGraph joins plugin-wide and node options without a space
            node.plugin_args = {**node.plugin_args, "sbatch_args": f" {request}"}
            requests[name] = request
    return requests


def configure_workflow(wf, execution: Execution, *, crash_dir: str | Path) -> None:
    """Apply an :class:`Execution` to a workflow: crash files, ``[execution]`` options, job
    resources."""
    wf.config["execution"]["crashdump_dir"] = str(crash_dir)
    wf.config["execution"]["crashfile_format"] = "txt"
    wf.config["execution"].update(execution.config)
    set_job_resources(wf, execution.plugin)


class _TracebackLines:
    """Mixin for Nipype's qsub-like plugins (SLURM, PBS, SGE, LSF): when a job ends without a
    result file (killed for memory or time), Nipype 1.11 hands its crash report a traceback
    string where a list of lines is expected and fails with a TypeError instead of reporting
    the node; give it the lines."""

    def _get_result(self, taskid):
        result = super()._get_result(taskid)
        if result and isinstance(result.get("traceback"), str):
            result["traceback"] = result["traceback"].splitlines(keepends=True)
        return result


class _OneSqueuePerPoll:
    """Mixin for Nipype's SLURM plugin: one ``squeue`` listing of this user's jobs answers
    every pending job of a polling round, instead of one ``squeue -j`` call per job per round
    (hundreds of subjects mean thousands of calls to the controller every few seconds).

    A listing only answers for jobs submitted before it was taken; anything else, or a failed
    listing, falls back to Nipype's own per-job check.
    """

    #: seconds a listing stays valid (shorter than any sensible ``poll_sleep_duration``)
    queue_ttl_s = 1.0

    def _submit_batchtask(self, scriptfile, node):
        taskid = super()._submit_batchtask(scriptfile, node)
        self._submitted_at = {**getattr(self, "_submitted_at", {}), taskid: time.monotonic()}
        return taskid

    def _is_pending(self, taskid):
        listed_at, queued = getattr(self, "_queue", (None, set()))
        submitted = getattr(self, "_submitted_at", {}).get(taskid)
        now = time.monotonic()
        if submitted is None:
            return super()._is_pending(taskid)
        if listed_at is None or now - listed_at > self.queue_ttl_s or listed_at < submitted:
            try:
                out = _run_command(
                    ["squeue", "--noheader", "--format=%i", f"--user={getpass.getuser()}"]
                )
            except (OSError, subprocess.TimeoutExpired):
                out = None
            if out is None or out.returncode != 0:
                return super()._is_pending(taskid)
            listed_at, queued = now, set(out.stdout.split())
            self._queue = (listed_at, queued)
        return str(taskid) in queued


def plugin_instance(name: str, plugin_args: dict[str, Any]):
    """The Nipype plugin object for ``name``; batch plugins get :class:`_TracebackLines`, SLURM
    also :class:`_OneSqueuePerPoll`."""
    from nipype.pipeline import plugins as nipype_plugins
    from nipype.pipeline.plugins.base import SGELikeBatchManagerBase

    cls = getattr(nipype_plugins, f"{name}Plugin")
    if issubclass(cls, SGELikeBatchManagerBase):
        mixins = (_OneSqueuePerPoll, _TracebackLines) if name == "SLURM" else (_TracebackLines,)
        # same class name: Nipype derives the plugin's name from it
        cls = type(cls.__name__, (*mixins, cls), {"__module__": __name__})
    return cls(plugin_args=plugin_args)


def run_workflow(wf, execution: Execution, *, status_callback=None) -> None:
    """Run ``wf`` with the planned plugin (raises Nipype's RuntimeError when nodes failed)."""
    plugin_args = dict(execution.plugin_args)
    if status_callback is not None and not execution.detached:
        plugin_args["status_callback"] = status_callback
    if execution.plugin == "SLURM" and not os.environ.get("LOGNAME"):
        # Nipype's SLURM plugin names jobs after $LOGNAME, unset in some batch/container shells
        os.environ["LOGNAME"] = getpass.getuser()
    if execution.detached:
        report_earlier_submission(wf)
    wf.run(plugin=plugin_instance(execution.plugin, plugin_args))


def report_earlier_submission(wf, *, out: TextIO | None = None) -> list[Failure]:
    """Graph plugins return before their jobs run, so their failures surface at the next run:
    report the crash files written since the previous submission (the time of the graph
    plugin's ``batch/submit_jobs.sh``) before submitting again."""
    submitted = Path(wf.base_dir) / wf.name / "batch" / "submit_jobs.sh"
    crash_dir = wf.config["execution"].get("crashdump_dir")
    if not (crash_dir and submitted.exists()):
        return []
    failures = read_failures(crash_dir, since=submitted.stat().st_mtime)
    if failures:
        report_failures(failures, out=out, earlier=True)
    return failures


@dataclass
class Failure:
    """One failed node, read from its Nipype crash file."""

    subject: str | None
    node: str
    error: str
    crash_file: Path
    job_log: Path | None = None


_JOB_ID = re.compile(r"Job id \((\d+)\) finished or terminated")
_SUBJECT = re.compile(r"(?:^|\.)sub_([A-Za-z0-9_]+?)_wf(?:\.|$)")


def read_failures(crash_dir: str | Path, *, since: float = 0.0) -> list[Failure]:
    """The failures whose crash files in ``crash_dir`` were written at or after ``since``
    (seconds since the epoch), each with its subject and, for a batch job that died without a
    result, the job's log (``slurm-<id>.out`` in the workflow's ``batch`` folder)."""
    failures = []
    crash_dir = Path(crash_dir)
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        if crash.stat().st_mtime < since - 1:
            continue
        text = crash.read_text(errors="replace")
        node = re.search(r"^Node: (.+)$", text, re.M)
        node_name = node.group(1).strip() if node else crash.stem
        match = _SUBJECT.search(node_name)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        error = next(
            (ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)),
            lines[-1] if lines else "unknown error",
        )
        job_log = None
        job = _JOB_ID.search(text)
        if job:
            error = f"job {job.group(1)} ended without a result (killed, out of memory or time?)"
            workdir = re.search(r"^Working directory: (.+)$", text, re.M)
            if workdir:
                # <work>/<top workflow>/<...>/<node>: the batch folder is <work>/<top>/batch
                parts = Path(workdir.group(1).strip())
                for parent in parts.parents:
                    candidate = parent / "batch" / f"slurm-{job.group(1)}.out"
                    if candidate.exists():
                        job_log = candidate
                        break
        failures.append(
            Failure(
                subject=match.group(1) if match else None,
                node=node_name,
                error=error,
                crash_file=crash,
                job_log=job_log,
            )
        )
    return failures


def report_failures(
    failures: list[Failure], *, out: TextIO | None = None, earlier: bool = False
) -> None:
    """Print the failures grouped by subject, with crash files, job logs and how to resume
    (``earlier``: the failures of the previous submission, now submitted again)."""
    out = sys.stderr if out is None else out
    what = "of the previous submission " if earlier else ""
    print(f"qsmflow: {len(failures)} step(s) {what}failed:", file=out)
    for f in sorted(failures, key=lambda f: (f.subject or "", f.node)):
        step = re.sub(r"^.*?sub_[A-Za-z0-9_]+?_wf\.", "", f.node)
        who = f"sub-{f.subject}" if f.subject else "(no subject)"
        print(f"  {who}: {step}: {f.error}", file=out)
        print(f"    crash file: {f.crash_file}", file=out)
        if f.job_log is not None:
            tail = f.job_log.read_text(errors="replace").strip().splitlines()[-5:]
            print(f"    job log: {f.job_log}", file=out)
            for line in tail:
                print(f"      {line}", file=out)
    if earlier:
        print("qsmflow: submitting them again with the steps that did not run", file=out)
        return
    print(
        "qsmflow: fix the cause and rerun the same command: finished steps are reused from the "
        "work directory and only the failed and not-yet-run steps are run (or submitted) again",
        file=out,
    )
