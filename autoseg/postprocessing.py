"""Post-processing decided by cross-validation: largest connected components and a light CRF.

Two refinements, each switched on only where the cross-validation predictions show that it helps:

* **Largest connected component** (:func:`largest_component`, full connectivity): first for all
  foreground at once (every foreground voxel outside the largest foreground component becomes
  background), then per class (or per region): the voxels of the class outside its largest
  component become background (0), as nnU-Net does.
* **Mean-field refinement** (:func:`crf_refine`), a dependency-free stand-in for the dense CRF of
  the literature: a few iterations of ``Q = softmax(log P + w_s * S(Q) + w_b * B(Q))`` where
  ``S`` is a Gaussian smoothing of the current estimate (a Potts model's message passing, the
  voxel's own contribution excluded) and ``B`` an intensity-aware smoothing approximated with a
  few intensity bins (a coarse bilateral grid). Off by default; it works on probability maps, so
  it can be evaluated only when the validation probabilities exist (see below).

:func:`find_postprocessing` (``autoseg find-postprocessing WORK -c CONFIG``) reads, per fold, the
trainer's validation predictions ``models/<config>/fold_k/validation/<case>.npy`` (label values in
preprocessed space) and the references ``preprocessed/<config>/<case>_seg.npy``, tries each step
on top of the steps already accepted and keeps a step only when the mean Dice over classes
strictly rises and no class' mean Dice drops by more than ``tolerance``. The decision is written
to ``models/<config>/postprocessing.json``; ``autoseg predict`` applies it.

The CRF step is evaluated only when every validation case also has
``validation/<case>_probabilities.npy`` (float ``(K, Z, Y, X)``, the network's softmax or sigmoid
outputs). The trainer does not write them; ``find_postprocessing(..., compute_probabilities=True)``
predicts them with each fold's checkpoint (sliding window, as at inference). When probabilities
are used, every step is judged on the labels derived from them, so the baseline and the refined
predictions come from the same predictor.

Dice per class and case: ``2 |P & R| / (|P| + |R|)``, 1 when both are empty (so removing a
spurious component from a case without that class counts as the improvement it is), voxels of the
``ignore`` label left out, reference ``-1`` (outside the non-zero region) counted as background.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from autoseg.errors import AutosegError
from autoseg.plan import Plan, load_plan
from autoseg.utils import atomic_write_json, read_json
from autoseg.workdir import VALIDATION_DIR, WorkDir

POSTPROCESSING_FILE = "postprocessing.json"
PROBABILITIES_SUFFIX = "_probabilities"
DECISION_FORMAT = 1
DEFAULT_TOLERANCE = 1e-4

LabelValue = int | Sequence[int]


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


def label_mask(label_map: np.ndarray, value: LabelValue) -> np.ndarray:
    """Mask of a label value, or of a region (the union of a list of values)."""
    if isinstance(value, (int, np.integer)):
        return label_map == int(value)
    return np.isin(label_map, np.asarray(list(value)))


def keep_largest_component(label_map: np.ndarray, value: LabelValue | None = None,
                           background: int = 0) -> np.ndarray:
    """Set the voxels of ``value`` (None: all foreground) outside its largest component to background.

    Returns a new array; ``label_map`` is not modified.
    """
    out = np.array(label_map, copy=True)
    mask = out != background if value is None else label_mask(out, value)
    out[mask & ~largest_component(mask)] = background
    return out


def apply_postprocessing(label_map: np.ndarray, decision: Mapping[str, Any] | None) -> np.ndarray:
    """Apply the label-map steps of a decision (from :func:`find_postprocessing`).

    ``decision["largest_component_foreground"]`` (bool) first, then every entry of
    ``decision["largest_component"]`` (``{name: label value or list of values}``) in order. The CRF
    step works on probabilities and is applied by the caller before the label map is made (see
    :func:`crf_refine`). None or an empty decision returns a copy of ``label_map``.
    """
    out = np.array(label_map, copy=True)
    if not decision:
        return out
    if decision.get("largest_component_foreground"):
        out = keep_largest_component(out, None)
    for value in (decision.get("largest_component") or {}).values():
        out = keep_largest_component(out, value if isinstance(value, int) else tuple(value))
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CrfParams:
        known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


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


# --- Dice and the decision ------------------------------------------------------------------------------


def dice(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Dice of two boolean masks (1 when both are empty); voxels outside ``valid`` are ignored."""
    if valid is not None:
        pred = pred & valid
        ref = ref & valid
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    if n_pred + n_ref == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)


def class_dice(pred: np.ndarray, ref: np.ndarray, classes: Mapping[str, LabelValue],
               ignore_value: int | None = None) -> dict[str, float]:
    """Dice per class (or region) of two label maps; ``ref < 0`` is background."""
    ref = np.where(ref < 0, 0, ref)
    valid = None if ignore_value is None else ref != ignore_value
    return {name: dice(label_mask(pred, value), label_mask(ref, value), valid) for name, value in classes.items()}


def scored_classes(plan: Plan) -> dict[str, LabelValue]:
    """The classes (or regions) that Dice is computed for: every label but background and ignore."""
    return {name: (value if isinstance(value, int) else tuple(value)) for name, value in plan.labels.items()
            if name not in ("background", "ignore")}


@dataclass
class _ValidationCase:
    case_id: str
    fold: str
    prediction: Path
    reference: Path
    probabilities: Path | None
    image: Path | None


def _mean_per_class(rows: Sequence[Mapping[str, float]], classes: Iterable[str]) -> dict[str, float]:
    return {name: float(np.mean([row[name] for row in rows])) for name in classes}


def _overall(per_class: Mapping[str, float]) -> float:
    return float(np.mean(list(per_class.values())))


def _accept(before: Mapping[str, float], after: Mapping[str, float], tolerance: float) -> bool:
    """A step is kept when mean Dice strictly rises and no class loses more than ``tolerance``."""
    improves = _overall(after) > _overall(before) + 1e-12
    return improves and all(after[k] >= before[k] - tolerance for k in before)


def _fold_names(models_dir: Path, folds: Sequence[int | str] | None) -> list[str]:
    if folds is None:
        found = sorted((p.name[len("fold_"):] for p in models_dir.glob("fold_*")
                        if p.is_dir() and p.name != "fold_all" and (p / VALIDATION_DIR).is_dir()),
                       key=lambda f: int(f) if f.isdigit() else 1 << 30)
        return found
    names = []
    for fold in folds:
        if str(fold) == "all":
            raise PostprocessingError("fold 'all' has no held-out cases; choose cross-validation folds")
        names.append(str(int(fold)))
    return names


def _validation_cases(work: WorkDir, configuration: str, folds: Sequence[str],
                      data_name: str | None = None) -> list[_ValidationCase]:
    models = work.models(configuration)
    preprocessed = work.preprocessed(data_name or configuration)
    cases: dict[str, _ValidationCase] = {}
    for fold in folds:
        folder = models / f"fold_{fold}" / VALIDATION_DIR
        if not folder.is_dir():
            raise PostprocessingError(f"{folder}: missing; train fold {fold} to the end (its validation "
                                      "predictions are written there) or leave it out with --folds")
        for path in sorted(folder.glob("*.npy")):
            if path.name.startswith(".") or path.stem.endswith(PROBABILITIES_SUFFIX):
                continue
            case_id = path.stem
            reference = preprocessed / f"{case_id}_seg.npy"
            if not reference.is_file():
                raise PostprocessingError(f"{reference}: reference of validation case {case_id} (fold {fold}) "
                                          "is missing; re-run `autoseg preprocess`")
            probabilities = folder / f"{case_id}{PROBABILITIES_SUFFIX}.npy"
            image = preprocessed / f"{case_id}.npy"
            cases[case_id] = _ValidationCase(case_id, fold, path, reference,
                                             probabilities if probabilities.is_file() else None,
                                             image if image.is_file() else None)
    return [cases[k] for k in sorted(cases)]


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise PostprocessingError(f"{path}: cannot be read ({error})") from None


def find_postprocessing(work_dir: str | os.PathLike, configuration: str,
                        folds: Sequence[int | str] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                        crf: bool = True, crf_params: CrfParams | None = None,
                        compute_probabilities: bool = False, device: str = "cpu",
                        progress: bool = True) -> dict[str, Any]:
    """Decide from the cross-validation predictions which post-processing steps help.

    Args:
        work_dir: the work folder.
        configuration: the trained configuration.
        folds: cross-validation folds to use; default every fold with a ``validation`` folder.
        tolerance: how much one class' mean Dice may drop when a step raises the overall mean.
        crf: evaluate the mean-field refinement when validation probabilities exist.
        crf_params: its settings (default :class:`CrfParams`).
        compute_probabilities: first predict the validation probabilities with each fold's
            checkpoint (:func:`autoseg.inference.predict_validation_probabilities`), so the CRF
            step can be evaluated; costs one sliding-window prediction per validation case.
        device: torch device for that prediction and the refinement.
        progress: show a progress bar.

    Returns:
        The decision, also written to ``models/<configuration>/postprocessing.json``:
        ``largest_component_foreground`` (bool), ``largest_component`` (``{name: value}``),
        ``crf`` (``{"enabled", "evaluated", "params", ...}``), the mean Dice per class before and
        after, and one entry per step tried in ``steps``.

    Raises:
        PostprocessingError: no validation predictions, or a missing or unreadable file (named).
    """
    work = WorkDir(Path(work_dir))
    plan = load_plan(work.plan)
    config = plan.configuration(configuration)
    fold_names = _fold_names(work.models(configuration), folds)
    if not fold_names:
        raise PostprocessingError(f"{work.models(configuration)}: no fold has validation predictions; "
                                  "train at least one cross-validation fold first")
    if compute_probabilities:
        from autoseg.inference import predict_validation_probabilities

        for fold in fold_names:
            predict_validation_probabilities(work.root, configuration, fold, device=device, progress=progress)
    cases = _validation_cases(work, configuration, fold_names, config.data_name)
    if not cases:
        raise PostprocessingError(f"no validation predictions in folds {fold_names} of "
                                  f"{work.models(configuration)}")
    classes = scored_classes(plan)
    ignore = plan.labels.get("ignore")
    ignore_value = ignore if isinstance(ignore, int) else None
    is_regions = any(not isinstance(v, int) for k, v in plan.labels.items() if k != "ignore")
    activation: Literal["softmax", "sigmoid"] = "sigmoid" if is_regions else "softmax"
    use_probabilities = all(c.probabilities is not None for c in cases)
    params = crf_params or CrfParams()
    if crf and not use_probabilities:
        warnings.warn("CRF refinement not evaluated: validation probabilities are missing (pass "
                      "compute_probabilities=True to predict them)", stacklevel=2)

    from autoseg.training.labels import LabelInfo

    label_info = LabelInfo.from_labels(plan.labels)
    order = plan.regions_class_order

    def reference_of(case: _ValidationCase) -> np.ndarray:
        return np.load(case.reference, mmap_mode="r", allow_pickle=False)

    def score(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
        return _mean_per_class(rows, classes)

    # One case in memory at a time: the current predictions (after the steps kept so far) live in a
    # scratch folder next to the models, so a dataset of any size fits.
    models_dir = work.models(configuration)
    with tempfile.TemporaryDirectory(prefix=".postprocessing_", dir=models_dir) as scratch_name:
        scratch = Path(scratch_name)

        def current_path(case: _ValidationCase, variant: str = "") -> Path:
            return scratch / f"{case.case_id}{variant}.npy"

        baseline_rows: list[dict[str, float]] = []
        refined_rows: list[dict[str, float]] = []
        evaluate_crf = crf and use_probabilities
        for case in tqdm(cases, desc="post-processing: baseline", disable=not progress, leave=False):
            reference = reference_of(case)
            if use_probabilities:
                probs = torch.from_numpy(_load_npy(case.probabilities).astype(np.float32))  # type: ignore[arg-type]
                if tuple(probs.shape[1:]) != reference.shape:
                    raise PostprocessingError(f"{case.probabilities}: shape {tuple(probs.shape)} does not match the "
                                              f"reference {case.reference} {reference.shape}")
                prediction = probabilities_to_label_map(probs, label_info.values, activation, order)
                if evaluate_crf:
                    image = np.load(case.image, mmap_mode="r", allow_pickle=False) if case.image else None
                    better = crf_refine(probs.to(device), None if image is None else image[:1],
                                        activation, params, config.spacing, in_plane_only=config.dim == 2)
                    refined = probabilities_to_label_map(better, label_info.values, activation, order)
                    refined_rows.append(class_dice(refined, reference, classes, ignore_value))
                    np.save(current_path(case, "_crf"), refined)
                del probs
            else:
                prediction = _load_npy(case.prediction)
                if prediction.shape != reference.shape:
                    raise PostprocessingError(f"{case.prediction}: shape {prediction.shape} does not match the "
                                              f"reference {case.reference} {reference.shape}")
            baseline_rows.append(class_dice(prediction, reference, classes, ignore_value))
            np.save(current_path(case), prediction)

        steps: list[dict[str, Any]] = []
        current_score = score(baseline_rows)
        initial_score = dict(current_score)
        crf_decision: dict[str, Any] = {"enabled": False, "evaluated": evaluate_crf, "params": params.to_dict()}
        if evaluate_crf:
            candidate = score(refined_rows)
            accepted = _accept(current_score, candidate, tolerance)
            steps.append(_step("crf", current_score, candidate, accepted))
            crf_decision.update(enabled=accepted, dice_before=current_score, dice_after=candidate)
            if accepted:
                current_score = candidate
                for case in cases:
                    os.replace(current_path(case, "_crf"), current_path(case))

        def try_step(name: str, value: LabelValue | None) -> bool:
            nonlocal current_score
            rows = []
            for case in tqdm(cases, desc=f"post-processing: {name}", disable=not progress, leave=False):
                candidate_labels = keep_largest_component(np.load(current_path(case)), value)
                rows.append(class_dice(candidate_labels, reference_of(case), classes, ignore_value))
            candidate = score(rows)
            accepted = _accept(current_score, candidate, tolerance)
            steps.append(_step(name, current_score, candidate, accepted))
            if accepted:
                current_score = candidate
                for case in cases:  # recomputed rather than kept: one case in memory at a time
                    np.save(current_path(case), keep_largest_component(np.load(current_path(case)), value))
            return accepted

        foreground = try_step("largest_component_foreground", None)
        kept: dict[str, int | list[int]] = {}
        for name, value in classes.items():
            if try_step(f"largest_component:{name}", value):
                kept[name] = value if isinstance(value, int) else list(value)

    decision: dict[str, Any] = {
        "format": DECISION_FORMAT,
        "configuration": configuration,
        "folds": fold_names,
        "num_cases": len(cases),
        "source": "validation probabilities" if use_probabilities else "validation label predictions",
        "largest_component_foreground": foreground,
        "largest_component": kept,
        "crf": crf_decision,
        "tolerance": tolerance,
        "dice_before": initial_score,
        "dice_after": current_score,
        "mean_dice_before": _overall(initial_score),
        "mean_dice_after": _overall(current_score),
        "steps": steps,
        "rule": "a step is kept when the mean Dice over classes strictly rises and no class' mean Dice "
                "drops by more than the tolerance; steps are tried in order, each on top of the kept ones",
    }
    atomic_write_json(work.models(configuration) / POSTPROCESSING_FILE, decision)
    return decision


def _step(name: str, before: Mapping[str, float], after: Mapping[str, float], accepted: bool) -> dict[str, Any]:
    return {"step": name, "accepted": accepted, "mean_dice_before": _overall(before),
            "mean_dice_after": _overall(after), "dice_before": dict(before), "dice_after": dict(after)}


def load_postprocessing(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read a decision file (or ``<folder>/postprocessing.json``); None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except ValueError as error:
        raise PostprocessingError(str(error)) from None
    if not isinstance(data, dict):
        raise PostprocessingError(f"{path}: must be a JSON object")
    for value in (data.get("largest_component") or {}).values():
        if not (isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value))):
            raise PostprocessingError(f"{path}: \"largest_component\" values must be label values or lists "
                                      f"of them, found {value!r}")
    return data


# --- probabilities to labels (shared with inference) ---------------------------------------------------


def probabilities_to_label_map(probabilities: torch.Tensor, values: Sequence[Sequence[int]],
                               activation: Literal["softmax", "sigmoid"],
                               regions_class_order: Sequence[int] | None = None) -> np.ndarray:
    """``(K, *spatial)`` probabilities to a label map of raw label values.

    Softmax: the value of the most probable channel (``values[k][0]`` for channel ``k``). Sigmoid
    (regions): every region above 0.5 paints its ``regions_class_order`` value, in region order,
    so later (inner) regions overwrite earlier (outer) ones, as nnU-Net does.
    """
    if activation == "sigmoid":
        if regions_class_order is None or len(regions_class_order) != probabilities.shape[0]:
            raise ValueError(f"region outputs need regions_class_order with {probabilities.shape[0]} entries, "
                             f"got {regions_class_order}")
        largest = max(regions_class_order)
        dtype = torch.uint8 if largest < 256 else torch.int32
        labels = torch.zeros(probabilities.shape[1:], dtype=dtype, device=probabilities.device)
        for channel, value in enumerate(regions_class_order):
            labels[probabilities[channel] > 0.5] = int(value)
    else:
        lookup_values = [v[0] for v in values]
        dtype = torch.uint8 if max(lookup_values) < 256 else torch.int32
        lookup = torch.tensor(lookup_values, dtype=dtype, device=probabilities.device)
        labels = lookup[probabilities.argmax(0)]
    return labels.cpu().numpy()


__all__ = [
    "CrfParams",
    "PostprocessingError",
    "apply_postprocessing",
    "class_dice",
    "crf_refine",
    "dice",
    "find_postprocessing",
    "gaussian_smooth",
    "keep_largest_component",
    "label_mask",
    "largest_component",
    "load_postprocessing",
    "probabilities_to_label_map",
]
