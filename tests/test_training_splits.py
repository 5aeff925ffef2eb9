"""Cross-validation splits: sizes, coverage, stratification, few cases, the file written once."""

from __future__ import annotations

import json

import pytest

from autoseg.training.splits import SplitError, fold_cases, load_or_create_splits, make_splits


def _cases(n: int) -> list[str]:
    return [f"case_{i:03d}" for i in range(n)]


@pytest.mark.parametrize("num_cases, expected_folds", [(2, 2), (3, 3), (4, 4), (5, 5), (7, 5), (23, 5)])
def test_every_case_is_validated_once_and_folds_are_balanced(num_cases: int, expected_folds: int) -> None:
    cases = _cases(num_cases)
    splits = make_splits(cases)
    assert len(splits) == expected_folds
    validated = [c for split in splits for c in split["val"]]
    assert sorted(validated) == cases  # each case in exactly one validation set
    for split in splits:
        assert sorted(split["train"] + split["val"]) == cases
        assert not set(split["train"]) & set(split["val"])
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_cases", [0, 1])
def test_fewer_than_two_cases_is_a_clear_error(num_cases: int) -> None:
    with pytest.raises(SplitError, match=f"at least 2 training cases, found {num_cases}"):
        make_splits(_cases(num_cases))


def test_rare_class_reaches_every_fold() -> None:
    cases = _cases(20)
    presence = {c: {1} for c in cases}
    rare = cases[3::4]  # 5 cases hold class 2: exactly one per fold is possible
    for c in rare:
        presence[c].add(2)
    for seed in range(5):
        splits = make_splits(cases, presence, seed=seed)
        assert [sum(c in rare for c in s["val"]) for s in splits] == [1] * 5


def test_two_rare_classes_are_spread_at_once() -> None:
    cases = _cases(15)
    presence = {c: {1} for c in cases}
    for c in cases[:5]:
        presence[c].add(2)
    for c in cases[5:10]:
        presence[c].add(3)
    splits = make_splits(cases, presence, seed=7)
    for split in splits:
        assert {frozenset(presence[c]) for c in split["val"]} >= {frozenset({1, 2}), frozenset({1, 3})}


def test_seed_decides_the_splits() -> None:
    cases = _cases(12)
    assert make_splits(cases, seed=1) == make_splits(cases, seed=1)
    assert make_splits(cases, seed=1) != make_splits(cases, seed=2)


def test_splits_file_is_written_once_and_reused(tmp_path) -> None:
    path = tmp_path / "splits.json"
    cases = _cases(6)
    first = load_or_create_splits(path, cases, seed=1)
    assert json.loads(path.read_text()) == first  # nnU-Net's format: a list of {"train", "val"}
    # A hand-edited file wins over what make_splits would produce with another seed.
    edited = [{"train": cases[:4], "val": cases[4:]}, {"train": cases[2:], "val": cases[:2]}]
    path.write_text(json.dumps(edited))
    assert load_or_create_splits(path, cases, seed=99) == edited


def test_changed_cases_are_refused(tmp_path) -> None:
    path = tmp_path / "splits.json"
    load_or_create_splits(path, _cases(6))
    with pytest.raises(SplitError, match=r"not in the splits: \['case_006'\]"):
        load_or_create_splits(path, _cases(7))


@pytest.mark.parametrize("content, message", [
    ("{}", "non-empty list"),
    ('[{"train": ["a"]}]', "fold 0 must be"),
    ('[{"train": ["a"], "val": ["a"]}]', "in both train and val"),
    ("not json", "not valid JSON"),
])
def test_malformed_splits_file_names_the_problem(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(SplitError, match=message):
        load_or_create_splits(path, ["a", "b"])


def test_fold_cases() -> None:
    cases = _cases(4)
    splits = make_splits(cases)
    train, val = fold_cases(splits, 2, cases)
    assert (train, val) == (splits[2]["train"], splits[2]["val"])
    assert fold_cases(splits, "all", cases) == (cases, cases)
    with pytest.raises(SplitError, match="fold 4 does not exist; there are 4 folds"):
        fold_cases(splits, 4, cases)
