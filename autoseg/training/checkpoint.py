"""Checkpoints: plain dicts of tensors and Python values, written atomically, read with ``weights_only``.

A checkpoint holds everything a resumed run needs to continue as if it had never stopped: the
network, optimizer and gradient-scaler states, the position (``epoch`` and ``iteration``), the
running statistics of a half-finished epoch, the EMA used to pick the best model, the training
log so far, the random states and the effective schedule. The data loader needs no state: its
batches are a function of (seed, batch index) (see :mod:`autoseg.training.data`).

Nothing is pickled beyond what ``torch.load(weights_only=True)`` accepts: tensors, numbers,
strings, None, lists, tuples and dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.atomic import atomic_write, remove_stale_temporaries, write_failure
from autoseg.locks import folder_lock
from autoseg.training.errors import TrainingError
from autoseg.workdir import CHECKPOINT_BEST, CHECKPOINT_LATEST, WorkDir

# CHECKPOINT_*: re-exported, the trainer's modules import them from here
__all__ = ["CHECKPOINT_BEST", "CHECKPOINT_LATEST", "Checkpoint", "CheckpointError", "capture_rng_state", "fold_lock",
           "load_checkpoint", "read_checkpoint", "restore_rng_state", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable or not an autoseg checkpoint."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous checkpoint intact).

    Raises:
        WriteError: the disk is full or the folder is not writable (the previous checkpoint stays).
    """
    def write(tmp: Path) -> None:
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        except RuntimeError as error:
            # torch reports a failed write (a full disk) as "[enforce fail at inline_container.cc...]"
            # or "PytorchStreamWriter failed writing file"; anything else is not about the disk
            if "inline_container" in str(error) or "failed writing" in str(error):
                raise write_failure(path, error) from None
            raise

    return atomic_write(path, write, check=_zip_problem)


def _zip_problem(tmp: Path) -> str | None:
    """Why a written checkpoint is not a complete zip archive (torch's format), or None."""
    try:
        with zipfile.ZipFile(tmp) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        return f"the written checkpoint is incomplete ({error})"
    return None


@contextlib.contextmanager
def fold_lock(work_dir: str | os.PathLike, configuration: str, fold: int | str,
              enabled: bool = True) -> Iterator[None]:
    """Hold the lock on a fold folder (:mod:`autoseg.locks`) and remove what a crashed run left there.

    One training run per fold at a time: a second one is refused with an ``AutosegLockError``
    naming the first. ``enabled=False`` (the other ranks of a distributed run) holds nothing.
    """
    work = WorkDir(work_dir)
    if not enabled or not work.plan.is_file() or not (str(fold) == "all" or str(fold).isdigit()):
        yield  # nothing to lock; a missing plan or a bad fold fails later, with its own message
        return
    folder = work.fold(configuration, fold)
    with folder_lock(folder, f"fold {fold} of configuration {configuration!r} ({folder})"):
        remove_stale_temporaries(folder, recursive=True)
        yield


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "network" not in state:
        raise CheckpointError(f"{path}: not an autoseg checkpoint (no 'network' entry)")
    if state.get("format", CHECKPOINT_FORMAT) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']} is newer than this autoseg "
                              f"reads ({CHECKPOINT_FORMAT})")
    return state


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a training run writes into ``checkpoint_*.pt``: one definition for the writer (the
    training loop) and the readers (resuming, fine-tuning, inference).

    Tensors stay tensors (``network`` and the optimizer, scaler and random states are PyTorch state
    dicts); ``schedule`` and ``topology`` are the plan's JSON form. Every field but ``network`` may
    be missing from a file: checkpoints of older versions lack ``precision``, and a model written by
    hand for inference needs no training state.
    """

    network: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    grad_scaler: dict[str, Any] | None = None  # None when no gradient scaler was enabled
    progress: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    topology: dict[str, Any] | None = None
    configuration: str | None = None
    fold: str | None = None
    plan_hash: str | None = None
    world_size: int | None = None
    precision: str | None = None

    def to_state(self) -> dict[str, Any]:
        """The dict :func:`save_checkpoint` writes (only tensors and plain values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, Any], path: str | os.PathLike) -> Checkpoint:
        """A loaded state dict as a :class:`Checkpoint`; unknown entries or a non-dict ``network``
        raise :class:`CheckpointError` naming ``path``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(state) - names - {"format"})
        if unknown:
            raise CheckpointError(f"{path}: not an autoseg training checkpoint (unknown entries: "
                                  f"{', '.join(unknown)})")
        if not isinstance(state.get("network"), dict):
            raise CheckpointError(f"{path}: not an autoseg checkpoint (no 'network' state dict)")
        return cls(**{k: v for k, v in state.items() if k in names})

    def check_resumable(self, path: str | os.PathLike) -> None:
        """Raise :class:`CheckpointError` naming ``path`` unless a run can continue from here."""
        missing = [name for name in ("optimizer", "progress", "rng", "schedule", "topology")
                   if getattr(self, name) is None]
        if missing:
            raise CheckpointError(f"{path}: cannot resume from this checkpoint: it has no {', '.join(missing)}")


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load (``weights_only=True``) and check a training checkpoint."""
    return Checkpoint.from_state(load_checkpoint(path, map_location), path)


def capture_rng_state() -> dict[str, Any]:
    """Global random states of torch, CUDA, numpy and Python as tensors and plain values."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuple(state["python"]))
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def _to_plain(value: Any) -> Any:
    return [_to_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value
