"""DICOM to BIDS: plan the names, convert each volume with dcm2niix, scale phase, write BIDS.

Each volume (one part, echo and receive coil of an acquisition) is converted on its own: links
to its files (or, for an enhanced multi-frame file holding several volumes, a copy of just its
frames) go into a private folder that dcm2niix converts, so the output is known to be that
volume whatever dcm2niix calls it. Then

* Philips magnitude is taken as precise floating-point values (dcm2niix ``-p y``) and phase
  as display values (``-p n``);
* phase is converted to radians with the vendor's encoding
  (:func:`qsmflow.algorithms.echoes.phase_scaling.phase_to_radians`): Siemens
  ``-4096..4095`` (RescaleSlope 2, RescaleIntercept -4096) or raw ``0..4095``; Philips display
  values in radians or milliradians from RescaleSlope/RescaleIntercept (dcm2niix ``-p n``); GE
  milliradians; anything else detected from the data range. Siemens integer phase is stored
  as int16 with a NIfTI scale of pi/4096 (or pi/2048) rad per step: exactly the DICOM values;
* GE real/imaginary pairs become magnitude ``|re + i im|`` and phase ``angle(re + i im)``;
* phase polarity: GE images have the opposite handedness to Siemens and Philips (GE phase,
  and the phase of GE real/imaginary pairs, runs the other way for the same field; the MEDI
  toolbox reads GE with phase sign +1 and Siemens/Philips with -1, QSMxT negates GE phase on
  import). With ``phase_polarity="auto"`` GE phase is negated, so that every vendor gives
  qsmflow's convention (DESIGN.md section 2: a positive field offset accrues positive phase
  with TE, as Siemens and Philips store it); ``"keep"`` and ``"invert"`` override it. The phase
  sidecar records what was done (``PhasePolarityInverted``);
* GE slice chop: GE's 3-D reconstruction can leave an extra pi of phase on every other slice
  (the MEDI toolbox's GE reader negates every other slice, QSMxT shifts GE k-space by half
  the slices). In GE scans that are not 2-D (MRAcquisitionType) it is detected from the data
  (neighbouring slices of the first echo anti-correlated, :func:`detect_slice_chop`) and
  undone by negating the complex values of the slices of odd rank along the slice normal;
  the phase sidecar records it (``SliceChopCorrected``);
* uncombined receive channels are stacked along a 4th (coil) axis, in coil-name order, as
  MCPC-3D-S (Eckstein et al., MRM 2018) expects;
* images and JSON sidecars are written atomically under the names planned by
  :mod:`qsmflow.dicom.naming`; existing files are never replaced unless ``overwrite``.

The DICOM folder is only read.
"""

from __future__ import annotations

import gzip
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..io.bids import write_dataset_description, write_tsv
from ..io.nifti import atomic_path, read_json, write_json
from .naming import OutputFile, PlannedAcquisition, load_mapping, plan_names
from .sort import Acquisition, DicomScan, SeriesInfo, Volume, find_acquisitions, scan_dicom

__all__ = [
    "PHASE_POLARITIES",
    "ConversionResult",
    "Plan",
    "convert_plan",
    "detect_slice_chop",
    "dicom_to_bids",
    "phase_encoding",
    "phase_inverted",
    "plan_dicom_to_bids",
]

Progress = Callable[[int, int, str], None]


@dataclass
class Plan:
    """What a DICOM folder holds and what will be written from it."""

    dicom_dir: Path
    n_files: int
    scan: DicomScan
    planned: list[PlannedAcquisition]
    skipped: list[tuple[Acquisition, str]]

    @property
    def planned_paths(self) -> list[Path]:
        return [out.path for plan in self.planned for out in plan.outputs]

    def summary(self, bids_dir: str | os.PathLike | None = None) -> str:
        """Human-readable report: files not used (with why), acquisitions skipped, names."""
        scan = self.scan
        lines = [
            f"{self.dicom_dir}: {self.n_files} file(s), {len(scan.images)} MR image(s) in "
            f"{len(scan.series)} series"
        ]
        if scan.non_dicom:
            lines.append(f"skipped {len(scan.non_dicom)} non-DICOM file(s):")
            lines += [f"  {p}" for p in scan.non_dicom]
        if scan.corrupt:
            lines.append(f"{len(scan.corrupt)} corrupt DICOM file(s) (not used):")
            lines += [f"  {p}: {why}" for p, why in scan.corrupt]
        if scan.ignored:
            lines.append(f"ignored {len(scan.ignored)} DICOM file(s) that are not MR images:")
            lines += [f"  {p}: {why}" for p, why in scan.ignored]
        for acq, why in self.skipped:
            lines.append(f"not converted: {acq.description}: {why}")
        root = Path(bids_dir) if bids_dir is not None else None
        for plan in self.planned:
            lines += [f"note: {n}" for n in plan.acquisition.notes]
            if plan.acquisition.info.vendor == "ge" and any(
                o.part == "phase" for o in plan.outputs
            ):
                lines.append(
                    "note: GE phase is negated (opposite handedness; --phase-polarity keep "
                    "keeps it) and a pi on every other slice is undone where detected"
                )
            lines.append(f"{plan.acquisition.description} ->")
            for out in plan.outputs:
                exists = root is not None and (root / out.path).exists()
                lines.append(f"  {out.path}" + ("  [exists]" if exists else ""))
        return "\n".join(lines)


@dataclass
class ConversionResult:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def plan_dicom_to_bids(
    dicom_dir: str | os.PathLike,
    *,
    participant_label: str | None = None,
    session: str | None = None,
    mapping_file: str | os.PathLike | None = None,
    acq_rules: Sequence[tuple[str, str]] = (),
    repeats: str = "run",
    progress: Progress | None = None,
    n_procs: int = 1,
) -> Plan:
    """Scan ``dicom_dir`` (headers only, ``n_procs`` processes), sort it and plan the names."""
    mapping = load_mapping(mapping_file)
    dicom_dir = Path(dicom_dir).absolute()

    def scanned(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, "read DICOM headers")

    scan = scan_dicom(dicom_dir, progress=scanned, n_procs=n_procs)
    n_files = len(scan.non_dicom) + len(scan.corrupt) + len(scan.ignored)
    n_files += len({im.path for im in scan.images})
    acquisitions = find_acquisitions(scan)
    planned, skipped = plan_names(
        acquisitions,
        participant_label=participant_label,
        session=session,
        mapping=mapping,
        acq_rules=acq_rules,
        repeats=repeats,
    )
    paths = [p for plan in planned for p in (o.path for o in plan.outputs)]
    dupes = sorted({str(p) for p in paths if paths.count(p) > 1})
    if dupes:
        raise ValueError(
            f"two acquisitions would be written to {dupes[0]}; give them different acq labels "
            "with a mapping file or --acq-label"
        )
    return Plan(dicom_dir, n_files, scan, planned, skipped)


# ------------------------------------------------------------------------------ phase scaling
#: ``phase_polarity`` choices: invert GE phase only (auto), never (keep), always (invert).
PHASE_POLARITIES = ("auto", "keep", "invert")


def phase_inverted(info: SeriesInfo, phase_polarity: str = "auto") -> bool:
    """Whether the phase of a series is negated on conversion (see the module docstring)."""
    if phase_polarity not in PHASE_POLARITIES:
        raise ValueError(
            f"phase_polarity must be one of {list(PHASE_POLARITIES)}, got {phase_polarity!r}"
        )
    if phase_polarity == "auto":
        return info.vendor == "ge"
    return phase_polarity == "invert"


def _polarity_sidecar(info: SeriesInfo, inverted: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"PhasePolarityInverted": inverted}
    if inverted:
        why = "GE images have the opposite handedness" if info.vendor == "ge" else "requested"
        out["PhasePolarityNote"] = (
            f"phase negated on conversion ({why}): a positive frequency offset gives phase "
            "increasing with echo time, as Siemens and Philips store it"
        )
    return out


def detect_slice_chop(signal: np.ndarray) -> bool:
    """True when neighbouring slices (axis 2) of complex images are anti-correlated.

    Phase varies smoothly from slice to slice, so ``sum s[:, :, k + 1] * conj(s[:, :, k])``
    points near 0 rad; an extra pi on every other slice turns it near pi. ``signal`` is
    (x, y, z[, coil]) complex (any scale); all voxels and channels are summed.
    """
    if signal.shape[2] < 2:
        return False
    prod = signal[:, :, 1:] * np.conj(signal[:, :, :-1])
    return float(prod.real.sum(dtype=np.float64)) < 0


def _odd_slices(img, volume: Volume) -> np.ndarray:
    """(z,) bool: the NIfTI slices (axis 2) of odd rank along the DICOM slice normal."""
    orient = np.asarray(volume.images[0].orientation, dtype=np.float64)
    normal_ras = np.cross(orient[:3], orient[3:]) * [-1.0, -1.0, 1.0]  # LPS -> RAS
    n = img.shape[2]
    rank = np.arange(n) if float(img.affine[:3, 2] @ normal_ras) >= 0 else n - 1 - np.arange(n)
    return rank % 2 == 1


def _negate_steps(steps: np.ndarray, slope: float) -> np.ndarray:
    """``-steps`` of integer phase (``steps * slope`` rad in [-pi, pi)), wrapped to the same
    range: the exact integer form of :func:`~qsmflow.algorithms.echoes.flip_polarity`."""
    half = int(round(np.pi / slope))
    out = -steps.astype(np.int32)
    out[out >= half] -= 2 * half
    return out.astype(np.int16)


def phase_encoding(info: SeriesInfo, rescale: tuple[float, float]) -> str:
    """Name of the phase encoding (see ``PHASE_ENCODINGS``) of a vendor's display values.

    ``rescale`` is the images' (RescaleSlope, RescaleIntercept); the values are those after
    rescaling, as dcm2niix writes them (Philips display values with ``-p n``).
    """
    slope, inter = rescale
    if info.vendor == "siemens":
        if abs(slope - 2) < 1e-6 and abs(inter + 4096) < 1e-3:
            return "-4096..4095"
        if abs(slope - 1) < 1e-6 and abs(inter) < 1e-6:
            return "0..4095"
    elif info.vendor == "philips":
        if abs(inter + np.pi) < 1e-2:
            return "radians"
        if abs(inter + 1000 * np.pi) < 10:
            return "milliradians"
    elif info.vendor == "ge":
        return "milliradians"
    return "auto"


def _to_radians(data: np.ndarray, encoding: str, where: str) -> np.ndarray:
    from ..algorithms.echoes.phase_scaling import phase_to_radians

    try:
        return phase_to_radians(data, encoding=encoding)
    except ValueError:
        if encoding == "auto":
            raise
    try:  # the vendor's usual encoding does not fit: fall back to the data range
        return phase_to_radians(data, encoding="auto")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


#: Integer phase encodings stored losslessly as int16 with a NIfTI scale: encoding ->
#: (slope in rad per step, shift added to the value); radians = (value + shift) * slope.
_INT_PHASE = {"-4096..4095": (np.pi / 4096, 0), "0..4095": (np.pi / 2048, -2048)}


def _phase_as_scaled_ints(display: np.ndarray, encoding: str) -> tuple[np.ndarray, float] | None:
    """Siemens integer phase as (int16 steps, rad per step), or None for other data.

    ``steps * slope`` are the radians :func:`_to_radians` gives (already in ``[-pi, pi)``), so
    the image keeps the scanner's integers: smaller, faster to write and exactly the DICOM
    values. Values outside the encoding's range or not integers fall back to float radians.
    """
    from ..algorithms.echoes.phase_scaling import PHASE_ENCODINGS

    if encoding not in _INT_PHASE:
        return None
    slope, shift = _INT_PHASE[encoding]
    enc = PHASE_ENCODINGS[encoding]
    if display.min() < enc.low or display.max() > enc.high:
        return None
    steps = display + np.float32(shift)
    if not np.array_equal(np.rint(steps), steps):
        return None
    return steps.astype(np.int16), slope


def _write_gz(data: bytes, path: Path) -> None:
    """Gzip ``data`` to ``path`` atomically, with an empty file name and zero time in the gzip
    header (the BIDS validator warns about both: they leak names and are not reproducible)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz:
            gz.write(data)


def _nifti_like(data: np.ndarray, like, slope: float = 1.0):
    """A NIfTI-1 image of ``data`` with the header and geometry of ``like`` (as dcm2niix wrote
    it), qform and sform set to its affine (code 1, scanner) and the given scale slope."""
    import nibabel as nib

    out = nib.Nifti1Image(data, like.affine, header=like.header.copy())
    out.set_data_dtype(data.dtype)
    out.header.set_xyzt_units("mm", "sec")
    out.set_qform(like.affine, code=1)
    out.set_sform(like.affine, code=1)
    out.header.set_slope_inter(slope, 0.0)
    return out


def _save_scaled(steps: np.ndarray, slope: float, like, path: Path) -> None:
    """Write int16 ``steps`` with ``scl_slope = slope`` and the geometry of ``like``."""
    _write_gz(_nifti_like(steps.astype(np.int16), like, slope).to_bytes(), path)


def _save_float(data: np.ndarray, like, path: Path) -> None:
    """Write float32 ``data`` with the geometry of ``like``."""
    _write_gz(_nifti_like(np.asarray(data, dtype=np.float32), like).to_bytes(), path)


# ------------------------------------------------------------------------------ dcm2niix
def _split_frames(path: Path, jobs: list[tuple[list[int], Path]]) -> None:
    """Write subsets of the frames of an enhanced multi-frame file, each to a new file.

    ``jobs`` holds (frame indices, destination) pairs; the source is read once for all of
    them. Compressed pixel data are split into their frames' fragments without decoding.
    """
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    n = int(ds.NumberOfFrames)
    per_frame = list(ds.PerFrameFunctionalGroupsSequence)
    data = ds.PixelData
    compressed = ds.file_meta.TransferSyntaxUID.is_compressed
    if compressed:
        chunks = list(generate_frames(data, number_of_frames=n))
    else:
        size = ds.Rows * ds.Columns * int(ds.get("SamplesPerPixel", 1)) * ds.BitsAllocated // 8
        chunks = [data[i * size : (i + 1) * size] for i in range(n)]
    for frames, dest in jobs:
        if compressed:
            ds.PixelData = encapsulate([chunks[i] for i in frames])
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = b"".join(chunks[i] for i in frames)
        ds.NumberOfFrames = len(frames)
        ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([per_frame[i] for i in frames])
        ds.save_as(dest)


def _prepare_inputs(volumes: list[Volume], work: Path) -> list[Path]:
    """One folder per volume holding its files: links to classic files and whole multi-frame
    files, new files with just the volume's frames otherwise. Returns the folders."""
    import pydicom

    n_frames: dict[Path, int] = {}
    splits: dict[Path, list[tuple[list[int], Path]]] = {}
    folders = []
    for i, volume in enumerate(volumes):
        folder = work / f"v{i:04d}"
        (folder / "in").mkdir(parents=True)
        (folder / "out").mkdir()
        frames: dict[Path, list[int]] = {}
        for im in volume.images:
            frames.setdefault(im.path, [])
            if im.frame is not None:
                frames[im.path].append(im.frame)
        for j, (path, idx) in enumerate(sorted(frames.items())):
            dest = folder / "in" / f"{j:06d}.dcm"
            if idx and path not in n_frames:
                head = pydicom.dcmread(
                    path, stop_before_pixels=True, specific_tags=["NumberOfFrames"]
                )
                n_frames[path] = int(head.get("NumberOfFrames", 1) or 1)
            if idx and sorted(idx) != list(range(n_frames[path])):
                splits.setdefault(path, []).append((sorted(idx), dest))
            else:
                _link(path, dest)
        folders.append(folder)
    for path, jobs in splits.items():
        _split_frames(path, jobs)
    return folders


def _link(src: Path, dest: Path) -> None:
    try:
        os.symlink(os.path.abspath(src), dest)
    except OSError:  # file systems without symlinks
        shutil.copy2(src, dest)


def _run_dcm2niix(volume: Volume, folder: Path) -> tuple[Any, dict]:
    """Convert one volume (its files in ``folder/in``); returns (image, dcm2niix sidecar)."""
    import nibabel as nib

    from ..interfaces.dicom import Dcm2niixVolume

    src, out = folder / "in", folder / "out"
    # The command line comes from the Nipype interface; it is run with subprocess because
    # Nipype's CommandLine.run adds ~0.2 s per call (gc.collect, ldd of the binary, polled I/O)
    # and a conversion runs dcm2niix once per volume (hundreds of times for coil data).
    # Philips: magnitude (and real/imaginary) as precise floating-point values, which are the
    # ones comparable across images with different scalings; phase as display values, which
    # are radians or milliradians (Chenevert et al., Transl Oncol 2014 on Philips scaling)
    iface = Dcm2niixVolume(
        source_dir=str(src),
        output_dir=str(out),
        out_filename="vol",
        philips_float=volume.part != "phase",
    )
    # run in ``folder`` with relative paths, so spaces in the work folder cannot split words
    args = iface.cmdline[len(iface.cmd) :].replace(str(src), "in").replace(str(out), "out")
    argv = [iface.cmd, *shlex.split(args)]
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True)
    stdout = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode not in (0, 1):  # dcm2niix may return 1 after a successful conversion
        raise RuntimeError(f"dcm2niix failed ({proc.returncode}): {stdout.strip()[-600:]}")
    images = sorted(out.glob("*.nii"), key=lambda p: (len(p.name), p.name))
    if not images:
        raise RuntimeError(f"dcm2niix wrote no image: {stdout.strip()[-600:]}")
    main = images[0]  # extra outputs (overlays as _ROI1, ...) have longer names
    sidecar = main.with_suffix(".json")
    meta = read_json(sidecar) if sidecar.exists() else {}
    img = nib.load(str(main))
    return img, meta


# ------------------------------------------------------------------------------ writing
def _check_targets(plan: Plan, bids_dir: Path, overwrite: bool) -> None:
    if bids_dir.exists() and not bids_dir.is_dir():
        raise FileExistsError(f"{bids_dir}: exists and is not a folder; choose another BIDS_DIR")
    try:
        if bids_dir.resolve().is_relative_to(plan.dicom_dir.resolve()):
            raise ValueError(
                f"{bids_dir}: inside DICOM_DIR {plan.dicom_dir}; the DICOM folder is never "
                "written to, choose a BIDS_DIR outside it"
            )
    except OSError:
        pass
    if overwrite:
        return
    existing = [
        str(p)
        for out in (o for plan_ in plan.planned for o in plan_.outputs)
        for p in (out.path, out.sidecar)
        if (bids_dir / p).exists()
    ]
    if existing:
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise FileExistsError(
            f"{bids_dir}: {', '.join(existing[:5])}{more} already exist(s); pass --overwrite to "
            "replace them, or choose other labels (--session, a mapping file)"
        )


def _dataset_files(bids_dir: Path, subjects: list[str]) -> None:
    """dataset_description.json, README and participants.tsv, added to (never replaced)."""
    if not (bids_dir / "dataset_description.json").exists():
        write_dataset_description(
            bids_dir,
            "Converted from DICOM by qsmflow-dicom2bids",
            generated_by={
                "Name": "qsmflow-dicom2bids",
                "Version": __version__,
                "Description": "DICOM sorting with pydicom, conversion with dcm2niix",
            },
        )
    if not any((bids_dir / n).exists() for n in ("README", "README.md", "README.rst")):
        (bids_dir / "README.md").write_text(
            "# DICOM conversion\n\nMulti-echo gradient-echo (and T1w) images converted from "
            f"DICOM by qsmflow-dicom2bids (qsmflow {__version__}) with dcm2niix. Phase is in "
            "radians, a positive frequency offset accruing positive phase (GE phase is negated "
            "on conversion; each phase sidecar's PhasePolarityInverted says whether it was); "
            "uncombined receive channels, where present, are stacked along the 4th axis.\n"
        )
    tsv = bids_dir / "participants.tsv"
    rows: list[dict[str, str]] = []
    columns = ["participant_id"]
    if tsv.exists():
        lines = [ln.split("\t") for ln in tsv.read_text().splitlines() if ln.strip()]
        if lines:
            columns = lines[0]
            rows = [dict(zip(columns, ln, strict=False)) for ln in lines[1:]]
    known = {r.get("participant_id") for r in rows}
    for sub in subjects:
        if f"sub-{sub}" not in known:
            rows.append({"participant_id": f"sub-{sub}"})
            known.add(f"sub-{sub}")
    write_tsv(rows, tsv, columns)
    if not (bids_dir / "participants.json").exists():
        write_json(
            {"participant_id": {"Description": "Subject label (from the DICOM PatientID)"}},
            bids_dir / "participants.json",
        )


def _sidecar(meta: dict, acq: Acquisition, out: OutputFile, echo_te_ms, extra: dict) -> dict:
    drop = ("EchoNumber", "Units") + (
        ("CoilString",) if "ReceiveCoilActiveElements" in extra else ()
    )
    side = {k: v for k, v in meta.items() if k not in drop}
    if echo_te_ms is not None:
        side["EchoTime"] = round(float(echo_te_ms) / 1000, 8)
    if len(acq.echoes) > 1 and out.echo is not None:
        side["EchoNumber"] = out.echo
    if "MagneticFieldStrength" not in side and acq.info.b0_tesla:
        side["MagneticFieldStrength"] = acq.info.b0_tesla
    if out.part == "phase":
        side["Units"] = "rad"
    side.update(extra)
    return side


def _volumes_to_convert(plan: PlannedAcquisition) -> tuple[list[Volume], bool]:
    """The volumes dcm2niix must convert for the planned outputs; True when phase and
    magnitude come from real/imaginary pairs."""
    acq = plan.acquisition
    needed = {(o.part, o.echo) for o in plan.outputs}
    parts = set(acq.parts)
    want_phase = "phase" in {p for p, _ in needed}
    from_complex = want_phase and not ({"mag", "phase"} <= parts)
    if from_complex and not {"real", "imag"} <= parts:
        raise ValueError(f"{acq.description}: needs magnitude and phase or real and imaginary")
    use = {"real", "imag"} if from_complex else ({"mag", "phase"} if want_phase else {"mag"})
    echoes = {e for _, e in needed}
    return [v for v in acq.volumes if v.part in use and v.echo in echoes], from_complex


def _convert_acquisition(
    plan: PlannedAcquisition,
    bids_dir: Path,
    work: Path,
    n_threads: int,
    progress: Callable[[str], None] | None,
    phase_polarity: str = "auto",
) -> list[Path]:
    from ..algorithms.echoes import flip_polarity

    acq = plan.acquisition
    volumes, from_complex = _volumes_to_convert(plan)
    invert = phase_inverted(acq.info, phase_polarity)

    folders = _prepare_inputs(volumes, work)

    def run(item):
        folder, vol = item
        res = _run_dcm2niix(vol, folder)
        if progress is not None:
            progress(f"dcm2niix {vol.part} echo {vol.echo}" + (f" {vol.coil}" if vol.coil else ""))
        return res

    with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
        results = list(pool.map(run, zip(folders, volumes, strict=True)))
    converted = {(v.part, v.echo, v.coil): r for v, r in zip(volumes, results, strict=True)}
    first_img = results[0][0]
    for v, (img, _) in zip(volumes, results, strict=True):
        where = f"{acq.description} {v.part} echo {v.echo}"
        if img.shape[:3] != first_img.shape[:3] or (len(img.shape) > 3 and img.shape[3] != 1):
            raise ValueError(
                f"{where}: dcm2niix gave shape {img.shape}, other volumes {first_img.shape}"
            )
        n_slices = img.shape[2] if len(img.shape) >= 3 else 1
        if n_slices != acq.n_slices:
            raise ValueError(f"{where}: dcm2niix converted {n_slices} of {acq.n_slices} slices")
        if not np.allclose(img.affine, first_img.affine, atol=1e-3):
            raise ValueError(f"{where}: geometry differs from the other volumes")

    coils = acq.coils  # in natural order: H1, H2, ..., H10

    def load(part, echo):
        arrays = []
        for coil in coils:
            img, _ = converted[(part, echo, coil)]
            arrays.append(np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]))
        return np.stack(arrays, axis=3) if len(arrays) > 1 else arrays[0]

    def complex_signal(echo):
        if from_complex:
            return load("real", echo) + 1j * load("imag", echo)
        vol = next(v for v in volumes if v.part == "phase" and v.echo == echo)
        enc = phase_encoding(acq.info, vol.images[0].rescale)
        phase = _to_radians(load("phase", echo), enc, f"{acq.description} phase")
        return load("mag", echo) * np.exp(1j * phase)

    # GE slice chop (from the 3-D Fourier transform, so not in 2-D scans), decided once per
    # acquisition from its first echo
    chopped = None
    chop_possible = acq.info.vendor == "ge" and acq.info.acquisition_type != "2D"
    if chop_possible and any(o.part == "phase" for o in plan.outputs):
        first = min(o.echo for o in plan.outputs if o.part == "phase")
        if detect_slice_chop(complex_signal(first)):
            vol0 = next(v for v in volumes if v.echo == first)
            chopped = _odd_slices(converted[(vol0.part, first, coils[0])][0], vol0)

    def write(out: OutputFile) -> Path:
        src_part = ("real" if from_complex else out.part) if out.part else "mag"
        img, meta = converted[(src_part, out.echo, coils[0])]
        vol = next(v for v in volumes if v.part == src_part and v.echo == out.echo)
        extra: dict[str, Any] = {}
        if coils != [None]:
            extra["ReceiveCoilActiveElements"] = ",".join(str(c) for c in coils)
            extra["CoilCombinationMethod"] = "none: one channel per volume along the 4th axis"
        if out.part == "phase":
            extra.update(_polarity_sidecar(acq.info, invert))
            if chop_possible:
                extra["SliceChopCorrected"] = chopped is not None
        if from_complex:
            signal = load("real", out.echo) + 1j * load("imag", out.echo)
            if chopped is not None and out.part == "phase":
                signal[:, :, chopped] *= -1
            data = np.abs(signal) if out.part == "mag" else np.angle(signal)
            data = data.astype(np.float32)
            extra["ImageType"] = ["DERIVED", "PRIMARY", "M" if out.part == "mag" else "P"]
            if out.part == "phase":
                data = _to_radians(data, "radians", str(out.path))
                data = flip_polarity(data) if invert else data
        elif out.part == "phase":
            enc = phase_encoding(acq.info, vol.images[0].rescale)
            display = load("phase", out.echo)
            scaled = _phase_as_scaled_ints(display, enc)
            if scaled is not None:
                steps = _negate_steps(scaled[0], scaled[1]) if invert else scaled[0]
                _save_scaled(steps, scaled[1], img, bids_dir / out.path)
                write_json(
                    _sidecar(meta, acq, out, vol.echo_time_ms, extra), bids_dir / out.sidecar
                )
                return bids_dir / out.path
            data = _to_radians(display, enc, f"{acq.description} phase")
            if chopped is not None:  # add pi to the chopped slices ([0, 2 pi) -> [-pi, pi))
                shifted = data[:, :, chopped] + np.float32(np.pi)
                data[:, :, chopped] = _to_radians(shifted, "0..2pi", str(out.path))
            data = flip_polarity(data) if invert else data
        else:
            data = None if coils == [None] else load("mag", out.echo)
        target = bids_dir / out.path
        if data is None:  # magnitude as dcm2niix wrote it: its bytes, gzipped (no rescaling)
            _write_gz(Path(img.get_filename()).read_bytes(), target)
        else:
            _save_float(data, img, target)
        write_json(_sidecar(meta, acq, out, vol.echo_time_ms, extra), bids_dir / out.sidecar)
        return target

    # gzip and numpy release the GIL: outputs are written in parallel too
    new = [o for o in plan.outputs if not (bids_dir / o.path).exists()]
    try:
        with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
            return list(pool.map(write, plan.outputs))
    except BaseException:
        # leave no half-converted acquisition behind (files that existed before are kept)
        for o in new:
            (bids_dir / o.path).unlink(missing_ok=True)
            (bids_dir / o.sidecar).unlink(missing_ok=True)
        raise


def convert_plan(
    plan: Plan,
    bids_dir: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    n_threads: int = 1,
    progress: Progress | None = None,
    phase_polarity: str = "auto",
) -> ConversionResult:
    """Write the planned acquisitions into ``bids_dir`` (created, or added to).

    Refuses (``FileExistsError``, nothing written) when a planned file exists and not
    ``overwrite``. An acquisition that fails to convert is reported in the result's ``failed``
    (label, reason) and the others still run. ``n_threads`` dcm2niix runs go in parallel.
    ``phase_polarity`` (``auto``: GE phase negated; ``keep``; ``invert``) see the module
    docstring.
    """
    if phase_polarity not in PHASE_POLARITIES:
        raise ValueError(
            f"phase_polarity must be one of {list(PHASE_POLARITIES)}, got {phase_polarity!r}"
        )
    bids_dir = Path(bids_dir).absolute()
    _check_targets(plan, bids_dir, overwrite)
    result = ConversionResult()
    if not plan.planned:
        return result
    bids_dir.mkdir(parents=True, exist_ok=True)
    _dataset_files(bids_dir, sorted({p.entities["sub"] for p in plan.planned}))
    total = 0
    for p in plan.planned:
        try:
            total += len(_volumes_to_convert(p)[0])
        except ValueError:
            pass
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total), total, label)

    tmp_root = Path(work_dir) if work_dir is not None else None
    if tmp_root is not None:
        tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qsmflow-dcm2niix-", dir=tmp_root))
    try:
        for i, planned in enumerate(plan.planned):
            label = "_".join(f"{k}-{v}" for k, v in planned.entities.items() if v is not None)
            try:
                result.written += _convert_acquisition(
                    planned, bids_dir, work / f"a{i:03d}", n_threads, step, phase_polarity
                )
            except (RuntimeError, ValueError, OSError) as exc:
                result.failed.append((f"{label} ({planned.acquisition.description})", str(exc)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def dicom_to_bids(
    dicom_dir: str | os.PathLike,
    bids_dir: str | os.PathLike,
    *,
    participant_label: str | None = None,
    session: str | None = None,
    mapping_file: str | os.PathLike | None = None,
    acq_rules: Sequence[tuple[str, str]] = (),
    repeats: str = "run",
    overwrite: bool = False,
    n_threads: int = 1,
    progress: Progress | None = None,
    phase_polarity: str = "auto",
) -> tuple[Plan, ConversionResult]:
    """Sort ``dicom_dir`` and convert it into the BIDS dataset ``bids_dir``."""
    plan = plan_dicom_to_bids(
        dicom_dir,
        participant_label=participant_label,
        session=session,
        mapping_file=mapping_file,
        acq_rules=acq_rules,
        repeats=repeats,
        progress=progress,
        n_procs=n_threads,
    )
    result = convert_plan(
        plan,
        bids_dir,
        overwrite=overwrite,
        n_threads=n_threads,
        progress=progress,
        phase_polarity=phase_polarity,
    )
    return plan, result
