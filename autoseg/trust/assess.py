"""One predicted case in, its trust record out: :func:`assess_case`.

Prediction calls this once per case with what it already has on the preprocessed grid (the
ensemble's probabilities, the decoded labels, the normalised image, the sidecar) and the members'
agreement (:class:`~autoseg.trust.confidence.AgreementAccumulator`); it applies the configuration's
temperature, measures confidence per class, runs the plausibility checks and returns a
:class:`~autoseg.trust.summary.CaseSummary` and the voxel-wise uncertainty map.

Confidence flags (constants below): a class whose members agree less than :data:`AGREEMENT_MIN`
(pooled overlap between folds, or between mirrorings), or whose mean normalised entropy over the
predicted structure exceeds the largest seen on a held-out cross-validation case
(``calibration.json``'s ``structure_entropy``) by more than :data:`ENTROPY_MARGIN`; without a
calibration, :data:`ENTROPY_MAX`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoseg.case_properties import CaseProperties
from autoseg.labels import LabelInfo
from autoseg.trust.calibration import Calibration, apply_temperature
from autoseg.trust.confidence import ClassConfidence, class_confidence, entropy_map
from autoseg.trust.plausibility import ReferenceStats, measure_case, plausibility_flags
from autoseg.trust.summary import CaseSummary, ClassSummary, Flag

__all__ = ["AGREEMENT_MIN", "ENTROPY_MAX", "Assessment", "assess_case", "confidence_flags"]

AGREEMENT_MIN = 0.8
ENTROPY_MARGIN = 0.1
ENTROPY_MAX = 0.5


@dataclass
class Assessment:
    """A case's trust record and its voxel-wise uncertainty (preprocessed grid, float32 ``(Z, Y, X)``)."""

    summary: CaseSummary
    uncertainty: torch.Tensor


def confidence_flags(confidences: Mapping[str, ClassConfidence],
                     entropy_reference: Mapping[str, float] | None = None) -> list[Flag]:
    """Flags for classes whose members disagree or whose voxels are uncertain.

    ``entropy_reference``: per class, the largest structure entropy of a held-out case.

    >>> confidence_flags({"liver": ClassConfidence(10, 0.9, 0.1, fold_agreement=0.6)})[0].reason
    'liver: the folds agree on it only to 0.60 (below 0.8)'
    >>> confidence_flags({"liver": ClassConfidence(10, 0.6, 0.7)}, {"liver": 0.55})[0].reason
    'liver: uncertain voxels (mean entropy 0.70 over the structure; held-out cases at most 0.55)'
    """
    flags = []
    for name, c in confidences.items():
        for what, value in (("folds", c.fold_agreement), ("mirrored copies", c.mirror_agreement)):
            if value is not None and value < AGREEMENT_MIN and c.voxels:
                flags.append(Flag("agreement", f"{name}: the {what} agree on it only to {value:.2f} "
                                               f"(below {AGREEMENT_MIN})", name))
        if c.entropy is None:
            continue
        reference = None if entropy_reference is None else entropy_reference.get(name)
        if reference is not None and c.entropy > reference + ENTROPY_MARGIN:
            flags.append(Flag("entropy", f"{name}: uncertain voxels (mean entropy {c.entropy:.2f} over the "
                                         f"structure; held-out cases at most {reference:.2f})", name))
        elif reference is None and c.entropy > ENTROPY_MAX:
            flags.append(Flag("entropy", f"{name}: uncertain voxels (mean entropy {c.entropy:.2f} over the "
                                         f"structure, above {ENTROPY_MAX})", name))
    return flags


def assess_case(case_id: str, label_file: str, probabilities: torch.Tensor | np.ndarray, labels: np.ndarray,
                image: np.ndarray, properties: CaseProperties, label_info: LabelInfo,
                stats: ReferenceStats | None = None, calibration: Calibration | None = None,
                fold_agreement: Sequence[float] | None = None, mirror_agreement: Sequence[float] | None = None,
                seconds: float | None = None, channel_names: Sequence[str] | None = None) -> Assessment:
    """Confidence, flags and uncertainty of one case (everything on the preprocessed grid).

    Args:
        probabilities: the ensemble's ``(K, Z, Y, X)`` probabilities (before calibration).
        labels: the label map decoded from them (before post-processing).
        image: the normalised input ``(C, Z, Y, X)`` (only the image channels).
        stats: the training statistics; None skips the plausibility checks.
        calibration: the configuration's temperature; None uses the probabilities as they are.
    """
    probabilities = torch.as_tensor(probabilities).float().cpu()
    if calibration is not None:
        probabilities = apply_temperature(probabilities, calibration.temperature, label_info.activation)
    uncertainty = entropy_map(probabilities, label_info.activation)
    confidences = class_confidence(probabilities, labels, label_info, uncertainty, fold_agreement, mirror_agreement)
    flags = confidence_flags(confidences, None if calibration is None else calibration.structure_entropy)
    volume_per_voxel = float(np.prod(properties.spacing_after_resampling))
    if stats is not None:
        flags = plausibility_flags(measure_case(labels, image, properties, label_info), stats, channel_names) + flags
    classes = {name: ClassSummary(voxels=c.voxels, volume_mm3=c.voxels * volume_per_voxel, probability=c.probability,
                                  entropy=c.entropy, fold_agreement=c.fold_agreement,
                                  mirror_agreement=c.mirror_agreement, score=c.score)
               for name, c in confidences.items()}
    score = min((c.score for c in confidences.values()), default=1.0)
    summary = CaseSummary(case_id=case_id, label_file=label_file, score=score, classes=classes, flags=tuple(flags),
                          seconds=seconds)
    return Assessment(summary, uncertainty)
