"""Check a raw dataset before anything is computed from it, and list every problem at once.

:func:`validate_dataset` reads ``dataset.json`` and every training file once and writes nothing.
Each :class:`Problem` names the file and what is wrong with it, so one run shows everything to
fix instead of a crash hours into preprocessing (or a CUDA device-side assert during training).

What is checked:

* ``dataset.json``: present, valid JSON, every key present and well typed
  (:func:`autoseg.dataset.parse_dataset_json`), ``file_ending`` matching the files,
  ``numTraining`` matching the number of cases in ``imagesTr``;
* naming: every case has all its channels and its label, no orphan or misnamed files
  (:func:`autoseg.dataset.index_cases`); ``imagesTs/`` naming, as warnings;
* every file reads, and NIfTI files hold all the voxels their header promises (ITK reads a
  truncated NIfTI without complaint and fills the rest with zeros) and no NaN or Inf (which
  ITK's NIfTI reader silently turns into 0);
* channels of one case, and the label against its image, agree in shape, spacing, origin and
  direction within the tolerances below;
* intensities are finite and not one constant value;
* labels are whole numbers and only use values declared in ``dataset.json``;
* 2D and 3D cases are not mixed, and no image is a single voxel.

:func:`require_valid_dataset` runs these checks at the start of ``plan`` and ``preprocess``:
errors stop the stage, warnings are printed. Its verdict is kept in ``WORK/validation.json``
with the dataset's hash, so a later stage on the unchanged dataset reads no voxel again.

Geometry tolerances (the reference is channel 0 of the case, or its first readable channel):

* :data:`SPACING_RTOL` = 1e-4: spacings agree when ``|s - s_ref| <= 1e-4 * |s_ref|`` per axis;
* :data:`ORIGIN_ATOL_MM` = 1e-3 mm plus :data:`ORIGIN_SPACING_FRACTION` = 1e-4 times the
  reference's largest spacing: origins agree when every coordinate differs by at most that.
  The floor covers float32 headers (NIfTI loses about 1e-4 mm at 1000 mm); the spacing term
  scales it with the voxel size, as scanners round positions more coarsely for coarse scans;
* :data:`DIRECTION_ATOL` = 1e-4: direction cosines agree entry by entry within 1e-4.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from autoseg.cluster import run_cases
from autoseg.dataset import (
    CHANNEL_SUFFIX,
    DATASET_JSON,
    IMAGES_TR,
    IMAGES_TS,
    LABELS_TR,
    CaseFiles,
    DatasetJson,
    index_cases,
    parse_dataset_json,
)
from autoseg.errors import AutosegError
from autoseg.fingerprint import dataset_hash
from autoseg.io import SUPPORTED_ENDINGS, Image, ImageReadError, file_ending, read_image
from autoseg.nifti_bytes import check_nifti_bytes
from autoseg.utils import atomic_write_json

SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
ORIGIN_SPACING_FRACTION = 1e-4
DIRECTION_ATOL = 1e-4


VALIDATION_FILE = "validation.json"
_SHOWN_ERRORS = 30

# Listing every bad value of a 512^3 label map helps nobody; a few examples make the point.
MAX_LISTED = 10

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file (or folder) concerned and what is wrong."""

    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class CaseReport:
    """What checking one case found: its problems and its dimensionality (None: nothing readable)."""

    case_id: str
    ndim: int | None
    problems: tuple[Problem, ...]


def validate_dataset(dataset_dir: str | os.PathLike, n_jobs: int = 1, progress: bool = False) -> list[Problem]:
    """Check a raw dataset folder and return every problem found (empty: the dataset is usable).

    Reads ``dataset.json`` and each training case once (``n_jobs`` cases in parallel); writes
    nothing. Problems are ordered: ``dataset.json``, file naming, cases in case order, then
    dataset-wide findings and ``imagesTs`` warnings.

    Args:
        dataset_dir: folder with ``dataset.json``, ``imagesTr/``, ``labelsTr/`` (and ``imagesTs/``).
        n_jobs: cases read in parallel (1: in this process).
        progress: show a progress bar over the cases.
    """
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        return [Problem(str(dataset_dir), "dataset folder does not exist")]

    images_dir, labels_dir = dataset_dir / IMAGES_TR, dataset_dir / LABELS_TR
    json_path = dataset_dir / DATASET_JSON
    data, model, problems = _read_dataset_json(json_path)

    declared_ending = _declared_ending(data)
    ending, ending_problems = _effective_ending(declared_ending, images_dir, json_path)
    problems += ending_problems
    if ending is None:  # neither dataset.json nor the files say how images are stored
        message = "no image files with a supported ending" if images_dir.is_dir() else "folder is missing"
        return problems + [Problem(str(images_dir), message)]

    num_channels = model.num_channels if model else _lenient_num_channels(data, images_dir, ending)
    label_values = frozenset(model.label_values) if model else _lenient_label_values(data)
    num_training = model.num_training if model else _lenient_num_training(data)

    found = _case_ids(images_dir, ending)
    if num_training is not None and found and num_training != len(found):
        problems.append(Problem(str(json_path), f'"numTraining" is {num_training} but {images_dir} '
                                                f"holds {len(found)} case(s)"))

    index = index_cases(images_dir, ending, num_channels, labels_dir)
    problems += _from_texts(index.problems, (images_dir, labels_dir))
    if not images_dir.is_dir() and not labels_dir.is_dir():
        # index_cases stops at the missing images folder; the labels folder is just as missing.
        problems.append(Problem(str(labels_dir), "folder is missing"))
    if images_dir.is_dir() and not found:
        problems.append(Problem(str(images_dir), f"no training cases found (files named CASE_0000{ending})"))

    reports = _check_cases(index.cases, label_values, n_jobs, progress)
    for report in reports:
        problems += report.problems
    problems += _mixed_dimensionality(reports, images_dir)

    test_dir = dataset_dir / IMAGES_TS
    if test_dir.is_dir():
        test_index = index_cases(test_dir, ending, num_channels)
        problems += _from_texts(test_index.problems, (test_dir,), "warning")
    return problems


class DatasetValidationError(AutosegError):
    """The dataset fails :func:`validate_dataset`'s checks; the message lists each problem and its file."""


def require_valid_dataset(dataset_dir: str | os.PathLike, work_dir: str | os.PathLike | None = None,
                          n_jobs: int = 1, progress: bool = False) -> list[Problem]:
    """Check a dataset before a stage computes from it: errors stop it, warnings are printed (stderr).

    Args:
        dataset_dir: the raw dataset.
        work_dir: where to keep the verdict (``validation.json``, keyed by the dataset's hash) so
            that the next stage on an unchanged dataset does not read it again; None keeps nothing.
        n_jobs: cases read in parallel.
        progress: show a progress bar.

    Returns:
        the warnings.

    Raises:
        DatasetValidationError: one line per error, each naming its file.
    """
    dataset_dir = Path(dataset_dir)
    cache = Path(work_dir) / VALIDATION_FILE if work_dir is not None else None
    try:
        key: str | None = dataset_hash(dataset_dir)
    except Exception:  # dataset.json or a file is unreadable: the full check says which
        key = None
    problems = _cached_problems(cache, key)
    if problems is None:
        problems = validate_dataset(dataset_dir, n_jobs=n_jobs, progress=progress)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if len(errors) == 1:  # one line, like every other error of a stage
        raise DatasetValidationError(f"{dataset_dir}: the dataset has a problem to fix first: {errors[0]}")
    if errors:
        shown = "\n".join(f"- {p}" for p in errors[:_SHOWN_ERRORS])
        more = f"\n- ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        raise DatasetValidationError(f"{dataset_dir}: the dataset has {_plural(len(errors), 'problem')} to fix "
                                     f"first (`autoseg validate {dataset_dir}` shows the full report):\n{shown}{more}")
    if cache is not None and key is not None:
        atomic_write_json(cache, {"dataset_hash": key, "warnings": [[p.path, p.message] for p in warnings]})
    return warnings


def _cached_problems(cache: Path | None, key: str | None) -> list[Problem] | None:
    if cache is None or key is None or not cache.is_file():
        return None
    try:
        data = json.loads(cache.read_text())
        if data.get("dataset_hash") != key:
            return None
        return [Problem(path, message, "warning") for path, message in data["warnings"]]
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return None  # unreadable: check again


def check_case(case: CaseFiles, label_values: frozenset[int] | None) -> CaseReport:
    """Read one case once and check its files, their geometry, intensities and label values.

    Args:
        case: the case's channel files (and label).
        label_values: values the label may contain; None skips that check (labels undeclared).
    """
    problems: list[Problem] = []
    reference: tuple[Path, Image] | None = None
    for path in case.images:
        image, read_problems = _read(path)
        problems += read_problems
        if image is None:
            continue
        if reference is None:
            reference = (path, image)
        else:
            problems += _geometry_problems(path, image, *reference, what="channel")
        problems += _intensity_problems(path, image.array)
        problems += _size_problems(path, image.array)
        problems += _spacing_sanity(path, image.spacing)

    if case.label is not None:
        label, read_problems = _read(case.label)
        problems += read_problems
        if label is not None:
            if reference is not None:
                problems += _geometry_problems(case.label, label, *reference, what="label")
            problems += _label_problems(case.label, label.array, label_values)
    ndim = reference[1].ndim if reference is not None else None
    return CaseReport(case.case_id, ndim, tuple(problems))


def format_report(problems: Sequence[Problem]) -> str:
    """A readable summary: the counts, then every problem grouped under its file."""
    if not problems:
        return "No problems found: the dataset is ready."
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    by_path: dict[str, list[Problem]] = {}
    for problem in problems:
        by_path.setdefault(problem.path, []).append(problem)
    lines = [f"{_plural(errors, 'error')}, {_plural(warnings, 'warning')} in {_plural(len(by_path), 'file')}"]
    for path, group in by_path.items():
        lines.append("")
        lines.append(path)
        lines += [f"  {p.severity}: {p.message}" for p in group]
    return "\n".join(lines)


# --- dataset.json ------------------------------------------------------------------------------------


def _read_dataset_json(path: Path) -> tuple[object, DatasetJson | None, list[Problem]]:
    if not path.is_file():
        return None, None, [Problem(str(path), "dataset.json is missing")]
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, None, [Problem(str(path), f"not valid JSON ({error})")]
    model, texts = parse_dataset_json(data, str(path))
    return data, model, _from_texts(texts, (path,))


def _declared_ending(data: object) -> str | None:
    ending = data.get("file_ending") if isinstance(data, dict) else None
    return ending if isinstance(ending, str) and ending.lower() in SUPPORTED_ENDINGS else None


def _effective_ending(declared: str | None, images_dir: Path, json_path: Path) -> tuple[str | None, list[Problem]]:
    """The ending to check the files with: the declared one, unless no file uses it.

    When ``file_ending`` matches none of the files but they share another ending, the mismatch is
    reported once and the files are checked with their real ending, so one wrong key does not
    hide every other problem behind a wall of "misnamed file" messages.
    """
    names = _visible_names(images_dir)
    if declared is not None and any(name.lower().endswith(declared.lower()) for name in names):
        return declared, []
    counts = Counter(e for e in (file_ending(n) for n in names) if e in SUPPORTED_ENDINGS)
    if not counts:
        return declared, []
    actual, count = counts.most_common(1)[0]
    if declared is None:
        return actual, []
    return actual, [Problem(str(json_path), f'"file_ending" is {declared!r} but no file in {images_dir} ends '
                                            f"with it; {count} file(s) end in {actual!r} (checked as {actual!r})")]


def _lenient_num_channels(data: object, images_dir: Path, ending: str) -> int:
    """Channels when dataset.json is broken: from ``channel_names`` if usable, else from the files."""
    channels = data.get("channel_names", data.get("modality")) if isinstance(data, dict) else None
    if isinstance(channels, dict) and channels and all(str(k).isdigit() for k in channels):
        return max(int(k) for k in channels) + 1
    indices = [int(m["channel"]) for m in _channel_matches(images_dir, ending)]
    return max(indices, default=0) + 1


def _lenient_label_values(data: object) -> frozenset[int] | None:
    """Declared label values when dataset.json is broken elsewhere; None when labels are unusable."""
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        return None
    values: set[int] = set()
    for value in labels.values():
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
            return None
        values.update(items)
    return frozenset(values)


def _lenient_num_training(data: object) -> int | None:
    value = data.get("numTraining") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- files and naming ---------------------------------------------------------------------------------


def _visible_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _channel_matches(images_dir: Path, ending: str) -> list[re.Match[str]]:
    matches = []
    for name in _visible_names(images_dir):
        if name.lower().endswith(ending.lower()):
            match = CHANNEL_SUFFIX.match(name[: -len(ending)])
            if match is not None:
                matches.append(match)
    return matches


def _case_ids(images_dir: Path, ending: str) -> set[str]:
    """Every case named in ``imagesTr``, complete or not (so a missing label is one problem, not two)."""
    return {m["case"] for m in _channel_matches(images_dir, ending)}


def _from_texts(texts: Iterable[str], roots: Sequence[Path], severity: Severity = "error") -> list[Problem]:
    """Turn ``"PATH: message"`` strings from :mod:`autoseg.dataset` into problems.

    The path is split off after the known root it starts with, so a colon inside a folder name
    cannot cut it in the wrong place.
    """
    problems = []
    for text in texts:
        cut = -1
        for root in roots:
            if text.startswith(str(root)):
                cut = text.find(": ", len(str(root)))
                break
        if cut < 0:
            cut = text.find(": ")
        path, message = (text[:cut], text[cut + 2:]) if cut >= 0 else ("", text)
        problems.append(Problem(path, message, severity))
    return problems


# --- one case -----------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[Image | None, list[Problem]]:
    """Read one file; None when it cannot be trusted (unreadable, or voxels missing)."""
    try:
        image = read_image(path)
    except ImageReadError as error:
        return None, [Problem(error.path, error.reason)]
    if file_ending(path) not in (".nii", ".nii.gz"):
        return image, []
    check = check_nifti_bytes(path)
    problems = [Problem(str(path), m) for m in check.problems]
    return (None if check.truncated else image), problems


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(repr(round(float(v), 6)) for v in values) + ")"


def _geometry_problems(path: Path, image: Image, ref_path: Path, ref: Image, what: str) -> list[Problem]:
    """Shape, spacing, origin and direction of ``image`` against the case's reference image."""
    problems = []
    other = ref_path.name
    if image.array.shape != ref.array.shape:
        problems.append(f"{what} shape {image.array.shape} differs from {other}'s {ref.array.shape}")
    if image.ndim != ref.ndim:
        return [Problem(str(path), m) for m in problems]  # nothing else is comparable

    spacing, ref_spacing = np.asarray(image.spacing), np.asarray(ref.spacing)
    if not np.all(np.abs(spacing - ref_spacing) <= SPACING_RTOL * np.abs(ref_spacing)):
        problems.append(f"{what} spacing (z, y, x) {_fmt(spacing)} mm differs from {other}'s "
                        f"{_fmt(ref_spacing)} (relative tolerance {SPACING_RTOL:g})")

    origin_tol = ORIGIN_ATOL_MM + ORIGIN_SPACING_FRACTION * float(np.max(np.abs(ref_spacing)))
    origin_diff = float(np.max(np.abs(np.subtract(image.origin, ref.origin))))
    if not origin_diff <= origin_tol:
        problems.append(f"{what} origin (x, y, z) {_fmt(image.origin)} differs from {other}'s "
                        f"{_fmt(ref.origin)} by {origin_diff:.4g} mm (tolerance {origin_tol:.4g} mm)")

    direction_diff = float(np.max(np.abs(np.subtract(image.direction, ref.direction))))
    if not direction_diff <= DIRECTION_ATOL:
        problems.append(f"{what} direction {_fmt(image.direction)} differs from {other}'s "
                        f"{_fmt(ref.direction)} (largest difference {direction_diff:.3g}, "
                        f"tolerance {DIRECTION_ATOL:g})")
    return [Problem(str(path), m) for m in problems]


def _size_problems(path: Path, array: np.ndarray) -> list[Problem]:
    if array.size > 1:
        return []
    return [Problem(str(path), f"has shape {array.shape}: a single voxel is not an image to segment")]


def _spacing_sanity(path: Path, spacing: tuple[float, ...]) -> list[Problem]:
    if all(np.isfinite(s) and s > 0 for s in spacing):
        return []
    return [Problem(str(path), f"spacing {spacing} must be positive and finite")]


def _intensity_problems(path: Path, array: np.ndarray) -> list[Problem]:
    problems = []
    values = array
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum()) - n_nan
            problems.append(Problem(str(path), f"{n_nan} NaN and {n_inf} infinite intensity value(s); "
                                               "replace them with finite numbers"))
            values = array[finite]
    if values.size and values.min() == values.max():
        problems.append(Problem(str(path), f"every voxel has the same value {values.flat[0].item()!r}; "
                                           "the image is empty or blank"))
    return problems


def _label_problems(path: Path, array: np.ndarray, declared: frozenset[int] | None) -> list[Problem]:
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            return [Problem(str(path), "label has NaN or infinite values; labels must be whole numbers")]
        rounded = np.rint(array)
        fractional = array != rounded
        if fractional.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(array[fractional])[:MAX_LISTED])
            return [Problem(str(path), f"label has non-integer values ({examples}); labels must be whole "
                                       "numbers (was it resampled with linear interpolation?)")]
        array = rounded
    values = np.unique(array).astype(np.int64).tolist()
    if declared is None:
        return []
    undeclared = [v for v in values if v not in declared]
    if not undeclared:
        return []
    shown = ", ".join(str(v) for v in undeclared[:MAX_LISTED]) + (" ..." if len(undeclared) > MAX_LISTED else "")
    return [Problem(str(path), f"label values {shown} are not declared in dataset.json \"labels\" "
                               f"(declared: {', '.join(str(v) for v in sorted(declared))}); training "
                               "would fail on them (in nnU-Net: a 'CUDA device-side assert')")]


# --- all cases ----------------------------------------------------------------------------------------


def _check_cases(cases: list[CaseFiles], label_values: frozenset[int] | None, n_jobs: int,
                 progress: bool) -> list[CaseReport]:
    from joblib import delayed
    from tqdm import tqdm

    # in case order, the bar advancing as cases finish
    results = run_cases((delayed(check_case)(case, label_values) for case in cases), n_jobs)
    return list(tqdm(results, total=len(cases), desc="validate", unit="case", disable=not progress))


def _mixed_dimensionality(reports: list[CaseReport], images_dir: Path) -> list[Problem]:
    by_ndim: dict[int, list[str]] = {}
    for report in reports:
        if report.ndim is not None:
            by_ndim.setdefault(report.ndim, []).append(report.case_id)
    if len(by_ndim) < 2:
        return []
    parts = [f"{len(ids)} {ndim}D ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
             for ndim, ids in sorted(by_ndim.items())]
    return [Problem(str(images_dir), f"mixes 2D and 3D cases: {'; '.join(parts)}; "
                                     "a dataset must be all 2D or all 3D")]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")
