"""Reading and writing medical images, with their geometry.

One interface for every format autoseg accepts:

* SimpleITK: ``.nii.gz .nii .mha .mhd .nrrd .nhdr`` files and DICOM series folders;
* 2D natural images: ``.png .bmp`` through scikit-image, ``.tif .tiff`` through tifffile
  (a ``.tif`` may hold a 3D stack; its spacing comes from an optional ``<name>.json`` sidecar
  ``{"spacing": [...]}`` in array-axis order, as nnU-Net's Tiff3DIO does).

Axis convention (used everywhere in autoseg):

* ``Image.array`` is indexed ``[z, y, x]`` for 3D and ``[y, x]`` for 2D: the order SimpleITK's
  ``GetArrayFromImage`` returns, which is the reverse of ITK's physical ``(x, y, z)``.
* ``Image.spacing`` is in the **array's axis order**, in millimetres, so ``spacing[i]`` is the
  size of one step along ``array.shape[i]``.
* ``Image.origin`` and ``Image.direction`` are kept exactly as ITK stores them (physical ``x, y, z``
  order; the direction is the row-major flattened cosine matrix). They are only needed to put
  results back where they came from, so they stay in the file's own convention.

Writing a prediction with :func:`write_like` copies the geometry and format of its source image.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.atomic import TMP_MARK, atomic_write, current_umask
from autoseg.errors import AutosegError
from autoseg.nifti_bytes import nifti_truncation

SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
NATURAL_2D_ENDINGS = (".png", ".bmp")
TIFF_ENDINGS = (".tif", ".tiff")
SUPPORTED_ENDINGS = SITK_ENDINGS + NATURAL_2D_ENDINGS + TIFF_ENDINGS


class ImageReadError(AutosegError):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Image:
    """A spatial array and the geometry that places it in the patient.

    Attributes:
        array: voxel values, axes ``(z, y, x)`` or ``(y, x)``.
        spacing: voxel size in mm, in the array's axis order.
        origin: physical position of the first voxel, ITK order ``(x, y, z)``.
        direction: flattened row-major direction cosines, ITK order.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...] = field(default=())
    direction: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        ndim = self.array.ndim
        self.spacing = tuple(float(s) for s in self.spacing)
        if not self.origin:
            self.origin = (0.0,) * ndim
        if not self.direction:
            self.direction = tuple(np.eye(ndim).ravel().tolist())
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in self.direction)
        if len(self.spacing) != ndim or len(self.origin) != ndim or len(self.direction) != ndim * ndim:
            raise ValueError(
                f"geometry does not match a {ndim}D array: spacing {self.spacing}, origin {self.origin}, "
                f"direction of length {len(self.direction)}"
            )

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def with_array(self, array: np.ndarray) -> Image:
        """The same geometry around another array of the same spatial shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from the geometry's {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction)


def file_ending(path: str | os.PathLike) -> str:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), or its plain suffix."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def read_image(path: str | os.PathLike) -> Image:
    """Read one image (or a DICOM series folder) with its geometry.

    Raises:
        ImageReadError: the file is missing, truncated, of an unsupported kind or unreadable.
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist")
    ending = file_ending(path)
    try:
        if ending in SITK_ENDINGS:
            return _read_sitk(path)
        if ending in NATURAL_2D_ENDINGS:
            return _read_natural_2d(path)
        if ending in TIFF_ENDINGS:
            return _read_tiff(path)
    except ImageReadError:
        raise
    except Exception as error:  # every reader fails differently; one clear message for all
        raise ImageReadError(path, f"cannot be read ({_short(error)}); is it truncated or corrupt?") from error
    raise ImageReadError(path, f"unsupported file type {ending!r}; supported: {' '.join(SUPPORTED_ENDINGS)}")


def write_image(image: Image, path: str | os.PathLike) -> None:
    """Write ``image`` to ``path``, format from the ending: to a temporary name, verified, then renamed.

    The written file's header is read back before it is published: SimpleITK's NIfTI writer does
    not report a full disk, and a truncated file would otherwise be taken for a finished one.

    Raises:
        WriteError: the disk is full or the folder is not writable (names ``path``).
    """
    path = Path(path)
    ending = file_ending(path)
    if ending not in SUPPORTED_ENDINGS:
        raise ValueError(f"{path}: unsupported file type {ending!r}; supported: {' '.join(SUPPORTED_ENDINGS)}")

    def write(tmp: Path) -> None:
        if ending in SITK_ENDINGS:
            _write_sitk(image, tmp)
        elif ending in NATURAL_2D_ENDINGS:
            _write_natural_2d(image, tmp)
        else:
            _write_tiff(image, tmp, path)

    def check(tmp: Path) -> str | None:
        problem = _written_problem(tmp, ending, image.array.shape)
        if problem is None and ending in (".mhd", ".nhdr"):
            _rename_detached(tmp, path, ending)  # publishes the data file; the header goes last
        return problem

    try:
        atomic_write(path, write, check=check)
    finally:
        for leftover in path.parent.glob(f".{path.name}.*{TMP_MARK}.*"):
            leftover.unlink(missing_ok=True)  # a detached data file (.raw) of a failed write


def _written_problem(tmp: Path, ending: str, shape: tuple[int, ...]) -> str | None:
    """Why a just-written image file is not a complete image of ``shape``, or None."""
    if ending in (".nii", ".nii.gz"):
        return nifti_truncation(tmp)
    if ending in SITK_ENDINGS:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(tmp))
        try:
            reader.ReadImageInformation()
        except Exception as error:
            return f"the written header cannot be read back ({_short(error)})"
        if tuple(reversed(reader.GetSize())) != tuple(shape):
            return f"the written header says size {reader.GetSize()}, expected {tuple(reversed(shape))}"
        return None
    try:  # PNG, BMP, TIFF: small 2D files, read back whole
        array = _read_natural_2d(tmp).array if ending in NATURAL_2D_ENDINGS else _read_tiff(tmp).array
    except Exception as error:
        return f"the written file cannot be read back ({_short(error)})"
    return None if array.shape == tuple(shape) else f"the written file has shape {array.shape}, expected {shape}"


def write_like(array: np.ndarray, reference: Image, path: str | os.PathLike) -> None:
    """Write ``array`` with the geometry of ``reference`` (e.g. a prediction over its source scan)."""
    write_image(reference.with_array(array), path)


# --- SimpleITK -------------------------------------------------------------------------------------


def _read_sitk(path: Path) -> Image:
    import SimpleITK as sitk

    if path.name.lower().endswith((".nii", ".nii.gz")):
        # ITK fills the missing voxels of a truncated NIfTI with zeros instead of failing.
        problem = nifti_truncation(path)
        if problem:
            raise ImageReadError(path, f"{problem}; the file is incomplete, copy or export it again")
    itk = sitk.ReadImage(str(path))
    return from_sitk(itk, path)


def from_sitk(itk, path: str | os.PathLike = "SimpleITK image") -> Image:
    """A ``SimpleITK.Image`` as an :class:`Image` (array axes ``(z, y, x)``, spacing in that order).

    ``path`` names the source in the error for a vector or 4D image (:class:`ImageReadError`).
    """
    import SimpleITK as sitk

    path = Path(path)
    if itk.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(path, f"has {itk.GetNumberOfComponentsPerPixel()} components per voxel; "
                                   "autoseg expects one file per channel")
    if itk.GetDimension() not in (2, 3):
        raise ImageReadError(path, f"is {itk.GetDimension()}D; autoseg reads 2D and 3D images "
                                   "(split 4D files with `autoseg convert`)")
    array = sitk.GetArrayFromImage(itk)
    return Image(array, tuple(reversed(itk.GetSpacing())), itk.GetOrigin(), itk.GetDirection())


def to_sitk(image: Image):
    """An :class:`Image` as a ``SimpleITK.Image`` with the same geometry (booleans as uint8)."""
    import SimpleITK as sitk

    array = image.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    itk = sitk.GetImageFromArray(array)
    itk.SetSpacing(tuple(reversed(image.spacing)))
    itk.SetOrigin(image.origin)
    itk.SetDirection(image.direction)
    return itk


def _write_sitk(image: Image, path: Path) -> None:
    import SimpleITK as sitk

    compress = path.name.endswith(".gz") or path.suffix in (".mha", ".nrrd")
    sitk.WriteImage(to_sitk(image), str(path), useCompression=compress)


def _rename_detached(tmp: Path, path: Path, ending: str) -> None:
    """Publish the data file of a header + data pair (.mhd/.raw, .nhdr/.raw.gz) under its final name
    and point the (still temporary) header at it; the caller publishes the header."""
    header = tmp.read_text(errors="replace")
    data_files = [p for p in tmp.parent.glob(tmp.name[: -len(ending)] + ".*") if p != tmp]
    for data in data_files:
        final_data = path.parent / (path.name[: -len(ending)] + data.name[len(tmp.name) - len(ending):])
        header = header.replace(data.name, final_data.name)
        os.chmod(data, 0o666 & ~current_umask())
        os.replace(data, final_data)
    tmp.write_text(header)


def _read_dicom_series(folder: Path) -> Image:
    import SimpleITK as sitk

    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except Exception as error:
        raise ImageReadError(folder, f"cannot list DICOM series ({_short(error)})") from error
    if not series:
        raise ImageReadError(folder, "is a folder without a DICOM series")
    if len(series) > 1:
        raise ImageReadError(folder, f"holds {len(series)} DICOM series; put each series in its own folder")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return from_sitk(reader.Execute(), folder)
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(folder, f"DICOM series cannot be read ({_short(error)})") from error


# --- 2D natural images and TIFF --------------------------------------------------------------------


def _read_natural_2d(path: Path) -> Image:
    from skimage import io as skio

    array = np.asarray(skio.imread(str(path)))
    if array.ndim == 3:
        # Colour images whose channels are all equal are grey images saved as RGB(A); keep one.
        colour = array[..., :3]
        if np.all(colour == colour[..., :1]):
            array = colour[..., 0]
        else:
            raise ImageReadError(path, f"is a colour image of shape {array.shape}; save each colour "
                                       "channel as its own grey file (CASE_0000, CASE_0001, ...)")
    if array.ndim != 2:
        raise ImageReadError(path, f"has shape {array.shape}; expected a 2D grey image")
    return Image(array, (1.0, 1.0))


def _write_natural_2d(image: Image, path: Path) -> None:
    from skimage import io as skio

    if image.ndim != 2:
        raise ValueError(f"{path}: PNG/BMP hold 2D images, got shape {image.array.shape}")
    array = image.array
    if array.dtype == np.bool_ or (np.issubdtype(array.dtype, np.integer) and array.min() >= 0
                                   and array.max() <= 255):
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)
    else:
        raise ValueError(f"{path}: PNG/BMP store integers 0..65535; got {array.dtype} "
                         f"in [{array.min()}, {array.max()}]")
    skio.imsave(str(path), array, check_contrast=False)


def _tiff_sidecar(path: Path) -> Path:
    return path.with_name(path.name[: -len(file_ending(path))] + ".json")


def _read_tiff(path: Path) -> Image:
    import tifffile

    array = np.asarray(tifffile.imread(str(path)))
    if array.ndim not in (2, 3):
        raise ImageReadError(path, f"has shape {array.shape}; expected a 2D image or a 3D stack")
    spacing: tuple[float, ...] = (1.0,) * array.ndim
    sidecar = _tiff_sidecar(path)
    if sidecar.is_file():
        try:
            spacing = tuple(float(s) for s in json.loads(sidecar.read_text())["spacing"])
        except (ValueError, KeyError, TypeError) as error:
            raise ImageReadError(sidecar, f"spacing sidecar is not {{\"spacing\": [...]}} ({_short(error)})") from None
        if len(spacing) != array.ndim:
            raise ImageReadError(sidecar, f"spacing {spacing} does not match the {array.ndim}D image")
    return Image(array, spacing)


def _write_tiff(image: Image, tmp: Path, final: Path) -> None:
    import tifffile

    # minisblack: a stack of 3 or 4 slices must not be taken for RGB(A) planes.
    tifffile.imwrite(str(tmp), image.array, photometric="minisblack")
    if any(s != 1.0 for s in image.spacing):
        sidecar = _tiff_sidecar(final)
        atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps({"spacing": list(image.spacing)})))


def _short(error: BaseException) -> str:
    """The first meaningful line of an exception (ITK errors are many lines of C++ context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # SimpleITK puts the C++ location first and the reason on a later "sitk::ERROR:" line.
    lines = [re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", line) for line in lines
             if not line.startswith("Exception thrown in SimpleITK")] or lines
    text = lines[-1] if lines else type(error).__name__
    return text[:300]
