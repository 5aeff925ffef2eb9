"""The augmentation settings, the named presets, and the merge of a preset with options.

A setting belongs to the transform that reads it; they are gathered in one frozen dataclass so a
plan's ``augmentation_options`` are validated (names, ranges) before any training starts.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveRange = tuple[Annotated[float, Field(gt=0.0)], Annotated[float, Field(gt=0.0)]]


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
