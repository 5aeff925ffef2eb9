"""What a ``labels`` mapping means, worked out once for every stage (:class:`LabelInfo`).

The plan's (and ``dataset.json``'s) ``labels`` map a name to a label value, or, for overlapping
regions, to a list of values. Every stage reads them through :class:`LabelInfo`
(``LabelInfo.of(plan)``): the planner for the network's outputs, training for targets and losses,
the cascade for its one-hot inputs, inference and post-processing to turn probabilities into a
label map, evaluation for the classes it scores.

Conventions (docs/architecture.md):

* **Plain labels**: one softmax output per declared label value (background included), in sorted
  order of the values; the target is the channel index ``0..K-1``.
* **Regions** (a label whose value is a list): one sigmoid output per region in declaration
  order, background excluded; the target of a region is 1 where the raw value is one of the
  region's values; ``regions_class_order`` paints them back into a label map.
* The **ignore** label (a single value) is no output: its voxels get the target
  :data:`IGNORE_INDEX` in every channel and are left out of every loss and metric.
* A raw value of ``-1`` (outside the non-zero mask, written by preprocessing) or any negative value
  (border padding of the patch sampler) is background: those voxels were annotated as background.

This module imports neither torch nor anything else heavy at import time: :mod:`autoseg.dataset`
and :mod:`autoseg.evaluation` use it and stay light (torch is imported when a tensor is decoded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoseg.errors import AutosegError

if TYPE_CHECKING:
    import torch

    from autoseg.plan import Plan

IGNORE_INDEX = -1
_UNDECLARED = -2
BACKGROUND = "background"
IGNORE = "ignore"
BACKGROUND_VALUE = 0

LabelValue = int | Sequence[int]
Activation = Literal["softmax", "sigmoid"]

__all__ = [
    "IGNORE_INDEX",
    "LabelError",
    "LabelInfo",
    "declared_values",
    "label_mask",
    "probabilities_to_label_map",
    "select_labels",
]


class LabelError(AutosegError, ValueError):
    """A label value that the dataset does not declare, or labels that do not fit the network."""


def label_mask(label_map: np.ndarray, value: LabelValue) -> np.ndarray:
    """Boolean mask of one label (``value`` an int) or one region (the union of a list of values).

    >>> label_mask(np.array([0, 1, 2, 3]), 1).tolist()
    [False, True, False, False]
    >>> label_mask(np.array([0, 1, 2, 3]), (2, 3)).tolist()
    [False, False, True, True]
    """
    if isinstance(value, (int, np.integer)):
        return label_map == int(value)
    return np.isin(label_map, np.asarray(list(value)))


def declared_values(labels: Mapping[str, LabelValue]) -> set[int]:
    """Every voxel value a label map may contain, given labels (name -> value or region values).

    >>> sorted(declared_values({"background": 0, "whole": (1, 2), "core": 2, "ignore": 9}))
    [0, 1, 2, 9]
    """
    values: set[int] = set()
    for value in labels.values():
        values.update(value if isinstance(value, (tuple, list)) else (value,))
    return values


def probabilities_to_label_map(probabilities: torch.Tensor, values: Sequence[Sequence[int]],
                               activation: Activation,
                               regions_class_order: Sequence[int] | None = None) -> np.ndarray:
    """``(K, *spatial)`` probabilities to a label map of raw label values (see :meth:`LabelInfo.decode`).

    Softmax: the value of the most probable channel (``values[k][0]`` for channel ``k``). Sigmoid
    (regions): every region above 0.5 paints its ``regions_class_order`` value, in region order,
    so later (inner) regions overwrite earlier (outer) ones, as nnU-Net does. The lookup runs where
    the probabilities are (a GPU), so only the small label map travels to the host.
    """
    import torch  # here, not at the top: dataset.py and evaluation.py import this module torch-free

    if activation == "sigmoid":
        if regions_class_order is None or len(regions_class_order) != probabilities.shape[0]:
            raise ValueError(f"region outputs need regions_class_order with {probabilities.shape[0]} entries, "
                             f"got {regions_class_order}")
        largest = max(regions_class_order)
        dtype = torch.uint8 if largest < 256 else torch.int32
        labels = torch.zeros(probabilities.shape[1:], dtype=dtype, device=probabilities.device)
        for channel, value in enumerate(regions_class_order):
            labels[probabilities[channel] > 0.5] = int(value)
    else:
        lookup_values = [v[0] for v in values]
        dtype = torch.uint8 if max(lookup_values) < 256 else torch.int32
        lookup = torch.tensor(lookup_values, dtype=dtype, device=probabilities.device)
        labels = lookup[probabilities.argmax(0)]
    return labels.cpu().numpy()


@dataclass(frozen=True)
class LabelInfo:
    """What a ``labels`` mapping means: network outputs, targets, scored classes, decoding.

    Build it with :meth:`from_labels` (or :meth:`of` a plan), once per stage.

    Attributes:
        names: one name per network output channel.
        values: per output channel, the raw values it stands for (one value for plain labels).
        is_regions: sigmoid outputs with one binary target per region (else softmax classes).
        ignore_value: the raw value of the ``ignore`` label, if any.
        regions_class_order: per region, the value it paints into a label map (regions only).
        declared: the mapping as given, in its order (region values as tuples).

    >>> info = LabelInfo.from_labels({"background": 0, "tumour": 2, "liver": 1, "ignore": 9})
    >>> info.names, info.activation, info.scored_channels, info.cascade_values
    (('background', 'liver', 'tumour'), 'softmax', (1, 2), ((1,), (2,)))
    >>> info.classes
    {'tumour': 2, 'liver': 1}
    """

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    is_regions: bool
    ignore_value: int | None = None
    regions_class_order: tuple[int, ...] | None = None
    declared: tuple[tuple[str, int | tuple[int, ...]], ...] = ()

    @classmethod
    def from_labels(cls, labels: Mapping[str, int | tuple[int, ...] | list[int]],
                    regions_class_order: Sequence[int] | None = None) -> LabelInfo:
        """Build from a plan's (or dataset.json's) ``labels`` mapping.

        Raises:
            LabelError: an ``ignore`` label that is not a single value, or nothing to learn.
        """
        ignore = labels.get(IGNORE)
        if ignore is not None and not isinstance(ignore, int):
            raise LabelError(f"the ignore label must be a single value, found {ignore!r}")
        declared = tuple((name, value if isinstance(value, int) else tuple(value)) for name, value in labels.items())
        is_regions = any(not isinstance(v, int) for _, v in declared)
        if is_regions:
            items = [(name, v if isinstance(v, tuple) else (v,)) for name, v in declared
                     if name not in (BACKGROUND, IGNORE)]
        else:
            items = sorted(((name, (v,)) for name, v in declared if name != IGNORE),  # type: ignore[misc]
                           key=lambda item: item[1][0])
        if not items:
            raise LabelError(f"labels {dict(labels)} define nothing to learn")
        order = tuple(int(v) for v in regions_class_order) if regions_class_order is not None else None
        return cls(tuple(n for n, _ in items), tuple(v for _, v in items), is_regions, ignore, order, declared)

    @classmethod
    def of(cls, plan: Plan) -> LabelInfo:
        """The labels of a plan, with its ``regions_class_order``."""
        return cls.from_labels(plan.labels, plan.regions_class_order)

    @property
    def activation(self) -> Activation:
        """``sigmoid`` for regions (independent outputs), else ``softmax``."""
        return "sigmoid" if self.is_regions else "softmax"

    @property
    def num_outputs(self) -> int:
        """Number of network output channels these labels need."""
        return len(self.names)

    @property
    def scored_channels(self) -> tuple[int, ...]:
        """Output channels that losses' Dice terms and metrics score (background excluded)."""
        return tuple(range(self.num_outputs)) if self.is_regions else tuple(range(1, self.num_outputs))

    @property
    def target_channels(self) -> int:
        """Channels of an encoded target: one class index, or one binary map per region."""
        return self.num_outputs if self.is_regions else 1

    @property
    def classes(self) -> dict[str, int | tuple[int, ...]]:
        """The classes (or regions) that are learnt and scored, in declaration order:
        every label but background and ignore, name -> value (a tuple for a region)."""
        return {name: value for name, value in self.declared if name not in (BACKGROUND, IGNORE)}

    @property
    def cascade_values(self) -> tuple[tuple[int, ...], ...]:
        """Per one-hot channel a cascade stage takes from its previous stage, the values it marks:
        the scored output channels (foreground in ascending value, or regions in order)."""
        return tuple(self.values[channel] for channel in self.scored_channels)

    @property
    def file_dtype(self) -> type[np.integer]:
        """The smallest unsigned dtype that holds every declared value (for written label maps)."""
        return np.uint8 if max(declared_values(dict(self.declared)), default=0) < 256 else np.uint16

    def mask(self, label_map: np.ndarray, name: str) -> np.ndarray:
        """Boolean mask of a declared label or region, by name.

        >>> LabelInfo.from_labels({"background": 0, "a": 1, "b": 2}).mask(np.array([0, 1, 2]), "b").tolist()
        [False, False, True]
        """
        return label_mask(label_map, dict(self.declared)[name])

    def decode(self, probabilities: torch.Tensor) -> np.ndarray:
        """Network probabilities ``(K, *spatial)`` (softmax or sigmoid) to a label map of raw values."""
        return probabilities_to_label_map(probabilities, self.values, self.activation, self.regions_class_order)

    def encode(self, seg: np.ndarray) -> np.ndarray:
        """Turn raw label values ``(B, 1, *spatial)`` into targets ``(B, target_channels, *spatial)``.

        The result is int16 with :data:`IGNORE_INDEX` at ignored voxels (in every channel).

        Raises:
            LabelError: if ``seg`` holds a value the labels do not declare.
        """
        seg = np.asarray(seg)
        if seg.ndim < 2 or seg.shape[1] != 1:
            raise ValueError(f"seg must be (B, 1, *spatial), got shape {seg.shape}")
        raw = np.where(seg < 0, 0, seg).astype(np.intp, copy=False)
        # A lookup table instead of np.unique: this runs on every batch in the loader workers.
        index = np.full(self._lut_size, _UNDECLARED, dtype=np.int16)
        index[0] = 0  # background; for regions only the declared-ness of each value matters
        if self.ignore_value is not None:
            index[self.ignore_value] = IGNORE_INDEX
        for channel, values in enumerate(self.values):
            index[list(values)] = channel
        too_big = raw >= self._lut_size if int(raw.max(initial=0)) >= self._lut_size else None
        mapped = index[np.minimum(raw, self._lut_size - 1) if too_big is not None else raw]
        unknown = mapped == _UNDECLARED
        if too_big is not None:
            unknown |= too_big
        if unknown.any():
            raise LabelError(self._unknown_message(raw[unknown]))
        if not self.is_regions:
            return mapped
        target = np.concatenate([np.isin(raw, values) for values in self.values], axis=1).astype(np.int16)
        if self.ignore_value is not None:
            target[np.broadcast_to(raw == self.ignore_value, target.shape)] = IGNORE_INDEX
        return target

    @property
    def _lut_size(self) -> int:
        declared = [v for vs in self.values for v in vs] + [0, self.ignore_value or 0]
        return max(declared) + 1

    def _unknown_message(self, values: np.ndarray) -> str:
        declared = sorted({v for vs in self.values for v in vs} | {0} |
                          ({self.ignore_value} if self.ignore_value is not None else set()))
        return (f"label value(s) {sorted(int(v) for v in np.unique(values))} are not declared in the "
                f"dataset's labels (declared: {declared})")

    def check_network(self, num_classes: int, source: str = "topology.num_classes") -> None:
        """Raise a clear error when the network's outputs do not match the labels."""
        if num_classes != self.num_outputs:
            kind = "regions" if self.is_regions else "label values (background included, ignore excluded)"
            raise LabelError(f"{source} is {num_classes} but the dataset has {self.num_outputs} {kind}: "
                             f"{list(self.names)}")


# --- labels given for evaluation (any mapping, background optional) ----------------------------------


def select_labels(
    labels: Mapping[str, Any],
    include_background: bool = False,
    ignore_label: int | None = None,
) -> dict[str, int | list[int]]:
    """Check ``labels`` and keep those to evaluate.

    Drops the entry named ``ignore`` and, unless ``include_background``, the background (value 0).
    Raises ``ValueError`` for malformed values or a label that contains the ignore value (its
    voxels would be excluded from its own evaluation).

    >>> select_labels({"background": 0, "liver": 1, "tumour": [2, 3], "ignore": 4}, ignore_label=4)
    {'liver': 1, 'tumour': [2, 3]}
    """
    selected: dict[str, int | list[int]] = {}
    for name, value in labels.items():
        if name == IGNORE:
            continue
        normalized = _normalize_label_value(name, value)
        if not include_background and normalized in (BACKGROUND_VALUE, [BACKGROUND_VALUE]):
            continue
        values = normalized if isinstance(normalized, list) else [normalized]
        if ignore_label is not None and ignore_label in values:
            raise ValueError(f"label {name!r} = {value!r} contains the ignore value {ignore_label}")
        selected[str(name)] = normalized
    if not selected:
        raise ValueError(f"no label left to evaluate from {dict(labels)!r} "
                         f"(include_background={include_background}, ignore_label={ignore_label})")
    return selected


def _normalize_label_value(name: str, value: object) -> int | list[int]:
    def is_int(v: object) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if is_int(value):
        return int(value)  # type: ignore[arg-type]
    if isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value):
        return [int(v) for v in value]
    raise ValueError(f"label {name!r} must be an integer or a non-empty list of integers, got {value!r}")
