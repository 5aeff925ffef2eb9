"""Training the cascade: 3d_cascade_fullres learns from 3d_lowres's cross-validation predictions.

The tiny work folder holds the same cases twice, as preprocessing would: at spacing 1 mm
(``3d_fullres``, 24^3) and 2 mm (``3d_lowres``, 12^3). The cascade shares 3d_fullres's data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_training_support import LABELS, tiny_topology, write_case

from autoseg.plan import (
    ChannelNormalization,
    Configuration,
    Plan,
    Schedule,
    configuration_hash,
    load_plan,
    plan_hash,
    save_plan,
)
from autoseg.postprocessing import find_postprocessing
from autoseg.training import TrainingError, TrainOverrides, train
from autoseg.training.data import PatchLoader, PreprocessedDataset
from autoseg.training.labels import LabelInfo
from autoseg.training.previous_stage import prepare_previous_stage
from autoseg.training.splits import make_splits
from autoseg.workdir import WorkDir

FAST = dict(workers=0, progress=False, num_threads=1)
NUM_CASES = 4  # fewer than 5 cases: one fold per case


def configuration(name: str, spacing: float, patch: int, features: tuple[int, ...], **changes: object) -> Configuration:
    schedule = Schedule(epochs=2, iterations_per_epoch=2, validation_iterations=1, augmentation="none", seed=1)
    return Configuration(
        name=name, spacing=(spacing,) * 3, patch_size=(patch,) * 3, batch_size=2, median_shape=(24, 24, 24),
        normalization=(ChannelNormalization(channel="MR", scheme="zscore"),),
        topology=tiny_topology(3, 1, 2, features), schedule=schedule, **changes)  # type: ignore[arg-type]


def cascade_plan(**schedule: object) -> Plan:
    fullres = configuration("3d_fullres", 1.0, 16, (4, 8, 16))
    cascade = dataclasses.replace(
        fullres, name="3d_cascade_fullres", previous_stage="3d_lowres", preprocessed_data="3d_fullres",
        topology=dataclasses.replace(fullres.topology, in_channels=2),
        schedule=dataclasses.replace(fullres.schedule, **schedule))
    lowres = configuration("3d_lowres", 2.0, 8, (4, 8))
    return Plan(dataset_name="Dataset997_Cascade", channel_names=("MR",), labels=dict(LABELS),
                configurations={"3d_fullres": fullres, "3d_lowres": lowres, "3d_cascade_fullres": cascade})


def cube_labels(rng: np.random.Generator) -> np.ndarray:
    """A 24^3 label map with a cube at an even corner, so the 2 mm version is exact."""
    seg = np.zeros((24, 24, 24), dtype=np.int16)
    z, y, x = (2 * int(v) for v in rng.integers(0, 7, size=3))
    seg[z:z + 10, y:y + 10, x:x + 10] = 1
    return seg


def make_cascade_work(root: Path, plan: Plan, contrast: float = 0.0) -> Path:
    """Both grids of every case; the image shows the cube with ``contrast`` (0: pure noise)."""
    rng = np.random.default_rng(3)
    save_plan(plan, root / "plan.json")
    case_ids = [f"case_{i:03d}" for i in range(NUM_CASES)]
    for case_id in case_ids:
        seg = cube_labels(rng)
        image = (rng.normal(size=(1, 24, 24, 24)) + contrast * seg).astype(np.float32)
        write_case(root / "preprocessed" / "3d_fullres", case_id, image, seg, spacing=(1.0, 1.0, 1.0))
        write_case(root / "preprocessed" / "3d_lowres", case_id, image[:, ::2, ::2, ::2], seg[::2, ::2, ::2],
                   spacing=(2.0, 2.0, 2.0))
    for name in ("3d_fullres", "3d_lowres"):
        manifest = {"plan_hash": plan_hash(plan), "configuration_hash": configuration_hash(plan, name),
                    "cases": case_ids}
        (root / "preprocessed" / name / "manifest.json").write_text(json.dumps(manifest))
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.sum(a & b)) / float(np.sum(a) + np.sum(b))


def fake_lowres_cross_validation(work: Path, shift: int = 0) -> list[dict]:
    """Write 3d_lowres's splits and, per fold, 'predictions' of its held-out cases: the true labels
    (shifted by ``shift`` low-resolution voxels along x), as a finished fold leaves them."""
    case_ids = [f"case_{i:03d}" for i in range(NUM_CASES)]
    splits = make_splits(case_ids)
    (work / "models" / "3d_lowres").mkdir(parents=True, exist_ok=True)
    (work / "models" / "3d_lowres" / "splits.json").write_text(json.dumps(splits))
    for fold, split in enumerate(splits):
        folder = work / "models" / "3d_lowres" / f"fold_{fold}" / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        for case_id in split["val"]:
            labels = np.load(work / "preprocessed" / "3d_lowres" / f"{case_id}_seg.npy")
            np.save(folder / f"{case_id}.npy", np.roll(labels, shift, axis=2).astype(np.int16))
        (folder / "summary.json").write_text("{}")
    return splits


@pytest.mark.slow
def test_the_cascade_learns_from_the_previous_stage_alone(tmp_path: Path) -> None:
    """The images are pure noise: only correctly placed previous-stage inputs can give a high Dice."""
    plan = cascade_plan(epochs=8, iterations_per_epoch=30, validation_iterations=1)
    work = make_cascade_work(tmp_path / "work", plan, contrast=0.0)
    splits = fake_lowres_cross_validation(work)
    fold_dir = train(work, "3d_cascade_fullres", 0, **FAST)

    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert summary["cases"] == splits[0]["val"]  # the previous stage's folds
    assert summary["summary"]["cube"]["dice"]["mean"] >= 0.9
    stored = work / "models" / "3d_cascade_fullres" / "previous_stage"
    for case_id in [f"case_{i:03d}" for i in range(NUM_CASES)]:
        resampled = np.load(stored / f"{case_id}.npy")
        truth = np.load(work / "preprocessed" / "3d_fullres" / f"{case_id}_seg.npy")
        assert resampled.shape == truth.shape == (24, 24, 24)
        assert dice(resampled == 1, truth == 1) > 0.95  # 2 mm -> 1 mm, the same crop
    assert load_plan(fold_dir / "plan.json").configuration("3d_cascade_fullres").topology.in_channels == 2
    assert not (work / "preprocessed" / "3d_cascade_fullres").exists()


def test_loader_appends_the_previous_stage_in_the_same_window(tmp_path: Path) -> None:
    plan = cascade_plan()
    work = make_cascade_work(tmp_path / "work", plan)
    fake_lowres_cross_validation(work)
    dataset = PreprocessedDataset(work / "preprocessed" / "3d_fullres")
    stage = prepare_previous_stage(WorkDir(work), plan, plan.configuration("3d_cascade_fullres"), dataset,
                                   progress=False)
    # make each image equal to its stored previous-stage map: any misplaced crop shows as a difference
    for case_id in dataset.case_ids:
        np.save(dataset.folder / f"{case_id}.npy", stage.load(case_id)[None].astype(np.float32))
    loader = PatchLoader(dataset, dataset.case_ids, (16, 20, 28), 4, LabelInfo.from_labels(LABELS),
                         previous_stage=stage, seed=5)
    for index in range(5):
        batch = loader.make_batch(index)
        assert batch["data"].shape == (4, 2, 16, 20, 28)  # 28 > 24: padded, 0 in both channels
        np.testing.assert_array_equal(batch["data"][:, 0], batch["data"][:, 1])
        assert set(np.unique(batch["data"][:, 1])) <= {0.0, 1.0}


def test_missing_or_stale_previous_stage_folds(tmp_path: Path) -> None:
    plan = cascade_plan()
    work = make_cascade_work(tmp_path / "work", plan)
    with pytest.raises(TrainingError, match=r"3d_lowres.*has not been trained.*-c 3d_lowres -f 0"):
        train(work, "3d_cascade_fullres", 0, **FAST)
    splits = fake_lowres_cross_validation(work)
    (work / "models" / "3d_lowres" / "fold_2" / "validation" / "summary.json").unlink()
    with pytest.raises(TrainingError, match=r"fold\(s\) 2 of '3d_lowres' are not finished.*-c 3d_lowres -f 2"):
        train(work, "3d_cascade_fullres", 0, **FAST)
    assert not (work / "models" / "3d_cascade_fullres" / "fold_0").exists()

    fake_lowres_cross_validation(work)
    dataset = PreprocessedDataset(work / "preprocessed" / "3d_fullres")
    cascade = plan.configuration("3d_cascade_fullres")
    stage = prepare_previous_stage(WorkDir(work), plan, cascade, dataset, progress=False)
    case = splits[1]["val"][0]
    before = np.array(stage.load(case))
    inode = os.stat(stage.folder / f"{case}.npy").st_ino
    # a retrained previous-stage fold: only its case is redone (rewritten files get new inodes)
    source = work / "models" / "3d_lowres" / "fold_1" / "validation" / f"{case}.npy"
    np.save(source, np.zeros((12, 12, 12), dtype=np.int16))
    other = splits[0]["val"][0]
    other_inode = os.stat(stage.folder / f"{other}.npy").st_ino
    prepare_previous_stage(WorkDir(work), plan, cascade, dataset, progress=False)
    assert before.any() and not stage.load(case).any()
    assert os.stat(stage.folder / f"{case}.npy").st_ino != inode
    assert os.stat(stage.folder / f"{other}.npy").st_ino == other_inode
    # an unreadable manifest (or another grid) redoes every case instead of failing
    (stage.folder / "manifest.json").write_text("{not json")
    prepare_previous_stage(WorkDir(work), plan, cascade, dataset, progress=False)
    assert os.stat(stage.folder / f"{other}.npy").st_ino != other_inode
    assert json.loads((stage.folder / "manifest.json").read_text())["grid"] == configuration_hash(plan, cascade.name)


def test_cascade_trains_end_to_end_on_real_previous_stage_folds(tmp_path: Path) -> None:
    """Every 3d_lowres fold trained for real (its validation writes the predictions), then the cascade,
    with the default augmentation (the previous stage moved with nearest, perturbed), resumable."""
    plan = cascade_plan(epochs=1, iterations_per_epoch=2, augmentation="default")
    work = make_cascade_work(tmp_path / "work", plan, contrast=3.0)
    for fold in range(NUM_CASES):
        train(work, "3d_lowres", fold, **FAST)
    fold_dir = train(work, "3d_cascade_fullres", 1, **FAST)
    assert (fold_dir / "validation" / "summary.json").is_file()
    lowres_splits = json.loads((work / "models" / "3d_lowres" / "splits.json").read_text())
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert summary["cases"] == lowres_splits[1]["val"]
    assert not (work / "models" / "3d_cascade_fullres" / "splits.json").exists()
    manifest = json.loads((work / "models" / "3d_cascade_fullres" / "previous_stage" / "manifest.json").read_text())
    assert manifest["previous_stage"] == "3d_lowres" and len(manifest["cases"]) == NUM_CASES
    train(work, "3d_cascade_fullres", 1, overrides=TrainOverrides(epochs=2), resume=True, **FAST)
    # the post-processing decision re-predicts the validation cases with the same cascade inputs
    decision = find_postprocessing(work, "3d_cascade_fullres", compute_probabilities=True, progress=False)
    assert decision.folds == ("1",)
    probabilities = np.load(fold_dir / "validation" / f"{summary['cases'][0]}_probabilities.npy")
    assert probabilities.shape == (2, 24, 24, 24)


def test_augment_preview_of_the_cascade(tmp_path: Path) -> None:
    from autoseg.training.preview import augment_preview

    work = make_cascade_work(tmp_path / "work", cascade_plan(), contrast=3.0)
    out = augment_preview(work, tmp_path / "preview.png", num_samples=2, configuration="3d_cascade_fullres",
                          preset="default")
    assert out.stat().st_size > 0


def test_one_hot_marks_each_channels_values() -> None:
    from autoseg.cascade import one_hot, previous_stage_values

    labels = np.random.default_rng(0).integers(0, 4, size=(5, 6, 7)).astype(np.int16)
    regions = previous_stage_values({"background": 0, "whole": (1, 2, 3), "core": (2, 3), "enhancing": 3})
    assert regions == ((1, 2, 3), (2, 3), (3,))
    assert previous_stage_values({"background": 0, "b": 2, "a": 1, "ignore": 9}) == ((1,), (2,))
    encoded = one_hot(labels, regions)
    assert encoded.dtype == np.float32 and encoded.shape == (3, 5, 6, 7)
    for channel, values in enumerate(regions):
        np.testing.assert_array_equal(encoded[channel], np.isin(labels, values))
