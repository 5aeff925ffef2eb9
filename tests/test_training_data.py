"""Patch batches: shapes, foreground oversampling, border padding, 2D slices, workers and their errors."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_training_support import LABELS, cube_case, tiny_plan, write_case

from autoseg.training.augment import build_augmentation
from autoseg.training.data import (
    BatchStream,
    DataLoadingError,
    PatchLoader,
    PreprocessedDataset,
    crop_and_pad,
    patch_start,
)
from autoseg.training.labels import LabelInfo

INFO = LabelInfo.from_labels(LABELS)


def loader_children() -> list:
    """Child processes other than joblib's reusable pool, which earlier tests may leave running."""
    return [p for p in multiprocessing.active_children() if not p.name.startswith("LokyProcess")]


@pytest.fixture
def small_cubes(tmp_path: Path) -> PreprocessedDataset:
    """Four 32^3 cases, each with one 3^3 cube: a random 8^3 patch rarely contains it."""
    rng = np.random.default_rng(0)
    for i in range(4):
        write_case(tmp_path, f"case_{i}", *cube_case(rng, shape=(32, 32, 32), size=3))
    return PreprocessedDataset(tmp_path)


def _loader(dataset: PreprocessedDataset, **options) -> PatchLoader:
    defaults = dict(patch_size=(8, 8, 8), batch_size=3, label_info=INFO, seed=3)
    return PatchLoader(dataset, dataset.case_ids, **{**defaults, **options})


def test_dataset_reads_the_storage_contract(small_cubes: PreprocessedDataset) -> None:
    assert small_cubes.case_ids == ["case_0", "case_1", "case_2", "case_3"]
    image, seg = small_cubes.load("case_0")
    assert isinstance(image, np.memmap) and image.shape == (1, 32, 32, 32) and seg.shape == (32, 32, 32)
    assert small_cubes.class_presence() == {c: {1} for c in small_cubes.case_ids}
    locations = small_cubes.class_locations("case_0")[1]
    assert locations.shape == (27, 3) and (seg[tuple(locations.T)] == 1).all()


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `autoseg preprocess` first"):
        PreprocessedDataset(tmp_path / "nothing")


def test_last_third_of_the_batch_holds_foreground(small_cubes: PreprocessedDataset) -> None:
    loader = _loader(small_cubes, oversample_foreground=0.33)
    assert loader.num_forced == 1
    has_foreground = np.array([[(batch["target"][b] == 1).any() for b in range(3)]
                               for batch in (loader.make_batch(i) for i in range(40))])
    assert has_foreground[:, 2].all()  # forced, and centred on the cube
    assert has_foreground[:, :2].mean() < 0.3  # random patches mostly miss a 3^3 cube in 32^3
    batch = loader.make_batch(0)
    assert batch["data"].shape == (3, 1, 8, 8, 8) and batch["data"].dtype == np.float32
    assert batch["target"].shape == (3, 1, 8, 8, 8) and batch["target"].dtype == np.int16
    assert len(batch["keys"]) == 3


@pytest.mark.parametrize("fraction, batch_size, forced", [(0.33, 2, 1), (0.33, 12, 4), (0.0, 4, 0), (1.0, 3, 3),
                                                         (0.5, 4, 2)])
def test_number_of_forced_samples(small_cubes, fraction: float, batch_size: int, forced: int) -> None:
    assert _loader(small_cubes, oversample_foreground=fraction, batch_size=batch_size).num_forced == forced


@pytest.mark.parametrize("start, size, expected", [
    ((0, 0), (2, 2), [[0, 1], [4, 5]]),
    ((-1, 0), (2, 2), [[-9, -9], [0, 1]]),          # above the array: padding
    ((3, 3), (2, 2), [[15, -9], [-9, -9]]),          # past the corner
    ((-1, -1), (6, 6), None),                        # larger than the array on both sides
])
def test_crop_and_pad(start, size, expected) -> None:
    array = np.arange(16).reshape(4, 4)
    out = crop_and_pad(array, start, size, pad_value=-9)
    assert out.shape == tuple(size)
    if expected is not None:
        assert out.tolist() == expected
    else:
        assert (out[1:5, 1:5] == array).all() and (out[0] == -9).all() and (out[:, 5] == -9).all()


def test_patch_start_stays_valid_and_centres() -> None:
    rng = np.random.default_rng(0)
    starts = np.array([patch_start((20, 10), (8, 8), rng) for _ in range(500)])
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 12 and (starts[:, 1] >= 0).all() and \
        (starts[:, 1] <= 2).all()
    assert patch_start((20, 10), (8, 8), rng, center=(10, 5)) == [6, 1]
    assert patch_start((20, 10), (8, 8), rng, center=(0, 9)) == [0, 2]  # clipped into the case
    # a case smaller than the patch sits in the middle (offset of at most one voxel)
    assert {patch_start((5,), (8,), rng)[0] for _ in range(50)} == {-2, -1}


def test_small_case_is_padded_with_zero_image_and_background(tmp_path: Path) -> None:
    image = np.full((1, 4, 6, 6), 5.0, dtype=np.float32)
    seg = np.ones((4, 6, 6), dtype=np.int16)
    seg[0] = -1  # outside the non-zero mask: background for training
    write_case(tmp_path, "small", image, seg)
    batch = _loader(PreprocessedDataset(tmp_path), batch_size=1).make_batch(0)
    data, target = batch["data"][0, 0], batch["target"][0, 0]
    inside = data == 5.0
    assert inside.sum() == 4 * 6 * 6 and (data[~inside] == 0).all()
    assert (target[~inside] == 0).all() and target[inside].sum() == 3 * 6 * 6  # -1 became background


def test_2d_batches_are_slices_of_the_3d_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        image, seg = cube_case(rng, shape=(6, 24, 24), size=3)
        write_case(tmp_path, f"case_{i}", image, seg)
    dataset = PreprocessedDataset(tmp_path)
    loader = PatchLoader(dataset, dataset.case_ids, (16, 16), 2, INFO, oversample_foreground=0.5, seed=0)
    for index in range(10):
        batch = loader.make_batch(index)
        assert batch["data"].shape == (2, 1, 16, 16) and batch["target"].shape == (2, 1, 16, 16)
        assert (batch["target"][1] == 1).any()  # the forced sample's slice holds the cube


def test_batches_depend_only_on_seed_and_index(small_cubes: PreprocessedDataset) -> None:
    reference = [_loader(small_cubes).make_batch(i) for i in range(6)]
    with BatchStream(_loader(small_cubes), workers=2) as stream:
        threaded = [next(stream) for _ in range(6)]
    with BatchStream(_loader(small_cubes, start_batch=4), workers=0) as stream:
        resumed = [next(stream) for _ in range(2)]
    for expected, got in zip(reference, threaded):
        assert got["index"] == expected["index"] and got["keys"] == expected["keys"]
        assert np.array_equal(got["data"], expected["data"]) and np.array_equal(got["target"], expected["target"])
    for expected, got in zip(reference[4:], resumed):
        assert np.array_equal(got["data"], expected["data"])
    assert not np.array_equal(reference[0]["data"], _loader(small_cubes, seed=4).make_batch(0)["data"])
    assert not np.array_equal(reference[0]["data"], _loader(small_cubes, rank=1).make_batch(0)["data"])
    assert loader_children() == []  # the stream shut its workers down


def _corrupt(dataset: PreprocessedDataset, case_id: str) -> None:
    (dataset.folder / f"{case_id}.npy").write_bytes(b"this is not a numpy file")


def test_worker_error_names_the_case_and_keeps_the_traceback(small_cubes: PreprocessedDataset) -> None:
    for case_id in small_cubes.case_ids:
        _corrupt(small_cubes, case_id)
    stream = BatchStream(_loader(small_cubes), workers=2)
    with pytest.raises(DataLoadingError) as caught:
        next(stream)
    error = caught.value
    assert error.case in small_cubes.case_ids and f"case {error.case}" in str(error)
    assert "Traceback in the data loading worker" in str(error) and "np.load" in error.worker_traceback
    assert loader_children() == []


def test_without_workers_the_real_exception_surfaces(small_cubes: PreprocessedDataset) -> None:
    _corrupt(small_cubes, "case_0")
    loader = _loader(small_cubes, batch_size=8)  # 8 draws from 4 cases: case_0 is among them
    with pytest.raises(ValueError) as caught, BatchStream(loader, workers=0) as stream:
        next(stream)
    assert caught.value.case == "case_0"
    if sys.version_info >= (3, 11):  # exception notes exist from Python 3.11
        assert any("case_0" in note for note in caught.value.__notes__)


class _SlowLoader(PatchLoader):
    def make_batch(self, index: int) -> dict:
        time.sleep(1.0)
        return super().make_batch(index)


def test_ctrl_c_while_waiting_for_data_stops_every_worker(small_cubes: PreprocessedDataset) -> None:
    # Ctrl-C as Python handles it by default, whatever an earlier test in this process installed
    # (one CI run of the whole suite saw no KeyboardInterrupt here; reruns and this file alone pass)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loader = _SlowLoader(small_cubes, small_cubes.case_ids, (8, 8, 8), 2, INFO)
        stream = BatchStream(loader, workers=2)
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            next(stream)
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert loader_children() == []


def test_augmentation_draws_larger_patches_and_crops_back(small_cubes: PreprocessedDataset) -> None:
    configuration = tiny_plan(patch=(8, 8, 8), augmentation="default",
                              augmentation_options={"p_rotation": 1.0, "p_scaling": 1.0}).configurations["3d_fullres"]
    augmentation = build_augmentation(configuration)
    loader = _loader(small_cubes, augmentation=augmentation)
    assert all(i > p for i, p in zip(loader.input_patch_size, (8, 8, 8)))
    batch = loader.make_batch(0)
    assert batch["data"].shape == (3, 1, 8, 8, 8) and set(np.unique(batch["target"])) <= {0, 1}
    # the augmentation is part of the batch's random stream, so it is reproducible
    assert np.array_equal(batch["data"], _loader(small_cubes, augmentation=augmentation).make_batch(0)["data"])
