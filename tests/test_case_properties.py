"""The typed preprocessing sidecar reads what preprocessing wrote before it was typed, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.case_properties import (
    CaseProperties,
    CasePropertiesError,
    load_case_properties,
    save_case_properties,
)

# written by autoseg.preprocessing before CaseProperties existed (class locations shortened)
BEFORE_TYPING = Path(__file__).parent / "data" / "sidecar_before_typing.json"


def test_a_sidecar_written_before_typing_loads_and_reserialises_identically(tmp_path):
    properties = load_case_properties(BEFORE_TYPING)
    assert isinstance(properties, CaseProperties)
    assert properties.to_json() == BEFORE_TYPING.read_text()
    save_case_properties(properties, tmp_path / "case.json")
    assert (tmp_path / "case.json").read_bytes() == BEFORE_TYPING.read_bytes()


def test_every_bad_field_is_reported_with_the_file_name(tmp_path):
    data = json.loads(BEFORE_TYPING.read_text())
    data["shape"] = "big"
    del data["plan_hash"]
    path = tmp_path / "case.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CasePropertiesError) as caught:
        load_case_properties(path)
    message = str(caught.value)
    assert str(path) in message and "shape" in message and "plan_hash" in message


def test_a_missing_sidecar_names_the_file(tmp_path):
    with pytest.raises(CasePropertiesError, match="case.json"):
        load_case_properties(tmp_path / "case.json")
