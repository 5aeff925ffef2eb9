"""The planning rules: pure functions from a dataset fingerprint to every value of the plan.

No file is read or written and nothing runs on a device here; the only heavy call is the
network-based memory estimate, which traces the network on PyTorch's ``meta`` device.
:mod:`autoseg.planning.planner` assembles these values into a plan and records why.

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
of the dataset's voxels, never below 2; the ``cpu`` preset also stops it at 12
(:data:`CPU_MAX_BATCH`: a CPU step's time grows with the batch). Every other architecture (and the
residual-encoder presets) uses the memory estimate of the network itself (parameters, gradients,
optimizer state, stored activations, AMP) from :mod:`autoseg.networks.memory`, with the budget in
bytes calibrated so that the plain U-Net's reference point (a 128^3 patch at batch 2 in 3D, 512^2 at
batch 12 in 2D) costs exactly nnU-Net's reference (:func:`memory_budget_bytes`); its batch grows
while it fits. For the plain U-Net the same estimate checks the proxy's result: where it exceeds the
byte budget (possible away from 8 GB, where the proxy ignores fixed costs), the batch and then the
patch shrink further; the golden 8 GB plans pass unchanged. A batch may still grow when a smaller
budget forces a smaller patch (nnU-Net's order: patch first, then batch).

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
to it kept less than 3/4 of the median image (``NONZERO_MASK_CROP_RATIO``). Radiographs (``X-ray``,
``CR``, ``DX``, ``radiograph``) z-score each image over the whole image: their values have no unit
shared between images (exposure, detector and the vendor's processing curve differ per image, so a
dataset-wide clip like CT's would mean different tissues in different images), and a zero is a
real value (air, black processing), not "outside the scan". Burned-in markers and collimation are
few pixels: they barely move an image's mean and std, so no percentile clipping is added.

**Anatomical prior** (:func:`anatomical_prior_for`). For radiographs the networks get the prior
network of :mod:`autoseg.networks.prior` (``topology.options["anatomical_prior"]``) when
``XRAY_ANATOMICAL_PRIOR`` is on, which the measurement in the README decides; other modalities never.

**Resampling.** Image order 3, label order 1 (one-hot), and along an axis whose spacing is more than
3x the finest the slow axis is resampled separately with order 0.

**Schedule.** :class:`autoseg.plan.Schedule`'s defaults (1000 epochs of 250 iterations, SGD lr 1e-2
with poly decay 0.9, Dice + CE) with two changes that make small structures learned early
(:func:`cross_entropy_class_weights`): 66 % of each batch centred on foreground (nnU-Net: 33 %),
and the cross-entropy term weighted per class by ``(background voxels / class voxels) ** 0.5``
(capped at 100; the Dice term stays unweighted, every class already counts equally there). On
the example CT's 2D CPU plan, 1,400 iterations: kidneys learned after ~200 iterations instead of
~900, lesions learned at all; deep-supervision weights halve per
decoder resolution, the lowest-resolution one is 0, normalized to sum 1; mirroring along every
spatial axis; 3D patches with ``max(patch) / patch[0] > 3`` rotate in-plane only (``dummy_2d``, +-180
degrees), other 3D patches +-30 degrees, 2D patches +-180 degrees when their aspect ratio exceeds 1.5
else +-15. ``time_budget_hours`` replaces the 1000 epochs with what fits the budget according to a
short throughput probe (:func:`autoseg.planning.probes.probe_seconds_per_iteration`) plus 15 % for
validation and data loading.

**Recommended configuration** (:func:`recommended_configuration`): what ``autoseg train`` and
``autoseg predict`` use when no ``-c`` is given. 3d_fullres, as nnU-Net's default, except for
plans of the ``cpu`` preset on anisotropic data (3d_fullres spacing coarsest/finest >= 3): there a
2D iteration costs a small fraction of a 3D one, so a model trained for a given wall time sees far
more of the data, and thick slices give 3D convolutions little context to add. On the example CT
(spacing 2.8 x 0.74 x 0.74 mm) and 2 CPU cores, 20 minutes of training reached a mean held-out Dice
of 0.27 with 3d_fullres (220 iterations; kidneys and lesions not learned) and 0.61 with 2d (2,376
iterations; liver 0.88, kidney 0.69, lesion 0.25) (README, "Time to Dice").

**Augmentation preset** (:func:`augmentation_preset`): ``medical`` when a channel is CT or
z-scored (its modality-aware transforms act on those), nnU-Net's ``default`` otherwise; on the
example CT it under-segments unseen lesions less (numbers in the decision's reason).

Every decision is recorded with the numbers it came from;
:func:`autoseg.planning.planner.explain_plan` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoseg.fingerprint import ChannelFingerprint, IntensityStats, modality_from_name
from autoseg.networks import MemoryEstimate, estimate_training_memory
from autoseg.plan import (
    DUMMY_2D_RATIO,
    ChannelNormalization,
    IntensityWindow,
    NormalizationScheme,
    PlanError,
    Topology,
    is_dummy_2d_patch,
)

ANISOTROPY_THRESHOLD = 3.0
OVERSAMPLE_FOREGROUND = 0.66
RARE_CLASS_EXPONENT = 0.5
MAX_CLASS_WEIGHT = 100.0
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
# The ``cpu`` preset's largest batch: nnU-Net's 2D reference batch. A GPU computes a larger batch in
# about the time of a smaller one; a CPU does not, so within a time budget a larger batch buys fewer
# updates from the same samples. Measured on the example CT (16 training cases, 2d, 8 held-out cases,
# liver / kidney / lesion Dice without TTA): 10 minutes on 2 cores, the 5 % cap's batch of 21 ran 880
# iterations to 0.87 / 0.82 / 0.49, a batch of 11 ran 1,650 to 0.89 / 0.87 / 0.72; 30 minutes on one
# core each, side by side, 21 ran 1,790 to 0.91 / 0.73 / 0.62, 12 ran 3,020 to 0.91 / 0.89 / 0.74.
CPU_MAX_BATCH = REFERENCE_BATCH[2]
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0
NONZERO_MASK_CROP_RATIO = 0.75
TIME_BUDGET_OVERHEAD = 1.15
GIB = 2**30

# the anatomical prior for radiographs: on only where it measurably helps. Measured on the xray
# example (tests/benchmarks/xray_prior.py, README "X-ray"): better mean Dice and 5-40x fewer
# implausible islands with 8 and with 40 training cases (the heart's Dice 0.026 lower with 40)
XRAY_ANATOMICAL_PRIOR = True

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
    max_batch: int | None = None  # a cap on the batch besides memory and the dataset fraction


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
    "cpu": Preset("unet", 2.0, (2,) * 14, (2,) * 13, 0.05, base_features=8, max_features=(128, 128),
                  max_batch=CPU_MAX_BATCH),
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
                        min_edge: int = MIN_EDGE, min_stages: int = 2, max_batch: int | None = None) -> PatchFit:
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
        max_batch: the largest batch whatever memory and the dataset allow (the ``cpu`` preset's
            :data:`CPU_MAX_BATCH`); None for no such cap. ``min_batch`` still wins.
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
    largest = min(batch_from_memory, cap) if max_batch is None else min(batch_from_memory, cap, max_batch)
    batch = max(largest, min_batch)
    return PatchFit(props=props, batch_size=batch, batch_from_memory=batch_from_memory, batch_cap=cap,
                    cost=float(cost(props, batch)), budget=float(budget), initial_patch=start,
                    reductions=reductions)


# --- memory estimates -------------------------------------------------------------------------------


def _memory_estimate(topology: Topology, patch: Sequence[int], batch: int) -> MemoryEstimate:
    # a PlanError, not a ValueError, so that callers which can do without the estimate catch one type
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
    if scheme == "zscore" and modality_from_name(name) == "xray":
        return (ChannelNormalization(channel=name, scheme="zscore", use_nonzero_mask=False),
                f"named {name!r} (xray): z-score per image over the whole image; a radiograph's values "
                "have no unit shared between images (exposure, detector, processing), a zero is a real "
                "value, and markers and collimation are too few pixels to move the mean and std")
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


def anatomical_prior_for(modalities: Sequence[str]) -> tuple[bool, str]:
    """Whether the networks get the anatomical prior (:mod:`autoseg.networks.prior`), and why.

    Example:
        >>> anatomical_prior_for(["xray"])[0] == XRAY_ANATOMICAL_PRIOR
        True
        >>> anatomical_prior_for(["ct"])
        (False, 'no radiograph channel: the anatomical prior is for X-ray')
    """
    if "xray" not in modalities:
        return False, "no radiograph channel: the anatomical prior is for X-ray"
    if XRAY_ANATOMICAL_PRIOR:
        return True, ("radiograph: a prior network on the image down-sampled 8x learns where each structure "
                      "can be and is fused with the logits (log-prior, floored at 0.01); on the xray example "
                      "(600 iterations) mean Dice 0.864 -> 0.888 and islands 114 -> 22 with 8 training "
                      "cases, 0.912 -> 0.919 and 514 -> 13 with 40 (README, X-ray)")
    return False, ("radiograph, but the anatomical prior did not measurably help on the xray example "
                   "(README, X-ray); switch it on with topology option anatomical_prior")


# --- schedule ------------------------------------------------------------------------------------------


def augmentation_options(patch: Sequence[int]) -> tuple[dict[str, Any], str]:
    """Rotation range and the in-plane-only ("dummy 2D") switch for a patch (nnU-Net's rule)."""
    if len(patch) == 3:
        dummy_2d = is_dummy_2d_patch(patch)
        degrees = 180.0 if dummy_2d else 30.0
        reason = (f"max(patch) / patch[0] = {max(patch) / patch[0]:.3g} {'>' if dummy_2d else '<='} "
                  f"{DUMMY_2D_RATIO:g}: " + ("rotate in-plane only, +-180 degrees" if dummy_2d else
                                              "3D rotations +-30 degrees"))
        return {"dummy_2d": dummy_2d, "rotation_degrees": degrees}, reason
    aspect = max(patch) / min(patch)
    degrees = 180.0 if aspect > 1.5 else 15.0
    return ({"dummy_2d": False, "rotation_degrees": degrees},
            f"2D patch aspect ratio {aspect:.3g} {'>' if aspect > 1.5 else '<='} 1.5: rotations +-{degrees:g} degrees")


# the normalization schemes whose channels the ``medical`` preset's modality-aware transforms act on
MEDICAL_AUGMENTATION_SCHEMES = ("ct", "zscore")


def augmentation_preset(normalization: Sequence[ChannelNormalization]) -> tuple[str, str]:
    """The augmentation preset of every configuration, and why.

    ``medical`` where a channel is CT or z-scored (MR, most microscopy): nnU-Net's transforms plus
    elastic deformation, Poisson noise and the modality-aware ones (CT tissue remap and metal
    streaks on CT channels, a bias field on z-scored ones). ``default`` (nnU-Net's) otherwise.

    >>> augmentation_preset([ChannelNormalization(channel="T2", scheme="zscore")])[0]
    'medical'
    >>> augmentation_preset([ChannelNormalization(channel="RGB", scheme="rescale01")])[0]
    'default'
    """
    schemes = sorted({n.scheme for n in normalization if n.scheme in MEDICAL_AUGMENTATION_SCHEMES})
    if not schemes:
        return "default", "no CT or z-scored channel for the modality-aware transforms: nnU-Net's set"
    return "medical", (f"{' and '.join(schemes)} channel(s): nnU-Net's transforms plus elastic deformation, "
                       "Poisson noise and CT tissue remap / metal streaks / MR bias field; unseen lesions are "
                       "under-segmented less (example CT, 8 training and 12 test cases, 2d at --preset cpu: "
                       "lesion Dice over the 9 lesion cases 0.536 -> 0.612 after 1,400 iterations, "
                       "0.585 -> 0.658 after 2,800; kidney and liver unchanged)")


def epochs_for_time_budget(hours: float, iterations_per_epoch: int, seconds_per_iteration: float) -> int:
    """Epochs that fit ``hours``: ``floor(budget / (iterations * s/it * 1.15))``, at least 1."""
    if not hours > 0:
        raise PlanError(f"the time budget must be > 0 hours, got {hours}")
    return max(1, math.floor(hours * 3600 / (iterations_per_epoch * seconds_per_iteration * TIME_BUDGET_OVERHEAD)))


def cross_entropy_class_weights(output_voxels: Sequence[int]) -> tuple[float, ...]:
    """Cross-entropy weight per softmax output: ``(most frequent / this) ** 0.5``, capped at 100.

    The cross-entropy averages over voxels, so a class of 0.03 % of the voxels (a small lesion)
    gets almost no gradient until the large classes are learned; the square root gives it a voice
    from the first iteration without letting it dominate (full inverse frequency over-segments).
    An output with no voxels keeps weight 1.

    Example:
        >>> cross_entropy_class_weights([950_000, 43_000, 5_000, 300])
        (1.0, 4.7, 13.784, 56.273)
    """
    most = max(output_voxels)
    return tuple(round(min(MAX_CLASS_WEIGHT, (most / v) ** RARE_CLASS_EXPONENT), 3) if v > 0 else 1.0
                 for v in output_voxels)


def recommended_configuration(planned: Sequence[str], fullres_spacing: Sequence[float] | None = None,
                              preset: str | None = None) -> tuple[str, str]:
    """The configuration to train when none is named, and why (see the module docstring).

    Args:
        planned: the configurations the plan has.
        fullres_spacing: the 3d_fullres target spacing (``None`` for 2D datasets).
        preset: the plan's preset (``cpu`` plans for machines without a GPU).

    Example:
        >>> recommended_configuration(["2d", "3d_fullres"], (2.8, 0.74, 0.74), preset="cpu")[0]
        '2d'
        >>> recommended_configuration(["2d", "3d_fullres"], (2.8, 0.74, 0.74))[0]
        '3d_fullres'
        >>> recommended_configuration(["2d", "3d_fullres"], (1.0, 1.0, 1.0), preset="cpu")[0]
        '3d_fullres'
    """
    names = list(planned)
    if not names:
        raise PlanError("no configuration was planned, so none can be recommended")
    if len(names) == 1:
        return names[0], "the only configuration planned"
    anisotropy = max(fullres_spacing) / min(fullres_spacing) if fullres_spacing else 1.0
    if preset == "cpu" and "2d" in names and anisotropy >= ANISOTROPY_THRESHOLD:
        return "2d", (f"cpu preset and anisotropic voxels (3d_fullres spacing {anisotropy:.1f}x coarser along "
                      f"the slices): a 2D iteration costs a fraction of a 3D one, so training for a given "
                      f"time sees far more of the data, and thick slices leave 3D convolutions little to add")
    for name, reason in (("3d_fullres", "nnU-Net's default: full resolution with 3D context"),
                         ("2d", "no 3d_fullres was planned")):
        if name in names:
            return name, reason
    return names[0], "the first configuration planned"
