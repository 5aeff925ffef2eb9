"""One run at a time per target: a lock file in the folder a stage writes.

Training locks its fold folder, preprocessing its configuration's folder, prediction its output
folder. A second run on the same target is refused with an :class:`AutosegLockError` that names
the running one (pid, host, command, start time). The lock is an ``flock`` on ``.autoseg.lock``,
which the kernel releases when its holder dies however it dies, so the lock of a killed run is
taken over (with a note) by the next run instead of blocking it forever. The file records who
holds it, for the message; it is removed on release, exceptions included.

Where ``fcntl`` is missing (Windows), the file is created with ``O_CREAT | O_EXCL`` and a lock
whose process is gone from this host is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from autoseg.atomic import remove_stale_temporaries, write_failure
from autoseg.errors import AutosegError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".autoseg.lock"


class AutosegLockError(AutosegError):
    """Another autoseg run holds the lock on the same folder."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: written into the lock file as JSON, read back for the message."""

    pid: int
    host: str
    command: str
    started: str

    @classmethod
    def this_process(cls) -> LockOwner:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), " ".join(["autoseg", *sys.argv[1:]])[:500], started)

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None  # empty (its writer was killed between creating and writing) or foreign

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}: {self.command}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, clean_stale: bool = False) -> Iterator[LockOwner | None]:
    """Hold the lock on ``folder`` (created if missing) for the duration of the ``with`` block.

    Args:
        folder: the folder the run writes.
        what: the target in words, for the message ("fold 0 of 2d").
        clean_stale: once the lock is held, delete the temporary files a crashed run left in the
            folder (:func:`autoseg.atomic.remove_stale_temporaries`).

    Yields:
        The owner of a stale lock that was taken over (its run died), or None.

    Raises:
        AutosegLockError: another live run holds the lock; the message names it.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with folder_lock(folder, "the example folder"):
        ...     try:
        ...         with folder_lock(folder, "the example folder"):
        ...             pass
        ...     except AutosegLockError as error:
        ...         print(str(error).split(":")[0])
        the example folder is in use by another autoseg run (pid ...
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if left empty
    path = folder / LOCK_FILE
    acquire = _acquire_flock if fcntl is not None else _acquire_exclusive
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, stale = acquire(path, what)
    except OSError as error:  # a read-only or full disk: say so, naming the folder
        raise write_failure(path, error) from None
    if stale is not None:
        print(f"note: took over the lock of {what} from a run that is no longer running ({stale.describe()})",
              file=sys.stderr)
    try:
        if clean_stale:
            remove_stale_temporaries(folder)
        yield stale
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # closing releases the flock, after the file is gone
        with contextlib.suppress(OSError):
            for empty in created:
                empty.rmdir()  # only if empty: a run that stopped before writing leaves no folder


def _acquire_flock(path: Path, what: str) -> tuple[int, LockOwner | None]:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = LockOwner.parse(_read(fd))
            os.close(fd)
            raise _refusal(path, what, owner) from None
        # The holder we waited on may have removed the file before releasing it: then this lock
        # is on a file nobody else can find; start over on the current one.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is None or current.st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            continue
        stale = LockOwner.parse(_read(fd))
        try:
            _write(fd, LockOwner.this_process())
        except OSError:  # a full disk: this lock is held, so its file can go
            path.unlink(missing_ok=True)
            os.close(fd)
            raise
        return fd, stale


def _acquire_exclusive(path: Path, what: str) -> tuple[int, LockOwner | None]:
    stale = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            owner = LockOwner.parse(path.read_text(errors="replace")) if path.exists() else None
            if owner is None or owner.host != socket.gethostname() or _alive(owner.pid):
                raise _refusal(path, what, owner) from None
            stale = owner
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        _write(fd, LockOwner.this_process())
        return fd, stale
    raise _refusal(path, what, None)


def _refusal(path: Path, what: str, owner: LockOwner | None) -> AutosegLockError:
    who = owner.describe() if owner is not None else "owner unknown"
    return AutosegLockError(f"{what} is in use by another autoseg run ({who}); wait for it to finish or stop it "
                            f"(lock file {path})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 65536).decode(errors="replace")


def _write(fd: int, owner: LockOwner) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(owner)) + "\n").encode())
