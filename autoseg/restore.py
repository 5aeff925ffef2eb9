"""Back from preprocessed space: a prediction on the original image grid (:func:`restore_to_original`).

The exact inverse of :func:`autoseg.preprocessing.preprocess_case` for predictions: un-resample to
the cropped shape (the same slow-axis treatment as the forward pass, the same torch resampling),
un-crop, un-orient, back to the array as read (a 2D case comes back 2D). Everything it needs is in
the case's sidecar ``properties``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from autoseg.case_properties import CaseProperties
from autoseg.orientation import to_canonical
from autoseg.resampling import resample_label, resample_probabilities

__all__ = ["box_slices", "restore_to_original"]


def box_slices(box: Sequence[Sequence[int]]) -> tuple[slice, ...]:
    """The slices of a ``[[start, stop], ...]`` box (a sidecar's ``crop_bbox``)."""
    return tuple(slice(int(a), int(b)) for a, b in box)


def restore_to_original(array: np.ndarray, properties: CaseProperties, kind: Literal["label", "probabilities"],
                        fill: float | Sequence[float] | None = None, order: int | None = None,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """Map a label or probabilities in preprocessed space back to the original array.

    Un-resamples to the cropped shape (same slow-axis treatment as the forward pass), un-crops
    and un-orients, giving the array as it was read: ``(Z, Y, X)`` / ``(K, Z, Y, X)``, or
    ``(Y, X)`` / ``(K, Y, X)`` for a 2D case, ready for :func:`autoseg.io.write_like`.

    Args:
        array: label ``(Z, Y, X)`` (integers; negative values, the "outside the non-zero region"
            marker, become 0) or probabilities/logits ``(K, Z, Y, X)``.
        properties: the case's sidecar (from :func:`autoseg.preprocessing.preprocess_case` or ``<case>.json``).
        kind: ``"label"`` or ``"probabilities"``.
        fill: value outside the crop box. Default: label 0; probabilities background (channel 0)
            1 and others 0, as for softmax outputs. Give 0 for region (sigmoid) outputs, or one
            value per channel.
        order: interpolation order; default for labels the plan's ``label_order`` (per-class
            linear: the forward path mirrored, which restores upsampled cases exactly; 0 is a plain
            nearest-neighbour lookup), for probabilities linear (1).
        device: torch device for the resampling.
    """
    shape_resampled = tuple(properties.shape_after_resampling)
    crop_shape = tuple(properties.shape_after_crop)
    full_shape = tuple(properties.shape_canonical)
    options = properties.resampling
    common = {"new_shape": crop_shape, "slow_axis": options.slow_axis,
              "separate_slow_axis": options.slow_axis is not None,
              "slow_axis_order": options.slow_axis_order, "device": device}
    spacing_from = properties.spacing_after_resampling
    spacing_to = properties.spacing_canonical
    crop = box_slices(properties.crop_bbox)
    transform = properties.orientation
    # The result is allocated in the original orientation and filled through its canonical view,
    # so un-orienting costs no copy.
    original_shape = [0, 0, 0]
    for canonical_axis, original_axis in enumerate(transform["axes"]):
        original_shape[original_axis] = int(full_shape[canonical_axis])
    if kind == "label":
        if array.shape != shape_resampled:
            raise ValueError(f"case {properties.case_id}: label of shape {array.shape}, expected the "
                             f"preprocessed shape {shape_resampled}")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"case {properties.case_id}: a label must be integers, got {array.dtype}")
        if array.size and array.min() < 0:
            array = np.maximum(array, 0)
        order = options.label_order if order is None else order
        restored = resample_label(array, spacing_from, spacing_to, order=order, **common)
        out = np.full(original_shape, 0 if fill is None else fill, dtype=restored.dtype)
        to_canonical(out, transform)[crop] = restored
        del restored
    elif kind == "probabilities":
        if array.ndim != 4 or array.shape[1:] != shape_resampled:
            raise ValueError(f"case {properties.case_id}: probabilities of shape {array.shape}, "
                             f"expected (K, *{shape_resampled})")
        channels = array.shape[0]
        if fill is None:
            fill_values = np.zeros(channels, dtype=np.float32)
            fill_values[0] = 1.0
        else:
            fill_values = np.broadcast_to(np.asarray(fill, dtype=np.float32), (channels,))
        out = np.empty((channels, *original_shape), dtype=np.float32)
        out[...] = fill_values[:, None, None, None]
        resample_probabilities(array, spacing_from, spacing_to, order=1 if order is None else order,
                               out=to_canonical(out, transform)[(slice(None), *crop)], **common)
    else:
        raise ValueError(f"kind must be 'label' or 'probabilities', got {kind!r}")
    if properties.is_2d:
        out = out[..., 0, :, :]
    return out
