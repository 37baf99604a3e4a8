"""``qsmflow BIDS_DIR OUTPUT_DIR participant``: the QSM BIDS App."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from . import plugins
from ._common import fail, positive_float, positive_int


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow",
        description="Quantitative susceptibility mapping of a BIDS dataset of multi-echo GRE "
        "magnitude/phase images; writes a BIDS derivatives dataset to OUTPUT_DIR/qsmflow.",
    )
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="root of the input BIDS dataset")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="where qsmflow/ (derivatives) goes")
    p.add_argument("analysis_level", choices=["participant"], help="only 'participant'")
    p.add_argument(
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="subjects to process (with or without 'sub-'); default all",
    )
    p.add_argument("--session-label", nargs="+", metavar="LABEL", help="sessions to process")
    p.add_argument(
        "--bids-filter-file",
        metavar="FILE",
        help="JSON object of pybids entity filters for the GRE query (e.g. acquisition)",
    )
    p.add_argument(
        "--pipeline",
        default="default",
        metavar="PRESET|FILE.json",
        help="a preset name (see --list-pipelines) or a pipeline JSON file",
    )
    p.add_argument("--list-pipelines", action="store_true", help="print the presets and exit")
    p.add_argument(
        "--derivatives",
        nargs="+",
        metavar="DIR",
        help="existing derivatives datasets: segmentations (*_dseg) found there on the "
        "acquisition's grid add an ROI table to the report; see --use-existing-masks",
    )
    p.add_argument(
        "--use-existing-masks",
        action="store_true",
        help="reuse brain masks (*_desc-brain_mask) from --derivatives instead of computing them",
    )
    p.add_argument(
        "--work-dir",
        metavar="DIR",
        help="Nipype work directory (default OUTPUT_DIR/work); rerunning with the "
        "same one resumes an interrupted run",
    )
    p.add_argument(
        "--nprocs",
        type=positive_int,
        help="processes for MultiProc (default 1, or the CPUs of the SLURM allocation)",
    )
    p.add_argument("--mem-gb", type=positive_float, help="memory limit for MultiProc (GB)")
    p.add_argument("--omp-nthreads", type=positive_int, default=1, help="threads per node")
    plugins.add_execution_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--version", action="version", version=f"qsmflow {__version__}")
    return p


def _print_presets() -> None:
    from ..workflows.pipelines import presets

    for name, options in presets().items():
        print(f"{name}: {options.get('description', '')}")
        for key, value in options.items():
            if key != "description":
                print(f"    {key} = {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if "--list-pipelines" in argv:
        _print_presets()
        return 0
    args = parser.parse_args(argv)
    try:
        return _run(args, list(argv))
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return fail("qsmflow", exc)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..io.bids import collect_acquisitions, write_dataset_description
    from ..io.nifti import write_json
    from ..workflows import init_qsmflow_wf
    from ..workflows.base import check_coil_combination
    from ..workflows.pipelines import load_pipeline

    bids_dir = Path(args.bids_dir).absolute()
    out_root = Path(args.output_dir).absolute()
    if out_root == bids_dir:
        raise ValueError(
            f"{out_root}: OUTPUT_DIR must differ from BIDS_DIR (inputs are never written)"
        )
    pipeline_name, pipeline = load_pipeline(args.pipeline)
    # plugin, its arguments and the batch system are checked before any work starts
    execution = plugins.plan_execution(args)
    filters = None
    if args.bids_filter_file:
        try:
            filters = json.loads(Path(args.bids_filter_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{args.bids_filter_file}: cannot read the filter JSON ({exc})"
            ) from exc
        if not isinstance(filters, dict):
            raise ValueError(f"{args.bids_filter_file}: expected a JSON object of entity filters")
    acquisitions, problems = collect_acquisitions(
        bids_dir,
        participant_labels=args.participant_label,
        session_labels=args.session_label,
        filters=filters,
    )
    for sub, message in problems.items():
        print(f"qsmflow: skipping sub-{sub}: {message}", file=sys.stderr)
    if not acquisitions:
        raise ValueError(f"{bids_dir}: no usable multi-echo GRE data found")
    if args.use_existing_masks and not args.derivatives:
        raise ValueError("--use-existing-masks needs --derivatives DIR (where the masks are)")
    if args.derivatives:
        from ..io.bids import find_derivatives

        acquisitions = find_derivatives(
            acquisitions, args.derivatives, masks=args.use_existing_masks
        )
        if args.use_existing_masks:
            missing = [a.label for a in acquisitions if a.mask is None]
            if missing:
                raise ValueError(
                    f"--use-existing-masks: no *_desc-brain_mask on the data's grid in "
                    f"{', '.join(args.derivatives)} for {', '.join(missing)}"
                )

    print(f"qsmflow {__version__}: pipeline '{pipeline_name}', {len(acquisitions)} acquisition(s):")
    for acq in acquisitions:
        print(f"  {acq.label}: {len(acq.phase)} echoes, {acq.b0_tesla} T, grid {acq.shape}")
        if acq.n_coils:
            print(
                f"    {acq.n_coils} uncombined receive coils: combined with "
                f"{check_coil_combination(pipeline, acq)} first"
            )
        for what, path in (("mask", acq.mask), ("segmentation", acq.segmentation)):
            if path:
                print(f"    existing {what}: {path}")
    print(f"execution: {execution.description}")
    if args.dry_run:
        return 0

    deriv = out_root / "qsmflow"
    work = Path(args.work_dir).absolute() if args.work_dir else out_root / "work"
    deriv.mkdir(parents=True, exist_ok=True)
    write_dataset_description(
        deriv,
        "qsmflow QSM derivatives",
        dataset_type="derivative",
        generated_by={
            "Name": "qsmflow",
            "Version": __version__,
            "Description": f"pipeline {pipeline_name}",
        },
        source_datasets=[{"URL": bids_dir.as_uri()}],
        extra={"Authors": ["qsmflow developers", "qsmflow users"]},
    )
    from ..reports import BIDSIGNORE_PATTERNS

    (deriv / ".bidsignore").write_text("\n".join(BIDSIGNORE_PATTERNS) + "\n")
    if not (deriv / "README.md").exists():
        (deriv / "README.md").write_text(
            "# qsmflow derivatives\n\nQuantitative susceptibility maps computed by qsmflow "
            f"{__version__} from the source dataset named in dataset_description.json.\n\n"
            "- `anat/*_Chimap`: magnetic susceptibility in ppm (see each sidecar for the "
            "methods and the reference region)\n"
            "- `anat/*_desc-brain_mask`, `anat/*_desc-local_mask`: brain mask and the region "
            "where the local field and chi are valid\n"
            "- `anat/*_R2starmap`: R2* in Hz\n"
            "- `fmap/*_fieldmap` and `fmap/*_desc-local_fieldmap`: total and local field in Hz, "
            "each with its first-echo `_magnitude`\n"
            "- `sub-<label>.html`: quality-control report with figures in `sub-<label>/figures/`\n"
        )
    write_json(
        {"command": shlex.join(["qsmflow", *argv]), "pipeline": pipeline, "version": __version__},
        out_root / "qsmflow-command.json",
    )

    from ..workflows.citations import citations_for

    (out_root / "qsmflow-citations.md").write_text(
        "# Methods used by this qsmflow run\n\n"
        + "\n".join(
            f"- {c}" for c in citations_for(pipeline, coils=any(a.n_coils for a in acquisitions))
        )
        + "\n"
    )
    wf = init_qsmflow_wf(
        acquisitions=acquisitions,
        output_dir=deriv,
        raw_root=bids_dir,
        pipeline=pipeline,
        n_threads=args.omp_nthreads,
    )
    wf.base_dir = str(work)
    plugins.configure_workflow(wf, execution, crash_dir=work / "crashes")
    start, started_at = time.perf_counter(), time.time()
    try:
        plugins.run_workflow(wf, execution, status_callback=_Progress(wf))
    except RuntimeError as exc:
        failures = plugins.read_failures(work / "crashes", since=started_at)
        if not failures:
            raise ValueError(f"the workflow failed without crash files ({exc})") from exc
        plugins.report_failures(failures)
        return 1
    if execution.detached:
        print(
            f"qsmflow: jobs submitted to {execution.plugin}; outputs appear in {deriv} as they "
            f"finish and crash files in {work / 'crashes'}; rerun the same command afterwards "
            "to resubmit only what did not finish"
        )
        return 0
    print(f"qsmflow: finished in {time.perf_counter() - start:.0f} s; outputs in {deriv}")
    for sub in sorted({a.subject for a in acquisitions}):
        print(f"  report: {deriv / f'sub-{sub}.html'}")
    return 0


class _Progress:
    """Nipype status callback printing one line per finished step: ``[done/total] node``.

    A class rather than a closure so that nodes holding it (MapNodes pickle themselves) can be
    pickled.
    """

    def __init__(self, wf) -> None:
        # identity nodes are bypassed at run time and report no status
        self.total = sum(
            1 for n in wf._create_flat_graph().nodes() if n.name not in ("inputnode", "outputnode")
        )
        self.done = 0

    def __call__(self, node, status) -> None:
        if status == "end":
            self.done += 1
            print(f"[{self.done}/{self.total}] {node.fullname}", file=sys.stderr, flush=True)
        elif status == "exception":
            print(f"[failed] {node.fullname}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
