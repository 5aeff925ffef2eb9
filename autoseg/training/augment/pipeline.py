"""The composed pipeline: sample every registered transform in order, replay recorded parameters.

:meth:`Augmentation.sample` returns one dict per sample of a batch; :func:`replay` (and
:meth:`Augmentation.apply`) applies such dicts deterministically, needing nothing else. One
sample's parameters look like::

    {"input_shape": [96, 160, 160], "output_shape": [64, 128, 128],
     "ops": [{"op": "spatial", "rotation_deg": [12.5, -3.0, 20.1], "scale": [1.1, 1.1, 1.1],
              "elastic": null},
             {"op": "gaussian_noise", "channels": [0], "std": 0.21, "seed": 17},
             {"op": "mirror", "axes": [1, 2]}]}

The first op always brings the input to the patch size (``crop`` or ``spatial``, see
:mod:`.spatial`). Intensity ops follow (:mod:`.intensity`), then mirroring and 90-degree rotations
(exact array flips), then, for a cascade stage, the ops that corrupt the previous stage's
prediction (:mod:`.cascade`). All draws of a batch come from the one generator passed in, in that
order, so a seed gives the same batch every time.

Conventions: arrays are ``(B, C, z, y, x)`` or ``(B, C, y, x)``; intensities are already
normalized; labels are integer maps ``(B, 1, *spatial)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from autoseg.plan import ChannelNormalization, Configuration

# importing the transform modules registers the built-in transforms
from autoseg.training.augment import cascade, intensity  # noqa: F401
from autoseg.training.augment.base import (
    TransformContext,
    describe,
    find_transform,
    get_transform,
    sampled_transforms,
)
from autoseg.training.augment.settings import AugmentationSettings, augmentation_settings
from autoseg.training.augment.spatial import input_patch_size, is_dummy_2d, rotation_limit


def build_augmentation(configuration: Configuration, preset: str | None = None,
                       options: dict[str, Any] | None = None) -> Augmentation:
    """The augmentation pipeline of a plan configuration.

    Args:
        configuration: gives the patch size, dimension, spacing, channel normalization (which
            channels get CT or MRI transforms) and the schedule's preset, options and mirror axes.
        preset: ``default`` | ``medical`` | ``light`` | ``none``; None: ``schedule.augmentation``.
        options: merged over ``schedule.augmentation_options`` (keys of :class:`AugmentationSettings`).
    """
    schedule = configuration.schedule
    merged = {**schedule.augmentation_options, **(options or {})}
    settings = augmentation_settings(preset or schedule.augmentation, merged)
    return Augmentation(configuration, settings)


class Augmentation:
    """A configured pipeline: ``data, seg, params = augmentation(data, seg, rng)``.

    ``data`` is float32 ``(B, C, *spatial_in)`` and ``seg`` integer ``(B, 1, *spatial_in)`` with
    ``spatial_in = input_patch_size()`` (larger inputs are centre-cropped); the outputs have the
    configuration's patch size. ``params`` holds one JSON-ready dict per sample.
    """

    def __init__(self, configuration: Configuration, settings: AugmentationSettings) -> None:
        self.settings = settings
        self.dim = configuration.dim
        self.patch_size = tuple(int(p) for p in configuration.patch_size)
        self.spacing = tuple(float(s) for s in configuration.spacing[-self.dim:])
        self.normalization: tuple[ChannelNormalization, ...] = tuple(configuration.normalization)
        self.dummy_2d = is_dummy_2d(self.patch_size, settings.dummy_2d)
        self.rotation_limit_deg = rotation_limit(self.patch_size, self.dummy_2d, settings.rotation_degrees)
        axes = settings.mirror_axes if settings.mirror_axes is not None else configuration.schedule.mirror_axes
        bad = [a for a in axes if not 0 <= a < self.dim]
        if bad:
            raise ValueError(f"mirror axes {list(axes)} of configuration {configuration.name!r}: {bad} "
                             f"outside 0..{self.dim - 1}")
        self.mirror_axes = tuple(sorted(set(int(a) for a in axes)))
        self.in_channels = configuration.topology.in_channels
        # the previous stage's one-hot prediction follows the image and prior channels
        self.cascade_channels: tuple[int, ...] = (
            tuple(range(configuration.base_channels, self.in_channels))
            if configuration.previous_stage is not None else ())
        self.context = TransformContext(
            settings=settings, dim=self.dim, patch_size=self.patch_size, spacing=self.spacing,
            normalization=self.normalization, dummy_2d=self.dummy_2d,
            rotation_limit_deg=self.rotation_limit_deg, mirror_axes=self.mirror_axes,
            cascade_channels=self.cascade_channels)
        self.transforms = tuple(cls(self.context) for cls in sampled_transforms())

    def __repr__(self) -> str:
        return (f"Augmentation(patch_size={self.patch_size}, dummy_2d={self.dummy_2d}, "
                f"rotation_limit_deg={self.rotation_limit_deg}, settings={self.settings})")

    def input_patch_size(self, patch_size: Sequence[int] | None = None) -> tuple[int, ...]:
        """The patch to crop before augmenting so that no sampled voxel falls outside it
        (:func:`.spatial.input_patch_size`); ``patch_size`` defaults to the configuration's."""
        return input_patch_size(self.context, patch_size if patch_size is not None else self.patch_size)

    def sample(self, rng: np.random.Generator, spatial_in_shape: Sequence[int], batch_size: int) -> list[dict]:
        """Draw the parameters of ``batch_size`` samples whose input has spatial shape ``spatial_in_shape``."""
        shape_in = tuple(int(s) for s in spatial_in_shape)
        if len(shape_in) != self.dim or any(s < p for s, p in zip(shape_in, self.patch_size)):
            raise ValueError(f"input spatial shape {list(shape_in)} must have {self.dim} axes, each at least "
                             f"the patch size {list(self.patch_size)}")
        return [self._sample_one(rng, shape_in) for _ in range(int(batch_size))]

    def _sample_one(self, rng: np.random.Generator, shape_in: tuple[int, ...]) -> dict:
        ops: list[dict] = []
        for transform in self.transforms:
            ops.extend(transform.sample(rng))
        return {"input_shape": list(shape_in), "output_shape": list(self.patch_size), "ops": ops}

    def apply(self, data: np.ndarray, seg: np.ndarray, params: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Apply recorded parameters (from :meth:`sample` or a log) to a batch; see :func:`replay`."""
        return replay(data, seg, params)

    def __call__(self, data: np.ndarray, seg: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Sample parameters for the batch and apply them: ``(data, seg, params)``."""
        params = self.sample_batch(data, seg, rng)
        out_data, out_seg = replay(data, seg, params)
        return out_data, out_seg, params

    def sample_batch(self, data: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> list[dict]:
        """Check a batch against the configuration and draw its parameters without applying them.

        The draws are exactly those of :meth:`__call__`, so a loader that defers the application
        (:mod:`.on_device`) records the same parameters as one that augments in its workers.
        """
        data, seg = _check_batch(data, seg, self.dim)
        if data.shape[1] < len(self.normalization):
            raise ValueError(f"data has {data.shape[1]} channel(s), the configuration normalizes "
                             f"{len(self.normalization)}")
        if self.cascade_channels and data.shape[1] < self.in_channels:
            first, last = self.cascade_channels[0], self.cascade_channels[-1]
            raise ValueError(f"data has {data.shape[1]} channel(s), the cascade stage takes "
                             f"{self.in_channels} (channels {first}..{last}: the previous stage's one-hot "
                             "prediction)")
        return self.sample(rng, data.shape[2:], data.shape[0])


# --- pure application ------------------------------------------------------------------------------


def replay(data: np.ndarray, seg: np.ndarray, params: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Apply per-sample parameters to a batch; deterministic, needs no configuration.

    Args:
        data: float ``(B, C, *spatial)``.
        seg: integer ``(B, 1, *spatial)``; its dtype is kept.
        params: one dict per sample, as :meth:`Augmentation.sample` returns (or read back from JSON).

    Returns:
        ``(data, seg)`` with each sample's ``output_shape``: float32 and seg's dtype.
    """
    dim = data.ndim - 2
    data, seg = _check_batch(data, seg, dim)
    if len(params) != data.shape[0]:
        raise ValueError(f"{len(params)} parameter sets for a batch of {data.shape[0]}")
    if not params:
        return data[:, :, :0], seg[:, :, :0]
    out_shape = tuple(params[0]["output_shape"])
    out_data = np.empty((data.shape[0], data.shape[1], *out_shape), dtype=np.float32)
    out_seg = np.empty((seg.shape[0], 1, *out_shape), dtype=seg.dtype)
    for b, sample_params in enumerate(params):
        if tuple(sample_params["output_shape"]) != out_shape:
            raise ValueError(f"sample {b} has output shape {sample_params['output_shape']}, sample 0 {list(out_shape)}")
        if list(sample_params["input_shape"]) != list(data.shape[2:]):
            raise ValueError(f"sample {b} was sampled for input shape {sample_params['input_shape']}, "
                             f"the data has {list(data.shape[2:])}")
        out_data[b], out_seg[b] = replay_sample(data[b], seg[b], sample_params)
    return out_data, out_seg


def replay_sample(image: np.ndarray, seg: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Apply one sample's parameters to ``image`` ``(C, *spatial)`` and ``seg`` ``(1, *spatial)``."""
    out_shape = tuple(int(s) for s in params["output_shape"])
    image = np.asarray(image, dtype=np.float32)
    owned = False  # in-place ops write into the image: never into the caller's (maybe memory-mapped) array
    for op in params["ops"]:
        transform = get_transform(op["op"])
        if transform.in_place and not owned:
            image, owned = image.copy(), True
        image, seg = transform.apply(image, seg, op, out_shape)
        owned = owned or transform.fresh_output
    if image.shape[1:] != out_shape:
        raise ValueError(f"parameters produced shape {list(image.shape[1:])}, expected {list(out_shape)} "
                         "(the first op must be 'crop' or 'spatial')")
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(seg)


def _check_batch(data: np.ndarray, seg: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    data, seg = np.asarray(data), np.asarray(seg)
    if data.ndim != dim + 2:
        raise ValueError(f"data must be (B, C, {'z, ' if dim == 3 else ''}y, x) for a {dim}D configuration, "
                         f"got shape {data.shape}")
    if seg.shape != (data.shape[0], 1, *data.shape[2:]):
        raise ValueError(f"seg must have shape {(data.shape[0], 1, *data.shape[2:])} to match data, got {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"seg must hold integer labels, got dtype {seg.dtype}")
    return data.astype(np.float32, copy=False), seg


# --- logging -----------------------------------------------------------------------------------------

# where an op of no registered transform (a plugin not loaded) keeps its headline number
_UNREGISTERED_SUMMARY_KEYS = ("factor", "gamma", "zoom", "std", "counts")


def summarize_params(params: dict, digits: int = 2) -> str:
    """One short line per sample for plot titles and logs, e.g. ``rot(12,-3,5) scale 1.1 | noise``."""
    parts = []
    for op in params["ops"]:
        transform = find_transform(op["op"])
        if transform is not None:
            words = transform.summarize(op, digits)
        else:
            value = next((op[k] for k in _UNREGISTERED_SUMMARY_KEYS if k in op), None)
            words = describe(op["op"], value, digits)
        if words is not None:
            parts.append(words)
    text = " | ".join(dict.fromkeys(parts))  # per-channel repeats collapse
    return text or "no augmentation"


def params_to_json(params: Sequence[dict]) -> str:
    """Parameters as compact JSON (for a log line); ``json.loads`` gives back replayable params."""
    return json.dumps(list(params), separators=(",", ":"))
