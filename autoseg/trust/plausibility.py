"""Is a prediction like anything the model saw in training? Checks against the training statistics.

:func:`reference_stats` measures every preprocessed training case of a configuration (its label map,
normalised image and sidecar) and keeps, per class, what a plausible prediction looks like; it is
stored with the model as ``models/<config>/reference_stats.json``. :func:`measure_case` measures a
predicted case the same way, on the same preprocessed grid, and :func:`plausibility_flags` compares:

* **missing**: a class present in every training case is absent from the prediction;
* **volume**: a class' volume below half the smallest, or above twice the largest, training volume;
* **components**: more connected pieces than ``1.5 x`` (and ``+ 2``) the most seen in a training
  case; pieces smaller than a quarter of the smallest training piece are not counted (specks);
* **location**: the class' centroid, as a fraction of the canonically oriented image's extent,
  farther than ``0.15`` of that extent outside the box of every training centroid;
* **intensity**: the histogram of the normalised input differs from the training cases' mean
  histogram (total variation distance) by more than ``1.5 x`` the largest leave-one-out distance of
  a training case, plus 0.05 (inverted or noisy images, other scanners, a wrong modality);
* **noise**: the input's noise level (median absolute difference of neighbouring voxels along the
  last axis, over the 5-95 percentile range of its normalised intensities) above ``1.5 x`` the
  noisiest training image;
* **blank**: more of the input is flat (a neighbour with the same value along both in-plane axes)
  than in any training image, by more than 0.1 of the voxels: a region blanked or cut out;
* **spacing**: an axis' voxel spacing below ``1/1.5`` of the smallest or above ``1.5 x`` the largest
  training spacing.

The thresholds are named constants below; each flag's reason states the value and the limit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ConfigDict, TypeAdapter
from pydantic import dataclasses as pydantic_dataclasses
from scipy import ndimage

from autoseg.case_properties import CaseProperties, load_case_properties
from autoseg.errors import AutosegError
from autoseg.labels import LabelInfo, label_mask
from autoseg.trust.summary import Flag
from autoseg.utils import atomic_write_json, read_model_file, validate_model

__all__ = ["REFERENCE_STATS_FILE", "CaseMeasurements", "ClassReference", "ReferenceStats", "ReferenceStatsError",
           "intensity_histogram", "load_reference_stats", "measure_case", "plausibility_flags",
           "reference_stats", "save_reference_stats", "summarize_measurements"]

REFERENCE_STATS_FILE = "reference_stats.json"
SCHEMA_VERSION = 1

VOLUME_FACTOR = 2.0            # below min / 2 or above 2 x max training volume
COMPONENT_FACTOR = 1.5         # more than 1.5 x (and 2 more than) the most pieces in a training case
COMPONENT_EXTRA = 2
SPECK_FRACTION = 0.25          # pieces under a quarter of the smallest training piece are specks
LOCATION_MARGIN = 0.15         # fraction of the image extent outside the training centroids' box
HISTOGRAM_FACTOR = 1.5         # x the largest leave-one-out training distance ...
HISTOGRAM_SLACK = 0.05         # ... plus this
SPACING_FACTOR = 1.5
NOISE_FACTOR = 1.5
FLAT_MARGIN = 0.1
_FLAT_TOLERANCE = 1e-6
HISTOGRAM_RANGE = (-5.0, 5.0)  # normalised intensities; values outside land in the end bins
HISTOGRAM_BINS = 40

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ReferenceStatsError(AutosegError, ValueError):
    """No preprocessed training data to measure, or a bad ``reference_stats.json`` (the file is named)."""


@pydantic_dataclasses.dataclass(config=_STRICT)
class ClassReference:
    """What one class looked like over the training cases (volumes in mm^3 on the preprocessed grid)."""

    present_in: int
    volume_min: float
    volume_median: float
    volume_max: float
    components_max: int
    smallest_component: float
    centroid_min: tuple[float, float, float]
    centroid_max: tuple[float, float, float]


@pydantic_dataclasses.dataclass(config=_STRICT)
class ReferenceStats:
    """The training statistics that :func:`plausibility_flags` compares a prediction with."""

    configuration: str
    num_cases: int
    classes: dict[str, ClassReference]
    spacing_min: tuple[float, float, float]
    spacing_max: tuple[float, float, float]
    histogram_edges: tuple[float, ...]
    histograms: tuple[tuple[float, ...], ...]        # per input channel, the training cases' mean
    histogram_distance_max: tuple[float, ...]        # per channel, the largest leave-one-out distance
    noise_max: tuple[float, ...]                     # per channel, the noisiest training image
    flat_max: tuple[float, ...]                      # per channel, the largest flat fraction
    schema_version: int = SCHEMA_VERSION


_ADAPTER = TypeAdapter(ReferenceStats)


def save_reference_stats(stats: ReferenceStats, path: str | os.PathLike) -> Path:
    """Write ``reference_stats.json`` atomically (``path`` is the file)."""
    return atomic_write_json(path, _ADAPTER.dump_python(stats, mode="json"))


def load_reference_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read a ``reference_stats.json`` (or the folder holding one); every bad field is named."""
    data, source = read_model_file(path, REFERENCE_STATS_FILE, ReferenceStatsError,
                                   "run `autoseg calibrate WORK -c CONFIG` to write it")
    return validate_model(_ADAPTER, data, str(source), "reference statistics", ReferenceStatsError)


@dataclass(frozen=True)
class CaseMeasurements:
    """One case measured on its preprocessed grid (training reference or prediction alike).

    ``volumes``, ``components`` (every piece's volume, mm^3) and ``centroids`` (fractions of the
    canonical image's extent, ``(z, y, x)``) hold only the classes present in the case.
    """

    volumes: dict[str, float]
    components: dict[str, list[float]]
    centroids: dict[str, tuple[float, float, float]]
    histograms: list[np.ndarray]
    spacing: tuple[float, float, float]
    noise: list[float]
    flat: list[float]


def intensity_histogram(channel: np.ndarray) -> np.ndarray:
    """The fraction of voxels in each of :data:`HISTOGRAM_BINS` bins of normalised intensity.

    >>> h = intensity_histogram(np.zeros((2, 3)))
    >>> float(h.sum()), int(h.argmax()) == HISTOGRAM_BINS // 2
    (1.0, True)
    """
    low, high = HISTOGRAM_RANGE
    values = np.clip(np.asarray(channel, dtype=np.float32).ravel(), low, high)
    counts, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    return counts / max(1, counts.sum())


def noise_level(channel: np.ndarray) -> float:
    """Median absolute difference of neighbours along the last axis over the 5-95 percentile range.

    >>> ramp = np.tile(np.arange(10.0), (4, 1))
    >>> round(noise_level(ramp), 3)   # a smooth image: one step per voxel over a range of 9
    0.111
    """
    values = np.asarray(channel, dtype=np.float32)
    low, high = np.percentile(values, [5, 95])
    if values.shape[-1] < 2 or high <= low:
        return 0.0
    return float(np.median(np.abs(np.diff(values, axis=-1))) / (high - low))


def flat_fraction(channel: np.ndarray) -> float:
    """The fraction of voxels equal to their next neighbour along both of the last two axes.

    >>> image = np.random.default_rng(0).normal(size=(10, 10)); image[:5] = 0
    >>> round(flat_fraction(image), 2)   # rows 0-3 of the 9 x 9 inner voxels: row 4 meets the noise
    0.44
    """
    values = np.asarray(channel, dtype=np.float32)
    if values.ndim < 2 or min(values.shape[-2:]) < 2:
        return 0.0
    inner = values[..., :-1, :-1]
    flat = (np.abs(values[..., :-1, 1:] - inner) < _FLAT_TOLERANCE) & (np.abs(values[..., 1:, :-1] - inner) < _FLAT_TOLERANCE)
    return float(flat.mean())


def _canonical_fraction(centroid: np.ndarray, properties: CaseProperties) -> tuple[float, float, float]:
    """A preprocessed-grid voxel position as fractions of the canonical (uncropped) image's extent."""
    resampled = np.asarray(properties.shape_after_resampling, dtype=float)
    cropped = np.asarray(properties.shape_after_crop, dtype=float)
    start = np.asarray([b[0] for b in properties.crop_bbox], dtype=float)
    canonical = np.asarray(properties.shape_canonical, dtype=float)
    position = (centroid + 0.5) * cropped / resampled - 0.5 + start
    fraction = (position + 0.5) / canonical
    return tuple(float(v) for v in fraction)  # type: ignore[return-value]


def measure_case(labels: np.ndarray, image: np.ndarray, properties: CaseProperties,
                 label_info: LabelInfo) -> CaseMeasurements:
    """Measure a label map ``(Z, Y, X)`` and its normalised image ``(C, Z, Y, X)`` on the preprocessed grid."""
    voxel_volume = float(np.prod(properties.spacing_after_resampling))
    volumes: dict[str, float] = {}
    components: dict[str, list[float]] = {}
    centroids: dict[str, tuple[float, float, float]] = {}
    for name, value in label_info.classes.items():
        mask = label_mask(labels, value)
        voxels = int(np.count_nonzero(mask))
        if not voxels:
            continue
        volumes[name] = voxels * voxel_volume
        pieces, count = ndimage.label(mask)
        sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
        components[name] = sorted((float(s) * voxel_volume for s in sizes), reverse=True)
        centroids[name] = _canonical_fraction(np.asarray(ndimage.center_of_mass(mask)), properties)
    histograms = [intensity_histogram(channel) for channel in image]
    spacing = tuple(float(s) for s in properties.spacing_canonical)
    noise = [noise_level(channel) for channel in image]
    flat = [flat_fraction(channel) for channel in image]
    return CaseMeasurements(volumes, components, centroids, histograms, spacing, noise, flat)  # type: ignore[arg-type]


def summarize_measurements(configuration: str, cases: Sequence[CaseMeasurements],
                           label_info: LabelInfo) -> ReferenceStats:
    """The reference statistics of measured training cases."""
    if not cases:
        raise ReferenceStatsError(f"{configuration}: no training cases to compute reference statistics from")
    classes: dict[str, ClassReference] = {}
    for name in label_info.classes:
        present = [case for case in cases if name in case.volumes]
        if not present:
            continue
        volumes = [case.volumes[name] for case in present]
        centroids = np.array([case.centroids[name] for case in present])
        smallest = min(min(case.components[name]) for case in present)
        counts = [sum(1 for piece in case.components[name] if piece >= SPECK_FRACTION * smallest) for case in present]
        classes[name] = ClassReference(
            present_in=len(present), volume_min=float(min(volumes)), volume_median=float(np.median(volumes)),
            volume_max=float(max(volumes)), components_max=int(max(counts)), smallest_component=float(smallest),
            centroid_min=tuple(float(v) for v in centroids.min(0)),  # type: ignore[arg-type]
            centroid_max=tuple(float(v) for v in centroids.max(0)))  # type: ignore[arg-type]
    spacings = np.array([case.spacing for case in cases])
    channels = len(cases[0].histograms)
    means, distances = [], []
    for channel in range(channels):
        stack = np.stack([case.histograms[channel] for case in cases])
        means.append(tuple(float(v) for v in stack.mean(0)))
        worst = 0.0
        for index in range(len(stack)):  # leave-one-out: how far a case unseen by the mean can be
            others = np.delete(stack, index, axis=0)
            reference = others.mean(0) if len(others) else stack[index]
            worst = max(worst, _total_variation(stack[index], reference))
        distances.append(worst)
    edges = np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1)
    return ReferenceStats(
        configuration=configuration, num_cases=len(cases), classes=classes,
        spacing_min=tuple(float(v) for v in spacings.min(0)),  # type: ignore[arg-type]
        spacing_max=tuple(float(v) for v in spacings.max(0)),  # type: ignore[arg-type]
        histogram_edges=tuple(float(v) for v in edges), histograms=tuple(means),
        histogram_distance_max=tuple(distances),
        noise_max=tuple(max(case.noise[c] for case in cases) for c in range(channels)),
        flat_max=tuple(max(case.flat[c] for case in cases) for c in range(channels)))


def reference_stats(preprocessed_dir: str | os.PathLike, configuration: str, label_info: LabelInfo,
                    case_ids: Sequence[str] | None = None) -> ReferenceStats:
    """Measure the preprocessed training cases (``<case>.npy``, ``<case>_seg.npy``, ``<case>.json``).

    ``case_ids`` None: every case with a sidecar. The image's first ``C`` channels are measured, where
    ``C`` is the number of channels stored (a cascade's previous-stage channels are not stored there).
    """
    folder = Path(preprocessed_dir)
    if case_ids is None:
        case_ids = sorted(p.name[:-len("_seg.npy")] for p in folder.glob("*_seg.npy") if not p.name.startswith("."))
    measured = []
    for case_id in case_ids:
        sidecar = folder / f"{case_id}.json"
        try:
            properties = load_case_properties(sidecar)
            seg = np.load(folder / f"{case_id}_seg.npy", mmap_mode="r", allow_pickle=False)
            image = np.load(folder / f"{case_id}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ReferenceStatsError(f"{folder / case_id}: preprocessed case cannot be read ({error}); "
                                      "re-run `autoseg preprocess`") from None
        measured.append(measure_case(np.asarray(seg), np.asarray(image), properties, label_info))
    if not measured:
        raise ReferenceStatsError(f"{folder}: no preprocessed training case; run `autoseg preprocess` first")
    return summarize_measurements(configuration, measured, label_info)


def _total_variation(a: np.ndarray, b: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def _ml(volume_mm3: float) -> str:
    return f"{volume_mm3 / 1000:.3g} ml" if volume_mm3 >= 100 else f"{volume_mm3:.3g} mm^3"


def plausibility_flags(case: CaseMeasurements, stats: ReferenceStats,
                       channel_names: Sequence[str] | None = None) -> list[Flag]:
    """Every way a measured case falls outside the training statistics (see the module's list)."""
    flags: list[Flag] = []
    flags += _input_flags(case, stats, channel_names)
    for name, reference in stats.classes.items():
        flags += _class_flags(name, case, reference, stats.num_cases)
    return flags


def _input_flags(case: CaseMeasurements, stats: ReferenceStats, channel_names: Sequence[str] | None) -> list[Flag]:
    flags = []
    axes = ("z", "y", "x")
    for axis, value, low, high in zip(axes, case.spacing, stats.spacing_min, stats.spacing_max):
        if value < low / SPACING_FACTOR or value > high * SPACING_FACTOR:
            flags.append(Flag("spacing", f"voxel spacing {value:.3g} mm along {axis} is outside the training "
                                         f"range {low:.3g}-{high:.3g} mm"))
    for channel, histogram in enumerate(case.histograms):
        name = channel_names[channel] if channel_names and channel < len(channel_names) else f"channel {channel}"
        worst = stats.histogram_distance_max[channel]
        distance = _total_variation(histogram, np.asarray(stats.histograms[channel]))
        if distance > HISTOGRAM_FACTOR * worst + HISTOGRAM_SLACK:
            flags.append(Flag("intensity", f"{name} intensities unlike the training images (histogram distance "
                                           f"{distance:.2f}, training cases at most {worst:.2f})"))
        if case.noise[channel] > NOISE_FACTOR * stats.noise_max[channel]:
            flags.append(Flag("noise", f"{name} is noisier than any training image (noise level "
                                       f"{case.noise[channel]:.3f}, training at most {stats.noise_max[channel]:.3f})"))
        if case.flat[channel] > stats.flat_max[channel] + FLAT_MARGIN:
            flags.append(Flag("blank", f"{name}: {case.flat[channel]:.0%} of the image is flat (training images at "
                                       f"most {stats.flat_max[channel]:.0%}): a region blanked or cut out?"))
    return flags


def _class_flags(name: str, case: CaseMeasurements, reference: ClassReference, num_cases: int) -> list[Flag]:
    volume = case.volumes.get(name)
    if volume is None:
        if reference.present_in == num_cases:
            return [Flag("missing", f"no {name} predicted, though every training case has one", name)]
        return []
    flags = []
    if volume < reference.volume_min / VOLUME_FACTOR or volume > reference.volume_max * VOLUME_FACTOR:
        flags.append(Flag("volume", f"{name} volume {_ml(volume)} is outside the training range "
                                    f"{_ml(reference.volume_min)}-{_ml(reference.volume_max)}", name))
    pieces = sum(1 for piece in case.components[name] if piece >= SPECK_FRACTION * reference.smallest_component)
    limit = max(COMPONENT_FACTOR * reference.components_max, reference.components_max + COMPONENT_EXTRA)
    if pieces > limit:
        flags.append(Flag("components", f"{name} in {pieces} pieces, training cases have at most "
                                        f"{reference.components_max}", name))
    centroid = case.centroids[name]
    outside = max(max(low - value, value - high, 0.0)
                  for value, low, high in zip(centroid, reference.centroid_min, reference.centroid_max))
    if outside > LOCATION_MARGIN:
        flags.append(Flag("location", f"{name} lies {outside:.0%} of the image extent away from where it "
                                      "occurs in the training cases", name))
    return flags

