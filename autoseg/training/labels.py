"""Training's view of the labels: :class:`autoseg.labels.LabelInfo` (targets, scored channels).

The label rules live in :mod:`autoseg.labels`, shared by every stage; this module keeps the names
training code has always imported from here.
"""

from __future__ import annotations

from autoseg.labels import IGNORE_INDEX, LabelError, LabelInfo

__all__ = ["IGNORE_INDEX", "LabelError", "LabelInfo"]
