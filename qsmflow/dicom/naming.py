"""BIDS names for sorted DICOM acquisitions: labels, suffixes, runs, and user rules.

Labels come, in order of precedence, from the command line (``--participant-label``,
``--session``), from a mapping file, or from the headers (PatientID, StudyDate). A mapping file
is JSON::

    {
      "participants": {"<PatientID or PatientName>": "01"},
      "sessions": {"<StudyInstanceUID or StudyDate>": "pre"},
      "series": [
        {"match": "gre_qsm*", "acq": "qsm"},
        {"match": "*localizer*", "skip": true},
        {"match": "t1_mprage*", "suffix": "T1w"}
      ]
    }

``series`` rules are tried in order; ``match`` is a case-insensitive shell pattern on the
ProtocolName or SeriesDescription, and a rule may set ``acq``, ``suffix`` or ``skip``.
All names are built by :func:`qsmflow.io.bids.bids_path`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.bids import bids_path
from .sort import Acquisition

__all__ = ["OutputFile", "PlannedAcquisition", "load_mapping", "plan_names"]

_T1_RE = re.compile(r"t1|mprage|mp-rage|mp2rage|tfl3d|bravo|spgr|tfe", re.IGNORECASE)
_SUFFIXES = {"MEGRE", "T2starw", "T1w", "T2w", "PDw", "FLAIR", "GRE"}


@dataclass(frozen=True)
class OutputFile:
    """One NIfTI (and sidecar) to write: ``part`` is ``mag`` or ``phase`` (or None for T1w)."""

    part: str | None
    echo: int | None
    path: Path  # relative to the BIDS root

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.path.name.replace(".nii.gz", ".json"))


@dataclass
class PlannedAcquisition:
    acquisition: Acquisition
    entities: dict[str, Any]
    suffix: str
    outputs: list[OutputFile] = field(default_factory=list)


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)


def load_mapping(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read and check a mapping file (see the module docstring); ``{}`` when ``path`` is None."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: mapping file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or set(data) - {"participants", "sessions", "series"}:
        raise ValueError(
            f"{path}: a mapping file is a JSON object with keys 'participants', 'sessions' "
            "and/or 'series'"
        )
    for key in ("participants", "sessions"):
        for k, v in dict(data.get(key, {})).items():
            if not _label(str(v)) or _label(str(v)) != str(v):
                raise ValueError(f"{path}: {key}[{k!r}] = {v!r} must be alphanumeric")
    for i, rule in enumerate(data.get("series", [])):
        if not isinstance(rule, dict) or "match" not in rule:
            raise ValueError(f"{path}: series rule {i + 1} needs a 'match' pattern")
        if set(rule) - {"match", "acq", "suffix", "skip"}:
            raise ValueError(
                f"{path}: series rule {i + 1} may only set 'match', 'acq', 'suffix', 'skip'"
            )
        if "acq" in rule and _label(str(rule["acq"])) != str(rule["acq"]):
            raise ValueError(f"{path}: series rule {i + 1}: acq {rule['acq']!r} not alphanumeric")
        if "suffix" in rule and rule["suffix"] not in _SUFFIXES:
            raise ValueError(
                f"{path}: series rule {i + 1}: suffix {rule['suffix']!r} not one of "
                f"{sorted(_SUFFIXES)}"
            )
    return data


def _rule_for(acq: Acquisition, rules: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    names = [acq.info.protocol, acq.info.description]
    for rule in rules:
        pattern = str(rule["match"]).lower()
        if any(fnmatch.fnmatchcase(n.lower(), pattern) for n in names if n is not None):
            return rule
    return {}


def _default_suffix(acq: Acquisition) -> str | None:
    """MEGRE / T2starw for GRE with phase, T1w for T1-weighted magnitude, else None."""
    parts = set(acq.parts)
    if parts & {"phase", "real", "imag"}:
        return "MEGRE" if len(acq.echoes) > 1 else "T2starw"
    info = acq.info
    text = " ".join([info.protocol, info.description, *info.image_type])
    if _T1_RE.search(text) and not info.derived:
        return "T1w"
    return None


def _subject_label(acq: Acquisition, participant_label, mapping) -> str:
    if participant_label:
        return participant_label
    info = acq.info
    table = mapping.get("participants", {})
    for key in (info.patient_id, info.patient_name):
        if key and key in table:
            return str(table[key])
    label = _label(info.patient_id) or _label(info.patient_name)
    if not label:  # anonymised files: a stable label from the study
        label = "anon" + hashlib.sha1(info.study_uid.encode()).hexdigest()[:8]
    return label


def plan_names(
    acquisitions: Sequence[Acquisition],
    *,
    participant_label: str | None = None,
    session: str | None = None,
    mapping: Mapping[str, Any] | None = None,
    acq_rules: Sequence[tuple[str, str]] = (),
    repeats: str = "run",
) -> tuple[list[PlannedAcquisition], list[tuple[Acquisition, str]]]:
    """BIDS entities, suffix and output paths for each acquisition; and the ones skipped, why.

    Repeated acquisitions with the same subject, session, acq label and suffix (runs, head
    orientations) get ``run-1``, ``run-2``, ... in acquisition-time order, or with
    ``repeats="acq"`` ``acq-ori1``, ``acq-ori2``, ... (qsmflow's default multi-orientation
    entity). ``acq_rules`` are
    ``(pattern, label)`` pairs from the command line, tried before the mapping file's rules.
    """
    mapping = dict(mapping or {})
    if repeats not in ("run", "acq"):
        raise ValueError(f"repeats must be 'run' or 'acq', got {repeats!r}")
    for name, value in (("participant label", participant_label), ("session", session)):
        if value is not None and _label(value) != value:
            raise ValueError(f"{name} {value!r} must be alphanumeric (no '-', '_', spaces)")
    rules = [{"match": p, "acq": a} for p, a in acq_rules] + list(mapping.get("series", []))
    planned, skipped = [], []
    for acq in acquisitions:
        rule = _rule_for(acq, rules)
        if rule.get("skip"):
            skipped.append((acq, f"skipped by the rule matching {rule['match']!r}"))
            continue
        if acq.problems:
            skipped.append((acq, "incomplete: " + "; ".join(acq.problems)))
            continue
        suffix = rule.get("suffix") or _default_suffix(acq)
        if suffix is None:
            skipped.append(
                (
                    acq,
                    "not a gradient echo with phase nor a T1w image (add a 'series' rule with "
                    "a suffix to convert it)",
                )
            )
            continue
        parts = set(acq.parts)
        if suffix in ("MEGRE", "T2starw") and not ("mag" in parts or {"real", "imag"} <= parts):
            skipped.append((acq, "phase images without magnitude (export both)"))
            continue
        sub = _subject_label(acq, participant_label, mapping)
        planned.append(PlannedAcquisition(acq, {"sub": sub, "acq": rule.get("acq")}, suffix))
    patients = sorted({p.acquisition.info.patient_id or "(none)" for p in planned})
    if participant_label and len(patients) > 1:
        raise ValueError(
            f"--participant-label {participant_label!r} names one subject but the DICOM folder "
            f"holds {len(patients)} patients ({', '.join(patients[:5])}); convert them one by "
            "one or give their labels in a mapping file"
        )
    owners: dict[str, set[str]] = {}
    table = mapping.get("participants", {})
    for p in planned:
        info = p.acquisition.info
        if info.patient_id not in table and info.patient_name not in table:  # mapped: wanted
            owners.setdefault(p.entities["sub"], set()).add(info.patient_id)
    if not participant_label:
        for sub, ids in owners.items():
            if len(ids) > 1:
                raise ValueError(
                    f"patients {', '.join(sorted(ids))} would all become sub-{sub}; give them "
                    "distinct labels in a mapping file ('participants')"
                )
    _assign_sessions(planned, session, mapping)
    _assign_runs(planned, repeats)
    for plan in planned:
        plan.outputs = _outputs(plan)
    return planned, skipped


def _assign_sessions(planned, session, mapping) -> None:
    table = mapping.get("sessions", {})
    studies: dict[str, dict[str, str]] = {}
    for plan in planned:
        info = plan.acquisition.info
        studies.setdefault(plan.entities["sub"], {}).setdefault(info.study_uid, info.study_date)
    for plan in planned:
        info = plan.acquisition.info
        if session:
            ses = session
        elif info.study_uid in table or info.study_date in table:
            ses = str(table.get(info.study_uid, table.get(info.study_date)))
        elif len(studies[plan.entities["sub"]]) > 1:
            # several studies of one subject: sessions by date (with a counter on one day)
            ordered = sorted(studies[plan.entities["sub"]].items(), key=lambda kv: (kv[1], kv[0]))
            same_day = [u for u, d in ordered if d == info.study_date]
            ses = _label(info.study_date) or "1"
            if len(same_day) > 1:
                ses += f"{same_day.index(info.study_uid) + 1}"
        else:
            ses = None
        plan.entities["ses"] = ses


def _assign_runs(planned, repeats: str) -> None:
    groups: dict[tuple, list[PlannedAcquisition]] = {}
    for plan in planned:
        e = plan.entities
        groups.setdefault((e["sub"], e.get("ses"), e.get("acq"), plan.suffix), []).append(plan)
    for plans in groups.values():
        if len(plans) < 2:
            continue
        plans.sort(
            key=lambda p: (
                p.acquisition.info.study_date,
                p.acquisition.info.acquisition_time,
                p.acquisition.info.series_number,
            )
        )
        for i, plan in enumerate(plans, start=1):
            if repeats == "acq":  # e.g. head orientations: acq-ori1, acq-ori2 (acq-qsmori1, ...)
                plan.entities["acq"] = f"{plan.entities.get('acq') or ''}ori{i}"
            else:
                plan.entities["run"] = i


def _outputs(plan: PlannedAcquisition) -> list[OutputFile]:
    acq = plan.acquisition
    ent = {k: v for k, v in plan.entities.items() if v is not None}
    if plan.suffix in ("MEGRE", "T2starw", "GRE") and set(acq.parts) - {"mag"}:
        multi = len(acq.echoes) > 1
        return [
            OutputFile(
                part,
                echo,
                bids_path({**ent, "echo": echo if multi else None, "part": part}, plan.suffix),
            )
            for echo in acq.echoes
            for part in ("mag", "phase")
        ]
    if len(acq.echoes) > 1:
        return [
            OutputFile("mag", echo, bids_path({**ent, "echo": echo}, plan.suffix))
            for echo in acq.echoes
        ]
    return [OutputFile("mag", acq.echoes[0], bids_path(ent, plan.suffix))]
