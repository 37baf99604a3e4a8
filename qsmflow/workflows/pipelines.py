"""Pipeline presets (JSON in ``qsmflow/data/pipelines.json``) and validation of user files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

#: option -> allowed values (None: any number in the given range)
OPTIONS: dict[str, Any] = {
    "description": str,
    "mask_method": ("phase-quality", "bet", "fsl-bet", "magnitude-threshold", "threshold"),
    "bet_exclude_csf": bool,
    "two_pass": bool,
    "multi_orientation": bool,
    "orientation_entity": ("acq", "run", "ses"),
    "bet_frac": (0.0, 1.0),
    "unwrap_method": ("region-growing", "laplacian"),
    "unwrap_mode": ("template", "individual"),
    "combine": ("fit", "echo-average"),
    # uncombined receive coils only: MCPC-3D-S (any TEs) or ASPIRE (TE2 = 2 TE1)
    "coil_combine": ("mcpc3ds", "aspire"),
    "bfr_method": ("vsharp", "sharp", "resharp", "ismv", "pdf", "lbv"),
    "inversion_method": (
        "tkd",
        "tsvd",
        "tikhonov",
        "ilsqr",
        "star",
        "medi",
        "ndi",
        "tgv",
        "tv",
        "rts",
        "dip",
        "modl",
        "spinet",
    ),
}


def presets() -> dict[str, dict[str, Any]]:
    """The packaged presets, name -> options."""
    text = resources.files("qsmflow").joinpath("data/pipelines.json").read_text()
    return json.loads(text)


def validate_pipeline(options: dict[str, Any], *, source: str = "pipeline") -> dict[str, Any]:
    """Check a pipeline definition; errors name the option, the value and what is allowed."""
    if not isinstance(options, dict):
        raise ValueError(
            f"{source}: expected a JSON object of options, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
        )
    base = dict(presets()["default"])
    for key, value in options.items():
        allowed = OPTIONS[key]
        if allowed is str:
            if not isinstance(value, str):
                raise ValueError(f"{source}: option {key!r} must be text")
        elif allowed is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{source}: option {key!r} must be true or false")
        elif isinstance(allowed[0], float):
            lo, hi = allowed
            if not isinstance(value, int | float) or not lo < float(value) < hi:
                raise ValueError(f"{source}: option {key!r} must be a number in ({lo}, {hi})")
        elif value not in allowed:
            raise ValueError(
                f"{source}: option {key!r} = {value!r} is not one of {', '.join(allowed)}"
            )
        base[key] = value
    if base["two_pass"] and base["mask_method"] != "phase-quality":
        raise ValueError(
            f"{source}: two_pass needs mask_method 'phase-quality' (its reliable-voxel mask is "
            f"the second pass's mask), not {base['mask_method']!r}"
        )
    if base["two_pass"] and base["combine"] != "fit":
        raise ValueError(f"{source}: two_pass works with combine 'fit', not {base['combine']!r}")
    return base


def load_pipeline(name_or_file: str) -> tuple[str, dict[str, Any]]:
    """A preset by name, or a user JSON file (validated); returns (name, options)."""
    known = presets()
    if name_or_file in known:
        return name_or_file, validate_pipeline(known[name_or_file], source=name_or_file)
    path = Path(name_or_file)
    if not path.exists():
        raise ValueError(
            f"{name_or_file}: neither a preset ({', '.join(known)}) nor an existing JSON file"
        )
    try:
        options = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from exc
    return path.stem, validate_pipeline(options, source=str(path))
