"""The base of every user-facing training error, so a caller (the CLI) can catch them all at once."""

from __future__ import annotations

from autoseg.errors import AutosegError


class TrainingError(AutosegError, ValueError):
    """Training cannot go on as asked; the message says why and, where it can, what to do."""
