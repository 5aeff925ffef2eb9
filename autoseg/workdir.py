"""The work folder: every artifact of one dataset in one place, found by explicit path.

::

    WORK/
      fingerprint.json
      plan.json
      dataset.json                      copy of the raw dataset's, so a model folder is self-contained
      preprocessed/<configuration>/     one .npy + .json per case, and a manifest
      models/<configuration>/fold_<k>/  checkpoints, logs, validation results
      models/<configuration>/splits.json
      models/<cascade>/previous_stage/  a cascade's inputs: the previous stage's cross-validation
                                        predictions on its grid (one .npy per case, a manifest)

The default work folder is ``./autoseg_work/<dataset name>``; every command accepts ``--work``.
No environment variable is read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("autoseg_work")
VALIDATION_DIR = "validation"  # in a fold folder: the held-out cases' predictions and summary.json
# in a fold folder: the last state (resumable) and the one with the best validation EMA
CHECKPOINT_LATEST = "checkpoint_latest.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
CHECKPOINT_NAMES = (CHECKPOINT_BEST, CHECKPOINT_LATEST)  # the order a trained model is looked up in


@dataclass(frozen=True)
class WorkDir:
    """Paths of a work folder (nothing is created until a stage writes)."""

    root: Path

    @classmethod
    def for_dataset(cls, dataset_dir: str | os.PathLike, work: str | os.PathLike | None = None) -> WorkDir:
        """The work folder given explicitly, or ``./autoseg_work/<dataset folder name>``."""
        if work is not None:
            return cls(Path(work))
        return cls(DEFAULT_ROOT / Path(dataset_dir).resolve().name)

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def dataset_json(self) -> Path:
        return self.root / "dataset.json"

    def preprocessed(self, configuration: str) -> Path:
        return self.root / "preprocessed" / configuration

    def models(self, configuration: str) -> Path:
        return self.root / "models" / configuration

    def fold(self, configuration: str, fold: int | str) -> Path:
        name = "fold_all" if str(fold) == "all" else f"fold_{int(fold)}"
        return self.models(configuration) / name

    def folds(self, configuration: str, containing: Sequence[str] = CHECKPOINT_NAMES) -> list[str]:
        """Folds (``"0"``, ``"1"``, ..., ``"all"``) of a configuration whose folder holds one of ``containing``.

        The default finds the trained folds (those with a checkpoint); cross-validation folds come
        in numeric order, ``"all"`` last.
        """
        names = []
        for path in self.models(configuration).glob("fold_*"):
            name = path.name[len("fold_"):]
            if (name.isdigit() or name == "all") and path.is_dir() and any((path / c).exists() for c in containing):
                names.append(name)
        return sorted(names, key=lambda name: (0, int(name)) if name.isdigit() else (1, 0))

    def splits(self, configuration: str) -> Path:
        return self.models(configuration) / "splits.json"

    def previous_stage(self, configuration: str) -> Path:
        """A cascade configuration's stored previous-stage predictions (training inputs)."""
        return self.models(configuration) / "previous_stage"
