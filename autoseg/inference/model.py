"""Trained models: finding a configuration's trained folds and loading their networks for prediction.

A model folder is a work folder or an imported model (:mod:`autoseg.model_archive`): ``plan.json``
and ``models/<configuration>/fold_<k>/checkpoint_{best,latest}.pt``. :func:`load_trained_model`
loads the requested folds (their own recorded topology and schedule first), checks that they fit
the plan's labels and each other, reads the configuration's post-processing decision and, for a
cascade, loads the previous stage with the same folds. With ``runtime="onnx"`` or
``"torchscript"`` it loads the networks of a folder written by ``autoseg export-model --format
onnx|torchscript`` instead (:mod:`autoseg.inference.runtimes`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from autoseg.devices import resolve_device
from autoseg.errors import AutosegError
from autoseg.inference.runtimes import (
    NETWORK_FILES,
    RUNTIMES,
    ExportedNetwork,
    NetworkCallable,
    Runtime,
    load_exported_network,
)
from autoseg.labels import Activation, LabelInfo
from autoseg.networks import build_network
from autoseg.plan import Configuration, Plan, PlanError, Schedule, Topology, load_plan, plan_hash
from autoseg.postprocessing_steps import PostprocessingDecision, load_postprocessing
from autoseg.precision import Precision, resolve_precision
from autoseg.training.checkpoint import Checkpoint, read_checkpoint
from autoseg.training.validation import trained_mirror_axes
from autoseg.workdir import CHECKPOINT_BEST, CHECKPOINT_LATEST, CHECKPOINT_NAMES, WorkDir

CHECKPOINT_FILES = {"best": CHECKPOINT_BEST, "latest": CHECKPOINT_LATEST}

_TOPOLOGY = TypeAdapter(Topology)
_SCHEDULE = TypeAdapter(Schedule)


class PredictionError(AutosegError, RuntimeError):
    """Prediction cannot start, or some cases failed (``failures`` maps each to a message naming it).

    ``outputs`` lists the files of the cases that did succeed.
    """

    def __init__(self, message: str, failures: dict[str, str] | None = None,
                 outputs: list[Path] | None = None) -> None:
        self.failures = dict(failures or {})
        self.outputs = list(outputs or [])
        super().__init__(message)


@dataclass
class FoldModel:
    """One fold's network, ready for inference (``network``: a module, or any network callable)."""

    fold: str
    checkpoint: Path
    topology: Topology
    network: nn.Module | NetworkCallable
    mirror_axes: tuple[int, ...]


@dataclass
class TrainedModel:
    """The networks of one configuration's folds and what inference needs around them."""

    model_dir: Path
    plan: Plan
    configuration: Configuration
    folds: list[FoldModel]
    device: torch.device
    label_info: LabelInfo
    postprocessing: PostprocessingDecision | None = None
    previous: TrainedModel | None = None
    precision: Precision = "fp32"
    runtime: Runtime = "torch"

    @property
    def activation(self) -> Activation:
        return self.label_info.activation

    @property
    def is_regions(self) -> bool:
        return self.label_info.is_regions

    @property
    def label_values(self) -> tuple[tuple[int, ...], ...]:
        """Per output channel, the label values it stands for."""
        return self.label_info.values

    @property
    def label_names(self) -> tuple[str, ...]:
        """One name per output channel."""
        return self.label_info.names

    @property
    def num_outputs(self) -> int:
        return self.label_info.num_outputs

    @property
    def base_channels(self) -> int:
        """Input channels preprocessing makes: image channels plus CT prior channels."""
        return len(self.configuration.normalization) + len(self.configuration.ct_priors)

    @property
    def in_channels(self) -> int:
        return self.folds[0].topology.in_channels

    @property
    def cascade_channels(self) -> int:
        """One-hot channels of the previous stage a cascade-trained network takes (0: none)."""
        return self.in_channels - self.base_channels


def _fold_dir(model_dir: Path, configuration: str, fold: str) -> Path:
    return WorkDir(model_dir).fold(configuration, fold)


def _model_files(runtime: str) -> tuple[str, ...]:
    if runtime not in RUNTIMES:
        raise PredictionError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return CHECKPOINT_NAMES if runtime == "torch" else (NETWORK_FILES[runtime],)


def trained_folds(model_dir: str | os.PathLike, configuration: str, runtime: str = "torch") -> list[str]:
    """Folds (``"0"``, ``"1"``, ..., ``"all"``) of a configuration that have a checkpoint (or, for
    the ``onnx`` and ``torchscript`` runtimes, an exported network)."""
    return WorkDir(Path(model_dir)).folds(configuration, containing=_model_files(runtime))


def trained_configurations(model_dir: str | os.PathLike, runtime: str = "torch") -> list[str]:
    """Configurations of a model folder with at least one trained fold (for ``runtime``)."""
    folder = Path(model_dir) / "models"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and trained_folds(model_dir, p.name, runtime))


def _runtime_hint(model_dir: Path, runtime: str) -> str:
    """What to do when ``runtime`` finds nothing but another runtime would."""
    others = [r for r in RUNTIMES if r != runtime and trained_configurations(model_dir, r)]
    if not others:
        return ""
    if runtime == "torch":
        return f"; this folder holds {others[0]} networks: use --runtime {others[0]}"
    return (f"; this folder holds {others[0]} networks: use --runtime {others[0]}, or export "
            f"{runtime} networks with `autoseg export-model {model_dir} -o OUT --format {runtime}`")


def resolve_configuration(model_dir: Path, plan: Plan, configuration: str | None, runtime: str = "torch") -> str:
    trained = trained_configurations(model_dir, runtime)
    if configuration is not None:
        if configuration not in plan.configurations:
            raise PredictionError(f"{model_dir / 'plan.json'}: the plan has no configuration {configuration!r}; "
                                  f"it has {', '.join(plan.configurations)}")
        if configuration not in trained:
            raise PredictionError(f"{WorkDir(model_dir).models(configuration)}: configuration {configuration!r} "
                                  f"has no trained fold; trained: {', '.join(trained) or 'none'}"
                                  + _runtime_hint(model_dir, runtime))
        return configuration
    if not trained:
        wanted = "checkpoint_*.pt" if runtime == "torch" else NETWORK_FILES[runtime]
        raise PredictionError(f"{model_dir}: no trained model (no models/<configuration>/fold_<k>/{wanted})"
                              + (_runtime_hint(model_dir, runtime) or "; train one or import a model zip"))
    if plan.recommended_configuration in trained:
        return plan.recommended_configuration
    if "3d_fullres" in trained:
        return "3d_fullres"
    if len(trained) == 1:
        return trained[0]
    raise PredictionError(f"{model_dir}: several configurations are trained ({', '.join(trained)}); choose one "
                          "with -c")


def resolve_folds(model_dir: Path, configuration: str, folds: Sequence[int | str] | None,
                  runtime: str = "torch") -> list[str]:
    available = trained_folds(model_dir, configuration, runtime)
    if folds is None:
        return available
    wanted = []
    for fold in folds:
        name = "all" if str(fold) == "all" else str(int(fold))
        if name not in available:
            raise PredictionError(f"{_fold_dir(model_dir, configuration, name)}: fold {name} of {configuration!r} "
                                  f"is not trained; trained folds: {', '.join(available) or 'none'}")
        if name not in wanted:
            wanted.append(name)
    return wanted


def _checkpoint_path(fold_dir: Path, checkpoint: str) -> Path:
    if checkpoint not in CHECKPOINT_FILES:
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    path = fold_dir / CHECKPOINT_FILES[checkpoint]
    if path.is_file():
        return path
    other = fold_dir / CHECKPOINT_FILES["latest" if checkpoint == "best" else "best"]
    if checkpoint == "best" and other.is_file():
        warnings.warn(f"{path}: missing; using {other.name}", stacklevel=3)
        return other
    raise PredictionError(f"{path}: checkpoint does not exist")


def _fold_topology_and_schedule(state: Checkpoint, fold_dir: Path, configuration: Configuration,
                                source: Path) -> tuple[Topology, Schedule]:
    """The network's own topology and schedule: checkpoint first, then the fold's plan, then the plan."""
    topology, schedule = configuration.topology, configuration.schedule
    fold_plan = fold_dir / "plan.json"
    if fold_plan.is_file():
        try:
            effective = load_plan(fold_plan).configuration(configuration.name)
            topology, schedule = effective.topology, effective.schedule
        except PlanError as error:
            warnings.warn(f"{fold_plan}: ignored ({error})", stacklevel=3)
    try:
        if state.topology is not None:
            topology = _TOPOLOGY.validate_python(state.topology)
        if state.schedule is not None:
            schedule = _SCHEDULE.validate_python(state.schedule)
    except ValidationError as error:
        raise PredictionError(f"{source}: the recorded topology or schedule is invalid ({error})") from None
    return topology, schedule


def _load_exported_fold(model_dir: Path, plan: Plan, configuration: Configuration, fold: str,
                        runtime: Runtime, device: torch.device) -> FoldModel:
    """A fold written by ``autoseg export-model --format onnx|torchscript``."""
    fold_dir = _fold_dir(model_dir, configuration.name, fold)
    description = ExportedNetwork.load(fold_dir)
    path = fold_dir / NETWORK_FILES[runtime]
    try:
        topology = _TOPOLOGY.validate_python(description.topology)
        schedule = _SCHEDULE.validate_python(description.schedule)
    except ValidationError as error:
        raise PredictionError(f"{fold_dir / 'network.json'}: the recorded topology or schedule is invalid "
                              f"({error})") from None
    if description.plan_hash and description.plan_hash != plan_hash(plan):
        warnings.warn(f"{path}: exported with another plan.json (plan hash {description.plan_hash}, this model "
                      f"folder's is {plan_hash(plan)})", stacklevel=3)
    network = load_exported_network(fold_dir, runtime, device)
    return FoldModel(fold, path, topology, network, trained_mirror_axes(configuration, schedule))


def _load_fold(model_dir: Path, plan: Plan, configuration: Configuration, fold: str, checkpoint: str,
               device: torch.device, runtime: Runtime = "torch") -> FoldModel:
    if runtime != "torch":
        return _load_exported_fold(model_dir, plan, configuration, fold, runtime, device)
    fold_dir = _fold_dir(model_dir, configuration.name, fold)
    path = _checkpoint_path(fold_dir, checkpoint)
    state = read_checkpoint(path, map_location=device)
    topology, schedule = _fold_topology_and_schedule(state, fold_dir, configuration, path)
    recorded = state.plan_hash
    if recorded and recorded != plan_hash(plan):
        warnings.warn(f"{path}: trained with another plan.json (plan hash {recorded}, this model folder's is "
                      f"{plan_hash(plan)}); preprocessing may not match the training", stacklevel=3)
    network = build_network(topology)
    try:
        network.load_state_dict(state.network)
    except RuntimeError as error:
        raise PredictionError(f"{path}: the weights do not fit a {topology.arch} network of the recorded "
                              f"topology ({str(error).splitlines()[0]})") from None
    if hasattr(network, "set_deep_supervision"):
        network.set_deep_supervision(False)
    network.eval().to(device)
    return FoldModel(fold, path, topology, network, trained_mirror_axes(configuration, schedule))


def load_trained_model(model_dir: str | os.PathLike, configuration: str | None = None,
                       folds: Sequence[int | str] | None = None, checkpoint: str = "best",
                       device: str | torch.device = "cpu", cascade: bool = True,
                       precision: str = "auto", runtime: Runtime = "torch") -> TrainedModel:
    """Load the folds of a trained configuration from a work folder or an imported model folder.

    Args:
        model_dir: holds ``plan.json`` and ``models/<configuration>/fold_<k>/checkpoint_*.pt``.
        configuration: None: ``3d_fullres`` if trained, else the only trained configuration.
        folds: fold numbers (or ``"all"``); None: every trained fold.
        checkpoint: ``best`` (falls back to ``latest`` when a fold has no best) or ``latest``.
        device: where the networks live (``auto``: CUDA, MPS or CPU, :func:`autoseg.devices.resolve_device`).
        cascade: also load a cascade configuration's previous stage (False: the caller supplies
            the one-hot channels, as the end-of-fold validation does).
        precision: autocast precision of prediction (:func:`autoseg.precision.resolve_precision`);
            onnxruntime computes in float32 whatever is asked.
        runtime: ``torch`` (checkpoints), ``onnx`` or ``torchscript`` (an exported model folder).

    Raises:
        PredictionError: nothing trained, an unknown fold, or networks that do not fit the plan.
    """
    model_dir = Path(model_dir)
    device = resolve_device(device)
    plan = load_plan(model_dir)
    name = resolve_configuration(model_dir, plan, configuration, runtime)
    config = plan.configuration(name)
    fold_names = resolve_folds(model_dir, name, folds, runtime)
    if not fold_names:
        raise PredictionError(f"{WorkDir(model_dir).models(name)}: no trained fold")
    loaded = [_load_fold(model_dir, plan, config, fold, checkpoint, device, runtime) for fold in fold_names]
    info = LabelInfo.of(plan)
    for fold in loaded:
        if fold.topology.num_classes != info.num_outputs:
            raise PredictionError(f"{fold.checkpoint}: the network has {fold.topology.num_classes} outputs but the "
                                  f"plan's labels need {info.num_outputs} ({', '.join(info.names)})")
        if fold.topology.dim != config.dim:
            raise PredictionError(f"{fold.checkpoint}: a {fold.topology.dim}D network for the {config.dim}D "
                                  f"configuration {name!r}")
        if fold.topology.in_channels != loaded[0].topology.in_channels:
            raise PredictionError(f"{fold.checkpoint}: takes {fold.topology.in_channels} input channels, fold "
                                  f"{loaded[0].fold} takes {loaded[0].topology.in_channels}; ensemble folds of one kind")
    decision = load_postprocessing(WorkDir(model_dir).models(name))
    # onnxruntime ignores torch's autocast: it computes what the graph says (float32)
    model = TrainedModel(model_dir, plan, config, loaded, device, info, decision,
                         precision=resolve_precision(precision, device) if runtime != "onnx" else "fp32",
                         runtime=runtime)
    previous = _previous_stage(model, fold_names, checkpoint, load=cascade)
    model.previous = previous if cascade else None
    return model


def _previous_stage(model: TrainedModel, fold_names: Sequence[str], checkpoint: str,
                    load: bool = True) -> TrainedModel | None:
    """The previous stage of a cascade configuration (None for any other configuration, or not ``load``)."""
    config = model.configuration
    expected = len(model.label_info.cascade_values) if config.previous_stage else 0
    if model.cascade_channels != expected:
        raise PredictionError(f"{model.folds[0].checkpoint}: the network takes {model.in_channels} input channels; "
                              f"preprocessing gives {model.base_channels}"
                              + (f" and the previous stage {config.previous_stage!r} {expected} one-hot channels"
                                 if config.previous_stage else f" and configuration {config.name!r} is no cascade"))
    if not config.previous_stage or not load:
        return None
    previous_folds = trained_folds(model.model_dir, config.previous_stage, model.runtime)
    if not previous_folds:
        raise PredictionError(f"{WorkDir(model.model_dir).models(config.previous_stage)}: the cascade needs the "
                              f"previous stage {config.previous_stage!r}, which is not trained")
    # the previous stage's folds matching the cascade's (each fold's inputs came from the same split)
    same = [f for f in fold_names if f in previous_folds]
    return load_trained_model(model.model_dir, config.previous_stage, same or previous_folds, checkpoint,
                              model.device, cascade=True, precision=model.precision, runtime=model.runtime)
