"""Training batches: random patches from memory-mapped preprocessed cases, loaded in the background.

* :class:`PreprocessedDataset` reads the storage contract of ``WORK/preprocessed/<configuration>/``
  (``<case>.npy`` image, ``<case>_seg.npy`` labels, ``<case>.json`` sidecar with ``class_locations``).
* :class:`PatchLoader` (a batchgenerators ``DataLoader``) draws one batch: ``batch_size`` random cases,
  the last ``ceil(oversample_foreground * batch_size)`` patches centred on a random voxel of a random
  present foreground class, border padding with 0 (image) and -1 (labels, i.e. background), then
  the augmentation, then :meth:`LabelInfo.encode`. 2D configurations draw one Z slice per sample.
  A cascade stage's loader appends the previous stage's prediction, cropped with the same window,
  as one-hot channels before the augmentation (:mod:`autoseg.training.previous_stage`).
* :class:`BatchStream` iterates a loader in the main process (``workers=0``, errors keep their real
  traceback) or in ``workers`` background processes through batchgenerators'
  ``MultiThreadedAugmenter``; a worker's error comes back as :class:`DataLoadingError` with the case
  name and the worker's traceback, and every worker is shut down on error and on Ctrl-C.

Reproducibility: batch ``i`` of a stream is drawn with ``np.random.default_rng([seed, stream, rank, i])``
alone, and worker ``t`` of ``n`` produces batches ``t, t + n, t + 2n, ...`` which the augmenter returns
in order. The batches are therefore the same for any number of workers, and a run resumed at batch
``i`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from autoseg.case_properties import CaseProperties, load_case_properties
from autoseg.errors import AutosegError
from autoseg.processes import exit_with_parent
from autoseg.training.augment.on_device import deferred_batch
from autoseg.training.labels import LabelInfo
from autoseg.utils import read_json

IMAGE_PAD_VALUE = 0.0
LABEL_PAD_VALUE = -1
TRAIN_STREAM = 0
VALIDATION_STREAM = 1
_ERROR_KEY = "__data_loading_error__"
_LOCATION_CACHE_SIZE = 64


class DataLoadingError(AutosegError, RuntimeError):
    """Loading or augmenting a batch failed; names the case and carries the original traceback."""

    def __init__(self, message: str, case: str | None = None, worker_traceback: str | None = None) -> None:
        self.case = case
        self.worker_traceback = worker_traceback
        text = message
        if worker_traceback:
            text += "\n\nTraceback in the data loading worker:\n" + worker_traceback.rstrip()
        super().__init__(text)


class IncompletePreprocessingError(AutosegError):
    """The preprocessed folder lacks cases its dataset has (an interrupted or failed preprocess)."""


class Augmentation(Protocol):
    """What the loader needs from :func:`autoseg.training.augment.build_augmentation`'s result."""

    def input_patch_size(self, patch_size: Sequence[int]) -> tuple[int, ...]: ...

    def sample_batch(self, data: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> list[dict]: ...

    def __call__(self, data: np.ndarray, seg: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]: ...


# --- the preprocessed folder -------------------------------------------------------------------------


class PreprocessedDataset:
    """The finished cases of one ``WORK/preprocessed/<configuration>/`` folder.

    A case is finished when its sidecar ``<case>.json`` exists (it is written last). Arrays are
    opened with ``np.load(mmap_mode="r")`` on every access, so worker processes share the page
    cache instead of copying volumes.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no preprocessed data here; run `autoseg preprocess` first")
        self.case_ids = sorted(p.stem for p in self.folder.glob("*.json")
                               if not p.name.startswith(".") and p.name != "manifest.json")
        if not self.case_ids:
            raise FileNotFoundError(f"{self.folder}: no preprocessed cases (no <case>.json sidecars); "
                                    "run `autoseg preprocess` first")
        self._check_complete()
        self._locations: dict[str, dict[int, np.ndarray]] = {}

    def _check_complete(self) -> None:
        """Refuse a folder whose preprocessing was interrupted or failed for some cases: training on
        the others would write splits without them, and later folds would fail."""
        manifest = self.manifest
        missing = sorted(set(manifest.get("expected_cases") or ()) - set(self.case_ids))
        if not missing:
            return
        failed = manifest.get("failed") or {}
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        reasons = "".join(f"\n- {failed[c]}" for c in missing[:10] if c in failed)
        raise IncompletePreprocessingError(
            f"{self.folder}: preprocessing is incomplete: {len(missing)} of {len(manifest['expected_cases'])} "
            f"case(s) missing ({shown}); complete it with `autoseg preprocess {self.folder.parent.parent} "
            f"-c {self.folder.name}`{reasons}")

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def manifest(self) -> dict:
        """``manifest.json`` (empty if the folder has none)."""
        path = self.folder / "manifest.json"
        if not path.exists():
            return {}
        try:
            data = read_json(path)
        except ValueError as error:  # not JSON: a damaged file, not a bug
            raise IncompletePreprocessingError(f"{error}; re-run `autoseg preprocess "
                                               f"{self.folder.parent.parent} -c {self.folder.name}`") from None
        if not isinstance(data, dict) or not isinstance(data.get("expected_cases", []), list):
            raise IncompletePreprocessingError(f"{path}: not a preprocessing manifest; re-run `autoseg preprocess "
                                               f"{self.folder.parent.parent} -c {self.folder.name}`")
        return data

    def properties(self, case_id: str) -> CaseProperties:
        """The sidecar of a case."""
        return load_case_properties(self.folder / f"{case_id}.json")

    def load(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped ``(image (C, Z, Y, X) float32, seg (Z, Y, X) int)`` of a case."""
        image_path = self.folder / f"{case_id}.npy"
        seg_path = self.folder / f"{case_id}_seg.npy"
        image = np.load(image_path, mmap_mode="r", allow_pickle=False)
        seg = np.load(seg_path, mmap_mode="r", allow_pickle=False)
        if image.ndim != 4:
            raise ValueError(f"{image_path}: image must be (C, Z, Y, X), has shape {image.shape}")
        if seg.shape != image.shape[1:]:
            raise ValueError(f"{seg_path}: label shape {seg.shape} differs from the image's {image.shape[1:]}")
        return image, seg

    def class_locations(self, case_id: str) -> dict[int, np.ndarray]:
        """``{label value: (N, 3) int array of (z, y, x)}`` for the values present in the case."""
        cached = self._locations.get(case_id)
        if cached is not None:
            return cached
        raw = self.properties(case_id).class_locations
        out: dict[int, np.ndarray] = {}
        for key, coordinates in raw.items():
            array = np.asarray(coordinates, dtype=np.int64).reshape(-1, 3) if len(coordinates) else None
            if array is not None:
                out[int(key)] = array
        if len(self._locations) >= _LOCATION_CACHE_SIZE:  # bounded: sidecars can hold many coordinates
            self._locations.pop(next(iter(self._locations)))
        self._locations[case_id] = out
        return out

    def class_presence(self, case_ids: Sequence[str] | None = None) -> dict[str, set[int]]:
        """Per case, the label values with at least one recorded location (for stratified splits)."""
        return {c: set(self.class_locations(c)) for c in (case_ids or self.case_ids)}


class PreviousStageInput(Protocol):
    """What the loader needs from :class:`autoseg.training.previous_stage.PreviousStage`."""

    folder: Path

    def load(self, case_id: str) -> np.ndarray: ...

    def one_hot(self, label_map: np.ndarray) -> np.ndarray: ...


# --- patches -----------------------------------------------------------------------------------------


def crop_and_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """``array[..., start:start + size]`` over the last ``len(size)`` axes, padding outside the array.

    ``start`` may be negative and ``start + size`` may exceed the array: the part outside is filled
    with ``pad_value`` and the result always has shape ``(*leading, *size)``.
    """
    spatial = array.shape[-len(size):]
    lower = [max(0, s) for s in start]
    upper = [min(n, s + p) for n, s, p in zip(spatial, start, size)]
    leading = (slice(None),) * (array.ndim - len(size))
    crop = np.asarray(array[leading + tuple(slice(lo, up) for lo, up in zip(lower, upper))])
    pad = [(0, 0)] * (array.ndim - len(size)) + [(lo - s, s + p - up)
                                                 for s, p, lo, up in zip(start, size, lower, upper)]
    if any(before or after for before, after in pad):
        crop = np.pad(crop, pad, mode="constant", constant_values=pad_value)
    return crop


def patch_start(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator,
                center: Sequence[int] | None = None) -> list[int]:
    """Lower corner of a patch: uniform over valid positions, or centred on ``center``.

    A patch larger than the case is placed so that the case sits in its middle (the random offset
    is at most one voxel), as nnU-Net does.
    """
    start = []
    for axis, (n, p) in enumerate(zip(shape, patch)):
        need = max(0, p - n)
        low = -need // 2 if need else 0
        high = n + need // 2 + need % 2 - p
        if center is None:
            start.append(int(rng.integers(low, high + 1)))
        else:
            start.append(int(np.clip(center[axis] - p // 2, low, high)))
    return start


class PatchLoader(DataLoader):
    """Draws training batches ``{"data", "target", "keys", "index"}`` from a :class:`PreprocessedDataset`.

    Args:
        dataset: the preprocessed folder.
        case_ids: the cases to draw from (a fold's train or validation cases).
        patch_size: final patch size (2 or 3 axes; 2 means 2D slices of the 3D arrays).
        batch_size: samples per batch.
        label_info: turns raw labels into targets.
        oversample_foreground: fraction of the batch (the last samples, rounded up) centred on a
            foreground voxel.
        augmentation: called as ``augmentation(data, seg, rng)`` in the worker; its
            ``input_patch_size`` decides how large the drawn patch is. None: no augmentation.
        previous_stage: a cascade stage's stored previous-stage predictions: cropped with the
            same window and appended to the image as one-hot channels (before the augmentation).
        seed, stream, rank: identify the random stream (see the module docstring).
        start_batch: index of the first batch this loader produces (resume).
        as_tensors: return torch tensors (so the augmenter can pin them for CUDA).
        spatial_on_device: leave the augmentation's application to the training device: batches
            carry the input-size patches, their raw labels and the sampled parameters, and
            :func:`autoseg.training.augment.on_device.apply_deferred` finishes them (the same
            parameters as without the option; for few CPU cores feeding a fast GPU).
    """

    def __init__(self, dataset: PreprocessedDataset, case_ids: Sequence[str], patch_size: Sequence[int],
                 batch_size: int, label_info: LabelInfo, *, oversample_foreground: float = 0.33,
                 augmentation: Augmentation | None = None, previous_stage: PreviousStageInput | None = None,
                 seed: int = 0, stream: int = TRAIN_STREAM, rank: int = 0, start_batch: int = 0,
                 as_tensors: bool = False, spatial_on_device: bool = False) -> None:
        super().__init__(list(case_ids), batch_size, num_threads_in_multithreaded=1, infinite=True,
                         shuffle=False, return_incomplete=False)
        if not case_ids:
            raise ValueError("PatchLoader needs at least one case")
        if len(patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 axes, got {tuple(patch_size)}")
        self.indices = list(range(len(case_ids)))
        self.dataset = dataset
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.label_info = label_info
        self.num_forced = math.ceil(round(oversample_foreground * batch_size, 9))
        self.augmentation = augmentation
        self.previous_stage = previous_stage
        self.input_patch_size = (tuple(augmentation.input_patch_size(self.patch_size))
                                 if augmentation is not None else self.patch_size)
        self.seed, self.stream, self.rank = seed, stream, rank
        self.start_batch = start_batch
        self.as_tensors = as_tensors
        self.spatial_on_device = spatial_on_device
        self.catch_errors = False  # set by BatchStream for background workers
        self._produced = 0
        self._worker_ready = False
        self._main_pid = os.getpid()
        self._foreground = [v for vs in label_info.values for v in vs if v != 0]

    def batch_rng(self, index: int) -> np.random.Generator:
        """The random generator of batch ``index``: a function of (seed, stream, rank, index) only."""
        return np.random.default_rng([self.seed % 2**63, self.stream, self.rank, index])

    def generate_train_batch(self) -> dict[str, Any]:
        workers = self.number_of_threads_in_multithreaded or 1
        index = self.start_batch + self.thread_id + self._produced * workers
        self._produced += 1
        if not self.catch_errors:
            return self.make_batch(index)
        if not self._worker_ready:
            # A forked worker must not use torch's thread pool inherited from the parent (OpenMP
            # is not fork-safe); the augmentation's torch ops run single-threaded, like PyTorch's
            # own DataLoader workers.
            import torch

            torch.set_num_threads(1)
            # the main process forked this worker from its main thread: a parent-death signal is safe
            exit_with_parent(self._main_pid, parent_death_signal=True)
            self._worker_ready = True
        try:
            return self.make_batch(index)
        except Exception as error:  # crosses the process boundary as data, re-raised by BatchStream
            return {_ERROR_KEY: {"case": getattr(error, "case", None), "message": f"{type(error).__name__}: "
                                 f"{error}", "traceback": traceback.format_exc()}}

    def make_batch(self, index: int) -> dict[str, Any]:
        """Batch number ``index`` of this loader's stream."""
        rng = self.batch_rng(index)
        dim = len(self.patch_size)
        data, seg, keys = [], [], []
        for sample in range(self.batch_size):
            case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
            force = sample >= self.batch_size - self.num_forced
            try:
                image_patch, seg_patch = self._sample(case_id, force, rng, dim)
            except Exception as error:
                _attach_case(error, case_id, self.dataset.folder)
                raise
            data.append(image_patch)
            seg.append(seg_patch)
            keys.append(case_id)
        data_array = np.stack(data).astype(np.float32, copy=False)
        seg_array = np.stack(seg)[:, None].astype(np.int16, copy=False)
        try:
            if self.augmentation is not None and self.spatial_on_device:
                # the same draws as below; the device resamples the whole batch at once
                params = self.augmentation.sample_batch(data_array, seg_array, rng)
                deferred = deferred_batch(data_array, seg_array, params, self.label_info, self.as_tensors)
                return {**deferred, "keys": keys, "index": index}
            if self.augmentation is not None:
                data_array, seg_array, _ = self.augmentation(data_array, seg_array, rng)
            target = self.label_info.encode(seg_array)
        except Exception as error:
            _attach_case(error, ", ".join(keys), self.dataset.folder)
            raise
        if tuple(data_array.shape[2:]) != self.patch_size:
            raise ValueError(f"augmentation returned patches of {tuple(data_array.shape[2:])}, expected "
                             f"{self.patch_size}")
        batch: dict[str, Any] = {"data": np.ascontiguousarray(data_array, dtype=np.float32),
                                 "target": np.ascontiguousarray(target), "keys": keys, "index": index}
        if self.as_tensors:
            import torch

            batch["data"] = torch.from_numpy(batch["data"])
            batch["target"] = torch.from_numpy(batch["target"])
        return batch

    def _sample(self, case_id: str, force: bool, rng: np.random.Generator,
                dim: int) -> tuple[np.ndarray, np.ndarray]:
        image, seg = self.dataset.load(case_id)
        previous = self.previous_stage.load(case_id) if self.previous_stage is not None else None
        if previous is not None and previous.shape != seg.shape:
            raise ValueError(f"{self.previous_stage.folder / case_id}.npy: shape {previous.shape} differs from the "  # type: ignore[union-attr]
                             f"preprocessed case's {seg.shape}")
        center = None
        if force:
            locations = self.dataset.class_locations(case_id)
            present = [v for v in self._foreground if v in locations]
            if present:  # a case without foreground gets a random patch
                coordinates = locations[present[int(rng.integers(len(present)))]]
                center = coordinates[int(rng.integers(len(coordinates)))]
        if dim == 2:
            z = int(center[0]) if center is not None else int(rng.integers(image.shape[1]))
            image, seg = image[:, z], seg[z]
            previous = previous[z] if previous is not None else None
            center = None if center is None else center[1:]
        start = patch_start(seg.shape, self.input_patch_size, rng, center)
        image_patch = crop_and_pad(image, start, self.input_patch_size, IMAGE_PAD_VALUE)
        if previous is not None:
            # outside the case the previous stage saw background: 0 in every one-hot channel
            previous_patch = crop_and_pad(previous, start, self.input_patch_size, 0)
            image_patch = np.concatenate([image_patch, self.previous_stage.one_hot(previous_patch)])  # type: ignore[union-attr]
        return image_patch, crop_and_pad(seg, start, self.input_patch_size, LABEL_PAD_VALUE)


def _attach_case(error: BaseException, case: str, folder: Path) -> None:
    """Record which case failed on the exception itself (kept across re-raise)."""
    if getattr(error, "case", None) is None:
        try:
            error.case = case  # type: ignore[attr-defined]
        except AttributeError:
            pass
    if hasattr(error, "add_note"):
        error.add_note(f"while loading case {case} from {folder}")


# --- iteration in the main process or in workers ------------------------------------------------------


def default_workers(world_size: int = 1) -> int:
    """All cores shared between the processes of one machine, at most 12 per process (nnU-Net's default)."""
    return max(1, min(12, (os.cpu_count() or 1) // max(1, world_size)))


class BatchStream:
    """Iterate a :class:`PatchLoader` in the main process or in background processes.

    Use as a context manager (or call :meth:`close`) so that workers never outlive the training:
    ``close`` runs on errors and on ``KeyboardInterrupt`` alike.

    Args:
        loader: the batch source.
        workers: 0 loads in the calling process (real tracebacks, easy debugging); ``n > 0`` starts
            ``n`` processes.
        pin_memory: pin tensors for faster host-to-GPU copies (CUDA only).
        cached_per_worker: batches each worker may prepare ahead.
    """

    def __init__(self, loader: PatchLoader, workers: int, pin_memory: bool = False,
                 cached_per_worker: int = 3) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.loader = loader
        self.workers = workers
        if workers == 0:
            self._source: Any = SingleThreadedAugmenter(loader, None)
        else:
            loader.catch_errors = True
            loader.number_of_threads_in_multithreaded = workers
            loader.as_tensors = loader.as_tensors or pin_memory
            seeds = [int(np.random.default_rng([loader.seed % 2**63, loader.stream, loader.rank,
                                                 loader.start_batch, w]).integers(2**31)) for w in range(workers)]
            self._source = MultiThreadedAugmenter(loader, None, workers, cached_per_worker, seeds,
                                                  pin_memory=pin_memory)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._source)
        except BaseException:
            self.close()
            raise
        if _ERROR_KEY in batch:
            self.close()
            info = batch[_ERROR_KEY]
            where = f"case {info['case']}" if info["case"] else "a batch"
            raise DataLoadingError(f"loading {where} from {self.loader.dataset.folder} failed: "
                                   f"{info['message']}", info["case"], info["traceback"])
        return batch

    def close(self) -> None:
        """Stop and join every worker process (idempotent)."""
        if isinstance(self._source, MultiThreadedAugmenter):
            self._source._finish()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
