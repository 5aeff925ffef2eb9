"""The transform base class, the registry of transforms by op name, and the sampling helpers.

Every transform is split in two, TorchIO style:

* **sampling** (:meth:`Transform.sample`) draws the random parameters of one sample as plain JSON
  data (numbers, lists, strings) from a seeded ``np.random.Generator``;
* **applying** (:meth:`Transform.apply`) is deterministic given the parameters and needs nothing
  else: no configuration, no generator. Random fields (noise) are recorded as a seed. So any
  augmented sample can be logged and replayed exactly.

A transform registers under the ``"op"`` name its parameters carry (:func:`register_transform`);
replaying looks the name up, so a log stays replayable as long as the name is registered. Its
``order`` fixes where its draws happen within a sample: the pipeline samples the registered
transforms by ascending order from one generator, so changing an order (or a transform's draws)
changes every augmented batch of a seed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from autoseg.plan import ChannelNormalization
from autoseg.training.augment.settings import AugmentationSettings


@dataclass(frozen=True)
class TransformContext:
    """What a transform's sampler knows about the configuration it augments for.

    Appliers never see it: everything they need is in the sampled parameters.
    """

    settings: AugmentationSettings
    dim: int
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]  # mm per axis, ``dim`` values
    normalization: tuple[ChannelNormalization, ...]
    dummy_2d: bool
    rotation_limit_deg: float
    mirror_axes: tuple[int, ...]
    cascade_channels: tuple[int, ...]  # the previous stage's one-hot channels; () outside a cascade

    def channels(self, *schemes: str) -> list[int]:
        """The normalized channels (all of them, or those with one of ``schemes``); prior and cascade
        channels are never listed, so intensity transforms leave them alone."""
        return [i for i, n in enumerate(self.normalization) if not schemes or n.scheme in schemes]

    @property
    def in_plane_axes(self) -> tuple[int, ...]:
        """Axes that scaling, elastic deformation and low resolution act on (not z for dummy 2D)."""
        return (1, 2) if self.dummy_2d else tuple(range(self.dim))


class Transform(ABC):
    """One augmentation op: samples its JSON parameters, applies them deterministically.

    Subclasses set the class attributes below and register with :func:`register_transform`, which
    sets ``name`` and ``order``.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int | None] = None
    # apply() writes into the image: replay hands it an array of its own first
    in_place: ClassVar[bool] = False
    # apply() returns new arrays (never views of its input), so later in-place ops need no copy
    fresh_output: ClassVar[bool] = False
    # apply() brings the input to the output shape; exactly one such op opens every sample
    sets_output_shape: ClassVar[bool] = False
    # summarize(): the short word for the op and the parameter shown after it
    short_name: ClassVar[str | None] = None
    summary_key: ClassVar[str | None] = None

    def __init__(self, context: TransformContext) -> None:
        self.context = context
        self.settings = context.settings

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> list[dict]:
        """Parameters of this transform for one sample: zero or more JSON-ready op dicts."""

    @classmethod
    @abstractmethod
    def apply(cls, image: np.ndarray, seg: np.ndarray, op: dict,
              output_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Apply one recorded op to ``image`` ``(C, *spatial)`` and ``seg`` ``(1, *spatial)``."""

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """A few words for a plot title, e.g. ``noise 0.21``; None leaves the op out."""
        value = op.get(cls.summary_key) if cls.summary_key else None
        return describe(cls.short_name or cls.name, value, digits)


class InPlaceTransform(Transform):
    """A transform that changes voxel values of the image only, in place (intensity, cascade ops)."""

    in_place = True

    @classmethod
    def apply(cls, image: np.ndarray, seg: np.ndarray, op: dict,
              output_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Change ``image`` in place; ``seg`` is returned untouched."""
        cls.apply_to_image(image, op)
        return image, seg

    @classmethod
    @abstractmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """Modify ``image`` ``(C, *spatial)`` in place."""


class ExactTransform(Transform):
    """A transform that moves voxels without interpolation (flips, quarter turns): image and label
    get the same array operation, so they stay aligned voxel for voxel."""

    @classmethod
    def apply(cls, image: np.ndarray, seg: np.ndarray, op: dict,
              output_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The same :meth:`apply_to_array` on both arrays (views, not copies)."""
        return cls.apply_to_array(image, op), cls.apply_to_array(seg, op)

    @classmethod
    @abstractmethod
    def apply_to_array(cls, array: np.ndarray, op: dict) -> np.ndarray:
        """The transformed ``array`` ``(C, *spatial)``."""


# --- the registry ------------------------------------------------------------------------------------

T = TypeVar("T", bound=type[Transform])

_REGISTRY: dict[str, type[Transform]] = {}


def register_transform(name: str, order: int | None) -> Callable[[T], T]:
    """Decorator registering a transform class under its op ``name``; returns the class.

    Args:
        name: the ``"op"`` value of the parameters it samples and applies.
        order: where the pipeline draws its parameters within a sample (ascending; leave gaps so a
            new transform fits between two others). The lowest, ``spatial`` (10), opens every
            sample by bringing the input to the patch size. None: the pipeline never samples it
            itself (``crop`` is what the ``spatial`` sampler records when no resampling fires).

    Registering another class under a taken name, or a taken order, is an error: replays and
    sampled batches would otherwise depend on which module was imported last.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a transform name must be a non-empty string, got {name!r}")

    def decorate(cls: T) -> T:
        clashes = [other for other_name, other in _REGISTRY.items()
                   if _qualified(other) != _qualified(cls)
                   and (other_name == name or (order is not None and other.order == order))]
        if clashes:
            raise ValueError(f"transform {name!r} (order {order}) clashes with {_qualified(clashes[0])} "
                             f"registered as {clashes[0].name!r} (order {clashes[0].order})")
        cls.name, cls.order = name, order
        _REGISTRY[name] = cls
        return cls

    return decorate


def unregister_transform(name: str) -> None:
    """Remove a registered transform (for plugins and tests that register temporarily)."""
    _REGISTRY.pop(name, None)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def available_transforms() -> list[str]:
    """Registered op names, sorted."""
    return sorted(_REGISTRY)


def get_transform(name: str) -> type[Transform]:
    """The transform class registered under op ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown augmentation op {name!r}; known ops: {', '.join(available_transforms())}") from None


def find_transform(name: str) -> type[Transform] | None:
    """The transform class registered under op ``name``, or None."""
    return _REGISTRY.get(name)


def sampled_transforms() -> list[type[Transform]]:
    """The transforms the pipeline samples, in drawing order."""
    return sorted((cls for cls in _REGISTRY.values() if cls.order is not None),
                  key=lambda cls: cls.order)  # type: ignore[arg-type, return-value]


# --- sampling helpers --------------------------------------------------------------------------------


def fires(rng: np.random.Generator, p: float) -> bool:
    """One Bernoulli draw with probability ``p``."""
    # no draw for a disabled transform, so switching one off leaves the others' draws unchanged
    return p > 0 and rng.random() < p


def draw_seed(rng: np.random.Generator) -> int:
    """A seed for the random field (noise, choice) an applier generates from its parameters."""
    return int(rng.integers(0, 2**31 - 1))


def sample_around_one(rng: np.random.Generator, value_range: tuple[float, float]) -> float:
    """batchgenerators' rule: half the draws below 1, half above, when the range straddles 1."""
    low, high = value_range
    if low < 1 < high and rng.random() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0) if high > 1 else low, high))


def describe(short: str, value: float | None, digits: int) -> str:
    """``short`` followed by ``value`` (if any) in ``digits`` significant digits."""
    return short if value is None else f"{short} {short_number(value, digits)}"


def short_number(value: float, digits: int) -> str:
    """``value`` in ``digits`` significant digits, without decimals once it has that many integer digits."""
    return f"{value:.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
