"""autoseg.trust: confidence, calibration, plausibility checks and the per-case summary.

Two kinds of test. Table-style tests on constructed arrays check each measure and each flag against
hand-computed values. One end-to-end test trains a small 2D model on the example data (a few dozen
iterations), calibrates it on its cross-validation fold and predicts untouched test cases and
corrupted copies: what it proves is that ``predict`` writes the summary, that calibration lowers the
held-out calibration error, and that these corruptions are flagged while the clean cases are not.
Which check catches a corruption is asserted too: the input checks (intensity histogram, noise,
flat region, spacing) do not depend on how well the model segments; the structure checks do.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import autoseg.trust.assess
import autoseg.trust.calibration
import autoseg.trust.confidence
import autoseg.trust.plausibility
import autoseg.trust.summary
from autoseg.case_properties import CaseProperties, SidecarResampling
from autoseg.cli import main
from autoseg.io import Image, read_image, write_image
from autoseg.labels import LabelInfo
from autoseg.plan import save_plan
from autoseg.trust import (
    AgreementAccumulator,
    Calibration,
    CaseMembers,
    ClassConfidence,
    PredictionSummary,
    apply_temperature,
    assess_case,
    class_confidence,
    confidence_flags,
    entropy_map,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    load_reference_stats,
    load_summary,
    measure_case,
    plausibility_flags,
    save_calibration,
    save_reference_stats,
)
from autoseg.trust.calibration import CalibrationError
from autoseg.trust.plausibility import summarize_measurements

LABELS = LabelInfo.from_labels({"background": 0, "organ": 1, "lesion": 2})


@pytest.mark.parametrize("module", [autoseg.trust.assess, autoseg.trust.calibration, autoseg.trust.confidence,
                                    autoseg.trust.plausibility, autoseg.trust.summary])
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# --- confidence ---------------------------------------------------------------------------------------


def explicit_agreement(members: list[torch.Tensor]) -> list[float]:
    """The definition, pair by pair: sum_{i != j} <p_i, p_j> / ((n - 1) sum_i ||p_i||^2)."""
    n = len(members)
    flat = [m.reshape(m.shape[0], -1).double() for m in members]
    cross = sum((flat[i] * flat[j]).sum(1) for i in range(n) for j in range(n) if i != j)
    norms = sum((f * f).sum(1) for f in flat)
    return [float(v) for v in cross / ((n - 1) * norms)]


@pytest.mark.parametrize("count", [2, 3, 8])
def test_streamed_agreement_equals_the_pairwise_definition(count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    members = [torch.softmax(torch.randn(3, 5, 6, 7, generator=generator), 0) for _ in range(count)]
    accumulator = AgreementAccumulator()
    for member in members:
        accumulator.add(member)
    streamed = accumulator.agreement(sum(members) / count)
    assert streamed == pytest.approx(explicit_agreement(members), rel=1e-6)


@pytest.mark.parametrize("members, expected", [
    ([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]], 1.0),   # identical
    ([[0.3, 0.3, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0]], 1.0),   # identical and soft: still full agreement
    ([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], 0.0),   # disjoint
    ([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], 2 / 3),  # 2 <a,b> / (|a|^2 + |b|^2) = 2 / 3
    ([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], 1.0),   # nobody predicts the class: nothing to disagree on
])
def test_agreement_table(members: list[list[float]], expected: float) -> None:
    tensors = [torch.tensor([m]) for m in members]
    accumulator = AgreementAccumulator()
    for tensor in tensors:
        accumulator.add(tensor)
    assert accumulator.agreement(sum(tensors) / len(tensors)) == [pytest.approx(expected)]


def test_one_member_has_no_agreement() -> None:
    accumulator = AgreementAccumulator()
    accumulator.add(torch.ones(2, 3))
    assert accumulator.agreement(torch.ones(2, 3)) is None


def test_case_members_average_the_mirror_agreement_over_folds() -> None:
    a, b = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    weights = torch.ones(3)
    tiles = lambda *copies: [c[None] for c in copies]  # noqa: E731  (one tile of K=1 channel, 3 voxels)
    members = CaseMembers()
    members.mirror_tiles(tiles(a, a), weights), members.fold(a)              # fold 0: copies agree fully
    members.mirror_tiles(tiles(a, b), weights), members.fold((a + b) / 2)    # fold 1: 2/3
    members.ensemble((a + (a + b) / 2) / 2)
    assert members.mirror_agreement() == [pytest.approx((1 + 2 / 3) / 2)]
    assert members.fold_agreement() == pytest.approx(explicit_agreement([a, (a + b) / 2]))


@pytest.mark.parametrize("probabilities, activation, expected", [
    ([[0.5], [0.5]], "softmax", 1.0),
    ([[1.0], [0.0]], "softmax", 0.0),
    ([[1 / 3], [1 / 3], [1 / 3]], "softmax", 1.0),
    ([[0.5], [0.0]], "sigmoid", 0.5),   # mean over channels of binary entropies, in bits: (1 + 0) / 2
    ([[0.9], [0.1]], "softmax", -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(2)),
])
def test_entropy_map(probabilities, activation: str, expected: float) -> None:
    assert float(entropy_map(torch.tensor(probabilities), activation)[0]) == pytest.approx(expected, abs=1e-6)


def test_class_confidence_is_measured_over_the_predicted_structure() -> None:
    probabilities = torch.tensor([[0.8, 0.1, 0.2, 0.0], [0.2, 0.9, 0.7, 0.0], [0.0, 0.0, 0.1, 1.0]])
    labels = LABELS.decode(probabilities)
    confidence = class_confidence(probabilities, labels, LABELS, mirror_agreement=[1.0, 0.9, 0.5])
    assert list(labels) == [0, 1, 1, 2]
    assert confidence["organ"].voxels == 2 and confidence["organ"].probability == pytest.approx(0.8)
    assert confidence["organ"].mirror_agreement == pytest.approx(0.9)
    assert confidence["lesion"].entropy == pytest.approx(0.0, abs=1e-6)
    assert confidence["lesion"].score == pytest.approx(0.5)  # its weakest signal: the mirror agreement


def test_confidence_flags_name_the_class_and_the_limit() -> None:
    flags = confidence_flags({"organ": ClassConfidence(10, 0.9, 0.2, fold_agreement=0.95, mirror_agreement=0.5),
                              "lesion": ClassConfidence(5, 0.6, 0.8)}, {"organ": 0.3, "lesion": 0.6})
    assert [(f.check, f.label) for f in flags] == [("agreement", "organ"), ("entropy", "lesion")]
    assert "mirrored copies" in flags[0].reason and "0.50" in flags[0].reason
    assert confidence_flags({"organ": ClassConfidence(10, 0.9, 0.35)}, {"organ": 0.3}) == []


# --- calibration ---------------------------------------------------------------------------------------


def test_temperature_keeps_the_label_map_and_softens_or_sharpens() -> None:
    probabilities = torch.softmax(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), 0)
    for temperature in (0.5, 2.0):
        scaled = apply_temperature(probabilities, temperature, "softmax")
        assert torch.equal(scaled.argmax(0), probabilities.argmax(0))
        assert torch.allclose(scaled.sum(0), torch.ones(4, 5), atol=1e-5)
    assert apply_temperature(probabilities, 2.0, "softmax").max() < probabilities.max()
    sigmoid = torch.tensor([[0.2, 0.7]])
    assert torch.equal(apply_temperature(sigmoid, 3.0, "sigmoid") > 0.5, sigmoid > 0.5)


def test_expected_calibration_error_by_hand() -> None:
    # bin [0.6, 0.667): 4 voxels at confidence 0.6, 1 right -> gap |1 - 2.4| = 1.4
    # bin [0.933, 1]: 6 voxels at confidence 0.95, all right -> gap |6 - 5.7| = 0.3; ECE = 1.7 / 10
    probabilities = torch.tensor([[0.4, 0.6]] * 4 + [[0.05, 0.95]] * 6)
    targets = torch.tensor([1, 0, 0, 0] + [1] * 6)
    assert expected_calibration_error(probabilities, targets, "softmax") == pytest.approx(0.17)


def test_fitted_temperature_undoes_over_confidence_and_lowers_the_error() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(20000, 3, generator=generator) * 2
    truth = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator)[:, 0]
    over_confident = torch.softmax(logits * 3, 1)
    temperature = fit_temperature(over_confident, truth, "softmax")
    assert temperature == pytest.approx(3.0, rel=0.1)
    after = apply_temperature(over_confident, temperature, "softmax", channel_axis=1)
    assert expected_calibration_error(after, truth, "softmax") < 0.3 * expected_calibration_error(
        over_confident, truth, "softmax")


def test_calibration_file_round_trip_and_errors(tmp_path: Path) -> None:
    calibration = Calibration(configuration="2d", activation="softmax", temperature=1.5, folds=("0", "1"),
                              num_cases=4, num_voxels=100, ece_before=0.1, ece_after=0.02, nll_before=0.3,
                              nll_after=0.25, ece_evaluation="leave-one-fold-out", structure_entropy={"a": 0.2})
    save_calibration(calibration, tmp_path / "calibration.json")
    assert load_calibration(tmp_path) == calibration
    data = json.loads((tmp_path / "calibration.json").read_text())
    data["temperature"] = "hot"
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match="temperature"):
        load_calibration(tmp_path)
    with pytest.raises(CalibrationError, match="autoseg calibrate"):
        load_calibration(tmp_path / "missing")


def test_calibration_samples_leave_out_ignored_voxels_and_keep_regions_binary() -> None:
    from autoseg.trust.fit import calibration_samples

    seg = np.array([[[0, 1, 2, 9, -1]]], np.int16)
    plain = LabelInfo.from_labels({"background": 0, "organ": 1, "lesion": 2, "ignore": 9})
    probabilities = np.arange(15, dtype=np.float32).reshape(3, 1, 1, 5)
    p, t = calibration_samples(probabilities, seg, plain, 100, np.random.default_rng(0))
    assert t.tolist() == [0, 1, 2, 0] and p[:, 0].tolist() == [0, 1, 2, 4]  # the ignored voxel is gone
    regions = LabelInfo.from_labels({"background": 0, "whole": [1, 2], "core": [2]}, regions_class_order=[1, 2])
    seg = np.array([[[0, 1, 2, 0, -1]]], np.int16)
    p, t = calibration_samples(probabilities[:2], seg, regions, 100, np.random.default_rng(0))
    assert t.tolist() == [[0, 0], [1, 0], [1, 1], [0, 0], [0, 0]] and p.shape == (5, 2)
    p, t = calibration_samples(probabilities[:2], seg, regions, 3, np.random.default_rng(0))
    assert p.shape == (3, 2)  # a seeded sample when there are more voxels than asked for


def test_location_is_measured_in_the_uncropped_canonical_image() -> None:
    """A structure at preprocessed voxel 4 of a crop that starts at 10, resampled 2x finer, lies at
    canonical voxel 10 + (4 + 0.5) / 2 - 0.5 = 11.75 of 40: fraction (11.75 + 0.5) / 40."""
    crop = dataclasses.replace(properties((40, 40, 40)), crop_bbox=[[10, 20], [0, 40], [0, 40]],
                               shape_after_crop=[10, 40, 40], shape_after_resampling=[20, 40, 40])
    labels = np.zeros((20, 40, 40), np.int16)
    labels[4, 19:21, 19:21] = 1
    measured = measure_case(labels, np.zeros((1, 20, 40, 40), np.float32), crop, LABELS)
    assert measured.centroids["organ"] == pytest.approx(((11.75 + 0.5) / 40, 0.5, 0.5))


# --- plausibility on constructed label maps -----------------------------------------------------------------


def properties(shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0)) -> CaseProperties:
    """A sidecar for an uncropped, unresampled case (the preprocessed grid is the canonical one)."""
    return CaseProperties(
        case_id="c", source_files={}, configuration="3d_fullres", configuration_hash="x", plan_hash="x",
        is_2d=False, shape=list(shape), spacing=list(spacing), origin=[0.0] * 3, direction=[1.0, 0, 0, 0, 1, 0, 0, 0, 1],
        orientation={"axes": [0, 1, 2], "flips": [False, False, False]}, shape_canonical=list(shape),
        spacing_canonical=list(spacing), crop_bbox=[[0, s] for s in shape], shape_after_crop=list(shape),
        shape_after_resampling=list(shape), spacing_after_resampling=list(spacing),
        resampling=SidecarResampling(image_order=3, label_order=1, slow_axis_order=0, slow_axis=None,
                                     anisotropy_threshold=3.0),
        channels=["MR"], ct_priors=[], class_locations={})


def organ_case(rng: np.random.Generator, shift: int = 0, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((20, 20, 20), np.int16)
    labels[6 + shift:6 + shift + size, 6:14, 6:14] = 1
    labels[9 + shift:11 + shift, 9:11, 9:11] = 2
    # a smooth, skewed background (inverting it shows), the structures brighter, a little noise
    background = ndimage.gaussian_filter(rng.gamma(2.0, 0.5, labels.shape), 1.5) * 4 - 1
    image = (background + 2 * labels + rng.normal(0, 0.05, labels.shape))[None].astype(np.float32)
    return labels, image


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    cases = [measure_case(*organ_case(rng, shift), properties(), LABELS) for shift in (-1, 0, 1, 2)]
    return summarize_measurements("3d_fullres", cases, LABELS)


def checks(labels: np.ndarray, image: np.ndarray, stats, spacing=(1.0, 1.0, 1.0)) -> set[tuple[str, str | None]]:
    flags = plausibility_flags(measure_case(labels, image, properties(spacing=spacing), LABELS), stats, ["MR"])
    for flag in flags:
        assert flag.reason and "\n" not in flag.reason
    return {(flag.check, flag.label) for flag in flags}


def test_a_case_like_the_training_cases_raises_no_flag(reference) -> None:
    assert checks(*organ_case(np.random.default_rng(5), 1), reference) == set()


def test_reference_stats_round_trip(reference, tmp_path: Path) -> None:
    save_reference_stats(reference, tmp_path / "reference_stats.json")
    assert load_reference_stats(tmp_path) == reference
    assert reference.classes["organ"].present_in == 4 and reference.classes["organ"].components_max == 1


def corrupt(kind: str) -> tuple[np.ndarray, np.ndarray]:
    labels, image = organ_case(np.random.default_rng(9))
    if kind == "missing":
        labels[labels == 2] = 1
    elif kind == "small":
        labels[labels == 1] = 0
        labels[9:11, 8:12, 8:12] = 1
        labels[9:11, 9:11, 9:11] = 2
    elif kind == "large":
        labels[1:19, 1:19, 1:19] = np.where(labels[1:19, 1:19, 1:19] == 2, 2, 1)
    elif kind == "pieces":  # three more pieces, each above a quarter of the smallest training piece
        labels[0:3, 0:8, 0:6] = 1
        labels[0:3, 12:20, 14:20] = 1
        labels[17:20, 0:8, 14:20] = 1
    elif kind == "elsewhere":
        labels = np.roll(labels, 5, axis=2)  # a quarter of the image to the side, nothing wraps
    elif kind == "inverted":
        image = -image
    elif kind == "noise":
        image = image + np.random.default_rng(1).normal(0, 1, image.shape).astype(np.float32)
    elif kind == "blank":
        image[:, :, :10] = 0
    return labels, image


@pytest.mark.parametrize("kind, expected", [
    ("missing", {("missing", "lesion")}),
    ("small", {("volume", "organ")}),
    ("large", {("volume", "organ")}),
    ("pieces", {("components", "organ")}),
    ("elsewhere", {("location", "organ"), ("location", "lesion")}),
    ("inverted", {("intensity", None)}),
    ("noise", {("noise", None)}),
    ("blank", {("blank", None)}),
])
def test_each_implausible_prediction_is_flagged_by_its_check(reference, kind: str, expected) -> None:
    assert expected <= checks(*corrupt(kind), reference)


def test_a_spacing_outside_the_training_range_is_flagged(reference) -> None:
    found = checks(*organ_case(np.random.default_rng(5)), reference, spacing=(3.0, 1.0, 1.0))
    assert ("spacing", None) in found


def test_assess_case_writes_a_complete_record() -> None:
    labels, image = organ_case(np.random.default_rng(2))
    probabilities = torch.from_numpy(np.stack([labels == v for v in (0, 1, 2)]).astype(np.float32) * 0.9 + 0.1 / 3)
    assessment = assess_case("c", "c.nii.gz", probabilities, labels, image, properties(), LABELS, seconds=0.5)
    summary = assessment.summary
    assert set(summary.classes) == {"organ", "lesion"} and summary.seconds == 0.5
    assert summary.classes["organ"].voxels == int((labels == 1).sum())
    assert assessment.uncertainty.shape == labels.shape and assessment.uncertainty.dtype == torch.float32
    assert summary.flags == ()  # confident, and no reference statistics to compare with


# --- end to end on the example data ----------------------------------------------------------------------

CORRUPTIONS = ("inverted", "noise", "spacing", "cut")
# which checks must catch each corruption whatever the model learnt (the input checks)
INPUT_CHECK = {"inverted": "intensity", "noise": "noise", "spacing": "spacing", "cut": "blank"}


def write_corrupted(source: Path, destination: Path, kind: str, rng: np.random.Generator) -> None:
    image = read_image(source)
    array = image.array.astype(np.float32)
    spacing = (1.0, 1.0)
    if kind == "inverted":
        array = 255 - array
    elif kind == "noise":
        array = np.clip(array + rng.normal(0, 60, array.shape), 0, 255)
    elif kind == "spacing":
        spacing = (3.0, 3.0)  # a 2D file with the wrong pixel size: the image is resampled 3x larger
    elif kind == "cut":
        h, w = array.shape
        array[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 0
    write_image(Image(array, spacing, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)), destination)


@pytest.fixture(scope="module")
def trained_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2D example (8 training cases), planned for the CPU and trained for 60 iterations (fold 0).

    The plan's whole-image patch is cut to 96 x 96 (batch 4): about three times faster per
    iteration, so 60 iterations reach a validation Dice near 0.9 (cells) and 0.75 (nuclei) in ~25 s.
    """
    from autoseg.examples import make_example
    from autoseg.planning import plan_dataset
    from autoseg.preprocessing import preprocess_dataset
    from autoseg.training import TrainOverrides, train

    root = tmp_path_factory.mktemp("example")
    data = make_example(root / "data", kind="2d", num_cases=8, num_test_cases=4)
    work = root / "work"
    plan = plan_dataset(data, work, n_jobs=1, progress=False, preset="cpu", configurations=["2d"])
    small = dataclasses.replace(plan.configuration("2d"), patch_size=(96, 96), batch_size=4)
    save_plan(dataclasses.replace(plan, configurations={**plan.configurations, "2d": small}), work / "plan.json")
    preprocess_dataset(work, configurations=["2d"], n_jobs=1, progress=False)
    train(work, "2d", 0, overrides=TrainOverrides(epochs=2, iterations_per_epoch=30, validation_iterations=1),
          workers=0, progress=False, num_threads=1, device="cpu")  # the same numbers on a GPU machine
    return root


@pytest.mark.slow
def test_calibration_lowers_the_held_out_error_and_corrupted_inputs_are_flagged(
        trained_example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = trained_example / "work"
    assert main(["calibrate", str(work), "-c", "2d", "--device", "cpu"]) == 0
    assert "expected calibration error" in capsys.readouterr().out
    calibration = load_calibration(work / "models" / "2d")
    assert calibration.ece_after < calibration.ece_before
    assert "leave-one-group-out" in calibration.ece_evaluation  # scored with temperatures fitted on other cases
    assert (work / "models" / "2d" / "calibration.json").is_file()
    assert (work / "models" / "2d" / "reference_stats.json").is_file()

    inputs = trained_example / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    tests = sorted((trained_example / "data" / "imagesTs").glob("*_0000.png"))
    for source in tests:  # the untouched cases, as they come
        write_corrupted(source, inputs / source.name.replace(".png", ".nii.gz"), "none", rng)
    for source, kind in zip(tests, CORRUPTIONS):
        case_id = source.name[: -len("_0000.png")]
        write_corrupted(source, inputs / f"{case_id}-{kind}_0000.nii.gz", kind, rng)
    output = trained_example / "predictions"
    assert main(["predict", str(work), "-i", str(inputs), "-o", str(output), "--device", "cpu", "--no-tta",
                 "--save-uncertainty"]) == 0
    printed = capsys.readouterr().out
    assert "4 of 8 case(s) flagged for review" in printed

    summary = load_summary(output)
    assert summary.temperature == pytest.approx(calibration.temperature)
    cases = {case.case_id: case for case in summary.cases}
    clean = [case for case_id, case in cases.items() if "-" not in case_id]
    assert len(clean) == 4 and len(cases) == 8
    false_positives = [f"{case.case_id}: {[f.reason for f in case.flags]}" for case in clean if case.flags]
    assert not false_positives, false_positives  # 0 of 4 clean cases flagged
    for kind in CORRUPTIONS:
        (case,) = [c for case_id, c in cases.items() if case_id.endswith(f"-{kind}")]
        assert INPUT_CHECK[kind] in {flag.check for flag in case.flags}, (kind, case.flags)
    ordered = PredictionSummary.least_trusted_first(summary)
    assert all(case.flags for case in ordered[:4]) and not any(case.flags for case in ordered[4:])
    for kind in CORRUPTIONS:
        assert re.search(rf"^  \S+-{kind}: ", printed, re.MULTILINE), kind  # each flagged case is listed
    uncertainty = read_image(output / f"{clean[0].case_id}_uncertainty.nii.gz")
    label = read_image(output / clean[0].label_file)
    assert uncertainty.array.shape == label.array.shape and uncertainty.array.dtype == np.float32
    assert 0.0 <= float(uncertainty.array.min()) and float(uncertainty.array.max()) <= 1.0


def test_exported_models_carry_the_trust_artifacts(reference, tmp_path: Path) -> None:
    import zipfile

    from test_inference import make_model

    from autoseg.model_archive import export_model

    work = make_model(tmp_path, folds=("0",))
    folder = work / "models" / "3d_fullres"
    save_calibration(Calibration(configuration="3d_fullres", activation="softmax", temperature=1.5, folds=("0",),
                                 num_cases=2, num_voxels=10, ece_before=0.1, ece_after=0.05, nll_before=0.3,
                                 nll_after=0.2, ece_evaluation="in sample", structure_entropy={}),
                     folder / "calibration.json")
    save_reference_stats(reference, folder / "reference_stats.json")
    archive = export_model(work, tmp_path / "model.zip", configurations=["3d_fullres"])
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"models/3d_fullres/calibration.json", "models/3d_fullres/reference_stats.json"} <= names


class CountingMembers(CaseMembers):
    def __init__(self) -> None:
        super().__init__()
        self.mirrors = self.folds = 0

    def mirror_tiles(self, copies, weights: torch.Tensor) -> None:
        self.mirrors = max(self.mirrors, len(copies))
        super().mirror_tiles(copies, weights)

    def fold(self, probabilities: torch.Tensor) -> None:
        self.folds += 1
        super().fold(probabilities)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_members_see_every_copy_and_change_no_probability(tmp_path: Path, configuration: str) -> None:
    """Measuring the members changes no probability (the copies are seen inside the window).

    The test model (test_inference's pointwise threshold network, two identical folds) is
    mirror-equivariant, so its copies and folds agree exactly: both agreements are 1.
    """
    from test_inference import ThresholdNet, make_model

    from autoseg.inference import load_trained_model, predict_preprocessed
    from autoseg.networks import register_network, unregister_network

    register_network("test_threshold")(ThresholdNet)
    try:
        model = load_trained_model(make_model(tmp_path), configuration, ["0", "1"], "best", "cpu")
        image = torch.rand(1, 6, 21, 19, generator=torch.Generator().manual_seed(0)) * 250
        plain = predict_preprocessed(model, image, step=0.5, tta=True)
        members = CountingMembers()
        measured = predict_preprocessed(model, image, step=0.5, tta=True, members=members)
    finally:
        unregister_network("test_threshold")
    assert torch.equal(measured, plain)
    assert members.folds == 2 and members.mirrors == 2 ** len(model.folds[0].mirror_axes)
    assert members.mirror_agreement() == pytest.approx([1.0] * 3)
    assert members.fold_agreement() == pytest.approx([1.0] * 3)


def test_calibrate_without_cross_validation_predictions_says_what_to_do(tmp_path: Path) -> None:
    from test_inference import make_model

    from autoseg.trust.fit import calibrate

    with pytest.raises(CalibrationError, match="train a fold"):
        calibrate(make_model(tmp_path, folds=("0",)), "3d_fullres", progress=False)
