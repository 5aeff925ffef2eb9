"""Intensity transforms: nnU-Net's noise, blur, brightness, contrast, low resolution and gamma, plus
medical ones (CT tissue remap, MRI bias field, CT metal streaks, Poisson noise).

Intensities are already normalized (CT channels z-scored with the plan's dataset mean/std, so
``h`` HU is ``(h - mean) / std``). Intensity transforms touch only the channels listed in
``configuration.normalization``; extra channels (CT prior windows, a cascade stage's one-hot
channels) are moved by the spatial ops and left otherwise unchanged. Every applier modifies the
image ``(C, *spatial)`` in place.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from autoseg.plan import ChannelNormalization
from autoseg.training.augment.base import (
    InPlaceTransform,
    draw_seed,
    fires,
    register_transform,
    sample_around_one,
)

# Tissue boundaries in HU kept in order by the CT remap: air/lung, fat, water, soft tissue,
# contrast-enhanced vessels, trabecular and cortical bone, metal.
CT_TISSUE_KNOTS_HU = (-1000.0, -500.0, -100.0, -20.0, 20.0, 60.0, 100.0, 300.0, 700.0, 1500.0, 3000.0)
METAL_HU = 3000.0


def _hu_to_normalized(norm: ChannelNormalization, hu: float) -> float:
    return (float(hu) - norm.mean) / norm.std  # type: ignore[operator]


# --- medical transforms (off in the default preset) --------------------------------------------------


@register_transform("ct_tissue_remap", order=20)
class CTTissueRemap(InPlaceTransform):
    """A random monotonic piecewise-linear remap of CT intensities between tissue boundaries.

    ``{"op": "ct_tissue_remap", "channel": c, "knots_in": [...], "knots_out": [...]}`` in normalized
    units; the order of tissues is kept.
    """

    short_name = "ct-remap"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """Per CT channel with ``p_ct_tissue``: a slope per tissue interval and a small shift."""
        ops = []
        s = self.settings
        for channel in self.context.channels("ct"):
            if not fires(rng, s.p_ct_tissue):
                continue
            norm = self.context.normalization[channel]
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
            ops.append({"op": self.name, "channel": channel,
                        "knots_in": [round(to_norm(k), 5) for k in knots],
                        "knots_out": [round(to_norm(k), 5) for k in out]})
        return ops

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """The channel mapped through the recorded polyline."""
        image[op["channel"]] = piecewise_linear(image[op["channel"]], op["knots_in"], op["knots_out"])


def _ct_knots_hu(clip_low: float, clip_high: float) -> list[float]:
    if not clip_high > clip_low:
        return []
    return [clip_low] + [k for k in CT_TISSUE_KNOTS_HU if clip_low < k < clip_high] + [clip_high]


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


@register_transform("bias_field", order=30)
class BiasField(InPlaceTransform):
    """MRI intensity inhomogeneity: a smooth multiplicative field, ``exp`` of a low-order polynomial.

    ``{"op": "bias_field", "channel": c, "order": n, "coefficients": [...]}``.
    """

    short_name = "bias"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """Per z-scored (MRI) channel with ``p_bias_field``: uniform polynomial coefficients."""
        ops = []
        s = self.settings
        terms = len(_monomial_exponents(self.context.dim, s.bias_field_order))
        for channel in self.context.channels("zscore"):
            if fires(rng, s.p_bias_field):
                coefficients = rng.uniform(-s.bias_field_coefficient, s.bias_field_coefficient, size=terms)
                ops.append({"op": self.name, "channel": channel, "order": s.bias_field_order,
                            "coefficients": np.round(coefficients, 4).tolist()})
        return ops

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """The channel above its darkest value multiplied by the field."""
        # MRI bias multiplies raw intensities; the darkest value of the patch stands for raw zero
        c = op["channel"]
        channel = image[c]
        floor = channel.min()
        image[c] = (channel - floor) * bias_field(channel.shape, op["order"], op["coefficients"]) + floor


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


@register_transform("metal_streaks", order=40)
class MetalStreaks(InPlaceTransform):
    """Radial bright/dark streaks from a small dense object, on a few axial slices (CT channels)."""

    short_name = "metal"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """Per CT channel with ``p_metal``: the object's position and size, the streaks, the slices."""
        ops = []
        s = self.settings
        patch = self.context.patch_size
        plane = patch[-2:]
        for channel in self.context.channels("ct"):
            if not fires(rng, s.p_metal):
                continue
            norm = self.context.normalization[channel]
            n_streaks = int(rng.integers(4, 11))
            angles = (rng.uniform(0, 180) + np.arange(n_streaks) * 180.0 / n_streaks
                      + rng.uniform(-5, 5, size=n_streaks)) % 180.0
            amplitudes_hu = rng.uniform(*s.metal_streak_hu, size=n_streaks) * np.where(
                np.arange(n_streaks) % 2 == 0, 1.0, -1.0)  # alternating bright and dark streaks
            op = {"op": self.name, "channel": channel,
                  "center": [round(float(rng.uniform(0.2, 0.8) * (n - 1)), 2) for n in plane],
                  "radius": round(float(rng.uniform(1.0, 3.0)), 2),
                  "angles_deg": np.round(angles, 2).tolist(),
                  "amplitudes": np.round(amplitudes_hu / norm.std, 4).tolist(),
                  "width": round(float(rng.uniform(0.5, 1.5)), 3),
                  "decay": round(float(rng.uniform(0.3, 1.0) * max(plane)), 2),
                  "metal_value": round(_hu_to_normalized(norm, min(METAL_HU, norm.clip_high)), 4),
                  "clip": [round(_hu_to_normalized(norm, norm.clip_low), 4),
                           round(_hu_to_normalized(norm, norm.clip_high), 4)]}
            if self.context.dim == 3:
                thickness = int(rng.integers(1, 4))
                start = int(rng.integers(0, max(1, patch[0] - thickness + 1)))
                op["slices"] = [start, min(patch[0], start + thickness)]
            ops.append(op)
        return ops

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """Streaks added, the object set to the metal value, the result clipped to the CT range."""
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


# --- nnU-Net's intensity transforms ------------------------------------------------------------------


@register_transform("gaussian_noise", order=50)
class GaussianNoise(InPlaceTransform):
    """``{"op": "gaussian_noise", "channels": [...], "std": s, "seed": n}``: one draw for all channels."""

    short_name = "noise"
    summary_key = "std"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_gaussian_noise``: a variance from ``noise_variance`` and a seed for the field."""
        channels = self.context.channels()
        if not fires(rng, self.settings.p_gaussian_noise) or not channels:
            return []
        variance = float(rng.uniform(*self.settings.noise_variance))
        return [{"op": self.name, "channels": channels, "std": round(math.sqrt(variance), 5),
                 "seed": draw_seed(rng)}]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """Seeded normal noise added to each listed channel."""
        rng = np.random.default_rng(op["seed"])
        for c in op["channels"]:
            image[c] += rng.standard_normal(image.shape[1:], dtype=np.float32) * np.float32(op["std"])


@register_transform("poisson_noise", order=60)
class PoissonNoise(InPlaceTransform):
    """Photon-counting noise: ``{"op": "poisson_noise", "channel": c, "counts": k, "seed": n}``."""

    short_name = "poisson"
    summary_key = "counts"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """Per channel with ``p_poisson_noise``: a log-uniform count scale and a seed."""
        ops = []
        for channel in self.context.channels():
            if fires(rng, self.settings.p_poisson_noise):
                counts = float(np.exp(rng.uniform(*np.log(self.settings.poisson_counts))))
                ops.append({"op": self.name, "channel": channel, "counts": round(counts, 3),
                            "seed": draw_seed(rng)})
        return ops

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """The channel replaced by seeded Poisson counts of its value above the darkest voxel."""
        # photon-counting noise: the darkest value of the patch stands for zero counts
        channel = image[op["channel"]]
        floor = channel.min()
        counts = np.random.default_rng(op["seed"]).poisson((channel - floor).astype(np.float64) * op["counts"])
        image[op["channel"]] = (counts / op["counts"] + floor).astype(np.float32)


@register_transform("gaussian_blur", order=70)
class GaussianBlur(InPlaceTransform):
    """``{"op": "gaussian_blur", "channel": c, "sigma": [per axis]}`` (voxels)."""

    short_name = "blur"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_blur``, then per channel with ``p_blur_per_channel``: a sigma per axis."""
        s = self.settings
        if not fires(rng, s.p_blur):
            return []
        ops = []
        for channel in self.context.channels():
            if fires(rng, s.p_blur_per_channel):
                sigma = rng.uniform(*s.blur_sigma, size=self.context.dim)
                ops.append({"op": self.name, "channel": channel, "sigma": np.round(sigma, 4).tolist()})
        return ops

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """The channel smoothed with the recorded sigmas (edges repeated)."""
        c = op["channel"]
        image[c] = ndimage.gaussian_filter(image[c], sigma=op["sigma"], mode="nearest", truncate=3.0)


@register_transform("brightness", order=80)
class Brightness(InPlaceTransform):
    """Multiplicative brightness: ``{"op": "brightness", "channel": c, "factor": f}``."""

    summary_key = "factor"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_brightness``: one uniform factor per channel."""
        if not fires(rng, self.settings.p_brightness):
            return []
        return [{"op": self.name, "channel": c, "factor": round(float(rng.uniform(*self.settings.brightness)), 4)}
                for c in self.context.channels()]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """The channel times the factor."""
        image[op["channel"]] *= np.float32(op["factor"])


@register_transform("contrast", order=90)
class Contrast(InPlaceTransform):
    """Contrast around the mean, clipped to the original range: ``{"op": "contrast", "channel", "factor"}``."""

    summary_key = "factor"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_contrast``: one factor per channel, around one."""
        if not fires(rng, self.settings.p_contrast):
            return []
        return [{"op": self.name, "channel": c, "factor": round(sample_around_one(rng, self.settings.contrast), 4)}
                for c in self.context.channels()]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """Deviations from the channel mean scaled, then clipped to the channel's range."""
        channel = image[op["channel"]]
        mean, low, high = channel.mean(), channel.min(), channel.max()
        image[op["channel"]] = np.clip((channel - mean) * np.float32(op["factor"]) + mean, low, high)


@register_transform("low_resolution", order=100)
class LowResolution(InPlaceTransform):
    """Simulated low resolution: ``{"op": "low_resolution", "channel": c, "zoom": z, "axes": [...]}``."""

    short_name = "lowres"
    summary_key = "zoom"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_lowres``, then per channel with ``p_lowres_per_channel``: a zoom (not along z for dummy 2D)."""
        s = self.settings
        if not fires(rng, s.p_lowres):
            return []
        axes = list(self.context.in_plane_axes)
        return [{"op": self.name, "channel": c, "zoom": round(float(rng.uniform(*s.lowres_zoom)), 4),
                 "axes": axes}
                for c in self.context.channels() if fires(rng, s.p_lowres_per_channel)]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """The channel downsampled (nearest) along the recorded axes and upsampled back (linear)."""
        c, shape = op["channel"], image.shape[1:]
        small = [max(1, round(n * op["zoom"])) if axis in op["axes"] else n for axis, n in enumerate(shape)]
        if list(small) == list(shape):
            return
        channel = torch.from_numpy(np.ascontiguousarray(image[c]))[None, None]
        down = F.interpolate(channel, size=small, mode="nearest-exact")
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        image[c] = F.interpolate(down, size=shape, mode=mode, align_corners=False)[0, 0].numpy()


@register_transform("gamma", order=110)
class Gamma(InPlaceTransform):
    """nnU-Net's gamma: ``{"op": "gamma", "channel": c, "gamma": g, "invert": bool}``."""

    summary_key = "gamma"

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """The inverted gamma (``p_gamma_inverted``) drawn first, then the plain one (``p_gamma``)."""
        return (self._sample(rng, self.settings.p_gamma_inverted, invert=True)
                + self._sample(rng, self.settings.p_gamma, invert=False))

    def _sample(self, rng: np.random.Generator, p: float, invert: bool) -> list[dict]:
        if not fires(rng, p):
            return []
        return [{"op": self.name, "channel": c, "gamma": round(sample_around_one(rng, self.settings.gamma), 4),
                 "invert": invert} for c in self.context.channels()]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """On the [0, 1]-rescaled channel (optionally inverted), mean and std retained."""
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

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """``gamma 1.2`` or ``inv-gamma 1.2``."""
        text = super().summarize(op, digits)
        return "inv-" + text if op["invert"] and text is not None else text
