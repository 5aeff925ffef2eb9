"""End of a fold: predict the whole validation cases and score them per class.

Predictions and scores live in preprocessed space (the resampled, cropped grid the network sees),
so they need no geometry and can be compared with ``<case>_seg.npy`` directly. Each validation case
is written as ``validation/<case>.npy`` (int16 label values, for later post-processing decisions)
and ``validation/summary.json`` holds Dice, IoU, HD95 (and the other metrics of
:mod:`autoseg.evaluation`) per case and class, with their summary over cases.

Prediction is one forward pass over the whole case (2D configurations: slice by slice), padded to
a size the network accepts. (To switch to ``autoseg.inference.sliding_window_predict`` once it
exists: replace :func:`predict_whole_case`.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoseg import evaluation
from autoseg.networks import valid_input_size
from autoseg.plan import Configuration
from autoseg.training.data import PreprocessedDataset
from autoseg.training.labels import LabelInfo
from autoseg.utils import atomic_write, atomic_write_json

SLICES_PER_BATCH = 8


def logits_to_labels(logits: torch.Tensor, label_info: LabelInfo,
                     regions_class_order: Sequence[int] | None = None) -> np.ndarray:
    """``(C, *spatial)`` logits to a label map of raw label values (int16).

    Softmax outputs: the value of the arg-max channel. Region outputs: each region above 0.5
    probability (logit > 0) paints its ``regions_class_order`` value, in region order, so later
    (inner) regions overwrite earlier (outer) ones, as nnU-Net does.
    """
    if label_info.is_regions:
        if regions_class_order is None or len(regions_class_order) != label_info.num_outputs:
            raise ValueError(f"region outputs need regions_class_order with {label_info.num_outputs} entries, "
                             f"got {regions_class_order}")
        labels = torch.zeros(logits.shape[1:], dtype=torch.int16, device=logits.device)
        for channel, value in enumerate(regions_class_order):
            labels[logits[channel] > 0] = int(value)
        return labels.cpu().numpy()
    values = torch.tensor([v[0] for v in label_info.values], dtype=torch.int16, device=logits.device)
    return values[logits.argmax(0)].cpu().numpy()


@torch.no_grad()
def predict_whole_case(network: nn.Module, configuration: Configuration, image: np.ndarray,
                       device: torch.device) -> torch.Tensor:
    """Logits ``(C, Z, Y, X)`` of a preprocessed image ``(C, Z, Y, X)`` in one pass (2D: per slice)."""
    topology = configuration.topology
    network.eval()
    autocast = torch.autocast(device.type, enabled=device.type == "cuda")
    if topology.dim == 3:
        batch = torch.from_numpy(np.array(image, dtype=np.float32))[None]
        with autocast:
            return _forward_padded(network, topology, batch.to(device))[0].float()
    slices = []
    for start in range(0, image.shape[1], SLICES_PER_BATCH):
        chunk = torch.from_numpy(np.array(image[:, start:start + SLICES_PER_BATCH], dtype=np.float32))
        with autocast:
            slices.append(_forward_padded(network, topology, chunk.movedim(1, 0).to(device)).float())
    return torch.cat(slices).movedim(0, 1)


def _forward_padded(network: nn.Module, topology: Any, batch: torch.Tensor) -> torch.Tensor:
    spatial = tuple(batch.shape[2:])
    size = valid_input_size(topology, spatial)
    pad: list[int] = []
    for have, want in zip(reversed(spatial), reversed(size)):
        pad += [0, want - have]
    output = network(torch.nn.functional.pad(batch, pad))
    if isinstance(output, (list, tuple)):
        output = output[0]
    return output[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


def predict_and_score(network: nn.Module, configuration: Configuration, dataset: PreprocessedDataset,
                      case_ids: Sequence[str], label_info: LabelInfo, output_dir: str | os.PathLike, device: torch.device,
                      regions_class_order: Sequence[int] | None = None, progress: bool = True) -> None:
    """Predict ``case_ids`` and write ``output_dir/<case>.npy`` (label values) for each."""
    output_dir = Path(output_dir)
    for case_id in tqdm(case_ids, desc="validation cases", disable=not progress, leave=False):
        image, _ = dataset.load(case_id)
        logits = predict_whole_case(network, configuration, image, device)
        prediction = logits_to_labels(logits, label_info, regions_class_order)
        atomic_write(output_dir / f"{case_id}.npy", lambda tmp, p=prediction: np.save(tmp, p))


def summarize_validation(dataset: PreprocessedDataset, case_ids: Sequence[str], labels: dict[str, Any],
                         spacing: Sequence[float], output_dir: str | os.PathLike,
                         ignore_value: int | None = None) -> dict[str, Any]:
    """Score the predictions in ``output_dir`` against the preprocessed labels; write ``summary.json``."""
    output_dir = Path(output_dir)
    selected = evaluation.select_labels(labels, ignore_label=ignore_value)
    rows = []
    for case_id in case_ids:
        prediction = np.load(output_dir / f"{case_id}.npy", allow_pickle=False)
        _, reference = dataset.load(case_id)
        reference = np.where(np.asarray(reference) < 0, 0, reference)  # -1: background outside the mask
        case_spacing = tuple(spacing)
        if reference.shape[0] == 1:  # a 2D case: its metrics are 2D (z has no neighbours to border)
            prediction, reference, case_spacing = prediction[0], reference[0], case_spacing[1:]
        rows += evaluation.evaluate_case(prediction, reference, case_spacing, selected, case_id,
                                         ignore_label=ignore_value)
    summary = {
        "space": "preprocessed (resampled and cropped) grid",
        "spacing": list(spacing),
        "cases": list(case_ids),
        "mean": evaluation.summarize(rows),
        "per_case": rows,
        "metric_definitions": evaluation.METRIC_DEFINITIONS,
    }
    atomic_write_json(output_dir / "summary.json", summary)
    return summary
