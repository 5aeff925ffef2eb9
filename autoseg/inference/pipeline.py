"""The pieces every prediction shares: the fold ensemble of a preprocessed image, and the threads.

:func:`predict_preprocessed` averages the folds' sliding-window probabilities of a preprocessed
image. :func:`run_pipeline` runs any :class:`CaseStages` (for :func:`autoseg.inference.predict_folder`:
read and preprocess, infer, restore and write) over a list of cases: a background thread pool
prepares the next case and exports the previous one while the network runs on the current one (at
most one case waiting on each side). What happens to one case is :class:`autoseg.inference.Predictor`'s.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from autoseg.cascade import one_hot, to_stage_grid
from autoseg.case_properties import CaseProperties
from autoseg.dataset import CaseFiles, DatasetError
from autoseg.inference.model import TrainedModel
from autoseg.io import Image, ImageReadError
from autoseg.sliding_window import sliding_window_predict


class Members(Protocol):
    """Receives a prediction's members (:class:`autoseg.trust.CaseMembers`): every tile batch's
    mirrored copies (flipped back) with the tiles' weights, then each fold's probabilities, then the
    ensemble's mean."""

    def mirror_tiles(self, copies: Sequence[torch.Tensor], weights: torch.Tensor) -> None: ...

    def fold(self, probabilities: torch.Tensor) -> None: ...

    def ensemble(self, probabilities: torch.Tensor) -> None: ...


def predict_preprocessed(model: TrainedModel, image: np.ndarray | torch.Tensor, step: float = 0.5,
                         tta: bool = True, batch_size: int | None = None, progress: bool = False,
                         accumulate_dtype: torch.dtype | None = None, members: Members | None = None) -> torch.Tensor:
    """Fold-averaged probabilities ``(K, Z, Y, X)`` of a preprocessed image (cascade channels included).

    The result lives where the sliding window accumulated it (the model's device when it fits).
    ``members`` (for the trust measures) is shown every fold's probabilities and, with ``tta``, every
    tile batch's mirrored copies inside the sliding window: the same forward passes, the same result.
    """
    if isinstance(image, np.ndarray):
        # A read-only memory map is copied once here rather than per tile.
        image = np.asarray(image, dtype=np.float32) if image.flags.writeable else np.array(image, dtype=np.float32)
    image = torch.as_tensor(image)
    if image.shape[0] != model.in_channels:
        raise ValueError(f"image has {image.shape[0]} channels, the networks take {model.in_channels}")
    total: torch.Tensor | None = None
    for fold in model.folds:
        window = dict(step=step, batch_size=batch_size, device=model.device, output_channels=model.num_outputs,
                      activation=model.activation, accumulate_dtype=accumulate_dtype, progress=progress,
                      precision=model.precision)
        probabilities = sliding_window_predict(fold.network, image, model.configuration.patch_size,
                                               tta_axes=fold.mirror_axes if tta else (),
                                               on_mirrors=None if members is None else members.mirror_tiles,
                                               **window)
        if members is not None:
            members.fold(probabilities)
        if total is None:
            total = probabilities
        else:
            total += probabilities.to(total.device, total.dtype)
            del probabilities
    assert total is not None
    if len(model.folds) > 1:
        total /= len(model.folds)
    if members is not None:
        members.ensemble(total)
    return total


def cascade_channels(model: TrainedModel, previous_labels: np.ndarray, previous_properties: CaseProperties,
                      properties: CaseProperties) -> np.ndarray:
    """The previous stage's label map on this stage's grid, one-hot (:mod:`autoseg.cascade`)."""
    labels = to_stage_grid(previous_labels, previous_properties, properties, device=model.device)
    return one_hot(labels, model.label_info.cascade_values)


@dataclass
class PreparedCase:
    """A preprocessed case waiting for the network (internal)."""

    case_id: str
    image: np.ndarray
    properties: CaseProperties
    reference: Image
    previous: list[tuple[np.ndarray, CaseProperties]] = field(default_factory=list)


class CaseStages(Protocol):
    """What :func:`run_pipeline` runs per case: ``prepare`` and ``export`` in worker threads,
    ``infer`` (the network's turn) in the calling thread."""

    def prepare(self, case: CaseFiles) -> PreparedCase: ...

    def infer(self, prepared: PreparedCase) -> tuple[np.ndarray, np.ndarray | None]: ...

    def export(self, prepared: PreparedCase, labels: np.ndarray, probabilities: np.ndarray | None) -> Path: ...


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


def run_pipeline(pipeline: CaseStages, cases: Sequence[CaseFiles], num_workers: int,
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
