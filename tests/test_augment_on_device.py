"""The spatial augmentation deferred to the device (autoseg.training.augment.on_device) against the
regular worker path, on the CPU: the same parameters, the same targets exactly, images within float
tolerance (:data:`ATOL`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_augment import ALL_ON, CONFIGS, SPATIAL_OFF, make_cascade_configuration, random_batch
from test_training_support import cube_case, write_case

from autoseg.cascade import one_hot
from autoseg.plan import Configuration
from autoseg.training.augment import build_augmentation, replay
from autoseg.training.augment.on_device import (
    INPUT_DATA,
    INPUT_SEG,
    PARAMS,
    apply_deferred,
    deferred_batch,
    is_deferred,
    resample_batch,
)
from autoseg.training.data import BatchStream, PatchLoader, PreprocessedDataset
from autoseg.training.labels import LabelError, LabelInfo

CPU = torch.device("cpu")
# Largest image difference allowed (normalized intensities, about unit variance). The device
# resamples with coordinates normalized to the whole input, the worker to the block they reach,
# so linear samples differ by float32 rounding; gamma and contrast amplify it a little. Measured:
# at most 5e-5 over these setups.
ATOL = 1e-4
LABELS = {"background": 0, "a": 1, "b": 3}
INFO = LabelInfo.from_labels(LABELS)
# rotation, scaling and elastic on half the samples, so batches mix `spatial` and `crop` openings;
# Poisson noise stays off: numpy's rejection sampler draws another realization when its input
# differs in the last bit (after a crop both paths agree, see test_poisson_noise_after_a_crop)
SPATIAL = {"p_rotation": 0.5, "p_scaling": 0.5, "p_elastic": 0.3, "p_poisson_noise": 0.0}
EVERY_OP = {**ALL_ON, "p_poisson_noise": 0.0, "scaling": (0.8, 1.3), "cascade_operator_radius": (1, 2)}
SETUPS: dict[str, Configuration] = {
    "2d": CONFIGS["2d"],
    "3d": CONFIGS["3d"],
    "dummy_2d": CONFIGS["3d_aniso"],  # 4 x 32 x 32: augmented slice-wise
    "cascade": make_cascade_configuration((8, 16, 16)),
}


class Recording:
    """An augmentation that keeps the parameters the worker path draws (the loader drops them)."""

    def __init__(self, augmentation: Any) -> None:
        self.augmentation = augmentation
        self.params: list[dict] = []

    def input_patch_size(self, patch_size):
        return self.augmentation.input_patch_size(patch_size)

    def sample_batch(self, data, seg, rng):
        return self.augmentation.sample_batch(data, seg, rng)

    def __call__(self, data, seg, rng):
        data, seg, params = self.augmentation(data, seg, rng)
        self.params = params
        return data, seg, params


class PreviousStage:
    """A cascade's previous-stage predictions: the case's own labels, one-hot per class."""

    def __init__(self, dataset: PreprocessedDataset) -> None:
        self.folder = dataset.folder
        self.dataset = dataset

    def load(self, case_id: str) -> np.ndarray:
        return np.asarray(self.dataset.load(case_id)[1])

    def one_hot(self, label_map: np.ndarray) -> np.ndarray:
        return one_hot(label_map, ((1,), (3,)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> PreprocessedDataset:
    """Three two-channel cases with a cube of label 1 and one of label 3."""
    folder = tmp_path_factory.mktemp("preprocessed")
    rng = np.random.default_rng(0)
    for i in range(3):
        write_case(folder, f"case_{i}", *cube_case(rng, shape=(20, 44, 44), size=10, num_channels=2, values=(1, 3)))
    return PreprocessedDataset(folder)


def loader(dataset: PreprocessedDataset, configuration: Configuration, augmentation: Any, **options: Any) -> PatchLoader:
    previous = PreviousStage(dataset) if configuration.previous_stage else None
    return PatchLoader(dataset, dataset.case_ids, configuration.patch_size, 4, INFO, augmentation=augmentation,
                       previous_stage=previous, oversample_foreground=0.5, seed=11, **options)


def assert_same(deferred: tuple[torch.Tensor, torch.Tensor], regular: dict[str, Any]) -> None:
    data, target = deferred
    assert data.dtype == torch.float32 and target.dtype == torch.int16
    assert data.shape == regular["data"].shape
    np.testing.assert_array_equal(target.numpy(), regular["target"])
    np.testing.assert_allclose(data.numpy(), regular["data"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("options", [SPATIAL, EVERY_OP], ids=["spatial", "every_op"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_deferred_batches_match_the_worker_path(dataset, setup, options):
    configuration = SETUPS[setup]
    augmentation = Recording(build_augmentation(configuration, "medical", options))
    regular_loader = loader(dataset, configuration, augmentation)
    deferred_loader = loader(dataset, configuration, augmentation, spatial_on_device=True)
    openings = set()
    for index in range(2):
        regular = regular_loader.make_batch(index)
        deferred = deferred_loader.make_batch(index)
        assert is_deferred(deferred) and not is_deferred(regular) and "data" not in deferred
        assert deferred[PARAMS] == augmentation.params
        assert deferred[INPUT_DATA].shape[2:] == regular_loader.input_patch_size
        assert deferred["keys"] == regular["keys"] and deferred["index"] == regular["index"] == index
        assert_same(apply_deferred(deferred, CPU), regular)
        openings |= {p["ops"][0]["op"] for p in deferred[PARAMS]}
    assert openings == {"spatial"} if options is EVERY_OP else {"spatial", "crop"}


def test_poisson_noise_after_a_crop_is_exact(dataset):
    # without resampling every op before the Poisson noise gets the same bits on both paths
    configuration = SETUPS["3d"]
    augmentation = Recording(build_augmentation(configuration, "medical", {**ALL_ON, **SPATIAL_OFF}))
    regular = loader(dataset, configuration, augmentation).make_batch(0)
    deferred = loader(dataset, configuration, augmentation, spatial_on_device=True).make_batch(0)
    assert "poisson_noise" in {op["op"] for p in deferred[PARAMS] for op in p["ops"]}
    assert_same(apply_deferred(deferred, CPU), regular)


def test_regions_and_the_ignore_label_encode_as_on_the_workers():
    info = LabelInfo.from_labels({"background": 0, "whole": (1, 3), "b": (3,), "ignore": 4})
    augmentation = build_augmentation(CONFIGS["3d"], "default", {"p_rotation": 1.0, "p_scaling": 1.0})
    rng = np.random.default_rng(2)
    data, seg = random_batch(augmentation, 3, rng, labels=(-1, 0, 1, 3, 4))
    out, out_seg, params = augmentation(data, seg, np.random.default_rng(3))
    device_data, target = apply_deferred(deferred_batch(data, seg, params, info), CPU)
    np.testing.assert_array_equal(target.numpy(), info.encode(out_seg))
    assert target.shape[1] == 2 and (target == -1).any()
    np.testing.assert_allclose(device_data.numpy(), out, rtol=0, atol=ATOL)


@pytest.mark.parametrize("scale", [1.25, 0.875])
def test_labels_halfway_between_two_voxels_go_where_the_worker_sends_them(scale):
    # a scale that is a multiple of 1/16 without rotation puts many output voxels exactly halfway
    # between two input voxels: grid_sample's rounding of that tie is what the worker path records
    augmentation = build_augmentation(CONFIGS["3d"], "default", {"p_scaling": 1.0, "scaling": (0.8, 1.3)})
    rng = np.random.default_rng(4)
    data, seg = random_batch(augmentation, 2, rng, labels=(0, 1, 2, 3))
    shape = list(data.shape[2:])
    op = {"op": "spatial", "rotation_deg": [0.0, 0.0, 0.0], "scale": [scale] * 3, "elastic": None}
    params = [{"input_shape": shape, "output_shape": list(CONFIGS["3d"].patch_size), "ops": [op]}] * 2
    _, expected = replay(data, seg, params)
    _, labels = resample_batch(torch.from_numpy(data), torch.from_numpy(seg), params)
    np.testing.assert_array_equal(labels.numpy(), expected)


def test_finished_batches_are_only_moved():
    batch = {"data": np.ones((1, 1, 4, 4), dtype=np.float32), "target": np.zeros((1, 1, 4, 4), dtype=np.int16)}
    data, target = apply_deferred(batch, CPU)
    assert torch.equal(data, torch.ones(1, 1, 4, 4)) and target.dtype == torch.int16


def test_an_undeclared_label_fails_with_the_cases_named():
    augmentation = build_augmentation(CONFIGS["2d"], "none")
    data, seg = random_batch(augmentation, 1, np.random.default_rng(0), labels=(0, 1, 7))
    params = augmentation.sample_batch(data, seg, np.random.default_rng(0))
    batch = {**deferred_batch(data, seg, params, INFO), "keys": ["case_9"]}
    with pytest.raises(LabelError, match=r"\[7\] are not declared") as caught:
        apply_deferred(batch, CPU)
    assert "case_9" in "".join(getattr(caught.value, "__notes__", ["case_9"]))


def test_a_batch_must_open_with_the_spatial_op_or_a_crop():
    data, seg = torch.zeros((1, 1, 8, 8)), torch.zeros((1, 1, 8, 8), dtype=torch.int16)
    params = [{"input_shape": [8, 8], "output_shape": [8, 8], "ops": [{"op": "mirror", "axes": [0]}]}]
    with pytest.raises(ValueError, match="opens with op 'mirror'"):
        resample_batch(data, seg, params)


def test_deferred_batches_cross_the_worker_processes(dataset):
    # params (a list of dicts) and input-size tensors come back from a background worker unchanged
    configuration = SETUPS["2d"]
    augmentation = build_augmentation(configuration, "medical", SPATIAL)
    in_process = loader(dataset, configuration, augmentation, spatial_on_device=True).make_batch(0)
    with BatchStream(loader(dataset, configuration, augmentation, spatial_on_device=True), workers=1) as stream:
        from_worker = next(stream)
    assert from_worker[PARAMS] == in_process[PARAMS]
    for key in (INPUT_DATA, INPUT_SEG):
        np.testing.assert_array_equal(np.asarray(from_worker[key]), in_process[key])
    data, target = apply_deferred(from_worker, CPU)
    assert tuple(data.shape[2:]) == configuration.patch_size
