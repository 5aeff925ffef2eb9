"""Networks for deployment without training code: ``autoseg export-model W -o OUT --format onnx|torchscript``.

The output is a model folder in the work folder's layout, with each fold's checkpoint replaced by
its network in the chosen format::

    autoseg_model.json                    format, configurations and folds
    plan.json  dataset.json  fingerprint.json
    models/<configuration>/postprocessing.json, splits.json
    models/<configuration>/fold_<k>/network.onnx   (or network_torchscript.pt)
    models/<configuration>/fold_<k>/network.json   topology, schedule, plan hash (what the checkpoint recorded)

:class:`autoseg.Predictor` (``runtime="onnx"`` / ``"torchscript"``) and ``autoseg predict --runtime``
run it with the same preprocessing, sliding window, mirroring, ensembling and export as a checkpoint.
Each network is exported with deep supervision off (one output, the full resolution) and with the
batch and spatial axes dynamic, so any tile size the network's strides allow, and any batch, runs.
torch's own exporters write the files (``torch.onnx.export``, ``torch.jit.trace``); each export is
checked against the torch network on a tile before it is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn

from autoseg.inference.model import load_trained_model, trained_configurations, trained_folds
from autoseg.inference.runtimes import (
    NETWORK_FILES,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ExportedNetwork,
    load_exported_network,
    require_onnx,
)
from autoseg.model_archive import CONFIGURATION_FILES, MANIFEST, TOP_FILES, ModelArchiveError
from autoseg.plan import Schedule, Topology, load_plan, plan_hash
from autoseg.training.checkpoint import read_checkpoint

EXPORT_FORMATS = ("zip", "onnx", "torchscript")
ONNX_OPSET = 18
# Largest difference of logits between the exported and the torch network on the check tile.
MAX_LOGIT_DIFFERENCE = 1e-3

_TOPOLOGY = TypeAdapter(Topology)
_SCHEDULE = TypeAdapter(Schedule)


def export_networks(work_dir: str | os.PathLike, out_dir: str | os.PathLike, format: str = "onnx",
                    configurations: Sequence[str] | None = None, checkpoint: str = "best") -> Path:
    """Write every fold's network of a trained model as ONNX or TorchScript into a new model folder.

    Args:
        work_dir: the work folder (or an imported model folder).
        out_dir: the folder to create (must not exist, or be empty); written under a temporary
            name and renamed at the end.
        format: ``onnx`` or ``torchscript``.
        configurations: default every trained one; a cascade stage brings its previous stage.
        checkpoint: ``best`` (``latest`` where a fold has no best) or ``latest``.

    Returns:
        The model folder.

    Raises:
        RuntimeMissingError: ``onnx`` without the onnx extra installed.
        ModelArchiveError: no trained configuration, an unknown one, or a non-empty ``out_dir``.
    """
    if format not in ("onnx", "torchscript"):
        raise ModelArchiveError(f"unknown network format {format!r}; choose onnx or torchscript (or zip with "
                                "export_model)")
    if format == "onnx":
        # torch's exporter writes with onnx; each export is checked with onnxruntime
        require_onnx("onnx export", ("onnx", "onnxruntime"))
    work, out = Path(work_dir), Path(out_dir)
    if not (work / "plan.json").is_file():
        raise ModelArchiveError(f"{work / 'plan.json'}: missing; {work} is not a work or model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelArchiveError(f"{out}: already exists and is not empty; choose a new folder")
    wanted = _configurations(work, configurations)
    plan = load_plan(work)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".exporting", dir=out.parent))
    try:
        for name in TOP_FILES:
            if (work / name).is_file():
                shutil.copyfile(work / name, staging / name)
        folds_by_configuration: dict[str, list[str]] = {}
        for name in wanted:
            source = work / "models" / name
            target = staging / "models" / name
            target.mkdir(parents=True)
            for file_name in CONFIGURATION_FILES:
                if (source / file_name).is_file():
                    shutil.copyfile(source / file_name, target / file_name)
            folds_by_configuration[name] = trained_folds(work, name)
            for fold in folds_by_configuration[name]:
                _export_fold(work, plan, name, fold, checkpoint, format, staging)
        manifest = {"format": format, "configurations": folds_by_configuration}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace cannot rename onto a directory
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def _configurations(work: Path, configurations: Sequence[str] | None) -> list[str]:
    trained = trained_configurations(work)
    wanted = list(configurations) if configurations else list(trained)
    if not wanted:
        raise ModelArchiveError(f"{work / 'models'}: no trained configuration to export")
    plan = load_plan(work)
    for name in list(wanted):
        if name not in trained:
            raise ModelArchiveError(f"{work / 'models' / name}: configuration {name!r} has no trained fold; "
                                    f"trained: {', '.join(trained) or 'none'}")
        previous = plan.configuration(name).previous_stage
        if previous and previous not in wanted:
            if previous not in trained:
                raise ModelArchiveError(f"{work / 'models' / previous}: {name!r} is a cascade stage that needs "
                                        f"{previous!r}, which is not trained")
            wanted.append(previous)
    return wanted


def _export_fold(work: Path, plan, configuration: str, fold: str, checkpoint: str, format: str,
                 staging: Path) -> None:
    model = load_trained_model(work, configuration, [fold], checkpoint, "cpu", cascade=False, precision="fp32")
    loaded = model.folds[0]
    network = loaded.network
    assert isinstance(network, nn.Module)
    state = read_checkpoint(loaded.checkpoint, map_location="cpu")
    fold_dir = staging / "models" / configuration / loaded.checkpoint.parent.name
    fold_dir.mkdir(parents=True)
    path = fold_dir / NETWORK_FILES[format]
    example = _example_tile(model.in_channels, model.configuration.patch_size)
    if format == "onnx":
        _to_onnx(network, example, path)
    else:
        _to_torchscript(network, example, path)
    _check(network, path, format, example, loaded.checkpoint)
    schedule = state.schedule if state.schedule is not None else _SCHEDULE.dump_python(
        model.configuration.schedule, mode="json")
    ExportedNetwork(format=format, file=path.name, fold=fold, configuration=configuration,
                    topology=_TOPOLOGY.dump_python(loaded.topology, mode="json"), schedule=schedule,
                    plan_hash=plan_hash(plan)).save(fold_dir)


def _example_tile(in_channels: int, patch_size: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, in_channels, *patch_size), generator=generator)


def _to_onnx(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript-based exporter: it evaluates the networks' Python-side input-size check once
    # at trace time, where torch.export would specialise every axis on it and refuse dynamic ones.
    axes = {0: "batch"} | {axis: f"spatial_{axis - 2}" for axis in range(2, example.ndim)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and trace notes
        torch.onnx.export(network, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_axes={ONNX_INPUT: axes, ONNX_OUTPUT: axes}, opset_version=ONNX_OPSET,
                          dynamo=False)


def _to_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # trace warnings about Python values frozen into the graph
        traced = torch.jit.trace(network, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _check(network: nn.Module, path: Path, format: str, example: torch.Tensor, source: Path) -> None:
    """The exported network gives the torch network's logits on the example tile and on a larger one."""
    larger = torch.cat([example, example.flip(-1)], dim=-1)  # another spatial size: the axes are dynamic
    exported = load_exported_network(path.parent, format, torch.device("cpu"))
    for tile in (example, larger):
        with torch.no_grad():
            expected = network(tile)
            got = exported(tile)
        if isinstance(expected, (list, tuple)):
            expected = expected[0]
        difference = float(np.abs(np.asarray(got, dtype=np.float32) - expected.numpy()).max()) \
            if got.shape == expected.shape else float("inf")
        if difference > MAX_LOGIT_DIFFERENCE:
            raise ModelArchiveError(f"{source}: the {format} export of this network differs from it on a "
                                    f"{tuple(tile.shape[2:])} tile (largest logit difference {difference:.3g}, "
                                    f"shape {tuple(got.shape)} against {tuple(expected.shape)})")
