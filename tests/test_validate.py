"""Tests of autoseg.validate: each kind of broken dataset is named, all at once, and nothing is written."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg.cluster import WORKER_START_ENV
from autoseg.io import Image, ImageReadError, read_image, write_image
from autoseg.nifti_bytes import NiftiByteCheck, check_nifti_bytes
from autoseg.validate import (
    DIRECTION_ATOL,
    ORIGIN_ATOL_MM,
    ORIGIN_SPACING_FRACTION,
    SPACING_RTOL,
    Problem,
    format_report,
    validate_dataset,
)

# --- helpers ------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            stat = path.stat()
            entries[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return entries


def validate_read_only(root: Path, **kwargs) -> list[Problem]:
    """Validate, asserting that the dataset folder is left exactly as it was."""
    before = snapshot(root)
    problems = validate_dataset(root, **kwargs)
    assert snapshot(root) == before
    return problems


def edit(path: Path, array: Callable[[np.ndarray], np.ndarray] | None = None, **geometry) -> None:
    """Rewrite an image with a changed array and/or geometry (spacing, origin, direction)."""
    image = read_image(path)
    new_array = image.array if array is None else array(image.array.copy())
    fields = {"spacing": image.spacing, "origin": image.origin, "direction": image.direction, **geometry}
    write_image(Image(new_array, **fields), path)


def edit_json(root: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((root / "dataset.json").read_text())
    change(data)
    (root / "dataset.json").write_text(json.dumps(data))


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rotation_z(angle: float) -> tuple[float, ...]:
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


IMG = "imagesTr/case_001_0000.nii.gz"
IMG1 = "imagesTr/case_001_0001.nii.gz"
LBL = "labelsTr/case_001.nii.gz"
JSON = "dataset.json"

# Tolerances of the default dataset: spacing (2.0, 0.75, 0.75), so the origin allows 1e-3 + 2e-4 mm.
ORIGIN_TOL = ORIGIN_ATOL_MM + ORIGIN_SPACING_FRACTION * 2.0


def set_2d_case(root: Path) -> None:
    """Replace case_001 by a 2D case (both channels and the label), keeping it internally valid."""
    for rel in (IMG, IMG1, LBL):
        image = read_image(root / rel)
        write_image(Image(image.array[1], image.spacing[1:]), root / rel)


# --- one broken thing -> exactly one problem, on the right file ---------------------------------------

# (breaker, file the problem names, words in the message, severity)
BROKEN = {
    "json missing": (lambda r: (r / JSON).unlink(), JSON, "dataset.json is missing", "error"),
    "json not json": (lambda r: (r / JSON).write_text("{labels: oops"), JSON, "not valid JSON", "error"),
    "json missing key": (lambda r: edit_json(r, lambda d: d.pop("numTraining")), JSON,
                         'missing key "numTraining"', "error"),
    "json mistyped labels": (lambda r: edit_json(r, lambda d: d["labels"].update(liver="one")), JSON,
                             "label 'liver' must be a non-negative integer", "error"),
    "json mistyped channels": (lambda r: edit_json(r, lambda d: d.update(channel_names=["MR0", "MR1"])), JSON,
                               '"channel_names" must be a non-empty object', "error"),
    "json regions without order": (lambda r: edit_json(r, lambda d: d["labels"].update(tumour=[1, 2])), JSON,
                                   '"regions_class_order" is missing', "error"),
    "file_ending mismatch": (lambda r: edit_json(r, lambda d: d.update(file_ending=".mha")), JSON,
                             "\"file_ending\" is '.mha' but no file", "error"),
    "numTraining mismatch": (lambda r: edit_json(r, lambda d: d.update(numTraining=5)), JSON,
                             '"numTraining" is 5 but', "error"),
    "missing channel": (lambda r: (r / IMG1).unlink(), "imagesTr/case_001",
                        "missing channel file(s) case_001_0001.nii.gz", "error"),
    "missing label": (lambda r: (r / LBL).unlink(), LBL, "label missing for case case_001", "error"),
    "orphan label": (lambda r: (r / "labelsTr/case_999.nii.gz").write_bytes((r / LBL).read_bytes()),
                     "labelsTr/case_999.nii.gz",
                     "orphan label", "error"),
    "misnamed image": (lambda r: (r / IMG).rename(r / "imagesTr/case_001_0.nii.gz"),
                       "imagesTr/case_001_0.nii.gz", "4-digit channel index", "error"),
    "extra channel": (lambda r: (r / IMG).rename(r / "imagesTr/case_001_0002.nii.gz"),
                      "imagesTr/case_001_0002.nii.gz", "declares 2 channel(s)", "error"),
    "foreign file": (lambda r: (r / "imagesTr/notes.txt").write_text("hi"), "imagesTr/notes.txt",
                     "does not end in the dataset's file_ending", "error"),
    "channel shape": (lambda r: edit(r / IMG1, array=lambda a: a[:, :, :7]), IMG1,
                      "channel shape (4, 8, 7) differs from case_001_0000.nii.gz's (4, 8, 8)", "error"),
    "channel spacing": (lambda r: edit(r / IMG1, spacing=(2.0, 0.75, 0.76)), IMG1,
                        "channel spacing (z, y, x) (2.0, 0.75, 0.76) mm differs", "error"),
    "channel origin": (lambda r: edit(r / IMG1, origin=(-10.0, 5.0, 2.5 + 5 * ORIGIN_TOL)), IMG1,
                       "channel origin (x, y, z)", "error"),
    "channel direction": (lambda r: edit(r / IMG1, direction=rotation_z(0.01)), IMG1,
                          "channel direction", "error"),
    "label shape": (lambda r: edit(r / LBL, array=lambda a: a[:3]), LBL,
                    "label shape (3, 8, 8) differs from case_001_0000.nii.gz's (4, 8, 8)", "error"),
    "label spacing": (lambda r: edit(r / LBL, spacing=(2.5, 0.75, 0.75)), LBL, "label spacing", "error"),
    "label origin": (lambda r: edit(r / LBL, origin=(0.0, 0.0, 0.0)), LBL, "label origin", "error"),
    "label direction": (lambda r: edit(r / LBL, direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)), LBL,
                        "label direction", "error"),
    "undeclared label values": (lambda r: edit(r / LBL, array=lambda a: np.where(a == 2, 7, a)), LBL,
                                "label values 7 are not declared in dataset.json", "error"),
    "negative label values": (lambda r: edit(r / LBL, array=lambda a: a.astype(np.int16) - 1), LBL,
                              "label values -1 are not declared", "error"),
    "non-integer labels": (lambda r: edit(r / LBL, array=lambda a: a.astype(np.float32) * 0.5), LBL,
                           "label has non-integer values (0.5)", "error"),
    "NaN intensity": (lambda r: edit(r / IMG, array=lambda a: np.where(a > 140, np.nan, a)), IMG,
                      "NaN and 0 infinite voxel value(s), which ITK reads as 0", "error"),
    "Inf intensity": (lambda r: edit(r / IMG, array=lambda a: np.where(a > 140, -np.inf, a)), IMG,
                      "0 NaN and", "error"),
    "constant image": (lambda r: edit(r / IMG1, array=lambda a: np.full_like(a, 3.0)), IMG1,
                       "every voxel has the same value 3.0", "error"),
    "2D and 3D mixed": (set_2d_case, "imagesTr", "mixes 2D and 3D cases: 1 2D (case_001); 2 3D", "error"),
    "truncated nii.gz": (lambda r: truncate(r / IMG, 0.7), IMG, "truncated", "error"),
    "truncated label": (lambda r: truncate(r / LBL, 0.7), LBL, "truncated", "error"),
    "garbage file": (lambda r: (r / IMG).write_bytes(b"\x00" * 40), IMG, "cannot be read", "error"),
    "test image misnamed": (lambda r: (r / "imagesTs/test_000_0001.nii.gz").rename(r / "imagesTs/test_000.nii.gz"),
                            "imagesTs/test_000.nii.gz", "4-digit channel index", "warning"),
    "test case incomplete": (lambda r: (r / "imagesTs/test_000_0001.nii.gz").unlink(), "imagesTs/test_000",
                             "missing channel", "warning"),
}


# Renaming a channel file also leaves its case without that channel: a second, expected problem.
RENAMES_A_CHANNEL = {"misnamed image", "extra channel", "test image misnamed"}


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_thing_is_named_once(make_dataset, name):
    breaker, rel_path, words, severity = BROKEN[name]
    root = make_dataset(num_test_cases=1)
    breaker(root)
    problems = validate_read_only(root)
    relevant = [p for p in problems if p.path == str(root / rel_path)]
    assert len(relevant) == 1, f"expected one problem on {rel_path}: {problems}"
    assert words in relevant[0].message
    assert relevant[0].severity == severity
    assert all("Traceback" not in p.message for p in problems)
    others = [p for p in problems if p not in relevant]
    if name in RENAMES_A_CHANNEL:
        assert len(others) == 1 and "missing channel" in others[0].message, others
        assert others[0].severity == severity
    else:
        assert others == []


def test_valid_dataset_has_no_problems(make_dataset):
    root = make_dataset(num_cases=3, num_channels=2, num_test_cases=2)
    assert validate_read_only(root) == []


@pytest.mark.parametrize("ending, shape", [
    (".nii", (4, 8, 8)), (".mha", (4, 8, 8)), (".mhd", (4, 8, 8)), (".nrrd", (4, 8, 8)),
    (".nhdr", (4, 8, 8)), (".tif", (4, 8, 8)), (".png", (8, 8)), (".nii.gz", (8, 8)),
])
def test_valid_dataset_in_other_formats(make_dataset, ending, shape):
    # .mhd/.nhdr keep voxels in a .raw file and a .tif stack its spacing in a .json sidecar:
    # those companions are part of the image, not misnamed files.
    root = make_dataset(ending=ending, shape=shape, num_cases=2, num_test_cases=1)
    assert validate_read_only(root) == []


@pytest.mark.parametrize("what, kwargs", [
    ("spacing", {"spacing": (2.0, 0.75, 0.75 * (1 + SPACING_RTOL / 2))}),
    ("origin", {"origin": (-10.0 + ORIGIN_TOL / 2, 5.0, 2.5)}),
    ("direction", {"direction": rotation_z(DIRECTION_ATOL / 4)}),
])
def test_geometry_within_tolerance_is_accepted(make_dataset, what, kwargs):
    root = make_dataset()
    edit(root / IMG1, **kwargs)
    edit(root / LBL, **kwargs)
    # The change really made it to disk (NIfTI stores geometry in float32).
    assert getattr(read_image(root / IMG1), what) != getattr(read_image(root / IMG), what)
    assert validate_read_only(root) == []


def test_float_labels_with_whole_values_are_accepted(make_dataset):
    root = make_dataset()
    edit(root / LBL, array=lambda a: a.astype(np.float32))
    assert read_image(root / LBL).array.dtype == np.float32
    assert validate_read_only(root) == []


def test_region_labels_declare_their_values(make_dataset):
    labels = {"background": 0, "whole": [1, 2], "core": 2}
    root = make_dataset(labels=labels, regions_class_order=[1, 2])
    assert validate_read_only(root) == []
    edit(root / LBL, array=lambda a: np.where(a == 2, 3, a))
    assert [str(p) for p in validate_read_only(root)] == [
        f"{root / LBL}: label values 3 are not declared in dataset.json \"labels\" (declared: 0, 1, 2); "
        "training would fail on them (in nnU-Net: a 'CUDA device-side assert')"
    ]


def test_ignore_label_counts_as_declared(make_dataset):
    root = make_dataset(labels={"background": 0, "liver": 1, "tumour": 2, "ignore": 9})
    edit(root / LBL, array=lambda a: np.where(a == 0, 9, a))
    assert validate_read_only(root) == []


def test_every_problem_is_reported_together(make_dataset):
    root = make_dataset(num_cases=4)
    edit_json(root, lambda d: d.update(numTraining=9))
    (root / "labelsTr/case_000.nii.gz").unlink()
    edit(root / "imagesTr/case_001_0001.nii.gz", spacing=(3.0, 0.75, 0.75))
    edit(root / "labelsTr/case_002.nii.gz", array=lambda a: a + 4)
    truncate(root / "imagesTr/case_003_0000.nii.gz")
    problems = validate_read_only(root, progress=True)
    assert [(Path(p.path).relative_to(root).as_posix(), p.severity) for p in problems] == [
        ("dataset.json", "error"),
        ("labelsTr/case_000.nii.gz", "error"),
        ("imagesTr/case_001_0001.nii.gz", "error"),
        ("labelsTr/case_002.nii.gz", "error"),
        ("imagesTr/case_003_0000.nii.gz", "error"),
    ]
    assert "label values 4, 5, 6 are not declared" in problems[3].message


def test_broken_dataset_json_does_not_hide_file_problems(make_dataset):
    root = make_dataset()
    edit_json(root, lambda d: d.update(numTraining="three", channel_names={"0": "MR0", "1": ""}))
    edit(root / LBL, array=lambda a: a * 3)
    problems = validate_read_only(root)
    assert [Path(p.path).name for p in problems] == ["dataset.json", "dataset.json", "case_001.nii.gz"]
    assert "label values 3, 6 are not declared" in problems[2].message


def test_wrong_file_ending_still_checks_the_files(make_dataset):
    root = make_dataset()
    edit_json(root, lambda d: d.update(file_ending=".nrrd"))
    edit(root / IMG, array=lambda a: np.zeros_like(a))
    problems = validate_read_only(root)
    assert [p.path for p in problems] == [str(root / JSON), str(root / IMG)]
    assert "checked as '.nii.gz'" in problems[0].message
    assert "same value 0.0" in problems[1].message


def test_missing_folders_and_empty_dataset(tmp_path, make_dataset):
    assert validate_dataset(tmp_path / "nope") == [Problem(str(tmp_path / "nope"), "dataset folder does not exist")]
    root = make_dataset(num_cases=1)
    for rel in ("imagesTr/case_000_0000.nii.gz", "imagesTr/case_000_0001.nii.gz", "labelsTr/case_000.nii.gz"):
        (root / rel).unlink()
    assert [str(p) for p in validate_read_only(root)] == [
        f"{root / 'imagesTr'}: no training cases found (files named CASE_0000.nii.gz)"]
    (root / "labelsTr").rmdir()
    (root / "imagesTr").rmdir()
    assert [str(p) for p in validate_read_only(root)] == [
        f"{root / 'imagesTr'}: folder is missing", f"{root / 'labelsTr'}: folder is missing"]


def test_hidden_files_are_ignored(make_dataset):
    # An interrupted atomic write leaves a dot-file behind; it is not part of the dataset.
    root = make_dataset()
    (root / "imagesTr/.tmp_case_000_0000.nii.gz").write_bytes(b"partial")
    assert validate_read_only(root) == []


def test_parallel_gives_the_same_problems_in_case_order(make_dataset, monkeypatch):
    monkeypatch.setenv(WORKER_START_ENV, "0")  # worker processes even for these tiny cases
    root = make_dataset(num_cases=4)
    for i in (3, 0, 2):
        edit(root / f"imagesTr/case_{i:03d}_0000.nii.gz", array=lambda a: np.ones_like(a))
    serial = validate_read_only(root)
    assert [Path(p.path).name for p in serial] == [f"case_{i:03d}_0000.nii.gz" for i in (0, 2, 3)]
    assert validate_read_only(root, n_jobs=2) == serial
    with pytest.raises(ValueError, match="n_jobs"):
        validate_dataset(root, n_jobs=0)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_nifti_byte_check_finds_truncation_itk_hides(tmp_path, dtype):
    image = Image(np.arange(6 * 7 * 8).reshape(6, 7, 8).astype(dtype), (1.0, 1.0, 1.0))
    for name in ("a.nii", "a.nii.gz"):
        write_image(image, tmp_path / name)
        assert check_nifti_bytes(tmp_path / name) == NiftiByteCheck(False, ())
    full = (tmp_path / "a.nii").read_bytes()
    assert len(full) == 352 + image.array.nbytes  # header + vox_offset padding + voxels
    (tmp_path / "cut.nii").write_bytes(full[:-10])
    assert check_nifti_bytes(tmp_path / "cut.nii") == NiftiByteCheck(True, (
        f"truncated: {len(full) - 10} bytes where the header promises {len(full)} "
        "(ITK would fill the missing voxels with zeros)",))
    # ITK alone would read the truncated file without an error; read_image refuses it.
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "cut.nii")

    # A valid stream in two gzip members has a misleading trailer; counting the bytes accepts it.
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(full[:500]) + gzip.compress(full[500:]))
    assert np.array_equal(read_image(tmp_path / "two.nii.gz").array, image.array)
    assert check_nifti_bytes(tmp_path / "two.nii.gz") == NiftiByteCheck(False, ())
    gz = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gz[:-20])
    check = check_nifti_bytes(tmp_path / "cut.nii.gz")
    assert check.truncated and "the file is truncated" in check.problems[0]


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
def test_nifti_byte_check_counts_nan_and_inf_itk_reads_as_zero(tmp_path, name):
    array = np.ones((3, 5, 4), dtype=np.float32)
    array[0, 0, :3] = np.nan
    array[2, 4, 3] = np.inf
    array[1, 2, 0] = -np.inf
    write_image(Image(array, (1.0, 1.0, 1.0)), tmp_path / name)
    assert np.count_nonzero(read_image(tmp_path / name).array == 0) == 5  # what ITK makes of them
    assert check_nifti_bytes(tmp_path / name) == NiftiByteCheck(False, (
        "3 NaN and 2 infinite voxel value(s), which ITK reads as 0; replace them with finite numbers",))


def test_nan_in_formats_that_keep_it(make_dataset):
    root = make_dataset(ending=".mha", num_cases=2)
    path = root / "imagesTr/case_001_0000.mha"
    edit(path, array=lambda a: np.where(a > 140, np.nan, a))
    n_nan = int(np.isnan(read_image(path).array).sum())
    assert n_nan > 0
    assert [str(p) for p in validate_read_only(root)] == [
        f"{path}: {n_nan} NaN and 0 infinite intensity value(s); replace them with finite numbers"]


def test_problem_text_and_report_format():
    problems = [
        Problem("data/dataset.json", '"numTraining" is 5 but data/imagesTr holds 3 case(s)'),
        Problem("data/imagesTr/a_0000.nii.gz", "every voxel has the same value 0.0"),
        Problem("data/imagesTs/b.nii.gz", "name must be CASE_XXXX.nii.gz", "warning"),
        Problem("data/imagesTr/a_0000.nii.gz", "1 NaN and 0 infinite intensity value(s)"),
    ]
    assert str(problems[1]) == "data/imagesTr/a_0000.nii.gz: every voxel has the same value 0.0"
    assert format_report(problems) == "\n".join([
        "3 errors, 1 warning in 3 files",
        "",
        "data/dataset.json",
        '  error: "numTraining" is 5 but data/imagesTr holds 3 case(s)',
        "",
        "data/imagesTr/a_0000.nii.gz",
        "  error: every voxel has the same value 0.0",
        "  error: 1 NaN and 0 infinite intensity value(s)",
        "",
        "data/imagesTs/b.nii.gz",
        "  warning: name must be CASE_XXXX.nii.gz",
    ])
    assert format_report([]).startswith("No problems found")
    with pytest.raises(AttributeError):
        problems[0].message = "changed"  # frozen
