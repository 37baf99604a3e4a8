"""``qsmflow-demo [OUT_DIR]``: simulate heads, run the qsmflow BIDS App on them, score the result.

Steps: ``qsmflow-simulate`` writes a BIDS dataset with ground truth to ``OUT_DIR/bids``
(two subjects by default); the ``qsmflow`` BIDS App reconstructs every subject in parallel
(MultiProc) into the derivatives dataset ``OUT_DIR/qsmflow``; each subject's chi is scored
against its ground truth with the QSM challenge 2.0 metrics, printed as a table and written to
``OUT_DIR/scores.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import GAMMA_BAR_MHZ_PER_T
from ..algorithms import metrics
from ..io.bids import bids_path
from ..io.nifti import load_nifti, write_json
from ..simulate import AcquisitionParams, simulate_dataset
from ._common import fail, positive_float, positive_int, progress_printer
from .run import main as qsmflow_main

GT = Path("derivatives") / "qsmflow-simulate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow-demo",
        description="Simulate multi-echo GRE heads, run the qsmflow BIDS App on them, and score "
        "the susceptibility maps against the simulation's ground truth.",
    )
    p.add_argument(
        "out_dir",
        nargs="?",
        default="qsmflow-demo",
        metavar="OUT_DIR",
        help="folder for the simulated BIDS data, the derivatives and the scores "
        "(default ./qsmflow-demo)",
    )
    p.add_argument("--subjects", type=positive_int, default=2, help="subjects (default 2)")
    p.add_argument(
        "--voxel-size",
        type=positive_float,
        default=1.5,
        metavar="MM",
        help="isotropic voxel size in mm (default 1.5)",
    )
    p.add_argument("--snr", type=positive_float, default=80.0, help="first-echo SNR (default 80)")
    p.add_argument("--pipeline", default="default", help="qsmflow preset or JSON file")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--nprocs", type=positive_int, default=2, help="parallel processes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT_DIR")
    return p


def score_subject(bids_dir: Path, deriv: Path, subject: str) -> dict:
    """QSM challenge 2.0 metrics of one subject's chi against the ground truth (true mask)."""
    gt = bids_dir / GT

    def truth(entities, suffix, datatype="anat"):
        return load_nifti(gt / bids_path({"sub": subject, **entities}, suffix, datatype=datatype))[
            0
        ]

    chi_true = truth({}, "Chimap")
    brain = truth({"desc": "brain"}, "mask") > 0
    seg = np.rint(truth({"desc": "phantom"}, "dseg")).astype(np.int32)
    chi = load_nifti(deriv / bids_path({"sub": subject}, "Chimap"))[0]
    local_mask = load_nifti(deriv / bids_path({"sub": subject, "desc": "local"}, "mask"))[0] > 0
    bet_mask = load_nifti(deriv / bids_path({"sub": subject, "desc": "brain"}, "mask"))[0] > 0
    hz_local = load_nifti(
        deriv / bids_path({"sub": subject, "desc": "local"}, "fieldmap", datatype="fmap")
    )[0]
    true_hz = truth({"desc": "local"}, "fieldmap", "fmap")
    side = json.loads(
        (
            gt
            / bids_path(
                {"sub": subject, "desc": "local"}, "fieldmap", extension=".json", datatype="fmap"
            )
        ).read_text()
    )
    hz_per_ppm = np.float32(GAMMA_BAR_MHZ_PER_T * side["MagneticFieldStrength"])
    return {
        # scored over the TRUE brain mask: voxels a step eroded count as errors
        "chi": metrics.score(chi, chi_true, brain, seg),
        # and over the voxels the pipeline reconstructed (its local-field mask)
        "chi_in_local_mask": metrics.score(chi, chi_true, local_mask & brain, seg),
        "local_field_nrmse_percent": metrics.nrmse_demeaned(
            hz_local / hz_per_ppm, true_hz / hz_per_ppm, local_mask & brain
        ),
        "brain_mask_dice": float(2 * (brain & bet_mask).sum() / (brain.sum() + bet_mask.sum())),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir).absolute()
    bids_dir = out / "bids"
    vox = args.voxel_size
    params = AcquisitionParams(
        matrix=tuple(int(round(f / vox)) for f in (176, 208, 160)),
        voxel_size_mm=(vox, vox, vox),
        snr=args.snr,
    )
    start = time.perf_counter()
    try:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(
                f"{out}: exists and is not empty; pass --overwrite or choose another OUT_DIR"
            )
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"qsmflow-demo: simulating {args.subjects} head(s) {params.matrix} at {vox} mm "
            f"into {bids_dir}",
            file=sys.stderr,
        )
        simulate_dataset(
            bids_dir,
            params=params,
            n_subjects=args.subjects,
            seed=args.seed,
            overwrite=True,
            n_threads=args.nprocs,
            progress=progress_printer("simulated"),
        )
        t_sim = time.perf_counter() - start
        print("qsmflow-demo: running the qsmflow BIDS App", file=sys.stderr)
        rc = qsmflow_main(
            [
                str(bids_dir),
                str(out),
                "participant",
                "--nprocs",
                str(args.nprocs),
                "--pipeline",
                args.pipeline,
                "--work-dir",
                str(out / "work"),
            ]
        )
        if rc != 0:
            return rc
        t_run = time.perf_counter() - start - t_sim
        subjects = [f"{s + 1:02d}" for s in range(args.subjects)]
        scores = {f"sub-{s}": score_subject(bids_dir, out / "qsmflow", s) for s in subjects}
    except (FileExistsError, PermissionError, OSError, ValueError) as exc:
        return fail("qsmflow-demo", exc)
    scores["timings_s"] = {"simulate": round(t_sim, 1), "qsmflow": round(t_run, 1)}
    write_json(scores, out / "scores.json")
    rows = [
        ("NRMSE (demeaned) %", "nrmse"),
        ("NRMSE (detrended) %", "nrmse_detrend"),
        ("HFEN %", "hfen"),
        ("XSIM", "xsim"),
        ("correlation", "correlation"),
        ("deep grey NRMSE %", "nrmse_dgm"),
        ("DGM linearity |1-slope|", "dgm_linearity"),
        ("coverage of true brain", "coverage"),
    ]
    header = "".join(f"{'sub-' + s:>10}" for s in subjects)
    print("\nqsmflow-demo: chi vs ground truth (inside the true brain mask)")
    print(f"  {'metric':<26}{header}")
    for name, key in rows:
        print(
            f"  {name:<26}" + "".join(f"{scores['sub-' + s]['chi'][key]:10.3f}" for s in subjects)
        )
    print(
        f"  {'NRMSE in local mask %':<26}"
        + "".join(f"{scores['sub-' + s]['chi_in_local_mask']['nrmse']:10.3f}" for s in subjects)
    )
    for name, key in (
        ("local field NRMSE %", "local_field_nrmse_percent"),
        ("brain mask Dice", "brain_mask_dice"),
    ):
        print(f"  {name:<26}" + "".join(f"{scores['sub-' + s][key]:10.3f}" for s in subjects))
    print(
        f"\nqsmflow-demo: done in {time.perf_counter() - start:.0f} s (simulation {t_sim:.0f} s, "
        f"qsmflow {t_run:.0f} s). Outputs: {out / 'qsmflow'}; scores: {out / 'scores.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
