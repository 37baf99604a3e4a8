"""BIDS naming and dataset-level files.

:func:`bids_path` is the one place file names are built from entities, so every file qsmflow
writes uses the entity order and label rules of the BIDS specification.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .nifti import atomic_path, write_json

__all__ = ["ENTITY_ORDER", "bids_path", "write_dataset_description", "write_tsv", "BIDS_VERSION"]

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
