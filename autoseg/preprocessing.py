"""Preprocessing: raw cases -> canonical, cropped, resampled, normalized arrays on disk.

Per case (:func:`preprocess_case`, also used by inference on unlabelled cases):

1. **Orient** to one canonical orientation by axis permutation and flips only
   (:mod:`autoseg.orientation`), so LPS- and RAS-stored scans look the same to the network.
2. **Crop** to the bounding box of the non-zero region of all channels (holes filled, as nnU-Net);
   label voxels that are background *and* outside that region become ``-1``, always, so the
   sampler and the loss can treat them as background and normalization can ignore them.
3. **Resample** image and label to the configuration's spacing (:mod:`autoseg.resampling`, with
   the plan's orders and slow-axis rule). 2D configurations never resample z.
4. **CT prior channels** (when the configuration lists ``ct_priors``): soft masks of Hounsfield
   windows computed from the raw HU values of the first CT channel (after resampling, before
   clipping). Each window edge is a logistic ramp :data:`PRIOR_EDGE_HU` wide (12% to 88%), e.g.
   lung ``[-1000, -400]``, soft tissue ``[-100, 100]``, bone ``[400, open)``; appended after the
   image channels.
5. **Normalize** each channel per :class:`autoseg.plan.ChannelNormalization` (``ct``: clip, then
   ``(x - mean) / std`` with the plan's values; ``zscore``: the image's own mean and std, inside
   the non-zero region when ``use_nonzero_mask``, 0 outside; ``rescale01``; ``none``).

Storage (``WORK/preprocessed/<configuration>/``), see ``docs/architecture.md``:

* ``<case>.npy``: float32 ``(C, Z, Y, X)``, uncompressed so the trainer reads random patches with
  ``np.load(path, mmap_mode="r")`` without loading the volume;
* ``<case>_seg.npy``: int16 ``(Z, Y, X)``, original label values, ``-1`` outside the non-zero region;
* ``<case>.json``: the sidecar (geometry, orientation, crop box, shapes, class locations, hashes),
  written last: a case is finished when its sidecar exists with the current configuration hash;
* ``manifest.json``: plan and configuration hashes, finished cases, and per case the raw bytes (the
  source files) and stored bytes (the three files above).

On-disk size: a case takes ``4 * C + 2`` bytes per voxel after resampling (float32 image, int16
label), uncompressed, plus a sidecar of at most ~150 kB per foreground class. That is several times
the raw ``.nii.gz``: for the example CT dataset (10 cases, ``3d_fullres``, one channel) it is 3.9 MB
per case against 0.49 MB raw (8.1x), because the raw int16 is gzip-compressed and its thick slices
are resampled to the finer median spacing. The price buys reading a random patch in O(patch) time.
The manifest records both sizes per case and their ratio (``stored_to_raw``);
``tests/benchmarks/bench_resampling.py --dataset`` measures them.

:func:`restore_to_original` (:mod:`autoseg.restore`, importable from here) is the exact inverse for
predictions: un-resample to the cropped shape, un-crop, un-orient, back to the array as read (a 2D
case comes back 2D).

:func:`preprocess_dataset` runs over all training cases in parallel (joblib, one case per task, so
memory is about one case per worker), resumable: files are written under temporary names and
renamed, finished cases are skipped, half-written ones (no sidecar, or a leftover temporary file)
are redone, and output of another plan is detected instead of mixed with new output.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

from autoseg.atomic import WriteError, is_temporary, remove_stale_temporaries
from autoseg.case_properties import (
    CaseProperties,
    SidecarPrior,
    SidecarResampling,
    load_case_properties,
    save_case_properties,
)
from autoseg.cluster import connect, run_cases
from autoseg.dataset import CaseData, CaseFiles, DatasetError, load_case, training_cases
from autoseg.errors import AutosegError
from autoseg.io import ImageReadError
from autoseg.locks import folder_lock
from autoseg.orientation import (
    canonical_shape,
    canonical_spacing,
    canonical_transform,
    to_canonical,
)
from autoseg.plan import (
    ChannelNormalization,
    Configuration,
    IntensityWindow,
    Plan,
    PlanError,
    configuration_hash,
    load_plan,
    plan_from_dict,
    plan_hash,
    plan_to_dict,
)
from autoseg.processes import exit_with_parent
from autoseg.resampling import (
    compute_new_shape,
    find_slow_axis,
    label_values,
    resample_image,
    resample_label,
)

# restore_to_original: the inverse, imported from here by its callers
from autoseg.restore import box_slices, restore_to_original  # noqa: F401
from autoseg.utils import atomic_write, atomic_write_json, bounding_slices, read_json
from autoseg.validate import require_valid_dataset
from autoseg.workdir import WorkDir

MAX_CLASS_LOCATIONS = 10_000
PRIOR_EDGE_HU = 20.0
MANIFEST = "manifest.json"
SEG_SUFFIX = "_seg"
_NORM_EPS = 1e-8
_CHUNK = 1 << 22  # voxels per chunk when scanning a whole volume


class PreprocessingError(AutosegError):
    """Preprocessing could not finish: ``failures`` maps each failed case to a message naming it.

    ``summaries`` holds what was done for the configurations that ran (other cases complete).
    """

    def __init__(self, message: str, failures: dict[str, str] | None = None,
                 summaries: dict[str, PreprocessSummary] | None = None) -> None:
        self.failures = dict(failures or {})
        self.summaries = dict(summaries or {})
        super().__init__(message)


class PreprocessedCase(NamedTuple):
    """One preprocessed case: image ``(C, Z, Y, X)`` float32, label int16 or None, its sidecar."""

    image: np.ndarray
    label: np.ndarray | None
    properties: CaseProperties


@dataclass
class PreprocessSummary:
    """What one configuration's preprocessing run did."""

    configuration: str
    output_dir: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    raw_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        ratio = f", {self.stored_bytes / self.raw_bytes:.1f}x" if self.raw_bytes else ""
        return (f"{len(self.processed)} case(s) preprocessed, {len(self.skipped)} already done, "
                f"{len(self.failed)} failed in {self.seconds:.1f} s -> {self.output_dir} "
                f"({self.stored_bytes / 2**20:.1f} MB on disk, raw {self.raw_bytes / 2**20:.1f} MB{ratio})")


# --- per-case steps -------------------------------------------------------------------------------


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any channel of ``(C, Z, Y, X)`` is non-zero, holes filled (nnU-Net)."""
    mask = image[0] != 0
    for channel in image[1:]:
        mask |= channel != 0
    if mask.all():
        return mask
    return ndimage.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` of the True region per axis; the whole array when it has none."""
    box = bounding_slices(mask) or tuple(slice(0, s) for s in mask.shape)
    return [[s.start, s.stop] for s in box]


def target_spacing_for(configuration: Configuration, spacing: Sequence[float],
                       is_2d: bool = False) -> tuple[float, float, float]:
    """The spacing a case is resampled to: the configuration's, except that 2D never resamples z."""
    target = tuple(float(s) for s in configuration.spacing)
    if configuration.dim == 2 or is_2d:
        target = (float(spacing[0]), target[1], target[2])
    return target  # type: ignore[return-value]


def ct_prior_channels(hu: np.ndarray, windows: Sequence[IntensityWindow],
                      out: np.ndarray | None = None) -> np.ndarray:
    """Soft masks ``(P, ...)`` of Hounsfield-unit windows, from raw (unclipped) HU values.

    Each edge is a logistic ramp :data:`PRIOR_EDGE_HU` wide: 0.5 at the edge, 0.12 and 0.88 at
    10 HU either side. A window without ``high`` is open above (e.g. bone, >= 400 HU).
    """
    if out is None:
        out = np.empty((len(windows), *hu.shape), dtype=np.float32)
    scale = PRIOR_EDGE_HU / 4.0  # logistic(+-2) = 0.88 / 0.12
    step = max(1, _CHUNK // max(1, hu[0].size)) if hu.ndim > 1 else hu.shape[0]
    for start in range(0, hu.shape[0], step):  # slabs: temporaries stay small
        values = torch.from_numpy(np.ascontiguousarray(hu[start: start + step], dtype=np.float32))
        upper = torch.empty_like(values)
        for k, window in enumerate(windows):
            target = out[k, start: start + step]
            # Computed in place in the output where it is contiguous (it is, for preprocess_case's).
            direct = target.flags.c_contiguous and target.dtype == np.float32
            soft = torch.from_numpy(target) if direct else torch.empty_like(values)
            torch.sub(values, window.low, out=soft).mul_(1.0 / scale).sigmoid_()  # torch's is vectorized
            if window.high is not None:
                torch.sub(values, window.high, out=upper).mul_(-1.0 / scale).sigmoid_()
                soft.mul_(upper)
            if not direct:
                target[...] = soft.numpy()
    return out


def _mean_std(channel: np.ndarray, mask: np.ndarray | None) -> tuple[float, float, int]:
    """Mean, standard deviation and count (float64, two passes over slabs: no full-size temporaries)."""
    step = max(1, _CHUNK // max(1, channel[0].size))
    slabs = range(0, channel.shape[0], step)

    def values(start: int) -> np.ndarray:
        slab = channel[start: start + step]
        return slab[mask[start: start + step]] if mask is not None else slab.ravel()

    count = sum(int(values(start).size) for start in slabs)
    if count == 0:
        return 0.0, 0.0, 0
    mean = sum(float(values(start).sum(dtype=np.float64)) for start in slabs) / count
    square = sum(float(np.square(values(start).astype(np.float64) - mean).sum()) for start in slabs)
    return mean, (square / count) ** 0.5, count


def normalize_channel(channel: np.ndarray, scheme: ChannelNormalization,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """Normalize one channel in place (float32) per the plan; ``mask`` is the non-zero region."""
    if scheme.scheme == "ct":
        np.clip(channel, scheme.clip_low, scheme.clip_high, out=channel)
        channel -= np.float32(scheme.mean)
        channel /= np.float32(max(scheme.std, _NORM_EPS))  # type: ignore[type-var]
    elif scheme.scheme == "zscore":
        inside = mask if (scheme.use_nonzero_mask and mask is not None) else None
        mean, std, count = _mean_std(channel, inside)
        if count == 0:
            channel[...] = 0
            return channel
        channel -= np.float32(mean)
        channel /= np.float32(max(std, _NORM_EPS))
        if inside is not None:
            channel[~inside] = 0
    elif scheme.scheme == "rescale01":
        low, high = float(channel.min()), float(channel.max())
        channel -= np.float32(low)
        channel /= np.float32(max(high - low, _NORM_EPS))
    return channel


def class_locations(seg: np.ndarray, exclude: Iterable[int] = (), max_per_class: int = MAX_CLASS_LOCATIONS,
                    seed: int = 0) -> dict[str, list[list[int]]]:
    """Up to ``max_per_class`` voxel coordinates per foreground value (> 0), sampled uniformly.

    Keys are label values as strings; coordinates ``[z, y, x]`` are in memory order. The volume is
    scanned in chunks, so memory stays O(chunk + max_per_class) even for a class of millions of
    voxels.
    """
    rng = np.random.default_rng(seed)
    skip = {int(v) for v in exclude}
    flat = seg.reshape(-1)
    values, counts = label_values(seg)
    locations: dict[str, list[list[int]]] = {}
    for value, count in zip(values.tolist(), counts.tolist()):
        if value <= 0 or value in skip:
            continue
        # Ranks (in memory order) of the voxels to keep: all of them, or a uniform sample.
        ranks = None if count <= max_per_class else np.sort(rng.choice(count, max_per_class, replace=False))
        picked, seen = [], 0
        for start in range(0, flat.size, _CHUNK):
            hits = np.flatnonzero(flat[start: start + _CHUNK] == value)
            if ranks is None:
                picked.append(hits + start)
            else:
                low, high = np.searchsorted(ranks, [seen, seen + hits.size])
                picked.append(hits[ranks[low:high] - seen] + start)
            seen += hits.size
        coordinates = np.unravel_index(np.concatenate(picked), seg.shape)
        locations[str(value)] = np.stack(coordinates, 1).tolist()
    return locations


def _case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _as_configuration(plan: Plan, configuration: str | Configuration) -> Configuration:
    if isinstance(configuration, Configuration):
        return configuration
    return plan.configuration(configuration)


def _first_ct_channel(configuration: Configuration) -> int:
    for index, scheme in enumerate(configuration.normalization):
        if scheme.scheme == "ct":
            return index
    raise PlanError(f"configuration {configuration.name!r} enables CT prior channels but no channel "
                    "uses CT normalization")


def preprocess_case(case: CaseData, plan: Plan, configuration: str | Configuration,
                    device: str | torch.device = "cpu") -> PreprocessedCase:
    """Orient, crop, resample, add CT priors and normalize one case (labelled or not).

    Args:
        case: from :func:`autoseg.dataset.load_case` (``label`` may be None, as at inference).
        plan: the dataset's plan.
        configuration: a configuration name of the plan (or the configuration itself).
        device: torch device for the resampling.

    Returns:
        ``(image, label, properties)``: float32 ``(C + priors, Z, Y, X)``, int16 label with ``-1``
        outside the non-zero region (None when the case has no label), and the sidecar dict that
        :func:`restore_to_original` needs.
    """
    config = _as_configuration(plan, configuration)
    channels = len(config.normalization)
    if case.image.ndim != 4 or case.image.shape[0] != channels:
        raise ValueError(f"case {case.case_id}: image of shape {case.image.shape}, the plan expects "
                         f"({channels}, Z, Y, X)")
    if case.label is not None and case.label.shape != case.image.shape[1:]:
        raise ValueError(f"case {case.case_id}: label shape {case.label.shape} differs from the image's "
                         f"{case.image.shape[1:]}")
    transform = canonical_transform(case.reference.direction)
    # Views only: the resampler copies slab by slab, so no full-size copy is made before it.
    image = to_canonical(case.image, transform)
    spacing = canonical_spacing(case.spacing, transform)
    mask = nonzero_mask(image)
    box = bounding_box(mask)
    crop = box_slices(box)
    image = image[(slice(None), *crop)]
    mask = mask[crop]
    if case.label is not None:
        label = to_canonical(case.label, transform)[crop]
        if label.size and (label.min() < 0 or label.max() > np.iinfo(np.int16).max):
            raise ValueError(f"case {case.case_id}: label values must lie in 0..32767, found "
                             f"{label.min()}..{label.max()}")
        seg = label.astype(np.int16)
    else:
        seg = np.zeros(mask.shape, dtype=np.int16)
    seg[(seg == 0) & ~mask] = -1
    del mask

    target = target_spacing_for(config, spacing, case.is_2d)
    new_shape = compute_new_shape(seg.shape, spacing, target)
    options = config.resampling
    slow_axis = find_slow_axis(spacing, target, options.anisotropy_threshold)
    common = {"new_shape": new_shape, "slow_axis_order": options.slow_axis_order, "slow_axis": slow_axis,
              "separate_slow_axis": slow_axis is not None, "device": device}
    out = np.empty((channels + len(config.ct_priors), *new_shape), dtype=np.float32)
    resample_image(image, spacing, target, order=options.image_order, out=out[:channels], **common)
    seg = resample_label(seg, spacing, target, order=options.label_order, **common)
    if config.ct_priors:
        ct_prior_channels(out[_first_ct_channel(config)], config.ct_priors, out=out[channels:])
    inside = seg >= 0
    for index, scheme in enumerate(config.normalization):
        normalize_channel(out[index], scheme, inside)
    del inside

    ignore = plan.labels.get("ignore")
    locations = {}
    if case.label is not None:
        exclude = [ignore] if isinstance(ignore, int) else []
        locations = class_locations(seg, exclude, seed=_case_seed(case.case_id))
    properties = CaseProperties(
        case_id=case.case_id,
        source_files={},
        configuration=config.name,
        configuration_hash=configuration_hash(plan, config.name) if config.name in plan.configurations else "",
        plan_hash=plan_hash(plan),
        is_2d=bool(case.is_2d),
        shape=[int(s) for s in case.reference.array.shape],
        spacing=[float(s) for s in case.spacing],
        origin=list(case.reference.origin),
        direction=list(case.reference.direction),
        orientation=transform,
        shape_canonical=list(canonical_shape(case.image.shape, transform)),
        spacing_canonical=list(spacing),
        crop_bbox=box,
        shape_after_crop=[b - a for a, b in box],
        shape_after_resampling=list(new_shape),
        spacing_after_resampling=list(target),
        resampling=SidecarResampling(image_order=options.image_order, label_order=options.label_order,
                                     slow_axis_order=options.slow_axis_order, slow_axis=slow_axis,
                                     anisotropy_threshold=options.anisotropy_threshold),
        channels=list(plan.channel_names) + [f"prior_{w.name}" for w in config.ct_priors],
        ct_priors=[SidecarPrior(name=w.name, low=w.low, high=w.high) for w in config.ct_priors],
        class_locations=locations,
    )
    return PreprocessedCase(out, seg if case.label is not None else None, properties)


# --- storage --------------------------------------------------------------------------------------


def case_paths(folder: str | os.PathLike, case_id: str) -> tuple[Path, Path, Path]:
    """``(<case>.npy, <case>_seg.npy, <case>.json)`` in a preprocessed folder."""
    folder = Path(folder)
    return folder / f"{case_id}.npy", folder / f"{case_id}{SEG_SUFFIX}.npy", folder / f"{case_id}.json"


def save_preprocessed_case(folder: str | os.PathLike, case: PreprocessedCase) -> Path:
    """Write image, label and (last) sidecar, each atomically; returns the sidecar path."""
    case_id = case.properties.case_id
    image_path, seg_path, sidecar_path = case_paths(folder, case_id)
    atomic_write(image_path, lambda tmp: np.save(tmp, case.image))
    if case.label is not None:
        atomic_write(seg_path, lambda tmp: np.save(tmp, case.label.astype(np.int16, copy=False)))
    return save_case_properties(case.properties, sidecar_path)


def load_preprocessed_case(folder: str | os.PathLike, case_id: str, mmap: bool = True
                           ) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Read a stored case: image and label memory-mapped (read-only) by default, and the sidecar."""
    image_path, seg_path, sidecar_path = case_paths(folder, case_id)
    mode = "r" if mmap else None
    properties = load_case_properties(sidecar_path)
    image = np.load(image_path, mmap_mode=mode, allow_pickle=False)
    label = np.load(seg_path, mmap_mode=mode, allow_pickle=False) if seg_path.exists() else None
    return image, label, properties


# --- the dataset ----------------------------------------------------------------------------------


def _dataset_dir(work: WorkDir, dataset_dir: str | os.PathLike | None) -> Path:
    if dataset_dir is not None:
        return Path(dataset_dir)
    if not work.fingerprint.is_file():
        raise PreprocessingError(f"{work.fingerprint}: missing, so the raw dataset is unknown; run "
                                 "`autoseg plan` first or pass the dataset folder (--dataset)")
    data = read_json(work.fingerprint)
    if not isinstance(data, dict) or not data.get("dataset_dir"):
        raise PreprocessingError(f"{work.fingerprint}: has no \"dataset_dir\"; pass the dataset folder "
                                 "(--dataset)")
    return Path(data["dataset_dir"])


def _file_bytes(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_dir():  # a DICOM series
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _raw_bytes(case: CaseFiles) -> int:
    return sum(_file_bytes(p) for p in case.images) + _file_bytes(case.label)


def _stored_bytes(folder: Path, case_id: str) -> int:
    return sum(_file_bytes(p) for p in case_paths(folder, case_id))


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sidecars(folder: Path) -> Iterator[Path]:
    for path in folder.glob("*.json"):
        if path.name != MANIFEST and not path.name.startswith("."):
            yield path


def _check_same_configuration(folder: Path, expected_hash: str) -> None:
    """Refuse to mix outputs of two plans: the manifest and every sidecar must carry our hash."""
    found: dict[str, str] = {}
    manifest = folder / MANIFEST
    if manifest.is_file():
        data = _read_sidecar(manifest) or {}
        if data.get("configuration_hash") not in (None, expected_hash):
            found[str(manifest)] = str(data["configuration_hash"])
    for path in _sidecars(folder):
        data = _read_sidecar(path)
        if data is not None and data.get("configuration_hash") not in (None, expected_hash):
            found[str(path)] = str(data["configuration_hash"])
    if found:
        where, old = next(iter(found.items()))
        raise PreprocessingError(
            f"{folder}: the existing preprocessed data was produced by another plan (configuration hash "
            f"{old} in {Path(where).name}, the current plan gives {expected_hash}); re-run with --force "
            "to delete it and preprocess again")


def _clear(folder: Path) -> None:
    """Delete this configuration's outputs (``--force``), nothing else."""
    for path in folder.iterdir():
        if path.is_file() and (is_temporary(path.name) or path.suffix in (".npy", ".json")):
            path.unlink()


def _is_finished(folder: Path, case_id: str, expected_hash: str, leftovers: Sequence[str]) -> bool:
    image_path, seg_path, sidecar_path = case_paths(folder, case_id)
    prefixes = (f".{image_path.name}.", f".{seg_path.name}.", f".{sidecar_path.name}.")
    if any(name.startswith(prefixes) for name in leftovers):
        return False  # killed while (re)writing this case
    data = _read_sidecar(sidecar_path)
    return (data is not None and data.get("configuration_hash") == expected_hash
            and image_path.is_file() and seg_path.is_file())


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _preprocess_one(case: CaseFiles, plan_data: dict, configuration: str, folder: str, threads: int,
                    device: str, main_pid: int | None = None) -> tuple[str, str | None]:
    """Load, preprocess and store one case; returns ``(case_id, error message or None)``."""
    exit_with_parent(main_pid)  # a pool worker ends with the command, even after kill -9
    # threads: a worker's share of the cores; a case run in the main process keeps all of its own
    in_main_process = main_pid == os.getpid()
    try:
        with contextlib.nullcontext() if in_main_process else _torch_threads(threads):
            plan = plan_from_dict(plan_data)
            result = preprocess_case(load_case(case), plan, configuration, device=device)
        sources = {"images": [str(p) for p in case.images], "label": str(case.label) if case.label else None}
        save_preprocessed_case(folder, result._replace(properties=replace(result.properties, source_files=sources)))
        return case.case_id, None
    except (ImageReadError, DatasetError, WriteError) as error:  # these already name the file
        return case.case_id, f"{case.case_id}: {error}"
    except Exception as error:
        files = ", ".join(str(p) for p in (*case.images, case.label) if p is not None)
        return case.case_id, f"{case.case_id} ({files}): {type(error).__name__}: {error}"


def _run_cases(cases: Sequence[CaseFiles], plan: Plan, configuration: str, folder: Path, n_jobs: int,
               device: str, progress: bool, on_cluster: bool = False) -> dict[str, str | None]:
    from joblib import delayed
    from tqdm.auto import tqdm

    workers = max(1, min(n_jobs, len(cases)))
    # Workers share the cores; each gets its slice so n_jobs x threads does not oversubscribe (and a
    # limit the caller set, e.g. OMP_NUM_THREADS, is kept).
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // workers))
    plan_data = plan_to_dict(plan)
    # a cluster's workers are not this command's children: they live on (the cluster ends them)
    main_pid = None if on_cluster else os.getpid()
    tasks = (delayed(_preprocess_one)(case, plan_data, configuration, str(folder), threads, device, main_pid)
             for case in cases)
    results: dict[str, str | None] = {}
    bar = tqdm(total=len(cases), desc=f"preprocess {configuration}", unit="case", disable=not progress)
    with bar:
        # One case per task and unordered results: a worker holds one case at a time.
        outcomes = run_cases(tasks, workers, on_cluster, unordered=True)
        try:
            for case_id, error in outcomes:
                results[case_id] = error
                bar.update(1)
        except BaseException:
            outcomes.close()  # stops the workers now (an interrupt), not when the traceback is freed
            # what they were writing when they were stopped: nothing writes here any more
            remove_stale_temporaries(folder)
            raise
    return results


def _write_manifest(folder: Path, plan: Plan, configuration: str, dataset_dir: Path, cases: Sequence[CaseFiles],
                    finished: Sequence[CaseFiles], failed: dict[str, str]) -> tuple[int, int]:
    sizes = {case.case_id: {"raw_bytes": _raw_bytes(case), "stored_bytes": _stored_bytes(folder, case.case_id)}
             for case in sorted(finished, key=lambda c: c.case_id)}
    raw = sum(s["raw_bytes"] for s in sizes.values())
    stored = sum(s["stored_bytes"] for s in sizes.values())
    atomic_write_json(folder / MANIFEST, {
        "plan_hash": plan_hash(plan),
        "configuration_hash": configuration_hash(plan, configuration),
        "configuration": configuration,
        "dataset_dir": str(dataset_dir),
        "cases": list(sizes),
        "expected_cases": sorted(case.case_id for case in cases),  # training refuses a folder missing some
        "failed": dict(sorted(failed.items())),
        "raw_bytes_total": raw,
        "stored_bytes_total": stored,
        "stored_to_raw": round(stored / raw, 3) if raw else None,
        "sizes": sizes,
    })
    return raw, stored


def _preprocess_configuration(plan: Plan, configuration: str, work: WorkDir, dataset_dir: Path,
                              cases: Sequence[CaseFiles], n_jobs: int, force: bool, device: str,
                              progress: bool, on_cluster: bool = False) -> PreprocessSummary:
    started = time.perf_counter()
    folder = work.preprocessed(configuration)
    folder.mkdir(parents=True, exist_ok=True)
    expected = configuration_hash(plan, configuration)
    if force:
        _clear(folder)
    else:
        _check_same_configuration(folder, expected)
    leftovers = [p.name for p in folder.iterdir() if is_temporary(p.name)]  # a crashed run's
    done = [c for c in cases if _is_finished(folder, c.case_id, expected, leftovers)]
    done_ids = {c.case_id for c in done}
    todo = [c for c in cases if c.case_id not in done_ids]
    for name in leftovers:
        (folder / name).unlink(missing_ok=True)
    for case in todo:
        # The sidecar marks a finished case; remove it first so a crash mid-case is never "done".
        case_paths(folder, case.case_id)[2].unlink(missing_ok=True)
    _write_manifest(folder, plan, configuration, dataset_dir, cases, done, {})

    results = _run_cases(todo, plan, configuration, folder, n_jobs, device, progress, on_cluster) if todo else {}
    failed = {case_id: error for case_id, error in results.items() if error is not None}
    processed = sorted(case_id for case_id, error in results.items() if error is None)
    finished = [c for c in cases if c.case_id in done_ids or c.case_id in processed]
    raw, stored = _write_manifest(folder, plan, configuration, dataset_dir, cases, finished, failed)
    return PreprocessSummary(configuration, folder, processed, sorted(done_ids), failed, raw, stored,
                             time.perf_counter() - started)


def preprocess_dataset(work_dir: str | os.PathLike, configurations: Sequence[str] | None = None,
                       n_jobs: int | None = None, force: bool = False,
                       dataset_dir: str | os.PathLike | None = None, progress: bool = True,
                       device: str | None = None, scheduler: str | None = None,
                       validate: bool = True) -> dict[str, PreprocessSummary]:
    """Preprocess every training case for the plan's configurations (``autoseg preprocess``).

    Args:
        work_dir: the work folder holding ``plan.json`` (and ``fingerprint.json``).
        configurations: names to preprocess; default all the plan's configurations. One that
            shares another's preprocessed data (``3d_cascade_fullres``) stands for that one.
        n_jobs: parallel worker processes; default the number of cores.
        force: delete the configurations' existing outputs and redo every case.
        dataset_dir: the raw dataset; default ``fingerprint.json``'s ``"dataset_dir"``.
        progress: show a progress bar.
        device: torch device for resampling; default CUDA when available, else the CPU.
        scheduler: run the cases on a Dask cluster instead of local processes (``local:N`` or an
            address such as ``tcp://host:8786``; :mod:`autoseg.cluster`); the same output.
        validate: first run the dataset checks (:func:`autoseg.validate.require_valid_dataset`;
            reused from ``plan`` when the dataset did not change): errors stop here.

    Returns:
        a :class:`PreprocessSummary` per configuration.

    Raises:
        PlanError: no plan, or an unknown configuration.
        DatasetValidationError: the dataset fails the checks of ``autoseg validate``.
        AutosegLockError: another run is preprocessing the same configuration.
        DatasetError: the raw dataset's cases cannot be listed.
        PreprocessingError: the folder holds another plan's output (use ``force``), or some cases
            failed; the message names each failed case and its problem, every other case is done.
    """
    work = WorkDir(Path(work_dir))
    plan = load_plan(work.plan)
    names = list(configurations) if configurations else list(plan.configurations)
    # a configuration that shares another's data (the cascade) preprocesses that one, once
    names = list(dict.fromkeys(plan.configuration(name).data_name for name in names))
    source = _dataset_dir(work, dataset_dir)
    n_jobs = n_jobs or os.cpu_count() or 1
    if validate:  # errors stop here, warnings are printed
        require_valid_dataset(source, work.root, n_jobs, progress)
    cases = training_cases(source)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    summaries: dict[str, PreprocessSummary] = {}
    failures: dict[str, str] = {}
    with connect(scheduler) as client:
        for name in names:
            # one run per configuration folder: a second one would delete the first's temporary files
            with folder_lock(work.preprocessed(name),
                             f"preprocessed configuration {name!r} ({work.preprocessed(name)})"):
                summary = _preprocess_configuration(plan, name, work, source, cases, n_jobs, force, device,
                                                    progress, on_cluster=client is not None)
            summaries[name] = summary
            failures.update({f"{name}/{case_id}": error for case_id, error in summary.failed.items()})
    if failures:
        lines = "\n".join(f"- [{key.split('/')[0]}] {message}" for key, message in failures.items())
        raise PreprocessingError(f"{len(failures)} case(s) could not be preprocessed (all others are done):\n"
                                 f"{lines}", failures, summaries)
    return summaries
