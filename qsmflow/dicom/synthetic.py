"""Write simulated acquisitions as vendor-flavoured DICOM (test data for the DICOM converter).

The images of a :class:`qsmflow.simulate.SimulatedAcquisition` are stored the way the three big
vendors export multi-echo gradient-echo data, so that sorting and conversion can be checked
against the simulator's ground truth:

* ``siemens``: magnitude and phase in two series (the phase series numbered one higher),
  ImageType ``M``/``P``; phase as 12-bit integers with RescaleSlope 2 and RescaleIntercept
  -4096 (``-4096..4094`` <-> ``-pi..pi``); uncombined receive channels as separate images of
  those series with the coil element name (``H1``, ``H2``, ...) in the private tag
  (0051,100F) and the CSA ``ImaCoilString`` (classic files) or in the per-frame MR Receive
  Coil macro (multi-frame files).
* ``ge``: one series; the private tag (0043,102F) gives the image type (0 magnitude, 1 phase,
  2 real, 3 imaginary); real/imaginary pairs by default, phase in milliradians otherwise.
  GE images have the opposite handedness: the stored phase is ``-phase`` and the stored
  imaginary part ``-imag`` (the complex conjugate), as the MEDI toolbox (phase sign +1 for
  GE, -1 for Siemens/Philips) and QSMxT (GE phase negated on import) read GE data; and
  every other slice carries an extra pi (``slice_chop``, see :class:`DicomFlavour`).
  Uncombined channels: one series per channel (numbered ``series_number + c``) holding the
  channel's parts, the element (``1``, ``2``, ...) named in the standard MR Receive Coil
  macro (MRReceiveCoilSequence > MultiCoilDefinitionSequence, one element used) of each image.
  (dcm2niix reads a coil element only from Siemens' private tag; no GE or Philips private
  element tag is documented, so the element is named in the standard macro, which the
  sorter reads in any file.)
* ``philips``: one series holding both parts; ImageType ``M_FFE``/``P_FFE`` and the private
  (2005,1011); phase in milliradians through RescaleSlope/RescaleIntercept, a private scale
  slope (2005,100E) as Philips writes it. Uncombined channels as for GE (one series per
  element, standard coil macro, elements ``E1``, ``E2``, ...).

Classic (one file per slice) or enhanced multi-frame (one file per series, per-frame functional
groups) storage. Geometry: the NIfTI affine (RAS) is turned into the DICOM patient frame (LPS):
ImageOrientationPatient holds the directions of the array's first and second axes,
ImagePositionPatient the centre of each slice's first voxel.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import GAMMA_BAR_MHZ_PER_T

__all__ = [
    "DicomFlavour",
    "coil_element_names",
    "csa2_header",
    "dicom_geometry",
    "write_simulated_dicom",
]

_LPS = np.diag([-1.0, -1.0, 1.0])
_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
_ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
_MANUFACTURER = {
    "siemens": ("SIEMENS", "Prisma"),
    "ge": ("GE MEDICAL SYSTEMS", "SIGNA Premier"),
    "philips": ("Philips Medical Systems", "Ingenia"),
}
_GE_TYPE = {"mag": 0, "phase": 1, "real": 2, "imag": 3}
#: Coil element names per vendor ({} is the 1-based channel number).
_COIL_NAME = {"siemens": "H{}", "ge": "{}", "philips": "E{}"}
_COIL_TYPE = {"siemens": "Head_32", "ge": "32Ch Head", "philips": "dS Head 32ch"}
_COMPLEX_COMPONENT = {"mag": "MAGNITUDE", "phase": "PHASE", "real": "REAL", "imag": "IMAGINARY"}


@dataclass(frozen=True)
class DicomFlavour:
    """How to store one acquisition.

    Attributes
    ----------
    vendor : {"siemens", "ge", "philips"}
    multiframe : bool
        Enhanced MR Image Storage (one file per series) instead of one file per slice.
    parts : tuple of str
        Image parts to store: ``("mag", "phase")``, for GE ``("real", "imag")``, or
        ``("mag",)`` for a magnitude-only scan (a T1w, say).
    slice_chop : bool
        GE only: every other slice (odd ranks in the order of increasing position along the
        slice normal) carries an extra pi of phase (its complex values negated), as GE's 3-D
        reconstruction leaves them ("z-chop"; undone on import by the MEDI toolbox's GE reader
        and by QSMxT). Ignored for the other vendors.
    """

    vendor: str = "siemens"
    multiframe: bool = False
    parts: tuple[str, ...] = ("mag", "phase")
    slice_chop: bool = True

    def __post_init__(self) -> None:
        if self.vendor not in _MANUFACTURER:
            raise ValueError(f"vendor must be one of {sorted(_MANUFACTURER)}, got {self.vendor!r}")
        if set(self.parts) not in ({"mag", "phase"}, {"real", "imag"}, {"mag"}):
            raise ValueError(
                f"parts must be ('mag', 'phase'), ('real', 'imag') or ('mag',), got {self.parts}"
            )


def coil_element_names(vendor: str, n_coils: int) -> list[str]:
    """The receive-coil element names the synthetic writer gives ``n_coils`` channels."""
    return [_COIL_NAME[vendor].format(c + 1) for c in range(n_coils)]


def _coil_macro(name: str, coil_name: str):
    """The standard MR Receive Coil macro naming one used element (a pydicom Sequence)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    element = Dataset()
    element.MultiCoilElementName = name
    element.MultiCoilElementUsed = "YES"
    coil = Dataset()
    coil.ReceiveCoilName = coil_name
    coil.ReceiveCoilType = "MULTICOIL"
    coil.MultiCoilDefinitionSequence = DicomSequence([element])
    return DicomSequence([coil])


def csa2_header(tags: dict[str, str]) -> bytes:
    """A Siemens CSA2 header (``SV10``) holding string ``tags`` (one item each).

    Layout as read by ``nibabel.nicom.csareader``: magic, tag count, then per tag a 64-byte
    name, VM, VR, SyngoDT, item count, and items of (length, length, 77, length) + padded text.
    """
    import struct

    out = b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, value in tags.items():
        out += struct.pack("<64si4s3i", name.encode(), 1, b"LO\0\0", 19, 1, 77)
        item = value.encode() + b"\0"
        out += struct.pack("<4i", len(item), len(item), 77, len(item))
        out += item + b"\0" * (-len(item) % 4)
    return out


def dicom_geometry(
    affine: np.ndarray, n_slices: int
) -> tuple[list[float], list[float], list[list[float]]]:
    """ImageOrientationPatient, PixelSpacing and per-slice ImagePositionPatient of an affine.

    ``affine`` maps array indices (i, j, k) to RAS mm. DICOM rows run along the array's second
    axis and columns along its first, so slice ``k`` is stored as ``volume[:, :, k].T``; the
    positions are the LPS centres of each slice's first voxel.
    """
    lps = _LPS @ np.asarray(affine, dtype=np.float64)[:3, :]
    vox = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    iop = [round(float(v), 8) for v in (*(lps[:, 0] / vox[0]), *(lps[:, 1] / vox[1]))]
    spacing = [float(vox[1]), float(vox[0])]
    positions = [[round(float(v), 6) for v in lps[:, 2] * k + lps[:, 3]] for k in range(n_slices)]
    return iop, spacing, positions


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _stored(sim, flavour: DicomFlavour, mag_max: float, chopped: np.ndarray):
    """Per part: (integer volumes (x, y, z, echo[, coil]), slope, intercept, signed, bits).

    ``chopped`` (z,) bool: the GE slices that carry an extra pi (with ``slice_chop``).
    """
    out = {}
    signal = None
    phase = sim.phase
    if flavour.vendor == "ge":
        # GE stores the other handedness (conjugate signal, negated phase) and, with
        # slice_chop, an extra pi on every other slice
        extra = np.where(chopped, np.float32(np.pi), np.float32(0)) if flavour.slice_chop else 0
        extra = np.reshape(extra, (1, 1, -1) + (1,) * (phase.ndim - 3))
        phase = np.angle(np.exp(1j * (extra - phase))).astype(np.float32)
    if "real" in flavour.parts:
        signal = sim.magnitude * np.exp(1j * phase)
    for part in flavour.parts:
        if part == "mag":
            slope = mag_max / 4095.0
            data = np.clip(np.rint(sim.magnitude / slope), 0, 4095).astype(np.uint16)
            out[part] = (data, slope, 0.0, False, 12)
        elif part in ("real", "imag"):
            slope = mag_max / 32000.0
            comp = signal.real if part == "real" else signal.imag
            data = np.clip(np.rint(comp / slope), -32767, 32767).astype(np.int16)
            out[part] = (data, slope, 0.0, True, 16)
        elif flavour.vendor == "siemens":
            # 0..4095 after (stored * 2 - 4096) -> -4096..4094 <-> -pi..pi
            data = np.mod(np.rint(sim.phase / np.pi * 2048.0) + 2048, 4096).astype(np.uint16)
            out[part] = (data, 2.0, -4096.0, False, 12)
        elif flavour.vendor == "philips":
            slope = 2000 * np.pi / 4095.0
            data = np.clip(np.rint((sim.phase + np.pi) * 1000 / slope), 0, 4095)
            out[part] = (data.astype(np.uint16), slope, -1000 * np.pi, False, 12)
        else:  # GE: milliradians as signed integers
            data = np.clip(np.rint(phase * 1000), -3142, 3142).astype(np.int16)
            out[part] = (data, 1.0, 0.0, True, 16)
    return out


def write_simulated_dicom(
    sim,
    out_dir: str | os.PathLike,
    flavour: DicomFlavour,
    *,
    patient_id: str = "QSM01",
    study_uid: str | None = None,
    series_number: int = 1,
    protocol: str = "gre_qsm_4echo",
    acquisition_time: str = "120000.000000",
    study_date: str = "20240102",
    omit: Sequence[tuple[str, int, int]] = (),
) -> list[Path]:
    """Write ``sim`` (a :class:`qsmflow.simulate.SimulatedAcquisition`) as DICOM files.

    Parameters
    ----------
    sim : SimulatedAcquisition
        Magnitude and phase (rad), (x, y, z, echo) or (x, y, z, echo, coil).
    out_dir : path
        Folder for the files (created).
    flavour : DicomFlavour
        Vendor, storage and parts.
    patient_id, study_uid, series_number, protocol, acquisition_time, study_date
        Header values; acquisitions of one study share ``study_uid`` (default: from
        ``patient_id``) and differ in ``series_number`` and ``acquisition_time`` (HHMMSS).
    omit : sequence of (part, echo, slice)
        Images not to write (1-based echo, 0-based slice), to make incomplete series.

    Returns
    -------
    list of Path
        The files written.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian

    p = sim.params
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    coils = sim.magnitude.ndim == 5
    n_coils = sim.magnitude.shape[4] if coils else 1
    coil_names = coil_element_names(flavour.vendor, n_coils) if coils else [None]
    nx, ny, nz = sim.magnitude.shape[:3]
    n_echoes = sim.magnitude.shape[3]
    mag_max = float(np.abs(sim.magnitude).max()) * 1.05 or 1.0
    iop, spacing, positions = dicom_geometry(sim.affine, nz)
    normal = np.cross(iop[:3], iop[3:])
    rank = np.argsort(np.argsort([float(np.dot(normal, pos)) for pos in positions]))
    stored = _stored(sim, flavour, mag_max, rank % 2 == 1)
    vox = [float(v) for v in np.sqrt((sim.affine[:3, :3] ** 2).sum(0))]
    manufacturer, model = _MANUFACTURER[flavour.vendor]
    study_uid = study_uid or _uid("study", patient_id, study_date)
    frame_uid = _uid("for", study_uid, series_number)
    omit_set = {(part, int(e), int(k)) for part, e, k in omit}

    # series layout: Siemens writes one series per part (all channels in it), the others one
    # series for all parts, and per-slice files of uncombined channels one series per channel
    per_coil_series = coils and flavour.vendor != "siemens" and not flavour.multiframe

    def series_of(part: str, coil: int) -> int:
        if flavour.vendor == "siemens":
            return series_number + flavour.parts.index(part)
        return series_number + (coil if per_coil_series else 0)

    def common(ds: Dataset, part: str, number: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.Modality = "MR"
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = model
        ds.InstitutionName = "qsmflow synthetic"
        ds.InstitutionAddress = "n/a"
        ds.DeviceSerialNumber = "0"
        ds.ReceiveCoilName = _COIL_TYPE[flavour.vendor]
        ds.StationName = "SIM"
        ds.SoftwareVersions = "qsmflow"
        ds.PatientName = f"Synthetic^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = study_date
        ds.StudyTime = "115500"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = _uid("series", study_uid, number, acquisition_time)
        ds.SeriesNumber = number
        ds.SeriesDate = study_date
        ds.SeriesTime = acquisition_time
        ds.AcquisitionDate = study_date
        ds.AcquisitionTime = acquisition_time
        ds.ContentDate = study_date
        ds.ContentTime = acquisition_time
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ProtocolName = protocol
        suffix = "_PHA" if flavour.vendor == "siemens" and part == "phase" else ""
        ds.SeriesDescription = protocol + suffix
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        ds.MRAcquisitionType = "3D"
        ds.MagneticFieldStrength = p.b0_tesla
        ds.ImagingFrequency = round(GAMMA_BAR_MHZ_PER_T * p.b0_tesla, 6)
        ds.ImagedNucleus = "1H"
        ds.SliceThickness = vox[2]
        ds.SpacingBetweenSlices = vox[2]
        ds.PixelBandwidth = 260
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = spacing
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = frame_uid
        ds.InPlanePhaseEncodingDirection = "ROW"
        data, slope, intercept, signed, bits = stored[part]
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if signed else 0

    def image_type(part: str) -> list[str]:
        if flavour.vendor == "siemens":
            return ["ORIGINAL", "PRIMARY", "M" if part == "mag" else "P", "ND"]
        if flavour.vendor == "philips":
            code = "M" if part == "mag" else "P"
            return ["ORIGINAL", "PRIMARY", f"{code}_FFE", code, "FFE"]
        return ["ORIGINAL", "PRIMARY", "OTHER"]

    def vendor_private(ds: Dataset, part: str, coil: int | None) -> None:
        if flavour.vendor == "siemens":
            name = coil_names[coil] if coil is not None else "HEA;HEP"
            block = ds.private_block(0x0051, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0F, "LO", name)
            csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
            csa.add_new(0x10, "OB", csa2_header({"ImaCoilString": name}))
        elif flavour.vendor == "ge":
            block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
            block.add_new(0x2F, "SS", _GE_TYPE[part])
        else:
            block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
            block.add_new(0x0E, "FL", 1.0 / stored[part][1])
            block.add_new(0x11, "CS", "M" if part == "mag" else "P")

    def finish(ds: Dataset, sop_class: str, sop_uid: str, path: Path) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.save_as(path, enforce_file_format=True)

    files: list[Path] = []
    te_ms = [round(t * 1000, 4) for t in p.echo_times_s]
    if not flavour.multiframe:
        instance = 0
        for part, c in itertools.product(flavour.parts, range(n_coils)):
            data, slope, intercept, signed, bits = stored[part]
            number = series_of(part, c)
            # one dataset per series, updated image by image (building each from scratch is
            # several times slower)
            ds = Dataset()
            common(ds, part, number)
            ds.ImageType = image_type(part)
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.SequenceName = "*fl3d4r"
            ds.RepetitionTime = p.repetition_time_s * 1000
            ds.EchoTrainLength = n_echoes
            ds.FlipAngle = p.flip_angle_deg
            ds.NumberOfAverages = 1
            ds.ImagesInAcquisition = nz * n_echoes * n_coils
            ds.RescaleIntercept = intercept
            ds.RescaleSlope = slope
            vendor_private(ds, part, c if coils else None)
            if per_coil_series:  # the element of this channel, in the standard coil macro
                ds.MRReceiveCoilSequence = _coil_macro(coil_names[c], ds.ReceiveCoilName)
            for e in range(n_echoes):
                ds.EchoTime = te_ms[e]
                ds.EchoNumbers = e + 1
                vol = data[..., e, c] if coils else data[..., e]
                for k in range(nz):
                    instance += 1
                    if (part, e + 1, k) in omit_set:
                        continue
                    ds.InstanceNumber = instance
                    ds.ImagePositionPatient = positions[k]
                    ds.SliceLocation = round(float(np.dot(normal, positions[k])), 6)
                    ds.PixelData = np.ascontiguousarray(vol[:, :, k].T).tobytes()
                    uid = _uid("sop", ds.SeriesInstanceUID, instance)
                    path = out_dir / f"IM_{number:04d}_{instance:05d}.dcm"
                    finish(ds, _MR_IMAGE, uid, path)
                    files.append(path)
        return files

    # enhanced multi-frame: one file per series, frames ordered by part, echo, slice
    by_series: dict[int, list[str]] = {}
    for part in flavour.parts:
        by_series.setdefault(series_of(part, 0), []).append(part)
    for number, parts in by_series.items():
        ds = Dataset()
        common(ds, parts[0], number)
        mixed = len(parts) > 1
        first = image_type(parts[0])[:3]
        ds.ImageType = first[:3] + (["MIXED"] if mixed else ["NONE"])
        ds.ComplexImageComponent = "MIXED" if mixed else _COMPLEX_COMPONENT[parts[0]]
        ds.PixelPresentation = "MONOCHROME"
        ds.VolumetricProperties = "VOLUME"
        ds.VolumeBasedCalculationTechnique = "NONE"
        ds.AcquisitionContrast = "T2_STAR"
        ds.ContentQualification = "PRODUCT"
        ds.EchoPulseSequence = "GRADIENT"
        ds.PulseSequenceName = "FFE"
        ds.InstanceNumber = 1
        ds.AcquisitionDateTime = study_date + acquisition_time
        shared = Dataset()
        meas = Dataset()
        meas.PixelSpacing = spacing
        meas.SliceThickness = vox[2]
        meas.SpacingBetweenSlices = vox[2]
        shared.PixelMeasuresSequence = DicomSequence([meas])
        orient = Dataset()
        orient.ImageOrientationPatient = iop
        shared.PlaneOrientationSequence = DicomSequence([orient])
        timing = Dataset()
        timing.RepetitionTime = p.repetition_time_s * 1000
        timing.FlipAngle = p.flip_angle_deg
        timing.EchoTrainLength = n_echoes
        timing.GradientEchoTrainLength = n_echoes
        shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
        ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
        dim_org = _uid("dim", ds.SeriesInstanceUID)
        org = Dataset()
        org.DimensionOrganizationUID = dim_org
        ds.DimensionOrganizationSequence = DicomSequence([org])
        dims = []
        for pointer, group in ((0x00209057, 0x00209111), (0x00209128, 0x00209111)):
            d = Dataset()
            d.DimensionOrganizationUID = dim_org
            d.DimensionIndexPointer = pointer
            d.FunctionalGroupPointer = group
            dims.append(d)
        ds.DimensionIndexSequence = DicomSequence(dims)
        frames, pixels = [], []
        for part in parts:
            data, slope, intercept, signed, bits = stored[part]
            for c, e, k in itertools.product(range(n_coils), range(n_echoes), range(nz)):
                if (part, e + 1, k) in omit_set:
                    continue
                # one temporal position per part, coil and echo: each volume is one index
                volume = (parts.index(part) * n_coils + c) * n_echoes + e + 1
                fr = Dataset()
                content = Dataset()
                content.StackID = "1"
                content.InStackPositionNumber = k + 1
                content.TemporalPositionIndex = volume
                content.DimensionIndexValues = [k + 1, volume]
                fr.FrameContentSequence = DicomSequence([content])
                pos = Dataset()
                pos.ImagePositionPatient = positions[k]
                fr.PlanePositionSequence = DicomSequence([pos])
                echo = Dataset()
                echo.EffectiveEchoTime = te_ms[e]
                fr.MREchoSequence = DicomSequence([echo])
                ftype = Dataset()
                ftype.FrameType = image_type(part)[:3] + ["NONE"]
                ftype.PixelPresentation = "MONOCHROME"
                ftype.VolumetricProperties = "VOLUME"
                ftype.VolumeBasedCalculationTechnique = "NONE"
                ftype.ComplexImageComponent = _COMPLEX_COMPONENT[part]
                ftype.AcquisitionContrast = "T2_STAR"
                fr.MRImageFrameTypeSequence = DicomSequence([ftype])
                pvt = Dataset()
                pvt.RescaleIntercept = intercept
                pvt.RescaleSlope = slope
                pvt.RescaleType = "US"
                fr.PixelValueTransformationSequence = DicomSequence([pvt])
                if coils:  # the standard MR Receive Coil macro, per frame: the element used
                    fr.MRReceiveCoilSequence = _coil_macro(
                        coil_names[c], _COIL_TYPE[flavour.vendor]
                    )
                if flavour.vendor in ("ge", "philips"):
                    vendor_private(fr, part, None)
                frames.append(fr)
                vol = data[..., e, c] if coils else data[..., e]
                pixels.append(np.ascontiguousarray(vol[:, :, k].T))
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
        ds.NumberOfFrames = len(frames)
        # the file-level pixel format is that of the first part; parts share it by design
        if len({stored[pt][3] for pt in parts}) > 1:
            raise ValueError("parts of one multi-frame series must share signedness")
        ds.PixelData = np.stack(pixels).tobytes()
        uid = _uid("sop", ds.SeriesInstanceUID, "mf")
        path = out_dir / f"MF_{number:04d}.dcm"
        finish(ds, _ENHANCED_MR_IMAGE, uid, path)
        files.append(path)
    return files
