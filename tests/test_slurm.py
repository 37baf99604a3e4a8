"""Cluster execution: the BIDS App on a real single-node SLURM cluster started on localhost.

The cluster (munged, slurmctld, slurmd with a configuration in a temporary folder) is started by
:class:`LocalSlurm` and stopped after the tests; the tests skip with the reason where it cannot
start (not root, SLURM or MUNGE not installed), unless ``QSMFLOW_REQUIRE_SLURM=1`` (set by
``.ci/run`` once the packages are installed) turns that into a failure.
"""

from __future__ import annotations

import argparse
import getpass
import gzip
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow.cli import plugins
from qsmflow.cli.run import main as qsmflow_main
from qsmflow.cli.simulate import main as simulate_main
from qsmflow.workflows import init_qsm_wf

#: Daemons and tools a local cluster needs (Debian: munge slurmctld slurmd slurm-client).
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on localhost now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalSlurm:
    """A single-node SLURM cluster on localhost, for tests and benchmarks (needs root).

    ``start()`` writes ``slurm.conf`` in ``root``, starts its own ``munged`` (own key and
    socket), ``slurmctld`` and ``slurmd`` in the foreground and waits until the node is idle;
    ``stop()`` cancels the jobs and stops exactly those three processes. ``env`` holds the
    variables (``SLURM_CONF``) that clients need.
    """

    def __init__(self, root: str | Path | None = None):
        # not under pytest's 0700 temporary folders: munged runs as the 'munge' user
        self.root = Path(root or tempfile.mkdtemp(prefix="qsmflow-slurm-"))
        self.root.chmod(0o755)
        self._own_root = root is None
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {"SLURM_CONF": str(self.conf)}

    @staticmethod
    def unavailable() -> str | None:
        """Why a local cluster cannot be started here, or None."""
        missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
        if missing:
            return (
                f"SLURM/MUNGE not installed ({', '.join(missing)} missing; Debian: apt-get "
                "install munge slurmctld slurmd slurm-client)"
            )
        if os.geteuid() != 0:
            return "starting slurmd/munged needs root"
        try:
            import pwd

            pwd.getpwnam("munge")
        except KeyError:
            return "no 'munge' user (install the munge package)"
        return None

    def _log_tail(self) -> str:
        tails = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                tails.append(f"{name}: " + " | ".join(path.read_text().splitlines()[-3:]))
        return "; ".join(tails)

    def _wait(self, what: str, test, timeout: float = 30.0, interval: float = 0.1) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if test():
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited ({self._log_tail()})")
            time.sleep(interval)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({self._log_tail()})")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=60,
            check=check,
        )

    def start(self) -> LocalSlurm:
        import pwd

        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o755)  # clients reach the socket; munged refuses anything else
        key, sock = mdir / "munge.key", mdir / "munge.socket"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o600)
        self.procs.append(
            subprocess.Popen(
                [
                    "munged",
                    "--foreground",
                    f"--key-file={key}",
                    f"--socket={sock}",
                    f"--pid-file={mdir / 'munged.pid'}",
                    f"--seed-file={mdir / 'munged.seed'}",
                    f"--log-file={mdir / 'munged.log'}",
                ],
                user=munge.pw_uid,
                group=munge.pw_gid,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self._wait("munged", sock.exists, 10)
        cpus = os.cpu_count() or 1
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        r = self.root
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=qsmflowtest",
                    "SlurmctldHost=localhost",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={sock}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
                    "SlurmdParameters=config_overrides",
                    # finished jobs stay visible to 'scontrol show job' for the checks
                    "MinJobAge=3600",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    f"NodeName=localhost CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        env = {**os.environ, **self.env}
        for daemon in (["slurmctld"], ["slurmd", "-N", "localhost"]):
            self.procs.append(
                subprocess.Popen(
                    [*daemon, "-D", "-f", str(self.conf)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def idle() -> bool:
            out = self.run("sinfo", "--noheader", "--format=%t", check=False).stdout.strip()
            return out == "idle"

        self._wait("the SLURM node", idle, 30)
        return self

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller remembers (finished ones too), as key -> value."""
        out = self.run("scontrol", "show", "job", "--oneliner", check=False).stdout
        jobs = []
        for line in out.splitlines():
            if line.startswith("JobId="):
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                jobs.append(fields)
        return jobs

    def wait_empty(self, timeout: float = 300.0) -> None:
        """Wait until no job is pending or running (asking every 0.5 s: each squeue takes CPU
        from the jobs on a small machine)."""
        self._wait(
            "the queue",
            lambda: not self.run("squeue", "--noheader", check=False).stdout.strip(),
            timeout,
            interval=0.5,
        )

    def stop(self) -> None:
        if self.procs and self.conf.exists():
            self.run("scancel", "--user=root", check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def slurm():
    reason = LocalSlurm.unavailable()
    require = os.environ.get("QSMFLOW_REQUIRE_SLURM") == "1"
    if reason:
        if require:
            pytest.fail(f"QSMFLOW_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm()
    try:
        cluster.__enter__()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        if require:
            pytest.fail(f"could not start a local SLURM cluster: {exc}")
        pytest.skip(f"could not start a local SLURM cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(slurm, monkeypatch):
    for key, value in slurm.env.items():
        monkeypatch.setenv(key, value)
    # unset in CI's shell; Nipype's SLURM plugin names jobs after it (qsmflow fills it in)
    monkeypatch.delenv("LOGNAME", raising=False)
    return slurm


# ------------------------------------------------------------------------------ data and runs
PIPELINE = "fast"  # Laplacian unwrapping: no compiled code to build in every job


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two simulated subjects at 4 mm with 2 echoes, and plugin arguments for quick polling."""
    root = tmp_path_factory.mktemp("slurmdata")
    bids = root / "bids"
    argv = [str(bids), "--subjects", "2", "--voxel-size", "4", "--echoes", "2", "--seed", "5"]
    assert simulate_main(argv) == 0
    fast_poll = root / "poll.yml"
    fast_poll.write_text("poll_sleep_duration: 0.2\njob_finished_timeout: 1\n")
    return {"root": root, "bids": bids, "poll": fast_poll}


def _app(dataset, out, *extra):
    argv = [str(dataset["bids"]), str(out), "participant", "--pipeline", PIPELINE]
    return qsmflow_main([*argv, "--plugin-args", str(dataset["poll"]), *extra])


@pytest.fixture(scope="module")
def multiproc_out(dataset):
    out = dataset["root"] / "multiproc"
    assert _app(dataset, out, "--plugin", "MultiProc", "--nprocs", "2") == 0
    return out / "qsmflow"


def _derivatives(deriv: Path) -> dict[str, Path]:
    files = sorted(deriv.glob("sub-*/*/*.nii.gz")) + sorted(deriv.glob("sub-*/*/*.json"))
    return {str(f.relative_to(deriv)): f for f in files}


def _assert_identical(deriv: Path, reference: Path) -> None:
    ours, ref = _derivatives(deriv), _derivatives(reference)
    assert sorted(ours) == sorted(ref) and len(ref) >= 2 * 16
    for name, path in ref.items():
        if name.endswith(".json"):
            assert json.loads(ours[name].read_text()) == json.loads(path.read_text()), name
        else:
            a, b = nib.load(ours[name]), nib.load(path)
            assert np.array_equal(a.affine, b.affine), name
            assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), name


def _node_of(job_line: str) -> tuple[str, str]:
    """(subject, node) of a job's script: '.../pyscript_<time>_<hierarchy>_<node>.py' (or
    'batchscript_pyscript_..._<node>.sh' of the graph plugins)."""
    match = re.search(r"\.sub_(\w+?)_wf(?:\.qsm_\w+?_wf)?_(\w+)\.(?:py|sh)$", job_line)
    assert match, job_line
    return match.group(1), match.group(2)


def _finished_nodes(out: Path) -> set[tuple[str, str]]:
    """(subject, node) of every node with a result file in the run's work directory."""
    found = set()
    for result in (out / "work").rglob("result_*.pklz"):
        match = re.search(r"/sub_(\w+?)_wf/", str(result))
        if match:
            found.add((match.group(1), result.parent.name))
    return found


def _truncate_nifti(path: Path) -> bytes:
    """Cut a .nii.gz after its header (it still queries as BIDS, loading its data fails);
    returns the original bytes."""
    original = path.read_bytes()
    raw = gzip.decompress(original)
    path.write_bytes(gzip.compress(raw[:400]))
    return original


# ------------------------------------------------------------------------------ cluster runs
@pytest.mark.slow
def test_slurm_failure_is_reported_and_rerun_resubmits_only_the_rest(
    slurm_env, dataset, multiproc_out, tmp_path, capsys
):
    """SLURM plugin: failing nodes are reported with their subject, error and crash file (a
    Python error in sub-02, a job of sub-01 that dies without a result: with its SLURM log);
    the rerun submits only the nodes that did not finish and the outputs equal MultiProc's.
    Every job runs through the --job-template wrapper and asks for its node's CPUs and memory."""
    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    data = {**dataset, "bids": bids}
    bad = bids / "sub-02/anat/sub-02_echo-2_part-phase_MEGRE.nii.gz"
    original = _truncate_nifti(bad)
    log = tmp_path / "jobs.log"
    wrapper = tmp_path / "wrap.sh"
    kill = tmp_path / "kill-sub01-report"
    kill.touch()
    wrapper.write_text(
        f'#!/bin/sh\necho "$SLURM_JOB_ID $2" >> {log}\n'
        f'case "$2" in *sub_01_wf_ds_report.py) if [ -e {kill} ]; then\n'
        '  echo "simulated: job killed" >&2; exit 137; fi;; esac\nexec "$@"\n'
    )
    wrapper.chmod(0o755)
    template = tmp_path / "job.sh"
    template.write_text(f"#!/bin/bash\n#SBATCH --nice=0\n{wrapper} \\\n")
    out = tmp_path / "out"
    extra = ["--plugin", "SLURM", "--slurm-partition", "debug", "--slurm-time", "30"]
    extra += ["--job-template", str(template)]

    assert _app(data, out, *extra) == 1
    err = capsys.readouterr().err
    failed = [ln for ln in err.splitlines() if ln.startswith("  sub-")]
    assert len(failed) == 2, err
    assert failed[0].startswith("  sub-01: ds_report: job ") and "without a result" in failed[0]
    # whichever step reads the damaged echo first fails, naming the file
    assert failed[1].startswith("  sub-02: ") and ": ValueError: " in failed[1]
    assert str(bad) in failed[1] and "cannot read" in failed[1]
    crashes = [Path(c.split()[0]) for c in err.split("crash file: ")[1:]]
    assert [c.exists() for c in crashes] == [True, True]
    assert "sub_02_wf" in crashes[1].read_text()
    assert "job log: " in err and "simulated: job killed" in err
    assert "rerun the same command" in err
    deriv = out / "qsmflow"
    assert (deriv / "sub-01/anat/sub-01_Chimap.nii.gz").exists()
    assert not (deriv / "sub-02/anat/sub-02_Chimap.nii.gz").exists()
    first = log.read_text().splitlines()
    finished = _finished_nodes(out)
    assert ("01", "inversion") in finished and ("01", "ds_report") not in finished
    done_sub01 = {p: p.stat().st_mtime_ns for p in (out / "work").rglob("sub_01_wf/**/result_*")}
    assert done_sub01

    # each job asked SLURM for its node's mem_gb / n_procs (and the plugin-wide options)
    jobs = {j["JobId"]: j for j in slurm_env.jobs()}
    job = jobs[next(ln.split()[0] for ln in first if _node_of(ln) == ("01", "unwrap"))]
    shape = nib.load(bad).shape
    unwrap = init_qsm_wf(n_voxels=math.prod(shape), n_echoes=2).get_node("unwrap")
    mem_mib = max(plugins.MIN_JOB_MEM_MIB, math.ceil(1024 * unwrap.mem_gb))
    assert job["MinMemoryNode"] == f"{mem_mib}M" and job["NumCPUs"] == "1"
    assert job["Partition"] == "debug" and job["TimeLimit"] == "00:30:00"
    assert job["JobName"] == f"unwrap.qsm_main_wf.sub_01_wf.qsmflow_wf.{getpass.getuser()}"

    bad.write_bytes(original)
    kill.unlink()
    assert _app(data, out, *extra) == 0
    resubmitted = [_node_of(ln) for ln in log.read_text().splitlines()[len(first) :]]
    # exactly the job steps without a result after the first run, each once
    job_steps = {_node_of(str(p)) for p in (out / "work").rglob("batch/pyscript_*.py")}
    assert len(resubmitted) == len(set(resubmitted))
    assert set(resubmitted) == (job_steps & _finished_nodes(out)) - finished
    assert ("01", "ds_report") in resubmitted and {s for s, _ in resubmitted} == {"01", "02"}
    assert [n for n in resubmitted if n[0] == "01"] == [("01", "ds_report")]
    assert {p: p.stat().st_mtime_ns for p in done_sub01} == done_sub01
    _assert_identical(deriv, multiproc_out)
    assert json.loads((deriv / "sub-02/anat/sub-02_Chimap.json").read_text())["Units"] == "ppm"


@pytest.mark.slow
def test_slurmgraph_failure_rerun_and_outputs(slurm_env, dataset, multiproc_out, tmp_path, capsys):
    """SLURMGraph submits the whole graph and returns. A failing job cancels the jobs waiting on
    it; the next run reports that failure (subject, error, crash file) and submits only the
    steps that did not finish; the outputs equal MultiProc's; a further run submits nothing."""
    bids = tmp_path / "bids"
    shutil.copytree(dataset["bids"], bids)
    data = {**dataset, "bids": bids}
    bad = bids / "sub-02/anat/sub-02_echo-2_part-phase_MEGRE.nii.gz"
    original = _truncate_nifti(bad)
    out = tmp_path / "out"

    def our_jobs() -> dict[str, dict]:
        return {j["JobId"]: j for j in slurm_env.jobs() if str(out) in j.get("Command", "")}

    assert _app(data, out, "--plugin", "SLURMGraph") == 0
    assert "jobs submitted to SLURMGraph" in capsys.readouterr().out
    slurm_env.wait_empty()
    first = our_jobs()
    states = {_node_of(j["Command"]): j["JobState"] for j in first.values()}
    assert len(states) == len(first) > 40
    failed = {k for k, v in states.items() if v == "FAILED"}
    assert len(failed) == 1 and next(iter(failed))[0] == "02"
    not_done = {k for k, v in states.items() if v != "COMPLETED"}
    assert {k[0] for k in not_done} == {"02"} and ("02", "inversion") in not_done
    assert {states[k] for k in not_done - failed} == {"CANCELLED"}

    bad.write_bytes(original)
    assert _app(data, out, "--plugin", "SLURMGraph") == 0
    err = capsys.readouterr().err
    assert "1 step(s) of the previous submission failed:" in err
    assert f"  sub-02: qsm_main_wf.{next(iter(failed))[1]}: ValueError: " in err
    assert str(bad) in err and "crash file: " in err
    slurm_env.wait_empty()
    second = {k: j for k, j in our_jobs().items() if k not in first}
    assert {_node_of(j["Command"]) for j in second.values()} == not_done
    assert {j["JobState"] for j in second.values()} == {"COMPLETED"}
    _assert_identical(out / "qsmflow", multiproc_out)

    assert _app(data, out, "--plugin", "SLURMGraph") == 0
    assert "previous submission" not in capsys.readouterr().err
    slurm_env.wait_empty()
    assert len(our_jobs()) == len(first) + len(second)


@pytest.mark.slow
def test_multiproc_sizes_itself_inside_a_real_allocation(slurm_env, dataset, tmp_path):
    """qsmflow started in an sbatch job with 2 CPUs and 2000 MiB plans MultiProc with them."""
    log = tmp_path / "job.out"
    cmd = [sys.executable, "-m", "qsmflow.cli.run", str(dataset["bids"]), str(tmp_path / "o")]
    cmd += ["participant", "--dry-run"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        ["sbatch", "--wait", "--cpus-per-task=2", "--mem=2000M", f"--output={log}"]
        + ["--wrap", shlex.join(cmd)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + log.read_text()
    job = proc.stdout.split()[-1]
    expected = f"execution: MultiProc (2 processes; {round(0.9 * 2000 / 1024, 2)} GB; "
    assert expected + f"sized from SLURM allocation {job})" in log.read_text()


# ------------------------------------------------------------------------------ bad input
def _args(**kw) -> argparse.Namespace:
    base = dict(
        plugin=None,
        plugin_args=None,
        nprocs=None,
        mem_gb=None,
        slurm_account=None,
        slurm_partition=None,
        slurm_time=None,
        job_template=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_unknown_plugin_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        qsmflow_main([str(tmp_path), str(tmp_path / "o"), "participant", "--plugin", "Slurmm"])
    err = capsys.readouterr().err
    assert "unknown plugin 'Slurmm'" in err and "SLURMGraph" in err
    assert plugins.plugin_name("slurmgraph") == "SLURMGraph"


def test_plugin_args_are_validated(tmp_path):
    f = tmp_path / "args.yml"
    f.write_text("sbatch_args: --qos=low\nmax_job: 10\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) max_job .*allowed: sbatch_args"):
        plugins.plan_execution(_args(plugin="SLURM", plugin_args=str(f)), check=False)
    f.write_text("max_jobs: many\n")
    with pytest.raises(ValueError, match="max_jobs must be int, got 'many'"):
        plugins.plan_execution(_args(plugin="SLURM", plugin_args=str(f)), check=False)
    f.write_text("- n_procs\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        plugins.plan_execution(_args(plugin="MultiProc", plugin_args=str(f)), check=False)
    j = tmp_path / "args.json"
    j.write_text(json.dumps({"sbatch_args": "--qos=low", "poll_sleep_duration": 0.5}))
    ex = plugins.plan_execution(
        _args(plugin="SLURM", plugin_args=str(j), slurm_account="lab"), check=False
    )
    assert ex.plugin_args["sbatch_args"] == "--qos=low --account=lab"
    assert ex.config == {"poll_sleep_duration": 0.5}
    with pytest.raises(ValueError, match="--slurm-account need --plugin SLURM"):
        plugins.plan_execution(_args(plugin="MultiProc", slurm_account="lab"), check=False)
    with pytest.raises(ValueError, match="job template .*none.sh: cannot read"):
        plugins.plan_execution(
            _args(plugin="SLURM", job_template=str(tmp_path / "none.sh")), check=False
        )
    # a template named in --plugin-args is read like --job-template: its trailing newlines go,
    # so that a last line ending in a backslash prefixes the job's command (also in SLURMGraph)
    tpl = tmp_path / "job.sh"
    tpl.write_text("#!/bin/bash\napptainer exec img.sif \\\n\n")
    f.write_text(f"template: {tpl}\n")
    ex = plugins.plan_execution(_args(plugin="SLURMGraph", plugin_args=str(f)), check=False)
    assert ex.plugin_args["template"] == "#!/bin/bash\napptainer exec img.sif \\"
    assert ex.plugin_args["sbatch_args"] == "--kill-on-invalid-dep=yes"
    assert ex.plugin_args["dont_resubmit_completed_jobs"] is True
    tpl.write_text("module load python\n")
    with pytest.raises(ValueError, match="job.sh: a batch script must start with a '#!' line"):
        plugins.plan_execution(_args(plugin="SLURM", job_template=str(tpl)), check=False)


def test_missing_sbatch_and_unreachable_controller(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="'sbatch' not found on PATH"):
        plugins.plan_execution(_args(plugin="SLURMGraph"))
    if shutil.which("scontrol", path=os.defpath + ":/usr/bin") is None:
        pytest.skip("scontrol not installed: the controller check cannot be exercised")
    monkeypatch.setenv("PATH", os.defpath)
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        f"ClusterName=none\nSlurmctldHost=localhost\nSlurmctldPort={_free_ports(1)[0]}\n"
        "AuthType=auth/none\nMessageTimeout=2\nNodeName=localhost\n"
        "PartitionName=p Nodes=localhost\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    with pytest.raises(
        ValueError, match=r"SLURM controller does not answer \(.scontrol ping.: .*DOWN\)"
    ):
        plugins.plan_execution(_args(plugin="SLURM"))


def test_multiproc_sizes_itself_from_the_allocation():
    env = {"SLURM_JOB_ID": "42", "SLURM_CPUS_ON_NODE": "8", "SLURM_MEM_PER_NODE": "16384"}
    ex = plugins.plan_execution(_args(), environ=env)
    assert ex.plugin == "MultiProc" and ex.plugin_args["n_procs"] == 8
    assert ex.plugin_args["memory_gb"] == pytest.approx(0.9 * 16)
    assert "allocation 42" in ex.description
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_CPU": "1000"}
    ex = plugins.plan_execution(_args(), environ=env)
    assert ex.plugin_args["n_procs"] == 4
    assert ex.plugin_args["memory_gb"] == pytest.approx(0.9 * 4000 / 1024, abs=0.01)
    # explicit options win; outside an allocation the default stays Linear
    assert plugins.plan_execution(_args(nprocs=2), environ=env).plugin_args["n_procs"] == 2
    assert plugins.plan_execution(_args(), environ={}).plugin == "Linear"


def test_one_squeue_call_answers_a_polling_round(monkeypatch):
    """The SLURM plugin asks squeue once for all pending jobs, never trusting a listing taken
    before a job was submitted, and falls back to Nipype's per-job check when squeue fails."""

    class FakeNipypeSlurm:
        def __init__(self):
            self.next_id, self.per_job_checks = 100, 0

        def _submit_batchtask(self, scriptfile, node):
            self.next_id += 1
            return self.next_id

        def _is_pending(self, taskid):
            self.per_job_checks += 1
            return True

    plugin = type("SLURMPlugin", (plugins._OneSqueuePerPoll, FakeNipypeSlurm), {})()
    plugin.queue_ttl_s = 0.05
    calls, queue = [], {"101", "102", "103"}

    def fake_squeue(cmd, timeout=30):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="\n".join(sorted(queue)), stderr="")

    monkeypatch.setattr(plugins, "_run_command", fake_squeue)
    ids = [plugin._submit_batchtask(f"s{i}", None) for i in range(3)]
    assert [plugin._is_pending(i) for i in ids] == [True, True, True] and len(calls) == 1
    queue.discard("102")
    time.sleep(plugin.queue_ttl_s + 0.05)
    assert [plugin._is_pending(i) for i in ids] == [True, False, True] and len(calls) == 2
    # a job submitted after the listing needs a new one (else it would look finished)
    queue.add("104")
    assert plugin._is_pending(plugin._submit_batchtask("s3", None)) and len(calls) == 3
    assert calls[0][:3] == ["squeue", "--noheader", "--format=%i"]
    monkeypatch.setattr(
        plugins, "_run_command", lambda cmd, timeout=30: subprocess.CompletedProcess(cmd, 1)
    )
    time.sleep(plugin.queue_ttl_s + 0.05)
    assert plugin._is_pending(ids[0]) and plugin.per_job_checks == 1


def test_batch_plugins_keep_their_nipype_names_and_fixes():
    from nipype.pipeline import plugins as nipype_plugins

    slurm = plugins.plugin_instance("SLURM", {"sbatch_args": "--qos=low"})
    assert type(slurm).__name__ == "SLURMPlugin"  # Nipype derives the plugin's name from it
    assert isinstance(slurm, nipype_plugins.SLURMPlugin)
    assert isinstance(slurm, plugins._OneSqueuePerPoll)
    assert isinstance(slurm, plugins._TracebackLines)
    pbs = plugins.plugin_instance("PBS", {"qsub_args": "-l nodes=1:ppn=2"})
    assert isinstance(pbs, nipype_plugins.PBSPlugin) and isinstance(pbs, plugins._TracebackLines)
    assert not isinstance(pbs, plugins._OneSqueuePerPoll)
    graph = plugins.plugin_instance("SLURMGraph", {"dont_resubmit_completed_jobs": True})
    assert type(graph) is nipype_plugins.SLURMGraphPlugin

    class Base:
        def _get_result(self, taskid):
            return {"result": None, "traceback": "Traceback\nOSError: job 7 vanished\n"}

    fixed = type("X", (plugins._TracebackLines, Base), {})()
    assert fixed._get_result(7)["traceback"] == ["Traceback\n", "OSError: job 7 vanished\n"]


def test_node_resources_become_sbatch_options(tmp_path):
    from qsmflow.workflows import init_qsmflow_wf
    from qsmflow.workflows.pipelines import load_pipeline

    from .test_workflows import _fake_acq

    wf = init_qsmflow_wf(
        acquisitions=[_fake_acq("01"), _fake_acq("02")],
        output_dir=tmp_path,
        raw_root="/data",
        pipeline=load_pipeline("default")[1],
        n_threads=3,
    )
    requests = plugins.set_job_resources(wf, "SLURM")
    unwrap = wf.get_node("sub_01_wf.qsm_main_wf.unwrap")
    mib = math.ceil(unwrap.mem_gb * 1024)
    assert requests["sub_01_wf.qsm_main_wf.unwrap"] == f"--cpus-per-task=3 --mem={mib}M"
    assert unwrap.plugin_args["sbatch_args"].split() == ["--cpus-per-task=3", f"--mem={mib}M"]
    # bookkeeping nodes run on the submitting host, heavy ones are jobs
    sink = wf.get_node("sub_01_wf.ds_main_Chimap_main")
    assert sink.run_without_submitting and "sub_01_wf.ds_main_Chimap_main" not in requests
    assert not unwrap.run_without_submitting and len(requests) >= 2 * 6
    # MultiProc/Linear leave the nodes alone
    assert plugins.set_job_resources(wf, "MultiProc") == {}
