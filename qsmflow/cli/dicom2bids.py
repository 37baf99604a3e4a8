"""``qsmflow-dicom2bids DICOM_DIR BIDS_DIR``: sort scanner DICOM and convert it to BIDS."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._common import fail, positive_int


def _acq_rule(text: str) -> tuple[str, str]:
    pattern, sep, label = text.rpartition("=")
    if not sep or not pattern or not label.isalnum():
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=LABEL with an alphanumeric label (e.g. 'gre_qsm*=qsm'), got {text!r}"
        )
    return pattern, label


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow-dicom2bids",
        description="Sort a folder of scanner DICOM files (multi-echo gradient echo with phase, "
        "T1w) and convert it with dcm2niix into a BIDS dataset: one NIfTI per echo and part, "
        "phase in radians, uncombined coils along the 4th axis. DICOM_DIR is only read.",
    )
    p.add_argument(
        "dicom_dir", metavar="DICOM_DIR", help="folder of DICOM files (searched recursively)"
    )
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="BIDS dataset to create or add to")
    p.add_argument(
        "--participant-label",
        metavar="L",
        help="subject label for all data (default: from PatientID); without 'sub-'",
    )
    p.add_argument(
        "--session",
        metavar="S",
        help="session label for all data (default: none, or the study date when a subject "
        "has several studies); without 'ses-'",
    )
    p.add_argument(
        "--mapping",
        metavar="FILE.json",
        help="JSON rules for labels: {'participants': {PatientID: label}, 'sessions': "
        "{StudyInstanceUID or StudyDate: label}, 'series': [{'match': pattern, 'acq': label, "
        "'suffix': 'T1w', 'skip': false}]}",
    )
    p.add_argument(
        "--acq-label",
        metavar="PATTERN=LABEL",
        type=_acq_rule,
        action="append",
        default=[],
        help="acq label for series whose protocol or description matches PATTERN (shell "
        "pattern, case-insensitive); repeatable",
    )
    p.add_argument(
        "--repeats",
        choices=("run", "acq"),
        default="run",
        help="how repeated scans of one protocol in a session (runs, head orientations) are "
        "named: run-1, run-2, ... (default) or acq-ori1, acq-ori2, ... (what qsmflow's "
        "multi-orientation pipeline groups by default)",
    )
    p.add_argument(
        "--phase-polarity",
        choices=("auto", "keep", "invert"),
        default="auto",
        help="sign of the phase written: 'auto' (default) negates GE phase, whose handedness is "
        "opposite to Siemens and Philips, so that a positive frequency offset accrues positive "
        "phase for every vendor; 'keep' writes the scanner's sign; 'invert' negates all phase. "
        "The phase sidecars record it (PhasePolarityInverted)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the planned file names and write nothing"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace files that already exist in BIDS_DIR"
    )
    p.add_argument(
        "--nprocs",
        type=positive_int,
        default=1,
        help="processes reading headers and parallel dcm2niix runs (default 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _progress(quiet: bool):
    """Header reading updates one line (on a terminal; else one line at the end); each
    converted volume prints its own line."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int, label: str) -> None:
        if quiet:
            return
        if label.startswith("read") and done < total:
            if tty:
                print(f"[{done}/{total}] {label}", end="\r", file=sys.stderr, flush=True)
            return
        print(f"[{done}/{total}] {label}", file=sys.stderr, flush=True)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    from ..dicom.convert import convert_plan, plan_dicom_to_bids

    args = build_parser().parse_args(argv)
    prog = "qsmflow-dicom2bids"
    start = time.perf_counter()
    progress = _progress(args.quiet)
    try:
        plan = plan_dicom_to_bids(
            args.dicom_dir,
            participant_label=args.participant_label,
            session=args.session,
            mapping_file=args.mapping,
            acq_rules=args.acq_label,
            repeats=args.repeats,
            progress=progress,
            n_procs=args.nprocs,
        )
    except (OSError, ValueError) as exc:
        return fail(prog, exc)
    print(plan.summary(args.bids_dir))
    if args.dry_run:
        print(f"{prog}: dry run, nothing written ({len(plan.planned_paths)} file(s) planned)")
        return 0
    if not plan.planned:
        return fail(prog, ValueError(f"{args.dicom_dir}: nothing to convert (see above)"))
    try:
        result = convert_plan(
            plan,
            args.bids_dir,
            overwrite=args.overwrite,
            n_threads=args.nprocs,
            progress=progress,
            phase_polarity=args.phase_polarity,
        )
    except (OSError, ValueError) as exc:
        return fail(prog, exc)
    for label, why in result.failed:
        print(f"{prog}: failed: {label}: {why}", file=sys.stderr)
    print(
        f"{prog}: wrote {len(result.written)} image(s) to {args.bids_dir} in "
        f"{time.perf_counter() - start:.1f} s"
        + (f"; {len(result.failed)} acquisition(s) failed" if result.failed else "")
    )
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
