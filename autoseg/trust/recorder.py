"""What ``autoseg predict`` does for trust: one :class:`TrustRecorder` per run.

Per case, :meth:`TrustRecorder.members` gives a :class:`CaseMembers` that prediction feeds with the
probabilities it computes anyway (each fold's, and with mirroring each mirrored copy's), then
:meth:`TrustRecorder.assess` turns the case into a :class:`~autoseg.trust.summary.CaseSummary` and
an uncertainty map; :meth:`TrustRecorder.write` writes ``summary.json`` beside the label maps,
keeping the records of cases an earlier run predicted and this one skipped.

The model's ``calibration.json`` and ``reference_stats.json`` (``models/<config>/``, written by
``autoseg calibrate``) are used when present: without them there is no temperature and no
plausibility check, and the summary says so (``temperature`` null, no such flags).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autoseg.case_properties import CaseProperties
from autoseg.io import NATURAL_2D_ENDINGS, Image, file_ending, write_like
from autoseg.labels import LabelInfo
from autoseg.restore import restore_to_original
from autoseg.trust.assess import Assessment, assess_case
from autoseg.trust.calibration import CALIBRATION_FILE, Calibration, load_calibration
from autoseg.trust.confidence import AgreementAccumulator
from autoseg.trust.plausibility import REFERENCE_STATS_FILE, ReferenceStats, load_reference_stats
from autoseg.trust.summary import (
    SUMMARY_FILE,
    CaseSummary,
    PredictionSummary,
    SummaryError,
    load_summary,
    save_summary,
)

__all__ = ["UNCERTAINTY_SUFFIX", "CaseMembers", "TrustRecorder", "write_uncertainty"]

UNCERTAINTY_SUFFIX = "_uncertainty"


class CaseMembers:
    """Agreement between the members of one case's prediction, streamed (see :mod:`.confidence`).

    Prediction calls :meth:`mirror` with each mirrored copy's probabilities (flipped back), then
    :meth:`fold` with that fold's probabilities (the mean of its copies), and at the end
    :meth:`ensemble` with the folds' mean. The mirror agreement is the mean over folds of the
    agreement between each fold's copies.
    """

    def __init__(self) -> None:
        self._folds = AgreementAccumulator()
        self._mirrors = AgreementAccumulator()
        self._mirror_agreements: list[list[float]] = []
        self._fold_agreement: list[float] | None = None

    def mirror(self, probabilities: torch.Tensor) -> None:
        self._mirrors.add(probabilities)

    def fold(self, probabilities: torch.Tensor) -> None:
        agreement = self._mirrors.agreement(probabilities)
        if agreement is not None:
            self._mirror_agreements.append(agreement)
        self._mirrors = AgreementAccumulator()
        self._folds.add(probabilities)

    def ensemble(self, probabilities: torch.Tensor) -> None:
        self._fold_agreement = self._folds.agreement(probabilities)

    def fold_agreement(self) -> list[float] | None:
        return self._fold_agreement

    def mirror_agreement(self) -> list[float] | None:
        if not self._mirror_agreements:
            return None
        return [float(v) for v in np.mean(np.array(self._mirror_agreements), axis=0)]


class TrustRecorder:
    """Confidence and flags of every case of one prediction run (thread-safe)."""

    def __init__(self, models_dir: str | os.PathLike, configuration: str, label_info: LabelInfo,
                 channel_names: Sequence[str], folds: Sequence[str], tta: bool) -> None:
        folder = Path(models_dir)
        self.calibration: Calibration | None = load_calibration(folder / CALIBRATION_FILE) \
            if (folder / CALIBRATION_FILE).is_file() else None
        self.stats: ReferenceStats | None = load_reference_stats(folder / REFERENCE_STATS_FILE) \
            if (folder / REFERENCE_STATS_FILE).is_file() else None
        self.configuration = configuration
        self.label_info = label_info
        self.channel_names = tuple(channel_names)
        self.folds = tuple(folds)
        self.tta = tta
        self._cases: dict[str, CaseSummary] = {}
        self._lock = threading.Lock()

    def members(self) -> CaseMembers:
        return CaseMembers()

    def assess(self, case_id: str, label_file: str, probabilities: torch.Tensor | np.ndarray, labels: np.ndarray,
               image: np.ndarray, properties: CaseProperties, members: CaseMembers | None = None,
               seconds: float | None = None, uncertainty_file: str | None = None) -> Assessment:
        """Assess one case (everything on the preprocessed grid) and keep its record."""
        assessment = assess_case(
            case_id, label_file, probabilities, labels, image, properties, self.label_info, self.stats,
            self.calibration,
            fold_agreement=None if members is None else members.fold_agreement(),
            mirror_agreement=None if members is None else members.mirror_agreement(),
            seconds=seconds, channel_names=self.channel_names)
        if uncertainty_file is not None:
            assessment.summary = dataclasses.replace(assessment.summary, uncertainty_file=uncertainty_file)
        with self._lock:
            self._cases[case_id] = assessment.summary
        return assessment

    def summary(self, earlier: Sequence[CaseSummary] = ()) -> PredictionSummary:
        """This run's cases, plus ``earlier`` records of cases it did not redo."""
        with self._lock:
            cases = dict(self._cases)
        for case in earlier:
            cases.setdefault(case.case_id, case)
        return PredictionSummary(
            configuration=self.configuration, folds=self.folds, tta=self.tta,
            temperature=None if self.calibration is None else self.calibration.temperature,
            cases=tuple(cases[k] for k in sorted(cases)), labels=dict(self.label_info.classes))

    def write(self, output_dir: str | os.PathLike, keep: Sequence[str] = ()) -> PredictionSummary:
        """Write ``output_dir/summary.json``; records of cases in ``keep`` come from an earlier one."""
        path = Path(output_dir) / SUMMARY_FILE
        earlier: Sequence[CaseSummary] = ()
        if keep and path.is_file():
            try:
                earlier = [c for c in load_summary(path).cases if c.case_id in set(keep)]
            except SummaryError:
                earlier = ()  # an unreadable old summary is replaced, not fatal to a finished prediction
        summary = self.summary(earlier)
        save_summary(summary, path)
        return summary


def write_uncertainty(uncertainty: torch.Tensor | np.ndarray, properties: CaseProperties, reference: Image,
                      path: str | os.PathLike) -> Path:
    """Write a preprocessed-grid uncertainty map in the input's geometry (``CASE_uncertainty<ending>``).

    float32 in ``[0, 1]`` (0 outside the cropped region), or for PNG/BMP, which hold no floats,
    uint8 ``0..255``.
    """
    array = np.asarray(torch.as_tensor(uncertainty).float().cpu())[None]
    restored = restore_to_original(array, properties, "probabilities", fill=0.0)[0]
    restored = np.clip(restored, 0.0, 1.0).astype(np.float32)
    path = Path(path)
    if file_ending(path.name) in NATURAL_2D_ENDINGS:
        restored = np.round(restored * 255).astype(np.uint8)
    write_like(restored, reference, path)
    return path
