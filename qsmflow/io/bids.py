"""BIDS naming and dataset-level files.

:func:`bids_path` is the one place file names are built from entities, so every file qsmflow
writes uses the entity order and label rules of the BIDS specification.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .nifti import atomic_path, write_json

__all__ = [
    "BIDS_VERSION",
    "ENTITY_ORDER",
    "Acquisition",
    "bids_path",
    "collect_acquisitions",
    "find_derivatives",
    "write_dataset_description",
    "write_tsv",
]

BIDS_VERSION = "1.10.0"

#: Entities in the order BIDS prescribes (schema ``rules.entities``), keyed by their short name.
ENTITY_ORDER: tuple[str, ...] = (
    "sub",
    "ses",
    "sample",
    "task",
    "tracksys",
    "acq",
    "nuc",
    "voi",
    "ce",
    "trc",
    "stain",
    "rec",
    "dir",
    "run",
    "mod",
    "echo",
    "flip",
    "inv",
    "mt",
    "part",
    "proc",
    "hemi",
    "space",
    "split",
    "recording",
    "chunk",
    "seg",
    "res",
    "den",
    "label",
    "desc",
)
_INDEX_ENTITIES = {"run", "echo", "flip", "inv", "split", "chunk"}
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


def bids_path(
    entities: Mapping[str, Any],
    suffix: str,
    extension: str = ".nii.gz",
    *,
    datatype: str | None = "anat",
) -> Path:
    """Relative path ``sub-<l>/[ses-<l>/]<datatype>/<entities>_<suffix><extension>``.

    Entities with value ``None`` are left out. Labels must be alphanumeric and index entities
    (``run``, ``echo``, ...) non-negative integers; anything else raises ``ValueError`` before a
    file is written.

    >>> str(bids_path({"sub": "01", "echo": 2, "part": "phase"}, "MEGRE"))
    'sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz'
    """
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(
            f"unknown BIDS entities {sorted(unknown)}; known: {', '.join(ENTITY_ORDER)}"
        )
    if "sub" not in entities or entities["sub"] is None:
        raise ValueError("BIDS paths need a 'sub' entity")
    parts = []
    for key in ENTITY_ORDER:
        value = entities.get(key)
        if value is None:
            continue
        if key in _INDEX_ENTITIES:
            if isinstance(value, bool) or not str(value).isdigit():
                raise ValueError(
                    f"BIDS entity {key!r} must be a non-negative integer, got {value!r}"
                )
            value = int(value)
        elif not _LABEL_RE.match(str(value)):
            raise ValueError(
                f"BIDS entity {key}-{value!r} must be alphanumeric (no '_', '-', spaces)"
            )
        parts.append(f"{key}-{value}")
    if not _LABEL_RE.match(suffix):
        raise ValueError(f"BIDS suffix must be alphanumeric, got {suffix!r}")
    name = "_".join(parts + [suffix]) + extension
    folder = Path(f"sub-{entities['sub']}")
    if entities.get("ses") is not None:
        folder /= f"ses-{entities['ses']}"
    if datatype:
        folder /= datatype
    return folder / name


def write_dataset_description(
    root: str | Path,
    name: str,
    *,
    dataset_type: str = "raw",
    generated_by: Mapping[str, Any] | None = None,
    source_datasets: list[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``dataset_description.json`` (BIDS version, type, provenance)."""
    desc: dict[str, Any] = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": dataset_type}
    if generated_by:
        desc["GeneratedBy"] = [dict(generated_by)]
    if source_datasets:
        desc["SourceDatasets"] = [dict(s) for s in source_datasets]
    if extra:
        desc.update(extra)
    return write_json(desc, Path(root) / "dataset_description.json")


def write_tsv(rows: list[Mapping[str, Any]], path: str | Path, columns: list[str]) -> Path:
    """Write a tab-separated table with a header row ('n/a' for missing values), atomically."""
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join("n/a" if row.get(c) is None else str(row[c]) for c in columns))
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return Path(path)


@dataclass
class Acquisition:
    """One multi-echo GRE acquisition found in a BIDS dataset.

    ``phase`` and ``magnitude`` are per-echo file paths sorted by echo; ``echo_times_s`` in
    seconds; ``b0_tesla`` in Tesla; ``shape`` the image grid (x, y, z). ``n_coils`` > 0 marks
    uncombined receive-coil data: every per-echo file is 4-D with the channels along the 4th
    axis, to be combined (MCPC-3D-S / ASPIRE) before the rest of the pipeline.
    """

    subject: str
    session: str | None
    acquisition: str | None
    run: int | None
    phase: list[str]
    magnitude: list[str]
    echo_times_s: list[float]
    b0_tesla: float
    shape: tuple[int, ...]
    #: a brain mask to reuse (from a derivatives dataset), or None
    mask: str | None = None
    #: a segmentation (``_dseg``) on the same grid, for the report's ROI table, or None
    segmentation: str | None = None
    #: number of uncombined receive channels (4th axis of each per-echo file); 0: combined
    n_coils: int = 0

    @property
    def label(self) -> str:
        parts = [f"sub-{self.subject}"]
        for key, val in (("ses", self.session), ("acq", self.acquisition), ("run", self.run)):
            if val is not None:
                parts.append(f"{key}-{val}")
        return "_".join(parts)


#: Default pybids query for the GRE phase images (users can override entries).
DEFAULT_QUERY: dict[str, Any] = {
    "datatype": "anat",
    "suffix": ["MEGRE", "T2starw", "GRE"],
    "extension": [".nii", ".nii.gz"],
}


def collect_acquisitions(
    bids_dir: str | Path,
    *,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    filters: Mapping[str, Any] | None = None,
) -> tuple[list[Acquisition], dict[str, str]]:
    """Find multi-echo GRE acquisitions with pybids; return them and per-subject problems.

    A subject whose data are unusable (phase without magnitude, missing ``EchoTime`` or
    ``MagneticFieldStrength``, echoes of different shapes) is reported in the second value,
    ``{subject: message}``, and left out, so the other subjects still run.
    """
    import nibabel as nib
    from bids import BIDSLayout

    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").exists():
        raise ValueError(
            f"{bids_dir}: not a BIDS dataset (no dataset_description.json); point BIDS_DIR at "
            "the dataset root"
        )
    layout = BIDSLayout(str(bids_dir), validate=False)
    subjects = layout.get_subjects()
    if participant_labels:
        wanted = [p.removeprefix("sub-") for p in participant_labels]
        missing = sorted(set(wanted) - set(subjects))
        if missing:
            raise ValueError(f"{bids_dir}: no data for participant(s) {', '.join(missing)}")
        subjects = [s for s in subjects if s in wanted]
    query = {**DEFAULT_QUERY, **dict(filters or {})}
    acquisitions, problems = [], {}
    for sub in subjects:
        kwargs = dict(query, subject=sub)
        if session_labels:
            kwargs["session"] = session_labels
        files = layout.get(**kwargs)
        groups: dict[tuple, dict[str, list]] = {}
        for f in files:
            ents = f.get_entities()
            part = ents.get("part")
            if part not in ("mag", "phase"):
                continue
            key = (ents.get("session"), ents.get("acquisition"), ents.get("run"))
            groups.setdefault(key, {"mag": [], "phase": []})[part].append(f)
        try:
            if not groups:
                raise ValueError(f"sub-{sub}: no part-mag/part-phase GRE images found")
            for (ses, acq, run), parts in sorted(groups.items(), key=lambda kv: str(kv[0])):
                acquisitions.append(_make_acquisition(sub, ses, acq, run, parts, nib))
        except ValueError as exc:
            problems[sub] = str(exc)
    return acquisitions, problems


def _make_acquisition(sub, ses, acq, run, parts, nib) -> Acquisition:
    def by_echo(files):
        return sorted(files, key=lambda f: int(f.get_entities().get("echo", 1)))

    phase, mag = by_echo(parts["phase"]), by_echo(parts["mag"])
    where = phase[0].path if phase else mag[0].path
    if not phase:
        raise ValueError(f"{where}: magnitude without phase images; QSM needs part-phase files")
    if len(mag) != len(phase):
        raise ValueError(
            f"{where}: {len(phase)} phase echo(es) but {len(mag)} magnitude echo(es); every "
            "phase echo needs its magnitude"
        )
    tes, b0 = [], None
    for f in phase:
        meta = f.get_metadata()
        if "EchoTime" not in meta:
            raise ValueError(f"{f.path}: sidecar has no EchoTime (seconds); add it to the JSON")
        if "MagneticFieldStrength" not in meta:
            raise ValueError(
                f"{f.path}: sidecar has no MagneticFieldStrength (Tesla); add it to the JSON"
            )
        if not isinstance(meta["EchoTime"], int | float) or isinstance(meta["EchoTime"], bool):
            raise ValueError(
                f"{f.path}: EchoTime must be one number (seconds), got {meta['EchoTime']!r}; "
                "write multi-echo data as one file per echo (echo-<index> entity), each with "
                "its own EchoTime"
            )
        tes.append(float(meta["EchoTime"]))
        b0 = float(meta["MagneticFieldStrength"])
    shape, n_coils = _grid_and_coils(phase, mag, nib)
    if n_coils and len(phase) < 2:
        raise ValueError(
            f"{where}: uncombined receive-coil data ({n_coils} channels along the 4th axis) "
            "need at least two echoes for the coil phase offsets (MCPC-3D-S / ASPIRE); "
            "combine the channels on the scanner or acquire two or more echoes"
        )
    return Acquisition(
        subject=sub,
        session=ses,
        acquisition=acq,
        run=int(run) if run is not None else None,
        phase=[f.path for f in phase],
        magnitude=[f.path for f in mag],
        echo_times_s=tes,
        b0_tesla=b0,
        shape=tuple(shape),
        n_coils=n_coils,
    )


def _grid_and_coils(phase, mag, nib) -> tuple[tuple[int, ...], int]:
    """Common grid (x, y, z) of the per-echo files and their number of receive coils.

    A file with a 4th axis longer than 1 holds uncombined receive channels (one file per echo
    and part, as ``qsmflow-dicom2bids`` and ``qsmflow-simulate --coils`` write them); every
    file of the acquisition must then have the same number. 3-D files (and 4-D files with one
    volume) are coil-combined images, whatever ``ReceiveCoilActiveElements`` lists: scanners
    also list the active elements (e.g. Siemens ``HEA;HEP``) for combined images.
    """
    shape, n_coils, first = None, None, None
    for f in [*phase, *mag]:
        img_shape = tuple(int(n) for n in nib.load(f.path).shape)
        if len(img_shape) < 3 or len(img_shape) > 4:
            raise ValueError(
                f"{f.path}: shape {img_shape}; expected a 3-D image or a 4-D image with the "
                "receive coils along the 4th axis (one file per echo and part)"
            )
        coils = img_shape[3] if len(img_shape) == 4 and img_shape[3] > 1 else 0
        if shape is None:
            shape, n_coils, first = img_shape[:3], coils, f
            continue
        if img_shape[:3] != shape:
            raise ValueError(
                f"{f.path}: grid {img_shape[:3]} differs from {first.path} {shape}; every "
                "echo's magnitude and phase must share one grid"
            )
        if coils != n_coils:
            raise ValueError(
                f"{f.path}: {_describe_coils(coils)} but {first.path} has "
                f"{_describe_coils(n_coils)}; every echo's magnitude and phase file needs the "
                "same receive coils (re-export the series with the same channels, or use "
                "coil-combined images for all of them)"
            )
    return shape, n_coils


def _describe_coils(n: int) -> str:
    if n:
        return f"{n} uncombined receive coils (4th axis)"
    return "coil-combined images (3-D)"


def _entities(name: str) -> tuple[dict[str, str], str]:
    """Entities and suffix of a BIDS file name (``sub-01_desc-brain_mask.nii.gz``)."""
    stem = name.split(".", 1)[0]
    *pairs, suffix = stem.split("_")
    ents = dict(p.split("-", 1) for p in pairs if "-" in p)
    return ents, suffix


def find_derivatives(
    acquisitions: list[Acquisition],
    derivatives: list[str | Path],
    *,
    masks: bool = True,
    segmentations: bool = True,
) -> list[Acquisition]:
    """Attach existing brain masks and segmentations from derivatives datasets.

    Looks in ``<deriv>/sub-<l>[/ses-<s>]/anat/`` for ``*_desc-brain_mask.nii[.gz]`` and
    ``*_dseg.nii[.gz]`` whose entities do not contradict the acquisition's (a file without
    ``acq``/``run`` applies to all of the subject's acquisitions; the most specific file wins)
    and whose grid matches. Returns new :class:`Acquisition` objects; files are only read.
    """
    import dataclasses

    import nibabel as nib

    roots = [Path(d) for d in derivatives]
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"{root}: derivatives folder not found")
    wanted = [("mask", "mask", "brain")] * masks + [("segmentation", "dseg", None)] * segmentations
    out = []
    for acq in acquisitions:
        own = {"ses": acq.session, "acq": acq.acquisition, "run": acq.run}
        found: dict[str, str] = {}
        for field, suffix, desc in wanted:
            best = None
            for root in roots:
                folder = root / f"sub-{acq.subject}"
                if acq.session is not None:
                    folder = folder / f"ses-{acq.session}"
                for path in sorted((folder / "anat").glob(f"sub-{acq.subject}_*_{suffix}.nii*")):
                    ents, sfx = _entities(path.name)
                    if sfx != suffix or (desc is not None and ents.get("desc") != desc):
                        continue
                    if any(
                        key in ents and str(val) != ents[key].lstrip("0" if key == "run" else "")
                        for key, val in own.items()
                        if val is not None
                    ) or any(key in ents and own[key] is None for key in own):
                        continue
                    if tuple(nib.load(str(path)).shape[:3]) != tuple(acq.shape):
                        continue
                    score = sum(key in ents for key in own)
                    if best is None or score > best[0]:
                        best = (score, str(path))
            if best is not None:
                found[field] = best[1]
        out.append(dataclasses.replace(acq, **found))
    return out
