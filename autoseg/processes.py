"""No process outlives its command: SIGTERM handled like Ctrl-C, and workers that die with their parent.

* :func:`sigterm_as_interrupt` makes SIGTERM (a scheduler's or ``kill``'s stop request) raise
  ``KeyboardInterrupt`` in the command's main process, so it takes the Ctrl-C path: training saves
  a resumable checkpoint and the command line says how to continue. A forked child that inherited
  the handler dies of the signal as it would have without it.
* :func:`exit_with_parent` makes a worker process (data loading, preprocessing, fingerprint,
  evaluation, a benchmark stage) exit as soon as its parent is gone, even after ``kill -9`` of the
  parent, which no handler sees: a watcher thread notices the parent change (the orphan is adopted
  by another process) within :data:`WATCH_INTERVAL` seconds, on every POSIX system; on Linux the
  kernel's parent-death signal (``PR_SET_PDEATHSIG``) ends it at once where that is safe.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

WATCH_INTERVAL = 0.5
_PR_SET_PDEATHSIG = 1
_main_pid: int | None = None
_watching_pid: int | None = None


def sigterm_as_interrupt() -> Callable[[], None]:
    """In the main thread of a command's main process: SIGTERM raises ``KeyboardInterrupt``.

    Returns:
        A function that puts the previous handler back (for a command run inside a longer-lived
        Python process, such as a test or a script calling the command line's ``main``).

    Example:
        >>> restore = sigterm_as_interrupt()
        >>> restore()
    """
    global _main_pid
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    _main_pid = os.getpid()
    previous = signal.signal(signal.SIGTERM, _interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _interrupt(signum: int, frame: object) -> None:
    if os.getpid() != _main_pid:
        # a forked worker inherited the handler: end as the default action would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process without waiting
    raise KeyboardInterrupt


def exit_with_parent(main_pid: int | None, parent_death_signal: bool = False) -> None:
    """Make this worker process exit when its parent, ``main_pid``, dies; calling it again does nothing.

    Args:
        main_pid: the process that started this one (workers are its direct children). Called in
            that process itself (a task run without workers) or with None, nothing happens, so
            task functions can call this unconditionally.
        parent_death_signal: also ask Linux to send SIGKILL when the parent dies. Only safe when the
            thread that started this process lives as long as its process (the kernel signals on
            the death of the creating thread): the main thread of the parent, not a pool's helper.

    Example:
        >>> exit_with_parent(main_pid=os.getpid())  # in the main process: no effect
    """
    global _watching_pid
    pid = os.getpid()
    if main_pid is None or pid == main_pid or _watching_pid == pid:
        return
    _watching_pid = pid
    if parent_death_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still ends it
    # An orphan is adopted by another process at once (even while its dead parent is a zombie not
    # yet reaped), so a parent id other than main_pid means the parent is gone.
    if os.getppid() != main_pid:
        os._exit(1)
    threading.Thread(target=_watch, args=(main_pid,), name="autoseg-exit-with-parent", daemon=True).start()


def _watch(main_pid: int) -> None:
    while os.getppid() == main_pid:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)
