"""Tests for autoseg.inference and autoseg.model_archive.

The end-to-end tests use a registered test architecture, ``test_threshold``: a pointwise network
that classifies each voxel by its raw intensity (below 75: background, 75-150: class 1, above
150: class 2). With ``none`` normalization its correct output is known in the *original* image,
so a prediction that comes back in the wrong place (orientation, crop, resampling, geometry)
shows up as disagreement with the thresholded source. A cascade-trained variant ignores the
image and copies the previous stage's one-hot input, so its output is right only when the
previous stage's prediction reached it on the right grid.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from torch import nn

from autoseg.inference import (
    PredictionError,
    export_model,
    gaussian_importance_map,
    import_model,
    load_trained_model,
    predict_folder,
    sliding_window_predict,
    tile_starts,
)
from autoseg.io import Image, read_image, write_image
from autoseg.model_archive import ModelArchiveError
from autoseg.networks import register_network, unregister_network
from autoseg.plan import ChannelNormalization, Configuration, Plan, Schedule, Topology, plan_hash, save_plan
from autoseg.training.checkpoint import save_checkpoint
from autoseg.utils import atomic_write_json

# --- test networks ----------------------------------------------------------------------------------


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SymmetricConv(nn.Module):
    """A convolution whose kernel is symmetric under every flip: mirror-equivariant."""

    def __init__(self, dim: int, in_channels: int = 2, out_channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        kernel = torch.randn((out_channels, in_channels) + (3,) * dim, generator=generator)
        for axis in range(2, 2 + dim):
            kernel = kernel + kernel.flip(axis)
        self.weight = nn.Parameter(kernel)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = torch.nn.functional.conv3d if self.dim == 3 else torch.nn.functional.conv2d
        return conv(x, self.weight, padding=1)


class AsymmetricConv(SymmetricConv):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape, generator=torch.Generator().manual_seed(1)))


LOW, HIGH, SLOPE = 75.0, 150.0, 0.05


class ThresholdNet(nn.Module):
    """Intensity thresholds as logits (softmax or, with ``options.regions``, sigmoid per region)."""

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        self.topology = topology
        self.slope = nn.Parameter(torch.tensor(SLOPE))
        self.regions = bool(topology.options.get("regions"))
        self.cascade = topology.in_channels > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cascade:  # copy the previous stage: its one-hot foreground channels
            onehot = x[:, 1:]
            return torch.cat([torch.full_like(onehot[:, :1], 0.5), onehot], dim=1) * 10
        value = x[:, :1]
        first = self.slope * (value - LOW)
        second = self.slope * (value - HIGH)
        if self.regions:
            return torch.cat([first, second], dim=1)
        return torch.cat([torch.zeros_like(value), first, first + second], dim=1)


@pytest.fixture(autouse=True, scope="module")
def threshold_network():
    """Registered only while these tests run, so the conformance suite never sees it."""
    register_network("test_threshold")(ThresholdNet)
    yield
    unregister_network("test_threshold")


def expected_labels(image: np.ndarray) -> np.ndarray:
    return (image > LOW).astype(np.uint8) + (image > HIGH).astype(np.uint8)


# --- sliding window -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, patch, step", [
    ((2, 13, 21, 9), (8, 8, 8), 0.5),       # 3D, one axis smaller than the patch
    ((2, 5, 7, 6), (8, 8, 8), 0.5),         # smaller than the patch everywhere
    ((1, 17, 16, 33), (8, 16, 16), 0.25),   # exact fit on one axis, many tiles
    ((2, 16, 16, 16), (16, 16, 16), 1.0),   # a single tile
    ((3, 11, 19), (8, 8), 0.5),             # 2D image, 2D patch
    ((2, 4, 21, 9), (16, 16), 0.7),         # 2D patch over a stack of slices
])
def test_identity_network_returns_its_input(shape: tuple[int, ...], patch: tuple[int, ...], step: float) -> None:
    image = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for tta_axes in ((), tuple(range(len(patch)))):
        out = sliding_window_predict(Identity(), image, patch, step=step, tta_axes=tta_axes, activation="none",
                                     batch_size=3)
        assert out.shape == image.shape
        torch.testing.assert_close(out, image, atol=2e-6, rtol=1e-5)


def test_softmax_of_identity_is_the_pointwise_softmax() -> None:
    image = torch.randn(3, 9, 10, 11)
    out = sliding_window_predict(Identity(), image, (8, 8, 8), step=0.5)
    torch.testing.assert_close(out, torch.softmax(image, 0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(0), torch.ones(9, 10, 11), atol=1e-5, rtol=0)


def test_half_precision_accumulation_stays_close() -> None:
    image = torch.randn(3, 12, 12, 12)
    out = sliding_window_predict(Identity(), image, (8, 8, 8), accumulate_dtype=torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.softmax(image, 0), atol=2e-3, rtol=0)


@pytest.mark.parametrize("patch", [(16, 16, 16), (7, 12, 33), (64, 64), (1, 5)])
def test_gaussian_importance_map(patch: tuple[int, ...]) -> None:
    weights = gaussian_importance_map(patch)
    assert weights.shape == patch
    assert float(weights.max()) == 1.0
    assert bool((weights > 0).all())
    for axis in range(len(patch)):  # centred: symmetric under every flip
        torch.testing.assert_close(weights, weights.flip(axis))
    if min(patch) >= 7:
        centre = tuple(p // 2 for p in patch)
        assert float(weights[centre]) > 0.9 and float(weights[(0,) * len(patch)]) < 1e-3
    half = gaussian_importance_map(patch, dtype=torch.float16)
    assert bool((half > 0).all()) and float(half.max()) == 1.0


def test_gaussian_sigma_is_an_eighth_of_the_patch() -> None:
    weights = gaussian_importance_map((33,))
    sigma = 33 / 8
    offset = 8  # voxels from the centre (index 16)
    assert float(weights[16 + offset]) == pytest.approx(np.exp(-0.5 * (offset / sigma) ** 2), rel=1e-6)


@pytest.mark.parametrize("size, patch, step, expected", [
    (64, 64, 0.5, [0]),
    (100, 64, 0.5, [0, 18, 36]),
    (128, 64, 0.5, [0, 32, 64]),
    (129, 64, 0.5, [0, 22, 43, 65]),
    (100, 64, 1.0, [0, 36]),
])
def test_tile_starts_reach_the_edge(size: int, patch: int, step: float, expected: list[int]) -> None:
    (starts,) = tile_starts((size,), (patch,), step)
    assert starts == expected
    assert starts[-1] + patch == size
    assert all(b - a <= patch * step for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("dim, shape", [(3, (2, 11, 18, 13)), (2, (2, 3, 19, 22))])
def test_mirroring_a_mirror_equivariant_network_changes_nothing(dim: int, shape: tuple[int, ...]) -> None:
    image = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    patch = (8,) * dim if dim == 3 else (12, 12)
    net = SymmetricConv(dim)
    plain = sliding_window_predict(net, image, patch)
    mirrored = sliding_window_predict(net, image, patch, tta_axes=tuple(range(dim)))
    torch.testing.assert_close(mirrored, plain, atol=1e-5, rtol=1e-4)
    # The check has teeth: a network that is not mirror-equivariant does change.
    asym = AsymmetricConv(dim)
    assert not torch.allclose(sliding_window_predict(asym, image, patch, tta_axes=tuple(range(dim))),
                              sliding_window_predict(asym, image, patch), atol=1e-3)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="step"):
        sliding_window_predict(Identity(), torch.zeros(1, 8, 8, 8), (8, 8, 8), step=0)
    with pytest.raises(ValueError, match="tta_axes"):
        sliding_window_predict(Identity(), torch.zeros(1, 8, 8, 8), (8, 8, 8), tta_axes=(3,))
    with pytest.raises(ValueError, match="output channels"):
        sliding_window_predict(Identity(), torch.zeros(2, 8, 8, 8), (8, 8, 8), output_channels=3)


# --- a tiny model folder --------------------------------------------------------------------------------

LABELS = {"background": 0, "liver": 1, "lesion": 2}
REGIONS = {"background": 0, "organ": [1, 2], "core": [2]}
DIRECTION = (0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0)  # axes permuted and one flipped
ORIGIN = (-12.5, 30.25, 7.0)
SPACING = (3.0, 0.9, 1.1)


def threshold_topology(dim: int, in_channels: int = 1, num_classes: int = 3, regions: bool = False) -> Topology:
    return Topology(arch="test_threshold", dim=dim, in_channels=in_channels, num_classes=num_classes,
                    features_per_stage=(1,), kernel_sizes=((1,) * dim,), strides=((1,) * dim,),
                    n_conv_per_stage=(1,), n_conv_per_stage_decoder=(), deep_supervision=False,
                    options={"regions": True} if regions else {})


CASCADE_CHANNELS = 2  # one-hot of the foreground classes (or of the regions)


def configuration(name: str, dim: int, spacing: tuple[float, float, float], patch: Sequence[int],
                  regions: bool = False, previous_stage: str | None = None) -> Configuration:
    num_classes = 2 if regions else 3
    in_channels = 1 + (CASCADE_CHANNELS if previous_stage else 0)
    return Configuration(
        name=name, spacing=spacing, patch_size=tuple(patch), batch_size=2, median_shape=(10, 24, 20),
        normalization=(ChannelNormalization(channel="CT", scheme="none"),),
        topology=threshold_topology(dim, in_channels, num_classes=num_classes, regions=regions),
        schedule=Schedule(mirror_axes=tuple(range(dim))), previous_stage=previous_stage,
        preprocessed_data="3d_fullres" if previous_stage else None)


def make_plan(regions: bool = False, cascade: bool = False) -> Plan:
    configurations = {
        "3d_fullres": configuration("3d_fullres", 3, (2.0, 1.0, 1.0), (8, 16, 16), regions),
        "2d": configuration("2d", 2, (3.0, 0.8, 0.8), (16, 16), regions),
    }
    if cascade:
        configurations["3d_lowres"] = configuration("3d_lowres", 3, (2.2, 1.8, 3.0), (8, 8, 8), regions)
        configurations["3d_cascade_fullres"] = configuration("3d_cascade_fullres", 3, (2.0, 1.0, 1.0), (8, 16, 16),
                                                             regions, previous_stage="3d_lowres")
    labels = REGIONS if regions else LABELS
    return Plan(dataset_name="Dataset998_Threshold", channel_names=("CT",),
                labels={k: tuple(v) if isinstance(v, list) else v for k, v in labels.items()},
                configurations=configurations, regions_class_order=(1, 2) if regions else None)


def save_fold(work: Path, plan: Plan, name: str, fold: str, topology: Topology | None = None,
              checkpoint: str = "checkpoint_best.pt") -> None:
    config = plan.configuration(name)
    topology = topology or config.topology
    folder = work / "models" / name / f"fold_{fold}"
    save_checkpoint(folder / checkpoint, {
        "network": ThresholdNet(topology).state_dict(),
        "topology": TypeAdapter(Topology).dump_python(topology, mode="json"),
        "schedule": TypeAdapter(Schedule).dump_python(config.schedule, mode="json"),
        "configuration": name, "fold": fold, "plan_hash": plan_hash(plan),
    })


def make_model(root: Path, regions: bool = False, cascade: bool = False, folds: Sequence[str] = ("0", "1")) -> Path:
    work = root / "work"
    plan = make_plan(regions, cascade)
    save_plan(plan, work / "plan.json")
    labels = REGIONS if regions else LABELS
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2, "file_ending": ".nii.gz"}
    if regions:
        dataset["regions_class_order"] = [1, 2]
    atomic_write_json(work / "dataset.json", dataset)
    atomic_write_json(work / "fingerprint.json", {"dataset_dir": "nowhere"})
    for fold in folds:
        save_fold(work, plan, "2d", fold)
        save_fold(work, plan, "3d_fullres", fold)
        if cascade:
            save_fold(work, plan, "3d_lowres", fold)
            save_fold(work, plan, "3d_cascade_fullres", fold)
    return work


def case_image(shape: tuple[int, int, int] = (10, 24, 20)) -> np.ndarray:
    image = np.zeros(shape, dtype=np.int16)
    image[1:9, 2:22, 2:18] = 30    # body (background class); zeros around it are cropped away
    image[2:8, 4:14, 4:12] = 100   # class 1
    image[3:8, 15:21, 6:15] = 200  # class 2
    return image


def write_cases(folder: Path, count: int = 2, ending: str = ".nii.gz",
                direction: Sequence[float] = DIRECTION, origin: Sequence[float] = ORIGIN) -> list[Path]:
    paths = []
    for index in range(count):
        image = case_image()
        if index % 2:
            image = image[::-1].copy()
        path = folder / f"case_{index:03d}_0000{ending}"
        write_image(Image(image, SPACING, origin, direction), path)
        paths.append(path)
    return paths


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def check_overlay(prediction_path: Path, source_path: Path) -> np.ndarray:
    """The prediction has the source's exact geometry and matches the thresholded source."""
    source = read_image(source_path)
    prediction = read_image(prediction_path)
    assert prediction.array.shape == source.array.shape
    assert prediction.spacing == source.spacing
    assert prediction.origin == source.origin
    assert prediction.direction == source.direction
    assert np.issubdtype(prediction.array.dtype, np.integer)
    assert set(np.unique(prediction.array)) <= {0, 1, 2}
    expected = expected_labels(source.array)
    for value in (1, 2):
        assert dice(prediction.array == value, expected == value) > 0.85, value
    assert np.mean(prediction.array == expected) > 0.95
    return prediction.array


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    write_cases(folder)
    return folder


@pytest.mark.parametrize("configuration_name", ["3d_fullres", "2d"])
def test_prediction_overlays_the_source_exactly(model_dir: Path, inputs: Path, tmp_path: Path,
                                                configuration_name: str) -> None:
    outputs = predict_folder(model_dir, inputs, tmp_path, configuration=configuration_name, progress=False)
    assert [p.name for p in outputs] == ["case_000.nii.gz", "case_001.nii.gz"]
    for output in outputs:
        check_overlay(output, inputs / output.name.replace(".nii.gz", "_0000.nii.gz"))


def test_defaults_pick_3d_fullres_and_every_fold(model_dir: Path) -> None:
    model = load_trained_model(model_dir)
    assert model.configuration.name == "3d_fullres"
    assert [f.fold for f in model.folds] == ["0", "1"]
    assert model.folds[0].mirror_axes == (0, 1, 2)
    assert not model.folds[0].network.training
    fast = load_trained_model(model_dir, "2d", folds=["1"])
    assert [f.fold for f in fast.folds] == ["1"] and fast.folds[0].mirror_axes == (0, 1)


def test_other_formats_and_probabilities(model_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    (source,) = write_cases(inputs, count=1, ending=".mha")
    out = tmp_path / "out"
    (output,) = predict_folder(model_dir, inputs, out, save_probabilities=True, fast=True, progress=False)
    assert output.name == "case_000.mha"
    labels = check_overlay(output, source)
    with np.load(out / "case_000_probabilities.npz", allow_pickle=False) as data:
        probabilities = data["probabilities"]
    sidecar = json.loads((out / "case_000_probabilities.json").read_text())
    assert probabilities.shape == (3, *labels.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-4)
    assert sidecar["channels"] == ["background", "liver", "lesion"] and sidecar["activation"] == "softmax"
    assert tuple(sidecar["direction"]) == DIRECTION and tuple(sidecar["origin"]) == ORIGIN
    assert np.mean(probabilities.argmax(0) == labels) > 0.97


def test_2d_images_come_back_2d(model_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    source = inputs / "cells_000_0000.png"
    write_image(Image(case_image()[5].astype(np.uint8), (1.0, 1.0)), source)
    (output,) = predict_folder(model_dir, inputs, tmp_path / "out", configuration="2d", progress=False)
    assert output.name == "cells_000.png"
    prediction = read_image(output).array
    assert prediction.shape == (24, 20) and prediction.dtype == np.uint8
    assert np.mean(prediction == expected_labels(read_image(source).array)) > 0.95


def test_existing_outputs_are_skipped_unless_overwrite(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    outputs = predict_folder(model_dir, inputs, tmp_path, fast=True, progress=False)
    marker = read_image(outputs[0])
    marker.array[...] = 7
    write_image(marker, outputs[0])
    again = predict_folder(model_dir, inputs, tmp_path, fast=True, progress=False)
    assert again == outputs
    assert np.all(read_image(outputs[0]).array == 7)  # skipped
    predict_folder(model_dir, inputs, tmp_path, fast=True, overwrite=True, progress=False)
    check_overlay(outputs[0], inputs / "case_000_0000.nii.gz")  # redone


def test_a_broken_case_is_reported_and_the_others_are_written(model_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    write_cases(inputs, count=1)
    broken = inputs / "case_009_0000.nii.gz"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(PredictionError, match="case_009") as caught:
        predict_folder(model_dir, inputs, tmp_path / "out", fast=True, progress=False)
    assert set(caught.value.failures) == {"case_009"}
    assert str(broken) in caught.value.failures["case_009"]
    assert (tmp_path / "out" / "case_000.nii.gz").is_file()


def test_no_overlap_mode_gives_the_same_result(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    threaded = predict_folder(model_dir, inputs, tmp_path / "a", fast=True, progress=False, num_workers=2)
    inline = predict_folder(model_dir, inputs, tmp_path / "b", fast=True, progress=False, num_workers=0)
    for a, b in zip(threaded, inline):
        np.testing.assert_array_equal(read_image(a).array, read_image(b).array)


def test_regions_are_rebuilt_into_label_values(tmp_path: Path) -> None:
    work = make_model(tmp_path, regions=True, folds=("0",))
    inputs = tmp_path / "in"
    (source,) = write_cases(inputs, count=1)
    (output,) = predict_folder(work, inputs, tmp_path / "out", progress=False)
    check_overlay(output, source)


def test_cascade_feeds_the_previous_stage(tmp_path: Path) -> None:
    work = make_model(tmp_path, cascade=True, folds=("0",))
    model = load_trained_model(work, "3d_cascade_fullres")
    assert model.cascade_channels == 2 and model.previous is not None
    assert model.previous.configuration.name == "3d_lowres"
    assert load_trained_model(work, "3d_fullres").previous is None
    inputs = tmp_path / "in"
    (source,) = write_cases(inputs, count=1)
    (output,) = predict_folder(work, inputs, tmp_path / "out", configuration="3d_cascade_fullres", progress=False)
    (low,) = predict_folder(work, inputs, tmp_path / "low", configuration="3d_lowres", progress=False)
    prediction = read_image(output).array
    expected = expected_labels(read_image(source).array)
    # The full-resolution network only copies its cascade input: its output is the low-resolution
    # stage's, brought to the full-resolution grid (a little blurred), and in place.
    assert np.mean(prediction == read_image(low).array) > 0.97
    for value in (1, 2):
        assert dice(prediction == value, expected == value) > 0.6


def test_networks_whose_inputs_do_not_fit_the_configuration_are_refused(tmp_path: Path) -> None:
    work = tmp_path / "work"
    plan = make_plan(cascade=True)
    save_plan(plan, work / "plan.json")
    save_fold(work, plan, "3d_lowres", "0")
    # a cascade configuration's checkpoint without the one-hot inputs, and one with them elsewhere
    save_fold(work, plan, "3d_cascade_fullres", "0", threshold_topology(3, 1, 3))
    save_fold(work, plan, "3d_fullres", "0", threshold_topology(3, 3, 3))
    with pytest.raises(PredictionError, match="previous stage '3d_lowres' 2 one-hot channels"):
        load_trained_model(work, "3d_cascade_fullres")
    with pytest.raises(PredictionError, match="'3d_fullres' is no cascade"):
        load_trained_model(work, "3d_fullres")


def test_missing_things_are_named(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    with pytest.raises(PredictionError, match="fold 3"):
        predict_folder(model_dir, inputs, tmp_path, folds=[3], progress=False)
    with pytest.raises(PredictionError, match="3d_lowres"):
        predict_folder(model_dir, inputs, tmp_path, configuration="3d_lowres", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictionError, match="CASE_0000"):
        predict_folder(model_dir, tmp_path / "empty", tmp_path / "out", progress=False)


def test_latest_checkpoint_is_used_when_best_is_missing(tmp_path: Path, inputs: Path) -> None:
    work = tmp_path / "work"
    plan = make_plan()
    save_plan(plan, work / "plan.json")
    save_fold(work, plan, "3d_fullres", "all", checkpoint="checkpoint_latest.pt")
    with pytest.warns(UserWarning, match="checkpoint_best.pt: missing"):
        model = load_trained_model(work, folds=["all"])
    assert model.folds[0].checkpoint.name == "checkpoint_latest.pt"


# --- model archive --------------------------------------------------------------------------------------


def test_export_import_round_trip_predicts_identically(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    (model_dir / "models" / "3d_fullres" / "postprocessing.json").write_text(json.dumps(
        {"largest_component_foreground": False, "largest_component": {"liver": 1}, "crf": {"enabled": False}}))
    try:
        archive = export_model(model_dir, tmp_path / "model.zip")
        with zipfile.ZipFile(archive) as z:
            names = set(z.namelist())
        assert {"plan.json", "dataset.json", "fingerprint.json", "autoseg_model.json",
                "models/3d_fullres/postprocessing.json", "models/3d_fullres/fold_0/checkpoint_best.pt",
                "models/2d/fold_1/checkpoint_best.pt"} <= names
        imported = import_model(archive, tmp_path / "imported")
        original = predict_folder(model_dir, inputs, tmp_path / "a", tta=False, progress=False)
        again = predict_folder(imported, inputs, tmp_path / "b", tta=False, progress=False)
        for a, b in zip(original, again):
            np.testing.assert_array_equal(read_image(a).array, read_image(b).array)
    finally:
        (model_dir / "models" / "3d_fullres" / "postprocessing.json").unlink()


def test_export_only_some_configurations(model_dir: Path, tmp_path: Path) -> None:
    archive = export_model(model_dir, tmp_path / "m.zip", configurations=["2d"])
    with zipfile.ZipFile(archive) as z:
        assert not any(n.startswith("models/3d_fullres") for n in z.namelist())
    with pytest.raises(ModelArchiveError, match="3d_lowres"):
        export_model(model_dir, tmp_path / "n.zip", configurations=["3d_lowres"])


def test_export_of_a_cascade_brings_the_previous_stage(tmp_path: Path) -> None:
    work = make_model(tmp_path, cascade=True, folds=("0",))
    archive = export_model(work, tmp_path / "m.zip", configurations=["3d_cascade_fullres"])
    with zipfile.ZipFile(archive) as z:
        assert "models/3d_lowres/fold_0/checkpoint_best.pt" in z.namelist()


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "models/../../evil.txt", "C:/evil.txt"])
def test_import_refuses_path_traversal(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("plan.json", "{}")
        z.writestr("autoseg_model.json", json.dumps({"format": 1, "files": {}}))
        z.writestr(member, "x")
    with pytest.raises(ModelArchiveError, match="outside the destination"):
        import_model(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_import_refuses_a_non_empty_destination_and_corrupt_files(model_dir: Path, tmp_path: Path) -> None:
    archive = export_model(model_dir, tmp_path / "model.zip", configurations=["2d"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ModelArchiveError, match="not empty"):
        import_model(archive, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert import_model(archive, tmp_path / "empty") == tmp_path / "empty"
    assert (tmp_path / "empty" / "plan.json").is_file()

    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(tampered, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, data + b" " if info.filename == "plan.json" else data)
    with pytest.raises(ModelArchiveError, match="SHA-256"):
        import_model(tampered, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(ModelArchiveError, match="not a zip"):
        import_model(tmp_path / "full" / "keep.txt", tmp_path / "u")
