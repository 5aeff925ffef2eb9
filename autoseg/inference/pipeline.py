"""One case at a time: preprocess, predict (fold ensemble, cascade stages), post-process, export.

:func:`predict_preprocessed` averages the folds' sliding-window probabilities of a preprocessed
image. :class:`CasePipeline` does the rest for :func:`autoseg.inference.predict_folder`: a
background thread pool preprocesses the next case and exports the previous one while the network
runs on the current one (at most one case waiting on each side, :func:`run_pipeline`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from autoseg.cascade import one_hot, to_stage_grid
from autoseg.case_properties import CaseProperties
from autoseg.dataset import CaseFiles, DatasetError, load_case
from autoseg.inference.model import TrainedModel
from autoseg.io import Image, ImageReadError, write_like
from autoseg.postprocessing_steps import apply_postprocessing, crf_refine
from autoseg.preprocessing import preprocess_case
from autoseg.restore import restore_to_original
from autoseg.sliding_window import sliding_window_predict
from autoseg.utils import atomic_write, atomic_write_json


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


def _cascade_channels(model: TrainedModel, previous_labels: np.ndarray, previous_properties: CaseProperties,
                      properties: CaseProperties) -> np.ndarray:
    """The previous stage's label map on this stage's grid, one-hot (:mod:`autoseg.cascade`)."""
    labels = to_stage_grid(previous_labels, previous_properties, properties, device=model.device)
    return one_hot(labels, model.label_info.cascade_values)


@dataclass
class PreparedCase:
    """A preprocessed case waiting for the network (internal)."""

    case: CaseFiles
    image: np.ndarray
    properties: CaseProperties
    reference: Image
    previous: list[tuple[np.ndarray, CaseProperties]] = field(default_factory=list)


@dataclass
class CaseOutputs:
    label: Path
    probabilities: Path | None
    sidecar: Path | None


def _failure(case: CaseFiles, error: BaseException) -> str:
    if isinstance(error, (ImageReadError, DatasetError)):  # these already name the file
        return f"{case.case_id}: {error}"
    files = ", ".join(str(p) for p in case.images)
    return f"{case.case_id} ({files}): {type(error).__name__}: {error}"


def _completed(function: Callable[..., Any], *args: Any) -> Future:
    """Run now and wrap the outcome in a finished future (``num_workers=0``: no threads)."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except BaseException as error:  # handed to .result(), exactly as a pool would
        future.set_exception(error)
    return future


class CasePipeline:
    """Preprocess, predict and export cases, overlapping the ends with the network (internal)."""

    def __init__(self, model: TrainedModel, step: float, tta: bool, progress: bool,
                 outputs: dict[str, CaseOutputs]) -> None:
        self.model = model
        self.step = step
        self.tta = tta
        self.progress = progress
        self.outputs = outputs
        decision = model.postprocessing
        self.crf_params = decision.crf.params if decision is not None and decision.crf.enabled else None

    # runs in a worker thread
    def prepare(self, case: CaseFiles) -> PreparedCase:
        data = load_case(case, load_label=False)
        device = self.model.device
        result = preprocess_case(data, self.model.plan, self.model.configuration.name, device=device)
        previous = []
        stage = self.model.previous
        while stage is not None:  # the cascade's earlier stages, nearest first
            earlier = preprocess_case(data, stage.plan, stage.configuration.name, device=device)
            previous.append((earlier.image, earlier.properties))
            stage = stage.previous
        return PreparedCase(case, result.image, result.properties, data.reference, previous)

    # runs in the main thread: the network's turn
    def infer(self, prepared: PreparedCase) -> tuple[np.ndarray, np.ndarray | None]:
        image = self._with_previous_stages(prepared)
        probabilities = predict_preprocessed(self.model, image, self.step, self.tta, progress=self.progress)
        if self.crf_params is not None:
            probabilities = crf_refine(probabilities, image[: self.model.base_channels], self.model.activation,
                                       self.crf_params, prepared.properties.spacing_after_resampling,
                                       in_plane_only=self.model.configuration.dim == 2)
        labels = self.model.label_info.decode(probabilities)
        saved = None
        if self.outputs[prepared.case.case_id].probabilities is not None:
            saved = probabilities.float().cpu().numpy()
        return labels, saved

    def _with_previous_stages(self, prepared: PreparedCase) -> np.ndarray:
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
            labels = stage_model.label_info.decode(probabilities)
            del probabilities
        assert labels is not None
        extra = _cascade_channels(self.model, labels, grids[1][1], prepared.properties)
        return np.concatenate([prepared.image, extra])

    # runs in a worker thread
    def export(self, prepared: PreparedCase, labels: np.ndarray, probabilities: np.ndarray | None) -> Path:
        outputs = self.outputs[prepared.case.case_id]
        device = self.model.device
        labels = apply_postprocessing(labels, self.model.postprocessing)
        restored = restore_to_original(labels, prepared.properties, "label", device=device)
        write_like(restored.astype(self.model.label_info.file_dtype, copy=False), prepared.reference, outputs.label)
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


def run_pipeline(pipeline: CasePipeline, cases: Sequence[CaseFiles], num_workers: int,
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
