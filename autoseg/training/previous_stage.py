"""A cascade stage's extra inputs for training: the previous stage's cross-validation predictions.

Trained on the previous stage's predictions of its own training cases, a cascade stage would see
near-perfect inputs that a new scan never gets. So, as in nnU-Net, each case's input comes from the
previous stage's fold that held it out: ``models/<previous>/fold_<k>/validation/<case>.npy``,
written at the end of every fold. Every fold of the previous stage must therefore be trained, and
the cascade uses the previous stage's ``splits.json``, so that its fold ``k`` is validated on the
same cases.

:func:`prepare_previous_stage` resamples those predictions onto this configuration's grid
(:func:`autoseg.cascade.to_stage_grid`, as inference does) and stores them as
``WORK/models/<configuration>/previous_stage/<case>.npy`` (int16 label values) with a
``manifest.json`` recording each case's source (path, size, modification time) and the grid's
configuration hash: a retrained previous-stage fold (or re-preprocessed data) is picked up on the
next run, nothing else is redone. :class:`PreviousStage` reads them for the patch loader and the
end-of-fold validation, one-hot per :func:`autoseg.cascade.one_hot`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from autoseg.cascade import one_hot, to_stage_grid
from autoseg.labels import LabelInfo
from autoseg.plan import Configuration, Plan, configuration_hash
from autoseg.training.data import PreprocessedDataset
from autoseg.training.errors import TrainingError
from autoseg.training.splits import SplitError, load_or_create_splits
from autoseg.utils import atomic_write, atomic_write_json, read_json
from autoseg.workdir import VALIDATION_DIR, WorkDir

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PreviousStage:
    """The stored previous-stage label maps of one cascade configuration."""

    folder: Path
    values: tuple[tuple[int, ...], ...]  # per one-hot channel, the label values it marks

    @classmethod
    def of(cls, work: WorkDir, plan: Plan, configuration: str) -> PreviousStage:
        """The stored inputs of a cascade configuration (written by :func:`prepare_previous_stage`)."""
        return cls(work.previous_stage(configuration), LabelInfo.of(plan).cascade_values)

    def load(self, case_id: str) -> np.ndarray:
        """The memory-mapped label map ``(Z, Y, X)`` of a case on this configuration's grid."""
        return np.load(self.folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False)

    def one_hot(self, label_map: np.ndarray) -> np.ndarray:
        """``(channels, *label_map.shape)`` float32 network input."""
        return one_hot(label_map, self.values)


def previous_stage_splits(work: WorkDir, configuration: Configuration) -> Path:
    """The splits file of the cascade's previous stage (the cascade's folds are the same)."""
    assert configuration.previous_stage is not None
    path = work.splits(configuration.previous_stage)
    if not path.exists():
        raise TrainingError(f"{path}: {configuration.name!r} trains on the cross-validation predictions of "
                            f"{configuration.previous_stage!r}, which has not been trained; train every fold of it "
                            f"first: autoseg train {work.root} -c {configuration.previous_stage} -f 0 (then 1, 2, ...)")
    return path


def prepare_previous_stage(work: WorkDir, plan: Plan, configuration: Configuration, dataset: PreprocessedDataset,
                           device: str = "cpu", progress: bool = True) -> PreviousStage:
    """Resample the previous stage's held-out predictions of every case onto ``configuration``'s grid.

    Raises:
        TrainingError: a fold of the previous stage is not finished (its validation is missing),
            or a case is in no fold's validation set; the message says which and what to run.
    """
    previous = plan.configuration(configuration.previous_stage or "")
    splits_path = previous_stage_splits(work, configuration)
    try:
        splits = load_or_create_splits(splits_path, dataset.case_ids)  # exists: only read and checked
    except SplitError as error:
        raise TrainingError(str(error)) from None
    held_out_by = {case: fold for fold, split in enumerate(splits) for case in split["val"]}
    orphans = [c for c in dataset.case_ids if c not in held_out_by]
    if orphans:
        raise TrainingError(f"{splits_path}: case(s) {orphans[:10]} are in no fold's validation set of "
                            f"{previous.name!r}, so they have no cross-validation prediction; preprocess both "
                            "configurations from the same dataset (or delete the splits and retrain it)")
    sources = {c: work.fold(previous.name, held_out_by[c]) / VALIDATION_DIR / f"{c}.npy" for c in dataset.case_ids}
    unfinished = sorted({held_out_by[c] for c, source in sources.items()
                         if not (source.parent / "summary.json").exists() or not source.exists()})
    if unfinished:
        folds = ", ".join(str(f) for f in unfinished)
        raise TrainingError(f"{work.models(previous.name)}: fold(s) {folds} of {previous.name!r} are not finished "
                            f"(no {VALIDATION_DIR}/ predictions); {configuration.name!r} trains on the predictions of "
                            f"every fold. Run: " + "; ".join(f"autoseg train {work.root} -c {previous.name} -f {f}"
                                                            for f in unfinished))

    folder = work.previous_stage(configuration.name)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    try:
        recorded = read_json(manifest_path) if manifest_path.exists() else {}
    except ValueError:  # unreadable (say, cut short by a full disk): redo every case
        recorded = {}
    grid = configuration_hash(plan, configuration.name)  # a re-preprocessed grid invalidates them all
    recorded_cases = recorded.get("cases", {}) if isinstance(recorded, dict) and recorded.get("grid") == grid else {}
    previous_data = PreprocessedDataset(work.preprocessed(previous.data_name))
    entries: dict[str, dict] = {}
    todo = []
    for case_id, source in sources.items():
        stat = source.stat()
        entry = {"source": str(source.relative_to(work.root)), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        entries[case_id] = entry
        if recorded_cases.get(case_id) != entry or not (folder / f"{case_id}.npy").exists():
            todo.append(case_id)
    for case_id in tqdm(todo, desc=f"{previous.name} predictions -> {configuration.name} grid", unit="case",
                        disable=not progress or not todo, leave=False):
        label_map = np.load(sources[case_id], allow_pickle=False)
        target = dataset.properties(case_id)
        expected = tuple(target.shape_after_resampling)
        _, reference = dataset.load(case_id)
        if tuple(reference.shape) != expected:
            raise TrainingError(f"{dataset.folder / case_id}.json: shape_after_resampling {list(expected)} differs "
                                f"from the stored label's {list(reference.shape)}; re-run `autoseg preprocess`")
        resampled = to_stage_grid(label_map, previous_data.properties(case_id), target, device)
        atomic_write(folder / f"{case_id}.npy", lambda tmp, a=resampled.astype(np.int16): np.save(tmp, a))
    atomic_write_json(manifest_path, {"previous_stage": previous.name, "grid": grid, "cases": entries})
    return PreviousStage.of(work, plan, configuration.name)

