"""The container image (docker/Dockerfile): it builds, reports its version, and runs the demo.

Building the image takes minutes to tens of minutes, so these tests are opt-in: they run only
when ``QSMFLOW_TEST_CONTAINER=1`` is set AND a container engine answers. The engine is
``QSMFLOW_CONTAINER_ENGINE`` (a command, e.g. ``podman``) or the first of ``docker``, ``podman``
whose ``info`` succeeds. Settings that belong to the machine (OCI runtime, ulimits, a local base
image) stay in the engine's own configuration, e.g. a ``CONTAINERS_CONF`` file for podman as
written by ``docker/setup-podman-debian.sh``; extra arguments can be passed through
``QSMFLOW_CONTAINER_BUILD_ARGS`` and ``QSMFLOW_CONTAINER_RUN_ARGS`` (split like a shell).
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from qsmflow import __version__

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parents[1]
TAG = f"localhost/qsmflow:{__version__}-test"
BUILD_TIMEOUT_S = 3 * 3600
OPT_IN = "QSMFLOW_TEST_CONTAINER"


def _find_engine() -> tuple[str | None, str]:
    """(engine command, "") when a usable engine exists, else (None, why not)."""
    wanted = os.environ.get("QSMFLOW_CONTAINER_ENGINE")
    candidates = [wanted] if wanted else ["docker", "podman"]
    found = [c for c in candidates if shutil.which(c)]
    if not found:
        return None, f"no container engine on PATH (looked for {', '.join(candidates)})"
    if os.environ.get(OPT_IN, "").lower() not in ("1", "true", "yes"):
        return None, (
            f"{' and '.join(found)} on PATH, but building the image takes many minutes: set "
            f"{OPT_IN}=1 to run the container tests (see docker/README.md)"
        )
    errors = []
    for engine in found:
        try:
            info = subprocess.run(
                [engine, "info"], capture_output=True, text=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired:
            errors.append(f"`{engine} info` did not answer within 120 s")
            continue
        if info.returncode == 0:
            return engine, ""
        tail = (info.stderr or info.stdout).strip().splitlines()[-1:] or ["no output"]
        errors.append(f"`{engine} info` failed: {tail[0]}")
    return None, "no usable container engine: " + "; ".join(errors)


@pytest.fixture(scope="module")
def engine() -> str:
    cmd, reason = _find_engine()
    if cmd is None:
        pytest.skip(reason)
    return cmd


@pytest.fixture(scope="module")
def image(engine) -> str:
    """Build docker/Dockerfile from the repository root; the tag of the image."""
    extra = shlex.split(os.environ.get("QSMFLOW_CONTAINER_BUILD_ARGS", ""))
    cmd = [engine, "build", *extra, "-f", "docker/Dockerfile", "-t", TAG, "."]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return TAG


def _run(engine: str, image: str, *args: str, timeout: float = 600):
    """``engine run --rm [options] image [command]``; ``args`` are "options -- command"."""
    extra = shlex.split(os.environ.get("QSMFLOW_CONTAINER_RUN_ARGS", ""))
    opts, rest = _split(args)
    cmd = [engine, "run", "--rm", *extra, *opts, image, *rest]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _split(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split ``args`` at "--" into engine options and the container's command line."""
    if "--" in args:
        i = args.index("--")
        return list(args[:i]), list(args[i + 1 :])
    return [], list(args)


def test_image_reports_the_package_version(engine, image):
    proc = _run(engine, image, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"qsmflow {__version__}"


def test_image_runs_as_a_non_root_user_with_all_tools(engine, image):
    tools = ["qsmflow-demo", "qsmflow-simulate"]
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = cfg.get("options.entry_points", "console_scripts", fallback="")
    if "qsmflow-dicom2bids" in scripts:
        tools.append("qsmflow-dicom2bids")
    checks = " && ".join(f"{t} --help >/dev/null" for t in tools)
    script = f"id -u && {checks} && dcm2niix --version | head -n 1"
    proc = _run(engine, image, "--entrypoint", "sh", "--", "-c", script)
    assert proc.returncode == 0, proc.stderr
    uid, dcm2niix = proc.stdout.strip().splitlines()[:2]
    assert int(uid) != 0
    assert "dcm2niiX version" in dcm2niix


def test_demo_in_the_image_scores_like_the_host(engine, image, tmp_path):
    """The demo (simulate, BIDS App, scoring) inside the image, writing to a host folder."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 1000) writes here whoever runs the test
    demo = ["qsmflow-demo", "/out/demo", "--subjects", "1", "--voxel-size", "2", "--nprocs", "2"]
    proc = _run(
        engine, image, "-v", f"{out}:/out", "--entrypoint", demo[0], "--", *demo[1:], timeout=1800
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    scores = json.loads((out / "demo" / "scores.json").read_text())["sub-01"]
    # same bounds as tests/test_demo.py on the host (measured there: correlation 0.60,
    # DGM linearity 0.07, Dice 0.914)
    assert scores["chi"]["correlation"] > 0.5
    assert scores["chi"]["dgm_linearity"] < 0.2
    assert scores["brain_mask_dice"] > 0.88
    assert (out / "demo/qsmflow/sub-01/anat/sub-01_Chimap.nii.gz").exists()
