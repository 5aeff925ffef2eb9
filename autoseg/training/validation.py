"""End of a fold: predict the whole validation cases and score them per class.

Predictions and scores live in preprocessed space (the resampled, cropped grid the network sees),
so they need no geometry and can be compared with ``<case>_seg.npy`` directly. Each validation case
is written as ``validation/<case>.npy`` (int16 label values, for later post-processing decisions)
and ``validation/summary.json`` holds Dice, IoU, HD95 (and the other metrics of
:mod:`autoseg.evaluation`) per case and class, with their summary over cases.

Prediction is what ``autoseg predict`` does in preprocessed space: the sliding window of
:func:`autoseg.sliding_window.sliding_window_predict` (Gaussian-weighted tiles overlapping by half)
with mirroring along the axes the network was trained to be mirrored along
(:func:`trained_mirror_axes`, which inference uses too), using the weights at the end of training
(as nnU-Net validates with its final checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoseg import evaluation
from autoseg.labels import LabelInfo
from autoseg.plan import Configuration, Schedule
from autoseg.sliding_window import sliding_window_predict
from autoseg.training.augment import augmentation_settings
from autoseg.training.data import PreprocessedDataset, PreviousStageInput
from autoseg.utils import atomic_write, atomic_write_json

STEP = 0.5  # tile spacing as a fraction of the patch, autoseg predict's default


def trained_mirror_axes(configuration: Configuration, schedule: Schedule | None = None) -> tuple[int, ...]:
    """The axes a network was trained to be mirrored along (none when its augmentation never mirrors)."""
    schedule = schedule or configuration.schedule
    axes: Sequence[int] = schedule.mirror_axes
    try:
        settings = augmentation_settings(schedule.augmentation, dict(schedule.augmentation_options))
        if settings.p_mirror == 0:
            return ()
        if settings.mirror_axes is not None:
            axes = settings.mirror_axes
    except ValueError:
        pass  # an unknown preset: the schedule's axes are the best information there is
    return tuple(sorted({int(a) for a in axes if 0 <= int(a) < configuration.dim}))


def predict_and_score(network: nn.Module, configuration: Configuration, dataset: PreprocessedDataset,
                      case_ids: Sequence[str], label_info: LabelInfo, output_dir: str | os.PathLike,
                      device: torch.device, regions_class_order: Sequence[int] | None = None,
                      progress: bool = True, previous_stage: PreviousStageInput | None = None) -> None:
    """Predict ``case_ids`` as ``autoseg predict`` would and write ``output_dir/<case>.npy`` (label values).

    A cascade stage gets ``previous_stage``: its stored predictions become the extra input channels.
    ``regions_class_order`` (the plan's) is needed for region labels when ``label_info`` lacks it.
    """
    if regions_class_order is not None:
        label_info = dataclasses.replace(label_info, regions_class_order=tuple(regions_class_order))
    output_dir = Path(output_dir)
    mirror_axes = trained_mirror_axes(configuration)
    network.eval()
    for case_id in tqdm(case_ids, desc="validation cases", disable=not progress, leave=False):
        image, _ = dataset.load(case_id)
        parts = [image]
        if previous_stage is not None:
            parts.append(previous_stage.one_hot(previous_stage.load(case_id)))
        image = np.concatenate(parts, dtype=np.float32)  # one in-memory copy of the memory map
        with torch.no_grad():
            probabilities = sliding_window_predict(
                network, image, configuration.patch_size, step=STEP,
                tta_axes=mirror_axes, device=device, output_channels=label_info.num_outputs,
                activation=label_info.activation)
        prediction = label_info.decode(probabilities).astype(np.int16)
        atomic_write(output_dir / f"{case_id}.npy", lambda tmp, p=prediction: np.save(tmp, p))


def summarize_validation(dataset: PreprocessedDataset, case_ids: Sequence[str], labels: dict[str, Any],
                         spacing: Sequence[float], output_dir: str | os.PathLike,
                         ignore_value: int | None = None) -> dict[str, Any]:
    """Score the predictions in ``output_dir`` against the preprocessed labels; write ``summary.json``.

    ``spacing`` is used for cases whose sidecar lacks ``spacing_after_resampling``.
    """
    output_dir = Path(output_dir)
    selected = evaluation.select_labels(labels, ignore_label=ignore_value)
    rows = []
    for case_id in case_ids:
        prediction = np.load(output_dir / f"{case_id}.npy", allow_pickle=False)
        _, reference = dataset.load(case_id)
        reference = np.where(np.asarray(reference) < 0, 0, reference)  # -1: background outside the mask
        # the case's own grid spacing when preprocessing recorded it (2D cases keep their z spacing)
        case_spacing = tuple(dataset.properties(case_id).spacing_after_resampling)
        if reference.shape[0] == 1:  # a 2D case: its metrics are 2D (z has no neighbours to border)
            prediction, reference, case_spacing = prediction[0], reference[0], case_spacing[1:]
        rows += evaluation.evaluate_case(prediction, reference, case_spacing, selected, case_id,
                                         ignore_label=ignore_value)
    summary = {
        "space": "preprocessed (resampled and cropped) grid",
        "cases": list(case_ids),
        "summary": evaluation.summarize(rows),  # per label and metric: mean, median, std, counts
        "per_case": rows,
        "metric_definitions": evaluation.METRIC_DEFINITIONS,
    }
    atomic_write_json(output_dir / "summary.json", summary)
    return summary
