"""From raw label values to training targets, and back to class names.

Conventions (docs/architecture.md):

* **Plain labels**: one softmax output per declared label value (background included), in sorted
  order of the values; the target is the channel index ``0..K-1``.
* **Regions** (a ``dataset.json`` label whose value is a list): one sigmoid output per region in
  ``dataset.json`` order, background excluded; the target of a region is 1 where the raw value is
  one of the region's values.
* The **ignore** label is no output: its voxels get the target :data:`IGNORE_INDEX` in every channel
  and are left out of every loss and metric.
* A raw value of ``-1`` (outside the non-zero mask, written by preprocessing) or any negative value
  (border padding of the patch sampler) is background: those voxels were annotated as background.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from autoseg.training.errors import TrainingError

IGNORE_INDEX = -1
_UNDECLARED = -2


class LabelError(TrainingError):
    """A label value that the dataset does not declare, or labels that do not fit the network."""


@dataclass(frozen=True)
class LabelInfo:
    """How raw label values become network targets.

    Attributes:
        names: one name per network output channel.
        values: per output channel, the raw values it stands for (one value for plain labels).
        is_regions: sigmoid outputs with one binary target per region (else softmax classes).
        ignore_value: the raw value of the ``ignore`` label, if any.
    """

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    is_regions: bool
    ignore_value: int | None = None

    @classmethod
    def from_labels(cls, labels: Mapping[str, int | tuple[int, ...] | list[int]]) -> LabelInfo:
        """Build from the plan's (or dataset.json's) ``labels`` mapping."""
        ignore = labels.get("ignore")
        if ignore is not None and not isinstance(ignore, int):
            raise LabelError(f"the ignore label must be a single value, found {ignore!r}")
        is_regions = any(not isinstance(v, int) for v in labels.values())
        if is_regions:
            items = [(name, tuple(v) if not isinstance(v, int) else (v,))
                     for name, v in labels.items() if name not in ("background", "ignore")]
        else:
            items = sorted(((name, (v,)) for name, v in labels.items() if name != "ignore"),
                           key=lambda item: item[1][0])
        if not items:
            raise LabelError(f"labels {dict(labels)} define nothing to learn")
        return cls(tuple(n for n, _ in items), tuple(v for _, v in items), is_regions, ignore)

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
