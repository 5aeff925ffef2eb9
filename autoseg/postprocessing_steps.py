"""The post-processing steps and the decision that switches them on (read by inference).

Two refinements, each switched on only where the cross-validation predictions showed that it helps
(:func:`autoseg.postprocessing.find_postprocessing` decides; this module is what inference needs to
apply the decision, so it imports nothing of inference):

* **Largest connected component** (:func:`largest_component`, full connectivity): first for all
  foreground at once (every foreground voxel outside the largest foreground component becomes
  background), then per class (or per region): the voxels of the class outside its largest
  component become background (0), as nnU-Net does.
* **Mean-field refinement** (:func:`crf_refine`), a dependency-free stand-in for the dense CRF of
  the literature: a few iterations of ``Q = softmax(log P + w_s * S(Q) + w_b * B(Q))`` where
  ``S`` is a Gaussian smoothing of the current estimate (a Potts model's message passing, the
  voxel's own contribution excluded) and ``B`` an intensity-aware smoothing approximated with a
  few intensity bins (a coarse bilateral grid). It works on probability maps.

The decision is a typed :class:`PostprocessingDecision`, written to
``models/<config>/postprocessing.json`` by :func:`save_postprocessing` and read back by
:func:`load_postprocessing` (which names the file and the field of any problem), like the plan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, StrictInt, TypeAdapter
from pydantic.dataclasses import dataclass as model
from scipy import ndimage

from autoseg.errors import AutosegError
from autoseg.labels import LabelValue, label_mask
from autoseg.utils import atomic_write_json, read_model_file, validate_model

POSTPROCESSING_FILE = "postprocessing.json"
PROBABILITIES_SUFFIX = "_probabilities"
DECISION_FORMAT = 1
DEFAULT_TOLERANCE = 1e-4

_STRICT = ConfigDict(extra="forbid", frozen=True)


class PostprocessingError(AutosegError, ValueError):
    """A post-processing decision cannot be made or applied (the message names the file)."""


# --- connected components ---------------------------------------------------------------------------


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (full connectivity: faces, edges, corners).

    An empty mask gives an empty mask; on a tie the component found first (in memory order) wins.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count == 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest_component(label_map: np.ndarray, value: LabelValue | None = None,
                           background: int = 0) -> np.ndarray:
    """Set the voxels of ``value`` (None: all foreground) outside its largest component to background.

    Returns a new array; ``label_map`` is not modified.
    """
    out = np.array(label_map, copy=True)
    mask = out != background if value is None else label_mask(out, value)
    out[mask & ~largest_component(mask)] = background
    return out


# --- mean-field refinement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrfParams:
    """Settings of :func:`crf_refine` (lengths in voxels of the finest axis).

    Attributes:
        iterations: mean-field updates.
        spatial_sigma: width of the smoothness kernel.
        spatial_weight: strength of the smoothness term (in units of log-probability).
        bilateral_sigma: width of the intensity-aware kernel.
        bilateral_weight: its strength; 0 switches it off.
        intensity_sigma: intensity difference (in the normalized image's units) at which two voxels
            stop counting as alike.
        bins: intensity bins of the bilateral approximation.
    """

    iterations: int = 5
    spatial_sigma: float = 1.0
    spatial_weight: float = 3.0
    bilateral_sigma: float = 3.0
    bilateral_weight: float = 2.0
    intensity_sigma: float = 0.5
    bins: int = 6


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(volume: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(K, *spatial)`` along each spatial axis (edges replicated).

    A sigma of 0 (or below 0.1) leaves that axis alone.
    """
    out = volume
    spatial = volume.ndim - 1
    if len(sigmas) != spatial:
        raise ValueError(f"{len(sigmas)} sigmas for {spatial} spatial axes")
    for axis, sigma in enumerate(sigmas):
        if sigma < 0.1:
            continue
        kernel = _gaussian_kernel(float(sigma), volume.device)
        radius = (kernel.numel() - 1) // 2
        moved = out.movedim(axis + 1, -1)
        shape = moved.shape
        rows = moved.reshape(-1, 1, shape[-1])
        rows = F.pad(rows, (radius, radius), mode="replicate")
        rows = F.conv1d(rows, kernel.view(1, 1, -1))
        out = rows.reshape(shape).movedim(-1, axis + 1)
    return out


def _self_weight(sigmas: Sequence[float], device: torch.device) -> float:
    """The centre weight of the separable kernel: a voxel's own share of its smoothed value."""
    weight = 1.0
    for sigma in sigmas:
        if sigma >= 0.1:
            kernel = _gaussian_kernel(float(sigma), device)
            weight *= float(kernel[(kernel.numel() - 1) // 2])
    return weight


def _axis_sigmas(sigma: float, spacing: Sequence[float] | None, spatial: int,
                 in_plane_only: bool) -> list[float]:
    spacing = list(spacing) if spacing is not None else [1.0] * spatial
    finest = min(spacing)
    sigmas = [sigma * finest / s for s in spacing]
    if in_plane_only:
        sigmas[0] = 0.0
    return sigmas


def _bin_weights(intensity: torch.Tensor, params: CrfParams) -> list[torch.Tensor]:
    """Per intensity bin, each voxel's membership (a partition of unity over the bins)."""
    flat = intensity.reshape(-1)
    if flat.numel() > 1_000_000:  # quantiles of a subsample: exact enough and bounded in cost
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    low, high = torch.quantile(flat.float(), torch.tensor([0.01, 0.99], device=flat.device)).tolist()
    centres = torch.linspace(low, high, max(2, params.bins)).tolist()
    raw = [torch.exp(-0.5 * ((intensity - c) / params.intensity_sigma) ** 2) for c in centres]
    total = torch.stack(raw).sum(0).clamp_min(1e-12)
    return [w / total for w in raw]


@torch.no_grad()
def crf_refine(probabilities: torch.Tensor | np.ndarray, image: torch.Tensor | np.ndarray | None = None,
               activation: Literal["softmax", "sigmoid"] = "softmax", params: CrfParams | None = None,
               spacing: Sequence[float] | None = None, in_plane_only: bool = False) -> torch.Tensor:
    """Mean-field refinement of probability maps ``(K, *spatial)`` (see the module docstring).

    Args:
        probabilities: softmax outputs (channels sum to one) or independent sigmoid outputs.
        image: the (normalized) image ``(C, *spatial)`` or ``(*spatial)``; its first channel drives
            the intensity-aware term. None: smoothness term only.
        activation: ``softmax`` (Potts model over the classes) or ``sigmoid`` (one binary model
            per channel).
        params: the settings; default :class:`CrfParams`.
        spacing: voxel spacing per spatial axis, so kernels are round in millimetres.
        in_plane_only: never smooth along axis 0 (a 2D configuration's stack of slices).

    Returns:
        refined probabilities, float32, on the input's device (a tensor).
    """
    params = params or CrfParams()
    probs = torch.as_tensor(probabilities).float()
    spatial = probs.ndim - 1
    eps = 1e-6
    spatial_sigmas = _axis_sigmas(params.spatial_sigma, spacing, spatial, in_plane_only)
    bilateral_sigmas = _axis_sigmas(params.bilateral_sigma, spacing, spatial, in_plane_only)
    self_spatial = _self_weight(spatial_sigmas, probs.device)
    self_bilateral = _self_weight(bilateral_sigmas, probs.device)
    bins: list[torch.Tensor] = []
    if image is not None and params.bilateral_weight > 0:
        if isinstance(image, np.ndarray) and not image.flags.writeable:
            image = np.array(image)  # a read-only memory map: torch wants its own copy
        intensity = torch.as_tensor(image).to(probs.device).float()
        if intensity.ndim == spatial + 1:
            intensity = intensity[0]
        if intensity.shape != probs.shape[1:]:
            raise ValueError(f"image of spatial shape {tuple(intensity.shape)} does not match the "
                             f"probabilities' {tuple(probs.shape[1:])}")
        bins = _bin_weights(intensity, params)

    def messages(q: torch.Tensor) -> torch.Tensor:
        """Kernel-weighted agreement of the neighbours with each label (own voxel excluded)."""
        total = params.spatial_weight * (gaussian_smooth(q, spatial_sigmas) - self_spatial * q)
        if bins:
            bilateral = torch.zeros_like(q)
            for weight in bins:
                bilateral += weight * gaussian_smooth(weight * q, bilateral_sigmas)
            own = sum(weight * weight for weight in bins) * self_bilateral * q
            total = total + params.bilateral_weight * (bilateral - own)
        return total

    if activation == "softmax":
        unary = torch.log(probs.clamp_min(eps))
        q = probs
        for _ in range(params.iterations):
            q = torch.softmax(unary + messages(q), dim=0)
        return q
    if activation == "sigmoid":
        p = probs.clamp(eps, 1 - eps)
        unary = torch.log(p) - torch.log1p(-p)
        q = probs
        for _ in range(params.iterations):
            # Binary Potts per channel: agreement with "inside" minus agreement with "outside".
            inside = messages(q)
            outside = messages(1 - q)
            q = torch.sigmoid(unary + inside - outside)
        return q
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


# --- the decision ---------------------------------------------------------------------------------------


@model(config=_STRICT)
class StepResult:
    """One step tried by :func:`autoseg.postprocessing.find_postprocessing`: mean Dice per class before and after."""

    step: str
    accepted: bool
    mean_dice_before: float
    mean_dice_after: float
    dice_before: dict[str, float]
    dice_after: dict[str, float]


@model(config=_STRICT)
class CrfDecision:
    """Whether the mean-field step is applied, with its settings (and its Dice when it was evaluated)."""

    enabled: bool = False
    evaluated: bool = False
    params: CrfParams = Field(default_factory=CrfParams)
    dice_before: dict[str, float] | None = None
    dice_after: dict[str, float] | None = None


@model(config=_STRICT)
class PostprocessingDecision:
    """What :func:`autoseg.postprocessing.find_postprocessing` decided, as ``postprocessing.json`` holds it.

    The steps inference applies are ``crf`` (on the probabilities), then
    ``largest_component_foreground`` and ``largest_component`` (``{name: value or region values}``,
    in order) on the label map. The other fields record how the decision was reached. Every field
    has a default, so a hand-written file needs only the steps it switches on.

    >>> decision = PostprocessingDecision(largest_component={"liver": 1, "tumour": [2, 3]})
    >>> decision.largest_component
    {'liver': 1, 'tumour': (2, 3)}
    >>> decision_from_dict(decision_to_dict(decision)) == decision
    True
    """

    format: int = DECISION_FORMAT
    configuration: str = ""
    folds: tuple[str, ...] = ()
    num_cases: int = 0
    source: str = ""
    largest_component_foreground: bool = False
    largest_component: dict[str, StrictInt | tuple[StrictInt, ...]] = Field(default_factory=dict)
    crf: CrfDecision = Field(default_factory=CrfDecision)
    tolerance: float = DEFAULT_TOLERANCE
    dice_before: dict[str, float] = Field(default_factory=dict)
    dice_after: dict[str, float] = Field(default_factory=dict)
    mean_dice_before: float | None = None
    mean_dice_after: float | None = None
    steps: tuple[StepResult, ...] = ()
    rule: str = ""


_DECISION = TypeAdapter(PostprocessingDecision)


def decision_to_dict(decision: PostprocessingDecision) -> dict[str, Any]:
    """The decision as JSON-ready data (fields that are None are left out, as files always had it)."""
    return _DECISION.dump_python(decision, mode="json", exclude_none=True)


def decision_from_dict(data: object, source: str = POSTPROCESSING_FILE) -> PostprocessingDecision:
    """Validate data into a decision; every problem is listed with its field path and ``source``."""
    return validate_model(_DECISION, data, source, "post-processing decision", PostprocessingError)


def save_postprocessing(decision: PostprocessingDecision, path: str | os.PathLike) -> Path:
    """Write a decision atomically (``path``: the file, or the configuration folder to hold it)."""
    path = Path(path)
    return atomic_write_json(path / POSTPROCESSING_FILE if path.is_dir() else path, decision_to_dict(decision))


def load_postprocessing(path: str | os.PathLike) -> PostprocessingDecision | None:
    """Read a decision file (or ``<folder>/postprocessing.json``); None when there is none.

    Raises:
        PostprocessingError: a file that is not JSON or not a valid decision (file and field named).
    """
    path = Path(path)
    if not (path / POSTPROCESSING_FILE if path.is_dir() else path).is_file():
        return None
    data, path = read_model_file(path, POSTPROCESSING_FILE, PostprocessingError, "")
    return decision_from_dict(data, str(path))


def apply_postprocessing(label_map: np.ndarray, decision: PostprocessingDecision | None) -> np.ndarray:
    """Apply the label-map steps of a decision (from :func:`load_postprocessing`).

    ``largest_component_foreground`` first, then every entry of ``largest_component`` in order. The
    CRF step works on probabilities and is applied by the caller before the label map is made (see
    :func:`crf_refine`). None returns a copy of ``label_map``.
    """
    out = np.array(label_map, copy=True)
    if decision is None:
        return out
    if decision.largest_component_foreground:
        out = keep_largest_component(out, None)
    for value in decision.largest_component.values():
        out = keep_largest_component(out, value)
    return out
