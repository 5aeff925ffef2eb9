"""The trainer end to end on tiny data: real learning, exact resume, extension, fine-tuning, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_support import cube_cases, make_work, tiny_plan

import autoseg.training.loop as loop
from autoseg.plan import load_plan
from autoseg.training import TrainingError, TrainOverrides, monitor, poly_lr, train
from autoseg.training.checkpoint import CheckpointError, load_checkpoint
from autoseg.training.monitor import read_log

FAST = dict(workers=0, progress=False, num_threads=1)


def _weights(fold_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(fold_dir / "checkpoint_latest.pt")["network"]


@pytest.mark.slow
def test_learns_an_easy_class(tmp_path: Path) -> None:
    """Bright cubes on noise: whole-case validation Dice must reach 0.9 within 240 iterations.

    The cases are not much larger than the patch, as the planner makes them for small datasets: a
    sliding-window tile of pure noise, which training never showed, is the one thing such a tiny
    network gets wrong (instance normalization turns noise into contrast).
    """
    plan = tiny_plan(epochs=8, iterations_per_epoch=30, validation_iterations=2)
    work = make_work(tmp_path / "work", plan, cube_cases(6, shape=(20, 20, 20), size=8, contrast=4.0))
    fold_dir = train(work, "3d_fullres", 0, workers=1, progress=False, num_threads=1)

    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert summary["summary"]["cube"]["dice"]["mean"] >= 0.9
    assert len(summary["cases"]) == 2 and {r["case"] for r in summary["per_case"]} == set(summary["cases"])
    log = read_log(fold_dir / "training_log.jsonl")
    assert [e["epoch"] for e in log] == list(range(8))
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"]
    assert log[-1]["ema_pseudo_dice"] > 0.85
    assert log[0]["lr"] == pytest.approx(1e-2) and log[-1]["lr"] == pytest.approx(poly_lr(1e-2, 7, 8))
    for entry in log:
        assert entry["data_time"] + entry["compute_time"] <= entry["epoch_time"]
    prediction = np.load(fold_dir / "validation" / f"{summary['cases'][0]}.npy")
    assert prediction.shape == (20, 20, 20) and set(np.unique(prediction)) == {0, 1}
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "progress.png", "overrides.json", "schedule.json",
                 "plan.json"):
        assert (fold_dir / name).is_file(), name
    assert json.loads((work / "models" / "3d_fullres" / "splits.json").read_text())[0]["val"] == summary["cases"]


# --- resume ---------------------------------------------------------------------------------------

RESUME_PLAN = dict(epochs=3, iterations_per_epoch=4, validation_iterations=1, seed=7)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (12 iterations), shared read-only by the tests below."""
    work = make_work(tmp_path_factory.mktemp("finished") / "work", tiny_plan(**RESUME_PLAN), cube_cases(4))
    train(work, "3d_fullres", 0, **FAST)
    return work


def _copy_work(finished: Path, destination: Path) -> Path:
    shutil.copytree(finished, destination)
    return destination


@pytest.mark.parametrize("module, where, call, position", [
    (loop, "_train_step", 6, (1, 1)),  # Ctrl-C in epoch 1, after its first iteration
    (monitor, "confusion_counts", 2, (1, 4)),  # Ctrl-C in epoch 1's validation, a batch already drawn
])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(finished_run: Path, tmp_path: Path, monkeypatch,
                                                                  module, where: str, call: int,
                                                                  position: tuple[int, int]) -> None:
    work = make_work(tmp_path / "work", tiny_plan(**RESUME_PLAN), cube_cases(4))
    real = getattr(module, where)
    calls = {"n": 0}

    def ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, where, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(work, "3d_fullres", 0, **FAST)
    fold_dir = work / "models" / "3d_fullres" / "fold_0"
    interrupted = load_checkpoint(fold_dir / "checkpoint_latest.pt")["progress"]
    assert (interrupted["epoch"], interrupted["iteration"]) == position

    monkeypatch.setattr(module, where, real)
    train(work, "3d_fullres", 0, resume=True, **FAST)

    expected = _weights(finished_run / "models" / "3d_fullres" / "fold_0")
    resumed = _weights(fold_dir)
    assert set(resumed) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    keys = ("epoch", "train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "lr")
    reference_log = read_log(finished_run / "models" / "3d_fullres" / "fold_0" / "training_log.jsonl")
    assert [{k: e[k] for k in keys} for e in read_log(fold_dir / "training_log.jsonl")] == \
        [{k: e[k] for k in keys} for e in reference_log]


def test_finished_run_is_extended_with_more_epochs(finished_run: Path, tmp_path: Path) -> None:
    work = _copy_work(finished_run, tmp_path / "work")
    fold_dir = train(work, "3d_fullres", 0, overrides=TrainOverrides(epochs=5), resume=True, **FAST)
    log = read_log(fold_dir / "training_log.jsonl")
    assert [e["epoch"] for e in log] == [0, 1, 2, 3, 4]
    assert log[3]["lr"] == pytest.approx(poly_lr(1e-2, 3, 5))  # the schedule recomputed for 5 epochs
    assert json.loads((fold_dir / "overrides.json").read_text()) == {"epochs": 5}
    assert json.loads((fold_dir / "schedule.json").read_text())["epochs"] == 5
    assert load_checkpoint(fold_dir / "checkpoint_latest.pt")["progress"]["epoch"] == 5


def test_a_trained_fold_is_not_overwritten(finished_run: Path, tmp_path: Path) -> None:
    work = _copy_work(finished_run, tmp_path / "work")
    with pytest.raises(TrainingError, match="already trained.*--resume"):
        train(work, "3d_fullres", 0, **FAST)


@pytest.mark.parametrize("overrides, message", [
    (TrainOverrides(epochs=0), "epochs: Input should be greater than or equal to 1"),
    (TrainOverrides(loss="lovasz"), "unknown loss 'lovasz'"),
    (TrainOverrides(augmentation="wild"), "unknown augmentation preset 'wild'"),
])
def test_bad_overrides_are_named(finished_run: Path, tmp_path: Path, overrides, message: str) -> None:
    work = _copy_work(finished_run, tmp_path / "work")
    with pytest.raises(ValueError, match=message):
        train(work, "3d_fullres", 1, overrides=overrides, **FAST)


def test_fold_beyond_the_splits_is_refused(finished_run: Path, tmp_path: Path) -> None:
    work = _copy_work(finished_run, tmp_path / "work")
    with pytest.raises(ValueError, match="fold 4 does not exist; there are 4 folds"):
        train(work, "3d_fullres", 4, **FAST)


# --- fine-tuning ------------------------------------------------------------------------------------


def test_fine_tuning_adopts_the_pretrained_topology_and_weights(finished_run: Path, tmp_path: Path) -> None:
    source = finished_run / "models" / "3d_fullres" / "fold_0"
    labels = {"background": 0, "cube": 1, "other": 2}
    plan = tiny_plan(labels=labels, features=(8, 16, 32), epochs=1, iterations_per_epoch=1, validation_iterations=0,
                     initial_lr=1e-9)
    work = make_work(tmp_path / "work", plan, cube_cases(3, values=(1, 2)))
    fold_dir = train(work, "3d_fullres", "all", pretrained=source, **FAST)

    topology = load_plan(fold_dir / "plan.json").configuration("3d_fullres").topology
    assert topology.features_per_stage == (4, 8, 16) and topology.num_classes == 3
    pretrained, tuned = _weights(source), _weights(fold_dir)
    heads = {k for k in tuned if tuned[k].shape != pretrained[k].shape}
    assert heads and all("head" in k for k in heads)  # only the 2-class output layers were replaced
    for name in set(tuned) - heads:
        assert torch.allclose(tuned[name], pretrained[name], atol=1e-6), name
    assert not (fold_dir / "validation").exists()  # fold 'all' has no held-out cases


def test_fine_tuning_needs_the_same_input_channels(finished_run: Path, tmp_path: Path) -> None:
    source = finished_run / "models" / "3d_fullres" / "fold_0"
    work = make_work(tmp_path / "work", tiny_plan(num_channels=2), cube_cases(2, num_channels=2))
    with pytest.raises(TrainingError, match="takes 1 input channel"):
        train(work, "3d_fullres", "all", pretrained=source, **FAST)
    with pytest.raises(CheckpointError, match="checkpoint does not exist"):
        train(work, "3d_fullres", "all", pretrained=tmp_path, **FAST)


# --- other label setups -----------------------------------------------------------------------------


def test_2d_regions_with_an_ignore_label(tmp_path: Path) -> None:
    labels = {"background": 0, "whole": (1, 2), "core": 2, "ignore": 3}
    plan = tiny_plan(name="2d", dim=2, patch=(16, 16), labels=labels, regions_class_order=(1, 2),
                     epochs=2, iterations_per_epoch=3, validation_iterations=1)
    cases = cube_cases(3, shape=(4, 24, 24), size=6, values=(1, 2, 3))
    work = make_work(tmp_path / "work", plan, cases)
    fold_dir = train(work, "2d", 0, **FAST)
    log = read_log(fold_dir / "training_log.jsonl")
    assert set(log[-1]["pseudo_dice"]) == {"whole", "core"}
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    assert set(summary["summary"]) == {"whole", "core"}
    prediction = np.load(fold_dir / "validation" / f"{summary['cases'][0]}.npy")
    assert prediction.shape == (4, 24, 24) and set(np.unique(prediction)) <= {0, 1, 2}


def test_augmentation_finished_on_the_device_trains_as_on_the_workers(tmp_path: Path, monkeypatch) -> None:
    """The deferred path (a GPU's default) draws the same augmentations: the same run, near the same losses.

    The batches agree to 1e-4 (tests/test_augment_on_device.py), so 12 iterations agree to 1e-4 (3e-8 measured);
    a wrongly wired deferred batch (unaugmented, misaligned labels) would not.
    """
    plan = tiny_plan(**{**RESUME_PLAN, "augmentation": "default"})
    losses = {}
    for on_device in (False, True):
        monkeypatch.setattr(loop, "spatial_augmentation_on_device", lambda device, on=on_device: on)
        work = make_work(tmp_path / f"on_device_{on_device}", plan, cube_cases(4))
        train(work, "3d_fullres", 0, **FAST)
        log = read_log(work / "models" / "3d_fullres" / "fold_0" / "training_log.jsonl")
        losses[on_device] = [entry["train_loss"] for entry in log]
    assert losses[True] != losses[False]  # the batches really took the other path
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)  # measured: 3e-8
