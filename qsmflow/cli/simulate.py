"""``qsmflow-simulate OUT_DIR``: write a simulated multi-echo GRE BIDS dataset with ground truth."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ..simulate import (
    MULTI_ORIENTATION_SUPERSAMPLE,
    ORIENTATIONS_DEG,
    AcquisitionParams,
    simulate_dataset,
)
from ._common import fail, positive_float, positive_int, progress_printer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow-simulate",
        description="Simulate a multi-echo gradient-echo BIDS dataset of a realistic head phantom, "
        "with ground truth (chi in ppm, total/local field in Hz, brain mask, segmentation) under "
        "OUT_DIR/derivatives/qsmflow-simulate.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="dataset folder to create")
    p.add_argument(
        "--subjects", type=positive_int, default=1, help="number of subjects (default 1)"
    )
    p.add_argument(
        "--sessions", type=positive_int, default=1, help="sessions per subject (default 1)"
    )
    p.add_argument(
        "--orientations",
        type=positive_int,
        default=1,
        help=f"head orientations per session, 1-{len(ORIENTATIONS_DEG)} (default 1)",
    )
    p.add_argument("--echoes", type=positive_int, default=4, help="number of echoes (default 4)")
    p.add_argument(
        "--te1", type=positive_float, default=5.0, help="first echo time in ms (default 5)"
    )
    p.add_argument(
        "--delta-te", type=positive_float, default=5.0, help="echo spacing in ms (default 5)"
    )
    p.add_argument(
        "--echo-times",
        type=positive_float,
        nargs="+",
        metavar="MS",
        help="explicit echo times in ms (overrides --echoes/--te1/--delta-te)",
    )
    p.add_argument(
        "--b0", type=positive_float, default=3.0, help="field strength in Tesla (default 3)"
    )
    p.add_argument(
        "--voxel-size",
        type=positive_float,
        nargs="+",
        default=[1.0],
        metavar="MM",
        help="voxel size in mm: one value (isotropic) or three (default 1)",
    )
    p.add_argument(
        "--matrix",
        type=positive_int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="image matrix (default: 176 208 160 mm of field of view / voxel size)",
    )
    p.add_argument(
        "--snr",
        type=positive_float,
        default=80.0,
        help="first-echo SNR in the brain (default 80); 'inf' for no noise",
    )
    p.add_argument(
        "--coils",
        type=int,
        default=0,
        help="number of receive coils for uncombined output (default 0 = combined)",
    )
    p.add_argument(
        "--oblique",
        type=float,
        default=0.0,
        metavar="DEG",
        help="slab tilt about the left-right axis in degrees (default 0)",
    )
    p.add_argument(
        "--supersample",
        type=positive_int,
        metavar="N",
        help="sample the anatomy at N^3 points per voxel and average them (partial volume); "
        f"default {MULTI_ORIENTATION_SUPERSAMPLE} with --orientations > 1, else 1",
    )
    p.add_argument(
        "--wm-anisotropy",
        type=float,
        default=0.0,
        metavar="PPM",
        help="white-matter susceptibility anisotropy chi_parallel - chi_perpendicular in ppm "
        "(e.g. 0.015; default 0: isotropic); adds the true tensor and chi33 to the ground truth",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--nprocs", type=positive_int, default=1, help="FFT threads (default 1)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if it holds a dataset written by qsmflow-simulate",
    )
    return p


def params_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> AcquisitionParams:
    if args.echo_times:
        tes = tuple(t / 1000 for t in args.echo_times)
        if any(b <= a for a, b in zip(tes, tes[1:], strict=False)):
            parser.error("argument --echo-times: echo times must increase")
    else:
        tes = tuple((args.te1 + i * args.delta_te) / 1000 for i in range(args.echoes))
    if len(args.voxel_size) not in (1, 3):
        parser.error("argument --voxel-size: give one value or three")
    vox = tuple(args.voxel_size * 3) if len(args.voxel_size) == 1 else tuple(args.voxel_size)
    if args.matrix:
        matrix = tuple(args.matrix)
    else:
        matrix = tuple(int(round(fov / v)) for fov, v in zip((176, 208, 160), vox, strict=True))
    if min(matrix) < 8:
        parser.error(f"argument --matrix: every size must be >= 8, got {matrix}")
    if args.coils < 0 or args.coils > 64:
        parser.error("argument --coils: must be between 0 and 64")
    if args.orientations > len(ORIENTATIONS_DEG):
        parser.error(f"argument --orientations: at most {len(ORIENTATIONS_DEG)}")
    if abs(args.oblique) > 45:
        parser.error("argument --oblique: must be between -45 and 45 degrees")
    if args.supersample is not None and args.supersample > 6:
        parser.error("argument --supersample: must be between 1 and 6")
    if not 0 <= args.wm_anisotropy <= 0.2:
        parser.error("argument --wm-anisotropy: must be between 0 and 0.2 ppm")
    return AcquisitionParams(
        matrix=matrix,
        voxel_size_mm=vox,
        echo_times_s=tes,
        b0_tesla=args.b0,
        snr=args.snr,
        n_coils=args.coils,
        oblique_deg=args.oblique,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    params = params_from_args(args, parser)
    start = time.perf_counter()
    try:
        out = simulate_dataset(
            args.out_dir,
            params=params,
            n_subjects=args.subjects,
            n_sessions=args.sessions,
            n_orientations=args.orientations,
            seed=args.seed,
            overwrite=args.overwrite,
            n_threads=args.nprocs,
            progress=progress_printer("simulated"),
            wm_anisotropy_ppm=args.wm_anisotropy,
            supersample=args.supersample,
        )
    except (FileExistsError, PermissionError, OSError, ValueError) as exc:
        return fail("qsmflow-simulate", exc)
    print(
        f"qsmflow-simulate: wrote {out} in {time.perf_counter() - start:.1f} s "
        f"(ground truth in {out / 'derivatives' / 'qsmflow-simulate'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
