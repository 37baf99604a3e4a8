"""Sort a folder of DICOM files into acquisitions, volumes and slices, from headers only.

Every file is read with ``pydicom.dcmread(..., stop_before_pixels=True)``; pixel data are left
to dcm2niix. Each 2-D image (a classic file, or one frame of an enhanced multi-frame file) is
classified by

* part: magnitude / phase / real / imaginary, from the enhanced ``ComplexImageComponent``, the
  GE private image type (0043,102F) (0 magnitude, 1 phase, 2 real, 3 imaginary), the Philips
  private image type (2005,1011) or the ImageType values (Siemens ``M``/``P``, Philips
  ``M_FFE``/``P_FFE``, ``PHASE``, ``REAL``, ``IMAGINARY``);
* echo: rank of its echo time within the acquisition (EchoNumbers when no echo time is given);
* receive coil: the Siemens coil element string (0051,100F), the CSA ``ImaCoilString``, or the
  one element marked used in the standard MR Receive Coil macro (MRReceiveCoilSequence >
  MultiCoilDefinitionSequence), per frame in enhanced files or at the top level of classic
  files (how GE and Philips channel images are identified here, one series per channel); an
  acquisition whose images carry several elements at one slice position holds uncombined
  channels, and the separate series of its channels are grouped like the parts of one scan;
* slice: the position of ImagePositionPatient along the slice normal.

Images are grouped into acquisitions by patient, study, protocol, acquisition start time and
geometry, so Siemens' separate magnitude and phase series of one scan come together while
repeated scans of one protocol (runs, head orientations) stay apart.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Acquisition",
    "DicomScan",
    "Image",
    "SeriesInfo",
    "Volume",
    "find_acquisitions",
    "scan_dicom",
]

#: SOP classes of images we sort (MR Image, Enhanced MR Image, Enhanced MR Color excluded).
_MR_CLASSES = {"1.2.840.10008.5.1.4.1.1.4": False, "1.2.840.10008.5.1.4.1.1.4.1": True}
_PART_TOKENS = {
    "P": "phase",
    "PHASE": "phase",
    "P_FFE": "phase",
    "P_SE": "phase",
    "P_IR": "phase",
    "R": "real",
    "REAL": "real",
    "R_FFE": "real",
    "I": "imag",
    "IMAGINARY": "imag",
    "I_FFE": "imag",
    "M": "mag",
    "MAGNITUDE": "mag",
    "M_FFE": "mag",
    "M_SE": "mag",
    "M_IR": "mag",
}
_GE_PARTS = {0: "mag", 1: "phase", 2: "real", 3: "imag"}
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


@dataclass(frozen=True)
class SeriesInfo:
    """Header values shared by the images of one DICOM series."""

    series_uid: str
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    series_number: int
    description: str
    protocol: str
    manufacturer: str
    b0_tesla: float | None
    acquisition_time: str
    image_type: tuple[str, ...]
    multiframe: bool
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    transfer_syntax: str
    #: MRAcquisitionType: "2D", "3D" or "" (not given)
    acquisition_type: str = ""

    @property
    def vendor(self) -> str:
        """``siemens``, ``ge``, ``philips`` or ``other`` from the Manufacturer."""
        m = self.manufacturer.lower()
        for key, name in (("siemens", "siemens"), ("ge ", "ge"), ("philips", "philips")):
            if key in m + " ":
                return name
        return "other"

    @property
    def derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0].upper() == "DERIVED"


@dataclass(frozen=True)
class Image:
    """One 2-D image: a classic file or frame ``frame`` (0-based) of a multi-frame file."""

    path: Path
    frame: int | None
    series_uid: str
    part: str
    echo_number: int | None
    echo_time_ms: float | None
    coil: str | None
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    rescale: tuple[float, float]
    acquisition_time: str = ""


@dataclass
class Volume:
    """The images of one (part, echo, coil) of an acquisition, sorted along the slice normal."""

    part: str
    echo: int
    echo_time_ms: float | None
    coil: str | None
    images: list[Image]

    @property
    def files(self) -> list[Path]:
        return sorted({im.path for im in self.images})


@dataclass
class Acquisition:
    """One scan: its volumes, the series it came from, and problems that block conversion."""

    series: list[SeriesInfo]
    volumes: list[Volume]
    n_slices: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def info(self) -> SeriesInfo:
        return self.series[0]

    @property
    def parts(self) -> list[str]:
        return sorted({v.part for v in self.volumes})

    @property
    def echoes(self) -> list[int]:
        return sorted({v.echo for v in self.volumes})

    @property
    def coils(self) -> list[str | None]:
        return _natural_sorted({v.coil for v in self.volumes})

    @property
    def echo_times_ms(self) -> list[float | None]:
        tes = {}
        for v in self.volumes:
            tes.setdefault(v.echo, v.echo_time_ms)
        return [tes[e] for e in sorted(tes)]

    @property
    def description(self) -> str:
        info = self.info
        nums = ",".join(str(s.series_number) for s in self.series)
        return (
            f"series {nums} '{info.description or info.protocol}' "
            f"({info.vendor}, {len(self.echoes)} echo(es), parts {'/'.join(self.parts)}"
            + (f", {len(self.coils)} coils" if self.coils != [None] else "")
            + f", {self.n_slices} slices)"
        )


@dataclass
class DicomScan:
    """What a folder holds: images by series, and the files that were not used, with why."""

    images: list[Image]
    series: dict[str, SeriesInfo]
    non_dicom: list[Path]
    corrupt: list[tuple[Path, str]]
    ignored: list[tuple[Path, str]]


def _natural_key(value: Any) -> tuple:
    """Sort key that orders H2 before H10 (numbers inside names compared as numbers)."""
    if value is None:
        return ()
    return tuple(
        (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(value))
    )


def _natural_sorted(values: Iterable[Any]) -> list[Any]:
    return sorted(values, key=_natural_key)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    return str(value).strip().strip("\x00").strip()


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _private(ds, group: int, creator: str, element: int) -> Any:
    """Value of a private element, or None (missing creator or element).

    Looks the creator up slot by slot (plain tag lookups): pydicom's ``private_block`` slices
    the dataset, which made it a fifth of the header-reading time.
    """
    for slot in range(0x10, 0x100):
        tag = (group << 16) | slot
        if tag not in ds:
            continue
        if _text(ds[tag].value) == creator:
            item = (group << 16) | (slot << 8) | element
            return ds[item].value if item in ds else None
    return None


def _ge_image_type(ds) -> str | None:
    value = _private(ds, 0x0043, "GEMS_PARM_01", 0x2F)
    if value is None:
        return None
    if isinstance(value, bytes):  # implicit VR files give raw bytes
        if len(value) < 2:
            return None
        value = int.from_bytes(value[:2], "little", signed=True)
    try:
        return _GE_PARTS.get(int(value))
    except (TypeError, ValueError):
        return None


def _classify_part(ds, frame=None) -> str:
    """``mag``, ``phase``, ``real`` or ``imag`` of a dataset (or of one enhanced frame)."""
    if frame is not None:
        for seq in ("MRImageFrameTypeSequence", "FrameVOILUTSequence"):
            items = frame.get(seq)
            if items:
                comp = _text(items[0].get("ComplexImageComponent")).upper()
                if comp in ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY"):
                    return _PART_TOKENS[comp]
    comp = _text(ds.get("ComplexImageComponent")).upper()
    if comp in ("MAGNITUDE", "PHASE", "REAL", "IMAGINARY"):
        return _PART_TOKENS[comp]
    ge = _ge_image_type(ds)
    if ge is not None:
        return ge
    philips = _text(_private(frame if frame is not None else ds, 0x2005, _PHILIPS, 0x11))
    if not philips and frame is not None:
        philips = _text(_private(ds, 0x2005, _PHILIPS, 0x11))
    if philips.upper() in ("M", "P", "R", "I"):
        return _PART_TOKENS[philips.upper()]
    for token in ds.get("ImageType") or ():
        part = _PART_TOKENS.get(_text(token).upper())
        if part is not None and part != "mag":
            return part
    return "mag"


_PHILIPS = "Philips MR Imaging DD 001"


def _coil_string(ds) -> str | None:
    """Receive-coil element of a classic image: Siemens (0051,100F), else the CSA
    ImaCoilString, else the one used element of a top-level MR Receive Coil macro."""
    value = _text(_private(ds, 0x0051, "SIEMENS MR HEADER", 0x0F))
    if not value and "MRReceiveCoilSequence" in ds:
        value = _frame_coil(ds) or ""
    if not value and (0x0029, 0x1010) in ds:
        try:
            with warnings.catch_warnings():  # nibabel.nicom warns that it is experimental
                warnings.simplefilter("ignore")
                from nibabel.nicom import csareader

            csa = csareader.get_csa_header(ds, "image")
            items = csa["tags"].get("ImaCoilString", {}).get("items") if csa else None
            value = _text(items[0]) if items else ""
        except Exception:  # a malformed CSA header only loses the coil name
            value = ""
    return value or None


def _frame_coil(frame) -> str | None:
    """Receive-coil element of an enhanced frame (or a classic dataset): the one element
    marked used in its MR Receive Coil macro (MultiCoilDefinitionSequence), else None."""
    if frame is None:
        return None
    for coil in frame.get("MRReceiveCoilSequence") or ():
        used = [
            _text(el.get("MultiCoilElementName"))
            for el in coil.get("MultiCoilDefinitionSequence") or ()
            if _text(el.get("MultiCoilElementUsed")).upper() == "YES"
        ]
        if len(used) == 1:
            return used[0]
    return None


def _series_info(ds, path: Path, multiframe: bool) -> SeriesInfo:
    spacing = ds.get("PixelSpacing")
    if spacing is None and multiframe:
        spacing = _shared(ds, "PixelMeasuresSequence", "PixelSpacing")
    acq_time = _acquisition_time(ds)
    b0 = _float(ds.get("MagneticFieldStrength"))
    return SeriesInfo(
        series_uid=_text(ds.get("SeriesInstanceUID")),
        study_uid=_text(ds.get("StudyInstanceUID")),
        patient_id=_text(ds.get("PatientID")),
        patient_name=_text(ds.get("PatientName")),
        study_date=_text(ds.get("StudyDate")),
        series_number=int(_float(ds.get("SeriesNumber")) or 0),
        description=_text(ds.get("SeriesDescription")),
        protocol=_text(ds.get("ProtocolName")),
        manufacturer=_text(ds.get("Manufacturer")),
        b0_tesla=b0,
        acquisition_time=acq_time,
        image_type=tuple(_text(t) for t in (ds.get("ImageType") or ())),
        multiframe=multiframe,
        rows=int(ds.get("Rows") or 0),
        columns=int(ds.get("Columns") or 0),
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else (1.0, 1.0),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        acquisition_type=_text(ds.get("MRAcquisitionType")).upper(),
    )


def _acquisition_time(ds) -> str:
    """HHMMSS of the acquisition (AcquisitionTime, else the time of AcquisitionDateTime)."""
    text = _text(ds.get("AcquisitionTime")) or _text(ds.get("AcquisitionDateTime"))[8:]
    return text.split(".")[0].replace(":", "")


def _shared(ds, seq: str, key: str, frame=None) -> Any:
    """A functional-group value: per-frame first, then shared, else None."""
    for groups in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is None:
            continue
        items = groups.get(seq)
        if items and key in items[0]:
            return items[0].get(key)
    return None


def _vector(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _pixel_bytes_missing(fp, ds, path: Path) -> str | None:
    """Why the pixel data of a native-encoded file is incomplete, or None."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts not in _NATIVE:
        return None  # encapsulated (compressed) data: its length is not known up front
    frames = int(_float(ds.get("NumberOfFrames")) or 1)
    expected = (
        int(ds.get("Rows") or 0)
        * int(ds.get("Columns") or 0)
        * int(ds.get("SamplesPerPixel") or 1)
        * int(ds.get("BitsAllocated") or 16)
        // 8
        * frames
    )
    available = os.path.getsize(path) - fp.tell() - 8
    if fp.tell() >= os.path.getsize(path):
        return "no pixel data"
    if available < expected:
        return f"pixel data truncated ({max(available, 0)} of {expected} bytes)"
    return None


def _read_images(path: Path, known: set[str]) -> tuple[SeriesInfo | None, list[Image]] | str:
    """Header of one file as (series info, images), or the reason it is not used.

    The series info is only built for a series not in ``known`` (it is the same for all files
    of a series), else None.
    """
    import pydicom

    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        sop = _text(ds.get("SOPClassUID")) or _text(ds.file_meta.get("MediaStorageSOPClassUID"))
        # every DICOM file names its SOP class with a UID: without one the header is damaged
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", sop) or len(sop) > 64:
            shown = repr(sop[:24]) + ("..." if len(sop) > 24 else "")
            raise ValueError(f"damaged header: no valid SOP class UID ({shown if sop else 'none'})")
        if sop not in _MR_CLASSES:
            modality = _text(ds.get("Modality")) or "unknown modality"
            return f"not an MR image (SOP class {sop or 'missing'}, {modality})"
        missing = _pixel_bytes_missing(fp, ds, path)
    if missing:
        raise ValueError(missing)
    multiframe = _MR_CLASSES[sop]
    series_uid = _text(ds.get("SeriesInstanceUID"))
    if not series_uid:
        raise ValueError("no SeriesInstanceUID")
    info = None if series_uid in known else _series_info(ds, path, multiframe)
    images = []
    if not multiframe:
        orient = _vector(ds.get("ImageOrientationPatient"), 6) or (1.0, 0, 0, 0, 1.0, 0)
        pos = _vector(ds.get("ImagePositionPatient"), 3) or (0.0, 0.0, 0.0)
        echo_no = _float(ds.get("EchoNumbers"))
        images.append(
            Image(
                path=path,
                frame=None,
                series_uid=series_uid,
                part=_classify_part(ds),
                echo_number=int(echo_no) if echo_no else None,
                echo_time_ms=_float(ds.get("EchoTime")),
                coil=_coil_string(ds),
                position=pos,
                orientation=orient,
                rescale=(
                    _float(ds.get("RescaleSlope")) or 1.0,
                    _float(ds.get("RescaleIntercept")) or 0.0,
                ),
                acquisition_time=_acquisition_time(ds),
            )
        )
        return info, images
    when = _acquisition_time(ds)
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(_float(ds.get("NumberOfFrames")) or 1)
    for f in range(n_frames):
        fr = frames[f] if f < len(frames) else None
        orient = _vector(_shared(ds, "PlaneOrientationSequence", "ImageOrientationPatient", fr), 6)
        pos = _vector(_shared(ds, "PlanePositionSequence", "ImagePositionPatient", fr), 3)
        te = _shared(ds, "MREchoSequence", "EffectiveEchoTime", fr)
        slope = _shared(ds, "PixelValueTransformationSequence", "RescaleSlope", fr)
        inter = _shared(ds, "PixelValueTransformationSequence", "RescaleIntercept", fr)
        images.append(
            Image(
                path=path,
                frame=f,
                series_uid=series_uid,
                part=_classify_part(ds, fr),
                echo_number=None,
                echo_time_ms=_float(te),
                coil=_frame_coil(fr),
                # frames without geometry (anonymised files) are stacked in file order
                position=pos if pos is not None else (0.0, 0.0, float(f)),
                orientation=orient or (1.0, 0, 0, 0, 1.0, 0),
                rescale=(_float(slope) or 1.0, _float(inter) or 0.0),
                acquisition_time=when,
            )
        )
    return info, images


def scan_dicom(
    dicom_dir: str | os.PathLike,
    *,
    progress: Callable[[int, int], None] | None = None,
    n_procs: int = 1,
) -> DicomScan:
    """Read the headers of every file under ``dicom_dir`` (recursively, hidden files skipped).

    Files that are not DICOM go to ``non_dicom``; DICOM files that cannot be read (bad header,
    truncated pixel data) to ``corrupt`` with the reason; DICOM files that are not MR images
    (DICOMDIR, presentation states, other modalities) to ``ignored``. Nothing is raised for a
    bad file, so one broken file never stops the run. ``progress(done, total)`` is called
    every 64 files and at the end; ``n_procs`` processes read large folders.
    """

    root = Path(dicom_dir).absolute()
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; DICOM_DIR must be a folder of DICOM files")
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders skipped
        paths += [Path(folder) / f for f in sorted(files) if not f.startswith(".")]
    scan = DicomScan([], {}, [], [], [])
    chunks = [paths[i : i + 64] for i in range(0, len(paths), 64)]
    done = 0
    if n_procs > 1 and len(paths) > 1000:  # below that, starting processes costs more
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with ProcessPoolExecutor(n_procs, mp_context=get_context("spawn")) as pool:
            for chunk, part in zip(chunks, pool.map(_scan_chunk, chunks), strict=True):
                done = _merge(scan, part, done + len(chunk), len(paths), progress)
    else:
        for chunk in chunks:
            done = _merge(scan, _scan_chunk(chunk), done + len(chunk), len(paths), progress)
    return scan


def _scan_chunk(paths: list[Path]) -> DicomScan:
    from pydicom.errors import InvalidDicomError

    scan = DicomScan([], {}, [], [], [])
    for path in paths:
        try:
            result = _read_images(path, set(scan.series))
        except InvalidDicomError:
            scan.non_dicom.append(path)
        except Exception as exc:  # pydicom raises many types for damaged files
            scan.corrupt.append((path, f"{type(exc).__name__}: {exc}"))
        else:
            if isinstance(result, str):
                scan.ignored.append((path, result))
            else:
                info, images = result
                if info is not None:
                    scan.series[info.series_uid] = info
                scan.images.extend(images)
    return scan


def _merge(scan: DicomScan, part: DicomScan, done: int, total: int, progress) -> int:
    scan.images += part.images
    for uid, info in part.series.items():
        scan.series.setdefault(uid, info)
    scan.non_dicom += part.non_dicom
    scan.corrupt += part.corrupt
    scan.ignored += part.ignored
    if progress is not None:
        progress(min(done, total), total)
    return done


# ------------------------------------------------------------------------------ grouping
def _protocol_key(info: SeriesInfo) -> str:
    if info.protocol:
        return info.protocol
    # Siemens names the phase series of a scan after its magnitude series plus a suffix
    return re.sub(r"(_PHA|_PH|_PHASE|_MAG|_M)$", "", info.description, flags=re.IGNORECASE)


def _image_flavour(info: SeriesInfo) -> tuple[str, ...]:
    """ImageType without the part values and NORM: what must agree for series of one scan.

    Siemens' magnitude (``M``) and phase (``P``) series of a scan then match, while its
    distortion-corrected (``DIS2D``) or derived series stay apart. NORM is left out because
    Siemens normalises only the magnitude.
    """
    skip = set(_PART_TOKENS) | {"NORM", "MIXED", "NONE", ""}
    return tuple(t.upper() for t in info.image_type[2:] if t.upper() not in skip)


def _acquisition_key(info: SeriesInfo, image: Image, start: str) -> tuple:
    orient = tuple(round(v, 3) for v in image.orientation)
    # without an acquisition time, series cannot be matched safely: keep each apart
    anchor = start if start else info.series_uid
    return (
        info.patient_id,
        info.study_uid,
        _protocol_key(info),
        anchor,
        info.derived,
        _image_flavour(info),
        orient,
        info.rows,
        info.columns,
        tuple(round(v, 4) for v in info.pixel_spacing),
    )


def _drop_normalised_duplicates(images: list[Image], series: dict[str, SeriesInfo]):
    """Keep one series per part when Siemens wrote it both with and without NORM."""
    by_part: dict[str, set[str]] = {}
    for im in images:
        by_part.setdefault(im.part, set()).add(im.series_uid)
    dropped = set()
    for uids in by_part.values():
        norm = {u for u in uids if "NORM" in (t.upper() for t in series[u].image_type)}
        if norm and norm != uids:
            dropped |= norm
    kept = [im for im in images if im.series_uid not in dropped]
    notes = [
        f"series {series[u].series_number} ({series[u].description}) not used: the same images "
        "without NORM are used instead"
        for u in sorted(dropped)
    ]
    return kept, notes


def find_acquisitions(scan: DicomScan) -> list[Acquisition]:
    """Group the scanned images into acquisitions and check that each one is complete.

    An acquisition is complete when every (part, echo, coil) volume has the same slice
    positions, the positions are evenly spaced, echoes run 1..N in every part, magnitude and
    phase (or real and imaginary) have the same echoes, and no image is duplicated. Problems
    are listed in :attr:`Acquisition.problems`; such acquisitions must not be converted.
    """
    start: dict[str, str] = {}
    for im in scan.images:
        if im.acquisition_time:
            old = start.get(im.series_uid)
            start[im.series_uid] = min(old, im.acquisition_time) if old else im.acquisition_time
    groups: dict[tuple, list[Image]] = {}
    for im in scan.images:
        key = _acquisition_key(scan.series[im.series_uid], im, start.get(im.series_uid, ""))
        groups.setdefault(key, []).append(im)
    acquisitions = []
    for images in groups.values():
        images, notes = _drop_normalised_duplicates(images, scan.series)
        series_uids = sorted({im.series_uid for im in images})
        series = sorted(
            (scan.series[u] for u in series_uids), key=lambda s: (s.series_number, s.series_uid)
        )
        acq = _build_acquisition(series, images)
        acq.notes = notes
        acquisitions.append(acq)
    acquisitions.sort(
        key=lambda a: (
            a.info.patient_id,
            a.info.study_date,
            a.info.study_uid,
            a.info.acquisition_time,
            a.info.series_number,
        )
    )
    return acquisitions


def _echo_index(images: list[Image]) -> tuple[dict[int, int], dict[int, float | None]]:
    """Echo number (1-based) of each image, by rank of echo time; per echo its time."""
    tes = [im.echo_time_ms for im in images]
    if all(t is not None for t in tes):
        distinct = sorted({round(t, 3) for t in tes})
        rank = {t: i + 1 for i, t in enumerate(distinct)}
        index = {id(im): rank[round(im.echo_time_ms, 3)] for im in images}
        return index, {rank[t]: t for t in distinct}
    index = {id(im): im.echo_number or 1 for im in images}
    times: dict[int, float | None] = {}
    for im in images:
        times.setdefault(index[id(im)], im.echo_time_ms)
    return index, times


def _build_acquisition(series: list[SeriesInfo], images: list[Image]) -> Acquisition:
    problems: list[str] = []
    echo_of, te_of = _echo_index(images)
    coils_at: dict[tuple, set] = {}
    for im in images:
        coils_at.setdefault((im.part, echo_of[id(im)], im.position), set()).add(im.coil)
    uncombined = any(len(c) > 1 for c in coils_at.values())
    by_volume: dict[tuple, list[Image]] = {}
    for im in images:
        coil = im.coil if uncombined else None
        by_volume.setdefault((im.part, echo_of[id(im)], coil), []).append(im)
    orient = np.asarray(images[0].orientation, dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    volumes = []
    for (part, echo, coil), ims in sorted(
        by_volume.items(), key=lambda kv: (kv[0][0], kv[0][1], _natural_key(kv[0][2]))
    ):
        ims.sort(key=lambda im: float(np.dot(normal, im.position)))
        volumes.append(Volume(part, echo, te_of.get(echo), coil, ims))

    where = f"series {','.join(str(s.series_number) for s in series)} ({series[0].description})"
    counts = Counter(len(v.images) for v in volumes)
    n_slices = max(counts, key=lambda n: (counts[n], n))
    for v in volumes:
        label = f"{v.part} echo {v.echo}" + (f" coil {v.coil}" if v.coil else "")
        positions = [round(float(np.dot(normal, im.position)), 3) for im in v.images]
        if len(set(positions)) != len(positions):
            numbers = {s.series_uid: s.series_number for s in series}
            from_series = sorted({numbers[im.series_uid] for im in v.images})
            hint = (
                f" (from series {', '.join(map(str, from_series))}: receive channels without "
                "a coil element name, or the same images exported twice?)"
                if len(from_series) > 1
                else ""
            )
            problems.append(f"{where}: {label} has duplicate images at one slice position" + hint)
        elif len(v.images) != max(counts):
            problems.append(
                f"{where}: {label} has {len(v.images)} slices, other volumes {max(counts)} "
                "(missing slices)"
            )
        elif len(positions) > 2:
            gaps = np.diff(positions)
            if gaps.max() > 1.5 * np.median(gaps):
                problems.append(f"{where}: {label} has a gap in its slice positions")
    parts = sorted({v.part for v in volumes})
    echoes_by_part = {p: sorted({v.echo for v in volumes if v.part == p}) for p in parts}
    all_echoes = sorted({v.echo for v in volumes})
    for p, echoes in echoes_by_part.items():
        missing = sorted(set(all_echoes) - set(echoes))
        if missing:
            problems.append(
                f"{where}: {p} images lack echo(es) {missing} present in other parts "
                "(missing echoes)"
            )
    numbers = sorted({im.echo_number for im in images if im.echo_number})
    if numbers and len(numbers) > len(all_echoes) or (numbers and max(numbers) > len(numbers)):
        problems.append(f"{where}: echo numbers {numbers} are not 1..N (missing echoes)")
    if uncombined:
        coils_by = {}
        for v in volumes:
            coils_by.setdefault((v.part, v.echo), set()).add(v.coil)
        ref = max(coils_by.values(), key=len)
        for (p, e), coils in coils_by.items():
            if coils != ref:
                problems.append(f"{where}: {p} echo {e} lacks coil(s) {sorted(ref - coils)}")
    if len({v.part for v in volumes} & {"real", "imag"}) == 1 and "phase" not in parts:
        problems.append(f"{where}: real or imaginary images without their partner")
    return Acquisition(list(series), volumes, n_slices, problems)
