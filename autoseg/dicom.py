"""DICOM in and DICOM SEG out, for PACS: series folders with their datasets, Segmentation objects.

A DICOM series folder is read as an image with SimpleITK (pixel data and geometry, as
:func:`autoseg.io.read_image` does for every input) together with its pydicom datasets, which a
Segmentation must reference. :func:`write_dicom_seg` turns a label map on that series' grid into
a DICOM Segmentation (``BINARY``, one segment per foreground label or region, named from the
dataset's labels); :func:`read_dicom_seg` turns one back into a label map.

Why ``BINARY`` and not highdicom's ``LABELMAP``: regions overlap, which a label map cannot hold,
and ``LABELMAP`` (a 2024 addition to the standard) is not yet read by most viewers and PACS.

Each segment records the label value it stands for in its algorithm parameters (``label_value``;
``region_values`` too for a region), so reading a SEG back needs no dataset.json. A segment
without them (a SEG from another tool) stands for its segment number.

highdicom and pydicom are the optional extra ``dicom`` (``pip install 'autoseg[dicom]'``); they are
imported when a function needs them, so the rest of autoseg runs without them. SimpleITK is
imported inside functions too, as :mod:`autoseg.io` does, so that importing evaluation stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoseg import __version__
from autoseg.dataset import CaseFiles
from autoseg.errors import AutosegError
from autoseg.io import Image, ImageReadError, from_sitk, read_image, to_sitk
from autoseg.labels import LabelInfo, LabelValue, label_mask
from autoseg.utils import atomic_write

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

DICOM_SEG_ENDING = ".dcm"
SEGMENTATION_STORAGE_UIDS = ("1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation Storage
                             "1.2.840.10008.5.1.4.1.1.66.7")   # Label Map Segmentation Storage
MISSING_EXTRA = "DICOM support needs the dicom extra: pip install 'autoseg[dicom]'"
# A SEG is a new series in the source's study; 9000 + keeps it apart from the scanner's numbers.
SEG_SERIES_NUMBER_OFFSET = 9000
# voxels: how far a SEG's grid may sit from the reference grid and still count as the same grid
GRID_TOLERANCE = 1e-2


class DicomError(AutosegError):
    """A DICOM file or series that cannot be used; the message names it and the problem."""


def dicom_libraries() -> tuple[Any, Any]:
    """``(highdicom, pydicom)``, or a one-line :class:`DicomError` saying how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError:
        raise DicomError(MISSING_EXTRA) from None
    return highdicom, pydicom


def series_cases(folder: str | os.PathLike, num_channels: int = 1) -> list[CaseFiles]:
    """One case per sub-folder of ``folder`` holding a DICOM series, named after the sub-folder
    (or ``folder`` itself as the one case, when it holds a series and no sub-folder does).

    >>> import tempfile; series_cases(tempfile.mkdtemp())
    []

    Raises:
        DicomError: series found for a model that takes several channels (one series is one channel).
    """
    folder = Path(folder)
    found = [entry for entry in sorted(folder.iterdir())
             if entry.is_dir() and not entry.name.startswith(".") and _holds_series(entry)]
    if not found and _holds_series(folder):
        found = [folder]
    if found and num_channels != 1:
        raise DicomError(f"{folder}: holds DICOM series folders, one series per case, but the model takes "
                         f"{num_channels} channels; give each channel as CASE_XXXX files instead")
    return [CaseFiles(entry.name, (entry,)) for entry in found]


def read_dicom_series(folder: str | os.PathLike) -> tuple[sitk.Image, list[pydicom.Dataset]]:
    """A series folder as an image and its datasets (no pixel data), ``datasets[k]`` being slice ``k``.

    Raises:
        ImageReadError: not exactly one readable DICOM series in ``folder``.
        DicomError: the dicom extra is missing.
    """
    import SimpleITK as sitk

    _, pydicom = dicom_libraries()
    image = read_image(folder)  # checks that the folder holds exactly one series
    # GDCM sorts the files by position, the order the image's z axis follows.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    try:
        datasets = [pydicom.dcmread(name, stop_before_pixels=True) for name in files]
    except Exception as error:
        raise ImageReadError(folder, f"DICOM files cannot be read ({error})") from error
    return to_sitk(image), datasets


def write_dicom_seg(label_map: sitk.Image | Image, source: str | os.PathLike | Sequence[pydicom.Dataset],
                    labels: LabelInfo | Mapping[str, LabelValue], path: str | os.PathLike) -> Path:
    """Write ``label_map`` (on the source series' grid) as a DICOM Segmentation referencing the series.

    Args:
        label_map: label values, axes ``(z, y, x)`` in the series' slice order.
        source: the series folder, or its datasets in slice order (:func:`read_dicom_series`).
        labels: the dataset's labels (:class:`LabelInfo`, or dataset.json's ``labels``); one
            segment per foreground label, or per region, named after it.
        path: the ``.dcm`` file to write (temporary name, then renamed).

    Raises:
        DicomError: the label map does not fit the series, or the extra is missing.

    Example (``tests/test_dicom.py`` runs it on a synthetic CT series):
        >>> predictor = Predictor.from_model("work/liver")                   # doctest: +SKIP
        >>> labels = predictor.predict("scans/patient_a")                    # doctest: +SKIP
        >>> write_dicom_seg(labels, "scans/patient_a", predictor.model.label_info,
        ...                 "seg/patient_a.dcm")                             # doctest: +SKIP
    """
    import SimpleITK as sitk

    highdicom, _ = dicom_libraries()
    from pydicom.sr.codedict import codes

    path = Path(path)
    datasets = list(source) if not isinstance(source, (str, os.PathLike)) else read_dicom_series(source)[1]
    array = label_map.array if isinstance(label_map, Image) else sitk.GetArrayFromImage(label_map)
    _check_fits(array, label_map, datasets, path)
    info = labels if isinstance(labels, LabelInfo) else LabelInfo.from_labels(labels)
    segments = _segments(info)
    descriptions = []
    for number, (name, _, parameters) in enumerate(segments, start=1):
        algorithm = highdicom.AlgorithmIdentificationSequence(
            name="autoseg", family=codes.DCM.ArtificialIntelligence, version=__version__, parameters=parameters)
        # dataset.json names are free text ("liver", "tumour core"), which no code table maps
        # reliably; the generic SNOMED "Tissue" is true of every one of them, and the segment's
        # label carries the name.
        descriptions.append(highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm))
    pixels = _segment_pixels(array, [value for _, value, _ in segments], info.is_regions)
    first = datasets[0]
    segmentation = highdicom.seg.Segmentation(
        source_images=datasets, pixel_array=pixels, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=highdicom.UID(),
        series_number=SEG_SERIES_NUMBER_OFFSET + int(getattr(first, "SeriesNumber", 0) or 0),
        sop_instance_uid=highdicom.UID(), instance_number=1, manufacturer="autoseg",
        manufacturer_model_name="autoseg", software_versions=__version__, device_serial_number="0",
        series_description="autoseg segmentation", content_label="AUTOSEG",
        # highdicom keeps every frame of an empty map anyway (and warns); say so up front.
        omit_empty_frames=bool(pixels.any()))
    return atomic_write(path, lambda tmp: segmentation.save_as(tmp, enforce_file_format=True))


def read_dicom_seg(path: str | os.PathLike, reference_geometry: sitk.Image | Image | None = None) -> sitk.Image:
    """A DICOM Segmentation as a label map (each segment painted with its label value, in order).

    A SEG stores only the slices it marks, so without ``reference_geometry`` the result covers just
    those; with it (the source image, or a label map on its grid) the result has that exact grid.

    Raises:
        DicomError: not a readable DICOM Segmentation, not on the reference grid, or the extra is missing.

    Example:
        >>> nifti = autoseg.io.read_image("predictions/patient_a.nii.gz")    # doctest: +SKIP
        >>> labels = read_dicom_seg("seg/patient_a.dcm", reference_geometry=nifti)  # doctest: +SKIP
    """
    import SimpleITK as sitk

    highdicom, _ = dicom_libraries()
    path = Path(path)
    try:
        segmentation = highdicom.seg.segread(path)
        volume = segmentation.get_volume(combine_segments=False)
    except Exception as error:
        raise DicomError(f"{path}: cannot be read as a DICOM Segmentation ({error})") from error
    stacked = volume.array if volume.array.ndim == 4 else volume.array[..., None]
    values = [_segment_value(segmentation.get_segment_description(n)) for n in segmentation.segment_numbers]
    dtype = np.uint8 if max(values, default=0) < 256 else np.uint16
    labels = np.zeros(stacked.shape[:3], dtype=dtype)
    for channel, value in enumerate(values):  # in segment order: later (inner) regions overwrite
        labels[stacked[..., channel] > 0] = value
    image = sitk.GetImageFromArray(labels)
    affine = np.asarray(volume.affine, dtype=float)
    steps = affine[:3, [2, 1, 0]]  # array axes (slice, row, column) -> ITK's index order (x, y, z)
    spacing = np.linalg.norm(steps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((steps / spacing).ravel().tolist())
    image.SetOrigin(affine[:3, 3].tolist())
    if reference_geometry is None:
        return image
    return _onto_grid(image, reference_geometry, path)


def read_dicom_seg_image(path: str | os.PathLike, reference: Image | None = None) -> Image:
    """:func:`read_dicom_seg` as an :class:`autoseg.io.Image` (what evaluation compares)."""
    return from_sitk(read_dicom_seg(path, reference))


def read_dicom_seg_pair(first: str | os.PathLike, second: str | os.PathLike) -> tuple[Image, Image]:
    """Two SEGs of one series (a prediction and a reference) on the one grid that holds both.

    Raises:
        DicomError: either is unreadable, or their voxels do not share a grid.
    """
    import SimpleITK as sitk

    a, b = read_dicom_seg(first), read_dicom_seg(second)
    corners = np.concatenate([_index_corners(a, a, Path(first)), _index_corners(b, a, Path(second))])
    low, high = corners.min(axis=0), corners.max(axis=0)
    grid = sitk.Image([int(n) for n in high - low + 1], a.GetPixelID())
    grid.SetSpacing(a.GetSpacing())
    grid.SetDirection(a.GetDirection())
    grid.SetOrigin(a.TransformIndexToPhysicalPoint([int(i) for i in low]))
    return from_sitk(_onto_grid(a, grid, Path(first))), from_sitk(_onto_grid(b, grid, Path(second)))


def read_label_pair(first: str | os.PathLike, second: str | os.PathLike) -> tuple[Image, Image]:
    """Two label maps to compare (a prediction and a reference), either or both a DICOM SEG: a SEG,
    which stores only the slices it marks, is read onto the other file's grid (or, both SEGs, onto
    the grid that holds both).

    Raises:
        DicomError / ImageReadError: a file that cannot be read, or SEG voxels off the other's grid.
    """
    first_seg, second_seg = is_dicom_seg(first), is_dicom_seg(second)
    if first_seg and second_seg:
        return read_dicom_seg_pair(first, second)
    if first_seg:
        other = read_image(second)
        return read_dicom_seg_image(first, other), other
    image = read_image(first)
    return image, read_dicom_seg_image(second, image) if second_seg else read_image(second)


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Segmentation: a file (``.dcm``, or any name that starts like DICOM)
    whose SOP class is Segmentation Storage (binary, fractional or label map)."""
    path = Path(path)
    if not path.is_file():
        return False
    if not path.name.lower().endswith(DICOM_SEG_ENDING):
        if not _has_dicom_magic(path):
            return False
    _, pydicom = dicom_libraries()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(getattr(header, "SOPClassUID", "")) in SEGMENTATION_STORAGE_UIDS


# --- helpers -----------------------------------------------------------------------------------------


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"  # after the DICOM file's 128-byte preamble


def _holds_series(folder: Path) -> bool:
    """Whether GDCM finds a series in ``folder``; asked only where a file starts like DICOM, since
    ITK prints a warning for every folder without one (every folder of NIfTI inputs)."""
    import SimpleITK as sitk

    if not any(entry.is_file() and _has_dicom_magic(entry) for entry in folder.iterdir()):
        return False
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def _segments(info: LabelInfo) -> list[tuple[str, LabelValue, dict[str, str]]]:
    """Per segment: its name, the label value (or region values) it marks, its recorded parameters."""
    if not info.is_regions:
        return [(name, value, {"label_value": str(value)}) for name, value in info.classes.items()]
    if info.regions_class_order is None:
        raise DicomError("labels with regions need regions_class_order (dataset.json) to be written as DICOM SEG")
    return [(name, values, {"label_value": str(painted), "region_values": " ".join(str(v) for v in values)})
            for (name, values), painted in zip(info.classes.items(), info.regions_class_order)]


def _segment_pixels(array: np.ndarray, values: list[LabelValue], overlapping: bool) -> np.ndarray:
    """highdicom's input: segment numbers in one map (labels), or one binary map per segment
    stacked last (regions, which overlap); the one map keeps memory at one volume however many
    labels there are."""
    if overlapping:
        return np.stack([label_mask(array, value) for value in values], axis=-1).astype(np.uint8)
    lookup = np.zeros(max(int(array.max(initial=0)), *values) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, start=1):
        lookup[value] = number
    return lookup[np.clip(array, 0, None)]  # undeclared and ignore values: no segment


def _segment_value(description: Any) -> int:
    algorithm = description.algorithm_identification
    parameters = algorithm.parameters if algorithm is not None else None
    if parameters and "label_value" in parameters:
        return int(parameters["label_value"])
    return int(description.segment_number)


def _check_fits(array: np.ndarray, label_map: sitk.Image | Image, datasets: Sequence[Any], path: Path) -> None:
    expected = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    if array.shape != expected:
        raise DicomError(f"{path}: label map of shape {array.shape} does not fit the source series "
                         f"({expected[0]} slices of {expected[1]}x{expected[2]})")
    origin = label_map.origin if isinstance(label_map, Image) else label_map.GetOrigin()
    first = getattr(datasets[0], "ImagePositionPatient", None)
    if first is not None and not np.allclose(origin, [float(p) for p in first], atol=1e-3):
        raise DicomError(f"{path}: label map origin {tuple(origin)} is not the source series' first slice "
                         f"{tuple(float(p) for p in first)}")


def _onto_grid(image: sitk.Image, reference: sitk.Image | Image, path: Path) -> sitk.Image:
    """``image`` copied voxel for voxel onto ``reference``'s grid, which must contain it exactly."""
    import SimpleITK as sitk

    if isinstance(reference, Image):
        reference = to_sitk(reference)
    _index_corners(image, reference, path)
    placed = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    kept = int(np.count_nonzero(sitk.GetArrayViewFromImage(placed)))
    if kept != int(np.count_nonzero(sitk.GetArrayViewFromImage(image))):
        raise DicomError(f"{path}: the segmentation reaches beyond the reference image's grid")
    return placed


def _index_corners(image: sitk.Image, reference: sitk.Image, path: Path) -> np.ndarray:
    """The corner voxels of ``image`` as integer indices of ``reference``, whose grid ``image``
    must share (same voxel centres, any axis order or sign)."""
    origin = np.asarray(image.GetOrigin())
    steps = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    # The first voxel and one step along each axis must land on reference voxel centres.
    for point in [origin] + [origin + steps[:, axis] for axis in range(3)]:
        index = np.asarray(reference.TransformPhysicalPointToContinuousIndex(point.tolist()))
        if np.abs(index - np.round(index)).max() > GRID_TOLERANCE:
            raise DicomError(f"{path}: the segmentation's voxels do not lie on the reference image's grid "
                             "(a different series or resampled image?)")
    size = np.asarray(image.GetSize()) - 1
    corners = [origin + steps @ (size * np.asarray(c)) for c in np.ndindex(2, 2, 2)]
    return np.round([reference.TransformPhysicalPointToContinuousIndex(c.tolist()) for c in corners]).astype(int)
