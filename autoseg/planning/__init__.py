"""Planning: from a dataset fingerprint to a :class:`~autoseg.plan.Plan` (``autoseg plan``).

Three modules, so that the rules can be read and tested without files or devices:

* :mod:`autoseg.planning.heuristics`: the rules themselves (target spacing, normalization, patch,
  topology, batch, memory budget, schedule) as pure functions of their inputs; its docstring
  states every rule with its thresholds;
* :mod:`autoseg.planning.planner`: :func:`make_plan` applies them per configuration and records each
  decision, :func:`explain_plan` prints the decisions, :func:`plan_dataset` writes ``plan.json``;
* :mod:`autoseg.planning.probes`: what runs the planned network on a device, the throughput probe
  behind ``--time-budget`` and :func:`verify_memory` behind ``--verify``.

Every public name stays importable from ``autoseg.planning`` (the CLI, the benchmarks and the
tests import from here)::

    >>> from autoseg.planning import explain_plan, plan_dataset
    >>> print(explain_plan(plan_dataset("data/ct", "work/ct")))
"""

from __future__ import annotations

from autoseg.plan import deep_supervision_weights  # re-exported: the planner writes them into the schedule
from autoseg.planning.heuristics import (
    ANISOTROPIC_PERCENTILE,
    ANISOTROPY_THRESHOLD,
    BASE_FEATURES,
    CALIBRATION_PATCH,
    CT_PRIOR_WINDOWS,
    DEFAULT_BLOCKS,
    DUMMY_2D_RATIO,
    GIB,
    INITIAL_PATCH_EDGE,
    LOWRES_MIN_SHRINK,
    LOWRES_SPACING_STEP,
    LOWRES_THRESHOLD,
    MAX_DATASET_FRACTION,
    MAX_FEATURES,
    MIN_BATCH,
    MIN_EDGE,
    NONZERO_MASK_CROP_RATIO,
    PRESETS,
    REFERENCE_BATCH,
    REFERENCE_ELEMENTS,
    REFERENCE_GB,
    TIME_BUDGET_OVERHEAD,
    CostFunction,
    PatchFit,
    PoolConvProps,
    Preset,
    anatomical_prior_for,
    augmentation_options,
    build_topology,
    epochs_for_time_budget,
    estimate_memory_bytes,
    features_per_stage,
    fit_patch_and_batch,
    fullres_target_spacing,
    initial_patch_size,
    memory_budget_bytes,
    normalization_for_channel,
    pool_and_conv_props,
    recommended_configuration,
    resampled_shapes,
    scheme_for_name,
    unet_feature_map_proxy,
)
from autoseg.planning.planner import explain_plan, make_plan, num_output_classes, plan_dataset
from autoseg.planning.probes import MemoryCheck, probe_seconds_per_iteration, verify_memory

__all__ = [
    "ANISOTROPIC_PERCENTILE",
    "ANISOTROPY_THRESHOLD",
    "BASE_FEATURES",
    "CALIBRATION_PATCH",
    "CT_PRIOR_WINDOWS",
    "DEFAULT_BLOCKS",
    "DUMMY_2D_RATIO",
    "GIB",
    "INITIAL_PATCH_EDGE",
    "LOWRES_MIN_SHRINK",
    "LOWRES_SPACING_STEP",
    "LOWRES_THRESHOLD",
    "MAX_DATASET_FRACTION",
    "MAX_FEATURES",
    "MIN_BATCH",
    "MIN_EDGE",
    "NONZERO_MASK_CROP_RATIO",
    "PRESETS",
    "REFERENCE_BATCH",
    "REFERENCE_ELEMENTS",
    "REFERENCE_GB",
    "TIME_BUDGET_OVERHEAD",
    "CostFunction",
    "MemoryCheck",
    "PatchFit",
    "PoolConvProps",
    "Preset",
    "anatomical_prior_for",
    "augmentation_options",
    "build_topology",
    "deep_supervision_weights",
    "epochs_for_time_budget",
    "estimate_memory_bytes",
    "explain_plan",
    "features_per_stage",
    "fit_patch_and_batch",
    "fullres_target_spacing",
    "initial_patch_size",
    "make_plan",
    "memory_budget_bytes",
    "normalization_for_channel",
    "recommended_configuration",
    "num_output_classes",
    "plan_dataset",
    "pool_and_conv_props",
    "probe_seconds_per_iteration",
    "resampled_shapes",
    "scheme_for_name",
    "unet_feature_map_proxy",
    "verify_memory",
]
