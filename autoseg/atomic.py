"""Verified writes: temporary name, check, fsync, rename; and the cleanup of what a crash left.

Every file autoseg publishes goes through :func:`atomic_write`: the content is written to a
temporary file of autoseg's own naming in the destination folder, checked (it exists, is not
empty, and passes the caller's check: an image writer reads its header back, since SimpleITK's
NIfTI writer does not report a full disk), flushed to the disk and only then renamed onto the
final name. A failure removes the temporary file and raises :class:`WriteError`, which names the
file and says whether the disk is full or the folder not writable. A crash (kill -9, power loss)
leaves the old file or the new one, never half a file, plus at worst a temporary file that
:func:`remove_stale_temporaries` deletes when the stage runs next.

Published files get the mode the umask gives (``mkstemp`` would leave them ``0600``).

This module imports only :mod:`autoseg.errors`, so every writer can use it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from autoseg.errors import AutosegError

# The mark in every temporary name autoseg makes: ".<final name>.<random>.autoseg-tmp<ending>".
TMP_MARK = ".autoseg-tmp"
# Names of older autoseg versions (".tmp_<random>.nii.gz" from the image writer and
# ".<name>.<random>.tmp<ending>" from the generic one), removed by the same cleanup.
_TMP_NAME = re.compile(r"^\..+" + re.escape(TMP_MARK) + r"|^\.tmp_|^\..+\.[A-Za-z0-9_]+\.tmp(\.|$)")

_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(AutosegError):
    """A file could not be written; the message names it and says why (full disk, read-only, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: cannot be written: {reason}; nothing was published under this name")


def write_failure(path: str | os.PathLike, error: BaseException) -> WriteError:
    """The :class:`WriteError` for an exception raised while writing ``path``.

    Example:
        >>> import errno
        >>> str(write_failure("/out/a.nii.gz", OSError(errno.EROFS, "Read-only file system")))
        '/out/a.nii.gz: cannot be written: the file system is read-only; nothing was published under this name'
    """
    code = getattr(error, "errno", None)
    if code in _FULL:
        return WriteError(path, f"the disk is full ({_free_space(Path(path).parent)})")
    if code == errno.EROFS:
        return WriteError(path, "the file system is read-only")
    if code in _NOT_WRITABLE or isinstance(error, PermissionError):
        return WriteError(path, "permission denied: the folder is not writable")
    detail = getattr(error, "strerror", None) or str(error) or type(error).__name__
    if _disk_nearly_full(Path(path).parent):
        return WriteError(path, f"the disk is full ({_free_space(Path(path).parent)}; {detail})")
    return WriteError(path, f"the disk is full or not writable ({detail})")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None],
                 check: Callable[[Path], str | None] | None = None, allow_empty: bool = False) -> Path:
    """Call ``write(tmp_path)``, verify the result, then rename it onto ``path``.

    Args:
        path: the file to publish.
        write: writes the content to the temporary path it is given (whose name keeps the final
            ending, so writers that choose a format from the ending still work).
        check: returns why the written temporary file is unusable, or None when it is fine (an
            image writer reads the header back here).
        allow_empty: an empty file is a valid result (else it means the write failed).

    Raises:
        WriteError: the disk is full, the folder is not writable, or the check failed; the
            temporary file is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> atomic_write(folder / "a.txt", lambda tmp: tmp.write_text("hi")).read_text()
        'hi'
        >>> sorted(p.name for p in folder.iterdir())
        ['a.txt']
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK + _ending(path), dir=path.parent)
    except OSError as error:
        raise write_failure(path, error) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            write(tmp)
            problem = _verify(tmp, check, allow_empty)
            if problem is None:
                _fsync(tmp)
                os.chmod(tmp, 0o666 & ~current_umask())
                os.replace(tmp, path)
                _fsync_folder(path.parent)
        except OSError as error:
            raise write_failure(path, error) from None
        if problem is not None:
            if _disk_nearly_full(path.parent):
                raise WriteError(path, f"the disk is full ({_free_space(path.parent)}): {problem}")
            raise WriteError(path, f"{problem}; is the disk full? ({_free_space(path.parent)})")
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def is_temporary(name: str) -> bool:
    """Whether a file name is one of autoseg's temporary names.

    Example:
        >>> is_temporary(".case_0.nii.gz.x1y2z3w4.autoseg-tmp.nii.gz"), is_temporary("case_0.nii.gz")
        (True, False)
    """
    return bool(_TMP_NAME.match(name))


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temporary files a crashed run left in ``folder``; returns what was removed.

    Call it only while holding the folder's lock (:mod:`autoseg.locks`): another run's temporary
    file is not stale while that run is writing it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    removed = []
    for path in candidates:
        if path.is_file() and is_temporary(path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (threads may be writing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _verify(tmp: Path, check: Callable[[Path], str | None] | None, allow_empty: bool) -> str | None:
    if not tmp.is_file():
        return "the writer produced no file"
    if not allow_empty and tmp.stat().st_size == 0:
        return "the writer produced an empty file"
    return check(tmp) if check is not None else None


def _ending(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every OS or file system can open a folder for this.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_nearly_full(folder: Path) -> bool:
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return False
    return usage.free < max(1 << 20, usage.total // 1000)


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:.1f} MB free" if free >= 1e5 else f"{free} bytes free"
