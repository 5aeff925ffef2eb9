"""Data augmentation for training: nnU-Net's default pipeline plus medical-specific transforms.

Every transform is split in two, TorchIO style:

* **sampling** draws the random parameters of one sample as plain JSON data (numbers, lists,
  strings); :meth:`Augmentation.sample` returns one such dict per sample of a batch;
* **applying** (:func:`replay`, :meth:`Augmentation.apply`) is deterministic given the parameters
  and needs nothing else: no configuration, no generator. Random fields (noise) are recorded as a
  seed. So any augmented sample can be logged and replayed exactly.

One sample's parameters look like::

    {"input_shape": [96, 160, 160], "output_shape": [64, 128, 128],
     "ops": [{"op": "spatial", "rotation_deg": [12.5, -3.0, 20.1], "scale": [1.1, 1.1, 1.1],
              "elastic": null},
             {"op": "gaussian_noise", "channels": [0], "std": 0.21, "seed": 17},
             {"op": "mirror", "axes": [1, 2]}]}

The first op always brings the input to the patch size: ``crop`` (a centred crop) or ``spatial``
(rotation, scaling and elastic deformation fused into one ``grid_sample`` resampling that also
crops; image linear, label nearest, so the label map never gets a value the input did not have).
Intensity ops follow, then mirroring and 90-degree rotations (exact array flips), then, for a
cascade stage, the ops that corrupt the previous stage's prediction.

Conventions: arrays are ``(B, C, z, y, x)`` or ``(B, C, y, x)``; intensities are already normalized
(CT channels z-scored with the plan's dataset mean/std, so ``h`` HU is ``(h - mean) / std``).
Intensity transforms touch only the channels listed in ``configuration.normalization``; extra
channels (CT prior windows) are moved by the spatial ops and left otherwise unchanged.

Cascade stages (``configuration.previous_stage`` set) get the previous stage's prediction as one
one-hot channel per foreground class after the image and prior channels (0/1, at most one 1 per
voxel). As in nnU-Net, the ``spatial`` op resamples them nearest-neighbour (listed in its
``nearest_channels``), and two ops teach the network not to trust them blindly:
``binary_operator`` (dilation, erosion, opening or closing with a ball of a few voxels) and
``remove_component`` (one small connected component deleted). Both keep the channels 0/1 and
mutually exclusive.

``scale`` follows nnU-Net/batchgenerators: output coordinates are multiplied by it, so
``scale > 1`` shows more context (structures look smaller) and the input patch must be
``scale`` times larger.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass
from scipy import ndimage, optimize

from autoseg.plan import ChannelNormalization, Configuration

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveRange = tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]]
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: a 3D patch this elongated is augmented slice-wise ("dummy 2D")

# Tissue boundaries in HU kept in order by the CT remap: air/lung, fat, water, soft tissue,
# contrast-enhanced vessels, trabecular and cortical bone, metal.
CT_TISSUE_KNOTS_HU = (-1000.0, -500.0, -100.0, -20.0, 20.0, 60.0, 100.0, 300.0, 700.0, 1500.0, 3000.0)
METAL_HU = 3000.0


@dataclass(config=ConfigDict(extra="forbid", frozen=True))
class AugmentationSettings:
    """Every knob of the pipeline; the defaults are nnU-Net's default training augmentation.

    ``p_*`` are probabilities per sample (``p_*_per_channel``: per channel once the transform
    fires; ``p_mirror``: per mirror axis). Ranges are ``(low, high)``. Physical sizes are in mm
    and converted to voxels with the configuration's spacing.
    """

    # spatial: one resampling per sample
    p_rotation: Probability = 0.2
    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] | None = None
    p_scaling: Probability = 0.2
    scaling: PositiveRange = (0.7, 1.4)
    p_elastic: Probability = 0.0
    elastic_max_mm: Annotated[float, Field(ge=0.0)] = 4.0
    elastic_grid_mm: Annotated[float, Field(gt=0.0)] = 40.0
    dummy_2d: bool | None = None
    # nnU-Net intensity transforms
    p_gaussian_noise: Probability = 0.1
    noise_variance: tuple[Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)]] = (0.0, 0.1)
    p_blur: Probability = 0.2
    p_blur_per_channel: Probability = 0.5
    blur_sigma: PositiveRange = (0.5, 1.0)
    p_brightness: Probability = 0.15
    brightness: PositiveRange = (0.75, 1.25)
    p_contrast: Probability = 0.15
    contrast: PositiveRange = (0.75, 1.25)
    p_lowres: Probability = 0.25
    p_lowres_per_channel: Probability = 0.5
    lowres_zoom: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = (0.5, 1.0)
    p_gamma_inverted: Probability = 0.1
    p_gamma: Probability = 0.3
    gamma: PositiveRange = (0.7, 1.5)
    # medical-specific transforms (off in the default preset)
    p_ct_tissue: Probability = 0.0
    ct_tissue_slope: PositiveRange = (0.8, 1.25)
    ct_tissue_shift_hu: Annotated[float, Field(ge=0.0)] = 20.0
    p_poisson_noise: Probability = 0.0
    poisson_counts: PositiveRange = (30.0, 300.0)
    p_metal: Probability = 0.0
    metal_streak_hu: PositiveRange = (150.0, 800.0)
    p_bias_field: Probability = 0.0
    bias_field_order: Annotated[int, Field(ge=1, le=5)] = 3
    bias_field_coefficient: Annotated[float, Field(ge=0.0)] = 0.15
    # exact flips and quarter turns
    p_mirror: Probability = 0.5
    mirror_axes: tuple[int, ...] | None = None
    rot90: bool = False
    # cascade stages only: corrupt the previous stage's one-hot prediction (nnU-Net's cascade
    # ApplyRandomBinaryOperatorTransform and RemoveRandomConnectedComponentFromOneHotEncodingTransform)
    p_cascade_binary_operator: Probability = 0.4
    cascade_operator_radius: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (1, 8)
    p_cascade_remove_component: Probability = 0.2
    cascade_remove_max_fraction: Probability = 0.15

    def __post_init__(self) -> None:
        for name in ("scaling", "noise_variance", "blur_sigma", "brightness", "contrast", "lowres_zoom",
                     "gamma", "ct_tissue_slope", "poisson_counts", "metal_streak_hu",
                     "cascade_operator_radius"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} > high {high}")


def _all_off() -> dict[str, Any]:
    names = AugmentationSettings.__dataclass_fields__  # type: ignore[attr-defined]
    off: dict[str, Any] = {name: 0.0 for name in names if name.startswith("p_")}
    off["rot90"] = False
    return off


def _cascade_defaults() -> dict[str, Any]:
    # the cascade ops teach distrust of the previous stage rather than add image variety: every
    # preset but "none" keeps them on, however light its image augmentation
    fields = AugmentationSettings.__dataclass_fields__  # type: ignore[attr-defined]
    names = ("p_cascade_binary_operator", "p_cascade_remove_component")
    return {name: fields[name].default for name in names}


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "medical": {"p_elastic": 0.2, "p_ct_tissue": 0.2, "p_poisson_noise": 0.1, "p_metal": 0.05,
                "p_bias_field": 0.3},
    "light": {**_all_off(), **_cascade_defaults(), "p_mirror": 0.5, "p_brightness": 0.15,
              "brightness": (0.9, 1.1), "p_contrast": 0.15, "contrast": (0.9, 1.1), "p_gaussian_noise": 0.1,
              "noise_variance": (0.0, 0.01), "p_gamma": 0.15, "gamma": (0.9, 1.1)},
    "none": _all_off(),
}


def augmentation_settings(preset: str, options: dict[str, Any] | None = None) -> AugmentationSettings:
    """The preset's settings with ``options`` laid over them.

    Preset ``none`` is always "centre crop only": options are validated but do not switch
    transforms back on, so a validation loader stays unaugmented whatever the schedule says.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    options = dict(options or {})
    known = AugmentationSettings.__dataclass_fields__  # type: ignore[attr-defined]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {', '.join(unknown)}; known options: "
                         f"{', '.join(known)}")
    values = {**PRESETS[preset], **options}
    if preset == "none":
        values = {**options, **PRESETS["none"]}
    try:
        return AugmentationSettings(**values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise ValueError(f"invalid augmentation options for preset {preset!r}: {problems}") from None


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
        self.dummy_2d = _is_dummy_2d(self.patch_size, settings.dummy_2d)
        self.rotation_limit_deg = _rotation_limit(self.patch_size, self.dummy_2d, settings.rotation_degrees)
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

    def __repr__(self) -> str:
        return (f"Augmentation(patch_size={self.patch_size}, dummy_2d={self.dummy_2d}, "
                f"rotation_limit_deg={self.rotation_limit_deg}, settings={self.settings})")

    # --- geometry -------------------------------------------------------------------------------

    @property
    def _rotation_axes(self) -> tuple[int, ...]:
        """Axes rotated around: all of them in 3D, only z for dummy 2D, the single plane in 2D."""
        if self.settings.p_rotation == 0 or self.rotation_limit_deg == 0:
            return ()
        if self.dim == 2:
            return (0,)
        return (0,) if self.dummy_2d else (0, 1, 2)

    @property
    def _in_plane_axes(self) -> tuple[int, ...]:
        """Axes that scaling and elastic deformation act on (not z for dummy 2D)."""
        return (1, 2) if self.dummy_2d else tuple(range(self.dim))

    def _elastic_max_voxels(self) -> list[float]:
        return [self.settings.elastic_max_mm / s if axis in self._in_plane_axes else 0.0
                for axis, s in enumerate(self.spacing)]

    def input_patch_size(self, patch_size: Sequence[int] | None = None) -> tuple[int, ...]:
        """The patch to crop before augmenting so that no sampled voxel falls outside it.

        The output patch's half-extent, stretched by the largest scale, rotated by every allowed
        rotation (the bounding box's maximum over the whole angle range, per axis, found on a grid
        and refined by a bounded optimizer), plus the largest elastic displacement. Equal to
        ``patch_size`` when no spatial transform can fire.
        """
        patch = np.asarray(patch_size if patch_size is not None else self.patch_size, dtype=np.int64)
        if len(patch) != self.dim:
            raise ValueError(f"patch size {list(patch)} has {len(patch)} axes, the configuration is "
                             f"{self.dim}D")
        settings = self.settings
        half = (patch - 1) / 2.0
        stretched = half.copy()
        if settings.p_scaling > 0:
            for axis in self._in_plane_axes:
                stretched[axis] *= max(1.0, settings.scaling[1])
        extent = _max_rotated_extent(tuple(stretched.tolist()), self._rotation_axes,
                                     math.radians(self.rotation_limit_deg))
        if settings.p_elastic > 0:
            maximum = np.asarray(self._elastic_max_voxels())
            # + rounding slack of the recorded displacements
            extent = extent + np.where(maximum > 0, maximum + 1e-3, 0.0)
        margin = np.maximum(0, np.ceil(extent - half - 1e-6)).astype(np.int64)
        return tuple(int(v) for v in patch + 2 * margin)

    # --- sampling -------------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, spatial_in_shape: Sequence[int], batch_size: int) -> list[dict]:
        """Draw the parameters of ``batch_size`` samples whose input has spatial shape ``spatial_in_shape``."""
        shape_in = tuple(int(s) for s in spatial_in_shape)
        if len(shape_in) != self.dim or any(s < p for s, p in zip(shape_in, self.patch_size)):
            raise ValueError(f"input spatial shape {list(shape_in)} must have {self.dim} axes, each at least "
                             f"the patch size {list(self.patch_size)}")
        return [self._sample_one(rng, shape_in) for _ in range(int(batch_size))]

    def _sample_one(self, rng: np.random.Generator, shape_in: tuple[int, ...]) -> dict:
        ops: list[dict] = [self._sample_spatial(rng) or {"op": "crop"}]
        for sampler in (self._sample_ct_tissue, self._sample_bias_field, self._sample_metal,
                        self._sample_gaussian_noise, self._sample_poisson_noise, self._sample_blur,
                        self._sample_brightness, self._sample_contrast, self._sample_lowres,
                        self._sample_gamma_inverted, self._sample_gamma, self._sample_mirror,
                        self._sample_rot90, self._sample_cascade_binary_operator,
                        self._sample_cascade_remove_component):
            ops.extend(sampler(rng))
        return {"input_shape": list(shape_in), "output_shape": list(self.patch_size), "ops": ops}

    def _channels(self, *schemes: str) -> list[int]:
        return [i for i, n in enumerate(self.normalization) if not schemes or n.scheme in schemes]

    def _sample_spatial(self, rng: np.random.Generator) -> dict | None:
        s = self.settings
        n_angles = 1 if self.dim == 2 else 3
        angles = [0.0] * n_angles
        scale = [1.0] * self.dim
        elastic = None
        if _fires(rng, s.p_rotation) and self._rotation_axes:
            limit = self.rotation_limit_deg
            for axis in self._rotation_axes:
                angles[axis] = round(float(rng.uniform(-limit, limit)), 4)
        if _fires(rng, s.p_scaling):
            factor = round(_sample_around_one(rng, s.scaling), 4)
            for axis in self._in_plane_axes:
                scale[axis] = factor
        if _fires(rng, s.p_elastic):
            elastic = self._sample_elastic(rng)
        if not any(angles) and all(v == 1.0 for v in scale) and elastic is None:
            return None
        op = {"op": "spatial", "rotation_deg": angles, "scale": scale, "elastic": elastic}
        if self.cascade_channels:
            # interpolating one-hot channels would make them fractional and overlapping
            op["nearest_channels"] = list(self.cascade_channels)
        return op

    def _sample_elastic(self, rng: np.random.Generator) -> dict:
        """A coarse random displacement grid (voxels), linearly upsampled when applied: smooth and
        bounded by the maximum (a convex combination of node values never exceeds them)."""
        extent_mm = [p * sp for p, sp in zip(self.patch_size, self.spacing)]
        nodes = [max(2, math.ceil(e / self.settings.elastic_grid_mm) + 1) for e in extent_mm]
        maximum = self._elastic_max_voxels()
        grid = rng.uniform(-1.0, 1.0, size=(self.dim, *nodes)) * np.reshape(maximum, (-1,) + (1,) * self.dim)
        return {"max_voxels": [round(m, 4) for m in maximum], "grid": np.round(grid, 3).tolist()}

    def _sample_ct_tissue(self, rng: np.random.Generator) -> list[dict]:
        ops = []
        s = self.settings
        for channel in self._channels("ct"):
            if not _fires(rng, s.p_ct_tissue):
                continue
            norm = self.normalization[channel]
            knots = _ct_knots_hu(norm.clip_low, norm.clip_high)  # type: ignore[arg-type]
            if len(knots) < 2:
                continue
            low, high = np.log(s.ct_tissue_slope)
            slopes = np.exp(rng.uniform(low, high, size=len(knots) - 1))
            # anchored at the tissue boundary nearest the foreground mean, which moves only slightly
            anchor = int(np.argmin(np.abs(np.asarray(knots) - norm.mean)))
            out = np.concatenate([[0.0], np.cumsum(slopes * np.diff(knots))])
            out += knots[anchor] + rng.uniform(-s.ct_tissue_shift_hu, s.ct_tissue_shift_hu) - out[anchor]
            to_norm = functools.partial(_hu_to_normalized, norm)
            ops.append({"op": "ct_tissue_remap", "channel": channel,
                        "knots_in": [round(to_norm(k), 5) for k in knots],
                        "knots_out": [round(to_norm(k), 5) for k in out]})
        return ops

    def _sample_bias_field(self, rng: np.random.Generator) -> list[dict]:
        ops = []
        s = self.settings
        terms = len(_monomial_exponents(self.dim, s.bias_field_order))
        for channel in self._channels("zscore"):
            if _fires(rng, s.p_bias_field):
                coefficients = rng.uniform(-s.bias_field_coefficient, s.bias_field_coefficient, size=terms)
                ops.append({"op": "bias_field", "channel": channel, "order": s.bias_field_order,
                            "coefficients": np.round(coefficients, 4).tolist()})
        return ops

    def _sample_metal(self, rng: np.random.Generator) -> list[dict]:
        ops = []
        s = self.settings
        plane = self.patch_size[-2:]
        for channel in self._channels("ct"):
            if not _fires(rng, s.p_metal):
                continue
            norm = self.normalization[channel]
            n_streaks = int(rng.integers(4, 11))
            angles = (rng.uniform(0, 180) + np.arange(n_streaks) * 180.0 / n_streaks
                      + rng.uniform(-5, 5, size=n_streaks)) % 180.0
            amplitudes_hu = rng.uniform(*s.metal_streak_hu, size=n_streaks) * np.where(
                np.arange(n_streaks) % 2 == 0, 1.0, -1.0)  # alternating bright and dark streaks
            op = {"op": "metal_streaks", "channel": channel,
                  "center": [round(float(rng.uniform(0.2, 0.8) * (n - 1)), 2) for n in plane],
                  "radius": round(float(rng.uniform(1.0, 3.0)), 2),
                  "angles_deg": np.round(angles, 2).tolist(),
                  "amplitudes": np.round(amplitudes_hu / norm.std, 4).tolist(),
                  "width": round(float(rng.uniform(0.5, 1.5)), 3),
                  "decay": round(float(rng.uniform(0.3, 1.0) * max(plane)), 2),
                  "metal_value": round(_hu_to_normalized(norm, min(METAL_HU, norm.clip_high)), 4),
                  "clip": [round(_hu_to_normalized(norm, norm.clip_low), 4),
                           round(_hu_to_normalized(norm, norm.clip_high), 4)]}
            if self.dim == 3:
                thickness = int(rng.integers(1, 4))
                start = int(rng.integers(0, max(1, self.patch_size[0] - thickness + 1)))
                op["slices"] = [start, min(self.patch_size[0], start + thickness)]
            ops.append(op)
        return ops

    def _sample_gaussian_noise(self, rng: np.random.Generator) -> list[dict]:
        if not _fires(rng, self.settings.p_gaussian_noise) or not self.normalization:
            return []
        variance = float(rng.uniform(*self.settings.noise_variance))
        return [{"op": "gaussian_noise", "channels": self._channels(), "std": round(math.sqrt(variance), 5),
                 "seed": _seed(rng)}]

    def _sample_poisson_noise(self, rng: np.random.Generator) -> list[dict]:
        ops = []
        for channel in self._channels():
            if _fires(rng, self.settings.p_poisson_noise):
                counts = float(np.exp(rng.uniform(*np.log(self.settings.poisson_counts))))
                ops.append({"op": "poisson_noise", "channel": channel, "counts": round(counts, 3),
                            "seed": _seed(rng)})
        return ops

    def _sample_blur(self, rng: np.random.Generator) -> list[dict]:
        s = self.settings
        if not _fires(rng, s.p_blur):
            return []
        ops = []
        for channel in self._channels():
            if _fires(rng, s.p_blur_per_channel):
                sigma = rng.uniform(*s.blur_sigma, size=self.dim)
                ops.append({"op": "gaussian_blur", "channel": channel, "sigma": np.round(sigma, 4).tolist()})
        return ops

    def _sample_brightness(self, rng: np.random.Generator) -> list[dict]:
        if not _fires(rng, self.settings.p_brightness):
            return []
        return [{"op": "brightness", "channel": c, "factor": round(float(rng.uniform(*self.settings.brightness)), 4)}
                for c in self._channels()]

    def _sample_contrast(self, rng: np.random.Generator) -> list[dict]:
        if not _fires(rng, self.settings.p_contrast):
            return []
        return [{"op": "contrast", "channel": c, "factor": round(_sample_around_one(rng, self.settings.contrast), 4)}
                for c in self._channels()]

    def _sample_lowres(self, rng: np.random.Generator) -> list[dict]:
        s = self.settings
        if not _fires(rng, s.p_lowres):
            return []
        axes = [a for a in range(self.dim) if not (self.dummy_2d and a == 0)]
        return [{"op": "low_resolution", "channel": c, "zoom": round(float(rng.uniform(*s.lowres_zoom)), 4),
                 "axes": axes}
                for c in self._channels() if _fires(rng, s.p_lowres_per_channel)]

    def _sample_gamma_inverted(self, rng: np.random.Generator) -> list[dict]:
        return self._gamma_ops(rng, self.settings.p_gamma_inverted, invert=True)

    def _sample_gamma(self, rng: np.random.Generator) -> list[dict]:
        return self._gamma_ops(rng, self.settings.p_gamma, invert=False)

    def _gamma_ops(self, rng: np.random.Generator, p: float, invert: bool) -> list[dict]:
        if not _fires(rng, p):
            return []
        return [{"op": "gamma", "channel": c, "gamma": round(_sample_around_one(rng, self.settings.gamma), 4),
                 "invert": invert} for c in self._channels()]

    def _sample_mirror(self, rng: np.random.Generator) -> list[dict]:
        if self.settings.p_mirror == 0 or not self.mirror_axes:
            return []
        axes = [a for a in self.mirror_axes if rng.random() < self.settings.p_mirror]
        return [{"op": "mirror", "axes": axes}] if axes else []

    def _sample_rot90(self, rng: np.random.Generator) -> list[dict]:
        if not self.settings.rot90:
            return []
        square = self.patch_size[-1] == self.patch_size[-2]
        # a quarter turn of a non-square plane would change the patch shape: half turns only
        k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
        return [{"op": "rot90", "k": k}] if k else []

    def _sample_cascade_binary_operator(self, rng: np.random.Generator) -> list[dict]:
        s = self.settings
        if not self.cascade_channels or not _fires(rng, s.p_cascade_binary_operator):
            return []
        channels = [int(c) for c in rng.permutation(self.cascade_channels)]
        operations = [MORPHOLOGY_OPERATIONS[int(i)] for i in rng.integers(0, len(MORPHOLOGY_OPERATIONS),
                                                                         size=len(channels))]
        low, high = s.cascade_operator_radius
        return [{"op": "binary_operator", "channels": channels, "operations": operations,
                 "radius": int(rng.integers(low, high + 1))}]

    def _sample_cascade_remove_component(self, rng: np.random.Generator) -> list[dict]:
        s = self.settings
        if not self.cascade_channels or not _fires(rng, s.p_cascade_remove_component):
            return []
        return [{"op": "remove_component", "channel": c, "seed": _seed(rng),
                 "max_fraction": s.cascade_remove_max_fraction} for c in self.cascade_channels]

    # --- applying -------------------------------------------------------------------------------

    def apply(self, data: np.ndarray, seg: np.ndarray, params: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Apply recorded parameters (from :meth:`sample` or a log) to a batch; see :func:`replay`."""
        return replay(data, seg, params)

    def __call__(self, data: np.ndarray, seg: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Sample parameters for the batch and apply them: ``(data, seg, params)``."""
        data, seg = _check_batch(data, seg, self.dim)
        if data.shape[1] < len(self.normalization):
            raise ValueError(f"data has {data.shape[1]} channel(s), the configuration normalizes "
                             f"{len(self.normalization)}")
        if self.cascade_channels and data.shape[1] < self.in_channels:
            first, last = self.cascade_channels[0], self.cascade_channels[-1]
            raise ValueError(f"data has {data.shape[1]} channel(s), the cascade stage takes "
                             f"{self.in_channels} (channels {first}..{last}: the previous stage's one-hot "
                             "prediction)")
        params = self.sample(rng, data.shape[2:], data.shape[0])
        out_data, out_seg = replay(data, seg, params)
        return out_data, out_seg, params


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
    owned = False  # intensity ops write in place: never into the caller's (maybe memory-mapped) array
    for op in params["ops"]:
        name = op["op"]
        if name == "crop":
            image, seg = _center_crop(image, out_shape), _center_crop(seg, out_shape)
        elif name == "spatial":
            image, seg = _apply_spatial(image, seg, op, out_shape)
            owned = True
        elif name in _GEOMETRIC:
            image, seg = _GEOMETRIC[name](image, op), _GEOMETRIC[name](seg, op)
        elif name in _IN_PLACE:
            if not owned:
                image, owned = image.copy(), True
            _IN_PLACE[name](image, op)
        else:
            raise ValueError(f"unknown augmentation op {name!r}")
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


def _center_crop(array: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    starts = [(s - o) // 2 for s, o in zip(array.shape[1:], out_shape)]
    return array[(slice(None),) + tuple(slice(a, a + o) for a, o in zip(starts, out_shape))]


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation in array-axis order: one angle (2D) or angles around the z, y and x axes (3D)."""
    angles = np.radians(np.asarray(angles_deg, dtype=np.float64))[None]
    dim = 2 if angles.shape[1] == 1 else 3
    return _rotation_matrices(angles, dim, tuple(range(angles.shape[1])))[0]


def _rotation_matrices(angles: np.ndarray, dim: int, axes: tuple[int, ...]) -> np.ndarray:
    """``(M, dim, dim)`` rotations for ``(M, len(axes))`` angles (radians) around ``axes``."""
    result = np.broadcast_to(np.eye(dim), (len(angles), dim, dim)).copy()
    for column, axis in enumerate(axes):
        i, j = (0, 1) if dim == 2 else [a for a in range(3) if a != axis]
        cos, sin = np.cos(angles[:, column]), np.sin(angles[:, column])
        step = np.broadcast_to(np.eye(dim), result.shape).copy()
        step[:, i, i], step[:, i, j], step[:, j, i], step[:, j, j] = cos, -sin, sin, cos
        result = result @ step
    return result


def input_coordinates(op: dict, input_shape: Sequence[int], output_shape: Sequence[int]) -> torch.Tensor:
    """Input voxel coordinates ``(dim, *output_shape)`` that a ``spatial`` op samples.

    ``input = centre_in + R diag(scale) (output - centre_out) + elastic(output)``, with the centres
    chosen so that the identity transform reproduces the centred crop voxel for voxel.
    """
    out = np.asarray(output_shape, dtype=np.int64)
    dim = len(out)
    half = (out - 1) / 2.0
    centre_in = (np.asarray(input_shape) - out) // 2 + half
    affine = rotation_matrix(op["rotation_deg"]) @ np.diag(op["scale"])
    offsets = [torch.arange(n, dtype=torch.float32) - float(h) for n, h in zip(out, half)]
    coordinates = torch.empty((dim, *out.tolist()), dtype=torch.float32)
    for k in range(dim):
        total = torch.full((1,) * dim, float(centre_in[k]))
        for j in range(dim):
            if affine[k, j] != 0.0:
                shape = [1] * dim
                shape[j] = -1
                total = total + offsets[j].reshape(shape) * float(affine[k, j])
        coordinates[k] = total.expand(*out.tolist())
    if op.get("elastic"):
        coarse = torch.tensor(op["elastic"]["grid"], dtype=torch.float32)[None]
        mode = "bilinear" if dim == 2 else "trilinear"
        coordinates += F.interpolate(coarse, size=tuple(out.tolist()), mode=mode, align_corners=True)[0]
    return coordinates


def _apply_spatial(image: np.ndarray, seg: np.ndarray, op: dict,
                   out_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    coordinates = input_coordinates(op, image.shape[1:], out_shape)
    # only the block the coordinates reach is converted and sampled: a small rotation of a patch
    # cut for the largest one touches far less than the whole input
    flat = coordinates.reshape(len(out_shape), -1)
    starts = [max(0, min(n - 1, math.floor(v) - 1)) for v, n in zip(flat.amin(1).tolist(), image.shape[1:])]
    stops = [max(a + 1, min(n, math.ceil(v) + 2)) for a, v, n in zip(starts, flat.amax(1).tolist(), image.shape[1:])]
    block = (slice(None),) + tuple(slice(a, b) for a, b in zip(starts, stops))
    image, seg_block = image[block], seg[block]
    coordinates -= torch.tensor(starts, dtype=torch.float32).reshape(-1, *(1,) * len(out_shape))
    in_shape = image.shape[1:]
    # grid_sample wants [-1, 1] coordinates (align_corners=True: -1 and 1 are the outer voxel
    # centres) with the last axis in x, y, z order
    scale = torch.tensor([2.0 / (s - 1) if s > 1 else 0.0 for s in in_shape]).reshape(-1, *(1,) * len(out_shape))
    grid = (coordinates * scale - 1.0).flip(0).movedim(0, -1)[None]
    nearest = [int(c) for c in op.get("nearest_channels", ())]
    if not nearest:
        out_image = _grid_sample(image, grid, "bilinear")
    else:
        linear = [c for c in range(image.shape[0]) if c not in nearest]
        out_image = np.empty((image.shape[0], *out_shape), dtype=np.float32)
        out_image[linear] = _grid_sample(image[linear], grid, "bilinear")
        out_image[nearest] = _grid_sample(image[nearest], grid, "nearest")
    out_seg = _grid_sample(seg_block, grid, "nearest")
    return out_image, np.rint(out_seg).astype(seg.dtype)


def _grid_sample(array: np.ndarray, grid: torch.Tensor, mode: str) -> np.ndarray:
    # border padding: a sample that reaches past the input (it should not, given
    # input_patch_size) repeats the edge instead of inventing a value or label 0
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.grid_sample(tensor, grid, mode=mode, padding_mode="border", align_corners=True)[0].numpy()


def _mirror(array: np.ndarray, op: dict) -> np.ndarray:
    return np.flip(array, axis=tuple(1 + a for a in op["axes"]))


def _rot90(array: np.ndarray, op: dict) -> np.ndarray:
    return np.rot90(array, k=op["k"], axes=(-2, -1))


_GEOMETRIC: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {"mirror": _mirror, "rot90": _rot90}


# --- intensity ops: modify image (C, *spatial) in place -------------------------------------------


def _gaussian_noise(image: np.ndarray, op: dict) -> None:
    rng = np.random.default_rng(op["seed"])
    for c in op["channels"]:
        image[c] += rng.standard_normal(image.shape[1:], dtype=np.float32) * np.float32(op["std"])


def _poisson_noise(image: np.ndarray, op: dict) -> None:
    # photon-counting noise: the darkest value of the patch stands for zero counts
    channel = image[op["channel"]]
    floor = channel.min()
    counts = np.random.default_rng(op["seed"]).poisson((channel - floor).astype(np.float64) * op["counts"])
    image[op["channel"]] = (counts / op["counts"] + floor).astype(np.float32)


def _gaussian_blur(image: np.ndarray, op: dict) -> None:
    c = op["channel"]
    image[c] = ndimage.gaussian_filter(image[c], sigma=op["sigma"], mode="nearest", truncate=3.0)


def _brightness(image: np.ndarray, op: dict) -> None:
    image[op["channel"]] *= np.float32(op["factor"])


def _contrast(image: np.ndarray, op: dict) -> None:
    channel = image[op["channel"]]
    mean, low, high = channel.mean(), channel.min(), channel.max()
    image[op["channel"]] = np.clip((channel - mean) * np.float32(op["factor"]) + mean, low, high)


def _low_resolution(image: np.ndarray, op: dict) -> None:
    c, shape = op["channel"], image.shape[1:]
    small = [max(1, round(n * op["zoom"])) if axis in op["axes"] else n for axis, n in enumerate(shape)]
    if list(small) == list(shape):
        return
    channel = torch.from_numpy(np.ascontiguousarray(image[c]))[None, None]
    down = F.interpolate(channel, size=small, mode="nearest-exact")
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    image[c] = F.interpolate(down, size=shape, mode=mode, align_corners=False)[0, 0].numpy()


def _gamma(image: np.ndarray, op: dict) -> None:
    """nnU-Net's gamma: on the [0, 1]-rescaled channel (optionally inverted), mean/std retained."""
    c = op["channel"]
    channel = image[c].astype(np.float64)
    if op["invert"]:
        channel = -channel
    mean, std = channel.mean(), channel.std()
    low = channel.min()
    span = channel.max() - low + 1e-7
    channel = np.power((channel - low) / span, op["gamma"]) * span + low
    channel = (channel - channel.mean()) / (channel.std() + 1e-8) * std + mean
    image[c] = (-channel if op["invert"] else channel).astype(np.float32)


def _ct_tissue_remap(image: np.ndarray, op: dict) -> None:
    image[op["channel"]] = piecewise_linear(image[op["channel"]], op["knots_in"], op["knots_out"])


def piecewise_linear(values: np.ndarray, knots_in: Sequence[float], knots_out: Sequence[float]) -> np.ndarray:
    """Map ``values`` through the polyline ``knots_in -> knots_out``, extended linearly at both ends.

    Strictly increasing knots give a strictly increasing map, so the order of intensities (of
    tissues, in CT) is kept.
    """
    x, y = np.asarray(knots_in, dtype=np.float64), np.asarray(knots_out, dtype=np.float64)
    result = np.interp(values, x, y)
    below, above = values < x[0], values > x[-1]
    result[below] = y[0] + (values[below] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    result[above] = y[-1] + (values[above] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return result.astype(np.float32)


def bias_field(shape: Sequence[int], order: int, coefficients: Sequence[float]) -> np.ndarray:
    """A smooth positive multiplicative field ``exp(polynomial)`` over ``[-1, 1]`` per axis.

    The polynomial has every monomial of degree 1..``order`` (the constant is left to the
    brightness transform), in the order of :func:`_monomial_exponents`.
    """
    exponents = _monomial_exponents(len(shape), order)
    if len(coefficients) != len(exponents):
        raise ValueError(f"a degree-{order} {len(shape)}D bias field needs {len(exponents)} coefficients, "
                         f"got {len(coefficients)}")
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    log_field = np.zeros(tuple(shape), dtype=np.float64)
    for coefficient, powers in zip(coefficients, exponents):
        term = np.float64(coefficient)
        for axis, power in enumerate(powers):
            if power:
                view = [1] * len(shape)
                view[axis] = -1
                term = term * (axes[axis] ** power).reshape(view)
        log_field += term
    return np.exp(log_field).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _monomial_exponents(dim: int, order: int) -> tuple[tuple[int, ...], ...]:
    return tuple(p for p in itertools.product(range(order + 1), repeat=dim) if 1 <= sum(p) <= order)


def _bias_field(image: np.ndarray, op: dict) -> None:
    # MRI bias multiplies raw intensities; the darkest value of the patch stands for raw zero
    c = op["channel"]
    channel = image[c]
    floor = channel.min()
    image[c] = (channel - floor) * bias_field(channel.shape, op["order"], op["coefficients"]) + floor


def _metal_streaks(image: np.ndarray, op: dict) -> None:
    """Radial bright/dark streaks from a small dense object, on a few axial slices."""
    c = op["channel"]
    plane = image.shape[-2:]
    y, x = np.meshgrid(np.arange(plane[0]) - op["center"][0], np.arange(plane[1]) - op["center"][1],
                       indexing="ij")
    radius = np.hypot(y, x)
    streaks = np.zeros(plane, dtype=np.float64)
    for angle, amplitude in zip(op["angles_deg"], op["amplitudes"]):
        theta = math.radians(angle)
        distance = np.abs(-y * math.cos(theta) + x * math.sin(theta))  # from the line through the centre
        streaks += amplitude * np.exp(-0.5 * (distance / op["width"]) ** 2)
    streaks *= np.exp(-radius / op["decay"])
    metal = radius <= op["radius"]
    region = image[c] if image.ndim == 3 else image[c, op["slices"][0]:op["slices"][1]]
    region += streaks.astype(np.float32)
    region[..., metal] = op["metal_value"]
    np.clip(region, *op["clip"], out=region)


_INTENSITY: dict[str, Callable[[np.ndarray, dict], None]] = {
    "gaussian_noise": _gaussian_noise, "poisson_noise": _poisson_noise, "gaussian_blur": _gaussian_blur,
    "brightness": _brightness, "contrast": _contrast, "low_resolution": _low_resolution, "gamma": _gamma,
    "ct_tissue_remap": _ct_tissue_remap, "bias_field": _bias_field, "metal_streaks": _metal_streaks,
}


# --- cascade ops: modify the previous stage's one-hot channels of image (C, *spatial) in place ----


MORPHOLOGY_OPERATIONS = ("dilation", "erosion", "opening", "closing")


def _binary_operator(image: np.ndarray, op: dict) -> None:
    """One morphological operation per listed channel, in the listed order; the voxels a channel
    gains are taken from the other listed channels, so the one-hot channels stay exclusive."""
    channels = [int(c) for c in op["channels"]]
    for channel, operation in zip(channels, op["operations"], strict=True):
        before = image[channel] > 0.5
        after = binary_morphology(before, operation, int(op["radius"]))
        image[channel] = after
        gained = after & ~before
        for other in channels:
            if other != channel:
                image[other][gained] = 0.0


def binary_morphology(mask: np.ndarray, operation: str, radius: int) -> np.ndarray:
    """Binary dilation, erosion, opening or closing of ``mask`` with a ball (disk in 2D) of
    ``radius`` voxels: skimage's ``ball``/``disk`` footprint, offsets with ``|o|^2 <= radius^2``.

    The patch border is ignored, as by skimage's ``mode="ignore"``: no voxel outside the array
    dilates into it or erodes it (the patch is a crop; what lies beyond is unknown). Computed with
    Euclidean distance transforms over the mask's bounding box instead of a structuring element,
    whose cost grows with the ball's volume (seconds for radius 8 on a 64x128x128 patch).
    """
    mask = np.asarray(mask, dtype=bool)
    if operation == "dilation":
        return _dilate(mask, radius)
    if operation == "erosion":
        return _erode(mask, radius)
    if operation == "opening":
        return _dilate(_erode(mask, radius), radius)
    if operation == "closing":
        return _erode(_dilate(mask, radius), radius)
    raise ValueError(f"unknown morphological operation {operation!r}; choose one of "
                     f"{', '.join(MORPHOLOGY_OPERATIONS)}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = np.zeros_like(mask)
    # every voxel within the radius of the mask lies in its bounding box grown by the radius
    box = _bounding_box(mask, radius)
    if box is not None:
        # distances are square roots of integers: exact at integer radii, so <= matches |o|^2 <= r^2
        out[box] = ndimage.distance_transform_edt(~mask[box]) <= radius
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    out = np.zeros_like(mask)
    # one background layer around the bounding box (where the array has one) holds, for every
    # voxel inside, a background voxel at least as close as any background voxel further out
    box = _bounding_box(mask, 1)
    if box is None:
        return out
    inside = mask[box]
    if inside.all():  # the mask fills the array: with the border ignored nothing erodes
        out[box] = True
    else:
        out[box] = ndimage.distance_transform_edt(inside) > radius
    return out


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    """The mask's bounding box grown by ``margin`` voxels and clipped to the array; None if empty."""
    box = []
    for axis, size in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(0, int(hits[0]) - margin), min(size, int(hits[-1]) + 1 + margin)))
    return tuple(box)


def _remove_component(image: np.ndarray, op: dict) -> None:
    """Delete one connected component of the channel, drawn among those covering at most
    ``max_fraction`` of the patch (nnU-Net: a large structure is never removed whole).

    Components use full connectivity (26 neighbours in 3D, 8 in 2D), like skimage.measure.label's
    default that nnU-Net uses.
    """
    c = op["channel"]
    mask = image[c] > 0.5
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if count == 0:
        return
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    small = np.flatnonzero(sizes <= op["max_fraction"] * mask.size) + 1
    if small.size == 0:
        return
    chosen = small[np.random.default_rng(op["seed"]).integers(small.size)]
    image[c][labels == chosen] = 0.0


_CASCADE: dict[str, Callable[[np.ndarray, dict], None]] = {
    "binary_operator": _binary_operator, "remove_component": _remove_component,
}
_IN_PLACE = {**_INTENSITY, **_CASCADE}


# --- helpers ---------------------------------------------------------------------------------------


def _fires(rng: np.random.Generator, p: float) -> bool:
    # no draw for a disabled transform, so switching one off leaves the others' draws unchanged
    return p > 0 and rng.random() < p


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _sample_around_one(rng: np.random.Generator, value_range: tuple[float, float]) -> float:
    """batchgenerators' rule: half the draws below 1, half above, when the range straddles 1."""
    low, high = value_range
    if low < 1 < high and rng.random() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0) if high > 1 else low, high))


def _is_dummy_2d(patch_size: tuple[int, ...], option: bool | None) -> bool:
    if len(patch_size) != 3:
        return False
    if option is not None:
        return option
    return max(patch_size) / patch_size[0] > ANISOTROPY_THRESHOLD


def _rotation_limit(patch_size: tuple[int, ...], dummy_2d: bool, option: float | None) -> float:
    """nnU-Net's rule: +-30 deg in 3D, +-180 deg in (dummy) 2D, +-15 deg for elongated 2D patches."""
    if option is not None:
        return float(option)
    if len(patch_size) == 3:
        return 180.0 if dummy_2d else 30.0
    return 15.0 if max(patch_size) / min(patch_size) > 1.5 else 180.0


def _max_rotated_extent(half: tuple[float, ...], axes: tuple[int, ...], limit: float) -> np.ndarray:
    """Per axis, the largest half-extent of the box ``|x_i| <= half_i`` over all rotations with
    every angle around ``axes`` in ``[-limit, limit]``: ``max_R (|R| half)``."""
    return np.array(_max_rotated_extent_cached(half, axes, limit))


@functools.lru_cache(maxsize=64)
def _max_rotated_extent_cached(half: tuple[float, ...], axes: tuple[int, ...], limit: float) -> tuple[float, ...]:
    half_array = np.asarray(half)
    if not axes or limit == 0:
        return half
    dim = len(half)
    steps = 721 if len(axes) == 1 else 21
    values = np.linspace(-limit, limit, steps)
    angles = np.stack(np.meshgrid(*[values] * len(axes), indexing="ij"), axis=-1).reshape(-1, len(axes))
    extents = np.abs(_rotation_matrices(angles, dim, axes)) @ half_array
    best = extents.max(axis=0)
    for k in range(dim):
        def negative_extent(a: np.ndarray, k: int = k) -> float:
            return -float((np.abs(_rotation_matrices(a[None], dim, axes)) @ half_array)[0, k])
        for start in angles[np.argsort(extents[:, k])[-3:]]:
            result = optimize.minimize(negative_extent, start, bounds=[(-limit, limit)] * len(axes),
                                       method="L-BFGS-B")
            best[k] = max(best[k], -result.fun)
    return tuple(float(b) for b in best)


def _ct_knots_hu(clip_low: float, clip_high: float) -> list[float]:
    if not clip_high > clip_low:
        return []
    return [clip_low] + [k for k in CT_TISSUE_KNOTS_HU if clip_low < k < clip_high] + [clip_high]


def _hu_to_normalized(norm: ChannelNormalization, hu: float) -> float:
    return (float(hu) - norm.mean) / norm.std  # type: ignore[operator]


def summarize_params(params: dict, digits: int = 2) -> str:
    """One short line per sample for plot titles and logs, e.g. ``rot(12,-3,5) scale 1.1 | noise``."""
    parts = []
    for op in params["ops"]:
        name = op["op"]
        if name == "crop":
            continue
        if name == "spatial":
            words = []
            if any(op["rotation_deg"]):
                words.append("rot(" + ",".join(f"{a:.0f}" for a in op["rotation_deg"]) + ")")
            if any(s != 1 for s in op["scale"]):
                words.append(f"scale {_short_number(max(op['scale'], key=lambda s: abs(s - 1)), digits + 1)}")
            if op.get("elastic"):
                words.append("elastic")
            parts.append(" ".join(words))
        elif name == "mirror":
            parts.append("mirror" + str(op["axes"]).replace(" ", ""))
        elif name == "rot90":
            parts.append(f"rot90x{op['k']}")
        elif name == "binary_operator":
            parts.append(f"cascade {'/'.join(dict.fromkeys(op['operations']))} r{op['radius']}")
        elif name == "remove_component":
            parts.append("cascade remove-cc")
        else:
            value = next((op[k] for k in ("factor", "gamma", "zoom", "std", "counts") if k in op), None)
            short = {"gaussian_noise": "noise", "poisson_noise": "poisson", "gaussian_blur": "blur",
                     "low_resolution": "lowres", "ct_tissue_remap": "ct-remap", "bias_field": "bias",
                     "metal_streaks": "metal"}.get(name, name)
            if name == "gamma" and op["invert"]:
                short = "inv-gamma"
            parts.append(short if value is None else f"{short} {_short_number(value, digits)}")
    text = " | ".join(dict.fromkeys(parts))  # per-channel repeats collapse
    return text or "no augmentation"


def _short_number(value: float, digits: int) -> str:
    return f"{value:.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"


def params_to_json(params: Sequence[dict]) -> str:
    """Parameters as compact JSON (for a log line); ``json.loads`` gives back replayable params."""
    return json.dumps(list(params), separators=(",", ":"))
