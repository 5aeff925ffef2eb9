"""The per-case preprocessing sidecar ``<case>.json``, typed: :class:`CaseProperties`.

Preprocessing writes one sidecar per case beside its arrays; restoring a prediction to the original
grid, the cascade's grid change, the trainer's foreground sampling and validation read it back.
Like the plan, it is a frozen pydantic dataclass: loading validates every field and a bad file is
reported with its name and every problem, instead of a ``KeyError`` deep inside another stage.

The JSON is compact (class locations are tens of thousands of numbers) and its keys keep the field
order, so a sidecar written before this type existed reads and re-serialises byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass

from autoseg.errors import AutosegError
from autoseg.utils import atomic_write_text, read_model_file, validate_model

__all__ = ["CaseProperties", "CasePropertiesError", "SidecarPrior", "SidecarResampling", "load_case_properties",
           "save_case_properties"]

_STRICT = ConfigDict(extra="forbid", frozen=True)


class CasePropertiesError(AutosegError, ValueError):
    """A sidecar is missing, not JSON or has a bad field (the message names the file)."""


@dataclass(config=_STRICT)
class SidecarResampling:
    """How the case was resampled (the inverse restores it the same way)."""

    image_order: int
    label_order: int
    slow_axis_order: int
    slow_axis: int | None
    anisotropy_threshold: float


@dataclass(config=_STRICT)
class SidecarPrior:
    """A CT prior channel's Hounsfield window (``high`` None: open above)."""

    name: str
    low: float
    high: float | None


@dataclass(config=_STRICT)
class CaseProperties:
    """What preprocessing did to one case, in the order the sidecar stores it.

    Shapes and spacings are ``(z, y, x)`` lists (``origin`` and ``direction`` stay in ITK's
    ``(x, y, z)``); ``crop_bbox`` is ``[[start, stop], ...]`` per axis in the canonical orientation;
    ``class_locations`` maps a label value (as text) to sampled ``[z, y, x]`` voxels.
    """

    case_id: str
    source_files: dict[str, Any]
    configuration: str
    configuration_hash: str
    plan_hash: str
    is_2d: bool
    shape: list[int]
    spacing: list[float]
    origin: list[float]
    direction: list[float]
    orientation: dict[str, list[Any]]  # autoseg.orientation's {"axes": [...], "flips": [...]}
    shape_canonical: list[int]
    spacing_canonical: list[float]
    crop_bbox: list[list[int]]
    shape_after_crop: list[int]
    shape_after_resampling: list[int]
    spacing_after_resampling: list[float]
    resampling: SidecarResampling
    channels: list[str]
    ct_priors: list[SidecarPrior]
    class_locations: dict[str, list[list[int]]]

    def to_dict(self) -> dict[str, Any]:
        """The sidecar as JSON-ready data."""
        return _ADAPTER.dump_python(self, mode="json")

    def to_json(self) -> str:
        """The sidecar's file content: compact JSON and a newline."""
        return json.dumps(self.to_dict(), separators=(",", ":")) + "\n"


_ADAPTER = TypeAdapter(CaseProperties)


def case_properties_from_dict(data: object, source: str = "sidecar") -> CaseProperties:
    """Validate data into :class:`CaseProperties`; every problem is listed with its field path."""
    return validate_model(_ADAPTER, data, source, "preprocessing sidecar", CasePropertiesError)


def save_case_properties(properties: CaseProperties, path: str | os.PathLike) -> Path:
    """Write a sidecar atomically."""
    return atomic_write_text(path, properties.to_json())


def load_case_properties(path: str | os.PathLike) -> CaseProperties:
    """Read and validate a sidecar ``<case>.json``; errors name the file."""
    data, path = read_model_file(path, Path(path).name, CasePropertiesError,
                                 "preprocess the dataset (autoseg preprocess)")
    return case_properties_from_dict(data, str(path))
