"""Models that run without PyTorch: export to ONNX / TorchScript, predict through onnxruntime.

One small example model (the MRI example: four channels, a planned U-Net with deep supervision,
narrowed to 4 features per stage, seeded weights) is exported once per format; predictions by
the exported networks must agree with the torch ones on at least 99.9% of voxels.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
from test_predictor import example_model

from autoseg import cli
from autoseg.inference import PredictionError, Predictor, RuntimeMissingError, export_networks, predict_folder
from autoseg.inference.runtimes import NETWORK_FILES
from autoseg.model_archive import ModelArchiveError
from autoseg.plan import load_plan

PARITY = 0.999


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return example_model(tmp_path_factory.mktemp("mri"), "mri")


@pytest.fixture(scope="module")
def exported(example: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work, _ = example
    root = tmp_path_factory.mktemp("exported")
    return {fmt: export_networks(work, root / fmt, fmt) for fmt in ("onnx", "torchscript")}


def channels(images: Path) -> list[str]:
    return [str(p) for p in sorted(images.iterdir())]


@pytest.fixture(scope="module")
def torch_labels(example: tuple[Path, Path]) -> np.ndarray:
    work, images = example
    return sitk.GetArrayFromImage(Predictor.from_model(work, device="cpu").predict(channels(images)))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_networks_agree_with_torch(example: tuple[Path, Path], exported: dict[str, Path], fmt: str,
                                            torch_labels: np.ndarray) -> None:
    _, images = example
    runtime = Predictor.from_model(exported[fmt], device="cpu", runtime=fmt)
    assert runtime.model.runtime == fmt
    labels, probabilities = runtime.predict(channels(images), return_probabilities=True)
    array = sitk.GetArrayFromImage(labels)
    assert len(np.unique(torch_labels)) > 1
    assert np.mean(array == torch_labels) >= PARITY
    assert probabilities.shape[1:] == array.shape


def test_the_exported_folder_is_a_model_folder(example: tuple[Path, Path], exported: dict[str, Path]) -> None:
    work, _ = example
    folder = exported["onnx"]
    assert load_plan(folder) == load_plan(work)
    assert (folder / "dataset.json").read_text() == (work / "dataset.json").read_text()
    assert json.loads((folder / "autoseg_model.json").read_text())["configurations"] == {"3d_fullres": ["0"]}
    fold = folder / "models" / "3d_fullres" / "fold_0"
    assert sorted(p.name for p in fold.iterdir()) == ["network.json", NETWORK_FILES["onnx"]]
    # deep supervision off (the plan's network has it), batch and spatial axes dynamic
    assert load_plan(work).configuration("3d_fullres").topology.deep_supervision
    graph = onnx.load(str(fold / NETWORK_FILES["onnx"])).graph
    assert len(graph.output) == 1
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True, True]
    assert dims[1].dim_value == 4


def test_autoseg_predict_runs_onnx_like_torch(example: tuple[Path, Path], exported: dict[str, Path],
                                               tmp_path: Path) -> None:
    work, images = example
    from_torch = predict_folder(work, images, tmp_path / "torch", device="cpu", tta=False, progress=False)
    command = ["predict", str(exported["onnx"]), "-i", str(images), "-o", str(tmp_path / "onnx"), "--runtime", "onnx",
               "--no-tta", "--device", "cpu"]
    assert cli.main(command) == 0
    from_onnx = tmp_path / "onnx" / from_torch[0].name
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (from_torch[0], from_onnx))
    assert np.mean(a == b) >= PARITY


def test_the_cli_exports_and_names_the_runtime(example: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    work, _ = example
    assert cli.main(["export-model", str(work), "-o", str(tmp_path / "ts"), "--format", "torchscript"]) == 0
    assert "--runtime torchscript" in capsys.readouterr().out
    assert (tmp_path / "ts" / "models" / "3d_fullres" / "fold_0" / NETWORK_FILES["torchscript"]).is_file()


def test_a_missing_extra_is_one_line(example: tuple[Path, Path], exported: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work, _ = example
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["export-model", str(work), "-o", str(tmp_path / "out"), "--format", "onnx"]) == 1
    err = capsys.readouterr().err
    assert err == "autoseg export-model: error: onnx export needs the onnx extra: pip install 'autoseg[onnx]'\n"
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeMissingError, match=r"^the onnx runtime needs the onnx extra: pip install"):
        Predictor.from_model(exported["onnx"], device="cpu", runtime="onnx")


def test_the_wrong_runtime_for_a_folder_says_which_one_fits(example: tuple[Path, Path],
                                                            exported: dict[str, Path]) -> None:
    work, _ = example
    with pytest.raises(PredictionError, match="holds onnx networks: use --runtime onnx"):
        Predictor.from_model(exported["onnx"], device="cpu")
    with pytest.raises(PredictionError, match="export-model .* --format onnx"):
        Predictor.from_model(work, device="cpu", runtime="onnx")
    with pytest.raises(ModelArchiveError, match="not empty"):
        export_networks(work, exported["onnx"], "onnx")
    with pytest.raises(ModelArchiveError, match="unknown network format"):
        export_networks(work, exported["onnx"].parent / "x", "tflite")


def test_the_benchmark_measures_onnxruntime_on_the_cpu(example: tuple[Path, Path], tmp_path: Path) -> None:
    from autoseg.bench import run as bench

    work, images = example
    bench_work = tmp_path / "work"
    shutil.copytree(work, bench_work)
    # the benchmark predicts with the fold "all" of its own training, from checkpoint_latest
    fold = bench_work / "models" / "3d_fullres" / "fold_0"
    (fold / "checkpoint_best.pt").rename(fold / "checkpoint_latest.pt")
    fold.rename(fold.with_name("fold_all"))
    inputs = bench.inference_inputs(images.parent, tmp_path / "inputs", count=1)
    ctx = bench._Context(images.parent, bench_work, tmp_path / "stages", "cpu", 1, 1, 1, 1, {}, show=False)
    ctx.folder.mkdir()
    assert bench.onnx_comparable("cpu") and not bench.onnx_comparable("cuda")
    entry: dict = {}
    bench._measure_predict(ctx, "3d_fullres", "onnx_no_tta", inputs, entry, tta=False, runtime="onnx")
    assert not ctx.errors
    assert entry["onnx_no_tta"]["seconds_per_case"]["median"] > 0
    assert "predict 3d_fullres onnx-no-tta" in bench.format_report({"predict": {"configurations": {"3d_fullres": entry}}})


def test_the_cli_choices_are_the_library_names() -> None:
    from autoseg import constants
    from autoseg.inference import EXPORT_FORMATS, RUNTIMES

    assert constants.RUNTIME_NAMES == RUNTIMES
    assert constants.EXPORT_FORMAT_NAMES == EXPORT_FORMATS
