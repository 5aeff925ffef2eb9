"""autoseg.Predictor: images in memory give what ``autoseg predict`` writes for the same file.

The threshold model of test_inference (a pointwise network whose right answer is known) covers
the inputs, geometry, probabilities, threads and zips; the example datasets (ct, mri with four
channels, 2d) cover the acceptance test of issue 15 with real networks and plans.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydantic import TypeAdapter
from test_inference import (  # noqa: F401  (threshold_network: the fixture that registers the test network)
    SPACING,
    expected_labels,
    make_model,
    threshold_network,
    write_cases,
)

import autoseg
from autoseg.examples import make_example
from autoseg.inference import PredictionError, Predictor, export_model, predict_folder
from autoseg.io import read_image
from autoseg.networks import build_network
from autoseg.plan import Schedule, Topology, plan_hash
from autoseg.planning import plan_dataset
from autoseg.training.checkpoint import save_checkpoint
from autoseg.workdir import WorkDir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    write_cases(folder)
    return folder


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor.from_model(model_dir, configuration="3d_fullres", device="cpu")


def assert_same_image(result: sitk.Image, path: Path) -> None:
    """Labels and geometry identical to the file ``autoseg predict`` wrote."""
    written = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(written))
    assert result.GetSize() == written.GetSize()
    assert result.GetSpacing() == pytest.approx(written.GetSpacing(), abs=1e-6)
    assert result.GetOrigin() == pytest.approx(written.GetOrigin(), abs=1e-6)
    assert result.GetDirection() == pytest.approx(written.GetDirection(), abs=1e-9)


def test_every_kind_of_input_gives_the_folder_result(predictor: Predictor, model_dir: Path, inputs: Path,
                                                      tmp_path: Path) -> None:
    written = predict_folder(model_dir, inputs, tmp_path, configuration="3d_fullres", progress=False, device="cpu")
    for output in written:
        source = inputs / output.name.replace(".nii.gz", "_0000.nii.gz")
        image = read_image(source)
        results = [
            predictor.predict(source),
            predictor.predict(str(source)),
            predictor.predict(sitk.ReadImage(str(source))),
            predictor.predict([sitk.ReadImage(str(source))]),
            predictor.predict(image.array, spacing=image.spacing, origin=image.origin, direction=image.direction),
            predictor.predict(image.array[None], spacing=image.spacing, origin=image.origin,
                              direction=image.direction),
        ]
        for result in results:
            assert_same_image(result, output)
        agreement = np.mean(sitk.GetArrayFromImage(results[0]) == expected_labels(image.array))
        assert agreement > 0.95


def test_probabilities_match_the_saved_ones(predictor: Predictor, model_dir: Path, inputs: Path,
                                            tmp_path: Path) -> None:
    predict_folder(model_dir, inputs, tmp_path, configuration="3d_fullres", progress=False, device="cpu",
                   save_probabilities=True)
    source = inputs / "case_000_0000.nii.gz"
    labels, probabilities = predictor.predict(source, return_probabilities=True)
    saved = np.load(tmp_path / "case_000_probabilities.npz")["probabilities"]
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (3, *sitk.GetArrayFromImage(labels).shape)
    np.testing.assert_allclose(probabilities, saved, atol=1e-6)


def test_a_numpy_array_without_geometry_gets_identity_and_the_same_labels(predictor: Predictor,
                                                                           inputs: Path) -> None:
    image = read_image(inputs / "case_000_0000.nii.gz")
    plain = predictor.predict(image.array, spacing=image.spacing)
    assert plain.GetOrigin() == (0.0, 0.0, 0.0)
    assert plain.GetDirection() == tuple(np.eye(3).ravel())
    assert plain.GetSpacing() == pytest.approx(tuple(reversed(SPACING)))


def test_inputs_that_do_not_fit_are_refused_clearly(predictor: Predictor, inputs: Path) -> None:
    array = read_image(inputs / "case_000_0000.nii.gz").array
    with pytest.raises(PredictionError, match="needs its spacing"):
        predictor.predict(array)
    with pytest.raises(PredictionError, match="takes 1 channel"):
        predictor.predict(np.stack([array, array]), spacing=SPACING)
    with pytest.raises(PredictionError, match="2D image"):
        predictor.predict(array[0], spacing=SPACING[1:])
    with pytest.raises(PredictionError, match="go with a numpy array"):
        predictor.predict(inputs / "case_000_0000.nii.gz", spacing=SPACING)
    with pytest.raises(PredictionError, match="cannot predict a dict"):
        predictor.predict({"image": array})
    with pytest.raises(autoseg.AutosegError, match="does not exist"):
        predictor.predict(inputs / "missing_0000.nii.gz")


def test_a_2d_configuration_predicts_2d_and_3d_arrays(model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_model(model_dir, configuration="2d", device="cpu", tta=False)
    written = predict_folder(model_dir, inputs, tmp_path, configuration="2d", progress=False, device="cpu",
                             tta=False)
    assert_same_image(predictor.predict(inputs / "case_000_0000.nii.gz"), written[0])
    image = read_image(inputs / "case_000_0000.nii.gz")
    flat = predictor.predict(image.array[4], spacing=image.spacing[1:])
    assert flat.GetDimension() == 2
    assert np.mean(sitk.GetArrayFromImage(flat) == expected_labels(image.array[4])) > 0.95


def test_two_threads_share_one_predictor_one_at_a_time(predictor: Predictor, inputs: Path) -> None:
    source = inputs / "case_001_0000.nii.gz"
    expected = sitk.GetArrayFromImage(predictor.predict(source))
    network = predictor.model.folds[0].network
    inside, most = [0], [0]
    guard = threading.Lock()

    def watched(batch: torch.Tensor) -> torch.Tensor:
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)  # long enough for the other thread to arrive if nothing held it back
        try:
            return network(batch)
        finally:
            with guard:
                inside[0] -= 1

    results: dict[int, np.ndarray] = {}

    def run(index: int) -> None:
        results[index] = sitk.GetArrayFromImage(predictor.predict(source))

    predictor.model.folds[0].network = watched
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        predictor.model.folds[0].network = network
    assert most[0] == 1
    assert len(results) == 2 and all(np.array_equal(r, expected) for r in results.values())


def test_a_model_zip_is_unpacked_for_the_predictor_and_removed_on_close(model_dir: Path, inputs: Path,
                                                                         tmp_path: Path) -> None:
    archive = export_model(model_dir, tmp_path / "model.zip", configurations=["3d_fullres"])
    with Predictor.from_model(archive, folds=[0], device="cpu", tta=False) as predictor:
        unpacked = predictor.model.model_dir
        assert unpacked.is_dir() and "3d_fullres" in repr(predictor)
        labels = predictor.predict(inputs / "case_000_0000.nii.gz")
    assert not unpacked.exists()
    written = predict_folder(archive, inputs, tmp_path / "out", folds=[0], tta=False, progress=False)
    assert_same_image(labels, written[0])


@pytest.mark.parametrize("kind", ["regions", "cascade"])
def test_regions_and_the_cascade_take_the_same_path(kind: str, inputs: Path, tmp_path: Path) -> None:
    work = make_model(tmp_path, regions=kind == "regions", cascade=kind == "cascade", folds=("0",))
    name = "3d_cascade_fullres" if kind == "cascade" else "3d_fullres"
    written = predict_folder(work, inputs, tmp_path / "out", configuration=name, device="cpu", tta=False,
                             progress=False)
    predictor = Predictor.from_model(work, configuration=name, device="cpu", tta=False)
    if kind == "cascade":
        assert predictor.model.previous is not None
    for output in written:
        source = inputs / output.name.replace(".nii.gz", "_0000.nii.gz")
        assert_same_image(predictor.predict(source), output)


def test_device_auto_resolves_to_what_torch_has(model_dir: Path) -> None:
    predictor = Predictor.from_model(model_dir, configuration="3d_fullres", folds=[0])
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert predictor.model.device.type == expected


# --- acceptance: the example datasets with real networks --------------------------------------------

EXAMPLES = {"ct": "3d_fullres", "mri": "3d_fullres", "2d": "2d"}  # kind -> configuration


def example_model(root: Path, kind: str) -> tuple[Path, Path]:
    """A planned example dataset with one fold of seeded random weights (equality, not accuracy, is tested).

    The network is the plan's with 4 features per stage: the checkpoint's topology is the one
    inference builds, and a narrow network keeps the test fast on a CPU.
    """
    configuration = EXAMPLES[kind]
    dataset = make_example(root / "raw", kind=kind, num_cases=1, num_test_cases=1)
    work = root / "work"
    plan = plan_dataset(dataset, work, n_jobs=1, progress=False, preset="cpu", configurations=[configuration])
    config = plan.configuration(configuration)
    topology = dataclasses.replace(config.topology, features_per_stage=(4,) * len(config.topology.features_per_stage))
    torch.manual_seed(0)
    network = build_network(topology)
    save_checkpoint(WorkDir(work).fold(configuration, 0) / "checkpoint_best.pt", {
        "network": network.state_dict(),
        "topology": TypeAdapter(Topology).dump_python(topology, mode="json"),
        "schedule": TypeAdapter(Schedule).dump_python(config.schedule, mode="json"),
        "configuration": configuration, "fold": "0", "plan_hash": plan_hash(plan),
    })
    return work, dataset / "imagesTs"


# mirroring once, on the MRI example: the folder's summary measures the mirrored copies, which must
# change nothing (it once ran them as separate windows: 4% of the voxels differed)
@pytest.mark.parametrize("kind, tta", [*((kind, False) for kind in EXAMPLES), ("mri", True)])
def test_in_memory_equals_autoseg_predict_on_the_examples(kind: str, tta: bool, tmp_path: Path) -> None:
    work, images = example_model(tmp_path, kind)
    case_id = sorted(images.iterdir())[0].name.rsplit("_", 1)[0]
    written = predict_folder(work, images, tmp_path / "out", tta=tta, device="cpu", progress=False)
    predictor = Predictor.from_model(work, tta=tta, device="cpu")
    channels = sorted(images.glob(f"{case_id}_*"))
    images_in_memory = [read_image(path) for path in channels]
    arrays = np.stack([image.array for image in images_in_memory])
    first = images_in_memory[0]
    result = predictor.predict(arrays if len(channels) > 1 else arrays[0], spacing=first.spacing,
                               origin=first.origin, direction=first.direction)
    assert len(written) == 1 and written[0].name.startswith(case_id)
    reference = read_image(written[0])
    got = sitk.GetArrayFromImage(result)
    assert got.shape == reference.array.shape
    assert np.array_equal(got, reference.array)
    assert len(np.unique(got)) > 1  # a network that predicts something, so equality means something
    assert tuple(reversed(result.GetSpacing())) == pytest.approx(reference.spacing)
    if first.ndim == 3:  # PNG stores no geometry
        assert result.GetOrigin() == pytest.approx(reference.origin)
        assert result.GetDirection() == pytest.approx(reference.direction)
    if len(channels) > 1:  # the list-of-files input, on the four MRI channels
        from_files = predictor.predict([str(path) for path in channels])
        assert np.array_equal(sitk.GetArrayFromImage(from_files), got)


# --- devices -----------------------------------------------------------------------------------------


def test_resolve_device_picks_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoseg import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    with pytest.raises(devices.DeviceError, match="torch sees no CUDA device; use --device auto or cpu"):
        devices.resolve_device("cuda")
    with pytest.raises(devices.DeviceError, match="Apple MPS is not available"):
        devices.resolve_device("mps")
    with pytest.raises(devices.DeviceError, match="unknown device 'gpu'"):
        devices.resolve_device("gpu")
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("AUTO") == torch.device("cuda")


def test_commands_with_device_default_to_auto_and_say_what_they_chose(model_dir: Path, inputs: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from autoseg import cli

    parser = cli.build_parser()
    for command in (["plan", "d"], ["train", "w", "-c", "2d", "-f", "0"], ["predict", "m", "-i", "i", "-o", "o"],
                    ["benchmark"]):
        assert parser.parse_args(command).device == "auto", command
    code = cli.main(["predict", str(model_dir), "-i", str(inputs), "-o", str(tmp_path), "-c", "2d", "-f", "0",
                     "--fast"])
    assert code == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device: ") and first.endswith("(auto)")
