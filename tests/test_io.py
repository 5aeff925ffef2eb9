"""Tests of autoseg.io: every format keeps voxels and geometry through read -> write -> read."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.io import Image, ImageReadError, file_ending, read_image, write_image, write_like

SITK_3D = [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"]
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]

# Axis-aligned but not identity: x flipped, y and z swapped (ITK order, row-major).
SWAP_FLIP = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)
ORIGIN = (-120.3, 45.25, 10.7)
SPACING = (2.5, 0.7, 0.9)


def oblique(alpha: float = 0.3, beta: float = -0.2) -> tuple[float, ...]:
    """A rotation about z then x: every cosine entry is neither 0 nor 1."""
    ca, sa, cb, sb = math.cos(alpha), math.sin(alpha), math.cos(beta), math.sin(beta)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    return tuple((rz @ rx).ravel().tolist())


def random_array(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is None:
        return rng.normal(0.0, 100.0, size=shape).astype(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def assert_same(a: Image, b: Image) -> None:
    """Bit-exact equality of voxels, dtype and geometry."""
    assert a.array.dtype == b.array.dtype
    assert a.array.shape == b.array.shape
    assert np.array_equal(a.array, b.array, equal_nan=True)
    assert a.spacing == b.spacing
    assert a.origin == b.origin
    assert a.direction == b.direction


def round_trip(image: Image, folder: Path, ending: str) -> tuple[Image, Image]:
    """Write, read (first), write the read image, read again (second)."""
    write_image(image, folder / f"first{ending}")
    first = read_image(folder / f"first{ending}")
    write_image(first, folder / f"second{ending}")
    return first, read_image(folder / f"second{ending}")


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


# --- SimpleITK formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("ending", SITK_3D)
def test_sitk_formats_round_trip_exactly(tmp_path, ending, dtype):
    original = Image(random_array((5, 6, 7), dtype), SPACING, ORIGIN, SWAP_FLIP)
    first, second = round_trip(original, tmp_path, ending)
    # The first write already keeps voxels and dtype; NIfTI rounds the geometry to float32 once.
    assert first.array.dtype == original.array.dtype
    assert np.array_equal(first.array, original.array)
    assert first.direction == SWAP_FLIP
    np.testing.assert_allclose(first.spacing, SPACING, rtol=1e-7)
    np.testing.assert_allclose(first.origin, ORIGIN, rtol=1e-7)
    if ending not in (".nii", ".nii.gz"):
        assert_same(first, original)
    assert_same(second, first)
    assert no_temporary_files(tmp_path)


@pytest.mark.parametrize("ending, tolerance", [
    (".mha", 0.0), (".mhd", 0.0), (".nrrd", 1e-15), (".nhdr", 1e-15), (".nii", 1e-7), (".nii.gz", 1e-7),
])
def test_oblique_direction_round_trip(tmp_path, ending, tolerance):
    # MetaImage stores the cosines as decimal doubles: exact. NRRD stores spacing x direction and
    # splits them again on reading (one-ulp drift); NIfTI keeps a float32 matrix that ITK
    # re-orthonormalizes on every read (drift near float32 precision, ~1e-8). Both are far below
    # any geometry tolerance, but they are not bit-exact, so this test says how close they are.
    direction = oblique()
    original = Image(random_array((4, 5, 6), np.int16), SPACING, ORIGIN, direction)
    first, second = round_trip(original, tmp_path, ending)
    np.testing.assert_allclose(first.direction, direction, rtol=0, atol=max(tolerance, 1e-15))
    np.testing.assert_allclose(second.direction, first.direction, rtol=0, atol=max(tolerance, 1e-15))
    np.testing.assert_allclose(second.spacing, first.spacing, rtol=max(tolerance, 1e-15))
    assert second.origin == first.origin
    assert np.array_equal(second.array, original.array)
    if tolerance == 0.0:
        assert_same(first, original)
        assert_same(second, first)


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_sitk_2d_round_trip(tmp_path, ending):
    original = Image(random_array((6, 7), np.float32), (0.5, 0.25), (3.5, -7.25), (-1.0, 0.0, 0.0, 1.0))
    first, second = round_trip(original, tmp_path, ending)
    assert first.ndim == 2
    assert_same(first, original)
    assert_same(second, first)


def test_detached_headers_point_at_their_renamed_data(tmp_path):
    # Written under a temporary name and renamed: the header must name the final data file.
    image = Image(random_array((3, 4, 5), np.int16), SPACING, ORIGIN)
    write_image(image, tmp_path / "case_0000.mhd")
    assert "ElementDataFile = case_0000.raw" in (tmp_path / "case_0000.mhd").read_text()
    sub = tmp_path / "nrrd"
    write_image(image, sub / "case_0000.nhdr")
    assert sorted(p.name for p in sub.iterdir()) == ["case_0000.nhdr", "case_0000.raw"]
    assert "data file: case_0000.raw" in (sub / "case_0000.nhdr").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_0000.mhd", "case_0000.raw", "nrrd"]
    assert_same(read_image(tmp_path / "case_0000.mhd"), image)


def test_bool_arrays_are_written_as_uint8(tmp_path):
    mask = random_array((3, 4, 5), np.uint8) > 127
    write_image(Image(mask, SPACING), tmp_path / "mask.nii.gz")
    back = read_image(tmp_path / "mask.nii.gz")
    assert back.array.dtype == np.uint8
    assert np.array_equal(back.array, mask.astype(np.uint8))


# --- 2D natural images and TIFF --------------------------------------------------------------------


@pytest.mark.parametrize("ending, dtype, high", [
    (".png", np.uint8, 255), (".png", np.uint16, 65535), (".bmp", np.uint8, 255),
    (".tif", np.uint8, 255), (".tif", np.uint16, 65535), (".tif", np.int16, 1000), (".tif", np.float32, None),
])
def test_2d_formats_round_trip_exactly(tmp_path, ending, dtype, high):
    array = random_array((6, 7), dtype)
    if high is not None:  # keep the full range of the type in use, so nothing can be narrowed
        array.flat[0], array.flat[1] = 0, high
    spacing = (0.5, 0.25) if ending == ".tif" else (1.0, 1.0)  # PNG/BMP cannot store a spacing
    first, second = round_trip(Image(array, spacing), tmp_path, ending)
    assert_same(first, Image(array, spacing))
    assert_same(second, first)
    assert no_temporary_files(tmp_path)


def test_png_of_small_integers_is_stored_as_uint8(tmp_path):
    # PNG holds 8 or 16 bits; values that fit in 8 bits are stored in 8 (documented narrowing).
    array = np.arange(42, dtype=np.int32).reshape(6, 7)
    first, second = round_trip(Image(array, (1.0, 1.0)), tmp_path, ".png")
    assert first.array.dtype == np.uint8
    assert np.array_equal(first.array, array)
    assert_same(second, first)
    with pytest.raises(ValueError, match="PNG/BMP store integers 0..65535"):
        write_image(Image(array - 1, (1.0, 1.0)), tmp_path / "negative.png")
    with pytest.raises(ValueError, match="PNG/BMP hold 2D images"):
        write_image(Image(np.zeros((2, 3, 4), np.uint8), (1.0, 1.0, 1.0)), tmp_path / "stack.png")


@pytest.mark.parametrize("shape", [(5, 6, 7), (3, 6, 7)])
def test_tiff_stack_keeps_its_spacing_in_a_sidecar(tmp_path, shape):
    # (3, ...) is the shape tifffile could mistake for RGB planes; it must still read as a stack.
    array = random_array(shape, np.float32)
    first, second = round_trip(Image(array, (3.0, 0.5, 0.25)), tmp_path, ".tif")
    assert json.loads((tmp_path / "first.json").read_text()) == {"spacing": [3.0, 0.5, 0.25]}
    assert_same(first, Image(array, (3.0, 0.5, 0.25)))
    assert_same(second, first)
    (tmp_path / "first.json").unlink()
    assert read_image(tmp_path / "first.tif").spacing == (1.0, 1.0, 1.0)  # no sidecar: unit spacing


def test_tiff_with_unit_spacing_needs_no_sidecar(tmp_path):
    write_image(Image(random_array((3, 4, 5), np.int16), (1.0, 1.0, 1.0)), tmp_path / "a.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


@pytest.mark.parametrize("sidecar, words", [
    ("{not json", "spacing sidecar is not"),
    ('{"spacings": [1, 2, 3]}', "spacing sidecar is not"),
    ('{"spacing": [1, 2]}', "does not match the 3D image"),
])
def test_bad_tiff_sidecar_is_named(tmp_path, sidecar, words):
    write_image(Image(random_array((3, 4, 5), np.int16), (2.0, 1.0, 1.0)), tmp_path / "a.tif")
    (tmp_path / "a.json").write_text(sidecar)
    with pytest.raises(ImageReadError, match=words) as caught:
        read_image(tmp_path / "a.tif")
    assert caught.value.path == str(tmp_path / "a.json")


def test_colour_png(tmp_path):
    from skimage import io as skio

    grey = random_array((6, 7), np.uint8)
    skio.imsave(tmp_path / "grey_as_rgb.png", np.stack([grey] * 3, axis=-1), check_contrast=False)
    assert np.array_equal(read_image(tmp_path / "grey_as_rgb.png").array, grey)
    colour = np.stack([grey, grey // 2, grey // 3], axis=-1)
    skio.imsave(tmp_path / "colour.png", colour, check_contrast=False)
    with pytest.raises(ImageReadError, match="is a colour image of shape \\(6, 7, 3\\); save each colour") as caught:
        read_image(tmp_path / "colour.png")
    assert caught.value.path == str(tmp_path / "colour.png")


# --- DICOM -----------------------------------------------------------------------------------------


def write_dicom_series(folder: Path, array: np.ndarray, spacing_xyz, origin, series_uid: str) -> None:
    """One file per slice with the tags a series reader needs to sort and place the slices."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(array)
    volume.SetSpacing(spacing_xyz)
    volume.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        slice_ = volume[:, :, z]
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT image storage
            "0008|0018": f"{series_uid}.{z + 1}",
            "0008|0060": "CT",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{p:g}" for p in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{spacing_xyz[2]:g}",
            "0028|0030": f"{spacing_xyz[1]:g}\\{spacing_xyz[0]:g}",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_reads(tmp_path):
    array = (np.arange(4 * 6 * 7).reshape(4, 6, 7) * 3 - 100).astype(np.int16)
    write_dicom_series(tmp_path / "series", array, (0.8, 0.9, 2.5), (-50.0, 20.0, 7.5), "1.2.826.0.1.3680043.2.1125.1")
    image = read_image(tmp_path / "series")
    assert image.array.dtype == np.int16
    assert np.array_equal(image.array, array)
    np.testing.assert_allclose(image.spacing, (2.5, 0.9, 0.8))
    np.testing.assert_allclose(image.origin, (-50.0, 20.0, 7.5))
    assert image.direction == tuple(np.eye(3).ravel())

    # Two series in one folder cannot be told apart by a path; an empty folder holds none.
    write_dicom_series(tmp_path / "series", array[:2], (0.8, 0.9, 2.5), (0.0, 0.0, 0.0), "1.2.826.0.1.3680043.2.1125.2")
    with pytest.raises(ImageReadError, match="holds 2 DICOM series"):
        read_image(tmp_path / "series")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="folder without a DICOM series"):
        read_image(tmp_path / "empty")


# --- write_like and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".tif"])
def test_write_like_keeps_the_reference_geometry(tmp_path, ending):
    geometry = {} if ending == ".tif" else {"origin": ORIGIN, "direction": SWAP_FLIP}
    write_image(Image(random_array((4, 5, 6), np.float32), SPACING, **geometry), tmp_path / f"scan{ending}")
    reference = read_image(tmp_path / f"scan{ending}")
    prediction = (random_array((4, 5, 6), np.uint8) > 200).astype(np.uint8)
    write_like(prediction, reference, tmp_path / f"pred{ending}")
    back = read_image(tmp_path / f"pred{ending}")
    assert_same(back, Image(prediction, reference.spacing, reference.origin, reference.direction))
    with pytest.raises(ValueError, match="differs from the geometry's"):
        write_like(prediction[1:], reference, tmp_path / f"bad{ending}")


@pytest.mark.parametrize("name, words", [
    ("missing.nii.gz", "file does not exist"),
    ("scan.jpg", "unsupported file type '.jpg'"),
    ("empty.nii.gz", "cannot be read"),
    ("garbage.mha", "cannot be read"),
    ("noise.png", "cannot be read"),
])
def test_read_errors_name_the_file(tmp_path, name, words):
    if not name.startswith("missing"):
        (tmp_path / name).write_bytes(b"" if name.startswith("empty") else os.urandom(64))
    with pytest.raises(ImageReadError, match=words) as caught:
        read_image(tmp_path / name)
    assert caught.value.path == str(tmp_path / name)
    assert str(caught.value).startswith(f"{tmp_path / name}: ")
    assert "\n" not in str(caught.value)  # one line, not ITK's C++ context


def test_truncated_files_of_self_checking_formats_fail_clearly(tmp_path):
    # MetaImage and NRRD notice missing voxel bytes; NIfTI does not (see autoseg.validate).
    image = Image(random_array((4, 8, 8), np.float32), SPACING, ORIGIN)
    for ending in (".mha", ".nrrd"):
        write_image(image, tmp_path / f"a{ending}")
        data = (tmp_path / f"a{ending}").read_bytes()
        (tmp_path / f"a{ending}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError, match="is it truncated or corrupt"):
            read_image(tmp_path / f"a{ending}")


def test_unsupported_images_are_refused(tmp_path):
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "four_d.nii.gz"))
    with pytest.raises(ImageReadError, match="is 4D"):
        read_image(tmp_path / "four_d.nii.gz")
    vector = sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    with pytest.raises(ImageReadError, match="has 2 components per voxel"):
        read_image(tmp_path / "vector.mha")
    with pytest.raises(ValueError, match="unsupported file type '.jpg'"):
        write_image(Image(np.zeros((3, 4), np.uint8), (1.0, 1.0)), tmp_path / "x.jpg")
    assert not (tmp_path / "x.jpg").exists()


@pytest.mark.parametrize("name, ending", [
    ("a.nii.gz", ".nii.gz"), ("A.NII.GZ", ".nii.gz"), ("a.b.nii", ".nii"), ("a.tiff", ".tiff"),
    ("a.gz", ".gz"), ("a", ""),
])
def test_file_ending(name, ending):
    assert file_ending(name) == ending


def test_image_geometry_is_checked():
    image = Image(np.zeros((2, 3, 4)), [1, 2, 3])
    assert image.spacing == (1.0, 2.0, 3.0)
    assert image.origin == (0.0, 0.0, 0.0)
    assert image.direction == tuple(np.eye(3).ravel())
    with pytest.raises(ValueError, match="geometry does not match a 3D array"):
        Image(np.zeros((2, 3, 4)), (1.0, 1.0))
    with pytest.raises(ValueError, match="geometry does not match a 2D array"):
        Image(np.zeros((3, 4)), (1.0, 1.0), direction=tuple(np.eye(3).ravel()))
