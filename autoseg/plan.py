"""The plan: every decision autoseg takes for a dataset, as typed, frozen dataclasses.

A plan is written as ``WORK/plan.json`` (versioned by ``schema_version``) and read back exactly:
``load_plan(save_plan(plan)) == plan``. Loading validates every field and the relations between
fields (patch size divisible by the network's total stride, one normalization per channel, ...),
so a hand-edited plan that cannot work is rejected with a message naming the field.

Axis convention: every spatial tuple is in array-axis order ``(z, y, x)`` (see :mod:`autoseg.io`);
2D configurations have 2-tuples ``(y, x)`` for patch, kernels and strides, and a 3-tuple spacing
whose first entry is the unchanged slice spacing.

The dataclasses are pydantic dataclasses: ordinary frozen dataclasses with type validation and
readable error messages on load, which is exactly what hand-written checks would re-implement.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PositiveInt, TypeAdapter
from pydantic.dataclasses import dataclass

from autoseg.constants import (
    CONFIGURATION_NAMES as CONFIGURATION_NAMES,  # re-exported: one home, light for the CLI
)
from autoseg.errors import AutosegError
from autoseg.labels import LabelInfo
from autoseg.utils import atomic_write_json, read_model_file, sha256_of_json, validate_model

# 2: the cascade is its own configuration (3d_cascade_fullres) instead of a flag on 3d_fullres
SCHEMA_VERSION = 2
NormalizationScheme = Literal["ct", "zscore", "none", "rescale01"]
# nnU-Net: a 3D patch whose longest edge is more than this many times its z edge is augmented
# slice-wise ("dummy 2D"). A ratio of patch edges in voxels, unlike Resampling.anisotropy_threshold
# (a ratio of spacings in mm that decides how the slow axis is resampled), although both are 3.
DUMMY_2D_RATIO = 3.0

_STRICT = ConfigDict(extra="forbid", frozen=True)
# what decides the preprocessed arrays (configuration_hash; shared data must agree on them)
_PREPROCESSING_FIELDS = ("spacing", "normalization", "resampling", "ct_priors")


class PlanError(AutosegError, ValueError):
    """A plan file is missing, not JSON, of another schema version, or invalid."""


@dataclass(config=_STRICT)
class ChannelNormalization:
    """How one input channel is normalized.

    ``ct``: clip to ``[clip_low, clip_high]`` (foreground 0.5/99.5 percentiles), then
    ``(x - mean) / std`` with the dataset's foreground statistics. ``zscore``: per image, with
    the image's own mean and std (inside the non-zero mask when ``use_nonzero_mask``).
    ``rescale01``: per image to [0, 1]. ``none``: values unchanged.
    """

    channel: str
    scheme: NormalizationScheme
    use_nonzero_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if self.scheme == "ct":
            missing = [k for k in ("clip_low", "clip_high", "mean", "std") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"CT normalization of {self.channel!r} needs {', '.join(missing)}")
            if self.clip_low > self.clip_high:  # type: ignore[operator]
                raise ValueError(f"clip_low {self.clip_low} > clip_high {self.clip_high}")
            if not self.std > 0:  # type: ignore[operator]
                raise ValueError(f"std of {self.channel!r} must be > 0, got {self.std}")


@dataclass(config=_STRICT)
class IntensityWindow:
    """A Hounsfield-unit window turned into a soft prior channel (``high`` None: open above)."""

    name: str
    low: float
    high: float | None = None


@dataclass(config=_STRICT)
class Resampling:
    """Interpolation orders, and the slow-axis rule for anisotropic data.

    When a case's largest spacing is more than ``anisotropy_threshold`` times its smallest, the
    slow axis is resampled separately with ``slow_axis_order`` (nearest) and the in-plane axes with
    the regular order, so that thick slices are not smeared into each other.
    Labels are resampled class by class (one-hot) with ``label_order``.
    """

    image_order: int = Field(default=3, ge=0, le=3)
    label_order: int = Field(default=1, ge=0, le=3)
    slow_axis_order: int = Field(default=0, ge=0, le=3)
    anisotropy_threshold: float = Field(default=3.0, gt=1.0)


@dataclass(config=_STRICT)
class Topology:
    """Everything a network builder needs; no architecture hard-codes a size.

    ``strides[0]`` is the first stage's (all ones in the plain U-Net); the total stride per axis is
    the product over stages, and every patch edge must be a multiple of it.
    """

    arch: str
    dim: Literal[2, 3]
    in_channels: PositiveInt
    num_classes: PositiveInt
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    deep_supervision: bool = True
    options: dict[str, Any] = Field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features_per_stage)
        if n < 1:
            raise ValueError("a network needs at least one stage")
        for name in ("kernel_sizes", "strides", "n_conv_per_stage"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, features_per_stage {n}")
        if len(self.n_conv_per_stage_decoder) != n - 1:
            raise ValueError(f"n_conv_per_stage_decoder needs {n - 1} entries (one per decoder stage), "
                             f"has {len(self.n_conv_per_stage_decoder)}")
        for name in ("kernel_sizes", "strides"):
            for stage, entry in enumerate(getattr(self, name)):
                if len(entry) != self.dim or any(v < 1 for v in entry):
                    raise ValueError(f"{name}[{stage}] = {list(entry)} is not {self.dim} positive integers")

    @property
    def num_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis: patch edges must be multiples of it."""
        return tuple(math.prod(s[axis] for s in self.strides) for axis in range(self.dim))


@dataclass(config=_STRICT)
class Schedule:
    """Training schedule and the choices the trainer takes from the plan (all overridable)."""

    epochs: int = Field(default=1000, ge=1)
    iterations_per_epoch: int = Field(default=250, ge=1)
    validation_iterations: int = Field(default=50, ge=0)
    initial_lr: float = Field(default=1e-2, gt=0)
    lr_decay_exponent: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=3e-5, ge=0)
    momentum: float = Field(default=0.99, ge=0, lt=1)
    grad_clip: float = Field(default=12.0, gt=0)
    oversample_foreground: float = Field(default=0.33, ge=0, le=1)
    loss: str = "dice_ce"
    loss_options: dict[str, Any] = Field(default_factory=dict)
    deep_supervision_weights: tuple[float, ...] = ()
    augmentation: str = "default"
    augmentation_options: dict[str, Any] = Field(default_factory=dict)
    mirror_axes: tuple[int, ...] = ()
    checkpoint_every: int = Field(default=1, ge=1)
    seed: int = 12345


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
    """nnU-Net's loss weights of a network's outputs, full resolution first: halving, the lowest
    resolution 0 (when there are several), normalized to sum 1."""
    weights = [1 / 2**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)  # powers of two: exact, so the result matches any summation order
    return tuple(w / total for w in weights)


def is_dummy_2d_patch(patch_size: Sequence[int]) -> bool:
    """nnU-Net's rule: a 3D patch more than ``DUMMY_2D_RATIO`` times longer in-plane than along z
    is augmented in-plane only ("dummy 2D"); a 2D patch never is."""
    return len(patch_size) == 3 and max(patch_size) / patch_size[0] > DUMMY_2D_RATIO


@dataclass(config=_STRICT)
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres``).

    ``previous_stage`` makes it a cascade stage: the network takes, after the image and CT prior
    channels, one one-hot channel per foreground class (or region) of the previous stage's
    prediction (:func:`cascade_input_channels`). ``preprocessed_data`` names the configuration
    whose preprocessed folder it trains on (the cascade shares ``3d_fullres``'s); None: its own.
    """

    name: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, ...]
    batch_size: PositiveInt
    median_shape: tuple[int, ...]
    normalization: tuple[ChannelNormalization, ...]
    topology: Topology
    resampling: Resampling = Field(default_factory=Resampling)
    schedule: Schedule = Field(default_factory=Schedule)
    estimated_memory_gb: float = 0.0
    ct_priors: tuple[IntensityWindow, ...] = ()
    previous_stage: str | None = None
    preprocessed_data: str | None = None

    def __post_init__(self) -> None:
        dim = self.topology.dim
        if len(self.patch_size) != dim:
            raise ValueError(f"patch_size {list(self.patch_size)} has {len(self.patch_size)} axes, the "
                             f"network is {dim}D")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing {list(self.spacing)} must be positive")
        stride = self.topology.total_stride
        if any(p % s for p, s in zip(self.patch_size, stride)):
            raise ValueError(f"patch_size {list(self.patch_size)} is not a multiple of the network's total "
                             f"stride {list(stride)} on every axis")
        extra = len(self.ct_priors)
        # a cascade stage's exact count depends on the plan's labels: Plan checks it
        if self.topology.in_channels < self.base_channels or (
                self.previous_stage is None and self.topology.in_channels != self.base_channels):
            raise ValueError(f"topology.in_channels is {self.topology.in_channels} but there are "
                             f"{len(self.normalization)} channel(s) and {extra} prior channel(s)"
                             + (" plus the previous stage's one-hot channels" if self.previous_stage else ""))

    @property
    def dim(self) -> int:
        return self.topology.dim

    @property
    def base_channels(self) -> int:
        """Input channels preprocessing writes: the image channels and the CT prior windows."""
        return len(self.normalization) + len(self.ct_priors)

    @property
    def data_name(self) -> str:
        """The configuration whose ``preprocessed/`` folder this one reads."""
        return self.preprocessed_data or self.name


@dataclass(config=_STRICT)
class Decision:
    """One planning decision, for ``autoseg plan --explain``."""

    configuration: str
    key: str
    value: str
    reason: str


@dataclass(config=_STRICT)
class Plan:
    """The whole plan for one dataset."""

    dataset_name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int | tuple[int, ...]]
    configurations: dict[str, Configuration]
    is_2d: bool = False
    regions_class_order: tuple[int, ...] | None = None
    gpu_memory_gb: float = 8.0
    fingerprint_hash: str = ""
    decisions: tuple[Decision, ...] = ()
    schema_version: int = SCHEMA_VERSION
    # what `train` and `predict` use when no configuration is named; "" in plans written before it
    recommended_configuration: str = ""

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported (this autoseg reads "
                             f"{SCHEMA_VERSION}); re-run `autoseg plan`")
        if not self.configurations:
            raise ValueError("a plan needs at least one configuration")
        if self.recommended_configuration and self.recommended_configuration not in self.configurations:
            raise ValueError(f"recommended_configuration {self.recommended_configuration!r} is not one of the "
                             f"plan's configurations ({', '.join(self.configurations)})")
        for key, configuration in self.configurations.items():
            if key != configuration.name:
                raise ValueError(f"configurations[{key!r}] is named {configuration.name!r}")
            if len(configuration.normalization) != len(self.channel_names):
                raise ValueError(f"configuration {key!r} normalizes {len(configuration.normalization)} "
                                 f"channel(s), the dataset has {len(self.channel_names)}")
            if configuration.previous_stage:
                self._check_cascade(key, configuration)
            if configuration.preprocessed_data:
                self._check_shared_data(key, configuration)

    def _check_cascade(self, key: str, configuration: Configuration) -> None:
        previous = configuration.previous_stage
        if previous not in self.configurations:
            raise ValueError(f"configuration {key!r} follows {previous!r}, which the plan does not have")
        if previous == key or self.configurations[previous].previous_stage == key:
            raise ValueError(f"configuration {key!r} and {previous!r} follow each other")
        expected = configuration.base_channels + cascade_input_channels(self.labels)
        if configuration.topology.in_channels != expected:
            raise ValueError(f"configuration {key!r}: topology.in_channels is {configuration.topology.in_channels}, "
                             f"a cascade stage takes {expected} ({configuration.base_channels} image/prior "
                             f"channel(s) + {cascade_input_channels(self.labels)} one-hot channel(s) of {previous!r})")

    def _check_shared_data(self, key: str, configuration: Configuration) -> None:
        source = self.configurations.get(configuration.preprocessed_data or "")
        if source is None or source.preprocessed_data:
            raise ValueError(f"configuration {key!r} trains on the preprocessed data of "
                             f"{configuration.preprocessed_data!r}, which the plan does not have (as a "
                             "configuration with its own data)")
        differing = [f for f in _PREPROCESSING_FIELDS if getattr(source, f) != getattr(configuration, f)]
        if differing:
            raise ValueError(f"configuration {key!r} shares the preprocessed data of {source.name!r} but its "
                             f"{', '.join(differing)} differ(s)")

    def recommended(self) -> str:
        """The configuration to use when none is named (``recommended_configuration``).

        Raises:
            PlanError: the plan names none (written by an older autoseg); the message lists the choices.
        """
        if not self.recommended_configuration:
            raise PlanError(f"the plan recommends no configuration (re-run `autoseg plan`, or choose one with -c: "
                            f"{', '.join(self.configurations)})")
        return self.recommended_configuration

    def configuration(self, name: str) -> Configuration:
        """A configuration by name; the error lists the ones the plan has."""
        try:
            return self.configurations[name]
        except KeyError:
            raise PlanError(f"the plan has no configuration {name!r}; it has "
                            f"{', '.join(self.configurations)}") from None


_PLAN_ADAPTER = TypeAdapter(Plan)


def plan_to_dict(plan: Plan) -> dict:
    """The plan as JSON-ready data."""
    return _PLAN_ADAPTER.dump_python(plan, mode="json")


def plan_from_dict(data: object, source: str = "plan") -> Plan:
    """Validate data into a :class:`Plan`; every problem is listed with its field path."""
    return validate_model(_PLAN_ADAPTER, data, source, "plan", PlanError)


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write the plan as JSON atomically."""
    return atomic_write_json(path, plan_to_dict(plan))


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate ``plan.json`` (a file or a work folder)."""
    data, path = read_model_file(path, "plan.json", PlanError, "run `autoseg plan DATASET --work WORK` first")
    return plan_from_dict(data, str(path))


def plan_hash(plan: Plan) -> str:
    """A short hash of everything that affects preprocessing and training (not the explanations)."""
    data = plan_to_dict(plan)
    data.pop("decisions", None)
    return sha256_of_json(data)


def configuration_hash(plan: Plan, name: str) -> str:
    """A short hash of one configuration's preprocessing-relevant content."""
    data = plan_to_dict(plan)["configurations"][name]
    return sha256_of_json({k: data[k] for k in _PREPROCESSING_FIELDS})


def cascade_input_channels(labels: dict[str, int | tuple[int, ...]]) -> int:
    """One-hot channels a cascade stage takes from its previous stage: one per foreground class
    (every label but background and ignore) or, for region labels, one per region."""
    return len(LabelInfo.from_labels(labels).cascade_values)
