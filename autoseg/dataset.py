"""The raw dataset: ``dataset.json``, case discovery and case loading (nnU-Net v2 layout).

Layout (unchanged from nnU-Net v2, so existing datasets work as they are)::

    DATASET/
      dataset.json
      imagesTr/CASE_0000.nii.gz   one file per channel, 4-digit channel index
      imagesTr/CASE_0001.nii.gz
      labelsTr/CASE.nii.gz
      imagesTs/                   optional, same naming as imagesTr, no labels

``dataset.json`` keys: ``channel_names`` (``{"0": "CT"}``), ``labels`` (name -> value, or name -> list
of values for overlapping regions, which then needs ``regions_class_order``), ``numTraining``,
``file_ending``. Optional: ``name``, ``description``, ``licence``, ``reference``, and a label named
``ignore`` whose voxels are excluded from training and evaluation.

Every problem is reported in words, all at once, never as a traceback.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io import SUPPORTED_ENDINGS, Image, read_image
from autoseg.labels import LabelError, LabelInfo, declared_values
from autoseg.utils import atomic_write_json

DATASET_JSON = "dataset.json"
IMAGES_TR = "imagesTr"
LABELS_TR = "labelsTr"
IMAGES_TS = "imagesTs"
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

# Files that belong to an image in another file: detached data of .mhd/.nhdr headers and the
# spacing sidecar of a TIFF stack. They do not follow the CASE_XXXX<ending> naming.
COMPANION_ENDINGS: dict[str, tuple[str, ...]] = {
    ".mhd": (".raw", ".zraw", ".raw.gz"),
    ".nhdr": (".raw", ".raw.gz"),
    ".tif": (".json",),
    ".tiff": (".json",),
}


class DatasetError(AutosegError):
    """A dataset cannot be used; ``problems`` lists every reason, each naming its file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems))


# every voxel value a label map may contain (kept under this name for its importers)
label_values_of = declared_values


@dataclass(frozen=True)
class DatasetJson:
    """A parsed and checked ``dataset.json``."""

    channel_names: dict[str, str]
    labels: dict[str, int | tuple[int, ...]]
    num_training: int
    file_ending: str
    regions_class_order: tuple[int, ...] | None = None
    name: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def channel_list(self) -> list[str]:
        """Channel names in channel-index order."""
        return [self.channel_names[k] for k in sorted(self.channel_names, key=int)]

    @property
    def label_info(self) -> LabelInfo:
        """What the labels mean (:mod:`autoseg.labels`): outputs, regions, ignore, scored classes."""
        return LabelInfo.from_labels(self.labels, self.regions_class_order)

    @property
    def has_regions(self) -> bool:
        return self.label_info.is_regions

    @property
    def ignore_label(self) -> int | None:
        return self.label_info.ignore_value

    @property
    def foreground_labels(self) -> dict[str, int | tuple[int, ...]]:
        """Labels (or regions) to learn: everything but background and ignore."""
        return self.label_info.classes

    @property
    def label_values(self) -> set[int]:
        """Every voxel value a label file may contain."""
        return declared_values(self.labels)

    def to_dict(self) -> dict:
        out = dict(self.extra)
        out.update({
            "channel_names": dict(self.channel_names),
            "labels": {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()},
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
        })
        if self.regions_class_order is not None:
            out["regions_class_order"] = list(self.regions_class_order)
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_dataset_json(data: object, source: str = DATASET_JSON) -> tuple[DatasetJson | None, list[str]]:
    """Check a loaded ``dataset.json``; return the model (or None) and every problem found."""
    problems: list[str] = []

    def bad(message: str) -> None:
        problems.append(f"{source}: {message}")

    if not isinstance(data, dict):
        bad(f"must be a JSON object, found {type(data).__name__}")
        return None, problems

    channels_raw = data.get("channel_names", data.get("modality"))
    channel_names: dict[str, str] = {}
    if channels_raw is None:
        bad('missing key "channel_names" (for example {"0": "CT"})')
    elif not isinstance(channels_raw, dict) or not channels_raw:
        bad(f'"channel_names" must be a non-empty object like {{"0": "CT"}}, found {channels_raw!r}')
    else:
        for key, value in channels_raw.items():
            if not str(key).isdigit():
                bad(f'"channel_names" key {key!r} is not a channel index ("0", "1", ...)')
            elif not isinstance(value, str) or not value.strip():
                bad(f'"channel_names"[{key!r}] must be a non-empty string, found {value!r}')
            else:
                channel_names[str(int(key))] = value
        indices = sorted(int(k) for k in channel_names)
        if indices and indices != list(range(len(indices))):
            bad(f'"channel_names" indices must be 0..{len(indices) - 1} without gaps, found {indices}')

    labels: dict[str, int | tuple[int, ...]] = {}
    labels_raw = data.get("labels")
    if labels_raw is None:
        bad('missing key "labels" (for example {"background": 0, "liver": 1})')
    elif not isinstance(labels_raw, dict) or not labels_raw:
        bad(f'"labels" must be a non-empty object of name -> value, found {labels_raw!r}')
    else:
        for name, value in labels_raw.items():
            if _is_int(value) and value >= 0:
                labels[name] = value
            elif (isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value)):
                labels[name] = value[0] if len(value) == 1 else tuple(value)
            else:
                bad(f'label {name!r} must be a non-negative integer or a list of them, found {value!r}')
        if labels and labels.get("background") != 0:
            bad('"labels" must contain "background": 0')
        plain = [v for k, v in labels.items() if isinstance(v, int) and k != "ignore"]
        if len(plain) != len(set(plain)):
            bad(f'"labels" values must be unique, found {sorted(plain)}')
        if isinstance(labels.get("ignore"), tuple):  # its voxels are left out: one value, not a region
            bad(f'label "ignore" must be a single value, found {list(labels["ignore"])}')
            del labels["ignore"]

    regions_order = data.get("regions_class_order")
    try:
        info: LabelInfo | None = LabelInfo.from_labels(labels) if labels else None
    except LabelError:  # nothing to learn: the problem with "background" is reported above
        info = None
    has_regions = info is not None and info.is_regions
    regions_class_order: tuple[int, ...] | None = None
    if regions_order is not None:
        if not isinstance(regions_order, list) or not all(_is_int(v) for v in regions_order):
            bad(f'"regions_class_order" must be a list of integers, found {regions_order!r}')
        else:
            regions_class_order = tuple(regions_order)
            n_regions = info.num_outputs if info is not None else 0
            if has_regions and len(regions_class_order) != n_regions:
                bad(f'"regions_class_order" has {len(regions_class_order)} entries but there are '
                    f"{n_regions} regions")
    elif has_regions:
        bad('"labels" defines overlapping regions (lists of values) but "regions_class_order" is missing')

    num_training = data.get("numTraining")
    if num_training is None:
        bad('missing key "numTraining" (the number of training cases)')
    elif not _is_int(num_training) or num_training < 1:
        bad(f'"numTraining" must be a positive integer, found {num_training!r}')

    ending = data.get("file_ending")
    if ending is None:
        bad('missing key "file_ending" (for example ".nii.gz")')
    elif not isinstance(ending, str) or not ending.startswith("."):
        bad(f'"file_ending" must be a string like ".nii.gz", found {ending!r}')
    elif ending.lower() not in SUPPORTED_ENDINGS:
        bad(f'"file_ending" {ending!r} is not supported; use one of {" ".join(SUPPORTED_ENDINGS)}')

    if problems:
        return None, problems
    known = {"channel_names", "modality", "labels", "numTraining", "file_ending", "regions_class_order",
             "name", "description"}
    return DatasetJson(
        channel_names=channel_names,
        labels=labels,
        num_training=int(num_training),
        file_ending=ending,
        regions_class_order=regions_class_order,
        name=str(data.get("name", "")),
        description=str(data.get("description", "")),
        extra={k: v for k, v in data.items() if k not in known},
    ), []


def load_dataset_json(path: str | os.PathLike) -> DatasetJson:
    """Read and check ``dataset.json`` (a file, or the dataset folder holding it).

    Raises:
        DatasetError: listing every problem, each naming the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DATASET_JSON
    if not path.is_file():
        raise DatasetError([f"{path}: dataset.json is missing"])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError([f"{path}: not valid JSON ({error})"]) from None
    model, problems = parse_dataset_json(data, str(path))
    if model is None:
        raise DatasetError(problems)
    return model


def write_dataset_json(dataset: DatasetJson | dict, folder: str | os.PathLike) -> Path:
    """Write ``dataset.json`` into ``folder`` atomically."""
    data = dataset.to_dict() if isinstance(dataset, DatasetJson) else dataset
    return atomic_write_json(Path(folder) / DATASET_JSON, data)


# --- cases --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: one image per channel (in channel order) and, for training, a label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class CaseIndex:
    """What a folder of images holds: complete cases and what does not fit the naming."""

    cases: list[CaseFiles]
    problems: list[str]


def _strip_ending(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.lower().endswith(ending.lower()) else None


def visible_entries(folder: Path, file_ending: str) -> list[Path]:
    """Entries of ``folder`` that stand for images: no hidden files, no companion data files."""
    entries = [e for e in sorted(folder.iterdir()) if not e.name.startswith(".")]
    extras = COMPANION_ENDINGS.get(file_ending.lower(), ())
    companions = {stem + extra for e in entries if (stem := _strip_ending(e.name, file_ending)) is not None
                  for extra in extras}
    return [e for e in entries if e.name not in companions]


def index_cases(images_dir: str | os.PathLike, file_ending: str, num_channels: int,
                labels_dir: str | os.PathLike | None = None) -> CaseIndex:
    """Group ``CASE_XXXX<ending>`` files into cases and report misnamed, missing and orphan files.

    Hidden files (``.name``, such as an interrupted write's temporary file) and companion files
    (``.raw`` data of ``.mhd`` headers, ``.json`` spacing of ``.tif`` stacks) are skipped.
    """
    images_dir = Path(images_dir)
    problems: list[str] = []
    channels: dict[str, dict[int, Path]] = {}
    if not images_dir.is_dir():
        return CaseIndex([], [f"{images_dir}: folder is missing"])
    for entry in visible_entries(images_dir, file_ending):
        stem = _strip_ending(entry.name, file_ending)
        if stem is None:
            problems.append(f"{entry}: does not end in the dataset's file_ending {file_ending!r}")
            continue
        match = CHANNEL_SUFFIX.match(stem)
        if match is None:
            problems.append(f"{entry}: name must be CASE_XXXX{file_ending} with a 4-digit channel index")
            continue
        channel = int(match["channel"])
        if channel >= num_channels:
            problems.append(f"{entry}: channel {channel:04d} but dataset.json declares {num_channels} "
                            "channel(s)")
            continue
        channels.setdefault(match["case"], {})[channel] = entry

    labels: dict[str, Path] = {}
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        if not labels_dir.is_dir():
            problems.append(f"{labels_dir}: folder is missing")
        else:
            for entry in visible_entries(labels_dir, file_ending):
                stem = _strip_ending(entry.name, file_ending)
                if stem is None:
                    problems.append(f"{entry}: does not end in the dataset's file_ending {file_ending!r}")
                elif stem not in channels:
                    problems.append(f"{entry}: orphan label, no image {stem}_0000{file_ending} in "
                                    f"{images_dir}")
                else:
                    labels[stem] = entry

    cases: list[CaseFiles] = []
    for case_id in sorted(channels):
        found = channels[case_id]
        missing = [c for c in range(num_channels) if c not in found]
        if missing:
            names = ", ".join(f"{case_id}_{c:04d}{file_ending}" for c in missing)
            problems.append(f"{images_dir / case_id}: case is missing channel file(s) {names}")
            continue
        label = labels.get(case_id)
        if labels_dir is not None and label is None:
            problems.append(f"{Path(labels_dir) / (case_id + file_ending)}: label missing for case {case_id}")
            continue
        cases.append(CaseFiles(case_id, tuple(found[c] for c in range(num_channels)), label))
    return CaseIndex(cases, problems)


def training_cases(dataset_dir: str | os.PathLike, dataset: DatasetJson | None = None) -> list[CaseFiles]:
    """The complete training cases of a dataset; raises :class:`DatasetError` on naming problems."""
    dataset_dir = Path(dataset_dir)
    dataset = dataset or load_dataset_json(dataset_dir)
    index = index_cases(dataset_dir / IMAGES_TR, dataset.file_ending, dataset.num_channels,
                        dataset_dir / LABELS_TR)
    if index.problems:
        raise DatasetError(index.problems + ["run `autoseg validate` for a full check"])
    if not index.cases:
        raise DatasetError([f"{dataset_dir / IMAGES_TR}: no training cases found"])
    return index.cases


@dataclass
class CaseData:
    """One loaded case, ready for the pipeline.

    Attributes:
        case_id: the case name.
        image: float32 array ``(channels, z, y, x)``; 2D cases have ``z == 1``.
        label: integer array ``(z, y, x)`` or None.
        spacing: ``(z, y, x)`` in mm; for 2D cases the z entry is 1.0 and meaningless.
        is_2d: the source files were 2D.
        reference: geometry of channel 0 as read (its array is the raw first channel), used to
            write results back in the source's own geometry and format.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    is_2d: bool
    reference: Image


def to_3d(array: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Promote a 2D ``(y, x)`` array to ``(1, y, x)`` so every stage handles one shape convention."""
    if array.ndim == 2:
        return array[None], (1.0, float(spacing[0]), float(spacing[1]))
    return array, tuple(float(s) for s in spacing)  # type: ignore[return-value]


def load_case(case: CaseFiles, load_label: bool = True) -> CaseData:
    """Read every channel (and the label) of a case into one array.

    Geometry consistency is the job of ``autoseg validate``; here a shape mismatch is an error
    naming the file, since the channels could not be stacked.
    """
    first = read_image(case.images[0])
    arrays = [first.array]
    for path in case.images[1:]:
        channel = read_image(path)
        if channel.array.shape != first.array.shape:
            raise DatasetError([f"{path}: shape {channel.array.shape} differs from "
                                f"{case.images[0].name}'s {first.array.shape}"])
        arrays.append(channel.array)
    is_2d = first.ndim == 2
    image = np.stack([to_3d(a.astype(np.float32, copy=False), first.spacing)[0] for a in arrays])
    _, spacing = to_3d(first.array, first.spacing)
    label = None
    if load_label and case.label is not None:
        label_image = read_image(case.label)
        if label_image.array.shape != first.array.shape:
            raise DatasetError([f"{case.label}: label shape {label_image.array.shape} differs from the "
                                f"image's {first.array.shape}"])
        label = to_3d(_as_label_array(label_image.array, case.label), first.spacing)[0]
    return CaseData(case.case_id, image, label, spacing, is_2d, first)


def _as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int16 if array.max(initial=0) < 32767 else np.int32, copy=False)
    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise DatasetError([f"{path}: label has non-integer values"])
    return rounded.astype(np.int16)
