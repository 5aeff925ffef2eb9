"""The per-case trust record ``predictions/summary.json``: confidence per class, flags, timing.

``autoseg predict`` writes one :class:`CaseSummary` per case into a :class:`PredictionSummary`
(:func:`save_summary`); ``autoseg report`` reads it back (:func:`load_summary`). A :class:`Flag` is
one reason to look at a case, in one line a reader can act on; a case with any flag "needs review".
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass

from autoseg.errors import AutosegError
from autoseg.utils import atomic_write_json, read_model_file, validate_model

__all__ = ["SUMMARY_FILE", "CaseSummary", "ClassSummary", "Flag", "PredictionSummary", "SummaryError",
           "flagged_lines", "load_summary", "save_summary"]

SUMMARY_FILE = "summary.json"
SCHEMA_VERSION = 1
_STRICT = ConfigDict(extra="forbid", frozen=True)


class SummaryError(AutosegError, ValueError):
    """A missing or malformed ``summary.json`` (the message names the file)."""


@dataclass(config=_STRICT)
class Flag:
    """One reason to review a case.

    Attributes:
        check: the check that raised it (``volume``, ``missing``, ``components``, ``location``,
            ``intensity``, ``spacing``, ``agreement``, ``entropy``).
        reason: one line for people, with the measured value and the limit it crossed.
        label: the class it concerns, or None for the whole case.
    """

    check: str
    reason: str
    label: str | None = None


@dataclass(config=_STRICT)
class ClassSummary:
    """One class in one case: what :class:`autoseg.trust.confidence.ClassConfidence` measured, plus size."""

    voxels: int
    volume_mm3: float
    probability: float | None = None
    entropy: float | None = None
    fold_agreement: float | None = None
    mirror_agreement: float | None = None
    score: float = 1.0


@dataclass(config=_STRICT)
class CaseSummary:
    """One predicted case: per-class confidence, flags, and seconds spent."""

    case_id: str
    label_file: str
    score: float
    classes: dict[str, ClassSummary]
    flags: tuple[Flag, ...] = ()
    seconds: float | None = None
    uncertainty_file: str | None = None

    @property
    def needs_review(self) -> bool:
        return bool(self.flags)


@dataclass(config=_STRICT)
class PredictionSummary:
    """Every case of one ``autoseg predict`` run (``summary.json``)."""

    configuration: str
    folds: tuple[str, ...]
    tta: bool
    temperature: float | None
    cases: tuple[CaseSummary, ...]
    labels: dict[str, int | tuple[int, ...]] | None = None  # the classes' label values, for the report
    schema_version: int = SCHEMA_VERSION

    def least_trusted_first(self) -> list[CaseSummary]:
        """Flagged cases first (most flags first), then by ascending score."""
        return sorted(self.cases, key=lambda c: (-len(c.flags), c.score, c.case_id))


_ADAPTER = TypeAdapter(PredictionSummary)


def save_summary(summary: PredictionSummary, path: str | os.PathLike) -> Path:
    """Write ``summary.json`` atomically (``path`` is the file)."""
    return atomic_write_json(path, _ADAPTER.dump_python(summary, mode="json"))


def load_summary(path: str | os.PathLike) -> PredictionSummary:
    """Read a ``summary.json`` (or the predictions folder holding one)."""
    data, source = read_model_file(path, SUMMARY_FILE, SummaryError,
                                   "it is written by `autoseg predict` next to the label maps")
    return validate_model(_ADAPTER, data, str(source), "prediction summary", SummaryError)


def flagged_lines(summary: PredictionSummary) -> list[str]:
    """One line per flag of every flagged case, least trusted first (what ``predict`` prints).

    >>> case = CaseSummary("c1", "c1.nii.gz", 0.4, {}, (Flag("missing", "no liver predicted", "liver"),))
    >>> flagged_lines(PredictionSummary("3d_fullres", ("0",), True, None, (case,)))
    ['c1: no liver predicted']
    """
    lines = []
    for case in summary.least_trusted_first():
        lines.extend(f"{case.case_id}: {flag.reason}" for flag in case.flags)
    return lines
