"""``autoseg calibrate WORK -c CONFIG``: fit what trust needs from a trained configuration.

:func:`calibrate` writes two artifacts beside the model, in ``models/<config>/``:

* ``calibration.json`` (:class:`~autoseg.trust.calibration.Calibration`): the temperature fitted on
  the cross-validation probabilities. Each fold's held-out cases are re-predicted with that fold's
  checkpoint (:func:`autoseg.inference.predict_validation_probabilities`, kept in
  ``fold_k/validation/<case>_probabilities.npy`` and reused by ``find-postprocessing``), a seeded
  sample of each case's voxels is taken, and the temperature minimising their negative
  log-likelihood is found. The calibration error "after" is measured out of sample: with several
  folds each fold is scored with the temperature fitted on the others; with one fold its cases are
  split into up to five groups the same way.
* ``reference_stats.json`` (:class:`~autoseg.trust.plausibility.ReferenceStats`): the training
  cases' volumes, pieces, locations, intensities and spacings, measured on the preprocessed data.

This module predicts through :mod:`autoseg.inference`, so it sits above it (like
:mod:`autoseg.postprocessing`); the rest of :mod:`autoseg.trust` is below inference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from autoseg.inference import predict_validation_probabilities
from autoseg.labels import LabelInfo
from autoseg.plan import load_plan
from autoseg.postprocessing_steps import PROBABILITIES_SUFFIX
from autoseg.trust.calibration import (
    CALIBRATION_FILE,
    Calibration,
    CalibrationError,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    save_calibration,
)
from autoseg.trust.confidence import class_confidence
from autoseg.trust.plausibility import (
    REFERENCE_STATS_FILE,
    ReferenceStats,
    reference_stats,
    save_reference_stats,
)
from autoseg.workdir import VALIDATION_DIR, WorkDir

__all__ = ["calibrate", "calibration_samples", "write_reference_stats"]

VOXELS_PER_CASE = 20_000
MAX_GROUPS = 5


def calibration_samples(probabilities: np.ndarray, seg: np.ndarray, label_info: LabelInfo,
                        count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of ``count`` voxels: probabilities ``(N, K)`` and targets (``(N,)`` or ``(N, K)``).

    Voxels of the ignore label are left out; reference ``-1`` (outside the non-zero region) is background.
    """
    targets = label_info.encode(np.asarray(seg)[None, None])[0]          # (T, Z, Y, X)
    valid = np.all(targets >= 0, axis=0).ravel()
    index = np.flatnonzero(valid)
    if index.size > count:
        index = np.sort(rng.choice(index, size=count, replace=False))
    flat_p = np.asarray(probabilities, dtype=np.float32).reshape(probabilities.shape[0], -1)[:, index].T
    flat_t = targets.reshape(targets.shape[0], -1)[:, index].T
    if not label_info.is_regions:
        flat_t = flat_t[:, 0]
    return torch.from_numpy(np.ascontiguousarray(flat_p)), torch.from_numpy(np.ascontiguousarray(flat_t))


def write_reference_stats(work_dir: str | os.PathLike, configuration: str) -> ReferenceStats:
    """Measure the preprocessed training cases and write ``models/<config>/reference_stats.json``."""
    work = WorkDir(Path(work_dir))
    plan = load_plan(work.plan)
    config = plan.configuration(configuration)
    stats = reference_stats(work.preprocessed(config.data_name), configuration, LabelInfo.of(plan))
    save_reference_stats(stats, work.models(configuration) / REFERENCE_STATS_FILE)
    return stats


def _structure_entropy(paths: Sequence[Path], temperature: float, label_info: LabelInfo) -> dict[str, float]:
    """Per class, the largest mean calibrated entropy over the predicted structure of a held-out case."""
    worst: dict[str, float] = {}
    for path in paths:
        probabilities = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        labels = label_info.decode(probabilities)
        scaled = apply_temperature(probabilities, temperature, label_info.activation)
        for name, confidence in class_confidence(scaled, labels, label_info).items():
            if confidence.entropy is not None:
                worst[name] = max(worst.get(name, 0.0), confidence.entropy)
    return worst


def _fold_names(work: WorkDir, configuration: str, folds: Sequence[int | str] | None) -> list[str]:
    if folds is not None:
        return [str(f) for f in folds if str(f) != "all"]
    return [f for f in work.folds(configuration, containing=(VALIDATION_DIR,)) if f != "all"]


def calibrate(work_dir: str | os.PathLike, configuration: str, folds: Sequence[int | str] | None = None,
              device: str = "cpu", voxels_per_case: int = VOXELS_PER_CASE, seed: int = 0,
              progress: bool = True) -> Calibration:
    """Fit the temperature on the cross-validation predictions; write it and the reference statistics.

    Raises:
        CalibrationError: no fold with validation predictions (train a fold to the end first).
    """
    work = WorkDir(Path(work_dir))
    plan = load_plan(work.plan)
    config = plan.configuration(configuration)
    label_info = LabelInfo.of(plan)
    activation = label_info.activation
    fold_names = _fold_names(work, configuration, folds)
    if not fold_names:
        raise CalibrationError(f"{work.models(configuration)}: no cross-validation fold with validation "
                               "predictions; train a fold (not 'all') to the end first")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    num_cases = 0
    all_paths: list[Path] = []
    for fold in fold_names:
        paths = predict_validation_probabilities(work.root, configuration, fold, device=device, progress=progress)
        all_paths += paths
        for path in tqdm(paths, desc=f"calibration samples fold {fold}", disable=not progress, leave=False):
            case_id = path.name[: -len(f"{PROBABILITIES_SUFFIX}.npy")]
            seg = np.load(work.preprocessed(config.data_name) / f"{case_id}_seg.npy", allow_pickle=False)
            probabilities = np.load(path, allow_pickle=False)
            group = fold if len(fold_names) > 1 else str(num_cases % MAX_GROUPS)
            groups.setdefault(group, []).append(calibration_samples(probabilities, seg, label_info,
                                                                    voxels_per_case, rng))
            num_cases += 1
    pooled = {name: (torch.cat([p for p, _ in rows]), torch.cat([t for _, t in rows])) for name, rows in groups.items()}
    probabilities = torch.cat([p for p, _ in pooled.values()])
    targets = torch.cat([t for _, t in pooled.values()])
    temperature = fit_temperature(probabilities, targets, activation)
    if len(pooled) > 1:
        # out of sample: each group scored with the temperature fitted on the others
        scaled_parts, target_parts = [], []
        for name, (p, t) in pooled.items():
            rest_p = torch.cat([q for other, (q, _) in pooled.items() if other != name])
            rest_t = torch.cat([u for other, (_, u) in pooled.items() if other != name])
            scaled_parts.append(apply_temperature(p, fit_temperature(rest_p, rest_t, activation), activation, 1))
            target_parts.append(t)
        scaled, scaled_targets = torch.cat(scaled_parts), torch.cat(target_parts)
        how = (f"leave-one-fold-out over {len(pooled)} folds" if len(fold_names) > 1
               else f"leave-one-group-out over {len(pooled)} groups of fold {fold_names[0]}'s cases")
    else:
        scaled, scaled_targets = apply_temperature(probabilities, temperature, activation, 1), targets
        how = "in sample (a single held-out case)"
    calibration = Calibration(
        configuration=configuration, activation=activation, temperature=temperature, folds=tuple(fold_names),
        num_cases=num_cases, num_voxels=int(probabilities.shape[0]),
        ece_before=expected_calibration_error(probabilities, targets, activation),
        ece_after=expected_calibration_error(scaled, scaled_targets, activation),
        nll_before=negative_log_likelihood(probabilities, targets, activation),
        nll_after=negative_log_likelihood(scaled, scaled_targets, activation),
        ece_evaluation=how, structure_entropy=_structure_entropy(all_paths, temperature, label_info))
    save_calibration(calibration, work.models(configuration) / CALIBRATION_FILE)
    write_reference_stats(work.root, configuration)
    return calibration
