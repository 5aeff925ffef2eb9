"""Post-processing decided by cross-validation: which steps of :mod:`autoseg.postprocessing_steps` help.

:func:`find_postprocessing` (``autoseg find-postprocessing WORK -c CONFIG``) reads, per fold, the
trainer's validation predictions ``models/<config>/fold_k/validation/<case>.npy`` (label values in
preprocessed space) and the references ``preprocessed/<config>/<case>_seg.npy``, tries each step
(the mean-field refinement, the largest component of all foreground, then of each class) on top of
the steps already accepted and keeps a step only when the mean Dice over classes strictly rises and
no class' mean Dice drops by more than ``tolerance``. The decision
(:class:`~autoseg.postprocessing_steps.PostprocessingDecision`) is written to
``models/<config>/postprocessing.json``; ``autoseg predict`` applies it.

The CRF step is evaluated only when every validation case also has
``validation/<case>_probabilities.npy`` (float ``(K, Z, Y, X)``, the network's softmax or sigmoid
outputs). The trainer does not write them; ``find_postprocessing(..., compute_probabilities=True)``
predicts them with each fold's checkpoint
(:func:`autoseg.inference.predict_validation_probabilities`, sliding window as at inference). When
probabilities are used, every step is judged on the labels derived from them, so the baseline and
the refined predictions come from the same predictor.

Dice per class and case: ``2 |P & R| / (|P| + |R|)``, 1 when both are empty (so removing a
spurious component from a case without that class counts as the improvement it is), voxels of the
``ignore`` label left out, reference ``-1`` (outside the non-zero region) counted as background.

The steps themselves, the decision's type and its file live in :mod:`autoseg.postprocessing_steps`
(inference imports that module, and this one imports inference); their names are importable from
here too.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from autoseg.inference import predict_validation_probabilities
from autoseg.labels import LabelInfo, LabelValue, label_mask, probabilities_to_label_map
from autoseg.plan import load_plan
from autoseg.postprocessing_steps import (
    DEFAULT_TOLERANCE,
    POSTPROCESSING_FILE,
    PROBABILITIES_SUFFIX,
    CrfDecision,
    CrfParams,
    PostprocessingDecision,
    PostprocessingError,
    StepResult,
    apply_postprocessing,
    crf_refine,
    decision_from_dict,
    decision_to_dict,
    gaussian_smooth,
    keep_largest_component,
    largest_component,
    load_postprocessing,
    save_postprocessing,
)
from autoseg.workdir import VALIDATION_DIR, WorkDir

__all__ = [
    "POSTPROCESSING_FILE",
    "PROBABILITIES_SUFFIX",
    "CrfDecision",
    "CrfParams",
    "PostprocessingDecision",
    "PostprocessingError",
    "StepResult",
    "apply_postprocessing",
    "class_dice",
    "crf_refine",
    "decision_from_dict",
    "decision_to_dict",
    "dice",
    "find_postprocessing",
    "gaussian_smooth",
    "keep_largest_component",
    "label_mask",
    "largest_component",
    "load_postprocessing",
    "probabilities_to_label_map",
    "save_postprocessing",
]


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


def _fold_names(work: WorkDir, configuration: str, folds: Sequence[int | str] | None) -> list[str]:
    if folds is None:
        return [fold for fold in work.folds(configuration, containing=(VALIDATION_DIR,)) if fold != "all"]
    names = []
    for fold in folds:
        if str(fold) == "all":
            raise PostprocessingError("fold 'all' has no held-out cases; choose cross-validation folds")
        names.append(str(int(fold)))
    return names


def _validation_cases(work: WorkDir, configuration: str, folds: Sequence[str],
                      data_name: str | None = None) -> list[_ValidationCase]:
    preprocessed = work.preprocessed(data_name or configuration)
    cases: dict[str, _ValidationCase] = {}
    for fold in folds:
        folder = work.fold(configuration, fold) / VALIDATION_DIR
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
                        progress: bool = True) -> PostprocessingDecision:
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
        ``largest_component_foreground``, ``largest_component`` (``{name: value}``), ``crf``
        (enabled, evaluated, params, ...), the mean Dice per class before and after, and one
        :class:`StepResult` per step tried in ``steps``.

    Raises:
        PostprocessingError: no validation predictions, or a missing or unreadable file (named).
    """
    work = WorkDir(Path(work_dir))
    plan = load_plan(work.plan)
    config = plan.configuration(configuration)
    fold_names = _fold_names(work, configuration, folds)
    if not fold_names:
        raise PostprocessingError(f"{work.models(configuration)}: no fold has validation predictions; "
                                  "train at least one cross-validation fold first")
    if compute_probabilities:
        for fold in fold_names:
            predict_validation_probabilities(work.root, configuration, fold, device=device, progress=progress)
    cases = _validation_cases(work, configuration, fold_names, config.data_name)
    if not cases:
        raise PostprocessingError(f"no validation predictions in folds {fold_names} of "
                                  f"{work.models(configuration)}")
    label_info = LabelInfo.of(plan)
    classes = label_info.classes
    ignore_value = label_info.ignore_value
    activation = label_info.activation
    use_probabilities = all(c.probabilities is not None for c in cases)
    params = crf_params or CrfParams()
    if crf and not use_probabilities:
        warnings.warn("CRF refinement not evaluated: validation probabilities are missing (pass "
                      "compute_probabilities=True to predict them)", stacklevel=2)

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
                prediction = label_info.decode(probs)
                if evaluate_crf:
                    image = np.load(case.image, mmap_mode="r", allow_pickle=False) if case.image else None
                    better = crf_refine(probs.to(device), None if image is None else image[:1],
                                        activation, params, config.spacing, in_plane_only=config.dim == 2)
                    refined = label_info.decode(better)
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

        steps: list[StepResult] = []
        current_score = score(baseline_rows)
        initial_score = dict(current_score)
        crf_decision = CrfDecision(enabled=False, evaluated=evaluate_crf, params=params)
        if evaluate_crf:
            candidate = score(refined_rows)
            accepted = _accept(current_score, candidate, tolerance)
            steps.append(_step("crf", current_score, candidate, accepted))
            crf_decision = CrfDecision(enabled=accepted, evaluated=True, params=params,
                                       dice_before=current_score, dice_after=candidate)
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
        kept: dict[str, int | tuple[int, ...]] = {}
        for name, value in classes.items():
            if try_step(f"largest_component:{name}", value):
                kept[name] = value

    decision = PostprocessingDecision(
        configuration=configuration,
        folds=tuple(fold_names),
        num_cases=len(cases),
        source="validation probabilities" if use_probabilities else "validation label predictions",
        largest_component_foreground=foreground,
        largest_component=kept,
        crf=crf_decision,
        tolerance=tolerance,
        dice_before=initial_score,
        dice_after=current_score,
        mean_dice_before=_overall(initial_score),
        mean_dice_after=_overall(current_score),
        steps=tuple(steps),
        rule="a step is kept when the mean Dice over classes strictly rises and no class' mean Dice "
             "drops by more than the tolerance; steps are tried in order, each on top of the kept ones",
    )
    save_postprocessing(decision, work.models(configuration) / POSTPROCESSING_FILE)
    return decision


def _step(name: str, before: Mapping[str, float], after: Mapping[str, float], accepted: bool) -> StepResult:
    return StepResult(step=name, accepted=accepted, mean_dice_before=_overall(before),
                      mean_dice_after=_overall(after), dice_before=dict(before), dice_after=dict(after))


