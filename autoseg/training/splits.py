"""K-fold cross-validation splits, stratified so that rare classes reach every fold.

``splits.json`` keeps nnU-Net's format, a list with one ``{"train": [...], "val": [...]}`` per fold,
so splits can be edited by hand or brought over from nnU-Net. It is written once per configuration
folder and reused by every fold, so that the folds of one cross-validation never overlap.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from autoseg.training.errors import TrainingError
from autoseg.utils import atomic_write_json, read_json

DEFAULT_FOLDS = 5
DEFAULT_SEED = 12345

Split = dict[str, list[str]]


class SplitError(TrainingError):
    """Cross-validation is impossible, or ``splits.json`` does not fit the dataset."""


def make_splits(
    case_ids: Sequence[str],
    class_presence: Mapping[str, Collection[int]] | None = None,
    k: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
) -> list[Split]:
    """Split cases into ``min(k, number of cases)`` folds of near-equal size.

    Stratification is greedy: cases are placed in rounds (every fold receives one case per round,
    so fold sizes differ by at most one), cases holding the rarest classes first, each into the
    fold of the round that has seen the fewest cases of that case's classes. A class present in at
    least ``k`` cases therefore lands in the validation set of every fold.

    Args:
        case_ids: every training case.
        class_presence: per case, the label values (or class names) present in it; None or
            missing cases mean "no information" and such cases only balance fold sizes.
        k: number of folds wanted; fewer when there are fewer cases.
        seed: the same seed and cases give the same splits.

    Returns:
        One ``{"train": [...], "val": [...]}`` per fold, case ids sorted.

    Raises:
        SplitError: with fewer than two cases, or duplicate case ids.
    """
    cases = list(case_ids)
    if len(set(cases)) != len(cases):
        duplicates = sorted({c for c in cases if cases.count(c) > 1})
        raise SplitError(f"duplicate case ids: {duplicates}")
    if len(cases) < 2:
        raise SplitError(f"cross-validation needs at least 2 training cases, found {len(cases)}; "
                         "train with fold 'all' instead")
    if k < 2:
        raise SplitError(f"k must be at least 2, got {k}")
    k = min(k, len(cases))
    presence = {c: set((class_presence or {}).get(c, ())) for c in cases}
    frequency: dict[object, int] = {}
    for classes in presence.values():
        for cls in classes:
            frequency[cls] = frequency.get(cls, 0) + 1

    rng = np.random.default_rng(seed)
    shuffled = [cases[i] for i in rng.permutation(len(cases))]

    def rarity(case: str) -> tuple[int, int]:
        counts = sorted(frequency[c] for c in presence[case])
        # Rarest class first; cases without classes (no information) go last.
        return (counts[0], -len(counts)) if counts else (len(cases) + 1, 0)

    ordered = sorted(shuffled, key=rarity)  # stable: ties keep the seeded shuffle
    folds: list[list[str]] = [[] for _ in range(k)]
    seen: list[dict[object, int]] = [{} for _ in range(k)]
    for position, case in enumerate(ordered):
        if position % k == 0:
            open_folds = list(range(k))
        classes = sorted(presence[case], key=lambda c: (frequency[c], str(c)))
        # Compare folds on the case's classes from the rarest up; ties broken at random.
        tie_break = rng.permutation(k)
        best = min(open_folds, key=lambda f: ([seen[f].get(c, 0) for c in classes], tie_break[f]))
        open_folds.remove(best)
        folds[best].append(case)
        for cls in classes:
            seen[best][cls] = seen[best].get(cls, 0) + 1

    splits = []
    for fold in range(k):
        val = sorted(folds[fold])
        train = sorted(c for other in range(k) if other != fold for c in folds[other])
        splits.append({"train": train, "val": val})
    return splits


def load_or_create_splits(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    class_presence: Mapping[str, Collection[int]] | None = None,
    k: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
) -> list[Split]:
    """Read ``splits.json`` if it exists, else create it with :func:`make_splits` and write it.

    Raises:
        SplitError: if the existing file is malformed, or its cases are not the dataset's cases
            (delete it to re-split; models trained on the old splits are then not comparable).
    """
    path = Path(path)
    if not path.exists():
        splits = make_splits(case_ids, class_presence, k=k, seed=seed)
        atomic_write_json(path, splits)
        return splits
    splits = _read_splits(path)
    in_file = set(splits[0]["train"]) | set(splits[0]["val"])
    current = set(case_ids)
    if in_file != current:
        missing = sorted(current - in_file)
        extra = sorted(in_file - current)
        raise SplitError(f"{path}: the splits do not match the preprocessed cases (not in the splits: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; no longer present: "
                         f"{extra[:10]}{' ...' if len(extra) > 10 else ''}); delete the file to re-split")
    return splits


def fold_cases(splits: Sequence[Split], fold: int | str, case_ids: Sequence[str],
               source: str = "splits") -> tuple[list[str], list[str]]:
    """``(train, val)`` case ids of one fold; fold ``"all"`` trains and validates on every case."""
    if str(fold) == "all":
        return sorted(case_ids), sorted(case_ids)
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise SplitError(f"{source}: fold {fold} does not exist; there are {len(splits)} folds "
                         f"(0..{len(splits) - 1}) or 'all'")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def _read_splits(path: Path) -> list[Split]:
    try:
        data = read_json(path)
    except ValueError as error:
        raise SplitError(str(error)) from None
    if not isinstance(data, list) or not data:
        raise SplitError(f"{path}: must be a non-empty list of {{\"train\": [...], \"val\": [...]}}")
    for index, entry in enumerate(data):
        if (not isinstance(entry, dict) or not {"train", "val"} <= set(entry)
                or not all(isinstance(entry[key], list) for key in ("train", "val"))):
            raise SplitError(f"{path}: fold {index} must be {{\"train\": [...], \"val\": [...]}}")
        overlap = set(entry["train"]) & set(entry["val"])
        if overlap:
            raise SplitError(f"{path}: fold {index} has cases in both train and val: {sorted(overlap)[:10]}")
    return [{"train": list(e["train"]), "val": list(e["val"])} for e in data]
