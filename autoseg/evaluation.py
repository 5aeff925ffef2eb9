"""Evaluation of segmentations: overlap, volume and surface-distance metrics in millimetres.

``autoseg evaluate PRED_DIR REF_DIR`` compares label maps case by case and class by class.
Open-source evaluators disagree on the details (empty masks, border definition, how HD95 is
pooled), so every choice made here is written down and tested.

Conventions
-----------
* Arrays use autoseg's axis order ``(z, y, x)`` / ``(y, x)``; ``spacing`` is in the same order, in mm.
* **Border** of a mask: the mask minus its binary erosion with the *face-connectivity* structuring
  element (``scipy.ndimage.generate_binary_structure(ndim, 1)``; scipy's default for erosion),
  voxels outside the image counting as background. A border voxel therefore touches the
  background through a face; this is the thinnest closed border (no redundant corner voxels).
  Both masks use the same definition.
* **Distances** are Euclidean distances in mm between voxel centres of the two borders, from
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``. Both masks are first cropped to
  the bounding box of their union plus a 1-voxel margin: the result is exact (every border voxel is
  inside the crop) and big volumes with small structures stay fast.
* ``d(P->R)`` are the distances from each prediction-border voxel to the nearest reference-border
  voxel; ``d(R->P)`` the other way round.

Metrics (keys of :func:`compute_metrics`)
-----------------------------------------
See :data:`METRIC_DEFINITIONS`; the same text is written into the JSON metadata.
``hd95`` is the maximum of the two *directed* 95th percentiles (Metrics Reloaded, MONAI,
DeepMind surface-distance), not the 95th percentile of the pooled distances; the two can differ
by centimetres on the same pair. Percentiles use numpy's default linear interpolation.

Empty-case policy
-----------------
"pred empty" means the prediction is empty and the reference is not, and vice versa.
``None`` means undefined: it is written as ``null`` (JSON) or an empty cell (CSV).

=============================  ==========  ==========  ==========  ================================
metric                         both empty  pred empty  ref empty   also undefined when
=============================  ==========  ==========  ==========  ================================
dice, iou                      1           0           0           -
nsd                            1           0           0           -
sensitivity                    None        0           None        (reference empty)
specificity                    1 *         1 *         < 1 *       the reference is everything
precision                      None        None        0           (prediction empty)
volume_*_ml                    0 / 0 / 0   defined     defined     -
relative_volume_difference     None        -1          None        (reference empty)
hd, hd95, assd                 0           None **     None **     -
=============================  ==========  ==========  ==========  ================================

``*`` ordinary value TN / (TN + FP); undefined only when no valid voxel is background in the
reference. ``**`` :func:`summarize` substitutes the worst case, the image diagonal
(:func:`image_diagonal_mm`), for these and counts them in ``n_substituted``; every other
undefined value is left out of the statistics (``n_valid`` counts the values that were defined).

Ignore label: voxels where the *reference* equals the ignore value are removed from both masks
before anything is computed (counts, volumes and borders alike), so a prediction inside an
ignored area is neither a false positive nor a surface error. Both masks are cut along the same
ignored area, so the border that the cut creates is shared wherever both masks reach it.

Regions: a label whose value is a list (or tuple) of values stands for the union of those values,
in the reference and in the prediction alike (nnU-Net's region-based training writes predictions
as label maps, so the same union applies to them).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from autoseg.constants import DEFAULT_FILE_ENDING, DEFAULT_TOLERANCE_MM
from autoseg.dataset import load_dataset_json
from autoseg.dicom import DICOM_SEG_ENDING, is_dicom_seg, read_dicom_seg_image, read_label_pair
from autoseg.errors import AutosegError
from autoseg.io import read_image
from autoseg.labels import LabelValue, label_mask, select_labels
from autoseg.processes import exit_with_parent
from autoseg.utils import atomic_write_text, bounding_slices


class EvaluationError(AutosegError, ValueError):
    """The folders or files to evaluate do not fit together; the message names the file."""


MetricValue = float | None
Row = dict[str, Any]

METRIC_NAMES: tuple[str, ...] = (
    "dice",
    "iou",
    "sensitivity",
    "specificity",
    "precision",
    "volume_pred_ml",
    "volume_ref_ml",
    "volume_difference_ml",
    "relative_volume_difference",
    "hd",
    "hd95",
    "assd",
    "nsd",
)

# Distances that are undefined when exactly one mask is empty; the summary replaces them with
# the worst possible value so that a missed structure cannot improve the mean.
DISTANCE_METRICS: tuple[str, ...] = ("hd", "hd95", "assd")

BORDER_DEFINITION = (
    "border = mask AND NOT binary_erosion(mask, generate_binary_structure(ndim, 1)) "
    "(face connectivity; voxels outside the image count as background); same definition for "
    "prediction and reference"
)
METRIC_DEFINITIONS: dict[str, str] = {
    "dice": "2 TP / (2 TP + FP + FN); 1 if both masks are empty",
    "iou": "TP / (TP + FP + FN); 1 if both masks are empty",
    "sensitivity": "TP / (TP + FN); undefined (null) if the reference is empty",
    "specificity": "TN / (TN + FP); undefined (null) if the reference covers every valid voxel",
    "precision": "TP / (TP + FP); undefined (null) if the prediction is empty",
    "volume_pred_ml": "prediction voxel count * product(spacing) / 1000, mL (2D: mm^2 / 1000)",
    "volume_ref_ml": "reference voxel count * product(spacing) / 1000, mL (2D: mm^2 / 1000)",
    "volume_difference_ml": "volume_pred_ml - volume_ref_ml, mL",
    "relative_volume_difference": "(volume_pred_ml - volume_ref_ml) / volume_ref_ml; null if the reference is empty",
    "hd": "Hausdorff distance, mm: max(max d(P->R), max d(R->P)); 0 if both empty, null if exactly one is",
    "hd95": (
        "mm: max(P95(d(P->R)), P95(d(R->P))), the maximum of the two directed 95th percentiles "
        "(Metrics Reloaded / MONAI / DeepMind surface-distance definition; numpy linear "
        "interpolation), NOT the percentile of the pooled distances; 0 if both empty, null if "
        "exactly one is"
    ),
    "assd": (
        "average symmetric surface distance, mm: (sum d(P->R) + sum d(R->P)) / (|border P| + "
        "|border R|); 0 if both empty, null if exactly one is"
    ),
    "nsd": (
        "normalized surface Dice at tolerance tau mm: (#{d(P->R) <= tau} + #{d(R->P) <= tau}) / "
        "(|border P| + |border R|); 1 if both empty, 0 if exactly one is"
    ),
}
WORST_CASE_DEFINITION = (
    "in the summary, hd/hd95/assd that are undefined because exactly one mask is empty are "
    "replaced by the image diagonal sqrt(sum((shape_i * spacing_i)^2)) mm of that case and "
    "counted in n_substituted; other undefined values are left out"
)
SUMMARY_DEFINITION = (
    "per label and metric over cases: mean, median, std (population, ddof=0) of the defined "
    "values plus substituted worst cases; n_cases rows, n_valid defined values, n_substituted "
    "worst-case substitutions"
)

# Clinical-quality grades: thresholds are strict (Dice must exceed, HD95 must stay below).
# An undefined HD95 (one mask empty) fails every HD95 criterion.
EXCELLENT_MIN_DICE = 0.85
EXCELLENT_MAX_HD95_MM = 5.0
GOOD_MIN_DICE = 0.70
GOOD_MAX_HD95_MM = 10.0
FAIR_MIN_DICE = 0.50
CLINICAL_QUALITY_DEFINITION = (
    f"excellent: dice > {EXCELLENT_MIN_DICE} and hd95 < {EXCELLENT_MAX_HD95_MM} mm; "
    f"good: dice > {GOOD_MIN_DICE} and hd95 < {GOOD_MAX_HD95_MM} mm; "
    f"fair: dice > {FAIR_MIN_DICE}; poor: otherwise"
)


@dataclass
class EvaluationResult:
    """Everything an evaluation produced.

    Attributes:
        rows: one dict per (case, label): ``case``, ``label``, every metric of
            :data:`METRIC_NAMES`, ``image_diagonal_mm`` and optionally ``clinical_quality``.
        summary: ``{label: {metric: {mean, median, std, n_cases, n_valid, n_substituted}}}``.
        metadata: inputs and the definition of every metric and convention.
    """

    rows: list[Row]
    summary: dict[str, dict[str, dict[str, Any]]]
    metadata: dict[str, Any] = field(default_factory=dict)


# --- metric core: pure functions over boolean arrays ------------------------------------------------


def compute_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    valid_mask: np.ndarray | None = None,
) -> dict[str, MetricValue]:
    """All metrics of one class of one case.

    Args:
        pred: boolean prediction mask.
        ref: boolean reference mask of the same shape.
        spacing: voxel size in mm, in the array's axis order.
        tolerance_mm: tolerance of the normalized surface Dice.
        valid_mask: optional boolean mask; voxels outside it are ignored by every metric.

    Returns:
        ``{metric: value}`` in the order of :data:`METRIC_NAMES`; ``None`` marks an undefined
        value (see the empty-case table in the module docstring).
    """
    spacing = _check_inputs(pred, ref, spacing, valid_mask)
    if tolerance_mm < 0 or not math.isfinite(tolerance_mm):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    if valid_mask is not None:
        pred = pred & valid_mask
        ref = ref & valid_mask
        n_valid_voxels = int(np.count_nonzero(valid_mask))
    else:
        n_valid_voxels = pred.size

    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref))
    metrics: dict[str, MetricValue] = {}
    metrics.update(_overlap_metrics(tp, n_pred, n_ref, n_valid_voxels))
    metrics.update(_volume_metrics(n_pred, n_ref, spacing))
    metrics.update(_distance_metrics(pred, ref, n_pred, n_ref, spacing, tolerance_mm))
    return {name: metrics[name] for name in METRIC_NAMES}


def surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    valid_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed border-to-border distances in mm: ``(d(P->R), d(R->P))``.

    ``d(P->R)[i]`` is the distance from the i-th prediction-border voxel (C order) to the nearest
    reference-border voxel. Raises ``ValueError`` if either mask is empty (after ``valid_mask``),
    since the distance to an empty set is undefined.
    """
    spacing = _check_inputs(pred, ref, spacing, valid_mask)
    if valid_mask is not None:
        pred = pred & valid_mask
        ref = ref & valid_mask
    if not pred.any() or not ref.any():
        raise ValueError("surface distances are undefined when a mask is empty "
                         f"(prediction voxels: {np.count_nonzero(pred)}, reference voxels: "
                         f"{np.count_nonzero(ref)})")
    return _directed_distances(pred, ref, spacing)


def mask_border(mask: np.ndarray) -> np.ndarray:
    """The border of a boolean mask: voxels of the mask with a face-neighbour outside it.

    Voxels outside the array count as background, so a mask touching the image edge has a
    border there too.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Physical diagonal of the image extent, ``sqrt(sum((n_i * s_i)^2))`` mm.

    No distance between two voxels of the image can exceed it, so it is the worst case
    substituted for undefined distances.
    """
    if len(shape) != len(spacing):
        raise ValueError(f"shape {tuple(shape)} and spacing {tuple(spacing)} differ in length")
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def clinical_quality(dice: MetricValue, hd95: MetricValue) -> str:
    """Grade one result as ``excellent``, ``good``, ``fair`` or ``poor`` (thresholds above)."""
    dice_value = -math.inf if dice is None else dice
    hd95_value = math.inf if hd95 is None else hd95
    if dice_value > EXCELLENT_MIN_DICE and hd95_value < EXCELLENT_MAX_HD95_MM:
        return "excellent"
    if dice_value > GOOD_MIN_DICE and hd95_value < GOOD_MAX_HD95_MM:
        return "good"
    if dice_value > FAIR_MIN_DICE:
        return "fair"
    return "poor"


def _check_inputs(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], valid_mask: np.ndarray | None
) -> tuple[float, ...]:
    """Reject anything but boolean masks of one shape with a matching positive spacing."""
    arrays = {"pred": pred, "ref": ref} if valid_mask is None else {
        "pred": pred, "ref": ref, "valid_mask": valid_mask}
    for name, array in arrays.items():
        # Label maps passed by mistake would silently become "any label": demand booleans.
        if not isinstance(array, np.ndarray) or array.dtype != np.bool_:
            raise TypeError(f"{name} must be a boolean numpy array, got "
                            f"{getattr(array, 'dtype', type(array).__name__)}")
        if array.shape != pred.shape:
            raise ValueError(f"{name} has shape {array.shape}, pred has {pred.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries for a {pred.ndim}D mask")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}")
    return spacing


def _ratio(numerator: float, denominator: float) -> MetricValue:
    return None if denominator == 0 else float(numerator / denominator)


def _overlap_metrics(tp: int, n_pred: int, n_ref: int, n_valid_voxels: int) -> dict[str, MetricValue]:
    fp = n_pred - tp
    fn = n_ref - tp
    tn = n_valid_voxels - tp - fp - fn
    # Two empty masks agree perfectly; Dice and IoU would otherwise be 0/0.
    both_empty = n_pred == 0 and n_ref == 0
    return {
        "dice": 1.0 if both_empty else float(2 * tp / (n_pred + n_ref)),
        "iou": 1.0 if both_empty else float(tp / (n_pred + n_ref - tp)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
    }


def _volume_metrics(n_pred: int, n_ref: int, spacing: tuple[float, ...]) -> dict[str, MetricValue]:
    voxel_ml = math.prod(spacing) / 1000.0  # mm^3 -> mL
    volume_pred = n_pred * voxel_ml
    volume_ref = n_ref * voxel_ml
    return {
        "volume_pred_ml": volume_pred,
        "volume_ref_ml": volume_ref,
        "volume_difference_ml": volume_pred - volume_ref,
        "relative_volume_difference": _ratio(volume_pred - volume_ref, volume_ref),
    }


def _distance_metrics(
    pred: np.ndarray, ref: np.ndarray, n_pred: int, n_ref: int, spacing: tuple[float, ...],
    tolerance_mm: float,
) -> dict[str, MetricValue]:
    if n_pred == 0 and n_ref == 0:
        return {"hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    if n_pred == 0 or n_ref == 0:
        return {"hd": None, "hd95": None, "assd": None, "nsd": 0.0}
    pred_to_ref, ref_to_pred = _directed_distances(pred, ref, spacing)
    n_border = pred_to_ref.size + ref_to_pred.size
    within = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)
    return {
        "hd": float(max(pred_to_ref.max(), ref_to_pred.max())),
        "hd95": float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))),
        "assd": float((pred_to_ref.sum() + ref_to_pred.sum()) / n_border),
        "nsd": float(within / n_border),
    }


def _directed_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances between the borders of two non-empty masks, computed inside their union's box."""
    crop = bounding_slices(pred | ref, margin=1)
    pred_border = mask_border(pred[crop])
    ref_border = mask_border(ref[crop])
    # The EDT gives every voxel its distance to the nearest zero, so zeros are put on the border
    # we measure *to*. Every border voxel lies inside the crop, so cropping changes no distance.
    to_ref = ndimage.distance_transform_edt(~ref_border, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=spacing)
    return to_ref[pred_border].astype(np.float64), to_pred[ref_border].astype(np.float64)


# --- one case ---------------------------------------------------------------------------------------


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, LabelValue],
    case: str,
    ignore_label: int | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    clinical: bool = False,
) -> list[Row]:
    """Rows for one case: one per entry of ``labels`` (used as given; see :func:`select_labels`).

    Voxels where ``ref_labels == ignore_label`` are excluded from every metric.
    """
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"case {case}: prediction shape {pred_labels.shape} differs from reference "
                         f"shape {ref_labels.shape}")
    valid = None if ignore_label is None else ref_labels != ignore_label
    diagonal = image_diagonal_mm(ref_labels.shape, spacing)
    rows = []
    for name, value in labels.items():
        metrics = compute_metrics(label_mask(pred_labels, value), label_mask(ref_labels, value),
                                  spacing, tolerance_mm, valid)
        row: Row = {"case": case, "label": name, **metrics, "image_diagonal_mm": diagonal}
        if clinical:
            row["clinical_quality"] = clinical_quality(metrics["dice"], metrics["hd95"])
        rows.append(row)
    return rows


# --- summary ------------------------------------------------------------------------------------------


def summarize(rows: Iterable[Row], metrics: Sequence[str] = METRIC_NAMES) -> dict[str, dict[str, dict[str, Any]]]:
    """Statistics per label and metric over cases.

    Undefined distances (:data:`DISTANCE_METRICS`) are replaced by the row's
    ``image_diagonal_mm`` and counted in ``n_substituted``; other undefined values are skipped.

    Returns:
        ``{label: {metric: {"mean", "median", "std", "n_cases", "n_valid", "n_substituted"}}}``;
        the statistics are ``None`` when no value is left.
    """
    by_label: dict[str, list[Row]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for label, label_rows in by_label.items():
        summary[label] = {metric: _summarize_metric(label_rows, metric) for metric in metrics}
    return summary


def _summarize_metric(rows: list[Row], metric: str) -> dict[str, Any]:
    values: list[float] = []
    n_valid = 0
    n_substituted = 0
    for row in rows:
        value = row.get(metric)
        if value is not None:
            values.append(float(value))
            n_valid += 1
        elif metric in DISTANCE_METRICS:
            if row.get("image_diagonal_mm") is None:
                raise ValueError(f"row {row.get('case')!r}/{row.get('label')!r} has an undefined {metric} "
                                 "but no image_diagonal_mm to substitute")
            values.append(float(row["image_diagonal_mm"]))
            n_substituted += 1
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()) if values else None,
        "median": float(np.median(array)) if values else None,
        "std": float(array.std()) if values else None,
        "n_cases": len(rows),
        "n_valid": n_valid,
        "n_substituted": n_substituted,
    }


# --- folders ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CaseTask:
    """Everything a worker process needs to evaluate one case (plain data, so it can be sent)."""

    case: str
    pred_path: Path
    ref_path: Path
    labels: dict[str, int | list[int]]
    ignore_label: int | None
    tolerance_mm: float
    clinical: bool


def evaluate_folders(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    labels: Mapping[str, LabelValue] | None = None,
    dataset_json: str | os.PathLike | None = None,
    ignore_label: int | None = None,
    file_ending: str | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    include_background: bool = False,
    clinical: bool = False,
    n_jobs: int = 1,
) -> EvaluationResult:
    """Evaluate every reference in ``ref_dir`` against the prediction of the same file name.

    Labels come from ``labels``, else from ``dataset_json``, else from the values found in the
    references (labels present only in predictions are then not evaluated). The ignore label
    comes from ``ignore_label``, else from the ``ignore`` entry of the dataset.json.
    The file ending comes from ``file_ending``, else the dataset.json, else ``.nii.gz``.

    Raises:
        NotADirectoryError / FileNotFoundError: a folder, the references or predictions are missing
            (the message lists the missing files).
        ValueError: a prediction has no reference, or a pair differs in shape, spacing, origin or
            direction (the message names both files).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder, role in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: {role} folder does not exist")
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")

    dataset = None
    if dataset_json is not None:

        dataset = load_dataset_json(dataset_json)
        if ignore_label is None:
            ignore_label = dataset.ignore_label
    file_ending = file_ending or (dataset.file_ending if dataset is not None else DEFAULT_FILE_ENDING)

    cases = _match_cases(pred_dir, ref_dir, file_ending)
    if labels is None:
        labels = dataset.labels if dataset is not None else _labels_from_references(
            [ref for _, _, ref in cases], ignore_label)
    selected = select_labels(labels, include_background, ignore_label)

    tasks = [_CaseTask(case, pred, ref, selected, ignore_label, tolerance_mm, clinical)
             for case, pred, ref in cases]
    rows = [row for case_rows in _run_tasks(tasks, n_jobs) for row in case_rows]
    metadata = {
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "file_ending": file_ending,
        "labels": selected,
        "ignore_label": ignore_label,
        "include_background": include_background,
        "tolerance_mm": tolerance_mm,
        "n_cases": len(cases),
        "metric_definitions": dict(METRIC_DEFINITIONS),
        "border_definition": BORDER_DEFINITION,
        "worst_case_substitution": WORST_CASE_DEFINITION,
        "summary_definition": SUMMARY_DEFINITION,
    }
    if clinical:
        metadata["clinical_quality_definition"] = CLINICAL_QUALITY_DEFINITION
    return EvaluationResult(rows=rows, summary=summarize(rows), metadata=metadata)


def _match_cases(pred_dir: Path, ref_dir: Path, file_ending: str) -> list[tuple[str, Path, Path]]:
    """Pair references with predictions by case name (``CASE<file_ending>``, or a DICOM SEG
    ``CASE.dcm`` on either side); every mismatch is reported at once."""
    def files(folder: Path) -> dict[str, Path]:
        # Hidden files are skipped: an interrupted atomic write leaves a ".name.tmp" behind.
        found = {}
        for p in sorted(folder.iterdir()):
            ending = next((e for e in (file_ending, DICOM_SEG_ENDING) if p.name.endswith(e)), None)
            if ending is not None and p.is_file() and not p.name.startswith("."):
                found[p.name[: -len(ending)]] = p
        return found

    refs, preds = files(ref_dir), files(pred_dir)
    if not refs:
        raise FileNotFoundError(f"{ref_dir}: no reference files ending in {file_ending!r} or {DICOM_SEG_ENDING!r}")
    missing = [str(pred_dir / (case + file_ending)) for case in refs if case not in preds]
    if missing:
        raise FileNotFoundError(f"{len(missing)} prediction(s) missing for references in {ref_dir}: "
                                + ", ".join(missing))
    orphans = [str(preds[name]) for name in preds if name not in refs]
    if orphans:
        raise EvaluationError(f"{len(orphans)} prediction(s) have no reference in {ref_dir}: " + ", ".join(orphans))
    return [(case, preds[case], refs[case]) for case in refs]


def _labels_from_references(ref_paths: list[Path], ignore_label: int | None) -> dict[str, int]:
    """Every value found in the references (except the ignore value), named by its number."""
    values: set[int] = set()
    for path in ref_paths:
        array = _read_label_image(path).array
        _check_integer_labels(array, path)
        values.update(int(v) for v in np.unique(array))
    values.discard(ignore_label)  # type: ignore[arg-type]
    return {str(v): v for v in sorted(values)}


def _read_label_image(path: Path):
    return read_dicom_seg_image(path) if is_dicom_seg(path) else read_image(path)


def _check_integer_labels(array: np.ndarray, path: Path) -> None:
    """Label maps must hold integers: a float 0.6 would silently match no label at all."""
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(np.rint(array), array):
        raise EvaluationError(f"{path}: label map has non-integer values (dtype {array.dtype})")


def _check_same_geometry(pred, ref, pred_path: Path, ref_path: Path) -> None:
    """A prediction must sit on exactly the reference's voxel grid, or its metrics mean nothing."""
    def differs(a: Sequence[float], b: Sequence[float], atol: float) -> bool:
        return len(a) != len(b) or not np.allclose(a, b, rtol=1e-5, atol=atol)

    problems = []
    if pred.array.shape != ref.array.shape:
        problems.append(f"shape {pred.array.shape} vs {ref.array.shape}")
    # NIfTI stores geometry as float32, hence tolerances rather than equality.
    if differs(pred.spacing, ref.spacing, 1e-6):
        problems.append(f"spacing {tuple(pred.spacing)} vs {tuple(ref.spacing)}")
    if differs(pred.origin, ref.origin, 1e-3):
        problems.append(f"origin {tuple(pred.origin)} vs {tuple(ref.origin)}")
    if differs(pred.direction, ref.direction, 1e-4):
        problems.append(f"direction {tuple(pred.direction)} vs {tuple(ref.direction)}")
    if problems:
        raise EvaluationError(f"prediction {pred_path} and reference {ref_path} differ: " + "; ".join(problems))


def _evaluate_case_files(task: _CaseTask) -> list[Row]:
    pred, ref = read_label_pair(task.pred_path, task.ref_path)  # a DICOM SEG onto the other's grid
    _check_same_geometry(pred, ref, task.pred_path, task.ref_path)
    _check_integer_labels(pred.array, task.pred_path)
    _check_integer_labels(ref.array, task.ref_path)
    return evaluate_case(pred.array, ref.array, ref.spacing, task.labels, task.case, task.ignore_label,
                         task.tolerance_mm, task.clinical)


def _run_tasks(tasks: list[_CaseTask], n_jobs: int) -> list[list[Row]]:
    if n_jobs == 1 or len(tasks) <= 1:
        return [_evaluate_case_files(task) for task in tasks]
    # "spawn" rather than fork: the parent may hold torch/OpenMP threads that a fork would corrupt.
    with ProcessPoolExecutor(max_workers=min(n_jobs, len(tasks)), mp_context=get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        return list(pool.map(_evaluate_case_files, tasks))


# --- output -------------------------------------------------------------------------------------------


def result_to_json_dict(result: EvaluationResult) -> dict[str, Any]:
    """The JSON document: ``metadata``, ``summary`` and per-case ``rows`` (undefined -> null)."""
    return {"metadata": result.metadata, "summary": result.summary, "rows": result.rows}


def rows_to_csv_text(rows: Sequence[Row]) -> str:
    """Per-case, per-label rows as CSV text; undefined values are empty cells."""
    buffer = io.StringIO()
    if rows:
        columns = list(rows[0].keys())
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def write_results(
    result: EvaluationResult,
    out_json: str | os.PathLike | None = None,
    out_csv: str | os.PathLike | None = None,
) -> None:
    """Write the JSON document and/or the per-case CSV, each atomically (temporary file, then rename)."""

    if out_json is not None:
        # allow_nan=False: NaN/Infinity are not JSON; undefined values must already be None.
        atomic_write_text(out_json, json.dumps(result_to_json_dict(result), indent=2, allow_nan=False) + "\n")
    if out_csv is not None:
        atomic_write_text(out_csv, rows_to_csv_text(result.rows))


# --- what `autoseg evaluate` reads and prints ---------------------------------------------------------


def parse_label_specs(specs: Sequence[str]) -> dict[str, int | list[int]]:
    """Parse ``NAME=VALUE`` or ``NAME=V1,V2`` (a region) command-line label specifications."""
    labels: dict[str, int | list[int]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        try:
            numbers = [int(v) for v in values.split(",")]
        except ValueError:
            numbers = []
        if not sep or not name or not numbers:
            raise EvaluationError(f"label specification {spec!r} must look like liver=1 or whole_tumor=1,2,3")
        labels[name] = numbers[0] if len(numbers) == 1 else numbers
    return labels


def summary_lines(result: EvaluationResult) -> list[str]:
    """One line per label: the mean Dice and HD95, and how many HD95 values were substituted."""
    lines = []
    for label, stats in result.summary.items():
        hd95 = stats["hd95"]
        lines.append(f"{label}: dice {_format(stats['dice']['mean'])}, hd95 {_format(hd95['mean'])} mm "
                     f"({hd95['n_substituted']} substituted of {hd95['n_cases']})")
    return lines


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

