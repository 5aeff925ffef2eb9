"""The planner: pure functions from a dataset fingerprint to every value of the plan.

For the plain ``unet`` with the default 8 GB budget the planner reproduces the plans nnU-Net v2's
``ExperimentPlanner`` writes. The rules, with their thresholds:

**Target spacing (3d_fullres).** The per-axis median of the case spacings, except along a strongly
anisotropic axis: when the median spacing of the coarsest axis is more than 3x (``ANISOTROPY_THRESHOLD``)
the largest of the other axes' spacings *and* its median size (after cropping) times 3 is smaller than
the smallest of the other axes' sizes, that axis gets the 10th percentile of its spacings
(``ANISOTROPIC_PERCENTILE``), but never less than the other axes' largest spacing (then that spacing
plus 1e-5). Finer target spacing along the slow axis means less interpolation across thick slices.

**Median shape.** Each case's cropped shape resampled to the target spacing (rounded), then the
median per axis. The dataset size for the batch cap is that median's voxel count times the cases.

**Initial patch.** ``1 / spacing`` scaled to the volume of 256^3 (3D) or 2048^2 (2D), rounded, then
clipped per axis to the median shape: physical proportions, never larger than a typical image.

**Topology** (:func:`pool_and_conv_props`). Stage by stage, an axis is down-sampled (stride 2) while
its feature map is at least 2x ``MIN_EDGE`` = 4 voxels and its current spacing is less than 2x the
finest current spacing among such axes (a single remaining axis needs 3x ``MIN_EDGE``). An axis's
kernel is 1 until its current spacing is within 2x of the finest, then 3 for good: thick slices get
in-plane kernels first. The bottleneck kernel is 3 on every axis, the first stage has stride 1, and
the patch is padded up to a multiple of ``2 ** poolings`` per axis. Features start at 32 and double
per stage, capped at 320 (3D) / 512 (2D); two convolutions per encoder and decoder stage.

**Patch and batch** (:func:`fit_patch_and_batch`). While a batch of 2 does not fit the budget, the
axis whose patch edge is largest relative to the median shape shrinks by its current divisibility
(the divisibility after the reduction, as nnU-Net does, so no valid size is skipped) and the
topology is recomputed. The plain U-Net's cost is nnU-Net's feature-map proxy
(:func:`unet_feature_map_proxy`): 560e6 elements at batch 2 (3D) and 85e6 at batch 12 (2D) per 8 GB.
Then the batch is ``round(budget / cost of one sample)``, capped so that a batch covers at most 5 %
of the dataset's voxels, never below 2. Every other architecture (and the residual-encoder presets)
uses the memory estimate of the network itself (parameters, gradients, optimizer state, stored
activations, AMP) from :mod:`autoseg.networks.memory`, with the budget in bytes calibrated so that
the plain U-Net's reference point (a 128^3 patch at batch 2 in 3D, 512^2 at batch 12 in 2D) costs
exactly nnU-Net's reference (:func:`memory_budget_bytes`); its batch grows while it fits. For the
plain U-Net the same estimate checks the proxy's result: where it exceeds the byte budget (possible
away from 8 GB, where the proxy ignores fixed costs), the batch and then the patch shrink further;
the golden 8 GB plans pass unchanged. A batch may still grow when a smaller budget forces a smaller
patch (nnU-Net's order: patch first, then batch).

**3d_lowres.** Planned when the full-resolution patch covers less than 25 % of the median image:
the spacing grows in 3 % steps (only the axes finer than half the coarsest first, then all) until
the planned patch covers 25 % of the median image at that spacing; dropped when its median image
is not at least 2x smaller (in voxels) than full resolution's. With it comes **3d_cascade_fullres**
(nnU-Net's cascade): 3d_fullres's data, patch, batch and network, plus one one-hot input channel per
foreground class of 3d_lowres's prediction (``previous_stage``); it trains on 3d_lowres's
cross-validation predictions, so every 3d_lowres fold is trained first.

**2d.** The full-resolution target spacing and median shape in-plane (``y, x``) with the 2D
constants. ``Configuration.spacing`` stays a 3-tuple: its first entry is the median slice spacing,
for information only, since 2D preprocessing never resamples along z. A 2D dataset (every case
``Z == 1``) gets only the 2d configuration.

**Normalization** (:func:`normalization_for_channel`), from the channel name, case-insensitive:
``CT`` (or CT as a word, ``CT_venous``) clips to the foreground 0.5/99.5 percentiles then z-scores
with the foreground mean and std of the fingerprint's sample (nnU-Net's CTNormalization);
``noNorm``/``none`` leaves values; ``rescale_to_0_1``/``rgb_to_0_1`` rescales each image to [0, 1];
anything else (T1, T2, FLAIR, ADC, ...) z-scores each image, inside the non-zero mask when cropping
to it kept less than 3/4 of the median image (``NONZERO_MASK_CROP_RATIO``).

**Resampling.** Image order 3, label order 1 (one-hot), and along an axis whose spacing is more than
3x the finest the slow axis is resampled separately with order 0.

**Schedule.** :class:`autoseg.plan.Schedule`'s defaults (1000 epochs of 250 iterations, SGD lr 1e-2
with poly decay 0.9, 33 % foreground oversampling, Dice + CE); deep-supervision weights halve per
decoder resolution, the lowest-resolution one is 0, normalized to sum 1; mirroring along every
spatial axis; 3D patches with ``max(patch) / patch[0] > 3`` rotate in-plane only (``dummy_2d``, +-180
degrees), other 3D patches +-30 degrees, 2D patches +-180 degrees when their aspect ratio exceeds 1.5
else +-15. ``time_budget_hours`` replaces the 1000 epochs with what fits the budget according to a
short throughput probe (:func:`probe_seconds_per_iteration`) plus 15 % for validation and data loading.

Every decision is recorded with the numbers it came from; :func:`explain_plan` prints them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.dataset import DatasetJson, load_dataset_json, parse_dataset_json
from autoseg.fingerprint import (
    ChannelFingerprint,
    Fingerprint,
    IntensityStats,
    fingerprint_to_dict,
    load_or_compute_fingerprint,
    modality_from_name,
)
from autoseg.plan import (
    CONFIGURATION_NAMES,
    ChannelNormalization,
    Configuration,
    Decision,
    IntensityWindow,
    NormalizationScheme,
    Plan,
    PlanError,
    Resampling,
    Schedule,
    Topology,
    cascade_input_channels,
    save_plan,
)
from autoseg.utils import atomic_write, sha256_of_json

ANISOTROPY_THRESHOLD = 3.0
ANISOTROPIC_PERCENTILE = 10
MIN_EDGE = 4
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}
REFERENCE_ELEMENTS = {2: 85e6, 3: 560e6}
REFERENCE_BATCH = {2: 12, 3: 2}
REFERENCE_GB = 8.0
# the plain U-Net configurations whose memory estimate defines "REFERENCE_GB" for other architectures
CALIBRATION_PATCH = {2: (512, 512), 3: (128, 128, 128)}
MIN_BATCH = 2
MAX_DATASET_FRACTION = 0.05
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0
NONZERO_MASK_CROP_RATIO = 0.75
DUMMY_2D_RATIO = 3.0
TIME_BUDGET_OVERHEAD = 1.15
GIB = 2**30

CT_PRIOR_WINDOWS = (
    IntensityWindow(name="lung", low=-1000.0, high=-400.0),
    IntensityWindow(name="soft_tissue", low=-100.0, high=100.0),
    IntensityWindow(name="bone", low=400.0, high=None),
)


@dataclass(frozen=True)
class Preset:
    """A named architecture size: blocks and features per stage and its memory budget."""

    arch: str
    gpu_memory_gb: float
    blocks_encoder: tuple[int, ...]
    blocks_decoder: tuple[int, ...]
    max_dataset_fraction: float
    base_features: int = 32
    max_features: tuple[int, int] = (512, 320)  # (2D, 3D)


_RESENC_ENCODER = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
_RESENC_DECODER = (1,) * 13
# nnU-Net's residual-encoder presets (nnUNetPlannerResEncM/L/XL): sized for 8, 24 and 40 GB, and
# without the 5 % batch cap (their batch is limited by memory only)
PRESETS = {
    "resenc-m": Preset("resenc", 8.0, _RESENC_ENCODER, _RESENC_DECODER, 1.0),
    "resenc-l": Preset("resenc", 24.0, _RESENC_ENCODER, _RESENC_DECODER, 1.0),
    "resenc-xl": Preset("resenc", 40.0, _RESENC_ENCODER, _RESENC_DECODER, 1.0),
    # For machines without a GPU: a plain U-Net with a quarter of the features (about 1/16 of the
    # arithmetic per voxel) and a 2 GB activation budget, so an iteration takes about a second on
    # a few CPU cores instead of a minute. Quality is lower than the GPU plans; it exists so that
    # CPU users (and the demo) can train something useful in minutes.
    "cpu": Preset("unet", 2.0, (2,) * 14, (2,) * 13, 0.05, base_features=8, max_features=(128, 128)),
}
DEFAULT_BLOCKS = ((2,) * 14, (2,) * 13)


# --- target spacing and shapes -------------------------------------------------------------------------


def fullres_target_spacing(spacings: np.ndarray | Sequence[Sequence[float]],
                           shapes: np.ndarray | Sequence[Sequence[float]],
                           anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
                           ) -> tuple[tuple[float, ...], str]:
    """The 3d_fullres target spacing and the reason for it (see the module docstring).

    Args:
        spacings: ``(cases, axes)`` spacings.
        shapes: ``(cases, axes)`` shapes after cropping.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape != shapes.shape or len(spacings) == 0:
        raise ValueError(f"spacings {spacings.shape} and shapes {shapes.shape} must both be (cases, axes)")
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    reason = f"median of {len(spacings)} case spacings"
    if not others:
        return tuple(float(v) for v in target), reason
    other_spacing = max(target[i] for i in others)
    other_size = min(median_size[i] for i in others)
    aniso_spacing = target[worst] > anisotropy_threshold * other_spacing
    aniso_voxels = median_size[worst] * anisotropy_threshold < other_size
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE))
        if low < other_spacing:
            low = max(other_spacing, low) + 1e-5
        reason += (f"; axis {worst} is anisotropic (median spacing {target[worst]:.4g} > "
                   f"{anisotropy_threshold:g} x {other_spacing:.4g} and median size {median_size[worst]:.4g} x "
                   f"{anisotropy_threshold:g} < {other_size:.4g}), so it takes the "
                   f"{ANISOTROPIC_PERCENTILE}th percentile of its spacings, {low:.4g}")
        target[worst] = low
    return tuple(float(v) for v in target), reason


def resampled_shapes(spacings: np.ndarray, shapes: np.ndarray, target: Sequence[float]) -> np.ndarray:
    """Each case's shape at the target spacing, rounded (``(cases, axes)``)."""
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    return np.round(shapes * spacings / np.asarray(target, dtype=np.float64))


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float], dim: int) -> tuple[float, ...]:
    """The starting patch: ``1 / spacing`` scaled to 256^3 (3D) or 2048^2 (2D) voxels, clipped to the median.

    ``spacing`` and ``median_shape`` may have 3 entries for a 2D configuration; the last ``dim`` are used.
    Entries are floats because a median of an even number of cases can end in .5; they become
    integers when the topology pads them to its divisibility.
    """
    spacing = np.asarray(spacing, dtype=np.float64)[-dim:]
    median_shape = np.asarray(median_shape, dtype=np.float64)[-dim:]
    inverse = 1.0 / spacing
    edge = INITIAL_PATCH_EDGE[dim]
    scaled = inverse * (edge**dim / np.prod(inverse)) ** (1.0 / dim)
    return tuple(float(min(round(s), m)) for s, m in zip(scaled, median_shape))


# --- topology ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolConvProps:
    """Strides and kernels per stage for a patch, and the patch padded to the total stride."""

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    num_pool_per_axis: tuple[int, ...]
    divisible_by: tuple[int, ...]
    patch_size: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides)


def pool_and_conv_props(spacing: Sequence[float], patch: Sequence[float], min_edge: int = MIN_EDGE) -> PoolConvProps:
    """Down-sampling strides and kernel sizes per stage (nnU-Net's ``get_pool_and_conv_props``).

    The first stage has stride 1; see the module docstring for the rules. ``patch_size`` in the
    result is ``patch`` padded up to a multiple of ``2 ** num_pool_per_axis``.
    """
    dim = len(spacing)
    if len(patch) != dim:
        raise ValueError(f"patch {list(patch)} and spacing {list(spacing)} differ in length")
    current_spacing = [float(s) for s in spacing]
    current_size = [float(p) for p in patch]
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    num_pool = [0] * dim
    kernel = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        for d in range(dim):
            # once 3, a kernel stays 3 (nnU-Net); 1 until the axis' spacing catches up
            if kernel[d] != 3 and current_spacing[d] / min(current_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for axis in valid:
            stride[axis] = 2
            num_pool[axis] += 1
            current_spacing[axis] *= 2
            current_size[axis] = math.ceil(current_size[axis] / 2)
        strides.append(tuple(stride))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dim)
    divisible = tuple(2**n for n in num_pool)
    padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, divisible))
    return PoolConvProps(tuple(strides), tuple(kernels), tuple(num_pool), divisible, padded)


def features_per_stage(num_stages: int, dim: int, base: int = BASE_FEATURES,
                       cap: int | None = None) -> tuple[int, ...]:
    """Features per stage: ``base`` doubling per stage, capped at ``cap`` (default 320 in 3D, 512 in 2D)."""
    cap = MAX_FEATURES[dim] if cap is None else cap
    return tuple(min(cap, base * 2**i) for i in range(num_stages))


def _blocks(table: Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(table[min(i, len(table) - 1)] for i in range(n))


def build_topology(props: PoolConvProps, arch: str, in_channels: int, num_classes: int,
                   blocks_encoder: Sequence[int] = DEFAULT_BLOCKS[0],
                   blocks_decoder: Sequence[int] = DEFAULT_BLOCKS[1],
                   options: dict[str, Any] | None = None, base_features: int = BASE_FEATURES,
                   max_features: int | None = None) -> Topology:
    """The :class:`Topology` for pooling properties (features doubling from 32, deep supervision on)."""
    n = props.num_stages
    dim = len(props.patch_size)
    return Topology(arch=arch, dim=dim, in_channels=in_channels, num_classes=num_classes,
                    features_per_stage=features_per_stage(n, dim, base_features, max_features),
                    kernel_sizes=props.kernel_sizes,
                    strides=props.strides, n_conv_per_stage=_blocks(blocks_encoder, n),
                    n_conv_per_stage_decoder=_blocks(blocks_decoder, n - 1), deep_supervision=True,
                    options=dict(options or {}))


def unet_feature_map_proxy(topology: Topology, patch: Sequence[int], deep_supervision: bool = False) -> int:
    """nnU-Net's memory proxy for the plain U-Net: the number of feature-map elements of one sample.

    Encoder stage ``s`` contributes ``n_conv * features[s] * prod(size after its stride)``; each
    decoder stage its convolutions, its transposed convolution's output and (with deep supervision,
    or at full resolution) its segmentation output, at the size of the skip it joins.
    ``deep_supervision`` defaults to False because nnU-Net's planner builds the network with
    PlainConvUNet's default (no deep supervision); both settings give the golden plans.
    """
    size = [int(p) for p in patch]
    total = 0
    skips = []
    for s, stride in enumerate(topology.strides):
        size = [i // j for i, j in zip(size, stride)]
        total += topology.n_conv_per_stage[s] * topology.features_per_stage[s] * math.prod(size)
        if s < topology.num_stages - 1:
            skips.append(size)
    n_decoder = topology.num_stages - 1
    for s in range(n_decoder):
        at = math.prod(skips[-(s + 1)])
        features = topology.features_per_stage[-(s + 2)]
        total += (topology.n_conv_per_stage_decoder[s] + 1) * features * at
        if deep_supervision or s == n_decoder - 1:
            total += topology.num_classes * at
    return int(total)


# --- patch and batch ----------------------------------------------------------------------------------

CostFunction = Callable[[PoolConvProps, int], float]


@dataclass(frozen=True)
class PatchFit:
    """The fitted patch and batch, and the numbers behind them."""

    props: PoolConvProps
    batch_size: int
    batch_from_memory: int
    batch_cap: int
    cost: float
    budget: float
    initial_patch: tuple[float, ...]
    reductions: int

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.props.patch_size


def _axes_by_excess(patch: Sequence[int], median_shape: Sequence[float]) -> list[int]:
    ratios = [p / m for p, m in zip(patch, median_shape)]
    # largest ratio first; ties go to the later axis, as nnU-Net's argsort(...)[-1] does
    return sorted(range(len(ratios)), key=lambda i: (ratios[i], i), reverse=True)


def fit_patch_and_batch(spacing: Sequence[float], median_shape: Sequence[float], cost: CostFunction,
                        budget: float, dataset_voxels: float, *, linear_batch: bool = True,
                        min_batch: int = MIN_BATCH, max_dataset_fraction: float = MAX_DATASET_FRACTION,
                        min_edge: int = MIN_EDGE, min_stages: int = 2) -> PatchFit:
    """Shrink the patch until a batch of ``min_batch`` fits ``budget``, then size the batch.

    Args:
        spacing, median_shape: of the configuration, ``dim`` entries each.
        cost: ``cost(props, batch)``, the estimated cost of a training step in the budget's unit.
        budget: what one training step may cost.
        dataset_voxels: median image voxels times cases, for the cap on the batch.
        linear_batch: the cost is proportional to the batch (nnU-Net's proxy): the batch is
            ``round(budget / cost(props, 1))``. Otherwise the cost is affine in the batch (fixed
            parameter and optimizer memory plus activations per sample) and the batch is the largest
            that fits.
        min_stages: a reduction that would leave fewer stages is not taken (an encoder-decoder
            needs two); when no axis can shrink, :class:`PlanError` asks for more memory.
    """
    dim = len(spacing)
    if len(median_shape) != dim:
        raise ValueError(f"median_shape {list(median_shape)} and spacing {list(spacing)} differ in length")
    start = initial_patch_size(spacing, median_shape, dim)
    props = pool_and_conv_props(spacing, start, min_edge)
    estimate = cost(props, min_batch)

    def too_small(estimate: float, patch: Sequence[int]) -> PlanError:
        return PlanError(f"even a patch of {'x'.join(map(str, patch))} needs an estimated {estimate:.4g} for a batch "
                         f"of {min_batch}, more than the budget {budget:.4g}; raise --gpu-memory-gb")

    if estimate > budget:
        # fail fast when not even the smallest encoder-decoder (two stages) fits
        smallest = pool_and_conv_props(spacing, [2 * min_edge] * dim, min_edge)
        if smallest.num_stages >= min_stages and cost(smallest, min_batch) > budget:
            raise too_small(cost(smallest, min_batch), smallest.patch_size)
    reductions = 0
    while estimate > budget:
        patch = list(props.patch_size)
        for axis in _axes_by_excess(patch, median_shape):
            trial = list(patch)
            trial[axis] -= props.divisible_by[axis]
            step = pool_and_conv_props(spacing, trial, min_edge).divisible_by[axis]
            trial[axis] = patch[axis] - step
            if trial[axis] >= 1 and pool_and_conv_props(spacing, trial, min_edge).num_stages >= min_stages:
                patch = trial
                break
        else:
            raise too_small(estimate, patch)
        props = pool_and_conv_props(spacing, patch, min_edge)
        estimate = cost(props, min_batch)
        reductions += 1
    if linear_batch:
        batch_from_memory = int(round(budget / cost(props, 1)))
    else:
        one, two = cost(props, 1), cost(props, 2)
        per_sample = max(two - one, 1e-12)
        batch_from_memory = max(min_batch, int((budget - (one - per_sample)) // per_sample))
        while batch_from_memory > min_batch and cost(props, batch_from_memory) > budget:
            batch_from_memory -= 1
    cap = int(round(dataset_voxels * max_dataset_fraction / math.prod(props.patch_size)))
    batch = max(min(batch_from_memory, cap), min_batch)
    return PatchFit(props=props, batch_size=batch, batch_from_memory=batch_from_memory, batch_cap=cap,
                    cost=float(cost(props, batch)), budget=float(budget), initial_patch=start,
                    reductions=reductions)


# --- memory estimates -------------------------------------------------------------------------------


def _memory_estimate(topology: Topology, patch: Sequence[int], batch: int) -> Any:
    try:
        from autoseg.networks.memory import estimate_training_memory
    except ImportError as error:
        raise PlanError(f"the memory estimate needs autoseg.networks.memory ({error})") from None
    try:
        return estimate_training_memory(topology, tuple(int(p) for p in patch), int(batch), amp=True)
    except ValueError as error:
        raise PlanError(f"cannot estimate the memory of {topology.arch!r} at patch {list(patch)}: {error}") from None


def estimate_memory_bytes(topology: Topology, patch: Sequence[int], batch: int) -> float:
    """Training memory (bytes, AMP, CUDA context included) of the network built from ``topology``.

    From :func:`autoseg.networks.memory.estimate_training_memory`: parameters, gradients, momentum,
    the activations autograd stores, the backward peak, cuDNN workspace and the CUDA context.
    """
    return float(_memory_estimate(topology, patch, batch).total)


def memory_budget_bytes(dim: int, gpu_memory_gb: float) -> float:
    """The training-memory budget in bytes for ``gpu_memory_gb``, calibrated on the plain U-Net.

    nnU-Net allows ``REFERENCE_ELEMENTS`` feature-map elements per sample at its reference batch per
    8 GB. The plain U-Net at ``CALIBRATION_PATCH`` (spacing 1, one channel, two classes) and the
    reference batch has ``proxy`` such elements and an estimated ``total`` bytes, of which ``fixed``
    (cuDNN workspace and CUDA context) do not grow with the network. The budget is
    ``fixed + (total - fixed) * REFERENCE_ELEMENTS / proxy * gpu_memory_gb / 8``: the byte estimate
    and nnU-Net's proxy agree at the reference point, and only the part that scales with the
    feature maps scales with the GPU.
    """
    props = pool_and_conv_props((1.0,) * dim, CALIBRATION_PATCH[dim])
    topology = build_topology(props, "unet", 1, 2)
    proxy = unet_feature_map_proxy(topology, props.patch_size)
    estimate = _memory_estimate(topology, props.patch_size, REFERENCE_BATCH[dim])
    fixed = float(estimate.workspace + estimate.cuda_context)
    return fixed + (estimate.total - fixed) * REFERENCE_ELEMENTS[dim] / proxy * gpu_memory_gb / REFERENCE_GB


# --- normalization ----------------------------------------------------------------------------------

_NO_NORM_NAMES = {"nonorm", "none", "no_norm", "no norm", "nonormalization"}
_RESCALE_NAMES = {"rescale_to_0_1", "rgb_to_0_1", "rescale01", "rescale"}


def scheme_for_name(name: str) -> NormalizationScheme:
    """The normalization scheme a channel name asks for (see the module docstring)."""
    key = name.strip().lower()
    if key in _NO_NORM_NAMES:
        return "none"
    if key in _RESCALE_NAMES:
        return "rescale01"
    if key == "zscore":
        return "zscore"
    if modality_from_name(name) == "ct":
        return "ct"
    return "zscore"


def normalization_for_channel(name: str, channel_stats: ChannelFingerprint | IntensityStats | None,
                              cropping_ratio: float) -> tuple[ChannelNormalization, str]:
    """How to normalize one channel, and why.

    Args:
        name: the channel name from ``dataset.json``.
        channel_stats: the fingerprint's foreground statistics of the channel (needed for CT).
        cropping_ratio: median relative size of the images after cropping to their non-zero region.
    """
    scheme = scheme_for_name(name)
    if scheme == "ct":
        stats = channel_stats.foreground if isinstance(channel_stats, ChannelFingerprint) else channel_stats
        if stats is None or not stats.count:
            raise PlanError(f"channel {name!r} is CT but the fingerprint has no foreground intensities for it "
                            "(no labelled voxels?), so CT normalization has no clip values")
        std = max(float(stats.std), 1e-8)
        normalization = ChannelNormalization(channel=name, scheme="ct", clip_low=stats.percentile_00_5,
                                             clip_high=stats.percentile_99_5, mean=stats.mean, std=std)
        reason = (f"named {name!r} (CT): clip to the foreground 0.5/99.5 percentiles "
                  f"[{stats.percentile_00_5:.6g}, {stats.percentile_99_5:.6g}], then (x - {stats.mean:.6g}) / "
                  f"{std:.6g} (foreground mean and std of {stats.count} sampled voxels)")
        return normalization, reason
    if scheme == "zscore":
        use_mask = cropping_ratio < NONZERO_MASK_CROP_RATIO
        where = (f"inside the non-zero mask, since cropping to it keeps {cropping_ratio:.0%} < "
                 f"{NONZERO_MASK_CROP_RATIO:.0%} of the median image") if use_mask else (
                 f"over the whole image (cropping keeps {cropping_ratio:.0%} >= {NONZERO_MASK_CROP_RATIO:.0%})")
        return (ChannelNormalization(channel=name, scheme="zscore", use_nonzero_mask=use_mask),
                f"named {name!r} ({modality_from_name(name)}): z-score per image {where}")
    if scheme == "rescale01":
        return (ChannelNormalization(channel=name, scheme="rescale01"),
                f"named {name!r}: rescale each image to [0, 1]")
    return ChannelNormalization(channel=name, scheme="none"), f"named {name!r}: values used as they are"


# --- schedule ------------------------------------------------------------------------------------------


def deep_supervision_weights(num_stages: int) -> tuple[float, ...]:
    """Loss weights of the decoder outputs, full resolution first: halving, lowest 0, sum 1."""
    n = num_stages - 1
    if n <= 1:
        return (1.0,) * n
    weights = np.array([1 / 2**i for i in range(n)])
    weights[-1] = 0.0
    return tuple(float(w) for w in weights / weights.sum())


def augmentation_options(patch: Sequence[int]) -> tuple[dict[str, Any], str]:
    """Rotation range and the in-plane-only ("dummy 2D") switch for a patch (nnU-Net's rule)."""
    if len(patch) == 3:
        dummy_2d = max(patch) / patch[0] > DUMMY_2D_RATIO
        degrees = 180.0 if dummy_2d else 30.0
        reason = (f"max(patch) / patch[0] = {max(patch) / patch[0]:.3g} {'>' if dummy_2d else '<='} "
                  f"{DUMMY_2D_RATIO:g}: " + ("rotate in-plane only, +-180 degrees" if dummy_2d else
                                              "3D rotations +-30 degrees"))
        return {"dummy_2d": dummy_2d, "rotation_degrees": degrees}, reason
    aspect = max(patch) / min(patch)
    degrees = 180.0 if aspect > 1.5 else 15.0
    return ({"dummy_2d": False, "rotation_degrees": degrees},
            f"2D patch aspect ratio {aspect:.3g} {'>' if aspect > 1.5 else '<='} 1.5: rotations +-{degrees:g} degrees")


# --- configurations -----------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every configuration of one plan shares."""

    arch: str
    in_channels: int
    num_classes: int
    blocks_encoder: tuple[int, ...]
    blocks_decoder: tuple[int, ...]
    gpu_memory_gb: float
    max_dataset_fraction: float
    num_cases: int
    normalization: tuple[ChannelNormalization, ...]
    ct_priors: tuple[IntensityWindow, ...]
    base_features: int = BASE_FEATURES
    max_features: tuple[int, int] = (MAX_FEATURES[2], MAX_FEATURES[3])
    decisions: list[Decision] = field(default_factory=list)
    _budget_cache: dict[int, float] = field(default_factory=dict)
    _cost_cache: dict[tuple, float] = field(default_factory=dict)

    @property
    def uses_proxy(self) -> bool:
        return (self.arch == "unet" and self.blocks_encoder == DEFAULT_BLOCKS[0]
                and self.base_features == BASE_FEATURES
                and self.max_features == (MAX_FEATURES[2], MAX_FEATURES[3]))

    def note(self, configuration: str, key: str, value: object, reason: str) -> None:
        self.decisions.append(Decision(configuration=configuration, key=key, value=_fmt(value), reason=reason))

    def topology(self, props: PoolConvProps) -> Topology:
        dim = len(props.patch_size)
        return build_topology(props, self.arch, self.in_channels, self.num_classes,
                              self.blocks_encoder, self.blocks_decoder, base_features=self.base_features,
                              max_features=self.max_features[dim - 2])

    def budget_bytes(self, dim: int) -> float:
        if dim not in self._budget_cache:
            self._budget_cache[dim] = memory_budget_bytes(dim, self.gpu_memory_gb)
        return self._budget_cache[dim]

    def cost_function(self, dim: int) -> tuple[CostFunction, float, bool, str]:
        """``(cost, budget, linear_batch, unit)`` for this plan's architecture."""
        if self.uses_proxy:
            budget = REFERENCE_ELEMENTS[dim] * self.gpu_memory_gb / REFERENCE_GB * REFERENCE_BATCH[dim]

            def proxy_cost(props: PoolConvProps, batch: int) -> float:
                key = ("proxy", props.patch_size, props.strides)
                if key not in self._cost_cache:
                    self._cost_cache[key] = unet_feature_map_proxy(self.topology(props), props.patch_size)
                return self._cost_cache[key] * batch

            return proxy_cost, budget, True, "feature-map elements"

        return self.memory_cost, self.budget_bytes(dim), False, "bytes"

    def memory_cost(self, props: PoolConvProps, batch: int) -> float:
        """Network-based training memory (bytes) of this plan's architecture at a patch and batch."""
        key = ("bytes", props.patch_size, props.strides, batch)
        if key not in self._cost_cache:
            self._cost_cache[key] = estimate_memory_bytes(self.topology(props), props.patch_size, batch)
        return self._cost_cache[key]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(v, (tuple, list)) for v in value):
            return " ".join("x".join(str(i) for i in v) for v in value)
        if all(isinstance(v, int) for v in value):
            return "x".join(str(v) for v in value)
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _plan_configuration(ctx: _Context, name: str, spacing3: tuple[float, float, float],
                        median_shape: Sequence[float], dataset_voxels: float, dim: int,
                        quiet: bool = False) -> tuple[Configuration, PatchFit]:
    """Fit one configuration; ``median_shape`` has ``dim`` entries (``y, x`` for 2d)."""
    spacing = tuple(spacing3[-dim:])
    cost, budget, linear, unit = ctx.cost_function(dim)
    first_fit = fit = fit_patch_and_batch(spacing, median_shape, cost, budget, dataset_voxels,
                                          linear_batch=linear, max_dataset_fraction=ctx.max_dataset_fraction)
    check = None
    if ctx.uses_proxy and not quiet:
        fit, check = _check_with_network_estimate(ctx, dim, spacing, median_shape, dataset_voxels, fit)
    topology = ctx.topology(fit.props)
    patch = fit.patch_size
    # the low-resolution search plans many throw-away configurations: skip their estimate
    estimated_gb, memory_reason = (0.0, "") if quiet else _estimated_gb(ctx, dim, topology, fit)
    schedule_aug, aug_reason = augmentation_options(patch)
    schedule = Schedule(deep_supervision_weights=deep_supervision_weights(topology.num_stages),
                        mirror_axes=tuple(range(dim)), augmentation_options=schedule_aug)
    anisotropic = max(spacing3[-dim:]) / min(spacing3[-dim:]) > ANISOTROPY_THRESHOLD
    configuration = Configuration(
        name=name, spacing=spacing3, patch_size=patch, batch_size=fit.batch_size,
        median_shape=tuple(int(round(m)) for m in median_shape), normalization=ctx.normalization,
        topology=topology, resampling=Resampling(anisotropy_threshold=ANISOTROPY_THRESHOLD),
        schedule=schedule, estimated_memory_gb=round(estimated_gb, 4), ct_priors=ctx.ct_priors)
    if quiet:
        return configuration, fit
    note = ctx.note
    note(name, "median_shape", configuration.median_shape,
         f"median over {ctx.num_cases} cases of the cropped shape at spacing {_fmt(spacing)}")
    note(name, "initial_patch", fit.initial_patch,
         f"1/spacing scaled to {INITIAL_PATCH_EDGE[dim]}^{dim} voxels, clipped to the median shape")
    note(name, "patch_size", first_fit.patch_size,
         f"{first_fit.reductions} reduction(s) of the axis largest relative to the median shape until a batch "
         f"of {MIN_BATCH} costs {cost(first_fit.props, MIN_BATCH):.4g} <= budget {budget:.4g} {unit}; padded to "
         f"a multiple of {_fmt(first_fit.props.divisible_by)}")
    note(name, "batch_size", first_fit.batch_size,
         f"memory allows {first_fit.batch_from_memory} ({'round' if linear else 'largest fitting'} of budget / "
         f"cost), {ctx.max_dataset_fraction:.0%} of the dataset's {dataset_voxels:.4g} voxels allows "
         f"{first_fit.batch_cap} patches of {math.prod(first_fit.patch_size)} voxels; minimum {MIN_BATCH}")
    if check is not None:
        note(name, "memory_check", f"{_fmt(patch)}, batch {fit.batch_size}", check)
    note(name, "strides", topology.strides,
         f"pool an axis while its feature map is >= {2 * MIN_EDGE} voxels and its spacing < 2x the finest; "
         f"bottleneck {_fmt(tuple(p // s for p, s in zip(patch, topology.total_stride)))}")
    note(name, "kernel_sizes", topology.kernel_sizes,
         "kernel 1 along an axis until its spacing is within 2x of the finest, then 3")
    note(name, "features_per_stage", ", ".join(str(f) for f in topology.features_per_stage),
         f"{ctx.base_features} doubling per stage, capped at {ctx.max_features[dim - 2]}; {topology.num_stages} "
         "stages with "
         f"{', '.join(str(n) for n in topology.n_conv_per_stage)} block(s) per encoder stage")
    note(name, "estimated_memory_gb", round(estimated_gb, 3), memory_reason)
    note(name, "resampling", "image order 3, label order 1",
         (f"spacing {_fmt(spacing)} is anisotropic (> {ANISOTROPY_THRESHOLD:g}x): the slow axis is resampled "
          "separately with order 0") if anisotropic else
         f"no axis is more than {ANISOTROPY_THRESHOLD:g}x coarser than the finest")
    note(name, "augmentation", _fmt(tuple(f"{k}={v}" for k, v in schedule_aug.items())), aug_reason)
    note(name, "deep_supervision_weights", schedule.deep_supervision_weights,
         "halving per decoder resolution, lowest resolution 0, normalized to sum 1")
    return configuration, fit


def _check_with_network_estimate(ctx: _Context, dim: int, spacing: Sequence[float], median_shape: Sequence[float],
                                 dataset_voxels: float, fit: PatchFit) -> tuple[PatchFit, str]:
    """The network-based estimate as a check on nnU-Net's proxy: it may only make the plan smaller.

    If the proxy's patch and batch exceed the calibrated byte budget, the batch shrinks first (not
    below ``MIN_BATCH``), then the patch continues along the same reduction sequence with the byte
    estimate as cost. At 8 GB the golden plans pass unchanged.
    """
    try:
        budget = ctx.budget_bytes(dim)
        estimate = ctx.memory_cost(fit.props, fit.batch_size)
    except PlanError as error:
        return fit, f"no network-based check ({error})"
    if estimate <= budget:
        return fit, (f"network-based estimate {estimate / GIB:.3g} GiB <= calibrated budget {budget / GIB:.3g} GiB: "
                     "the proxy's plan is kept")
    batch = fit.batch_size
    while batch > MIN_BATCH and ctx.memory_cost(fit.props, batch) > budget:
        batch -= 1
    if ctx.memory_cost(fit.props, batch) <= budget:
        smaller = dataclasses.replace(fit, batch_size=batch, cost=ctx.memory_cost(fit.props, batch), budget=budget)
        return smaller, (f"network-based estimate {estimate / GIB:.3g} GiB > calibrated budget {budget / GIB:.3g} "
                         f"GiB at batch {fit.batch_size}: batch reduced to {batch}")
    refit = fit_patch_and_batch(spacing, median_shape, ctx.memory_cost, budget, dataset_voxels, linear_batch=False,
                                max_dataset_fraction=ctx.max_dataset_fraction)
    return refit, (f"network-based estimate {estimate / GIB:.3g} GiB > calibrated budget {budget / GIB:.3g} GiB even "
                   f"at batch {MIN_BATCH}: the patch shrinks further by the same rule with the network-based cost")


def _estimated_gb(ctx: _Context, dim: int, topology: Topology, fit: PatchFit) -> tuple[float, str]:
    """Estimated training memory in GiB (the network-based estimate when available), and its reason.

    For the proxy-planned U-Net without :mod:`autoseg.networks.memory`: the proxy's share of the
    budget times the nominal GPU memory.
    """
    share = f"{fit.cost:.4g} of the budget {fit.budget:.4g}"
    if not ctx.uses_proxy:
        return fit.cost / GIB, (f"network-based estimate (parameters, gradients, momentum, activations, AMP) "
                                f"for the batch: {share} bytes, calibrated for {ctx.gpu_memory_gb:g} GB")
    try:
        estimate = estimate_memory_bytes(topology, fit.patch_size, fit.batch_size)
        budget = ctx.budget_bytes(dim)
    except PlanError:
        return fit.cost / fit.budget * ctx.gpu_memory_gb, (
            f"feature-map proxy: {share} elements for {ctx.gpu_memory_gb:g} GB (no network-based estimate)")
    return estimate / GIB, (f"network-based estimate (parameters, gradients, momentum, activations, AMP, CUDA "
                            f"context) {estimate / GIB:.3g} GiB; calibrated budget {budget / GIB:.3g} GiB for "
                            f"{ctx.gpu_memory_gb:g} GB")


def _lowres(ctx: _Context, fullres: Configuration, fullres_median: np.ndarray,
            ) -> tuple[Configuration | None, str]:
    """Plan 3d_lowres (or explain why not), nnU-Net's spacing search."""
    median_voxels = float(np.prod(fullres_median))
    patch_voxels = float(math.prod(fullres.patch_size))
    coverage = patch_voxels / median_voxels
    if coverage >= LOWRES_THRESHOLD:
        return None, (f"not needed: the 3d_fullres patch covers {coverage:.0%} >= {LOWRES_THRESHOLD:.0%} of the "
                      "median image")
    fullres_spacing = np.array(fullres.spacing, dtype=np.float64)
    spacing = fullres_spacing.copy()
    lowres = None
    lowres_voxels = median_voxels
    for _ in range(10_000):
        if patch_voxels / lowres_voxels >= LOWRES_THRESHOLD:
            break
        coarse = spacing.max() / spacing > 2
        if coarse.any():
            spacing[coarse] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        shape = fullres_spacing / spacing * fullres_median
        lowres_voxels = float(np.prod(shape))
        lowres, _ = _plan_configuration(ctx, "3d_lowres", tuple(float(s) for s in spacing),
                                        tuple(float(round(s)) for s in shape), lowres_voxels * ctx.num_cases, 3,
                                        quiet=True)
        patch_voxels = float(math.prod(lowres.patch_size))
    shrink = median_voxels / lowres_voxels
    if lowres is None or shrink < LOWRES_MIN_SHRINK:
        return None, (f"dropped: the 3d_fullres patch covers {coverage:.0%} < {LOWRES_THRESHOLD:.0%} of the median "
                      f"image, but the low-resolution median image would be only {shrink:.3g}x smaller "
                      f"(< {LOWRES_MIN_SHRINK:g}x)")
    return lowres, (f"the 3d_fullres patch covers {coverage:.0%} < {LOWRES_THRESHOLD:.0%} of the median image: "
                    f"spacing raised in {LOWRES_SPACING_STEP - 1:.0%} steps to {_fmt(lowres.spacing)}, where the "
                    f"patch covers >= {LOWRES_THRESHOLD:.0%} of a {shrink:.3g}x smaller median image")


def _as_dataset_json(dataset_json: DatasetJson | dict | str | os.PathLike) -> DatasetJson:
    if isinstance(dataset_json, DatasetJson):
        return dataset_json
    if isinstance(dataset_json, dict):
        model, problems = parse_dataset_json(dataset_json)
        if model is None:
            raise PlanError("dataset.json is invalid:\n" + "\n".join(problems))
        return model
    return load_dataset_json(dataset_json)


def num_output_classes(dataset: DatasetJson) -> int:
    """Network outputs: label values incl. background (the ``ignore`` label excluded), or regions."""
    if dataset.has_regions:
        return len(dataset.foreground_labels)
    return len([k for k in dataset.labels if k != "ignore"])


def make_plan(fingerprint: Fingerprint, dataset_json: DatasetJson | dict | str | os.PathLike,
              gpu_memory_gb: float | None = None, configurations: Sequence[str] | None = None,
              arch: str = "unet", preset: str | None = None, ct_priors: bool = False,
              time_budget_hours: float | None = None, device: str = "cpu",
              probe_max_seconds: float = 20.0) -> Plan:
    """Derive the whole plan from a fingerprint (no image is read).

    Args:
        fingerprint: from :func:`autoseg.fingerprint.compute_fingerprint`.
        dataset_json: the dataset's ``dataset.json`` (model, dict or path).
        gpu_memory_gb: training-memory budget; default 8, or the preset's size.
        configurations: names to keep (default all that apply: ``2d``, ``3d_fullres``, ``3d_lowres``).
        arch: network architecture from the registry (``unet`` is planned with nnU-Net's proxy, any
            other with the network-based memory estimate).
        preset: ``resenc-m``, ``resenc-l`` or ``resenc-xl`` (residual encoder sized for 8/24/40 GB).
        ct_priors: add Hounsfield-window prior channels (lung, soft tissue, bone) for the first CT channel.
        time_budget_hours: set epochs from a throughput probe on ``device`` instead of 1000.
        device: where the time-budget probe runs (``cpu``, ``cuda``).
        probe_max_seconds: bound on the probe's timed steps per configuration (after one warm-up step).
    """
    dataset = _as_dataset_json(dataset_json)
    if list(fingerprint.channel_names) != dataset.channel_list:
        raise PlanError(f"the fingerprint's channels {list(fingerprint.channel_names)} differ from dataset.json's "
                        f"{dataset.channel_list}; recompute the fingerprint")
    if configurations is not None:
        unknown = [c for c in configurations if c not in CONFIGURATION_NAMES]
        if unknown:
            raise PlanError(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGURATION_NAMES)}")
    blocks = DEFAULT_BLOCKS
    max_fraction = MAX_DATASET_FRACTION
    base_features, max_features = BASE_FEATURES, (MAX_FEATURES[2], MAX_FEATURES[3])
    if preset is not None:
        if preset not in PRESETS:
            raise PlanError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        chosen = PRESETS[preset]
        if arch not in ("unet", chosen.arch):
            raise PlanError(f"preset {preset!r} sets the architecture {chosen.arch!r}, but --arch {arch!r} was given")
        arch = chosen.arch
        blocks = (chosen.blocks_encoder, chosen.blocks_decoder)
        max_fraction = chosen.max_dataset_fraction
        base_features, max_features = chosen.base_features, chosen.max_features
        gpu_memory_gb = chosen.gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
    gpu_memory_gb = REFERENCE_GB if gpu_memory_gb is None else float(gpu_memory_gb)
    if not gpu_memory_gb > 0:
        raise PlanError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb}")
    _check_arch(arch)

    names = dataset.channel_list
    normalizations, norm_reasons = [], []
    for name, channel in zip(names, fingerprint.channels):
        normalization, reason = normalization_for_channel(name, channel, fingerprint.median_relative_size_after_crop)
        normalizations.append(normalization)
        norm_reasons.append(reason)
    ct_channels = [n.channel for n in normalizations if n.scheme == "ct"]
    priors = CT_PRIOR_WINDOWS if ct_priors and ct_channels else ()

    ctx = _Context(arch=arch, in_channels=len(names) + len(priors), num_classes=num_output_classes(dataset),
                   blocks_encoder=tuple(blocks[0]), blocks_decoder=tuple(blocks[1]), gpu_memory_gb=gpu_memory_gb,
                   max_dataset_fraction=max_fraction, num_cases=fingerprint.num_cases,
                   base_features=base_features, max_features=max_features,
                   normalization=tuple(normalizations), ct_priors=priors)
    ctx.note("dataset", "architecture", arch,
             f"preset {preset}" if preset else ("nnU-Net's plain U-Net, planned with its feature-map proxy"
                                                if ctx.uses_proxy else "from --arch; planned with its memory estimate"))
    sized_for = PRESETS[preset].gpu_memory_gb if preset else None
    ctx.note("dataset", "gpu_memory_gb", gpu_memory_gb, "training-memory budget per configuration" + (
        f" (preset {preset} is sized for {sized_for:g} GB; the given budget wins)"
        if sized_for is not None and sized_for != gpu_memory_gb else ""))
    ctx.note("dataset", "num_classes", ctx.num_classes,
             "regions (sigmoid outputs)" if dataset.has_regions else "label values incl. background (softmax)")
    for normalization, reason in zip(normalizations, norm_reasons):
        ctx.note("dataset", f"normalization[{normalization.channel}]", normalization.scheme, reason)
    if ct_priors:
        ctx.note("dataset", "ct_priors", ", ".join(w.name for w in priors) or "none",
                 f"Hounsfield windows of channel {ct_channels[0]!r} as 3 extra input channels" if priors
                 else "requested, but no channel is CT")
    for warning in fingerprint.warnings:
        ctx.note("dataset", "fingerprint_warning", "", warning)

    spacings, shapes = fingerprint.spacings, fingerprint.shapes_after_crop
    planned: dict[str, Configuration] = {}
    wanted = set(configurations or CONFIGURATION_NAMES)
    if fingerprint.is_2d and "2d" not in wanted:
        pass
    elif fingerprint.is_2d:
        target = (1.0, *(float(v) for v in np.median(spacings[:, 1:], axis=0)))
        median = np.median(resampled_shapes(spacings, shapes, target), axis=0)
        ctx.note("2d", "spacing", target, "2D dataset: median in-plane spacing; only the 2d configuration")
        planned["2d"], _ = _plan_configuration(ctx, "2d", target, tuple(median[1:]),
                                               float(np.prod(median)) * fingerprint.num_cases, 2)
    else:
        target, reason = fullres_target_spacing(spacings, shapes)
        median = np.median(resampled_shapes(spacings, shapes, target), axis=0)
        dataset_voxels = float(np.prod(median)) * fingerprint.num_cases
        if "3d_cascade_fullres" in wanted and configurations is not None:
            # the cascade trains on 3d_fullres's data and 3d_lowres's predictions: plan both
            wanted |= {"3d_fullres", "3d_lowres"}
        if wanted & {"3d_fullres", "3d_lowres"}:
            ctx.note("3d_fullres", "spacing", target, reason)
            fullres, _ = _plan_configuration(ctx, "3d_fullres", tuple(target), tuple(median), dataset_voxels, 3)
            lowres, lowres_reason = _lowres(ctx, fullres, median)
            ctx.note("3d_lowres", "configuration", "planned" if lowres else "none", lowres_reason)
            if lowres is not None:
                ctx.note("3d_lowres", "spacing", lowres.spacing,
                         f"{_fmt(tuple(lo / hi for lo, hi in zip(lowres.spacing, fullres.spacing)))} x the "
                         "3d_fullres spacing")
                lowres_median = np.array(fullres.spacing) / np.array(lowres.spacing) * median
                lowres, _ = _plan_configuration(ctx, "3d_lowres", lowres.spacing,
                                                tuple(float(round(s)) for s in lowres_median),
                                                float(np.prod(lowres_median)) * fingerprint.num_cases, 3)
                if "3d_lowres" in wanted:
                    planned["3d_lowres"] = lowres
            if "3d_fullres" in wanted:
                planned["3d_fullres"] = fullres
            if "3d_cascade_fullres" in wanted and "3d_lowres" in planned and "3d_fullres" in planned:
                planned["3d_cascade_fullres"] = _cascade(ctx, fullres, dataset)
        if "2d" in wanted:
            spacing_2d = (float(np.median(spacings[:, 0])), target[1], target[2])
            ctx.note("2d", "spacing", spacing_2d, "3d_fullres target spacing in-plane; the first entry (median "
                     "slice spacing) is informational, 2D preprocessing keeps z")
            planned["2d"], _ = _plan_configuration(ctx, "2d", spacing_2d, tuple(median[1:]), dataset_voxels, 2)
    if configurations is not None:
        skipped = [c for c in configurations if c not in planned]
        for name in skipped:
            ctx.note(name, "configuration", "none", "requested, but it does not apply to this dataset"
                     if fingerprint.is_2d or name not in ("3d_lowres", "3d_cascade_fullres")
                     else "requested, but not needed (no 3d_lowres, see above)")
    if not planned:
        raise PlanError(f"none of the requested configurations {list(configurations or [])} applies to this "
                        f"{'2D' if fingerprint.is_2d else '3D'} dataset")
    if time_budget_hours is not None:
        planned = {name: _apply_time_budget(ctx, c, time_budget_hours, device, probe_max_seconds)
                   for name, c in planned.items()}
    order = [n for n in CONFIGURATION_NAMES if n in planned]
    return Plan(dataset_name=fingerprint.dataset_name, channel_names=tuple(names), labels=dict(dataset.labels),
                configurations={n: planned[n] for n in order}, is_2d=fingerprint.is_2d,
                regions_class_order=dataset.regions_class_order, gpu_memory_gb=gpu_memory_gb,
                fingerprint_hash=sha256_of_json(fingerprint_to_dict(fingerprint)), decisions=tuple(ctx.decisions))


def _cascade(ctx: _Context, fullres: Configuration, dataset: DatasetJson) -> Configuration:
    """3d_fullres refining 3d_lowres's prediction: same data, patch and network plus one-hot inputs."""
    extra = cascade_input_channels(dict(dataset.labels))
    topology = _replace(fullres.topology, in_channels=fullres.topology.in_channels + extra)
    estimated_gb = fullres.estimated_memory_gb
    if estimated_gb:  # the extra input channels cost a little memory: re-estimate when 3d_fullres was
        try:
            estimated_gb = round(estimate_memory_bytes(topology, fullres.patch_size, fullres.batch_size) / GIB, 4)
        except PlanError:
            pass
    cascade = _replace(fullres, name="3d_cascade_fullres", topology=topology, previous_stage="3d_lowres",
                       preprocessed_data="3d_fullres", estimated_memory_gb=estimated_gb)
    ctx.note("3d_cascade_fullres", "previous_stage", "3d_lowres",
             "3d_lowres was planned: the cascade refines its prediction at full resolution, trained on "
             "3d_lowres's cross-validation predictions (every 3d_lowres fold must be trained first)")
    ctx.note("3d_cascade_fullres", "in_channels", topology.in_channels,
             f"3d_fullres's {fullres.topology.in_channels} input channel(s) + {extra} one-hot channel(s) of "
             "3d_lowres's prediction (one per foreground class or region)")
    ctx.note("3d_cascade_fullres", "preprocessed_data", "3d_fullres",
             "same spacing and normalization as 3d_fullres: its preprocessed data is shared, patch, batch "
             "and network are 3d_fullres's")
    ctx.note("3d_cascade_fullres", "estimated_memory_gb", estimated_gb,
             f"3d_fullres's network with {topology.in_channels} input channels")
    return cascade


def _replace(configuration: Any, **changes: Any) -> Any:
    return dataclasses.replace(configuration, **changes)


def _check_arch(arch: str) -> None:
    """Reject an architecture the registry does not know (when the registry is importable)."""
    try:
        from autoseg.networks import available_networks
    except ImportError:
        try:
            from autoseg.networks.registry import available_networks
        except ImportError:
            return
    known = available_networks()
    if known and arch not in known:
        raise PlanError(f"unknown network architecture {arch!r}; available: {', '.join(known)}")


# --- time budget and memory verification -----------------------------------------------------------


def _outputs(result: Any) -> list:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def _build_network(topology: Topology):
    try:
        from autoseg.networks import build_network
    except ImportError as error:
        raise PlanError(f"building the network needs autoseg.networks ({error})") from None
    return build_network(topology)


def probe_seconds_per_iteration(configuration: Configuration, device: str = "cpu", steps: int = 3,
                                max_seconds: float = 20.0) -> tuple[float, int]:
    """Measure seconds per training iteration at the planned patch and batch.

    One warm-up step, then up to ``steps`` timed SGD steps on random tensors, stopping early once
    ``max_seconds`` have passed (the warm-up time is used when no timed step fits). AMP on CUDA.

    Returns:
        ``(seconds per iteration, timed steps)``.
    """
    import torch

    dev = torch.device(device)
    network = _build_network(configuration.topology).to(dev)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    shape = (configuration.batch_size, configuration.topology.in_channels, *configuration.patch_size)
    x = torch.randn(shape, device=dev)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=amp):
            loss = sum(o.float().square().mean() for o in _outputs(network(x)))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if amp:
            torch.cuda.synchronize(dev)

    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    timed, begin = 0, time.perf_counter()
    while timed < steps and (time.perf_counter() - start) + warmup <= max_seconds:
        step()
        timed += 1
    seconds = (time.perf_counter() - begin) / timed if timed else warmup
    return seconds, timed


def epochs_for_time_budget(hours: float, iterations_per_epoch: int, seconds_per_iteration: float) -> int:
    """Epochs that fit ``hours``: ``floor(budget / (iterations * s/it * 1.15))``, at least 1."""
    if not hours > 0:
        raise PlanError(f"the time budget must be > 0 hours, got {hours}")
    return max(1, math.floor(hours * 3600 / (iterations_per_epoch * seconds_per_iteration * TIME_BUDGET_OVERHEAD)))


def _apply_time_budget(ctx: _Context, configuration: Configuration, hours: float, device: str,
                       max_seconds: float) -> Configuration:
    epochs_for_time_budget(hours, 1, 1.0)  # reject a bad budget before probing
    seconds, timed = probe_seconds_per_iteration(configuration, device, max_seconds=max_seconds)
    iterations = configuration.schedule.iterations_per_epoch
    epochs = epochs_for_time_budget(hours, iterations, seconds)
    ctx.note(configuration.name, "epochs", epochs,
             f"time budget {hours:g} h; probe on {device}: {seconds:.4g} s/iteration ({timed} timed step(s) after "
             f"a warm-up); {hours:g} h / ({iterations} iterations x {seconds:.4g} s x {TIME_BUDGET_OVERHEAD:g})")
    return _replace(configuration, schedule=_replace(configuration.schedule, epochs=epochs))


@dataclass(frozen=True)
class MemoryCheck:
    """Measured against estimated peak training memory of one configuration (GiB).

    ``estimated_gb`` is the estimate of what the allocator hands out (comparable with
    ``torch.cuda.max_memory_allocated``); ``planned_gb`` the plan's figure, which adds the CUDA context.
    """

    configuration: str
    device: str
    measured_gb: float
    estimated_gb: float
    planned_gb: float

    @property
    def ratio(self) -> float:
        return self.measured_gb / self.estimated_gb if self.estimated_gb else float("inf")

    def __str__(self) -> str:
        return (f"{self.configuration}: measured peak {self.measured_gb:.3f} GiB allocated, estimated "
                f"{self.estimated_gb:.3f} GiB (measured/estimated {self.ratio:.2f}; with the CUDA context the "
                f"plan counts {self.planned_gb:.3f} GiB) on {self.device}")


def verify_memory(plan: Plan, configuration: str, device: str = "cuda") -> MemoryCheck:
    """Run one real training step (AMP, SGD, deep supervision) and compare peak memory with the estimate.

    Needs a CUDA device: the peak is ``torch.cuda.max_memory_allocated`` above what was allocated
    before the network was built.
    """
    import torch
    import torch.nn.functional as F

    config = plan.configuration(configuration)
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise PlanError(f"--verify runs a training step on a CUDA GPU; device {device!r} is not one "
                        f"(CUDA available: {torch.cuda.is_available()})")
    from autoseg.networks.memory import estimate_training_memory

    estimate = estimate_training_memory(config.topology, config.patch_size, config.batch_size, amp=True)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    network = _build_network(config.topology).to(dev)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=config.schedule.initial_lr,
                                momentum=config.schedule.momentum, nesterov=True,
                                weight_decay=config.schedule.weight_decay)
    scaler = torch.amp.GradScaler("cuda")
    topology = config.topology
    x = torch.randn((config.batch_size, topology.in_channels, *config.patch_size), device=dev)
    target = torch.randint(0, topology.num_classes, (config.batch_size, 1, *config.patch_size), device=dev)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda"):
        outputs = _outputs(network(x))
        loss = 0.0
        for output in outputs:
            small = F.interpolate(target.float(), size=output.shape[2:], mode="nearest").long()[:, 0]
            loss = loss + F.cross_entropy(output.float(), small)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del network, optimizer, x, target, outputs, loss
    torch.cuda.empty_cache()
    return MemoryCheck(configuration=configuration, device=torch.cuda.get_device_name(dev),
                       measured_gb=peak / GIB, estimated_gb=estimate.allocated / GIB,
                       planned_gb=config.estimated_memory_gb)


# --- explanation and the whole stage ----------------------------------------------------------------


def explain_plan(plan: Plan, width: int = 110) -> str:
    """Every decision as a table: configuration, key, value, reason."""
    rows = [(d.configuration, d.key, d.value, d.reason) for d in plan.decisions]
    head = ("configuration", "decision", "value", "reason")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows)) if rows else len(head[0])
    w1 = max(len(head[1]), *(len(r[1]) for r in rows)) if rows else len(head[1])
    w2 = min(max(len(head[2]), *(len(r[2]) for r in rows)) if rows else len(head[2]), 28)
    reason_width = max(30, width - w0 - w1 - w2 - 6)
    lines = [f"{head[0]:<{w0}}  {head[1]:<{w1}}  {head[2]:<{w2}}  {head[3]}",
             f"{'-' * w0}  {'-' * w1}  {'-' * w2}  {'-' * min(reason_width, 40)}"]
    indent = " " * (w0 + w1 + w2 + 6)
    for configuration, key, value, reason in rows:
        value_lines = textwrap.wrap(value, w2) or [""]
        reason_lines = textwrap.wrap(reason, reason_width) or [""]
        for i in range(max(len(value_lines), len(reason_lines))):
            v = value_lines[i] if i < len(value_lines) else ""
            r = reason_lines[i] if i < len(reason_lines) else ""
            if i == 0:
                lines.append(f"{configuration:<{w0}}  {key:<{w1}}  {v:<{w2}}  {r}".rstrip())
            else:
                lines.append(f"{'':<{w0}}  {'':<{w1}}  {v:<{w2}}  {r}".rstrip() if v else (indent + r).rstrip())
    return "\n".join(lines)


def plan_dataset(dataset_dir: str | os.PathLike, work_dir: str | os.PathLike, n_jobs: int | None = None,
                 force_fingerprint: bool = False, progress: bool = True, **kwargs: Any) -> Plan:
    """Fingerprint (if missing or stale), plan, and write ``WORK/plan.json`` and ``WORK/dataset.json``.

    ``kwargs`` go to :func:`make_plan` (``gpu_memory_gb``, ``configurations``, ``arch``, ``preset``,
    ``ct_priors``, ``time_budget_hours``, ``device``).
    """
    dataset_dir, work_dir = Path(dataset_dir), Path(work_dir)
    fingerprint, reused = load_or_compute_fingerprint(dataset_dir, work_dir, n_jobs=n_jobs, force=force_fingerprint,
                                                      progress=progress)
    dataset = load_dataset_json(dataset_dir)
    plan = make_plan(fingerprint, dataset, **kwargs)
    note = Decision(configuration="dataset", key="fingerprint", value="reused" if reused else "computed",
                    reason=f"{work_dir / 'fingerprint.json'} (dataset hash {fingerprint.dataset_hash})")
    plan = _replace(plan, decisions=(note, *plan.decisions))
    atomic_write(work_dir / "dataset.json", lambda tmp: shutil.copyfile(dataset_dir / "dataset.json", tmp))
    save_plan(plan, work_dir / "plan.json")
    return plan
