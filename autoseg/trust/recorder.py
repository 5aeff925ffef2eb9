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

    Prediction calls :meth:`mirror_tiles` with every tile batch's mirrored copies (flipped back)
    inside the sliding window, then :meth:`fold` with that fold's probabilities, and at the end
    :meth:`ensemble` with the folds' mean. The mirror agreement of a fold is the pooled pairwise
    overlap of :mod:`.confidence` computed over its tiles (Gaussian-weighted, as the tiles are
    blended), so measuring it changes neither the forward passes nor the result; the case's mirror
    agreement is the mean over folds.
    """

    def __init__(self) -> None:
        self._folds = AgreementAccumulator()
        self._copies = 0
        self._squares: torch.Tensor | None = None  # per channel: sum over copies of weighted ||p_i||^2
        self._totals: torch.Tensor | None = None   # per channel: weighted ||sum_i p_i||^2
        self._mirror_agreements: list[list[float]] = []
        self._fold_agreement: list[float] | None = None

    def mirror_tiles(self, copies: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
        """Count one tile batch: ``copies`` each ``(B, K, *patch)``, ``weights`` ``patch``."""
        w = weights.float()
        channel_axes = [0, *range(2, copies[0].ndim)]  # all but K
        squares = sum(torch.sum(c.float() ** 2 * w, dim=channel_axes) for c in copies)
        summed = sum(c.float() for c in copies)
        totals = torch.sum(summed ** 2 * w, dim=channel_axes)
        # kept where the tiles are (float32: MPS has no float64), so no device sync per tile batch;
        # read once per fold
        self._squares = squares if self._squares is None else self._squares + squares
        self._totals = totals if self._totals is None else self._totals + totals
        self._copies = len(copies)

    def fold(self, probabilities: torch.Tensor) -> None:
        if self._copies > 1 and self._squares is not None and self._totals is not None:
            squares, totals = self._squares.double().cpu(), self._totals.double().cpu()
            cross = totals - squares  # sum over pairs i != j of <p_i, p_j>
            denominator = (self._copies - 1) * squares
            values = torch.where(denominator > 1e-12, cross / denominator.clamp_min(1e-12),
                                 torch.ones_like(cross))
            self._mirror_agreements.append([float(min(1.0, max(0.0, v))) for v in values])
        self._copies, self._squares, self._totals = 0, None, None
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
