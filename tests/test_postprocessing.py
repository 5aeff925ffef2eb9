"""Tests for autoseg.postprocessing: components, the cross-validated decision and the mean-field step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from test_inference import case_image, expected_labels, make_model, threshold_network  # noqa: F401 (autouse fixture)

from autoseg.cli import main
from autoseg.postprocessing import (
    CrfParams,
    PostprocessingDecision,
    PostprocessingError,
    apply_postprocessing,
    class_dice,
    crf_refine,
    decision_to_dict,
    dice,
    find_postprocessing,
    keep_largest_component,
    largest_component,
    load_postprocessing,
    save_postprocessing,
)

# --- components -----------------------------------------------------------------------------------------


def _mask(shape: tuple[int, ...], *boxes: tuple[slice, ...]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask[box] = True
    return mask


@pytest.mark.parametrize("mask, kept", [
    # two blobs: the bigger one stays
    (_mask((6, 6, 6), np.s_[0:2, 0:2, 0:2], np.s_[4:5, 4:5, 4:5]), _mask((6, 6, 6), np.s_[0:2, 0:2, 0:2])),
    # touching only at a corner: one component under full connectivity
    (_mask((4, 4, 4), np.s_[0:2, 0:2, 0:2], np.s_[2:3, 2:3, 2:3]),
     _mask((4, 4, 4), np.s_[0:2, 0:2, 0:2], np.s_[2:3, 2:3, 2:3])),
    # 2D
    (_mask((5, 7), np.s_[0:1, 0:1], np.s_[2:5, 3:7]), _mask((5, 7), np.s_[2:5, 3:7])),
    # empty
    (np.zeros((3, 3, 3), dtype=bool), np.zeros((3, 3, 3), dtype=bool)),
])
def test_largest_component(mask: np.ndarray, kept: np.ndarray) -> None:
    np.testing.assert_array_equal(largest_component(mask), kept)


def test_keep_largest_component_per_class_region_and_foreground() -> None:
    labels = np.zeros((1, 8, 12), dtype=np.uint8)
    labels[0, 1:4, 1:4] = 1          # class 1, big
    labels[0, 6:7, 10:11] = 1        # class 1, small stray
    labels[0, 6:8, 1:3] = 2          # class 2, alone
    labels[0, 1:2, 8:9] = 3          # class 3, tiny
    only_1 = keep_largest_component(labels, 1)
    assert only_1[0, 6, 10] == 0 and np.array_equal(only_1[labels != 1], labels[labels != 1])
    region = keep_largest_component(labels, (2, 3))  # region {2, 3}: the 2x2 block wins over the single 3
    assert region[0, 1, 8] == 0 and np.all(region[0, 6:8, 1:3] == 2)
    foreground = keep_largest_component(labels, None)
    assert set(np.unique(foreground)) == {0, 1}
    assert labels[0, 6, 10] == 1  # inputs are not modified


def test_apply_postprocessing_follows_the_decision() -> None:
    labels = np.zeros((4, 10, 10), dtype=np.int16)
    labels[0:3, 0:4, 0:4] = 1
    labels[3, 8, 8] = 1
    labels[0:2, 6:9, 0:2] = 2
    labels[3, 0, 9] = 2
    none = apply_postprocessing(labels, None)
    np.testing.assert_array_equal(none, labels)
    per_class = apply_postprocessing(labels, PostprocessingDecision(largest_component_foreground=False,
                                                                    largest_component={"a": 1}))
    assert per_class[3, 8, 8] == 0 and per_class[3, 0, 9] == 2
    both = apply_postprocessing(labels, PostprocessingDecision(largest_component={"a": 1, "b": [2]}))
    assert both[3, 8, 8] == 0 and both[3, 0, 9] == 0 and np.count_nonzero(both == 2) == 12


@pytest.mark.parametrize("pred, ref, expected", [
    ([1, 1, 0, 0], [1, 0, 0, 0], 2 / 3),
    ([0, 0], [0, 0], 1.0),      # both empty: perfect
    ([1, 0], [0, 0], 0.0),
    ([1, 1], [1, 1], 1.0),
])
def test_dice(pred: list[int], ref: list[int], expected: float) -> None:
    assert dice(np.array(pred, bool), np.array(ref, bool)) == pytest.approx(expected)


def test_class_dice_ignores_the_ignore_label_and_counts_minus_one_as_background() -> None:
    ref = np.array([1, 1, 9, -1, 0])
    pred = np.array([1, 1, 1, 0, 0])
    scores = class_dice(pred, ref, {"a": 1}, ignore_value=9)
    assert scores == {"a": 1.0}
    assert class_dice(pred, ref, {"a": 1})["a"] == pytest.approx(0.8)


# --- the decision ---------------------------------------------------------------------------------------


SHAPE = (12, 24, 24)


def reference_case(with_second_lesion: bool = True) -> np.ndarray:
    ref = np.zeros(SHAPE, dtype=np.int16)
    ref[2:10, 2:12, 2:12] = 1          # liver: one block
    ref[2:6, 16:22, 16:22] = 2         # lesion: two separate true blocks
    if with_second_lesion:
        ref[8:11, 16:22, 2:6] = 2
    ref[:, :, 23] = -1                 # outside the non-zero region
    return ref


def make_work(root: Path, predictions: dict[str, dict[str, np.ndarray]]) -> Path:
    """A work folder with references and per-fold validation predictions ``{fold: {case: labels}}``."""
    work = make_model(root, folds=())
    preprocessed = work / "preprocessed" / "3d_fullres"
    preprocessed.mkdir(parents=True)
    for fold, cases in predictions.items():
        folder = work / "models" / "3d_fullres" / f"fold_{fold}" / "validation"
        folder.mkdir(parents=True)
        for case_id, prediction in cases.items():
            np.save(folder / f"{case_id}.npy", prediction)
            np.save(preprocessed / f"{case_id}_seg.npy", reference_case(case_id != "c2"))
    return work


def test_largest_component_is_kept_only_where_it_improved_dice(tmp_path: Path) -> None:
    predictions = {}
    for case_id in ("c0", "c1", "c2"):
        prediction = np.maximum(reference_case(case_id != "c2"), 0)
        prediction[0:2, 20:23, 10:13] = 1  # a stray liver blob: removing it helps liver
        predictions[case_id] = prediction
    work = make_work(tmp_path, {"0": {"c0": predictions["c0"], "c1": predictions["c1"]}, "1": {"c2": predictions["c2"]}})
    with pytest.warns(UserWarning, match="probabilities are missing"):
        decision = find_postprocessing(work, "3d_fullres", progress=False)
    # Foreground-wide removal would delete the lesions (not part of the largest component): rejected.
    assert decision.largest_component_foreground is False
    # Liver: its stray blob goes. Lesion: two true blocks in most cases, so keeping one hurts.
    assert decision.largest_component == {"liver": 1}
    assert decision.folds == ("0", "1") and decision.num_cases == 3
    assert decision.dice_after["liver"] > decision.dice_before["liver"]
    assert decision.dice_after["liver"] == pytest.approx(1.0)
    assert decision.dice_after["lesion"] == decision.dice_before["lesion"] == pytest.approx(1.0)
    assert [s.accepted for s in decision.steps] == [False, True, False]
    assert decision.crf.evaluated is False and decision.crf.enabled is False
    stored = load_postprocessing(work / "models" / "3d_fullres")
    assert stored == decision
    for case_id, prediction in predictions.items():
        fixed = apply_postprocessing(prediction, stored)
        np.testing.assert_array_equal(fixed, np.maximum(reference_case(case_id != "c2"), 0))


# A decision as find_postprocessing wrote it before the decision was typed: it must load unchanged.
EARLIER_DECISION = {
    "format": 1, "configuration": "3d_fullres", "folds": ["0", "1"], "num_cases": 3,
    "source": "validation label predictions", "largest_component_foreground": False,
    "largest_component": {"liver": 1, "tumour": [2, 3]},
    "crf": {"enabled": False, "evaluated": False, "params": {"iterations": 5, "spatial_sigma": 1.0,
            "spatial_weight": 3.0, "bilateral_sigma": 3.0, "bilateral_weight": 2.0, "intensity_sigma": 0.5,
            "bins": 6}},
    "tolerance": 0.0001, "dice_before": {"liver": 0.9}, "dice_after": {"liver": 0.95},
    "mean_dice_before": 0.9, "mean_dice_after": 0.95,
    "steps": [{"step": "largest_component:liver", "accepted": True, "mean_dice_before": 0.9,
               "mean_dice_after": 0.95, "dice_before": {"liver": 0.9}, "dice_after": {"liver": 0.95}}],
    "rule": "a step is kept when ...",
}


def test_decision_files_keep_their_format(tmp_path: Path) -> None:
    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps(EARLIER_DECISION))
    decision = load_postprocessing(path)
    assert decision is not None and decision.largest_component == {"liver": 1, "tumour": (2, 3)}
    assert decision_to_dict(decision) == EARLIER_DECISION
    save_postprocessing(decision, tmp_path)
    assert json.loads(path.read_text()) == EARLIER_DECISION
    assert load_postprocessing(tmp_path / "missing.json") is None
    path.write_text(json.dumps({"largest_component": {"liver": "1"}}))
    with pytest.raises(PostprocessingError, match=r"(?s)postprocessing.json is not a valid .*largest_component.liver"):
        load_postprocessing(path)


def test_nothing_is_kept_when_nothing_helps(tmp_path: Path) -> None:
    perfect = np.maximum(reference_case(), 0)
    work = make_work(tmp_path, {"0": {"c0": perfect, "c1": perfect.copy()}})
    decision = find_postprocessing(work, "3d_fullres", crf=False, progress=False)
    assert decision.largest_component_foreground is False and decision.largest_component == {}
    assert decision.mean_dice_after == decision.mean_dice_before == pytest.approx(1.0)


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    work = make_model(tmp_path, folds=())
    with pytest.raises(PostprocessingError, match="no fold has validation predictions"):
        find_postprocessing(work, "3d_fullres", crf=False, progress=False)
    folder = work / "models" / "3d_fullres" / "fold_0" / "validation"
    folder.mkdir(parents=True)
    np.save(folder / "c9.npy", np.zeros(SHAPE, np.int16))
    with pytest.raises(PostprocessingError, match="c9_seg.npy"):
        find_postprocessing(work, "3d_fullres", crf=False, progress=False)
    with pytest.raises(PostprocessingError, match="fold 'all'"):
        find_postprocessing(work, "3d_fullres", folds=["all"], crf=False, progress=False)


# --- mean-field refinement ------------------------------------------------------------------------------


def noisy_probabilities(seed: int = 0, flip_fraction: float = 0.05) -> tuple[torch.Tensor, np.ndarray]:
    """Softmax maps of a block, with scattered voxels pushed just across the decision boundary."""
    truth = np.zeros(SHAPE, dtype=np.int16)
    truth[2:10, 4:18, 4:18] = 1
    rng = np.random.default_rng(seed)
    foreground = np.where(truth == 1, 0.8, 0.2)
    flips = rng.random(SHAPE) < flip_fraction
    foreground = np.where(flips, 1 - foreground + rng.uniform(-0.1, 0.1, SHAPE) * 0.5, foreground)
    probabilities = torch.from_numpy(np.stack([1 - foreground, foreground]).astype(np.float32))
    return probabilities, truth


def test_crf_removes_scattered_errors_and_keeps_a_distribution() -> None:
    probabilities, truth = noisy_probabilities()
    before = probabilities.argmax(0).numpy()
    refined = crf_refine(probabilities, None, "softmax", CrfParams(bilateral_weight=0.0))
    after = refined.argmax(0).numpy()
    assert np.mean(before == truth) < 0.96
    assert np.mean(after == truth) > 0.98
    # What is left is along the block's surface (where a smoothness prior is least sure), none inside.
    band = ndimage.binary_dilation(truth == 1) & ~ndimage.binary_erosion(truth == 1)
    assert not np.any((after != truth) & ~band)
    torch.testing.assert_close(refined.sum(0), torch.ones(SHAPE), atol=1e-5, rtol=0)
    # Sigmoid form: the same on the foreground channel alone.
    single = (crf_refine(probabilities[1:], None, "sigmoid", CrfParams(bilateral_weight=0.0))[0] > 0.5).numpy()
    assert np.mean(single == truth) > 0.98 and not np.any((single != truth) & ~band)


def test_crf_intensity_term_follows_image_edges() -> None:
    # An ambiguous band between two regions of different intensity: the image decides it.
    image = np.zeros((1, 1, 16, 16), dtype=np.float32)
    image[..., 8:] = 3.0
    foreground = np.full((1, 16, 16), 0.2, dtype=np.float32)
    foreground[..., 10:] = 0.8
    foreground[..., 7:10] = 0.45  # columns 8 and 9 are bright (foreground-like) but uncertain
    probabilities = torch.from_numpy(np.stack([1 - foreground, foreground]))
    params = CrfParams(spatial_weight=0.0, bilateral_weight=3.0, bilateral_sigma=2.0, intensity_sigma=0.5)
    labels = crf_refine(probabilities, image, "softmax", params).argmax(0).numpy()[0]
    assert np.all(labels[:, 8:] == 1) and np.all(labels[:, :8] == 0)


def write_probabilities(work: Path, fold: str, case_id: str, probabilities: torch.Tensor,
                        reference: np.ndarray) -> None:
    folder = work / "models" / "3d_fullres" / f"fold_{fold}" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case_id}.npy", probabilities.argmax(0).numpy().astype(np.int16))
    np.save(folder / f"{case_id}_probabilities.npy", probabilities.numpy().astype(np.float16))
    preprocessed = work / "preprocessed" / "3d_fullres"
    preprocessed.mkdir(parents=True, exist_ok=True)
    np.save(preprocessed / f"{case_id}_seg.npy", reference)


def _as_three_classes(probabilities: torch.Tensor) -> torch.Tensor:
    return torch.cat([probabilities, torch.zeros_like(probabilities[:1])])


def test_crf_is_switched_on_where_it_helps(tmp_path: Path) -> None:
    work = make_model(tmp_path, folds=())
    for index in range(2):
        probabilities, truth = noisy_probabilities(seed=index)
        write_probabilities(work, "0", f"c{index}", _as_three_classes(probabilities), truth)
    decision = find_postprocessing(work, "3d_fullres", crf_params=CrfParams(bilateral_weight=0.0), progress=False)
    assert decision.source == "validation probabilities"
    assert decision.crf.evaluated and decision.crf.enabled
    assert decision.crf.dice_after["liver"] > decision.crf.dice_before["liver"] + 0.02


def test_the_command_prints_every_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    work = make_model(tmp_path, folds=())
    for index in range(2):
        probabilities, truth = noisy_probabilities(seed=index)
        write_probabilities(work, "0", f"c{index}", _as_three_classes(probabilities), truth)
    assert main(["find-postprocessing", str(work), "-c", "3d_fullres", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: ")
    assert "\n2 validation cases of folds 0 (validation probabilities)\n" in out
    assert re.search(r"^  crf: mean Dice 0\.\d{4} -> 0\.\d{4}, (kept|not kept)$", out, re.M)
    assert re.search(r"^  largest_component:lesion: mean Dice", out, re.M)
    assert re.search(r"^mean Dice 0\.\d{4} -> 0\.\d{4}; wrote .*postprocessing\.json$", out, re.M)


def test_crf_stays_off_where_it_would_lower_dice(tmp_path: Path) -> None:
    # Thin true structures, correctly but not confidently predicted: smoothing erases them.
    truth = np.zeros(SHAPE, dtype=np.int16)
    truth[:, ::4, :] = 1
    foreground = np.where(truth == 1, 0.65, 0.35).astype(np.float32)
    probabilities = torch.from_numpy(np.stack([1 - foreground, foreground]))
    work = make_model(tmp_path, folds=())
    write_probabilities(work, "0", "c0", _as_three_classes(probabilities), truth)
    refined = crf_refine(_as_three_classes(probabilities), None, "softmax", CrfParams(bilateral_weight=0.0))
    assert dice(refined.argmax(0).numpy() == 1, truth == 1) < 0.9  # the step would hurt ...
    decision = find_postprocessing(work, "3d_fullres", crf_params=CrfParams(bilateral_weight=0.0), progress=False)
    assert decision.crf.evaluated and not decision.crf.enabled  # ... so it is not taken
    assert decision.mean_dice_after >= decision.mean_dice_before


@pytest.mark.parametrize("through_the_command", [False, True])
def test_validation_probabilities_can_be_computed_from_the_folds(tmp_path: Path, through_the_command: bool) -> None:
    work = make_model(tmp_path, folds=("0",))
    image = case_image().astype(np.float32)
    preprocessed = work / "preprocessed" / "3d_fullres"
    preprocessed.mkdir(parents=True)
    np.save(preprocessed / "c0.npy", image[None])
    np.save(preprocessed / "c0_seg.npy", expected_labels(image).astype(np.int16))
    folder = work / "models" / "3d_fullres" / "fold_0" / "validation"
    folder.mkdir(parents=True)
    np.save(folder / "c0.npy", np.zeros(image.shape, np.int16))  # a poor prediction, superseded
    if through_the_command:
        assert main(["find-postprocessing", str(work), "-c", "3d_fullres", "--probabilities"]) == 0
        decision = load_postprocessing(work / "models" / "3d_fullres")
    else:
        decision = find_postprocessing(work, "3d_fullres", compute_probabilities=True, progress=False)
    stored = np.load(folder / "c0_probabilities.npy")
    assert stored.shape == (3, *image.shape) and stored.dtype == np.float16
    np.testing.assert_array_equal(stored.argmax(0), expected_labels(image))
    assert decision.source == "validation probabilities"
    assert decision.mean_dice_before == pytest.approx(1.0)
