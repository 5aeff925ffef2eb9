"""Tests of autoseg.dataset: dataset.json checking, case discovery and case loading."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest

import autoseg.dataset
from autoseg.dataset import (
    CaseFiles,
    DatasetError,
    DatasetJson,
    index_cases,
    load_case,
    load_dataset_json,
    parse_dataset_json,
    to_3d,
    training_cases,
    write_dataset_json,
)
from autoseg.io import Image, read_image, write_image

VALID = {
    "channel_names": {"0": "T2", "1": "ADC"},
    "labels": {"background": 0, "peripheral": 1, "transition": 2},
    "numTraining": 3,
    "file_ending": ".nii.gz",
}


def with_changes(**changes) -> dict:
    """VALID with keys replaced (a value of None removes the key)."""
    data = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


# --- dataset.json -------------------------------------------------------------------------------------


def test_valid_dataset_json_parses():
    model, problems = parse_dataset_json(VALID)
    assert problems == []
    assert model == DatasetJson(channel_names={"0": "T2", "1": "ADC"}, labels=VALID["labels"], num_training=3,
                                file_ending=".nii.gz")
    assert model.num_channels == 2
    assert model.channel_list == ["T2", "ADC"]
    assert model.label_values == {0, 1, 2}
    assert model.foreground_labels == {"peripheral": 1, "transition": 2}
    assert not model.has_regions
    assert model.ignore_label is None


@pytest.mark.parametrize("changes, message", [
    ({"channel_names": None}, 'missing key "channel_names"'),
    ({"labels": None}, 'missing key "labels"'),
    ({"numTraining": None}, 'missing key "numTraining"'),
    ({"file_ending": None}, 'missing key "file_ending"'),
    ({"channel_names": ["T2"]}, '"channel_names" must be a non-empty object'),
    ({"channel_names": {}}, '"channel_names" must be a non-empty object'),
    ({"channel_names": {"zero": "T2"}}, "\"channel_names\" key 'zero' is not a channel index"),
    ({"channel_names": {"0": 5}}, "\"channel_names\"['0'] must be a non-empty string, found 5"),
    ({"channel_names": {"0": "T2", "2": "ADC"}}, '"channel_names" indices must be 0..1 without gaps, found [0, 2]'),
    ({"labels": []}, '"labels" must be a non-empty object'),
    ({"labels": {"background": 0, "a": "1"}}, "label 'a' must be a non-negative integer or a list of them, found '1'"),
    ({"labels": {"background": 0, "a": -1}}, "label 'a' must be a non-negative integer"),
    ({"labels": {"background": 0, "a": True}}, "label 'a' must be a non-negative integer"),
    ({"labels": {"background": 0, "a": []}}, "label 'a' must be a non-negative integer"),
    ({"labels": {"a": 1, "b": 2}}, '"labels" must contain "background": 0'),
    ({"labels": {"background": 1, "a": 2}}, '"labels" must contain "background": 0'),
    ({"labels": {"background": 0, "a": 1, "b": 1}}, '"labels" values must be unique, found [0, 1, 1]'),
    ({"labels": {"background": 0, "whole": [1, 2], "core": 2}},
     '"labels" defines overlapping regions (lists of values) but "regions_class_order" is missing'),
    ({"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1]},
     '"regions_class_order" has 1 entries but there are 2 regions'),
    ({"regions_class_order": "1,2"}, '"regions_class_order" must be a list of integers'),
    ({"numTraining": 0}, '"numTraining" must be a positive integer, found 0'),
    ({"numTraining": "3"}, "\"numTraining\" must be a positive integer, found '3'"),
    ({"numTraining": 2.0}, '"numTraining" must be a positive integer, found 2.0'),
    ({"file_ending": "nii.gz"}, '"file_ending" must be a string like ".nii.gz"'),
    ({"file_ending": ".jpg"}, "\"file_ending\" '.jpg' is not supported"),
])
def test_each_schema_problem_is_named(changes, message):
    model, problems = parse_dataset_json(with_changes(**changes), "data/dataset.json")
    assert model is None
    assert len(problems) == 1, problems
    assert problems[0].startswith("data/dataset.json: ")
    assert message in problems[0]


def test_every_schema_problem_is_reported_at_once():
    _, problems = parse_dataset_json({}, "d.json")
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        'missing key "channel_names"', 'missing key "labels"', 'missing key "numTraining"',
        'missing key "file_ending"']
    bad = {"channel_names": {"0": ""}, "labels": {"liver": 1, "x": "2"}, "numTraining": -1, "file_ending": ".gif"}
    _, problems = parse_dataset_json(bad, "d.json")
    assert len(problems) == 5
    for words in ("channel_names", "label 'x'", '"background": 0', "numTraining", "'.gif' is not supported"):
        assert sum(words in p for p in problems) == 1, (words, problems)
    assert parse_dataset_json([VALID], "d.json") == (None, ["d.json: must be a JSON object, found list"])


def test_region_labels_become_tuples():
    data = with_changes(labels={"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]},
                        regions_class_order=[1, 2, 3])
    model, problems = parse_dataset_json(data)
    assert problems == []
    assert model.labels == {"background": 0, "whole": (1, 2, 3), "core": (2, 3), "enhancing": 3}
    assert model.has_regions
    assert model.regions_class_order == (1, 2, 3)
    assert model.label_values == {0, 1, 2, 3}


def test_ignore_label_and_modality_alias():
    data = with_changes(channel_names=None, labels={"background": 0, "a": 1, "ignore": 4})
    data["modality"] = {"0": "CT"}
    model, problems = parse_dataset_json(data)
    assert problems == []
    assert model.channel_names == {"0": "CT"}
    assert model.ignore_label == 4
    assert model.foreground_labels == {"a": 1}


@pytest.mark.parametrize("data", [
    VALID,
    with_changes(labels={"background": 0, "whole": [1, 2], "core": 2, "ignore": 9}, regions_class_order=[1, 2],
                 name="BraTS-like", description="two regions", licence="CC-BY", tensorImageSize="3D"),
])
def test_to_dict_round_trips(data):
    model, problems = parse_dataset_json(data)
    assert problems == []
    again, problems = parse_dataset_json(json.loads(json.dumps(model.to_dict())))
    assert problems == []
    assert again == model
    assert model.to_dict() == data  # nothing lost, nothing invented


def test_load_and_write_dataset_json(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_dataset_json(tmp_path)
    assert caught.value.problems == [f"{tmp_path / 'dataset.json'}: dataset.json is missing"]
    (tmp_path / "dataset.json").write_text("{oops")
    with pytest.raises(DatasetError, match="not valid JSON") as caught:
        load_dataset_json(tmp_path / "dataset.json")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"a": 1}}))
    with pytest.raises(DatasetError) as caught:
        load_dataset_json(tmp_path)
    assert len(caught.value.problems) == 4  # three missing keys and no background
    assert str(caught.value).count("\n- ") == 3

    model, _ = parse_dataset_json(VALID)
    path = write_dataset_json(model, tmp_path / "out")
    assert path == tmp_path / "out" / "dataset.json"
    assert load_dataset_json(tmp_path / "out") == model
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset.json"]  # no temporary left


# --- case discovery -----------------------------------------------------------------------------------


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_index_cases_groups_channels_in_order(tmp_path):
    touch(tmp_path / "imagesTr", "b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz", ".tmp_x.nii.gz")
    touch(tmp_path / "labelsTr", "a.nii.gz", "b.nii.gz")
    index = index_cases(tmp_path / "imagesTr", ".nii.gz", 2, tmp_path / "labelsTr")
    assert index.problems == []
    images = tmp_path / "imagesTr"
    assert index.cases == [
        CaseFiles("a", (images / "a_0000.nii.gz", images / "a_0001.nii.gz"), tmp_path / "labelsTr" / "a.nii.gz"),
        CaseFiles("b", (images / "b_0000.nii.gz", images / "b_0001.nii.gz"), tmp_path / "labelsTr" / "b.nii.gz"),
    ]
    # Test images have no labels folder; underscores inside case names are fine.
    touch(tmp_path / "imagesTs", "la_003_0000.nii.gz")
    assert index_cases(tmp_path / "imagesTs", ".nii.gz", 1).cases == [
        CaseFiles("la_003", (tmp_path / "imagesTs" / "la_003_0000.nii.gz",))]


def test_index_cases_reports_missing_orphan_and_misnamed_files(tmp_path):
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    touch(images, "ok_0000.nii.gz", "ok_0001.nii.gz", "nochan1_0000.nii.gz", "nolabel_0000.nii.gz",
          "nolabel_0001.nii.gz", "bad.nii.gz", "extra_0002.nii.gz", "notes.txt", "wrong_0000.mha")
    touch(labels, "ok.nii.gz", "nochan1.nii.gz", "orphan.nii.gz", "readme.md")
    index = index_cases(images, ".nii.gz", 2, labels)
    assert [c.case_id for c in index.cases] == ["ok"]
    assert sorted(index.problems) == sorted([
        f"{images / 'bad.nii.gz'}: name must be CASE_XXXX.nii.gz with a 4-digit channel index",
        f"{images / 'extra_0002.nii.gz'}: channel 0002 but dataset.json declares 2 channel(s)",
        f"{images / 'notes.txt'}: does not end in the dataset's file_ending '.nii.gz'",
        f"{images / 'wrong_0000.mha'}: does not end in the dataset's file_ending '.nii.gz'",
        f"{labels / 'orphan.nii.gz'}: orphan label, no image orphan_0000.nii.gz in {images}",
        f"{labels / 'readme.md'}: does not end in the dataset's file_ending '.nii.gz'",
        f"{images / 'nochan1'}: case is missing channel file(s) nochan1_0001.nii.gz",
        f"{labels / 'nolabel.nii.gz'}: label missing for case nolabel",
    ])


def test_index_cases_missing_folders(tmp_path):
    assert index_cases(tmp_path / "imagesTr", ".nii.gz", 1).problems == [f"{tmp_path / 'imagesTr'}: folder is missing"]
    touch(tmp_path / "imagesTr", "a_0000.nii.gz")
    index = index_cases(tmp_path / "imagesTr", ".nii.gz", 1, tmp_path / "labelsTr")
    assert index.cases == []
    assert index.problems == [f"{tmp_path / 'labelsTr'}: folder is missing",
                              f"{tmp_path / 'labelsTr' / 'a.nii.gz'}: label missing for case a"]


def test_training_cases(make_dataset):
    root = make_dataset(num_cases=2)
    assert [c.case_id for c in training_cases(root)] == ["case_000", "case_001"]
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError) as caught:
        training_cases(root)
    assert caught.value.problems == [f"{root / 'labelsTr' / 'case_001.nii.gz'}: label missing for case case_001",
                                     "run `autoseg validate` for a full check"]
    for path in [*(root / "imagesTr").iterdir(), *(root / "labelsTr").iterdir()]:
        path.unlink()
    with pytest.raises(DatasetError, match="no training cases found"):
        training_cases(root)


@pytest.mark.parametrize("ending", [".mhd", ".tif"])
def test_training_cases_accepts_formats_with_companion_files(make_dataset, ending):
    root = make_dataset(ending=ending, num_cases=2)
    assert [c.case_id for c in training_cases(root)] == ["case_000", "case_001"]


# --- loading ------------------------------------------------------------------------------------------


def test_load_case_stacks_channels_as_czyx(make_dataset):
    root = make_dataset(num_cases=1, num_channels=3, shape=(4, 6, 8), spacing=(2.0, 0.5, 0.25))
    case = training_cases(root)[0]
    data = load_case(case)
    channels = [read_image(p) for p in case.images]
    assert data.case_id == "case_000"
    assert data.image.shape == (3, 4, 6, 8) and data.image.dtype == np.float32
    for c, channel in enumerate(channels):
        assert np.array_equal(data.image[c], channel.array.astype(np.float32))
    assert data.label.dtype == np.int16
    assert np.array_equal(data.label, read_image(case.label).array)
    assert set(np.unique(data.label)) == {0, 1, 2}
    assert data.spacing == (2.0, 0.5, 0.25)
    assert data.is_2d is False
    assert data.reference.origin == channels[0].origin and data.reference.spacing == channels[0].spacing
    assert load_case(case, load_label=False).label is None


def test_load_case_promotes_2d_to_one_slice(make_dataset):
    root = make_dataset(num_cases=1, num_channels=2, shape=(6, 8), ending=".png")
    case = training_cases(root)[0]
    data = load_case(case)
    assert data.is_2d is True
    assert data.image.shape == (2, 1, 6, 8)
    assert data.label.shape == (1, 6, 8)
    assert data.spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(data.image[1, 0], read_image(case.images[1]).array)
    assert data.reference.array.ndim == 2  # written back as the 2D file it came from


def test_to_3d():
    array, spacing = to_3d(np.zeros((6, 8)), (0.5, 0.25))
    assert array.shape == (1, 6, 8) and spacing == (1.0, 0.5, 0.25)
    array, spacing = to_3d(np.zeros((2, 6, 8)), (3, 0.5, 0.25))
    assert array.shape == (2, 6, 8) and spacing == (3.0, 0.5, 0.25)


def test_load_case_label_types(make_dataset):
    root = make_dataset(num_cases=1, num_channels=1)
    case = training_cases(root)[0]
    label = read_image(case.label)
    write_image(label.with_array(label.array.astype(np.float32)), case.label)
    assert load_case(case).label.dtype == np.int16  # whole-valued floats are fine
    write_image(label.with_array(label.array.astype(np.int32) * 20000), case.label)
    assert load_case(case).label.dtype == np.int32  # too large for int16: kept wide, not wrapped
    assert load_case(case).label.max() == 40000
    write_image(label.with_array(label.array.astype(np.float32) / 2), case.label)
    with pytest.raises(DatasetError, match="label has non-integer values") as caught:
        load_case(case)
    assert caught.value.problems[0].startswith(str(case.label))


def test_load_case_shape_mismatch_names_the_file(make_dataset):
    root = make_dataset(num_cases=1, num_channels=2)
    case = training_cases(root)[0]
    write_image(Image(np.zeros((4, 8, 7), np.float32), (2.0, 0.75, 0.75)), case.images[1])
    with pytest.raises(DatasetError, match=r"shape \(4, 8, 7\) differs from case_000_0000.nii.gz's \(4, 8, 8\)"):
        load_case(case)
    write_image(read_image(case.images[0]), case.images[1])
    write_image(Image(np.zeros((3, 8, 8), np.uint8), (2.0, 0.75, 0.75)), case.label)
    with pytest.raises(DatasetError, match=r"label shape \(3, 8, 8\) differs") as caught:
        load_case(case)
    assert caught.value.problems[0].startswith(str(case.label))


def test_examples_in_the_docstrings_run() -> None:
    result = doctest.testmod(autoseg.dataset)
    assert result.attempted > 0 and result.failed == 0


def test_dataset_json_round_trips_with_unknown_keys_kept() -> None:
    data = with_changes(licence="CC-BY", numTest=2, name="Prostate",
                        labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    model, problems = parse_dataset_json(data)
    assert problems == []
    assert model.extra == {"licence": "CC-BY", "numTest": 2}
    assert model.labels["whole"] == (1, 2) and model.regions_class_order == (1, 2)
    assert model.to_dict() == data
    assert parse_dataset_json(model.to_dict())[0] == model
