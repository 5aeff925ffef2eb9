"""Trust the output: per-case confidence, "needs review" flags and a visual review sheet.

* :mod:`.confidence`: agreement between the members of a prediction (folds, mirrored copies) and
  voxel-wise entropy, from probabilities prediction computes anyway.
* :mod:`.calibration`: temperature scaling and the expected calibration error; ``calibration.json``.
* :mod:`.plausibility`: a prediction against the training statistics (volume, pieces, location,
  intensities, noise, blanked regions, spacing); ``reference_stats.json``.
* :mod:`.summary`: the per-case record ``predictions/summary.json`` and its flags.
* :mod:`.assess`: one case in, its record and uncertainty map out; :mod:`.recorder`: what
  ``autoseg predict`` keeps over a run.
* :mod:`.report`: ``autoseg report``, one HTML page with contours, least trusted case first.
* :mod:`.fit`: ``autoseg calibrate``, fitting the temperature and the reference statistics from
  the cross-validation predictions. It predicts through :mod:`autoseg.inference` and is therefore
  not imported here: inference imports this package, and importing it from here would close a cycle.
"""

from __future__ import annotations

from autoseg.trust.assess import Assessment, assess_case, confidence_flags
from autoseg.trust.calibration import (
    CALIBRATION_FILE,
    Calibration,
    CalibrationError,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    save_calibration,
)
from autoseg.trust.confidence import AgreementAccumulator, ClassConfidence, class_confidence, entropy_map
from autoseg.trust.plausibility import (
    REFERENCE_STATS_FILE,
    ReferenceStats,
    ReferenceStatsError,
    load_reference_stats,
    measure_case,
    plausibility_flags,
    reference_stats,
    save_reference_stats,
)
from autoseg.trust.recorder import CaseMembers, TrustRecorder
from autoseg.trust.summary import (
    SUMMARY_FILE,
    CaseSummary,
    Flag,
    PredictionSummary,
    load_summary,
    save_summary,
)

__all__ = [
    "CALIBRATION_FILE",
    "REFERENCE_STATS_FILE",
    "SUMMARY_FILE",
    "AgreementAccumulator",
    "Assessment",
    "Calibration",
    "CalibrationError",
    "CaseMembers",
    "CaseSummary",
    "ClassConfidence",
    "Flag",
    "PredictionSummary",
    "ReferenceStats",
    "ReferenceStatsError",
    "TrustRecorder",
    "apply_temperature",
    "assess_case",
    "class_confidence",
    "confidence_flags",
    "entropy_map",
    "expected_calibration_error",
    "fit_temperature",
    "load_calibration",
    "load_reference_stats",
    "load_summary",
    "measure_case",
    "plausibility_flags",
    "reference_stats",
    "save_calibration",
    "save_reference_stats",
    "save_summary",
]
