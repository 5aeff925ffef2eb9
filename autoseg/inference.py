"""Prediction: sliding-window inference, mirroring TTA, fold ensembles, results in the input's geometry.

``autoseg predict MODEL -i IN -o OUT`` is :func:`predict_folder`. Per case:

1. **Preprocess** with the model's plan (:func:`autoseg.preprocessing.preprocess_case`: canonical
   orientation, non-zero crop, resampling, CT prior channels, normalization).
2. **Sliding window** (:func:`sliding_window_predict`): tiles of the patch size, overlapping by
   ``1 - step`` of the patch, start positions spread evenly so the last tile ends at the edge
   (nnU-Net's rule), several tiles per forward pass. Each tile's softmax (or sigmoid) is weighted
   by a Gaussian importance map (sigma 1/8 of the patch, :func:`gaussian_importance_map`), since
   a network is least reliable at a tile's border; the weighted sum is divided by the summed
   weights. 2D configurations treat the Z axis as a stack of independent slices, batched.
3. **Test-time mirroring** along the axes the network was trained to be mirrored along (the
   schedule's ``mirror_axes`` unless the fold's augmentation switched mirroring off): every
   combination of flips, each prediction flipped back and averaged.
4. **Fold ensemble**: the probabilities of all requested folds are averaged.
5. **Cascade** (``3d_cascade_fullres``, whose ``previous_stage`` is ``3d_lowres``): the low-resolution
   stage (the same folds) is predicted first, its label map resampled to the full-resolution grid
   and appended as one-hot channels (:mod:`autoseg.cascade`), as in training.
6. **Post-processing** from ``models/<config>/postprocessing.json`` (:mod:`autoseg.postprocessing`):
   the CRF step on the probabilities, the largest-component steps on the label map, both in
   preprocessed space, where cross-validation decided them.
7. **Export**: un-resample, un-crop and un-orient with the same torch resampling as preprocessing
   (:func:`autoseg.preprocessing.restore_to_original`) and write ``CASE<ending>`` with
   :func:`autoseg.io.write_like`: identical shape, spacing, origin and direction to the input's
   first channel, and its file format.

Throughput and memory: a background thread pool preprocesses the next case and exports the previous
one while the network runs on the current one (at most one case waiting on each side). The
accumulators of a large volume on a GPU that cannot hold them in float32 fall back to float16,
and then to host memory. Cases with an existing output are skipped unless ``overwrite``.

Probabilities (``save_probabilities``) are written as ``CASE_probabilities.npz`` (one float32 array
``probabilities`` of shape ``(K, *input shape)``; no pickle) and ``CASE_probabilities.json``
(channel names, activation and geometry). The label map is resampled class by class from the
preprocessed-space label map (memory O(volume) whatever the number of classes), the probabilities
linearly, so a boundary voxel's label may differ from the argmax of the saved probabilities.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn
from tqdm.auto import tqdm

from autoseg.cascade import one_hot, previous_stage_values, to_stage_grid
from autoseg.dataset import (
    CHANNEL_SUFFIX,
    CaseFiles,
    DatasetError,
    DatasetJson,
    index_cases,
    load_case,
    load_dataset_json,
)
from autoseg.errors import AutosegError
from autoseg.io import SUPPORTED_ENDINGS, Image, ImageReadError, file_ending, write_like
from autoseg.model_archive import export_model, import_model
from autoseg.plan import Configuration, Plan, PlanError, Schedule, Topology, load_plan, plan_hash
from autoseg.postprocessing import (
    PROBABILITIES_SUFFIX,
    VALIDATION_DIR,
    CrfParams,
    apply_postprocessing,
    crf_refine,
    load_postprocessing,
    probabilities_to_label_map,
)
from autoseg.precision import Precision, autocast, resolve_precision
from autoseg.preprocessing import preprocess_case, restore_to_original
from autoseg.utils import atomic_write, atomic_write_json
from autoseg.workdir import WorkDir

Activation = Literal["softmax", "sigmoid", "none"]

CHECKPOINT_FILES = {"best": "checkpoint_best.pt", "latest": "checkpoint_latest.pt"}
FAST_STEP = 0.75
# Tiles per forward pass by default: as many as fit in about this many voxels (at least one).
_TILE_BATCH_VOXELS = 1 << 18
# Share of the free GPU memory the accumulators may take; the rest is for the network.
_ACCUMULATOR_GPU_SHARE = 0.4
# Smallest tile weight when accumulating in float16 (float16 resolves ~1e-3 relative near 1).
_HALF_WEIGHT_FLOOR = 2.0 ** -10

_TOPOLOGY = TypeAdapter(Topology)
_SCHEDULE = TypeAdapter(Schedule)

__all__ = [
    "FoldModel",
    "PredictionError",
    "TrainedModel",
    "export_model",
    "gaussian_importance_map",
    "import_model",
    "load_trained_model",
    "predict_folder",
    "predict_preprocessed",
    "predict_validation_probabilities",
    "sliding_window_predict",
    "tile_starts",
    "trained_configurations",
    "trained_folds",
    "trained_mirror_axes",
]


class PredictionError(AutosegError, RuntimeError):
    """Prediction cannot start, or some cases failed (``failures`` maps each to a message naming it).

    ``outputs`` lists the files of the cases that did succeed.
    """

    def __init__(self, message: str, failures: dict[str, str] | None = None,
                 outputs: list[Path] | None = None) -> None:
        self.failures = dict(failures or {})
        self.outputs = list(outputs or [])
        super().__init__(message)


# --- sliding window ---------------------------------------------------------------------------------


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8,
                            dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """Gaussian tile weights of ``patch_size``: sigma ``sigma_scale * patch`` per axis, maximum 1.

    Centred on the tile's geometric centre (``(p - 1) / 2``, so the map is mirror-symmetric, unlike
    nnU-Net's ``p // 2``), computed in float64, cast to ``dtype``; entries that underflow to zero
    are replaced by the smallest non-zero entry, so every voxel of a tile keeps some weight and the
    division by the summed weights is always defined.
    """
    if not patch_size or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be positive integers, got {tuple(patch_size)}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for size in patch_size:
        size = int(size)
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        profile = torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        weights = weights[..., None] * profile
    weights = (weights / weights.max()).to(dtype)
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights.to(device)


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net's rule).

    Per axis, the fewest tiles whose spacing is at most ``step * patch``, spread evenly from 0 to
    ``size - patch`` so the first tile starts at the first voxel and the last ends at the last.
    Every ``size`` must be at least its ``patch`` (pad first).
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if len(image_size) != len(patch_size):
        raise ValueError(f"image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in length")
    starts = []
    for size, patch in zip(image_size, patch_size):
        size, patch = int(size), int(patch)
        if size < patch:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the patch {tuple(patch_size)}; pad it")
        count = math.ceil((size - patch) / (patch * step)) + 1
        if count == 1:
            starts.append([0])
        else:
            spacing = (size - patch) / (count - 1)
            starts.append([int(round(spacing * i)) for i in range(count)])
    return starts


def _activate(logits: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "none":
        return logits
    raise ValueError(f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}")


def _mirror_combinations(dims: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``dims``, the empty one (no flip) first."""
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def _forward_tta(network: nn.Module, batch: torch.Tensor, mirror_dims: Sequence[int], activation: Activation,
                 precision: Precision) -> torch.Tensor:
    """Mean activated output over every mirrored copy of ``batch``, each flipped back."""
    combos = _mirror_combinations(mirror_dims)
    total: torch.Tensor | None = None
    for dims in combos:
        flipped = torch.flip(batch, dims) if dims else batch
        with autocast(batch.device, precision):
            output = network(flipped)
        if isinstance(output, (list, tuple)):  # deep supervision left on: the full resolution comes first
            output = output[0]
        output = _activate(output.float(), activation)
        if dims:
            output = torch.flip(output, dims)
        # Out of place: an identity-like network may hand back its (reused) input.
        total = output if total is None else total + output
    assert total is not None
    return total / len(combos) if len(combos) > 1 else total


def _choose_accumulator(voxels: int, channels: int, device: torch.device, dtype: torch.dtype | None,
                        accumulate_device: str | torch.device | None) -> tuple[torch.dtype, torch.device]:
    """float32 where it fits; on a GPU float16 for big volumes, then host memory for huge ones."""
    if accumulate_device is not None:
        target = torch.device(accumulate_device)
        return dtype or torch.float32, target
    if device.type != "cuda":
        return dtype or torch.float32, torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    budget = free * _ACCUMULATOR_GPU_SHARE
    weights_bytes = voxels * 4
    for candidate in ([dtype] if dtype is not None else [torch.float32, torch.float16]):
        size = torch.empty((), dtype=candidate).element_size()
        if channels * voxels * size + weights_bytes <= budget:
            return candidate, device
    return dtype or torch.float32, torch.device("cpu")


@torch.no_grad()
def sliding_window_predict(
    network: nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    step: float = 0.5,
    tta_axes: Sequence[int] = (),
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    output_channels: int | None = None,
    activation: Activation = "softmax",
    accumulate_dtype: torch.dtype | None = None,
    accumulate_device: str | torch.device | None = None,
    progress: bool = False,
    precision: Precision | None = None,
) -> torch.Tensor:
    """Probabilities of a whole image from overlapping, Gaussian-weighted tiles.

    Args:
        network: maps ``(B, C, *patch)`` to logits ``(B, K, *patch)`` (a list: its first entry);
            used as given (put it in eval mode and on ``device`` first).
        image: ``(C, Z, Y, X)`` or ``(C, Y, X)``; padded with zeros to at least the patch size
            (centred) and cropped back.
        patch_size: the network's patch, 3 entries, or 2 for a 2D network: then every Z slice of a
            ``(C, Z, Y, X)`` image is an independent 2D image (tiles of several slices are batched).
        step: tile spacing as a fraction of the patch (0.5: tiles overlap by half).
        tta_axes: the network's spatial axes (0-based, in patch order) to mirror along; every
            combination of flips is averaged.
        batch_size: tiles per forward pass; default as many as fit in ~262k voxels, at least one.
        device: where the network runs.
        output_channels: expected number of output channels (checked); None: the network's.
        activation: ``softmax``, ``sigmoid`` or ``none`` (average the raw outputs).
        accumulate_dtype: dtype of the summed predictions; default float32, or float16 on a GPU
            when float32 does not fit.
        accumulate_device: where the sums live; default ``device`` when they fit in
            :data:`_ACCUMULATOR_GPU_SHARE` of the free GPU memory, else the host.
        progress: show a progress bar over tile batches.
        precision: autocast precision of the forward passes (:mod:`autoseg.precision`); None:
            the device's best (``resolve_precision("auto", device)``). Probabilities are always
            summed in ``accumulate_dtype``.

    Returns:
        ``(K, *spatial)`` of the image's spatial shape, dtype ``accumulate_dtype``, on the
        accumulation device.
    """
    device = torch.device(device)
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = np.array(image)  # a read-only memory map: torch needs its own copy
    image = torch.as_tensor(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, Z, Y, X) or (C, Y, X), got shape {tuple(image.shape)}")
    flat_input = image.ndim == 3
    if flat_input:
        image = image[:, None]
    patch = tuple(int(p) for p in patch_size)
    net_dim = len(patch)
    if net_dim not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 entries, got {patch}")
    tile = patch if net_dim == 3 else (1, *patch)
    bad_axes = [a for a in tta_axes if not 0 <= int(a) < net_dim]
    if bad_axes:
        raise ValueError(f"tta_axes {list(tta_axes)}: {bad_axes} outside 0..{net_dim - 1}")
    mirror_dims = tuple(sorted({2 + int(a) for a in tta_axes}))

    spatial = tuple(int(s) for s in image.shape[1:])
    padded = tuple(max(s, t) for s, t in zip(spatial, tile))
    before = tuple((p - s) // 2 for s, p in zip(spatial, padded))
    if padded != spatial:
        pad: list[int] = []
        for s, p, b in zip(reversed(spatial), reversed(padded), reversed(before)):
            pad += [b, p - s - b]
        image = torch.nn.functional.pad(image, pad)
    if device.type == "cuda":
        image = image.to(device, non_blocking=True)

    starts = tile_starts(padded, tile, step)
    if net_dim == 2:
        starts[0] = list(range(padded[0]))  # every slice once, whatever the step
    positions = list(itertools.product(*starts))
    if batch_size is None:
        batch_size = max(1, _TILE_BATCH_VOXELS // math.prod(patch))
    gaussian = gaussian_importance_map(patch, device=device)
    precision = resolve_precision("auto", device) if precision is None else precision

    accumulator: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    tile_weights: torch.Tensor | None = None
    bar = tqdm(total=len(positions), desc="tiles", unit="tile", disable=not progress, leave=False)
    with bar:
        for first in range(0, len(positions), batch_size):
            chunk = positions[first:first + batch_size]
            windows = [tuple(slice(s, s + t) for s, t in zip(start, tile)) for start in chunk]
            batch = torch.stack([image[(slice(None), *window)] for window in windows])
            batch = batch.to(device, dtype=torch.float32, non_blocking=True)
            if net_dim == 2:
                batch = batch[:, :, 0]
            probabilities = _forward_tta(network, batch, mirror_dims, activation, precision)
            if tuple(probabilities.shape[2:]) != patch:
                raise ValueError(f"the network turned a {patch} tile into {tuple(probabilities.shape[2:])}")
            if accumulator is None:
                channels = int(probabilities.shape[1])
                if output_channels is not None and channels != output_channels:
                    raise ValueError(f"the network gives {channels} output channels, expected {output_channels}")
                dtype, where = _choose_accumulator(math.prod(padded), channels, device, accumulate_dtype,
                                                   accumulate_device)
                if dtype == torch.float16:
                    # Weighted probabilities near a tile's corner would underflow in half precision
                    # while their weights do not; a floor keeps both representable.
                    gaussian = gaussian.clamp_min(_HALF_WEIGHT_FLOOR)
                accumulator = torch.zeros((channels, *padded), dtype=dtype, device=where)
                weights = torch.zeros(padded, dtype=torch.float32, device=where)
                tile_weights = gaussian.to(where).reshape(tile)
            assert weights is not None and tile_weights is not None
            probabilities *= gaussian
            if net_dim == 2:
                probabilities = probabilities[:, :, None]
            probabilities = probabilities.to(accumulator.device, accumulator.dtype)
            for index, window in enumerate(windows):
                accumulator[(slice(None), *window)] += probabilities[index]
                weights[window] += tile_weights
            bar.update(len(chunk))
    assert accumulator is not None and weights is not None
    accumulator.div_(weights)
    del weights
    result = accumulator[(slice(None), *(slice(b, b + s) for b, s in zip(before, spatial)))]
    if padded != spatial:
        result = result.clone()  # release the padding
    return result[:, 0] if flat_input else result


# --- trained models --------------------------------------------------------------------------------


@dataclass
class FoldModel:
    """One fold's network, ready for inference."""

    fold: str
    checkpoint: Path
    topology: Topology
    network: nn.Module
    mirror_axes: tuple[int, ...]


@dataclass
class TrainedModel:
    """The networks of one configuration's folds and what inference needs around them."""

    model_dir: Path
    plan: Plan
    configuration: Configuration
    folds: list[FoldModel]
    device: torch.device
    label_values: tuple[tuple[int, ...], ...]
    label_names: tuple[str, ...]
    is_regions: bool
    postprocessing: dict[str, Any] | None = None
    previous: TrainedModel | None = None
    precision: Precision = "fp32"

    @property
    def activation(self) -> Literal["softmax", "sigmoid"]:
        return "sigmoid" if self.is_regions else "softmax"

    @property
    def num_outputs(self) -> int:
        return len(self.label_values)

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


def _fold_sort_key(name: str) -> tuple[int, int]:
    return (0, int(name)) if name.isdigit() else (1, 0)


def _fold_dir(model_dir: Path, configuration: str, fold: str) -> Path:
    return WorkDir(model_dir).fold(configuration, fold)


def trained_folds(model_dir: str | os.PathLike, configuration: str) -> list[str]:
    """Folds (``"0"``, ``"1"``, ..., ``"all"``) of a configuration that have a checkpoint."""
    folder = WorkDir(Path(model_dir)).models(configuration)
    if not folder.is_dir():
        return []
    names = [p.name[len("fold_"):] for p in folder.glob("fold_*") if p.is_dir()
             and any((p / f).is_file() for f in CHECKPOINT_FILES.values())]
    return sorted(names, key=_fold_sort_key)


def trained_configurations(model_dir: str | os.PathLike) -> list[str]:
    """Configurations of a model folder with at least one trained fold."""
    folder = Path(model_dir) / "models"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and trained_folds(model_dir, p.name))


def _resolve_configuration(model_dir: Path, plan: Plan, configuration: str | None) -> str:
    trained = trained_configurations(model_dir)
    if configuration is not None:
        if configuration not in plan.configurations:
            raise PredictionError(f"{model_dir / 'plan.json'}: the plan has no configuration {configuration!r}; "
                                  f"it has {', '.join(plan.configurations)}")
        if configuration not in trained:
            raise PredictionError(f"{WorkDir(model_dir).models(configuration)}: configuration {configuration!r} "
                                  f"has no trained fold; trained: {', '.join(trained) or 'none'}")
        return configuration
    if not trained:
        raise PredictionError(f"{model_dir}: no trained model (no models/<configuration>/fold_<k>/checkpoint_*.pt); "
                              "train one or import a model zip")
    if "3d_fullres" in trained:
        return "3d_fullres"
    if len(trained) == 1:
        return trained[0]
    raise PredictionError(f"{model_dir}: several configurations are trained ({', '.join(trained)}); choose one "
                          "with -c")


def _resolve_folds(model_dir: Path, configuration: str, folds: Sequence[int | str] | None) -> list[str]:
    available = trained_folds(model_dir, configuration)
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


def trained_mirror_axes(configuration: Configuration, schedule: Schedule | None = None) -> tuple[int, ...]:
    """The axes a network was trained to be mirrored along (none when its augmentation never mirrors)."""
    schedule = schedule or configuration.schedule
    axes: Sequence[int] = schedule.mirror_axes
    try:
        from autoseg.training.augment import augmentation_settings

        settings = augmentation_settings(schedule.augmentation, dict(schedule.augmentation_options))
        if settings.p_mirror == 0:
            return ()
        if settings.mirror_axes is not None:
            axes = settings.mirror_axes
    except (ImportError, ValueError):
        pass  # an unknown preset: the schedule's axes are the best information there is
    return tuple(sorted({int(a) for a in axes if 0 <= int(a) < configuration.dim}))


def _fold_topology_and_schedule(state: dict[str, Any], fold_dir: Path, configuration: Configuration,
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
        if state.get("topology") is not None:
            topology = _TOPOLOGY.validate_python(state["topology"])
        if state.get("schedule") is not None:
            schedule = _SCHEDULE.validate_python(state["schedule"])
    except ValidationError as error:
        raise PredictionError(f"{source}: the recorded topology or schedule is invalid ({error})") from None
    return topology, schedule


def _load_fold(model_dir: Path, plan: Plan, configuration: Configuration, fold: str, checkpoint: str,
               device: torch.device) -> FoldModel:
    from autoseg.networks import build_network
    from autoseg.training.checkpoint import load_checkpoint

    fold_dir = _fold_dir(model_dir, configuration.name, fold)
    path = _checkpoint_path(fold_dir, checkpoint)
    state = load_checkpoint(path, map_location=device)
    topology, schedule = _fold_topology_and_schedule(state, fold_dir, configuration, path)
    recorded = state.get("plan_hash")
    if recorded and recorded != plan_hash(plan):
        warnings.warn(f"{path}: trained with another plan.json (plan hash {recorded}, this model folder's is "
                      f"{plan_hash(plan)}); preprocessing may not match the training", stacklevel=3)
    network = build_network(topology)
    try:
        network.load_state_dict(state["network"])
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
                       precision: str = "auto") -> TrainedModel:
    """Load the folds of a trained configuration from a work folder or an imported model folder.

    Args:
        model_dir: holds ``plan.json`` and ``models/<configuration>/fold_<k>/checkpoint_*.pt``.
        configuration: None: ``3d_fullres`` if trained, else the only trained configuration.
        folds: fold numbers (or ``"all"``); None: every trained fold.
        checkpoint: ``best`` (falls back to ``latest`` when a fold has no best) or ``latest``.
        device: where the networks live.
        cascade: also load a cascade configuration's previous stage (False: the caller supplies
            the one-hot channels, as the end-of-fold validation does).
        precision: autocast precision of prediction (:func:`autoseg.precision.resolve_precision`).

    Raises:
        PredictionError: nothing trained, an unknown fold, or networks that do not fit the plan.
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    plan = load_plan(model_dir)
    name = _resolve_configuration(model_dir, plan, configuration)
    config = plan.configuration(name)
    fold_names = _resolve_folds(model_dir, name, folds)
    if not fold_names:
        raise PredictionError(f"{WorkDir(model_dir).models(name)}: no trained fold")
    loaded = [_load_fold(model_dir, plan, config, fold, checkpoint, device) for fold in fold_names]

    from autoseg.training.labels import LabelInfo

    info = LabelInfo.from_labels(plan.labels)
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
    model = TrainedModel(model_dir, plan, config, loaded, device, info.values, info.names, info.is_regions,
                         decision, precision=resolve_precision(precision, device))
    previous = _previous_stage(model, fold_names, checkpoint, load=cascade)
    model.previous = previous if cascade else None
    return model


def _previous_stage(model: TrainedModel, fold_names: Sequence[str], checkpoint: str,
                    load: bool = True) -> TrainedModel | None:
    """The previous stage of a cascade configuration (None for any other configuration, or not ``load``)."""
    config = model.configuration
    expected = len(previous_stage_values(model.plan.labels)) if config.previous_stage else 0
    if model.cascade_channels != expected:
        raise PredictionError(f"{model.folds[0].checkpoint}: the network takes {model.in_channels} input channels; "
                              f"preprocessing gives {model.base_channels}"
                              + (f" and the previous stage {config.previous_stage!r} {expected} one-hot channels"
                                 if config.previous_stage else f" and configuration {config.name!r} is no cascade"))
    if not config.previous_stage or not load:
        return None
    previous_folds = trained_folds(model.model_dir, config.previous_stage)
    if not previous_folds:
        raise PredictionError(f"{WorkDir(model.model_dir).models(config.previous_stage)}: the cascade needs the "
                              f"previous stage {config.previous_stage!r}, which is not trained")
    # the previous stage's folds matching the cascade's (each fold's inputs came from the same split)
    same = [f for f in fold_names if f in previous_folds]
    return load_trained_model(model.model_dir, config.previous_stage, same or previous_folds, checkpoint,
                              model.device, cascade=True, precision=model.precision)


# --- one case ----------------------------------------------------------------------------------------


def predict_preprocessed(model: TrainedModel, image: np.ndarray | torch.Tensor, step: float = 0.5,
                         tta: bool = True, batch_size: int | None = None, progress: bool = False,
                         accumulate_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fold-averaged probabilities ``(K, Z, Y, X)`` of a preprocessed image (cascade channels included).

    The result lives where the sliding window accumulated it (the model's device when it fits).
    """
    if isinstance(image, np.ndarray):
        # A read-only memory map is copied once here rather than per tile.
        image = np.asarray(image, dtype=np.float32) if image.flags.writeable else np.array(image, dtype=np.float32)
    image = torch.as_tensor(image)
    if image.shape[0] != model.in_channels:
        raise ValueError(f"image has {image.shape[0]} channels, the networks take {model.in_channels}")
    total: torch.Tensor | None = None
    for fold in model.folds:
        probabilities = sliding_window_predict(
            fold.network, image, model.configuration.patch_size, step=step,
            tta_axes=fold.mirror_axes if tta else (), batch_size=batch_size, device=model.device,
            output_channels=model.num_outputs, activation=model.activation, accumulate_dtype=accumulate_dtype,
            progress=progress, precision=model.precision)
        if total is None:
            total = probabilities
        else:
            total += probabilities.to(total.device, total.dtype)
            del probabilities
    assert total is not None
    if len(model.folds) > 1:
        total /= len(model.folds)
    return total


def _label_map(model: TrainedModel, probabilities: torch.Tensor) -> np.ndarray:
    return probabilities_to_label_map(probabilities, model.label_values, model.activation,
                                      model.plan.regions_class_order)


def _cascade_channels(model: TrainedModel, previous_labels: np.ndarray, previous_properties: dict,
                      properties: dict) -> np.ndarray:
    """The previous stage's label map on this stage's grid, one-hot (:mod:`autoseg.cascade`)."""
    labels = to_stage_grid(previous_labels, previous_properties, properties, device=model.device)
    return one_hot(labels, previous_stage_values(model.plan.labels))


# --- folders --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A preprocessed case waiting for the network (internal)."""

    case: CaseFiles
    image: np.ndarray
    properties: dict
    reference: Image
    previous: list[tuple[np.ndarray, dict]] = field(default_factory=list)


@dataclass
class _Outputs:
    label: Path
    probabilities: Path | None
    sidecar: Path | None


def _input_ending(input_dir: Path, dataset: DatasetJson | None) -> str:
    """The dataset's file ending when the folder has such files, else the most common supported one."""
    names = [p.name for p in input_dir.iterdir() if not p.name.startswith(".")]
    if dataset is not None and any(n.lower().endswith(dataset.file_ending.lower()) for n in names):
        return dataset.file_ending
    counts: Counter[str] = Counter()
    for name in names:
        ending = file_ending(name)
        if ending in SUPPORTED_ENDINGS and CHANNEL_SUFFIX.match(name[: -len(ending)]):
            counts[ending] += 1
    if not counts:
        raise PredictionError(f"{input_dir}: no image named CASE_0000<ending> with a supported ending "
                              f"({' '.join(SUPPORTED_ENDINGS)})")
    ending, _ = counts.most_common(1)[0]
    if len(counts) > 1:
        warnings.warn(f"{input_dir}: files of several formats ({', '.join(counts)}); predicting the {ending} ones",
                      stacklevel=3)
    return ending


def _outputs(output_dir: Path, case_id: str, ending: str, save_probabilities: bool) -> _Outputs:
    if not save_probabilities:
        return _Outputs(output_dir / f"{case_id}{ending}", None, None)
    return _Outputs(output_dir / f"{case_id}{ending}", output_dir / f"{case_id}{PROBABILITIES_SUFFIX}.npz",
                    output_dir / f"{case_id}{PROBABILITIES_SUFFIX}.json")


def _is_done(outputs: _Outputs) -> bool:
    return all(p is None or p.is_file() for p in (outputs.label, outputs.probabilities, outputs.sidecar))


def _failure(case: CaseFiles, error: BaseException) -> str:
    if isinstance(error, (ImageReadError, DatasetError)):  # these already name the file
        return f"{case.case_id}: {error}"
    files = ", ".join(str(p) for p in case.images)
    return f"{case.case_id} ({files}): {type(error).__name__}: {error}"


def _label_dtype(plan: Plan) -> type[np.integer]:
    values = [v for value in plan.labels.values() for v in (value if isinstance(value, tuple) else (value,))]
    return np.uint8 if max(values, default=0) < 256 else np.uint16


def _completed(function: Callable[..., Any], *args: Any) -> Future:
    """Run now and wrap the outcome in a finished future (``num_workers=0``: no threads)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except BaseException as error:  # handed to .result(), exactly as a pool would
        future.set_exception(error)
    return future


class _CasePipeline:
    """Preprocess, predict and export cases, overlapping the ends with the network (internal)."""

    def __init__(self, model: TrainedModel, step: float, tta: bool, progress: bool,
                 outputs: dict[str, _Outputs]) -> None:
        self.model = model
        self.step = step
        self.tta = tta
        self.progress = progress
        self.outputs = outputs
        self.label_dtype = _label_dtype(model.plan)
        decision = model.postprocessing or {}
        crf = decision.get("crf") or {}
        self.crf_params = CrfParams.from_dict(crf.get("params")) if crf.get("enabled") else None

    # runs in a worker thread
    def prepare(self, case: CaseFiles) -> _Prepared:
        data = load_case(case, load_label=False)
        device = self.model.device
        result = preprocess_case(data, self.model.plan, self.model.configuration.name, device=device)
        previous = []
        stage = self.model.previous
        while stage is not None:  # the cascade's earlier stages, nearest first
            earlier = preprocess_case(data, stage.plan, stage.configuration.name, device=device)
            previous.append((earlier.image, earlier.properties))
            stage = stage.previous
        return _Prepared(case, result.image, result.properties, data.reference, previous)

    # runs in the main thread: the network's turn
    def infer(self, prepared: _Prepared) -> tuple[np.ndarray, np.ndarray | None]:
        image = self._with_previous_stages(prepared)
        probabilities = predict_preprocessed(self.model, image, self.step, self.tta, progress=self.progress)
        if self.crf_params is not None:
            probabilities = crf_refine(probabilities, image[: self.model.base_channels], self.model.activation,
                                       self.crf_params, prepared.properties["spacing_after_resampling"],
                                       in_plane_only=self.model.configuration.dim == 2)
        labels = _label_map(self.model, probabilities)
        saved = None
        if self.outputs[prepared.case.case_id].probabilities is not None:
            saved = probabilities.float().cpu().numpy()
        return labels, saved

    def _with_previous_stages(self, prepared: _Prepared) -> np.ndarray:
        stages: list[TrainedModel] = []
        stage = self.model.previous
        while stage is not None:
            stages.append(stage)
            stage = stage.previous
        if not stages:
            return prepared.image
        # Earliest stage first; each stage's labels feed the next one's input.
        grids = [(prepared.image, prepared.properties)] + prepared.previous
        models = [self.model] + stages
        labels: np.ndarray | None = None
        for index in range(len(models) - 1, 0, -1):
            stage_model, (stage_image, stage_properties) = models[index], grids[index]
            if labels is not None:
                stage_image = np.concatenate([stage_image, _cascade_channels(
                    stage_model, labels, grids[index + 1][1], stage_properties)])
            probabilities = predict_preprocessed(stage_model, stage_image, self.step, self.tta, progress=self.progress)
            labels = _label_map(stage_model, probabilities)
            del probabilities
        assert labels is not None
        extra = _cascade_channels(self.model, labels, grids[1][1], prepared.properties)
        return np.concatenate([prepared.image, extra])

    # runs in a worker thread
    def export(self, prepared: _Prepared, labels: np.ndarray, probabilities: np.ndarray | None) -> Path:
        outputs = self.outputs[prepared.case.case_id]
        device = self.model.device
        labels = apply_postprocessing(labels, self.model.postprocessing)
        restored = restore_to_original(labels, prepared.properties, "label", device=device)
        write_like(restored.astype(self.label_dtype, copy=False), prepared.reference, outputs.label)
        if probabilities is not None and outputs.probabilities is not None and outputs.sidecar is not None:
            fill = 0.0 if self.model.is_regions else None
            full = restore_to_original(probabilities, prepared.properties, "probabilities", fill=fill, device=device)

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, probabilities=full.astype(np.float32, copy=False))

            atomic_write(outputs.probabilities, write)
            reference = prepared.reference
            atomic_write_json(outputs.sidecar, {
                "case_id": prepared.case.case_id,
                "array": "probabilities",
                "axes": "(channel, z, y, x)" if reference.ndim == 3 else "(channel, y, x)",
                "shape": list(full.shape),
                "channels": list(self.model.label_names),
                "activation": self.model.activation,
                "configuration": self.model.configuration.name,
                "folds": [f.fold for f in self.model.folds],
                "spacing": list(reference.spacing),
                "origin": list(reference.origin),
                "direction": list(reference.direction),
                "label_file": outputs.label.name,
            })
        return outputs.label


def predict_folder(
    model_dir: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    configuration: str | None = None,
    folds: Sequence[int | str] | None = None,
    device: str | torch.device = "cpu",
    tta: bool = True,
    step: float = 0.5,
    save_probabilities: bool = False,
    overwrite: bool = False,
    fast: bool = False,
    checkpoint: str = "best",
    num_workers: int = 2,
    progress: bool = True,
    precision: str = "auto",
) -> list[Path]:
    """Segment every case of a folder and write the results in the inputs' own geometry and format.

    Args:
        model_dir: a work folder or an imported model folder (``plan.json``, ``models/...``).
        input_dir: images named ``CASE_XXXX<ending>`` (as ``imagesTs``), any supported format.
        output_dir: receives ``CASE<ending>`` label maps (created if needed).
        configuration: None: ``3d_fullres`` if trained, else the only trained configuration.
        folds: folds to ensemble; None: every trained fold (``all`` counts as one).
        device: ``cpu`` or ``cuda`` (``cuda:1``, ...).
        tta: mirror test-time augmentation along the trained mirror axes.
        step: tile step as a fraction of the patch.
        save_probabilities: also write ``CASE_probabilities.npz`` and ``.json``.
        overwrite: redo cases whose outputs exist (default: skip them).
        fast: first available fold only, no TTA, step 0.75 (quick looks, CPU users).
        checkpoint: ``best`` or ``latest``.
        num_workers: background threads that preprocess the next case and export the previous one
            while the network runs; 0 does everything in turn in this thread.
        progress: progress bars (cases, and tiles of the current case).
        precision: ``auto`` (bfloat16 where the device computes it natively, else float32),
            ``fp32``, ``bf16`` or ``fp16`` (CUDA); see :mod:`autoseg.precision`.

    Returns:
        The label files of every case (written now or found from an earlier run).

    Raises:
        PredictionError: nothing to predict, a model that cannot be loaded, or failed cases (the
            message lists each with its file and problem; every other case is written).
    """
    model_dir, input_dir, output_dir = Path(model_dir), Path(input_dir), Path(output_dir)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictionError("device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if not input_dir.is_dir():
        raise PredictionError(f"{input_dir}: input folder does not exist")
    if fast:
        name = _resolve_configuration(model_dir, load_plan(model_dir), configuration)
        available = _resolve_folds(model_dir, name, folds)
        configuration, folds, tta, step = name, available[:1], False, FAST_STEP
    if not 0 < step <= 1:
        raise PredictionError(f"step must be in (0, 1], got {step}")
    model = load_trained_model(model_dir, configuration, folds, checkpoint, device, precision=precision)
    dataset_json_path = WorkDir(model_dir).dataset_json
    dataset = load_dataset_json(dataset_json_path) if dataset_json_path.is_file() else None
    ending = _input_ending(input_dir, dataset)
    index = index_cases(input_dir, ending, len(model.plan.channel_names))
    for problem in index.problems:
        warnings.warn(problem, stacklevel=2)
    if not index.cases:
        raise PredictionError(f"{input_dir}: no complete case (CASE_0000{ending} ... CASE_"
                              f"{len(model.plan.channel_names) - 1:04d}{ending})")
    outputs = {c.case_id: _outputs(output_dir, c.case_id, ending, save_probabilities) for c in index.cases}
    todo = [c for c in index.cases if overwrite or not _is_done(outputs[c.case_id])]
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline = _CasePipeline(model, step, tta, progress, outputs)
    failures = _run_pipeline(pipeline, todo, num_workers, progress)
    written = [outputs[c.case_id].label for c in index.cases if c.case_id not in failures]
    if failures:
        lines = "\n".join(f"- {message}" for message in failures.values())
        raise PredictionError(f"{len(failures)} of {len(index.cases)} case(s) could not be predicted (every other "
                              f"case is written to {output_dir}):\n{lines}", failures, written)
    return written


def _run_pipeline(pipeline: _CasePipeline, cases: Sequence[CaseFiles], num_workers: int,
                  progress: bool) -> dict[str, str]:
    """Cases in order; preparation of the next and export of the previous overlap the network."""
    failures: dict[str, str] = {}
    if not cases:
        return failures
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="autoseg-predict") if num_workers > 0 \
        else None

    def submit(function: Callable[..., Any], *args: Any) -> Future:
        return pool.submit(function, *args) if pool is not None else _completed(function, *args)

    upcoming = iter(cases)
    waiting: deque[tuple[CaseFiles, Future]] = deque()
    exporting: deque[tuple[CaseFiles, Future]] = deque()

    def queue_next() -> None:
        case = next(upcoming, None)
        if case is not None:
            waiting.append((case, submit(pipeline.prepare, case)))

    def finish_export() -> None:
        case, future = exporting.popleft()
        try:
            future.result()
        except Exception as error:
            failures[case.case_id] = _failure(case, error)

    bar = tqdm(total=len(cases), desc="predict", unit="case", disable=not progress)
    try:
        queue_next()
        while waiting:
            case, future = waiting.popleft()
            queue_next()  # the next case preprocesses while this one is predicted
            started = time.perf_counter()
            try:
                prepared = future.result()
                labels, probabilities = pipeline.infer(prepared)
            except Exception as error:
                failures[case.case_id] = _failure(case, error)
                bar.update(1)
                continue
            while len(exporting) >= 1:  # bounded: at most one export behind the network
                finish_export()
            exporting.append((case, submit(pipeline.export, prepared, labels, probabilities)))
            del prepared, labels, probabilities
            bar.set_postfix(case=case.case_id, seconds=f"{time.perf_counter() - started:.1f}")
            bar.update(1)
        while exporting:
            finish_export()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return failures


# --- validation probabilities (for post-processing decisions) ----------------------------------------


def predict_validation_probabilities(work_dir: str | os.PathLike, configuration: str, fold: int | str,
                                     checkpoint: str = "best", device: str | torch.device = "cpu",
                                     step: float = 0.5, tta: bool = True, overwrite: bool = False,
                                     progress: bool = True) -> list[Path]:
    """Write ``fold_k/validation/<case>_probabilities.npy`` (float16 ``(K, Z, Y, X)``, preprocessed space).

    The cases are the fold's validation predictions (``validation/<case>.npy``); images come from
    the configuration's preprocessed data (and, for a cascade, the previous-stage predictions it
    was validated with). Used by :func:`autoseg.postprocessing.find_postprocessing` to
    evaluate the CRF step. Existing files are kept unless ``overwrite``.
    """
    work = WorkDir(Path(work_dir))
    model = load_trained_model(work.root, configuration, [fold], checkpoint, device, cascade=False)
    folder = work.fold(configuration, str(fold)) / VALIDATION_DIR
    case_ids = sorted(p.stem for p in folder.glob("*.npy")
                      if not p.name.startswith(".") and not p.stem.endswith(PROBABILITIES_SUFFIX))
    if not case_ids:
        raise PredictionError(f"{folder}: no validation predictions (<case>.npy); train the fold to the end first")
    written = []
    for case_id in tqdm(case_ids, desc=f"validation probabilities fold {fold}", disable=not progress, leave=False):
        target = folder / f"{case_id}{PROBABILITIES_SUFFIX}.npy"
        written.append(target)
        if target.is_file() and not overwrite:
            continue
        source = work.preprocessed(model.configuration.data_name) / f"{case_id}.npy"
        try:
            image = np.load(source, mmap_mode="r", allow_pickle=False)
            if model.cascade_channels:  # the stored inputs the fold was validated with
                from autoseg.training.previous_stage import PreviousStage

                stage = PreviousStage.of(work, model.plan, configuration)
                source = stage.folder / f"{case_id}.npy"
                image = np.concatenate([image, stage.one_hot(stage.load(case_id))])
        except (OSError, ValueError) as error:
            raise PredictionError(f"{source}: cannot be read ({error})") from None
        probabilities = predict_preprocessed(model, image, step, tta).float().cpu().numpy().astype(np.float16)
        atomic_write(target, lambda tmp, array=probabilities: np.save(tmp, array))
    return written
