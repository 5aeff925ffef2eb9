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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from autoseg.errors import AutosegError
from autoseg.io import SUPPORTED_ENDINGS, Image, read_image
from autoseg.labels import LabelInfo, declared_values
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


LabelValue = int | tuple[int, ...]


def _label_values(name: str, value: object) -> LabelValue:
    """One entry of ``labels``: a value, or a list of values (a region); a one-element list is a value."""
    if _is_int(value) and value >= 0:
        return value
    if isinstance(value, list | tuple) and value and all(_is_int(v) and v >= 0 for v in value):
        return value[0] if len(value) == 1 else tuple(value)
    raise ValueError(f"label {name!r} must be a non-negative integer or a list of them, found {value!r}")


class DatasetJson(BaseModel):
    """A parsed and checked ``dataset.json``: a frozen pydantic model.

    The field validators below say, in words that name the key, why a value is wrong; every
    problem of every key is reported at once (:func:`parse_dataset_json`). Keys autoseg does not
    use (``licence``, ``numTest``, ...) are kept in :attr:`extra` and written back unchanged.

    >>> DatasetJson.model_validate({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
    ...                             "numTraining": 4, "file_ending": ".nii.gz"}).foreground_labels
    {'liver': 1}
    """

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)

    # nnU-Net v1 called the channels "modality"; its datasets still carry that key
    channel_names: dict[str, str] = Field(validation_alias=AliasChoices("channel_names", "modality"))
    labels: dict[str, LabelValue]
    num_training: int = Field(alias="numTraining")
    file_ending: str
    regions_class_order: tuple[int, ...] | None = None
    name: str = ""
    description: str = ""

    @field_validator("channel_names", mode="before")
    @classmethod
    def _check_channel_names(cls, value: object) -> dict[str, str]:
        if not isinstance(value, dict) or not value:
            raise _problems(f'"channel_names" must be a non-empty object like {{"0": "CT"}}, found {value!r}')
        problems, names = [], {}
        for key, name in value.items():
            if not str(key).isdigit():
                problems.append(f'"channel_names" key {key!r} is not a channel index ("0", "1", ...)')
            elif not isinstance(name, str) or not name.strip():
                problems.append(f'"channel_names"[{key!r}] must be a non-empty string, found {name!r}')
            else:
                names[str(int(key))] = name
        indices = sorted(int(k) for k in names)
        if indices and indices != list(range(len(indices))):
            problems.append(f'"channel_names" indices must be 0..{len(indices) - 1} without gaps, found {indices}')
        if problems:
            raise _problems(*problems)
        return names

    @field_validator("labels", mode="before")
    @classmethod
    def _check_labels(cls, value: object) -> dict[str, LabelValue]:
        if not isinstance(value, dict) or not value:
            raise _problems(f'"labels" must be a non-empty object of name -> value, found {value!r}')
        problems, labels = [], {}
        for name, values in value.items():
            try:
                labels[name] = _label_values(name, values)
            except ValueError as error:
                problems.append(str(error))
        if labels.get("background") != 0:
            problems.append('"labels" must contain "background": 0')
        plain = [v for k, v in labels.items() if isinstance(v, int) and k != "ignore"]
        if len(plain) != len(set(plain)):
            problems.append(f'"labels" values must be unique, found {sorted(plain)}')
        if isinstance(labels.get("ignore"), tuple):  # its voxels are left out: one value, not a region
            problems.append(f'label "ignore" must be a single value, found {list(labels["ignore"])}')
        if problems:
            raise _problems(*problems)
        return labels

    @field_validator("num_training", mode="before")
    @classmethod
    def _check_num_training(cls, value: object) -> int:
        if not _is_int(value) or value < 1:
            raise _problems(f'"numTraining" must be a positive integer, found {value!r}')
        return value

    @field_validator("file_ending", mode="before")
    @classmethod
    def _check_file_ending(cls, value: object) -> str:
        if not isinstance(value, str) or not value.startswith("."):
            raise _problems(f'"file_ending" must be a string like ".nii.gz", found {value!r}')
        if value.lower() not in SUPPORTED_ENDINGS:
            raise _problems(f'"file_ending" {value!r} is not supported; use one of {" ".join(SUPPORTED_ENDINGS)}')
        return value

    @field_validator("regions_class_order", mode="before")
    @classmethod
    def _check_regions_class_order(cls, value: object) -> object:
        if value is not None and (not isinstance(value, list | tuple) or not all(_is_int(v) for v in value)):
            raise _problems(f'"regions_class_order" must be a list of integers, found {value!r}')
        return value

    @field_validator("name", "description", mode="before")
    @classmethod
    def _as_text(cls, value: object) -> str:
        return str(value)

    @model_validator(mode="after")
    def _check_regions(self) -> DatasetJson:
        info = LabelInfo.from_labels(self.labels)
        if self.regions_class_order is None and info.is_regions:
            raise _problems('"labels" defines overlapping regions (lists of values) but "regions_class_order" '
                            "is missing")
        if self.regions_class_order is not None and info.is_regions \
                and len(self.regions_class_order) != info.num_outputs:
            raise _problems(f'"regions_class_order" has {len(self.regions_class_order)} entries but there are '
                            f"{info.num_outputs} regions")
        return self

    @property
    def extra(self) -> dict:
        """The keys of ``dataset.json`` autoseg does not use, as read."""
        return dict(self.model_extra or {})

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
    def foreground_labels(self) -> dict[str, LabelValue]:
        """Labels (or regions) to learn: everything but background and ignore."""
        return self.label_info.classes

    @property
    def label_values(self) -> set[int]:
        """Every voxel value a label file may contain."""
        return declared_values(self.labels)

    def to_dict(self) -> dict:
        """The JSON form, nnU-Net's key names; unused keys kept, empty optional ones left out."""
        out = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        out["labels"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.labels.items()}
        return out


# Missing keys, in words with an example of what belongs there.
_MISSING = {
    "channel_names": 'missing key "channel_names" (for example {"0": "CT"})',
    "labels": 'missing key "labels" (for example {"background": 0, "liver": 1})',
    "numTraining": 'missing key "numTraining" (the number of training cases)',
    "file_ending": 'missing key "file_ending" (for example ".nii.gz")',
}


def _problems(*messages: str) -> PydanticCustomError:
    """A validation error carrying sentences for the user (one per problem found in one key)."""
    return PydanticCustomError("dataset_json", "{problems}", {"problems": "\n".join(messages)})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_dataset_json(data: object, source: str = DATASET_JSON) -> tuple[DatasetJson | None, list[str]]:
    """Check a loaded ``dataset.json``; return the model (or None) and every problem found.

    Each problem starts with ``source``:

    >>> parse_dataset_json({"channel_names": {"0": "CT"}, "labels": {"liver": 1}, "numTraining": 2,
    ...                     "file_ending": ".nii.gz"}, "data/dataset.json")[1]
    ['data/dataset.json: "labels" must contain "background": 0']
    """
    if not isinstance(data, dict):
        return None, [f"{source}: must be a JSON object, found {type(data).__name__}"]
    try:
        return DatasetJson.model_validate(data), []
    except ValidationError as error:
        problems = []
        for item in error.errors():
            if item["type"] == "missing":
                key = str(item["loc"][0])
                problems.append(_MISSING.get(key, f'missing key "{key}"'))
            elif item["type"] == "dataset_json":
                problems.extend(item["ctx"]["problems"].split("\n"))
            else:  # a pydantic check of its own, such as a wrong type of "name"
                problems.append(f"{'.'.join(map(str, item['loc'])) or '(top level)'}: {item['msg']}")
        return None, [f"{source}: {problem}" for problem in problems]


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
