"""Data augmentation for training: nnU-Net's default pipeline plus medical-specific transforms.

Every transform is one class (:mod:`.base`), TorchIO style: it samples the random parameters of
one sample as plain JSON data from a seeded generator, and applies them deterministically, needing
no configuration and no generator (random fields such as noise are recorded as a seed). So any
augmented sample can be logged and replayed exactly. Transforms register under their op name;
:mod:`.pipeline` composes them (:func:`build_augmentation`, :func:`replay`).

Modules: :mod:`.settings` (the knobs and presets), :mod:`.spatial` (crop or resampling, mirror,
rot90), :mod:`.intensity`, :mod:`.cascade` (corrupting a cascade stage's previous-stage channels).

Adding a transform: a subclass of :class:`Transform` (usually :class:`InPlaceTransform`) with
``sample`` and ``apply_to_image``, decorated with ``@register_transform("op_name", order=...)``,
plus its fields in :class:`AugmentationSettings`. Give its probability a default of 0 and draw
through :func:`.base.fires` (no draw while disabled): existing seeds then keep their batches.
"""

from autoseg.training.augment.base import (
    ExactTransform,
    InPlaceTransform,
    Transform,
    TransformContext,
    available_transforms,
    get_transform,
    register_transform,
    sampled_transforms,
    unregister_transform,
)
from autoseg.training.augment.cascade import MORPHOLOGY_OPERATIONS, binary_morphology
from autoseg.training.augment.intensity import CT_TISSUE_KNOTS_HU, METAL_HU, bias_field, piecewise_linear
from autoseg.training.augment.pipeline import (
    Augmentation,
    build_augmentation,
    params_to_json,
    replay,
    replay_sample,
    summarize_params,
)
from autoseg.training.augment.settings import (
    PRESETS,
    AugmentationSettings,
    PositiveRange,
    Probability,
    augmentation_settings,
)
from autoseg.training.augment.spatial import (
    input_coordinates,
    rotation_matrix,
)

__all__ = [
    "CT_TISSUE_KNOTS_HU",
    "METAL_HU",
    "MORPHOLOGY_OPERATIONS",
    "PRESETS",
    "Augmentation",
    "AugmentationSettings",
    "ExactTransform",
    "InPlaceTransform",
    "PositiveRange",
    "Probability",
    "Transform",
    "TransformContext",
    "augmentation_settings",
    "available_transforms",
    "bias_field",
    "binary_morphology",
    "build_augmentation",
    "get_transform",
    "input_coordinates",
    "params_to_json",
    "piecewise_linear",
    "register_transform",
    "replay",
    "replay_sample",
    "rotation_matrix",
    "sampled_transforms",
    "summarize_params",
    "unregister_transform",
]
