"""The cascade's input convention, shared by training and inference.

A cascade stage (``3d_cascade_fullres``, whose ``previous_stage`` is ``3d_lowres``) takes, after
its image and CT prior channels, the previous stage's prediction as one-hot channels: one per
foreground class in ascending label value, or one per region in ``dataset.json`` order for region
labels (background and ignore have none). The previous stage's label map is first brought from its
own preprocessed grid to the cascade's (the same crop, another spacing) with the label resampling
of :mod:`autoseg.resampling`.

Training feeds the previous stage's cross-validation predictions through this
(:mod:`autoseg.training.previous_stage`), inference its prediction of the test case
(:mod:`autoseg.inference`), so both see the same channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autoseg.case_properties import CaseProperties
from autoseg.labels import LabelInfo
from autoseg.resampling import resample_label


def previous_stage_values(labels: Mapping[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Per one-hot channel, the label values it marks (``plan.labels`` or ``dataset.json`` labels).

    >>> previous_stage_values({"background": 0, "b": 2, "a": 1, "ignore": 9})
    ((1,), (2,))
    """
    return LabelInfo.from_labels(labels).cascade_values


def one_hot(label_map: np.ndarray, values: Sequence[Sequence[int]]) -> np.ndarray:
    """``(K, *label_map.shape)`` float32: channel ``k`` is 1 where the label is one of ``values[k]``."""
    label_map = np.asarray(label_map)
    out = np.zeros((len(values), *label_map.shape), dtype=np.float32)
    for channel, marked in enumerate(values):
        # runs per training patch: a comparison per value is several times faster than np.isin
        hit = label_map == marked[0]
        for value in marked[1:]:
            hit |= label_map == value
        out[channel] = hit
    return out


def to_stage_grid(label_map: np.ndarray, from_properties: CaseProperties, to_properties: CaseProperties,
                  device: str | Any = "cpu") -> np.ndarray:
    """A previous stage's label map resampled onto another configuration's preprocessed grid.

    Both properties are preprocessing sidecars of the same case (``spacing_after_resampling`` and
    ``shape_after_resampling``); the crop is the same, so only the spacing differs.
    """
    shape = tuple(int(s) for s in to_properties.shape_after_resampling)
    if tuple(label_map.shape) == shape:
        return np.asarray(label_map)
    return resample_label(np.asarray(label_map), from_properties.spacing_after_resampling,
                          to_properties.spacing_after_resampling, new_shape=shape, order=1, device=device)
