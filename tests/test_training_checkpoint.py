"""Checkpoints (weights_only round trip, refusal of foreign files), random states, monitoring helpers."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from autoseg.training.labels import LabelInfo
from autoseg.training.monitor import (
    confusion_counts,
    mean_defined,
    pseudo_dice,
    read_log,
    update_ema,
    write_log,
)


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    network = torch.nn.Conv3d(1, 2, 3)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    network(torch.ones(1, 1, 4, 4, 4)).sum().backward()
    optimizer.step()
    state = {"network": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
             "log": [{"epoch": 0, "pseudo_dice": {"a": None}}], "rng": capture_rng_state()}
    path = save_checkpoint(tmp_path / "checkpoint_latest.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]  # no temporary file left
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["log"] == state["log"] and loaded["format"] == 1
    assert torch.equal(loaded["network"]["weight"], network.weight)
    fresh = torch.optim.SGD(torch.nn.Conv3d(1, 2, 3).parameters(), lr=0.1)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["state"][0]["momentum_buffer"])


class _NotAllowed:
    pass


@pytest.mark.parametrize("content, message", [
    (None, "checkpoint does not exist"),
    (b"garbage", "not a readable checkpoint"),
    ({"network": {}, "payload": _NotAllowed()}, "not a readable checkpoint"),  # weights_only refuses objects
    ({"weights": {}}, "not an autoseg checkpoint"),
])
def test_bad_checkpoints_are_refused_with_the_file_named(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


def test_random_states_survive_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "c.pt", {"network": {}, "rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_pseudo_dice_counts_tp_fp_fn_over_the_batch() -> None:
    info = LabelInfo.from_labels({"background": 0, "a": 1, "b": 2})
    target = torch.tensor([[0, 1, 1, 2, -1, 0]], dtype=torch.int16).view(1, 1, 6)
    predicted = torch.tensor([0, 1, 0, 1, 1, 0])  # class per voxel; voxel 4 is ignored
    logits = torch.nn.functional.one_hot(predicted, 3).T.float().view(1, 3, 6)
    counts = confusion_counts(logits, target, info)
    assert counts.tolist() == [[1, 0], [1, 0], [1, 1]]  # rows TP, FP, FN; columns a, b
    dice = pseudo_dice(counts, info)
    assert dice == {"a": pytest.approx(0.5), "b": 0.0}
    assert pseudo_dice(torch.zeros(3, 2), info) == {"a": None, "b": None}
    assert mean_defined({"a": 0.5, "b": None}) == 0.5 and mean_defined({"a": None}) is None


def test_ema_update() -> None:
    assert update_ema(None, 0.5) == 0.5
    assert update_ema(0.5, 1.0) == pytest.approx(0.55)
    assert update_ema(0.5, None) == 0.5


def test_log_is_json_lines_without_nan(tmp_path: Path) -> None:
    entries = [{"epoch": 0, "val_loss": None}, {"epoch": 1, "val_loss": 0.5}]
    write_log(tmp_path / "log.jsonl", entries)
    assert read_log(tmp_path / "log.jsonl") == entries
    with pytest.raises(ValueError):
        write_log(tmp_path / "log.jsonl", [{"val_loss": float("nan")}])


def test_typed_checkpoint_round_trips_and_reads_files_without_precision(tmp_path: Path) -> None:
    network = torch.nn.Conv3d(1, 2, 3)
    written = Checkpoint(network=network.state_dict(), configuration="3d_fullres", fold="0", plan_hash="abc",
                         world_size=1, precision="fp32")
    path = save_checkpoint(tmp_path / "checkpoint_latest.pt", written.to_state())
    loaded = read_checkpoint(path)
    assert loaded.precision == "fp32" and loaded.fold == "0" and loaded.optimizer is None
    assert torch.equal(loaded.network["weight"], network.weight)
    older = {k: v for k, v in written.to_state().items() if k != "precision"}  # before mixed precision
    assert read_checkpoint(save_checkpoint(tmp_path / "old.pt", older)).precision is None


def test_typed_checkpoint_names_the_file_for_foreign_entries_and_missing_training_state(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"network": {}, "weights": {}})
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: not an autoseg training checkpoint .*weights"):
        read_checkpoint(path)
    path = save_checkpoint(tmp_path / "checkpoint_best.pt", {"network": {}})
    with pytest.raises(CheckpointError, match=r"checkpoint_best\.pt: cannot resume .* no optimizer, progress"):
        read_checkpoint(path).check_resumable(path)
