"""The one base of every user-facing autoseg error.

Each stage keeps its own error class next to the code that raises it (``DatasetError`` in
:mod:`autoseg.dataset`, ``PlanError`` in :mod:`autoseg.plan`, ...); all of them derive from
:class:`AutosegError`, so a caller such as the command line catches them all with one ``except``.
Some also keep an older second base (``ValueError``, ``RuntimeError``) that callers rely on.

This module imports nothing from autoseg, so any module can import it without a cycle.
"""

from __future__ import annotations

import copyreg
from typing import Any


class AutosegError(Exception):
    """A failure the user can act on: the message says what went wrong and names the file.

    Instances survive pickling intact (same type, message and attributes), so an error raised in a
    worker process (joblib, ``concurrent.futures``) reaches the parent as itself.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # The default (``type(self)(*self.args)``) calls ``__init__`` again with the formatted
        # message as its only argument: that fails for subclasses whose ``__init__`` takes more
        # arguments (ImageReadError(path, reason)) and garbles those that format their arguments
        # (DatasetError(problems) would get the message as a list of characters). Creating the
        # object without ``__init__`` and restoring ``args`` and the attributes avoids both.
        return copyreg.__newobj__, (type(self), *self.args), dict(self.__dict__)
