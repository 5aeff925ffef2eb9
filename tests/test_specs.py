"""Tests of autoseg.specs: every shipped spec validates, broken specs are rejected naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from autoseg.dataset import parse_dataset_json
from autoseg.specs import (
    SPEC_DIR,
    DatasetSpec,
    SpecError,
    available_specs,
    load_schema,
    load_spec,
    schema_problems,
    validate_spec,
)

REQUIRED = [
    "Task01_BrainTumour", "Task02_Heart", "Task03_Liver", "Task04_Hippocampus", "Task05_Prostate",
    "Task06_Lung", "Task07_Pancreas", "Task08_HepaticVessel", "Task09_Spleen", "Task10_Colon",
    "BraTS2021", "KiTS23", "ISBI2012", "ACDC",
]


def raw(name: str) -> dict:
    return json.loads((SPEC_DIR / f"{name}.json").read_text())


def test_every_required_dataset_has_a_spec():
    assert set(REQUIRED) <= set(available_specs())


@pytest.mark.parametrize("name", available_specs())
def test_spec_validates_and_loads(name):
    data = raw(name)
    assert validate_spec(data, source=name) == []
    spec = load_spec(name)
    assert isinstance(spec, DatasetSpec)
    assert spec.name == name  # the file name is the spec's name, so `--spec NAME` finds it
    assert spec.num_channels == len(data["channel_names"])
    # The dataset.json the conversion writes must be one the raw-dataset loader accepts.
    model, problems = parse_dataset_json(spec.dataset_json(spec.num_training_approx))
    assert problems == [] and model is not None
    assert model.num_channels == spec.num_channels
    assert model.has_regions == (spec.regions_class_order is not None)


@pytest.mark.parametrize("name", available_specs())
def test_spec_validates_with_jsonschema_when_installed(name):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(load_schema())
    jsonschema.validate(raw(name), load_schema(), cls=jsonschema.Draft202012Validator)


def test_spec_contents_of_the_issue():
    brats = load_spec("BraTS2021")
    assert brats.channel_names == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert brats.labels == {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (1, 3),
                            "enhancing tumor": (3,)}
    assert brats.regions_class_order == (2, 1, 3)
    assert brats.source_layout.label_mapping == {4: 3}
    kits = load_spec("KiTS23")
    assert kits.labels["kidney"] == (1, 2, 3) and kits.labels["masses"] == (2, 3) and kits.labels["tumor"] == 2
    assert kits.regions_class_order == (1, 3, 2)
    isbi = load_spec("ISBI2012")
    assert isbi.dimensionality == 2 and isbi.source_layout.family == "isbi2012"
    assert isbi.source_layout.label_mapping == {0: 1, 255: 0}
    assert load_spec("ACDC").labels == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert load_spec("Task05_Prostate").channel_names == {"0": "T2", "1": "ADC"}
    assert load_spec("Task01_BrainTumour").num_channels == 4
    for name in REQUIRED:
        spec = load_spec(name)
        assert spec.license and spec.reference and spec.download["url"].startswith("http")


def test_load_spec_by_name_path_and_errors(tmp_path):
    assert load_spec("brats2021").name == "BraTS2021"  # names are case-insensitive
    assert load_spec(SPEC_DIR / "KiTS23.json").path == SPEC_DIR / "KiTS23.json"
    with pytest.raises(SpecError, match="known names: .*ACDC"):
        load_spec("NoSuchDataset")
    with pytest.raises(SpecError, match="spec file does not exist"):
        load_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=f"{bad}: not valid JSON"):
        load_spec(bad)
    broken = raw("KiTS23")
    del broken["license"]
    broken["labels"]["tumor"] = -2
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    # Every problem is listed at once, each naming the file and the key.
    assert len(info.value.problems) == 2
    assert all(p.startswith(str(path)) for p in info.value.problems)
    assert any("'license'" in p for p in info.value.problems)
    assert any("labels.tumor" in p for p in info.value.problems)


def _set(path: str, value):
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        data[last] = value
    return edit


def _delete(path: str):
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        del data[last]
    return edit


BROKEN = [
    # (base spec, edit, text the message must contain)
    ("ACDC", _delete("license"), "missing required key 'license'"),
    ("ACDC", _delete("source_layout.frame_glob"), "source_layout: missing required key 'frame_glob'"),
    ("ACDC", _set("source_layout.family", "acdc2"), "source_layout.family: 'acdc2' is not one of"),
    ("ACDC", _set("source_layout.task_folder", "x"), "source_layout.task_folder: key not allowed here"),
    ("ACDC", _set("colour", "red"), "colour: unknown key"),
    ("ACDC", _set("labels.background", 1), "labels.background: must be 0"),
    ("ACDC", _set("labels.LV", "three"), "labels.LV: 'three' matches none of the allowed forms"),
    ("ACDC", _set("labels.LV", 1), "labels: plain label values must be unique"),
    ("ACDC", _set("channel_names", {"0": "cineMRI", "2": "x"}), "channel_names: indices must be 0..1"),
    ("ACDC", _set("channel_names", {"a": "cineMRI"}), "channel_names.a: unknown key"),
    ("ACDC", _set("channel_names", {}), "channel_names: needs at least 1"),
    ("ACDC", _set("dimensionality", 4), "dimensionality: 4 is not one of [2, 3]"),
    ("ACDC", _set("dimensionality", 2), "dimensionality: the 'acdc' family produces 3D"),
    ("ACDC", _set("file_ending", ".png"), "file_ending: .png holds 2D images only"),
    ("ACDC", _set("file_ending", ".jpg"), "file_ending: '.jpg' is not one of"),
    ("ACDC", _set("download.url", "ftp://x"), "download.url: 'ftp://x' does not match"),
    ("ACDC", _set("num_training_approx", 0), "num_training_approx: 0 is below the minimum 1"),
    ("ACDC", _set("num_training_approx", True), "num_training_approx: expected integer, found bool"),
    ("ACDC", _set("source_layout.test_dirs", "testing"), "source_layout.test_dirs: expected array"),
    ("ACDC", _set("regions_class_order", [1]), "regions_class_order: only meaningful when labels define regions"),
    ("BraTS2021", _delete("regions_class_order"), "regions_class_order: required when labels define regions"),
    ("BraTS2021", _set("regions_class_order", [2, 1]), "regions_class_order: has 2 entries but labels define 3"),
    ("BraTS2021", _set("regions_class_order", [2, 1, 7]), "regions_class_order: values [7] are not label values"),
    ("BraTS2021", _set("source_layout.label_mapping", {"4": 9}), "source_layout.label_mapping.4: maps to 9"),
    ("BraTS2021", _set("source_layout.label_mapping", {"four": 3}), "source_layout.label_mapping.four: unknown key"),
    ("BraTS2021", _set("source_layout.channel_files", ["{case}_t1.nii.gz"]),
     "source_layout.channel_files: 1 file(s) for 4 channel(s)"),
    ("BraTS2021", _set("source_layout.unlabelled_cases", "skip"), "source_layout.unlabelled_cases: 'skip' is not"),
    ("Task04_Hippocampus", _delete("source_layout.task_folder"), "missing required key 'task_folder'"),
    ("ISBI2012", _set("channel_names", {"0": "EM", "1": "x"}), "the 'isbi2012' family has exactly one channel"),
    ("ISBI2012", _set("name", "bad name"), "name: 'bad name' does not match"),
]


@pytest.mark.parametrize(("base", "edit", "expected"), BROKEN, ids=[b[2][:40] for b in BROKEN])
def test_broken_spec_is_rejected_naming_the_key(base, edit, expected):
    data = copy.deepcopy(raw(base))
    edit(data)
    problems = validate_spec(data, source=f"{base}.json")
    assert problems, "a broken spec must not validate"
    assert any(expected in p for p in problems), problems
    assert all(p.startswith(f"{base}.json: ") for p in problems)


@pytest.mark.parametrize(("instance", "schema", "expected"), [
    (3, {"type": "integer", "minimum": 1}, []),
    (3.5, {"type": "integer"}, ["(top level): expected integer, found float 3.5"]),
    ({"a": [1, "x"]}, {"properties": {"a": {"items": {"type": "integer"}}}}, ["a[1]: expected integer, found str 'x'"]),
    ({"k": 1}, {"if": {"properties": {"k": {"const": 1}}}, "then": {"required": ["z"]}}, ["missing required key 'z'"]),
    ({"k": 2}, {"if": {"properties": {"k": {"const": 1}}}, "then": {"required": ["z"]}}, []),
    ({"d": 1}, {"$defs": {"pos": {"minimum": 5}}, "properties": {"d": {"$ref": "#/$defs/pos"}}},
     ["d: 1 is below the minimum 5"]),
    (1, {"enum": [True, 2]}, ["(top level): 1 is not one of [True, 2]"]),
])
def test_schema_subset_checker(instance, schema, expected):
    assert schema_problems(instance, schema) == expected


def test_schema_checker_refuses_unknown_keywords():
    with pytest.raises(ValueError, match="maxItems"):
        schema_problems([1], {"maxItems": 0})
    with pytest.raises(ValueError, match="only local references"):
        schema_problems(1, {"$ref": "https://example.org/schema.json"})


def test_shipped_schema_only_uses_supported_keywords():
    # Checking every spec walks the whole schema; an unsupported keyword would raise here.
    schema = load_schema()
    for name in available_specs():
        schema_problems(raw(name), schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    families = set(schema["$defs"]["source_layout"]["properties"]["family"]["enum"])
    assert families == {"msd", "brats2021", "kits23", "isbi2012", "acdc"}


def test_schema_file_is_the_one_specs_point_to():
    for name in available_specs():
        assert raw(name).get("$schema") == "./schema.json"
        assert (SPEC_DIR / raw(name)["$schema"]).resolve() == (SPEC_DIR / "schema.json").resolve()
    assert Path(SPEC_DIR / "README.md").is_file()
