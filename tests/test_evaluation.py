"""Tests of autoseg.evaluation: golden analytic cases, the empty-case table, ignore/regions, folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from autoseg.cli import main
from autoseg.evaluation import (
    CLINICAL_QUALITY_DEFINITION,
    METRIC_NAMES,
    EvaluationError,
    clinical_quality,
    compute_metrics,
    evaluate_case,
    evaluate_folders,
    image_diagonal_mm,
    mask_border,
    parse_label_specs,
    select_labels,
    summarize,
    surface_distances,
    write_results,
)

SPACING_2D = (2.0, 0.7)
SPACING_3D = (2.5, 0.8, 0.6)


# --- independent reference implementation (brute force, no erosion, no EDT) ----------------------------


def brute_border(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (outside the array = background)."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    border = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            border |= mask & ~np.roll(padded, shift, axis=axis)[inner]
    return border


def brute_directed(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    pred_points = np.argwhere(brute_border(pred)) * np.asarray(spacing)
    ref_points = np.argwhere(brute_border(ref)) * np.asarray(spacing)
    pairwise = cdist(pred_points, ref_points)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def brute_distance_metrics(pred, ref, spacing, tolerance_mm=1.0) -> dict[str, float]:
    p2r, r2p = brute_directed(pred, ref, spacing)
    both = np.concatenate([p2r, r2p])
    return {
        "hd": max(p2r.max(), r2p.max()),
        "hd95": max(np.percentile(p2r, 95), np.percentile(r2p, 95)),
        "assd": both.mean(),
        "nsd": np.count_nonzero(both <= tolerance_mm) / both.size,
    }


def box(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def ball(shape, spacing, radius_mm) -> np.ndarray:
    """Voxels whose centre lies within radius_mm of the grid centre, in physical space."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


# --- golden analytic cases ------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [SPACING_2D, SPACING_3D])
def test_identical_masks_are_perfect(spacing):
    shape = (9, 10, 11)[: len(spacing)]
    mask = box(shape, (2,) * len(spacing), (4,) * len(spacing))
    metrics = compute_metrics(mask, mask.copy(), spacing)
    assert list(metrics) == list(METRIC_NAMES)
    expected = {"dice": 1.0, "iou": 1.0, "sensitivity": 1.0, "specificity": 1.0, "precision": 1.0,
                "volume_difference_ml": 0.0, "relative_volume_difference": 0.0,
                "hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0}
    for name, value in expected.items():
        assert metrics[name] == value, name
    assert metrics["volume_ref_ml"] == pytest.approx(4 ** len(spacing) * math.prod(spacing) / 1000)


@pytest.mark.parametrize("spacing", [SPACING_2D, SPACING_3D])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_cube_hausdorff_is_shift_times_spacing(spacing, axis, shift):
    ndim = len(spacing)
    side = 5
    shape = (14,) * ndim
    ref = box(shape, (2,) * ndim, (side,) * ndim)
    start = [2] * ndim
    start[axis] += shift
    pred = box(shape, start, (side,) * ndim)

    metrics = compute_metrics(pred, ref, spacing)

    # Every border voxel is at most `shift` steps from the other border, and a face voxel exactly so.
    assert metrics["hd"] == pytest.approx(shift * spacing[axis], abs=1e-12)
    assert metrics["dice"] == pytest.approx((side - shift) / side)
    assert metrics["iou"] == pytest.approx((side - shift) / (side + shift))
    assert metrics["volume_difference_ml"] == pytest.approx(0.0)
    reference = brute_distance_metrics(pred, ref, spacing)
    for name in ("hd", "hd95", "assd", "nsd"):
        assert metrics[name] == pytest.approx(reference[name], abs=1e-12), name


@pytest.mark.parametrize(("spacing", "axis", "tolerance_mm", "expected_nsd"), [
    # 2D: lines along x (0.7 mm steps); within 1 mm: the 10 overlapping voxels each way + 1 at 0.7 mm.
    (SPACING_2D, 1, 1.0, 21 / 30),
    # 3D: lines along z (2.5 mm steps); within 1 mm: only the 10 overlapping voxels each way.
    (SPACING_3D, 0, 1.0, 20 / 30),
])
def test_hd95_by_hand_is_max_of_directed_percentiles(spacing, axis, tolerance_mm, expected_nsd):
    # A 1-voxel-thick line is all border. Prediction: 20 voxels; reference: its first 10.
    # d(P->R) = [0]*10 + [1..10]*s and d(R->P) = [0]*10.
    step = spacing[axis]
    shape = [3] * len(spacing)
    shape[axis] = 24
    pred_start, ref_start = [1] * len(spacing), [1] * len(spacing)
    pred_size, ref_size = [1] * len(spacing), [1] * len(spacing)
    pred_start[axis] = ref_start[axis] = 0
    pred_size[axis], ref_size[axis] = 20, 10
    pred = box(shape, pred_start, pred_size)
    ref = box(shape, ref_start, ref_size)

    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    np.testing.assert_allclose(pred_to_ref, np.r_[np.zeros(10), np.arange(1, 11) * step], atol=1e-12)
    np.testing.assert_allclose(ref_to_pred, np.zeros(10), atol=1e-12)

    metrics = compute_metrics(pred, ref, spacing, tolerance_mm=tolerance_mm)
    # Directed P95 of the 20 values, linear interpolation: rank 0.95 * 19 = 18.05 -> 9 + 0.05 steps.
    assert metrics["hd95"] == pytest.approx(9.05 * step)
    # The pooled percentile (rank 0.95 * 29 = 27.55 -> 8.55 steps) is a different, smaller number.
    assert metrics["hd95"] > 8.55 * step + 0.1
    assert metrics["hd"] == pytest.approx(10 * step)
    assert metrics["assd"] == pytest.approx(55 * step / 30)
    assert metrics["nsd"] == pytest.approx(expected_nsd)
    assert metrics["dice"] == pytest.approx(20 / 30)
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["sensitivity"] == 1.0


@pytest.mark.parametrize("spacing", [SPACING_2D, SPACING_3D])
def test_disjoint_diagonal_cubes(spacing):
    ndim = len(spacing)
    side, offset = 3, 5
    shape = (12,) * ndim
    ref = box(shape, (1,) * ndim, (side,) * ndim)
    pred = box(shape, (1 + offset,) * ndim, (side,) * ndim)

    metrics = compute_metrics(pred, ref, spacing)

    # The far corner of each cube is `offset` steps along every axis from the other cube's near corner.
    assert metrics["hd"] == pytest.approx(offset * math.sqrt(sum(s**2 for s in spacing)))
    for name in ("dice", "iou", "sensitivity", "precision", "nsd"):
        assert metrics[name] == 0.0, name
    reference = brute_distance_metrics(pred, ref, spacing)
    for name in ("hd95", "assd"):
        assert metrics[name] == pytest.approx(reference[name], abs=1e-12), name


@pytest.mark.parametrize(("shape", "spacing"), [((41, 41), (0.9, 0.6)), ((15, 25, 30), (1.5, 1.0, 0.8))])
def test_sphere_inside_larger_sphere(shape, spacing):
    small_mm, large_mm = 6.0, 8.0
    pred = ball(shape, spacing, small_mm)
    ref = ball(shape, spacing, large_mm)

    metrics = compute_metrics(pred, ref, spacing, tolerance_mm=1.0)

    # Continuous answer: the borders are 2 mm apart everywhere; discretization adds < one voxel.
    assert abs(metrics["hd"] - (large_mm - small_mm)) <= max(spacing)
    assert abs(metrics["assd"] - (large_mm - small_mm)) <= max(spacing)
    ndim = len(shape)
    continuous_dice = 2 * small_mm**ndim / (small_mm**ndim + large_mm**ndim)
    assert metrics["dice"] == pytest.approx(continuous_dice, abs=0.04)
    assert metrics["precision"] == 1.0  # the small ball lies inside the large one
    assert metrics["volume_difference_ml"] < 0
    reference = brute_distance_metrics(pred, ref, spacing, tolerance_mm=1.0)
    for name in ("hd", "hd95", "assd", "nsd"):
        assert metrics[name] == pytest.approx(reference[name], abs=1e-12), name


def test_border_is_face_connected_and_closed_at_image_edge():
    full = np.ones((4, 5, 6), dtype=bool)
    # The whole image is a mask touching every edge: its border is the outer shell.
    assert np.count_nonzero(mask_border(full)) == 4 * 5 * 6 - 2 * 3 * 4
    rng = np.random.default_rng(0)
    blob = rng.random((7, 8, 9)) > 0.5
    np.testing.assert_array_equal(mask_border(blob), brute_border(blob))


def test_cropping_does_not_change_distances():
    spacing = (3.0, 0.5, 0.5)
    small_pred = box((8, 8, 8), (2, 2, 2), (3, 4, 2))
    small_ref = box((8, 8, 8), (3, 1, 2), (3, 3, 4))
    big_pred = np.zeros((60, 90, 80), dtype=bool)
    big_ref = np.zeros_like(big_pred)
    big_pred[30:38, 40:48, 50:58] = small_pred
    big_ref[30:38, 40:48, 50:58] = small_ref
    small = compute_metrics(small_pred, small_ref, spacing)
    big = compute_metrics(big_pred, big_ref, spacing)
    for name in ("hd", "hd95", "assd", "nsd", "dice"):
        assert big[name] == pytest.approx(small[name], abs=1e-12), name


# --- hand-computed overlap metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("as_3d", [False, True])
def test_confusion_metrics_by_hand(as_3d):
    pred = np.array([[1, 1, 1], [0, 1, 0]], dtype=bool)
    ref = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)
    # TP 2 (0,0),(1,1); FP 2 (0,1),(0,2); FN 1 (1,0); TN 1 (1,2)
    spacing: tuple[float, ...] = (2.0, 3.0)
    if as_3d:
        pred, ref, spacing = pred[None], ref[None], (0.5, 4.0, 3.0)
    metrics = compute_metrics(pred, ref, spacing)
    voxel_ml = math.prod(spacing) / 1000
    assert metrics["dice"] == pytest.approx(4 / 7)
    assert metrics["iou"] == pytest.approx(2 / 5)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(1 / 3)
    assert metrics["precision"] == pytest.approx(1 / 2)
    assert metrics["volume_pred_ml"] == pytest.approx(4 * voxel_ml)
    assert metrics["volume_ref_ml"] == pytest.approx(3 * voxel_ml)
    assert metrics["volume_difference_ml"] == pytest.approx(voxel_ml)
    assert metrics["relative_volume_difference"] == pytest.approx(1 / 3)


# --- empty cases ----------------------------------------------------------------------------------------

EMPTY_CASES = {
    # name: (prediction non-empty?, reference non-empty?, expected values)
    "both_empty": (False, False, {
        "dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0,
        "sensitivity": None, "specificity": 1.0, "precision": None,
        "volume_difference_ml": 0.0, "relative_volume_difference": None}),
    "prediction_empty": (False, True, {
        "dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd": None, "hd95": None, "assd": None,
        "sensitivity": 0.0, "specificity": 1.0, "precision": None, "relative_volume_difference": -1.0}),
    "reference_empty": (True, False, {
        "dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd": None, "hd95": None, "assd": None,
        "sensitivity": None, "precision": 0.0, "relative_volume_difference": None}),
}


@pytest.mark.parametrize("spacing", [SPACING_2D, SPACING_3D])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_case_table(case, spacing):
    pred_filled, ref_filled, expected = EMPTY_CASES[case]
    shape = (6,) * len(spacing)
    square = box(shape, (1,) * len(spacing), (2,) * len(spacing))
    empty = np.zeros(shape, dtype=bool)
    pred = square if pred_filled else empty
    ref = square if ref_filled else empty

    metrics = compute_metrics(pred, ref, spacing)

    for name, value in expected.items():
        assert metrics[name] == value, name
    if case == "reference_empty":
        n = empty.size
        assert metrics["specificity"] == pytest.approx((n - square.sum()) / n)
    if case != "both_empty":
        with pytest.raises(ValueError, match="undefined when a mask is empty"):
            surface_distances(pred, ref, spacing)


def test_specificity_undefined_when_reference_is_everything():
    ref = np.ones((4, 4), dtype=bool)
    pred = box((4, 4), (0, 0), (2, 4))
    metrics = compute_metrics(pred, ref, (1.0, 1.0))
    assert metrics["specificity"] is None
    assert metrics["sensitivity"] == 0.5
    assert metrics["precision"] == 1.0


def test_rejects_label_maps_and_bad_spacing():
    mask = np.zeros((3, 3), dtype=bool)
    with pytest.raises(TypeError, match="boolean"):
        compute_metrics(mask.astype(np.uint8), mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="2 entries for a 3D"):
        compute_metrics(mask[None], mask[None], (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        compute_metrics(mask, mask, (1.0, 0.0))


# --- ignore label and regions ---------------------------------------------------------------------------


def test_ignore_label_removes_voxels_from_counts_and_distances():
    spacing = (2.0, 0.7)
    ref = np.zeros((3, 24), dtype=np.uint8)
    ref[1, :10] = 1
    ref[1, 10:20] = 9  # ignore
    pred = np.zeros_like(ref)
    pred[1, :20] = 1  # the second half lies in the ignored area

    ignored = evaluate_case(pred, ref, spacing, {"organ": 1}, "c", ignore_label=9)[0]
    assert (ignored["dice"], ignored["hd"], ignored["hd95"], ignored["specificity"]) == (1.0, 0.0, 0.0, 1.0)
    assert ignored["volume_pred_ml"] == pytest.approx(10 * 1.4 / 1000)

    counted = evaluate_case(pred, ref, spacing, {"organ": 1}, "c")[0]
    assert counted["dice"] == pytest.approx(20 / 30)
    assert counted["hd"] == pytest.approx(10 * 0.7)
    assert counted["specificity"] == pytest.approx(52 / 62)


def test_regions_are_unions_of_values():
    ref = np.zeros((6, 8, 8), dtype=np.uint8)
    ref[1:5, 1:4, 1:7] = 1
    ref[1:5, 4:7, 1:7] = 2
    pred = np.where(ref > 0, 1, 0).astype(np.uint8)  # right extent, but all "1"
    labels = {"whole": (1, 2), "core": [2], "edema": 1}

    rows = {r["label"]: r for r in evaluate_case(pred, ref, SPACING_3D, labels, "c")}

    assert rows["whole"]["dice"] == 1.0 and rows["whole"]["hd95"] == 0.0
    assert rows["core"]["dice"] == 0.0 and rows["core"]["hd95"] is None
    assert rows["edema"]["dice"] == pytest.approx(2 * 72 / (144 + 72))
    assert rows["edema"]["precision"] == pytest.approx(0.5)


def test_select_labels_policy():
    labels = {"background": 0, "liver": 1, "tumor": (2, 3), "ignore": 4}
    assert select_labels(labels, ignore_label=4) == {"liver": 1, "tumor": [2, 3]}
    assert select_labels(labels, include_background=True) == {"background": 0, "liver": 1, "tumor": [2, 3]}
    with pytest.raises(ValueError, match="contains the ignore value 3"):
        select_labels(labels, ignore_label=3)
    with pytest.raises(ValueError, match="integer"):
        select_labels({"bad": "one"})
    assert parse_label_specs(["liver=1", "whole=1,2"]) == {"liver": 1, "whole": [1, 2]}
    with pytest.raises(ValueError, match="liver=1"):
        parse_label_specs(["liver"])


# --- summary and clinical grades ------------------------------------------------------------------------


def test_summary_substitutes_image_diagonal_for_undefined_distances():
    shape, spacing = (10, 20), (2.0, 0.5)
    diagonal = image_diagonal_mm(shape, spacing)
    assert diagonal == pytest.approx(math.sqrt(20.0**2 + 10.0**2))

    ref = np.zeros(shape, dtype=np.uint8)
    ref[2:6, 3:9] = 1
    perfect = evaluate_case(ref, ref, spacing, {"organ": 1}, "perfect")
    missed = evaluate_case(np.zeros_like(ref), ref, spacing, {"organ": 1}, "missed")
    shifted_pred = np.roll(ref, 1, axis=0)
    shifted = evaluate_case(shifted_pred, ref, spacing, {"organ": 1}, "shifted")
    assert shifted[0]["hd95"] == pytest.approx(2.0)

    stats = summarize(perfect + missed + shifted)["organ"]

    hd95 = stats["hd95"]
    assert hd95["mean"] == pytest.approx((0.0 + diagonal + 2.0) / 3)
    assert hd95["median"] == pytest.approx(2.0)
    assert hd95["std"] == pytest.approx(np.std([0.0, diagonal, 2.0]))
    assert (hd95["n_cases"], hd95["n_valid"], hd95["n_substituted"]) == (3, 2, 1)
    # Precision is undefined for the missed case and is left out, not substituted.
    precision = stats["precision"]
    assert (precision["n_valid"], precision["n_substituted"]) == (2, 0)
    assert precision["mean"] == pytest.approx((1.0 + 0.75) / 2)
    assert stats["dice"]["mean"] == pytest.approx((1.0 + 0.0 + 0.75) / 3)


def test_summary_without_any_value_is_none():
    rows = [{"case": "a", "label": "x", "sensitivity": None, "image_diagonal_mm": 5.0}]
    stats = summarize(rows, metrics=("sensitivity",))["x"]["sensitivity"]
    assert stats == {"mean": None, "median": None, "std": None, "n_cases": 1, "n_valid": 0,
                     "n_substituted": 0}


@pytest.mark.parametrize(("dice", "hd95", "grade"), [
    (0.90, 4.0, "excellent"),
    (0.90, 5.0, "good"),  # HD95 must stay strictly below 5 mm
    (0.85, 1.0, "good"),  # Dice must strictly exceed 0.85
    (0.75, 9.9, "good"),
    (0.75, 10.0, "fair"),
    (0.60, None, "fair"),
    (0.50, 1.0, "poor"),
    (0.0, None, "poor"),
])
def test_clinical_quality_thresholds(dice, hd95, grade):
    assert clinical_quality(dice, hd95) == grade


# --- folders --------------------------------------------------------------------------------------------


def write_label(path: Path, array: np.ndarray, spacing) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # array (z, y, x) -> ITK (x, y, z)
    sitk.WriteImage(image, str(path))


FOLDER_SPACING = (3.0, 1.0, 0.5)
FOLDER_SHAPE = (6, 12, 14)


def make_folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    # case_a: organ shifted by one slice (HD = 3 mm), lesion perfect.
    ref_a = np.zeros(FOLDER_SHAPE, dtype=np.uint8)
    ref_a[1:4, 2:8, 2:10] = 1
    ref_a[4, 9:11, 9:12] = 2
    pred_a = np.zeros_like(ref_a)
    pred_a[2:5, 2:8, 2:10] = 1
    pred_a[4, 9:11, 9:12] = 2
    # case_b: organ perfect except where the reference says "ignore" (3); lesion missed.
    ref_b = np.zeros(FOLDER_SHAPE, dtype=np.uint8)
    ref_b[1:5, 3:9, 3:9] = 1
    ref_b[1:5, 3:9, 9:12] = 3
    ref_b[0, 0:2, 0:2] = 2
    pred_b = np.zeros_like(ref_b)
    pred_b[1:5, 3:9, 3:12] = 1
    for name, pred, ref in (("case_a", pred_a, ref_a), ("case_b", pred_b, ref_b)):
        write_label(pred_dir / f"{name}.nii.gz", pred, FOLDER_SPACING)
        write_label(ref_dir / f"{name}.nii.gz", ref, FOLDER_SPACING)
    return pred_dir, ref_dir


def write_dataset_json(path: Path) -> Path:
    path.write_text(json.dumps({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2, "ignore": 3},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }))
    return path


def test_folder_round_trip_writes_json_and_csv(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    dataset_json = write_dataset_json(tmp_path / "dataset.json")

    result = evaluate_folders(pred_dir, ref_dir, dataset_json=dataset_json, clinical=True)

    rows = {(r["case"], r["label"]): r for r in result.rows}
    assert sorted(rows) == [("case_a", "lesion"), ("case_a", "organ"), ("case_b", "lesion"), ("case_b", "organ")]
    assert rows["case_a", "organ"]["hd"] == pytest.approx(3.0)
    assert rows["case_a", "organ"]["dice"] == pytest.approx(2 / 3)
    assert rows["case_a", "lesion"]["dice"] == 1.0
    assert rows["case_b", "organ"]["dice"] == 1.0  # the prediction inside "ignore" is not counted
    assert rows["case_b", "organ"]["hd95"] == 0.0
    assert rows["case_b", "lesion"]["hd95"] is None
    assert rows["case_b", "lesion"]["clinical_quality"] == "poor"
    assert rows["case_a", "lesion"]["clinical_quality"] == "excellent"
    diagonal = image_diagonal_mm(FOLDER_SHAPE, FOLDER_SPACING)
    lesion_hd95 = result.summary["lesion"]["hd95"]
    assert lesion_hd95["mean"] == pytest.approx(diagonal / 2)
    assert (lesion_hd95["n_valid"], lesion_hd95["n_substituted"]) == (1, 1)
    assert result.metadata["ignore_label"] == 3
    assert result.metadata["labels"] == {"organ": 1, "lesion": 2}

    out_json, out_csv = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.csv"
    write_results(result, out_json, out_csv)

    document = json.loads(out_json.read_text())
    assert "directed 95th percentiles" in document["metadata"]["metric_definitions"]["hd95"]
    assert document["metadata"]["clinical_quality_definition"] == CLINICAL_QUALITY_DEFINITION
    assert document["summary"]["lesion"]["hd95"]["n_substituted"] == 1
    json_rows = {(r["case"], r["label"]): r for r in document["rows"]}
    assert json_rows["case_b", "lesion"]["hd95"] is None
    assert json_rows["case_a", "organ"]["hd"] == pytest.approx(3.0)
    with out_csv.open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == 4
    by_key = {(r["case"], r["label"]): r for r in csv_rows}
    assert by_key["case_b", "lesion"]["hd95"] == ""
    assert float(by_key["case_a", "organ"]["hd"]) == pytest.approx(3.0)
    assert by_key["case_a", "lesion"]["clinical_quality"] == "excellent"
    assert not list(out_json.parent.glob(".*"))  # no temporary files left behind


def test_folder_labels_from_references_and_parallel_jobs(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)

    serial = evaluate_folders(pred_dir, ref_dir, ignore_label=3)
    parallel = evaluate_folders(pred_dir, ref_dir, ignore_label=3, n_jobs=2)

    assert serial.metadata["labels"] == {"1": 1, "2": 2}
    assert serial.rows == parallel.rows
    assert {r["label"] for r in serial.rows} == {"1", "2"}
    # Without the ignore label, value 3 is a label of its own and case_b's organ has false positives.
    unignored = {(r["case"], r["label"]): r for r in evaluate_folders(pred_dir, ref_dir).rows}
    assert unignored["case_b", "1"]["dice"] == pytest.approx(2 * 144 / (144 + 216))
    assert unignored["case_b", "3"]["dice"] == 0.0


def test_folder_2d_round_trip(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = np.zeros((10, 12), dtype=np.uint8)
    ref[2:6, 3:9] = 1
    pred = np.roll(ref, 2, axis=1)
    write_label(pred_dir / "slice.nii.gz", pred, (0.8, 1.5))
    write_label(ref_dir / "slice.nii.gz", ref, (0.8, 1.5))

    row = evaluate_folders(pred_dir, ref_dir, labels={"organ": 1}).rows[0]

    assert row["hd"] == pytest.approx(2 * 1.5)
    assert row["dice"] == pytest.approx(4 / 6)


def test_cli_main_writes_outputs(tmp_path, capsys):
    pred_dir, ref_dir = make_folders(tmp_path)
    out_json, out_csv = tmp_path / "e.json", tmp_path / "e.csv"
    code = main(["evaluate", str(pred_dir), str(ref_dir), "--labels", "organ=1", "both=1,2", "--ignore-label", "3",
                 "--out-json", str(out_json), "--out-csv", str(out_csv), "--tolerance-mm", "2"])
    assert code == 0
    document = json.loads(out_json.read_text())
    assert document["metadata"]["tolerance_mm"] == 2.0
    assert set(document["summary"]) == {"organ", "both"}
    assert len(out_csv.read_text().splitlines()) == 1 + 4
    assert "organ: dice" in capsys.readouterr().out


def test_folder_errors_name_the_files(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    (pred_dir / "case_b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"pred/case_b\.nii\.gz"):
        evaluate_folders(pred_dir, ref_dir, labels={"organ": 1})

    write_label(pred_dir / "case_b.nii.gz", np.zeros(FOLDER_SHAPE, np.uint8), FOLDER_SPACING)
    write_label(pred_dir / "case_c.nii.gz", np.zeros(FOLDER_SHAPE, np.uint8), FOLDER_SPACING)
    with pytest.raises(ValueError, match=r"no reference .*case_c\.nii\.gz"):
        evaluate_folders(pred_dir, ref_dir, labels={"organ": 1})
    (pred_dir / "case_c.nii.gz").unlink()

    write_label(pred_dir / "case_b.nii.gz", np.zeros((6, 12, 13), np.uint8), FOLDER_SPACING)
    with pytest.raises(ValueError, match=r"pred/case_b\.nii\.gz and reference .*ref/case_b\.nii\.gz.*shape"):
        evaluate_folders(pred_dir, ref_dir, labels={"organ": 1})

    write_label(pred_dir / "case_b.nii.gz", np.zeros(FOLDER_SHAPE, np.uint8), (2.0, 1.0, 0.5))
    with pytest.raises(ValueError, match=r"case_b\.nii\.gz.*spacing \(2\.0, 1\.0, 0\.5\) vs \(3\.0, 1\.0, 0\.5\)"):
        evaluate_folders(pred_dir, ref_dir, labels={"organ": 1})

    with pytest.raises(EvaluationError, match="missing_dir: .* folder does not exist"):
        evaluate_folders(tmp_path / "missing_dir", ref_dir)


def test_folder_rejects_non_integer_label_maps(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    image = sitk.GetImageFromArray(np.full(FOLDER_SHAPE, 0.5, dtype=np.float32))
    image.SetSpacing(tuple(reversed(FOLDER_SPACING)))
    sitk.WriteImage(image, str(pred_dir / "case_a.nii.gz"))
    with pytest.raises(ValueError, match=r"pred/case_a\.nii\.gz: label map has non-integer values"):
        evaluate_folders(pred_dir, ref_dir, labels={"organ": 1})
