"""Writing BIDS derivatives: the only interface that writes into the output dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io.bids import bids_path
from ..io.nifti import atomic_path, write_json

_ENTITY_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq", "run": "run"}


def source_entities(source_file: str) -> dict:
    """BIDS entities (sub, ses, acq, run) of a raw file, parsed with pybids."""
    from bids.layout import parse_file_entities

    parsed = parse_file_entities(str(source_file))
    if "subject" not in parsed:
        raise ValueError(f"{source_file}: not a BIDS file name (no sub-<label> entity)")
    return {short: parsed.get(long) for long, short in _ENTITY_KEYS.items()}


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Directory(mandatory=True, desc="root of the derivatives dataset")
    source_file = File(mandatory=True, desc="raw BIDS file the output derives from (entities)")
    raw_root = traits.Directory(desc="root of the raw dataset, for bids:raw: source URIs")
    in_file = File(exists=True, mandatory=True, desc="file to copy into the dataset")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix, e.g. Chimap, fieldmap, mask")
    desc = traits.Str(desc="BIDS desc entity (e.g. brain, local)")
    datatype = traits.Str("anat", usedefault=True, desc="BIDS datatype folder (anat, fmap)")
    metadata = traits.Dict(desc="JSON sidecar fields (units, method, parameters)")
    drop_entities = traits.List(
        traits.Str,
        desc="entities of source_file left out of the name (e.g. acq for maps that "
        "combine orientations)",
    )
    sources = traits.List(
        traits.Str, desc="raw files the output derives from (sidecar Sources; default source_file)"
    )
    in_metadata_file = File(
        exists=True,
        desc="JSON written by the step that made in_file (e.g. BrainMask's out_sidecar); its "
        "fields override metadata's, except Sources (work-directory paths)",
    )


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(desc="path written in the derivatives dataset")


class DerivativesDataSink(SimpleInterface):
    """Copy one output into the derivatives dataset under its BIDS name, with a JSON sidecar.

    Names come from :func:`qsmflow.io.bids.bids_path` (BIDS entity order); writes are atomic.
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        ents = source_entities(self.inputs.source_file)
        for key in self.inputs.drop_entities if isdefined(self.inputs.drop_entities) else []:
            ents.pop(key, None)
        if isdefined(self.inputs.desc) and self.inputs.desc:
            ents["desc"] = self.inputs.desc
        rel = bids_path(ents, self.inputs.suffix, datatype=self.inputs.datatype)
        out = Path(self.inputs.base_directory) / rel
        with atomic_path(out) as tmp:
            shutil.copyfile(self.inputs.in_file, tmp)
        side = dict(self.inputs.metadata) if isdefined(self.inputs.metadata) else {}
        if isdefined(self.inputs.in_metadata_file):
            extra = json.loads(Path(self.inputs.in_metadata_file).read_text())
            side.update({k: v for k, v in extra.items() if k != "Sources"})
        if isdefined(self.inputs.raw_root):
            sources = list(self.inputs.sources) if isdefined(self.inputs.sources) else []
            rels = [
                Path(f).relative_to(self.inputs.raw_root).as_posix()
                for f in sources or [self.inputs.source_file]
            ]
            side.setdefault("Sources", [f"bids:raw:{r}" for r in rels])
            if self.inputs.suffix not in ("magnitude",):
                side.setdefault("SpatialReference", f"bids:raw:{rels[0]}")
        side.setdefault("SkullStripped", self.inputs.suffix in ("Chimap",))
        write_json(side, out.with_name(out.name.replace(".nii.gz", ".json")))
        self._results["out_file"] = str(out)
        return runtime
