"""``qsmflow-demo [OUT_DIR]``: simulate a head, reconstruct QSM from it, and score the result.

Steps: ``qsmflow-simulate`` writes a BIDS dataset with ground truth to ``OUT_DIR/bids``; the
reconstruction reads it through pybids and writes a BIDS derivatives dataset to
``OUT_DIR/qsmflow``; the scores against the ground truth (QSM challenge 2.0 metrics) are printed
and written to ``OUT_DIR/scores.json``.

The reconstruction chain (built-in BET brain extraction, Laplacian unwrapping of the first echo and
of the consecutive echo differences, weighted linear field fit, V-SHARP, TKD, referencing to the
mean) is the demo's route until the Nipype workflows land;
each step is a function in :mod:`qsmflow.algorithms`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import GAMMA_BAR_MHZ_PER_T, __version__
from ..algorithms import metrics
from ..algorithms.background import vsharp
from ..algorithms.bet import bet
from ..algorithms.echoes import fit_field
from ..algorithms.inversion import tkd
from ..algorithms.reference import reference_to_mean
from ..algorithms.unwrap import laplacian_unwrap_echo_differences
from ..io.bids import bids_path, write_dataset_description
from ..io.nifti import b0_direction_from_affine, load_nifti, save_nifti, voxel_sizes, write_json
from ..simulate import AcquisitionParams, simulate_dataset
from ._common import fail, positive_float, positive_int, progress_printer

GT = Path("derivatives") / "qsmflow-simulate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow-demo",
        description="Simulate a multi-echo GRE head dataset, reconstruct QSM, and score it "
        "against the simulation's ground truth.",
    )
    p.add_argument(
        "out_dir",
        nargs="?",
        default="qsmflow-demo",
        metavar="OUT_DIR",
        help="folder for the simulated BIDS data, the derivatives and the scores "
        "(default ./qsmflow-demo)",
    )
    p.add_argument(
        "--voxel-size",
        type=positive_float,
        default=1.0,
        metavar="MM",
        help="isotropic voxel size in mm (default 1)",
    )
    p.add_argument("--snr", type=positive_float, default=80.0, help="first-echo SNR (default 80)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--nprocs", type=positive_int, default=2, help="FFT threads (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT_DIR")
    return p


def _load_echoes(bids_dir: Path, subject: str):
    """Magnitude/phase (x, y, z, echo), echo times (s), B0 (T) and the image of echo 1."""
    import bids

    layout = bids.BIDSLayout(bids_dir, validate=False)
    files = {}
    for part in ("mag", "phase"):
        found = layout.get(
            subject=subject, suffix="MEGRE", part=part, extension=[".nii", ".nii.gz"]
        )
        files[part] = sorted(found, key=lambda f: int(f.get_entities()["echo"]))
    if not files["phase"] or len(files["mag"]) != len(files["phase"]):
        raise FileNotFoundError(
            f"{bids_dir}: expected matching part-mag/part-phase MEGRE echoes for sub-{subject}"
        )
    mags, phases, tes = [], [], []
    for fm, fp in zip(files["mag"], files["phase"], strict=True):
        mags.append(load_nifti(fm.path)[0])
        data, img = load_nifti(fp.path)
        phases.append(data)
        tes.append(float(fp.get_metadata()["EchoTime"]))
    b0 = float(files["phase"][0].get_metadata()["MagneticFieldStrength"])
    ref = load_nifti(files["mag"][0].path)[1]
    return np.stack(mags, -1), np.stack(phases, -1), tes, b0, ref


def reconstruct(bids_dir: Path, out_dir: Path, *, subject: str = "01", n_threads: int = 1) -> dict:
    """Run the demo chain on one subject; write derivatives; return arrays for scoring."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    mag, phase, tes, b0, ref = _load_echoes(bids_dir, subject)
    vox = voxel_sizes(ref.affine)
    b0_dir = b0_direction_from_affine(ref.affine)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    mask = bet(mag[..., 0], vox)
    timings["brain mask (BET)"] = time.perf_counter() - t
    t = time.perf_counter()
    unwrapped = laplacian_unwrap_echo_differences(phase, vox, n_threads=n_threads)
    timings["unwrap (Laplacian)"] = time.perf_counter() - t
    t = time.perf_counter()
    fit = fit_field(unwrapped, mag, tes, b0_tesla=b0, mask=mask, weighting="mag2")
    timings["field fit"] = time.perf_counter() - t
    t = time.perf_counter()
    local, local_mask = vsharp(fit.field_ppm, mask, vox, n_threads=n_threads)
    timings["background (V-SHARP)"] = time.perf_counter() - t
    t = time.perf_counter()
    chi = tkd(local, local_mask, vox, b0_dir, n_threads=n_threads)
    chi = reference_to_mean(chi, local_mask)
    timings["inversion (TKD)"] = time.perf_counter() - t

    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * b0
    deriv = out_dir / "qsmflow"
    write_dataset_description(
        deriv,
        "qsmflow demo reconstruction",
        dataset_type="derivative",
        generated_by={
            "Name": "qsmflow",
            "Version": __version__,
            "Description": "demo chain: BET, Laplacian unwrap, weighted fit, V-SHARP, TKD",
        },
        source_datasets=[{"URL": bids_dir.absolute().as_uri()}],
        extra={"Authors": ["qsmflow developers", "qsmflow-demo"]},
    )
    (deriv / "README.md").write_text(
        "# qsmflow demo reconstruction\n\nSusceptibility (ppm), total and local field maps (Hz) "
        "and masks reconstructed by `qsmflow-demo` from the simulated dataset it names as source.\n"
    )
    source = (
        f"bids:raw:{bids_path({'sub': subject, 'echo': 1, 'part': 'phase'}, 'MEGRE').as_posix()}"
    )
    common = {
        "SkullStripped": False,
        "Sources": [source],
        "MagneticFieldStrength": b0,
        "SpatialReference": source,
    }
    ent = {"sub": subject}
    outs = [
        (
            chi,
            "Chimap",
            {},
            "anat",
            {
                "Units": "ppm",
                "SkullStripped": True,
                "Description": "Magnetic susceptibility",
                "Method": "TKD (Shmueli 2009), threshold 0.19, corrected",
                "Reference": "mean over the V-SHARP mask",
            },
        ),
        (
            mask,
            "mask",
            {"desc": "brain"},
            "anat",
            {"Type": "Brain", "Method": "BET (Smith 2002)", "Description": "Brain mask"},
        ),
        (
            local_mask,
            "mask",
            {"desc": "local"},
            "anat",
            {
                "Type": "ROI",
                "Description": "Brain mask eroded by V-SHARP; where the local field is valid",
            },
        ),
        (
            fit.field_ppm * np.float32(hz_per_ppm),
            "fieldmap",
            {},
            "fmap",
            {
                "Units": "Hz",
                "Description": "Total field",
                "Method": "Laplacian unwrapping + weighted linear fit over TE",
            },
        ),
        (mag[..., 0], "magnitude", {}, "fmap", {"Description": "First-echo magnitude"}),
        (
            local * np.float32(hz_per_ppm),
            "fieldmap",
            {"desc": "local"},
            "fmap",
            {"Units": "Hz", "Description": "Local field", "Method": "V-SHARP (Wu 2012)"},
        ),
        (
            mag[..., 0],
            "magnitude",
            {"desc": "local"},
            "fmap",
            {"Description": "First-echo magnitude"},
        ),
    ]
    for data, suffix, extra, datatype, side in outs:
        rel = bids_path({**ent, **extra}, suffix, datatype=datatype)
        save_nifti(data, ref.affine, deriv / rel)
        write_json({**common, **side}, deriv / rel.with_name(rel.name.replace(".nii.gz", ".json")))
    return {
        "chi": chi,
        "local": local,
        "local_mask": local_mask,
        "bet_mask": mask,
        "field_ppm": fit.field_ppm,
        "timings": timings,
    }


def score(bids_dir: Path, recon: dict, subject: str = "01") -> dict:
    """QSM challenge 2.0 metrics of the reconstruction against the simulation's ground truth."""
    gt = bids_dir / GT

    def truth(entities, suffix, datatype="anat"):
        rel = bids_path({"sub": subject, **entities}, suffix, datatype=datatype)
        side = json.loads((gt / rel.with_name(rel.name.replace(".nii.gz", ".json"))).read_text())
        return load_nifti(gt / rel)[0], side

    chi_true, _ = truth({}, "Chimap")
    brain = truth({"desc": "brain"}, "mask")[0] > 0
    seg = np.rint(truth({"desc": "phantom"}, "dseg")[0]).astype(np.int32)
    local_hz, side = truth({"desc": "local"}, "fieldmap", "fmap")
    local_true_ppm = local_hz / np.float32(GAMMA_BAR_MHZ_PER_T * side["MagneticFieldStrength"])
    return {
        # scored over the TRUE brain mask: voxels a step dropped count as errors
        "chi": metrics.score(recon["chi"], chi_true, brain, seg),
        "brain_mask_dice": float(
            2 * (brain & recon["bet_mask"]).sum() / (brain.sum() + recon["bet_mask"].sum())
        ),
        "local_field_nrmse_percent": metrics.nrmse_demeaned(
            recon["local"], local_true_ppm, recon["local_mask"] & brain
        ),
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
            f"qsmflow-demo: simulating a {params.matrix} head at {vox} mm into {bids_dir}",
            file=sys.stderr,
        )
        simulate_dataset(
            bids_dir,
            params=params,
            seed=args.seed,
            overwrite=True,
            n_threads=args.nprocs,
            progress=progress_printer("simulated"),
        )
        print("qsmflow-demo: reconstructing", file=sys.stderr)
        recon = reconstruct(bids_dir, out, n_threads=args.nprocs)
        scores = score(bids_dir, recon)
    except (FileExistsError, PermissionError, OSError, ValueError) as exc:
        return fail("qsmflow-demo", exc)
    scores["timings_s"] = {k: round(v, 2) for k, v in recon["timings"].items()}
    write_json(scores, out / "scores.json")
    chi = scores["chi"]
    rows = [
        ("NRMSE (demeaned) %", chi["nrmse"]),
        ("NRMSE (detrended) %", chi["nrmse_detrend"]),
        ("HFEN %", chi["hfen"]),
        ("XSIM", chi["xsim"]),
        ("correlation", chi["correlation"]),
        ("deep grey NRMSE %", chi["nrmse_dgm"]),
        ("DGM linearity |1-slope|", chi["dgm_linearity"]),
        ("coverage of true brain", chi["coverage"]),
        ("local field NRMSE %", scores["local_field_nrmse_percent"]),
        ("brain mask Dice (BET)", scores["brain_mask_dice"]),
    ]
    print("\nqsmflow-demo scores (chi vs simulation ground truth, inside the brain mask)")
    for name, val in rows:
        print(f"  {name:<26} {val:8.3f}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in scores["timings_s"].items()))
    print(
        f"\nqsmflow-demo: done in {time.perf_counter() - start:.0f} s. Outputs: {out / 'qsmflow'}; "
        f"scores: {out / 'scores.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
