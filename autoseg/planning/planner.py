"""The planner: assembles a :class:`~autoseg.plan.Plan` from a fingerprint and records why.

:func:`make_plan` chooses the configurations (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres),
applies the rules of :mod:`autoseg.planning.heuristics` to each and notes every decision with the
numbers it came from; :func:`explain_plan` prints those notes as a table, and :func:`plan_dataset`
is the whole ``autoseg plan`` stage on disk (fingerprint, plan, ``plan.json``)::

    >>> plan = plan_dataset("data/ct", "work/ct", gpu_memory_gb=8)   # writes work/ct/plan.json
    >>> plan = make_plan(fingerprint, dataset_json, preset="resenc-m")  # in memory, no file
    >>> print(explain_plan(plan))
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.dataset import DatasetJson, load_dataset_json, parse_dataset_json
from autoseg.fingerprint import (
    Fingerprint,
    fingerprint_to_dict,
    load_or_compute_fingerprint,
    modality_from_name,
)
from autoseg.networks import PRIOR_OPTION, available_networks
from autoseg.plan import (
    CONFIGURATION_NAMES,
    ChannelNormalization,
    Configuration,
    Decision,
    IntensityWindow,
    Plan,
    PlanError,
    Resampling,
    Schedule,
    Topology,
    cascade_input_channels,
    deep_supervision_weights,
    save_plan,
)
from autoseg.planning.heuristics import (
    ANISOTROPY_THRESHOLD,
    BASE_FEATURES,
    CT_PRIOR_WINDOWS,
    DEFAULT_BLOCKS,
    GIB,
    INITIAL_PATCH_EDGE,
    LOWRES_MIN_SHRINK,
    LOWRES_SPACING_STEP,
    LOWRES_THRESHOLD,
    MAX_CLASS_WEIGHT,
    MAX_DATASET_FRACTION,
    MAX_FEATURES,
    MIN_BATCH,
    MIN_EDGE,
    OVERSAMPLE_FOREGROUND,
    PRESETS,
    RARE_CLASS_EXPONENT,
    REFERENCE_BATCH,
    REFERENCE_ELEMENTS,
    REFERENCE_GB,
    TIME_BUDGET_OVERHEAD,
    CostFunction,
    PatchFit,
    PoolConvProps,
    anatomical_prior_for,
    augmentation_options,
    augmentation_preset,
    build_topology,
    cross_entropy_class_weights,
    epochs_for_time_budget,
    estimate_memory_bytes,
    fit_patch_and_batch,
    fullres_target_spacing,
    memory_budget_bytes,
    normalization_for_channel,
    recommended_configuration,
    resampled_shapes,
    unet_feature_map_proxy,
)
from autoseg.planning.probes import probe_seconds_per_iteration
from autoseg.utils import atomic_write, sha256_of_json
from autoseg.validate import require_valid_dataset

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
    ce_class_weights: tuple[float, ...] | None = None
    max_batch: int | None = None
    augmentation: str = "default"
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
                                          linear_batch=linear, max_dataset_fraction=ctx.max_dataset_fraction,
                                          max_batch=ctx.max_batch)
    check = None
    if ctx.uses_proxy and not quiet:
        fit, check = _check_with_network_estimate(ctx, dim, spacing, median_shape, dataset_voxels, fit)
    topology = ctx.topology(fit.props)
    patch = fit.patch_size
    # the low-resolution search plans many throw-away configurations: skip their estimate
    estimated_gb, memory_reason = (0.0, "") if quiet else _estimated_gb(ctx, dim, topology, fit)
    schedule_aug, aug_reason = augmentation_options(patch)
    loss_options = {"ce_class_weights": list(ctx.ce_class_weights)} if ctx.ce_class_weights else {}
    schedule = Schedule(deep_supervision_weights=deep_supervision_weights(topology.num_stages - 1),
                        mirror_axes=tuple(range(dim)), augmentation=ctx.augmentation,
                        augmentation_options=schedule_aug,
                        oversample_foreground=OVERSAMPLE_FOREGROUND, loss_options=loss_options)
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
         f"{first_fit.batch_cap} patches of {math.prod(first_fit.patch_size)} voxels; minimum {MIN_BATCH}"
         + (f"; at most {ctx.max_batch}: a CPU step's time grows with the batch, so within a time budget "
            "a smaller batch gives more updates" if ctx.max_batch else ""))
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
                                max_dataset_fraction=ctx.max_dataset_fraction, max_batch=ctx.max_batch)
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
    return dataset.label_info.num_outputs


def _plan_class_weights(ctx: _Context, fingerprint: Fingerprint, dataset: DatasetJson) -> None:
    """Cross-entropy weights from the fingerprint's voxels per output (softmax outputs only)."""
    labels = dataset.label_info
    ctx.note("dataset", "oversample_foreground", OVERSAMPLE_FOREGROUND,
             "share of each batch centred on a foreground voxel (nnU-Net: 0.33): small structures are seen "
             "from the first iterations")
    if labels.is_regions:
        ctx.note("dataset", "ce_class_weights", "none", "region outputs: each has its own binary cross-entropy")
        return
    voxels = [sum(fingerprint.classes[v].voxels for v in values if v in fingerprint.classes)
              for values in labels.values]
    ctx.ce_class_weights = cross_entropy_class_weights(voxels)
    ctx.note("dataset", "ce_class_weights", ctx.ce_class_weights,
             f"(most frequent / class voxels) ** {RARE_CLASS_EXPONENT}, at most {MAX_CLASS_WEIGHT:g}, from "
             f"{', '.join(f'{n} {v}' for n, v in zip(labels.names, voxels))} voxels: rare classes get "
             "cross-entropy gradient from the first iteration")


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
    max_batch: int | None = None
    base_features, max_features = BASE_FEATURES, (MAX_FEATURES[2], MAX_FEATURES[3])
    if preset is not None:
        if preset not in PRESETS:
            raise PlanError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        chosen = PRESETS[preset]
        if arch not in ("unet", chosen.arch):
            raise PlanError(f"preset {preset!r} sets the architecture {chosen.arch!r}, but --arch {arch!r} was given")
        arch = chosen.arch
        blocks = (chosen.blocks_encoder, chosen.blocks_decoder)
        max_fraction, max_batch = chosen.max_dataset_fraction, chosen.max_batch
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
                   max_dataset_fraction=max_fraction, max_batch=max_batch, num_cases=fingerprint.num_cases,
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
    _plan_class_weights(ctx, fingerprint, dataset)
    for normalization, reason in zip(normalizations, norm_reasons):
        ctx.note("dataset", f"normalization[{normalization.channel}]", normalization.scheme, reason)
    ctx.augmentation, reason = augmentation_preset(normalizations)
    ctx.note("dataset", "augmentation_preset", ctx.augmentation, reason)
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
    prior, prior_reason = anatomical_prior_for([modality_from_name(n) for n in names])
    if "xray" in (modality_from_name(n) for n in names):  # other datasets' plans stay as they were
        ctx.note("dataset", "anatomical_prior", "on" if prior else "off", prior_reason)
        ctx.note("dataset", "mirror_axes", "none", "radiograph: a mirrored chest puts the heart on the wrong "
                 "side and swaps left and right structures, so neither augmentation nor test-time "
                 "augmentation mirrors")
        planned = {name: _replace(c, schedule=_replace(c.schedule, mirror_axes=())) for name, c in planned.items()}
    if prior:
        planned = {name: _replace(c, topology=_replace(c.topology, options={**c.topology.options,
                                                                            PRIOR_OPTION: True}))
                   for name, c in planned.items()}
    if time_budget_hours is not None:
        planned = {name: _apply_time_budget(ctx, c, time_budget_hours, device, probe_max_seconds)
                   for name, c in planned.items()}
    order = [n for n in CONFIGURATION_NAMES if n in planned]
    recommended, why = recommended_configuration(order, None if fingerprint.is_2d else target, preset)
    ctx.note("dataset", "recommended_configuration", recommended,
             f"{why}; `train` and `predict` use it when no -c is given")
    return Plan(dataset_name=fingerprint.dataset_name, channel_names=tuple(names), labels=dict(dataset.labels),
                configurations={n: planned[n] for n in order}, recommended_configuration=recommended,
                is_2d=fingerprint.is_2d,
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
    """Reject an architecture the registry does not know (plugins may have registered more)."""
    known = available_networks()
    if known and arch not in known:
        raise PlanError(f"unknown network architecture {arch!r}; available: {', '.join(known)}")


# --- time budget ----------------------------------------------------------------------------------


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
                 force_fingerprint: bool = False, progress: bool = True, scheduler: str | None = None,
                 validate: bool = True, **kwargs: Any) -> Plan:
    """Fingerprint (if missing or stale), plan, and write ``WORK/plan.json`` and ``WORK/dataset.json``.

    ``kwargs`` go to :func:`make_plan` (``gpu_memory_gb``, ``configurations``, ``arch``, ``preset``,
    ``ct_priors``, ``time_budget_hours``, ``device``). ``scheduler`` fingerprints the cases on a
    Dask cluster (:mod:`autoseg.cluster`). ``validate`` first runs the checks of ``autoseg validate``
    (:func:`autoseg.validate.require_valid_dataset`, cached by dataset hash): errors stop here with
    every problem named, warnings are printed.
    """
    dataset_dir, work_dir = Path(dataset_dir), Path(work_dir)
    if validate:
        require_valid_dataset(dataset_dir, work_dir, n_jobs=n_jobs or os.cpu_count() or 1, progress=progress)
    fingerprint, reused = load_or_compute_fingerprint(dataset_dir, work_dir, n_jobs=n_jobs, force=force_fingerprint,
                                                      progress=progress, scheduler=scheduler)
    dataset = load_dataset_json(dataset_dir)
    plan = make_plan(fingerprint, dataset, **kwargs)
    note = Decision(configuration="dataset", key="fingerprint", value="reused" if reused else "computed",
                    reason=f"{work_dir / 'fingerprint.json'} (dataset hash {fingerprint.dataset_hash})")
    plan = _replace(plan, decisions=(note, *plan.decisions))
    atomic_write(work_dir / "dataset.json", lambda tmp: shutil.copyfile(dataset_dir / "dataset.json", tmp))
    save_plan(plan, work_dir / "plan.json")
    return plan
