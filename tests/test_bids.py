"""BIDS path building: entity order and label rules (checked against pybids' own parser)."""

import pytest

from qsmflow.io.bids import bids_path


def test_entity_order_follows_bids():
    p = bids_path(
        {"part": "phase", "echo": 3, "acq": "ori2", "run": 1, "ses": "pre", "sub": "01"}, "MEGRE"
    )
    assert (
        p.as_posix()
        == "sub-01/ses-pre/anat/sub-01_ses-pre_acq-ori2_run-1_echo-3_part-phase_MEGRE.nii.gz"
    )


def test_pybids_parses_what_we_build():
    parse = pytest.importorskip("bids.layout").parse_file_entities
    p = bids_path({"sub": "02", "ses": "1", "acq": "ori3", "echo": 4, "part": "mag"}, "MEGRE")
    ents = parse("/" + p.as_posix())
    assert ents["subject"] == "02" and ents["session"] == "1" and ents["acquisition"] == "ori3"
    assert int(ents["echo"]) == 4 and ents["part"] == "mag" and ents["suffix"] == "MEGRE"


@pytest.mark.parametrize(
    "entities, message",
    [
        ({"sub": "01_a"}, "alphanumeric"),
        ({"sub": "01", "acq": "ori-1"}, "alphanumeric"),
        ({"sub": "01", "echo": "two"}, "integer"),
        ({"sub": "01", "colour": "red"}, "unknown"),
        ({"ses": "1"}, "'sub'"),
    ],
)
def test_invalid_entities_rejected(entities, message):
    with pytest.raises(ValueError, match=message):
        bids_path(entities, "MEGRE")


def test_none_values_are_left_out():
    assert bids_path(
        {"sub": "01", "ses": None, "desc": "brain"}, "mask", datatype=None
    ).as_posix() == ("sub-01/sub-01_desc-brain_mask.nii.gz")
