"""The dataset fingerprint: what the planner needs to know about a raw dataset, and nothing more.

``autoseg fingerprint DATASET`` (also run by ``autoseg plan`` when the fingerprint is missing or stale)
reads every training case once and records

* per case, in the canonical orientation preprocessing uses (:mod:`autoseg.orientation`: axis
  permutation and flips only, so LPS- and RAS-stored scans count alike): spacing, shape, the shape
  after cropping to the non-zero region of all channels (the
  bounding box of ``any(channel != 0)`` with holes filled, as nnU-Net crops), its relative size,
  voxel counts per label value, and per channel statistics of the foreground intensities (voxels
  whose label is > 0, the ``ignore`` label excluded) and of the whole image (min, max, share of
  voxels below -500, used to tell Hounsfield units from other intensities);
* for the dataset: median, 10th and 90th percentile, min and max of spacings and cropped shapes per
  axis; per channel the foreground intensity mean, std, median, min, max and 0.5/99.5 percentiles;
  per label value its voxel count and the number of cases that contain it; the modality guessed from
  each channel's name, and warnings where the values contradict the name.

**Foreground intensity sample.** nnU-Net draws 1e8 foreground voxels in total, the same number from
every case, with replacement, and takes mean, std and percentiles of the pooled sample; cases weigh
equally whatever their foreground size. autoseg does the same with a bounded sample
(:data:`TOTAL_FOREGROUND_SAMPLES` = 1e6 voxels spread evenly over the cases, at least
:data:`MIN_SAMPLES_PER_CASE` per case): the percentiles of a million draws are within a small fraction
of a percent (in rank) of those of 1e8 draws, and the sample fits in memory for any dataset. The
sample is not stored in ``fingerprint.json`` (it would weigh megabytes); min and max are exact (over
all foreground voxels, not over the sample).

**Reuse.** ``fingerprint.json`` stores ``dataset_hash``: a hash of ``dataset.json``'s content and of
every training file's name, size and modification time, so a stale fingerprint is detected without
reading a voxel. :func:`load_or_compute_fingerprint` reuses the file when the hash (and the fingerprint
format version) still match.

**Modality warnings** (stored in the fingerprint and printed):

* a channel not named CT whose images have more than 5 % of their voxels below -500 (median over
  cases) looks like Hounsfield units (air is -1000 HU), so it probably should be named ``CT``;
* a channel named CT whose foreground lies within [0, 1] looks already normalized;
* a channel named CT without a single negative value is not in plain Hounsfield units (air would be
  about -1000; an un-removed +1024 offset is the usual cause).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass
from scipy import ndimage
from tqdm import tqdm

from autoseg.cluster import connect, run_cases
from autoseg.dataset import (
    DATASET_JSON,
    CaseFiles,
    DatasetJson,
    load_case,
    load_dataset_json,
    training_cases,
)
from autoseg.errors import AutosegError
from autoseg.orientation import canonical_spacing, canonical_transform, to_canonical
from autoseg.processes import exit_with_parent
from autoseg.utils import (
    atomic_write_json,
    bounding_slices,
    read_json,
    read_model_file,
    sha256_of_json,
    validate_model,
)

FINGERPRINT_VERSION = 1
TOTAL_FOREGROUND_SAMPLES = 1_000_000
MIN_SAMPLES_PER_CASE = 1_000
HU_AIR_THRESHOLD = -500.0
HU_LIKE_FRACTION = 0.05
SEED = 1234

Modality = Literal["ct", "mri", "pet", "ultrasound", "xray", "natural", "other"]

_STRICT = ConfigDict(extra="forbid", frozen=True)


class FingerprintError(AutosegError, ValueError):
    """A fingerprint file is missing, not JSON, of another version, or invalid."""


# --- data model -----------------------------------------------------------------------------------


@dataclass(config=_STRICT)
class IntensityStats:
    """Statistics of a set of intensities (``None`` where the set was empty)."""

    count: int
    mean: float | None = None
    std: float | None = None
    median: float | None = None
    min: float | None = None
    max: float | None = None
    percentile_00_5: float | None = None
    percentile_99_5: float | None = None


@dataclass(config=_STRICT)
class CaseChannel:
    """One channel of one case: its foreground intensities and its whole-image range."""

    foreground: IntensityStats
    image_min: float
    image_max: float
    fraction_below_minus_500: float


@dataclass(config=_STRICT)
class CaseFingerprint:
    """What one training case contributes to the fingerprint (axes ``(z, y, x)``)."""

    case_id: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    shape_after_crop: tuple[int, int, int]
    relative_size_after_crop: float
    channels: tuple[CaseChannel, ...]
    class_voxels: dict[int, int]
    is_2d: bool = False


@dataclass(config=_STRICT)
class AxisStats:
    """Per-axis summary of a per-case quantity (spacings, shapes)."""

    median: tuple[float, ...]
    percentile_10: tuple[float, ...]
    percentile_90: tuple[float, ...]
    min: tuple[float, ...]
    max: tuple[float, ...]


@dataclass(config=_STRICT)
class ChannelFingerprint:
    """Dataset-level foreground intensities of one channel and its modality from the name."""

    name: str
    modality: Modality
    foreground: IntensityStats
    image_min: float
    image_max: float
    median_fraction_below_minus_500: float


@dataclass(config=_STRICT)
class ClassStats:
    """How much of one label value the dataset holds."""

    voxels: int
    cases: int


@dataclass(config=_STRICT)
class Fingerprint:
    """The dataset fingerprint, saved as ``WORK/fingerprint.json``."""

    dataset_dir: str
    dataset_hash: str
    dataset_name: str
    channel_names: tuple[str, ...]
    is_2d: bool
    cases: tuple[CaseFingerprint, ...]
    spacing: AxisStats
    shape_after_crop: AxisStats
    median_relative_size_after_crop: float
    channels: tuple[ChannelFingerprint, ...]
    classes: dict[int, ClassStats]
    samples_per_case: int
    warnings: tuple[str, ...] = ()
    version: int = FINGERPRINT_VERSION

    def __post_init__(self) -> None:
        if self.version != FINGERPRINT_VERSION:
            raise ValueError(f"fingerprint version {self.version} is not supported (this autoseg writes "
                             f"{FINGERPRINT_VERSION}); recompute it with `autoseg fingerprint --force`")
        if not self.cases:
            raise ValueError("a fingerprint needs at least one case")
        if len(self.channels) != len(self.channel_names):
            raise ValueError(f"{len(self.channels)} channel fingerprint(s) for {len(self.channel_names)} "
                             "channel name(s)")
        for case in self.cases:
            if len(case.channels) != len(self.channel_names):
                raise ValueError(f"case {case.case_id!r} has {len(case.channels)} channel(s), the dataset "
                                 f"{len(self.channel_names)}")

    @property
    def num_cases(self) -> int:
        return len(self.cases)

    @property
    def spacings(self) -> np.ndarray:
        """``(cases, 3)`` array of spacings."""
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        """``(cases, 3)`` array of shapes after cropping to the non-zero region."""
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.float64)


_ADAPTER = TypeAdapter(Fingerprint)


def fingerprint_to_dict(fingerprint: Fingerprint) -> dict:
    """The fingerprint as JSON-ready data."""
    return _ADAPTER.dump_python(fingerprint, mode="json")


def fingerprint_from_dict(data: object, source: str = "fingerprint") -> Fingerprint:
    """Validate data into a :class:`Fingerprint`; every problem is listed with its field path."""
    return validate_model(_ADAPTER, data, source, "fingerprint", FingerprintError)


def save_fingerprint(fingerprint: Fingerprint, path: str | os.PathLike) -> Path:
    """Write the fingerprint as JSON atomically."""
    return atomic_write_json(path, fingerprint_to_dict(fingerprint))


def load_fingerprint(path: str | os.PathLike) -> Fingerprint:
    """Read and validate ``fingerprint.json`` (a file, or a work folder holding it)."""
    data, path = read_model_file(path, "fingerprint.json", FingerprintError,
                                 "run `autoseg fingerprint DATASET` first")
    return fingerprint_from_dict(data, str(path))


# --- modality from the channel name ------------------------------------------------------------------

_MRI_WORDS = {"mr", "mri", "t1", "t2", "t1w", "t2w", "t1c", "t1ce", "t1gd", "t1km", "t1n", "t2f",
              "flair", "adc", "dwi", "pd", "pdw", "swi", "hbv", "b0", "dce", "cine", "lge", "bold", "dixon"}
_NATURAL_WORDS = {"r", "g", "b", "red", "green", "blue", "rgb", "gray", "grey", "brightfield", "he"}
# DICOM's CR (computed) and DX (digital) radiography, and the plain names ("X-ray" splits into x, ray)
_XRAY_WORDS = {"cr", "dx", "xray", "xr", "cxr", "radiograph", "radiography", "roentgen"}


def name_words(name: str) -> list[str]:
    """Lower-case words of a channel name: ``"CT_venous"`` -> ``["ct", "venous"]``."""
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def modality_from_name(name: str) -> Modality:
    """Guess the imaging modality from a channel name (case-insensitive, by whole words)."""
    words = name_words(name)
    if "ct" in words or "cect" in words or "cbct" in words:
        return "ct"
    if any(w in _MRI_WORDS or re.fullmatch(r"t[12][a-z]{0,3}", w) for w in words):
        return "mri"
    if "pet" in words or "suv" in words:
        return "pet"
    if "us" in words or "ultrasound" in words:
        return "ultrasound"
    if any(w in _XRAY_WORDS for w in words) or any(pair == ("x", "ray") for pair in zip(words, words[1:])):
        return "xray"
    if any(w in _NATURAL_WORDS for w in words):
        return "natural"
    return "other"


def modality_warnings(channel: ChannelFingerprint) -> list[str]:
    """Warnings where a channel's values contradict its name (see the module docstring)."""
    out = []
    fg = channel.foreground
    named = f"channel {channel.name!r}"
    if channel.modality != "ct" and channel.median_fraction_below_minus_500 > HU_LIKE_FRACTION:
        out.append(f"{named} ({channel.modality}) has {channel.median_fraction_below_minus_500:.0%} of its "
                   f"voxels below {HU_AIR_THRESHOLD:g} (median over cases), like air in Hounsfield units; "
                   "if this is CT, name the channel 'CT' so it gets CT normalization")
    if channel.modality == "ct":
        if fg.count and fg.min is not None and fg.min >= 0 and fg.max is not None and fg.max <= 1:
            out.append(f"{named} is named CT but its foreground lies within [0, 1]: the images look already "
                       "normalized, not in Hounsfield units")
        elif channel.image_min >= 0:
            out.append(f"{named} is named CT but has no negative value (air is about -1000 HU): the "
                       "intensities may carry an offset such as +1024, or not be CT")
    return out


# --- per case -----------------------------------------------------------------------------------------


def nonzero_bbox(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the non-zero region of all channels, holes filled (nnU-Net's crop).

    ``image`` is ``(C, Z, Y, X)``; an all-zero image keeps its full extent.
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    return bounding_slices(ndimage.binary_fill_holes(mask))


def intensity_stats(values: np.ndarray) -> IntensityStats:
    """Mean, std, median, min, max and 0.5/99.5 percentiles of a 1D array (empty -> only ``count``)."""
    if values.size == 0:
        return IntensityStats(count=0)
    values = values.astype(np.float64, copy=False)
    p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
    return IntensityStats(count=int(values.size), mean=float(values.mean()), std=float(values.std()),
                          median=float(median), min=float(values.min()), max=float(values.max()),
                          percentile_00_5=float(p005), percentile_99_5=float(p995))


def analyze_case(case: CaseFiles, num_samples: int, seed: int = SEED,
                 ignore_label: int | None = None) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """Fingerprint one case and draw ``num_samples`` foreground intensities per channel.

    Sampling is with replacement (cases with few foreground voxels still weigh their share) and
    seeded per case, so the fingerprint does not depend on the number of worker processes.
    """
    data = load_case(case)
    if data.label is None:
        raise FingerprintError(f"{case.images[0]}: training case {case.case_id} has no label")
    # preprocessing brings every case to the canonical orientation before cropping and resampling,
    # so spacings and shapes must be counted in that orientation for the planner's per-axis medians
    transform = canonical_transform(data.reference.direction)
    image, label = to_canonical(data.image, transform), to_canonical(data.label, transform)
    spacing = canonical_spacing(data.spacing, transform)
    bbox = nonzero_bbox(image)
    cropped_image = image[(slice(None), *bbox)]
    cropped_label = label[bbox]
    foreground = cropped_label > 0
    if ignore_label is not None:
        foreground &= cropped_label != ignore_label
    rng = np.random.default_rng([seed, *case.case_id.encode()])
    channels, samples = [], []
    for index, channel in enumerate(image):
        values = cropped_image[index][foreground]
        samples.append(rng.choice(values, num_samples, replace=True) if values.size else
                       np.empty(0, dtype=np.float32))
        channels.append(CaseChannel(
            foreground=intensity_stats(values),
            image_min=float(channel.min()),
            image_max=float(channel.max()),
            fraction_below_minus_500=float(np.mean(channel < HU_AIR_THRESHOLD)),
        ))
    values, counts = np.unique(label, return_counts=True)
    shape = tuple(int(s) for s in image.shape[1:])
    shape_after_crop = tuple(int(s) for s in cropped_image.shape[1:])
    fingerprint = CaseFingerprint(
        case_id=case.case_id,
        spacing=spacing,
        shape=shape,
        shape_after_crop=shape_after_crop,
        relative_size_after_crop=math.prod(shape_after_crop) / math.prod(shape),
        channels=tuple(channels),
        class_voxels={int(v): int(c) for v, c in zip(values, counts)},
        is_2d=data.is_2d,
    )
    return fingerprint, samples


# --- dataset ------------------------------------------------------------------------------------------


def dataset_hash(dataset_dir: str | os.PathLike, cases: list[CaseFiles] | None = None) -> str:
    """Hash of ``dataset.json``'s content and each training file's name, size and mtime.

    Cheap (no voxel is read) and changes whenever a file is replaced, added or removed.
    """
    dataset_dir = Path(dataset_dir)
    dataset_json = read_json(dataset_dir / DATASET_JSON)
    cases = cases if cases is not None else training_cases(dataset_dir)
    files = []
    for case in cases:
        for path in (*case.images, *((case.label,) if case.label else ())):
            stat = path.stat()
            files.append([path.relative_to(dataset_dir).as_posix(), stat.st_size, stat.st_mtime_ns])
    return sha256_of_json({"dataset_json": dataset_json, "files": files, "version": FINGERPRINT_VERSION})


def axis_stats(values: np.ndarray) -> AxisStats:
    """Median, 10th/90th percentile, min and max per column of a ``(cases, axes)`` array."""
    def row(array: np.ndarray) -> tuple[float, ...]:
        return tuple(float(v) for v in array)
    return AxisStats(median=row(np.median(values, axis=0)),
                     percentile_10=row(np.percentile(values, 10, axis=0)),
                     percentile_90=row(np.percentile(values, 90, axis=0)),
                     min=row(values.min(axis=0)), max=row(values.max(axis=0)))


def summarize(dataset_dir: str | os.PathLike, dataset: DatasetJson, cases: tuple[CaseFingerprint, ...],
              samples: list[np.ndarray], samples_per_case: int, hash_: str) -> Fingerprint:
    """Dataset-level statistics from the per-case fingerprints and the pooled foreground samples.

    ``samples[c]`` is channel ``c``'s pooled sample; mean, std, median and percentiles come from it,
    min and max from the exact per-case foreground extremes.
    """
    names = dataset.channel_list
    channels = []
    for index, name in enumerate(names):
        stats = intensity_stats(samples[index])
        per_case = [c.channels[index].foreground for c in cases if c.channels[index].foreground.count]
        if per_case:
            stats = IntensityStats(count=stats.count, mean=stats.mean, std=stats.std, median=stats.median,
                                   min=min(s.min for s in per_case), max=max(s.max for s in per_case),
                                   percentile_00_5=stats.percentile_00_5,
                                   percentile_99_5=stats.percentile_99_5)
        channels.append(ChannelFingerprint(
            name=name,
            modality=modality_from_name(name),
            foreground=stats,
            image_min=min(c.channels[index].image_min for c in cases),
            image_max=max(c.channels[index].image_max for c in cases),
            median_fraction_below_minus_500=float(np.median(
                [c.channels[index].fraction_below_minus_500 for c in cases])),
        ))
    classes: dict[int, ClassStats] = {}
    for value in sorted({v for c in cases for v in c.class_voxels} | dataset.label_values):
        present = [c.class_voxels[value] for c in cases if c.class_voxels.get(value, 0) > 0]
        classes[value] = ClassStats(voxels=int(sum(present)), cases=len(present))

    found: list[str] = []
    for channel in channels:
        found += modality_warnings(channel)
        if channel.foreground.count == 0:
            found.append(f"channel {channel.name!r}: no case has foreground voxels, so no intensity "
                         "statistics (CT normalization will not be possible)")
    declared = dataset.label_values
    for value, stats in classes.items():
        if value not in declared:
            found.append(f"label value {value} occurs in {stats.cases} case(s) but is not declared in "
                         f"{DATASET_JSON}")
        elif stats.cases == 0 and value != 0:
            names_of = [k for k, v in dataset.labels.items() if v == value]
            found.append(f"label {names_of[0] if names_of else value!r} (value {value}) occurs in no "
                         "training case")
    kinds = {c.is_2d for c in cases}
    if len(kinds) > 1:
        found.append("the dataset mixes 2D and 3D images; it is planned as 3D")

    return Fingerprint(
        dataset_dir=str(Path(dataset_dir).resolve()),
        dataset_hash=hash_,
        dataset_name=dataset.name or Path(dataset_dir).resolve().name,
        channel_names=tuple(names),
        is_2d=kinds == {True},
        cases=cases,
        spacing=axis_stats(np.array([c.spacing for c in cases], dtype=np.float64)),
        shape_after_crop=axis_stats(np.array([c.shape_after_crop for c in cases], dtype=np.float64)),
        median_relative_size_after_crop=float(np.median([c.relative_size_after_crop for c in cases])),
        channels=tuple(channels),
        classes=classes,
        samples_per_case=samples_per_case,
        warnings=tuple(found),
    )


def default_samples_per_case(num_cases: int) -> int:
    """Foreground samples per case: the total budget spread evenly, with a floor per case."""
    return max(MIN_SAMPLES_PER_CASE, math.ceil(TOTAL_FOREGROUND_SAMPLES / max(num_cases, 1)))


def compute_fingerprint(dataset_dir: str | os.PathLike, n_jobs: int | None = None, progress: bool = True,
                        samples_per_case: int | None = None, scheduler: str | None = None) -> Fingerprint:
    """Read every training case (in parallel) and summarize the dataset.

    Args:
        dataset_dir: raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        n_jobs: worker processes; default ``min(CPU cores, cases)``.
        progress: show a progress bar.
        samples_per_case: foreground intensities drawn per case and channel; default spreads
            :data:`TOTAL_FOREGROUND_SAMPLES` evenly over the cases.
        scheduler: read the cases on a Dask cluster (``local:N`` or ``tcp://host:8786``;
            :mod:`autoseg.cluster`) instead of local processes; the same fingerprint.
    """
    from joblib import delayed

    dataset_dir = Path(dataset_dir)
    dataset = load_dataset_json(dataset_dir)
    cases = training_cases(dataset_dir, dataset)
    hash_ = dataset_hash(dataset_dir, cases)
    samples_per_case = samples_per_case or default_samples_per_case(len(cases))
    n_jobs = n_jobs or min(os.cpu_count() or 1, len(cases))
    ignore = dataset.ignore_label
    fingerprints, samples = [], []
    with connect(scheduler) as client:
        # a cluster's workers are not this command's children: they live on (the cluster ends them)
        main_pid = None if client is not None else os.getpid()
        results = run_cases((delayed(_analyze_in_worker)(case, samples_per_case, SEED, ignore, main_pid)
                             for case in cases), n_jobs, on_cluster=client is not None)
        for fingerprint, case_samples in tqdm(results, total=len(cases), desc="fingerprint", unit="case",
                                              disable=not progress):
            fingerprints.append(fingerprint)
            samples.append(case_samples)
    pooled = [np.concatenate([s[c] for s in samples]) for c in range(dataset.num_channels)]
    return summarize(dataset_dir, dataset, tuple(fingerprints), pooled, samples_per_case, hash_)


def _analyze_in_worker(case: CaseFiles, samples_per_case: int, seed: int, ignore: int | None,
                       main_pid: int | None) -> tuple[CaseFingerprint, list[np.ndarray]]:
    exit_with_parent(main_pid)  # a pool worker ends with the command, even after kill -9
    return analyze_case(case, samples_per_case, seed, ignore)


def load_or_compute_fingerprint(dataset_dir: str | os.PathLike, work_dir: str | os.PathLike,
                                n_jobs: int | None = None, force: bool = False,
                                progress: bool = True, scheduler: str | None = None) -> tuple[Fingerprint, bool]:
    """Reuse ``WORK/fingerprint.json`` if the dataset did not change, else compute and save it.

    Returns:
        ``(fingerprint, reused)``.
    """
    path = Path(work_dir) / "fingerprint.json"
    if not force and path.is_file():
        try:
            cached = load_fingerprint(path)
        except FingerprintError as error:
            warnings.warn(f"recomputing the fingerprint: {error}", stacklevel=2)
        else:
            if cached.dataset_hash == dataset_hash(dataset_dir):
                return cached, True
    fingerprint = compute_fingerprint(dataset_dir, n_jobs=n_jobs, progress=progress, scheduler=scheduler)
    save_fingerprint(fingerprint, path)
    return fingerprint, False
