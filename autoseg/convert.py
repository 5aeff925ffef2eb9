"""Convert public datasets into the raw layout autoseg trains on (nnU-Net v2, see :mod:`autoseg.dataset`).

Two entry points:

* :func:`convert_msd` turns a Medical Segmentation Decathlon task folder into the raw layout,
  using the task's own ``dataset.json`` for channels and labels;
* :func:`convert_with_spec` converts any dataset described in ``datasets_spec/`` (see
  :mod:`autoseg.specs`); the spec's ``source_layout.family`` picks how the source tree is read.

Each layout family has one function that lists the cases of a source tree as :class:`SourceCase`
records without reading any voxel; one writer then turns every case into files. Images already
in the target format with one channel per file are copied byte for byte (no re-encoding, the
header kept exactly); 4D Decathlon images are split into one 3D file per channel, keeping the
spacing, origin and direction of the first three axes. Labels are always read, mapped
(``source_layout.label_mapping``), checked against the declared label values and written as
unsigned integers.

Every file is written under a temporary name and renamed; a case's label is written after its
images, so a case whose files all exist is complete and is skipped when a conversion is run
again. ``dataset.json`` is written last, once every case is in place (and removed while cases are
being added to an earlier conversion), so its presence marks a finished conversion.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from autoseg.dataset import (
    IMAGES_TR,
    IMAGES_TS,
    LABELS_TR,
    DatasetError,
    parse_dataset_json,
    write_dataset_json,
)
from autoseg.io import SITK_ENDINGS, Image, ImageReadError, file_ending, read_image, write_image
from autoseg.specs import DatasetSpec, load_spec
from autoseg.utils import atomic_write

LABELS_TS = "labelsTs"
MSD_ENDING = ".nii.gz"
# Case folders are looked for in SRC and this many folder levels below it (ACDC's archive
# extracts to database/training/patientXXX).
CASE_SEARCH_DEPTH = 3

ChannelSource = Path | Image
LabelSource = Path | Image


class ConversionError(DatasetError):
    """A source tree cannot be converted; ``problems`` names each file and what is wrong with it."""


@dataclass(frozen=True)
class SourceCase:
    """One case of a source tree, listed before any voxel is read.

    Attributes:
        case_id: the case name in the converted dataset.
        is_test: the case goes to ``imagesTs`` (and its label, if any, to ``labelsTs``).
        origin: the source file or folder, named in error messages.
        has_label: the case comes with a label.
        load: returns the channel sources (a file to copy or split, or an image in memory) and
            the label source (or None).
        label_origin: the file named in label errors when the label is an image in memory.
    """

    case_id: str
    is_test: bool
    origin: Path
    has_label: bool
    load: Callable[[], tuple[list[ChannelSource], LabelSource | None]]
    label_origin: Path | None = None


# --- entry points ------------------------------------------------------------------------------------


def convert_msd(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = False) -> Path:
    """Convert a Medical Segmentation Decathlon task folder (``TaskXX_Name``) into the raw layout.

    Channels and labels come from the task's own ``dataset.json`` (``modality``, ``labels`` keyed
    by value); cases from its ``training`` and ``test`` lists. 4D images (channels in the last
    NIfTI axis) are split into one file per channel.

    Args:
        src: the task folder (holding ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``).
        dst: the raw dataset folder to create or complete.
        progress: show a progress bar over the cases.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConversionError: the source is malformed; the message names the file.
    """
    task_dir = _msd_task_dir(Path(src), None)
    msd = _read_msd_json(task_dir)
    labels = _msd_labels(msd, task_dir)
    channel_names = {str(k): str(v) for k, v in msd["modality"].items()}
    cases = _msd_cases(task_dir, msd, len(channel_names))

    def dataset_json(num_training: int) -> dict:
        data = {
            "name": str(msd.get("name") or task_dir.name),
            "description": str(msd.get("description", "")),
            "channel_names": channel_names,
            "labels": labels,
            "numTraining": num_training,
            "file_ending": MSD_ENDING,
        }
        for key in ("reference", "licence", "license", "release"):
            if msd.get(key):
                data["licence" if key == "license" else key] = msd[key]
        return data

    return _convert(cases, task_dir, Path(dst), dataset_json, len(channel_names), MSD_ENDING, {},
                    set(labels.values()), progress, f"convert {task_dir.name}")


def convert_with_spec(spec: str | os.PathLike | DatasetSpec, src: str | os.PathLike, dst: str | os.PathLike,
                      progress: bool = False) -> Path:
    """Convert the dataset described by ``spec`` from its downloaded tree ``src`` into ``dst``.

    Args:
        spec: a spec (a path, a name in ``datasets_spec/`` such as ``"BraTS2021"``, or a loaded spec).
        src: the downloaded, extracted source (what the spec's ``download.notes`` call SRC).
        dst: the raw dataset folder to create or complete.
        progress: show a progress bar over the cases.

    Returns:
        ``dst`` as a Path.

    Raises:
        SpecError: the spec is invalid.
        ConversionError: the source does not have the spec's layout; the message names the file.
    """
    spec = spec if isinstance(spec, DatasetSpec) else load_spec(spec)
    src = Path(src)
    if not src.is_dir():
        raise ConversionError([f"{src}: source folder does not exist"])
    layout = spec.source_layout
    lister = _FAMILIES[layout.family]
    cases = lister(src, spec)
    return _convert(cases, src, Path(dst), spec.dataset_json, spec.num_channels, spec.file_ending,
                    layout.label_mapping, spec.label_values, progress, f"convert {spec.name}")


# --- the writer --------------------------------------------------------------------------------------


def _convert(cases: list[SourceCase], src: Path, dst: Path, dataset_json: Callable[[int], dict],
             num_channels: int, ending: str, mapping: dict[int, int], allowed: set[int], progress: bool,
             desc: str) -> Path:
    origins: dict[str, list[Path]] = {}
    for case in cases:
        origins.setdefault(case.case_id, []).append(case.origin)
    duplicates = [f"{paths[0]}: case name {case_id} also comes from {', '.join(map(str, paths[1:]))}"
                  for case_id, paths in origins.items() if len(paths) > 1]
    if duplicates:
        raise ConversionError(duplicates)
    num_training = sum(1 for c in cases if not c.is_test)
    if num_training == 0:
        raise ConversionError([f"{src}: the source holds no labelled training case"])
    data = dataset_json(num_training)
    # Check dataset.json before writing any case, so a bad description fails at once, not after an hour.
    model, problems = parse_dataset_json(data, str(dst / "dataset.json"))
    if model is None:
        raise ConversionError(problems)

    dst.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if not _case_done(c, dst, num_channels, ending)]
    if todo:
        # dataset.json marks a finished conversion; while cases are being added there is none.
        (dst / "dataset.json").unlink(missing_ok=True)
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc=desc, unit="case", disable=not progress)
    with bar:
        for case in todo:
            _write_case(case, dst, num_channels, ending, mapping, allowed)
            bar.update()
    write_dataset_json(data, dst)
    return dst


def _output_paths(case: SourceCase, dst: Path, num_channels: int, ending: str) -> tuple[list[Path], Path]:
    images_dir = dst / (IMAGES_TS if case.is_test else IMAGES_TR)
    labels_dir = dst / (LABELS_TS if case.is_test else LABELS_TR)
    channels = [images_dir / f"{case.case_id}_{c:04d}{ending}" for c in range(num_channels)]
    return channels, labels_dir / f"{case.case_id}{ending}"


def _case_done(case: SourceCase, dst: Path, num_channels: int, ending: str) -> bool:
    channels, label = _output_paths(case, dst, num_channels, ending)
    return all(p.is_file() for p in channels) and (not case.has_label or label.is_file())


def _write_case(case: SourceCase, dst: Path, num_channels: int, ending: str, mapping: dict[int, int],
                allowed: set[int]) -> None:
    try:
        channels, label = case.load()
        if len(channels) != num_channels:
            raise ConversionError([f"{case.origin}: {len(channels)} channel(s) found, the dataset declares "
                                   f"{num_channels}"])
        out_channels, out_label = _output_paths(case, dst, num_channels, ending)
        shapes = [_channel_shape(c) for c in channels]
        for source, shape in zip(channels[1:], shapes[1:]):
            if shape != shapes[0]:
                raise ConversionError([f"{_name(source, case)}: shape {shape} differs from the first channel's "
                                       f"{shapes[0]}"])
        label_image = None
        if label is not None:
            # Read and check the label before writing anything, so a bad case leaves no files behind.
            label_name = _name(label, case, case.label_origin)
            label_image = label if isinstance(label, Image) else read_image(label)
            if label_image.array.shape != shapes[0]:
                raise ConversionError([f"{label_name}: label shape {label_image.array.shape} differs from the "
                                       f"image's {shapes[0]}"])
            label_image = _prepare_label(label_image, label_name, mapping, allowed)
        for source, out in zip(channels, out_channels):
            _put_channel(source, out)
        if label_image is not None:
            write_image(label_image, out_label)
    except ImageReadError as error:
        raise ConversionError([str(error)]) from None


def _name(source: ChannelSource | LabelSource, case: SourceCase, origin: Path | None = None) -> str:
    if isinstance(source, Path):
        return str(source)
    return f"{origin or case.origin} (case {case.case_id})"


def _channel_shape(source: ChannelSource) -> tuple[int, ...]:
    if isinstance(source, Image):
        return source.array.shape
    return _header(source)[0]


def _header(path: Path) -> tuple[tuple[int, ...], int]:
    """Array-order shape and number of components of an image file, reading only its header."""
    if file_ending(path) not in SITK_ENDINGS:
        return read_image(path).array.shape, 1
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(path, f"header cannot be read ({str(error).strip().splitlines()[-1][:200]})") from None
    return tuple(reversed(reader.GetSize())), reader.GetNumberOfComponents()


def _put_channel(source: ChannelSource, out: Path) -> None:
    if isinstance(source, Image):
        write_image(source, out)
    elif file_ending(source) == file_ending(out):
        atomic_write(out, lambda tmp: shutil.copyfile(source, tmp))
    else:
        write_image(read_image(source), out)


def _prepare_label(image: Image, name: str, mapping: dict[int, int], allowed: set[int]) -> Image:
    """Whole-number check, value mapping, check against the declared values, unsigned storage."""
    array = image.array
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ConversionError([f"{name}: label has non-integer values"])
        array = rounded.astype(np.int32)
    if array.size and array.min() < 0:
        raise ConversionError([f"{name}: label has negative values (minimum {array.min()})"])
    present = _present_values(array)
    bad = [v for v in present if mapping.get(v, v) not in allowed]
    if bad:
        mapped_note = f" (after mapping {mapping})" if mapping else ""
        raise ConversionError([f"{name}: unexpected label value(s) {bad}{mapped_note}; the dataset declares "
                               f"{sorted(allowed)}"])
    dtype = np.uint8 if max(allowed) <= 255 else np.uint16
    if not any(mapping.get(v, v) != v for v in present):
        return image.with_array(array.astype(dtype, copy=False))
    # One mask per value present (a handful) instead of an int64 lookup copy of a 512^3 volume;
    # every mask comes from the source array, so swaps such as 1 -> 2, 2 -> 1 work.
    out = np.zeros(array.shape, dtype=dtype)
    for value in present:
        if mapping.get(value, value):
            out[array == value] = mapping.get(value, value)
    return image.with_array(out)


def _present_values(array: np.ndarray, chunk: int = 1 << 24) -> list[int]:
    """The distinct values of a non-negative integer array, sorted."""
    if array.size == 0:
        return []
    top = int(array.max())
    if top >= 1 << 16:
        return np.unique(array).tolist()
    # bincount is linear where np.unique sorts, but it converts its input to int64: chunks keep
    # that copy small for a 512 x 512 x 1000 CT label map.
    flat = array.reshape(-1)
    counts = np.zeros(top + 1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk].astype(np.intp, copy=False), minlength=top + 1)
    return np.flatnonzero(counts).tolist()


# --- Medical Segmentation Decathlon ------------------------------------------------------------------


def _msd_task_dir(src: Path, task_folder: str | None) -> Path:
    if (src / "dataset.json").is_file():
        return src
    if task_folder and (src / task_folder / "dataset.json").is_file():
        return src / task_folder
    where = f"{src} or {src / task_folder}" if task_folder else str(src)
    raise ConversionError([f"{where}: no dataset.json; expected a Medical Segmentation Decathlon task folder "
                           "(e.g. Task04_Hippocampus/ with dataset.json, imagesTr/, labelsTr/)"])


def _read_msd_json(task_dir: Path) -> dict:
    path = task_dir / "dataset.json"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError([f"{path}: not valid JSON ({error})"]) from None
    problems = []
    if not isinstance(data, dict):
        raise ConversionError([f"{path}: must be a JSON object"])
    for key, kind in (("modality", dict), ("labels", dict), ("training", list)):
        if key not in data:
            problems.append(f"{path}: missing key {key!r}; is this a Decathlon task's dataset.json?")
        elif not isinstance(data[key], kind) or not data[key]:
            problems.append(f"{path}: {key!r} must be a non-empty {'object' if kind is dict else 'list'}")
    if "test" in data and not isinstance(data["test"], list):
        problems.append(f"{path}: 'test' must be a list of image paths")
    if problems:
        raise ConversionError(problems)
    return data


def _msd_labels(msd: dict, task_dir: Path) -> dict[str, int]:
    labels: dict[str, int] = {}
    for value, name in msd["labels"].items():
        if not str(value).isdigit():
            raise ConversionError([f"{task_dir / 'dataset.json'}: label key {value!r} is not a label value"])
        # The raw layout requires the name "background" for 0 whatever the source calls it.
        labels["background" if int(value) == 0 else str(name)] = int(value)
    if 0 not in labels.values():
        raise ConversionError([f"{task_dir / 'dataset.json'}: labels have no value 0 (background)"])
    return labels


def _msd_case_id(relative: str) -> str:
    name = Path(relative).name
    return name[: -len(MSD_ENDING)] if name.endswith(MSD_ENDING) else Path(name).stem


def _msd_cases(task_dir: Path, msd: dict, num_channels: int) -> list[SourceCase]:
    json_path = task_dir / "dataset.json"
    cases: list[SourceCase] = []
    for index, entry in enumerate(msd["training"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("label"), str):
            raise ConversionError([f"{json_path}: training[{index}] must be {{\"image\": ..., \"label\": ...}}, "
                                   f"found {entry!r}"])
        if Path(entry["image"]).name.startswith("."):
            continue  # macOS '._*' resource forks, should a list ever name one
        image, label = task_dir / entry["image"], task_dir / entry["label"]
        _require_files([image, label], f"listed in {json_path} training[{index}]")
        cases.append(SourceCase(_msd_case_id(entry["image"]), False, image, True,
                                _msd_loader(image, label, num_channels)))
    for index, entry in enumerate(msd.get("test", [])):
        relative = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(relative, str):
            raise ConversionError([f"{json_path}: test[{index}] must be an image path, found {entry!r}"])
        if Path(relative).name.startswith("."):
            continue
        image = task_dir / relative
        _require_files([image], f"listed in {json_path} test[{index}]")
        cases.append(SourceCase(_msd_case_id(relative), True, image, False, _msd_loader(image, None, num_channels)))
    return cases


def _msd_loader(image: Path, label: Path | None, num_channels: int):
    def load() -> tuple[list[ChannelSource], LabelSource | None]:
        return split_channels(image, num_channels), label
    return load


def split_channels(path: str | os.PathLike, num_channels: int | None = None) -> list[Path | Image]:
    """The channels of a 3D or 4D image file, channels in the last ITK axis (the Decathlon's layout).

    A 3D single-component file is returned as its own path (to be copied as it is); a 4D file, or
    a 3D file with several components per voxel, is read and split into 3D images that keep the
    spacing, origin and direction of the first three axes.

    Raises:
        ConversionError: the file is neither, or holds a different number of channels than expected.
    """
    import SimpleITK as sitk

    path = Path(path)
    shape, components = _header(path)
    if len(shape) == 3 and components == 1:
        channels: list[Path | Image] = [path]
    elif len(shape) in (3, 4):
        try:
            itk = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ConversionError([f"{path}: cannot be read ({str(error).strip().splitlines()[-1][:200]})"]) from None
        array = sitk.GetArrayFromImage(itk)
        dim = itk.GetDimension()
        spacing = tuple(reversed(itk.GetSpacing()[:3]))
        origin = itk.GetOrigin()[:3]
        direction = np.asarray(itk.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
        if dim == 4:
            if components != 1:
                raise ConversionError([f"{path}: 4D image with {components} components per voxel; expected one"])
            # ITK's (x, y, z, c) comes back from numpy as (c, z, y, x).
            volumes = [array[c] for c in range(array.shape[0])]
        else:
            volumes = [array[..., c] for c in range(array.shape[-1])]
        channels = [Image(np.ascontiguousarray(v), spacing, tuple(origin), tuple(direction)) for v in volumes]
    else:
        raise ConversionError([f"{path}: {len(shape)}D image; expected a 3D volume or a 4D stack of channels"])
    if num_channels is not None and len(channels) != num_channels:
        raise ConversionError([f"{path}: holds {len(channels)} channel(s) but the dataset declares {num_channels}"])
    return channels


def _require_files(paths: Iterable[Path], context: str) -> None:
    missing = [f"{p}: file does not exist ({context})" for p in paths if not p.is_file()]
    if missing:
        raise ConversionError(missing)


def _msd_spec_cases(src: Path, spec: DatasetSpec) -> list[SourceCase]:
    task_dir = _msd_task_dir(src, spec.source_layout.options["task_folder"])
    msd = _read_msd_json(task_dir)
    if len(msd["modality"]) != spec.num_channels:
        raise ConversionError([f"{task_dir / 'dataset.json'}: {len(msd['modality'])} channel(s) "
                               f"{dict(msd['modality'])} but spec {spec.name} declares {spec.num_channels} "
                               f"{spec.channel_names}; is this the right task folder?"])
    return _msd_cases(task_dir, msd, spec.num_channels)


# --- case folders (BraTS 2021, KiTS23, ACDC) ---------------------------------------------------------


def find_case_dirs(src: str | os.PathLike, pattern: str, max_depth: int = CASE_SEARCH_DEPTH) -> list[Path]:
    """Folders whose name matches ``pattern`` in ``src`` and up to ``max_depth - 1`` levels below.

    A matching folder is a case and is not searched further; hidden folders are skipped.

    Raises:
        ConversionError: none found.
    """
    src = Path(src)
    found: list[Path] = []
    level = [src]
    for _ in range(max_depth):
        below: list[Path] = []
        for folder in level:
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                (found if fnmatch.fnmatchcase(entry.name, pattern) else below).append(entry)
        level = below
    if not found:
        raise ConversionError([f"{src}: no case folders named like {pattern!r} in it or up to {max_depth - 1} "
                               "folder level(s) below; is this the right source folder?"])
    return sorted(found, key=lambda p: (p.name, str(p)))


def _case_folder_cases(src: Path, spec: DatasetSpec) -> list[SourceCase]:
    options = spec.source_layout.options
    cases: list[SourceCase] = []
    for folder in find_case_dirs(src, options["case_glob"]):
        case = folder.name
        images = [folder / template.format(case=case) for template in options["channel_files"]]
        _require_files(images, f"channel of case folder {folder}")
        label: Path | None = folder / options["label_file"].format(case=case)
        is_test = False
        if not label.is_file():
            if options["unlabelled_cases"] != "test":
                raise ConversionError([f"{label}: label file missing for case {case} (the spec's "
                                       "source_layout.unlabelled_cases is 'error')"])
            label, is_test = None, True
        cases.append(SourceCase(case, is_test, folder, label is not None, _files_loader(images, label)))
    return cases


def _files_loader(images: list[Path], label: Path | None):
    def load() -> tuple[list[ChannelSource], LabelSource | None]:
        return [_single_channel(p) for p in images], label
    return load


def _single_channel(path: Path) -> Path:
    shape, components = _header(path)
    if components != 1 or len(shape) not in (2, 3):
        raise ConversionError([f"{path}: expected a 2D or 3D image with one value per voxel, found "
                               f"{len(shape)}D with {components} component(s)"])
    return path


def _acdc_cases(src: Path, spec: DatasetSpec) -> list[SourceCase]:
    options = spec.source_layout.options
    test_dirs = set(options["test_dirs"])
    cases: list[SourceCase] = []
    for folder in find_case_dirs(src, options["case_glob"]):
        # SRC's own name counts, so converting database/testing alone gives test cases.
        where = folder.resolve().relative_to(src.resolve().parent).parts[:-1]
        is_test = any(part in test_dirs for part in where)
        pattern = options["frame_glob"].format(case=folder.name)
        frames = sorted(p for p in folder.iterdir()
                        if not p.name.startswith(".") and fnmatch.fnmatchcase(p.name, pattern))
        if not frames:
            raise ConversionError([f"{folder}: no frame images named like {pattern!r}"])
        for frame in frames:
            ending = file_ending(frame)
            stem = frame.name[: -len(ending)]
            label: Path | None = frame.with_name(stem + options["label_suffix"] + ending)
            if not label.is_file():
                if not is_test:
                    raise ConversionError([f"{label}: label file missing for frame {frame.name}"])
                label = None
            cases.append(SourceCase(stem, is_test, frame, label is not None, _files_loader([frame], label)))
    return cases


# --- ISBI 2012 EM (2D stacks) ------------------------------------------------------------------------


def _isbi_cases(src: Path, spec: DatasetSpec) -> list[SourceCase]:
    options = spec.source_layout.options
    train_images, train_labels = src / options["train_images"], src / options["train_labels"]
    _require_files([train_images, train_labels], "ISBI 2012 training stack")
    images, labels = _read_stack(train_images), _read_stack(train_labels)
    if images.array.shape != labels.array.shape:
        raise ConversionError([f"{train_labels}: shape {labels.array.shape} differs from {train_images.name}'s "
                               f"{images.array.shape}"])
    cases = [_slice_case(f"train_{i:03d}", False, train_images, images, labels, i, train_labels)
             for i in range(images.array.shape[0])]
    test_images = src / options["test_images"]
    if test_images.is_file():
        test = _read_stack(test_images)
        cases += [_slice_case(f"test_{i:03d}", True, test_images, test, None, i) for i in range(test.array.shape[0])]
    return cases


def _read_stack(path: Path) -> Image:
    try:
        image = read_image(path)
    except ImageReadError as error:
        raise ConversionError([str(error)]) from None
    if image.ndim == 2:
        return Image(image.array[None], (1.0, *image.spacing))
    return image


def _slice_case(case_id: str, is_test: bool, origin: Path, images: Image, labels: Image | None,
                index: int, label_origin: Path | None = None) -> SourceCase:
    def section(stack: Image) -> Image:
        return Image(np.ascontiguousarray(stack.array[index]), stack.spacing[1:])

    def load() -> tuple[list[ChannelSource], LabelSource | None]:
        return [section(images)], section(labels) if labels is not None else None

    return SourceCase(case_id, is_test, origin, labels is not None, load, label_origin)


_FAMILIES: dict[str, Callable[[Path, DatasetSpec], list[SourceCase]]] = {
    "msd": _msd_spec_cases,
    "brats2021": _case_folder_cases,
    "kits23": _case_folder_cases,
    "acdc": _acdc_cases,
    "isbi2012": _isbi_cases,
}
