"""Tests of autoseg.convert: a miniature fake source tree per layout family, converted and checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile

from autoseg.convert import ConversionError, convert_msd, convert_with_spec, find_case_dirs, split_channels
from autoseg.dataset import load_case, load_dataset_json, training_cases
from autoseg.io import Image, read_image

RNG = np.random.default_rng(0)
SPACING_XYZ = (0.8, 0.7, 2.5)
ORIGIN_XYZ = (-12.5, 30.0, 7.25)
# A quarter turn about z: not symmetric, so a transposed or wrongly cut direction matrix shows.
DIRECTION_3 = (0.0, -1.0, 0.0,
               1.0, 0.0, 0.0,
               0.0, 0.0, 1.0)


def write_nifti(path: Path, array: np.ndarray, spacing=SPACING_XYZ, origin=ORIGIN_XYZ,
                direction=DIRECTION_3) -> Path:
    """Write a 3D array (z, y, x) or a 4D (c, z, y, x) array as one 4D NIfTI, channels last in ITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    itk = sitk.GetImageFromArray(array, isVector=False)  # 4D stays 4D, not 3D with vector voxels
    if array.ndim == 4:
        itk.SetSpacing((*spacing, 1.0))
        itk.SetOrigin((*origin, 0.0))
        d = np.eye(4)
        d[:3, :3] = np.reshape(direction, (3, 3))
        itk.SetDirection(tuple(d.ravel()))
    else:
        itk.SetSpacing(spacing)
        itk.SetOrigin(origin)
        itk.SetDirection(direction)
    sitk.WriteImage(itk, str(path))
    return path


def volume(shape=(6, 8, 8), offset=0.0) -> np.ndarray:
    return (RNG.normal(100.0, 20.0, size=shape) + offset).astype(np.float32)


def label_map(shape=(6, 8, 8), values=(0, 1, 2)) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    flat = label.reshape(-1)
    for i, value in enumerate(values):  # every value present, at known places
        flat[i * 5: i * 5 + 5] = value
    return label


def assert_usable(dst: Path, num_training: int) -> list:
    """The converted folder loads as a raw dataset and, where autoseg.validate exists, validates."""
    cases = training_cases(dst)
    assert len(cases) == num_training
    try:
        from autoseg.validate import validate_dataset
    except ImportError:
        return cases
    errors = [p for p in validate_dataset(dst) if getattr(p, "severity", "error") == "error"]
    assert errors == [], [str(p) for p in errors]
    return cases


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# --- Medical Segmentation Decathlon ------------------------------------------------------------------


def make_msd_task(root: Path, name="Task05_Prostate", channels=("T2", "ADC"), cases=("prostate_00", "prostate_01"),
                  test=("prostate_03",)) -> dict:
    """A Decathlon task folder: 4D images (channels last) or 3D ones, float labels, macOS junk."""
    task = root / name
    arrays = {}
    for case in (*cases, *test):
        shape = (6, 8, 8)
        # Channel c holds values around 1000 * c, so a swapped or shifted channel order shows.
        stack = np.stack([volume(shape, 1000.0 * c) for c in range(len(channels))])
        data = stack if len(channels) > 1 else stack[0]
        folder = "imagesTs" if case in test else "imagesTr"
        write_nifti(task / folder / f"{case}.nii.gz", data)
        arrays[case] = stack
        if case not in test:
            # Decathlon labels are often stored as float64.
            write_nifti(task / "labelsTr" / f"{case}.nii.gz", label_map(shape).astype(np.float64))
    # The archive carries macOS resource forks next to every file; they are not images.
    (task / "imagesTr" / f"._{cases[0]}.nii.gz").write_bytes(b"\x00\x05\x16\x07 not an image")
    (task / "labelsTr" / f"._{cases[0]}.nii.gz").write_bytes(b"\x00\x05\x16\x07 not an image")
    msd = {
        "name": name.split("_", 1)[1],
        "description": "fake task",
        "reference": "a reference",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0 04/05/2018",
        "tensorImageSize": "4D" if len(channels) > 1 else "3D",
        "modality": {str(i): c for i, c in enumerate(channels)},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": len(cases),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }
    (task / "dataset.json").write_text(json.dumps(msd))
    return arrays


def test_msd_4d_channels_are_split_with_geometry_and_order(tmp_path):
    arrays = make_msd_task(tmp_path / "src")
    dst = convert_msd(tmp_path / "src" / "Task05_Prostate", tmp_path / "out")
    assert dst == tmp_path / "out"

    assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == [
        "prostate_00_0000.nii.gz", "prostate_00_0001.nii.gz", "prostate_01_0000.nii.gz", "prostate_01_0001.nii.gz"]
    assert sorted(p.name for p in (dst / "labelsTr").iterdir()) == ["prostate_00.nii.gz", "prostate_01.nii.gz"]
    assert sorted(p.name for p in (dst / "imagesTs").iterdir()) == ["prostate_03_0000.nii.gz",
                                                                     "prostate_03_0001.nii.gz"]
    for case, stack in arrays.items():
        folder = "imagesTs" if case == "prostate_03" else "imagesTr"
        for channel in range(2):
            image = read_image(dst / folder / f"{case}_{channel:04d}.nii.gz")
            np.testing.assert_array_equal(image.array, stack[channel])
            assert image.spacing == pytest.approx(tuple(reversed(SPACING_XYZ)))
            assert image.origin == pytest.approx(ORIGIN_XYZ)
            assert image.direction == pytest.approx(DIRECTION_3)
    label = read_image(dst / "labelsTr" / "prostate_00.nii.gz")
    assert label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, label_map())
    assert label.direction == pytest.approx(DIRECTION_3)

    data = json.loads((dst / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "T2", "1": "ADC"}
    assert data["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    assert data["numTraining"] == 2 and data["file_ending"] == ".nii.gz"
    assert data["licence"] == "CC-BY-SA 4.0" and data["name"] == "Prostate"
    assert "training" not in data and "modality" not in data
    cases = assert_usable(dst, 2)
    loaded = load_case(cases[0])
    assert loaded.image.shape == (2, 6, 8, 8)
    np.testing.assert_array_equal(loaded.image[1], arrays["prostate_00"][1])


def test_msd_3d_images_are_copied_byte_for_byte(tmp_path):
    make_msd_task(tmp_path / "src", "Task04_Hippocampus", channels=("MRI",), cases=("hippocampus_001",), test=())
    task = tmp_path / "src" / "Task04_Hippocampus"
    dst = convert_msd(task, tmp_path / "out")
    copied = dst / "imagesTr" / "hippocampus_001_0000.nii.gz"
    assert copied.read_bytes() == (task / "imagesTr" / "hippocampus_001.nii.gz").read_bytes()
    assert not (dst / "imagesTs").exists()
    assert_usable(dst, 1)


def test_msd_rerun_skips_finished_cases_and_completes_missing_ones(tmp_path):
    make_msd_task(tmp_path / "src")
    task = tmp_path / "src" / "Task05_Prostate"
    dst = convert_msd(task, tmp_path / "out")
    before = mtimes(dst)
    convert_msd(task, dst)
    after = mtimes(dst)
    assert {k: v for k, v in after.items() if k != "dataset.json"} == \
        {k: v for k, v in before.items() if k != "dataset.json"}

    (dst / "labelsTr" / "prostate_01.nii.gz").unlink()  # as if interrupted before the label was written
    convert_msd(task, dst)
    again = mtimes(dst)
    assert set(again) == set(before)
    assert again["imagesTr/prostate_00_0000.nii.gz"] == before["imagesTr/prostate_00_0000.nii.gz"]
    assert again["labelsTr/prostate_01.nii.gz"] != before["labelsTr/prostate_01.nii.gz"]
    assert_usable(dst, 2)


def test_unfinished_rerun_leaves_no_dataset_json(tmp_path):
    make_msd_task(tmp_path / "src")
    task = tmp_path / "src" / "Task05_Prostate"
    dst = convert_msd(task, tmp_path / "out")
    (dst / "imagesTr" / "prostate_01_0001.nii.gz").unlink()
    (task / "labelsTr" / "prostate_01.nii.gz").write_bytes(b"broken")
    with pytest.raises(ConversionError, match="labelsTr/prostate_01.nii.gz"):
        convert_msd(task, dst)
    assert not (dst / "dataset.json").exists()
    assert (dst / "labelsTr" / "prostate_00.nii.gz").is_file()  # finished cases stay


def test_msd_with_spec_finds_the_task_below_src_and_uses_the_spec_labels(tmp_path):
    make_msd_task(tmp_path / "src")
    dst = convert_with_spec("Task05_Prostate", tmp_path / "src", tmp_path / "out")
    data = json.loads((dst / "dataset.json").read_text())
    assert data["name"] == "Task05_Prostate" and data["channel_names"] == {"0": "T2", "1": "ADC"}
    assert data["licence"].startswith("CC-BY-SA 4.0")
    assert_usable(dst, 2)


def test_msd_brain_tumour_spec_writes_regions(tmp_path):
    make_msd_task(tmp_path / "src", "Task01_BrainTumour", channels=("FLAIR", "T1w", "t1gd", "T2w"),
                  cases=("BRATS_001",), test=())
    dst = convert_with_spec("Task01_BrainTumour", tmp_path / "src", tmp_path / "out")
    model = load_dataset_json(dst)
    assert model.has_regions and model.regions_class_order == (1, 2, 3)
    assert len(list((dst / "imagesTr").iterdir())) == 4
    assert_usable(dst, 1)


@pytest.mark.parametrize(("break_source", "message"), [
    (lambda task: (task / "labelsTr" / "prostate_01.nii.gz").unlink(),
     r"labelsTr/prostate_01.nii.gz: file does not exist \(listed in .*dataset.json training\[1\]\)"),
    (lambda task: (task / "dataset.json").unlink(), r"no dataset.json; expected a Medical Segmentation Decathlon"),
    (lambda task: (task / "dataset.json").write_text('{"modality": {"0": "CT"}, "labels": {"0": "background"}}'),
     r"dataset.json: missing key 'training'"),
    (lambda task: (task / "dataset.json").write_text("{oops"), r"dataset.json: not valid JSON"),
    (lambda task: write_nifti(task / "imagesTr" / "prostate_01.nii.gz", np.stack([volume()] * 3)),
     r"prostate_01.nii.gz: holds 3 channel\(s\) but the dataset declares 2"),
    (lambda task: write_nifti(task / "labelsTr" / "prostate_01.nii.gz", label_map(values=(0, 1, 7))),
     r"labelsTr/prostate_01.nii.gz: unexpected label value\(s\) \[7\]; the dataset declares \[0, 1, 2\]"),
    (lambda task: write_nifti(task / "labelsTr" / "prostate_01.nii.gz", label_map() + 0.5),
     r"labelsTr/prostate_01.nii.gz: label has non-integer values"),
    (lambda task: write_nifti(task / "labelsTr" / "prostate_01.nii.gz", label_map((6, 8, 9))),
     r"labelsTr/prostate_01.nii.gz: label shape \(6, 8, 9\) differs from the image's \(6, 8, 8\)"),
    (lambda task: (task / "imagesTr" / "prostate_01.nii.gz").write_bytes(b"garbage"),
     r"imagesTr/prostate_01.nii.gz: header cannot be read"),
])
def test_msd_malformed_source_names_the_file(tmp_path, break_source, message):
    make_msd_task(tmp_path / "src")
    task = tmp_path / "src" / "Task05_Prostate"
    break_source(task)
    with pytest.raises(ConversionError, match=message):
        convert_msd(task, tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()  # an incomplete conversion is never a dataset


def test_msd_spec_refuses_another_task(tmp_path):
    make_msd_task(tmp_path / "src")
    with pytest.raises(ConversionError, match="2 channel.*declares 4.*right task folder"):
        convert_with_spec("Task01_BrainTumour", tmp_path / "src" / "Task05_Prostate", tmp_path / "out")


def test_split_channels_of_a_vector_image_keeps_geometry(tmp_path):
    array = np.stack([volume(), volume(offset=500.0)], axis=-1)  # (z, y, x, c) components
    itk = sitk.GetImageFromArray(array, isVector=True)
    itk.SetSpacing(SPACING_XYZ)
    itk.SetOrigin(ORIGIN_XYZ)
    itk.SetDirection(DIRECTION_3)
    path = tmp_path / "vector.nii.gz"
    sitk.WriteImage(itk, str(path))
    channels = split_channels(path, 2)
    assert all(isinstance(c, Image) for c in channels)
    np.testing.assert_array_equal(channels[1].array, array[..., 1])
    assert channels[0].direction == pytest.approx(DIRECTION_3)
    assert split_channels(write_nifti(tmp_path / "plain.nii.gz", volume())) == [tmp_path / "plain.nii.gz"]


# --- BraTS 2021 --------------------------------------------------------------------------------------

BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")


def make_brats(root: Path, cases=("BraTS2021_00000", "BraTS2021_00001"), validation=("BraTS2021_00100",)) -> dict:
    arrays = {}
    for case in (*cases, *validation):
        folder = root / ("RSNA_ASNR_MICCAI_BraTS2021_ValidationData" if case in validation
                         else "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021") / case
        # Distinct value ranges per modality to catch a channel order mix-up.
        arrays[case] = {m: volume((5, 6, 7), 1000.0 * i) for i, m in enumerate(BRATS_MODALITIES)}
        for modality, array in arrays[case].items():
            write_nifti(folder / f"{case}_{modality}.nii.gz", array)
        if case not in validation:
            seg = label_map((5, 6, 7), values=(0, 1, 2, 4))
            arrays[case]["seg"] = seg
            write_nifti(folder / f"{case}_seg.nii.gz", seg)
    return arrays


def test_brats_channels_labels_and_validation_cases(tmp_path):
    arrays = make_brats(tmp_path / "src")
    dst = convert_with_spec("BraTS2021", tmp_path / "src", tmp_path / "out")

    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        for channel, modality in enumerate(BRATS_MODALITIES):  # spec order: T1, T1ce, T2, FLAIR
            out = read_image(dst / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
            np.testing.assert_array_equal(out.array, arrays[case][modality])
        label = read_image(dst / "labelsTr" / f"{case}.nii.gz").array
        seg = arrays[case]["seg"]
        expected = np.where(seg == 4, 3, seg)
        np.testing.assert_array_equal(label, expected)
        assert set(np.unique(label)) == {0, 1, 2, 3}
    assert sorted(p.name for p in (dst / "imagesTs").iterdir()) == [f"BraTS2021_00100_{c:04d}.nii.gz"
                                                                     for c in range(4)]
    assert not (dst / "labelsTs").exists()

    data = json.loads((dst / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert data["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3],
                              "enhancing tumor": [3]}
    assert data["regions_class_order"] == [2, 1, 3]
    assert data["numTraining"] == 2
    assert_usable(dst, 2)


def test_brats_bad_label_value_fails_before_writing_the_case(tmp_path):
    make_brats(tmp_path / "src", cases=("BraTS2021_00000",), validation=())
    seg = next((tmp_path / "src").rglob("BraTS2021_00000_seg.nii.gz"))
    write_nifti(seg, label_map((5, 6, 7), values=(0, 1, 5)))
    with pytest.raises(ConversionError, match=r"BraTS2021_00000_seg.nii.gz: unexpected label value\(s\) \[5\] "
                                              r"\(after mapping \{4: 3\}\)"):
        convert_with_spec("BraTS2021", tmp_path / "src", tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_brats_missing_modality_names_the_file(tmp_path):
    make_brats(tmp_path / "src", validation=())
    missing = next((tmp_path / "src").rglob("BraTS2021_00001_t2.nii.gz"))
    missing.unlink()
    with pytest.raises(ConversionError, match=f"{missing}: file does not exist"):
        convert_with_spec("BraTS2021", tmp_path / "src", tmp_path / "out")


def test_brats_same_case_twice_is_an_error(tmp_path):
    make_brats(tmp_path / "src", cases=("BraTS2021_00000",), validation=())
    make_brats(tmp_path / "src" / "copy", cases=("BraTS2021_00000",), validation=())
    with pytest.raises(ConversionError, match="case name BraTS2021_00000 also comes from"):
        convert_with_spec("BraTS2021", tmp_path / "src", tmp_path / "out")


# --- KiTS23 ------------------------------------------------------------------------------------------


def make_kits(root: Path, cases=("case_00000", "case_00001")) -> None:
    for case in cases:
        write_nifti(root / "dataset" / case / "imaging.nii.gz", volume((7, 8, 6)).astype(np.int16))
        write_nifti(root / "dataset" / case / "segmentation.nii.gz", label_map((7, 8, 6), values=(0, 1, 2, 3)))


def test_kits_copies_images_and_writes_regions(tmp_path):
    make_kits(tmp_path / "kits23")
    dst = convert_with_spec("KiTS23", tmp_path / "kits23", tmp_path / "out", progress=True)
    source = tmp_path / "kits23" / "dataset" / "case_00001"
    assert (dst / "imagesTr" / "case_00001_0000.nii.gz").read_bytes() == (source / "imaging.nii.gz").read_bytes()
    np.testing.assert_array_equal(read_image(dst / "labelsTr" / "case_00001.nii.gz").array,
                                  label_map((7, 8, 6), values=(0, 1, 2, 3)))
    model = load_dataset_json(dst)
    assert model.labels == {"background": 0, "kidney": (1, 2, 3), "masses": (2, 3), "tumor": 2}
    assert model.regions_class_order == (1, 3, 2)
    assert_usable(dst, 2)


@pytest.mark.parametrize(("break_source", "message"), [
    (lambda root: (root / "dataset" / "case_00001" / "segmentation.nii.gz").unlink(),
     r"case_00001/segmentation.nii.gz: label file missing for case case_00001"),
    (lambda root: write_nifti(root / "dataset" / "case_00001" / "segmentation.nii.gz", label_map((7, 8, 5))),
     r"case_00001/segmentation.nii.gz: label shape \(7, 8, 5\) differs from the image's \(7, 8, 6\)"),
    (lambda root: write_nifti(root / "dataset" / "case_00001" / "imaging.nii.gz", np.stack([volume((7, 8, 6))] * 2)),
     r"case_00001/imaging.nii.gz: expected a 2D or 3D image with one value per voxel, found 4D"),
])
def test_kits_malformed_source_names_the_file(tmp_path, break_source, message):
    make_kits(tmp_path / "kits23")
    break_source(tmp_path / "kits23")
    with pytest.raises(ConversionError, match=message):
        convert_with_spec("KiTS23", tmp_path / "kits23", tmp_path / "out")


def test_wrong_source_folder_says_what_was_looked_for(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ConversionError, match=r"empty: no case folders named like 'case_\*'"):
        convert_with_spec("KiTS23", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConversionError, match="source folder does not exist"):
        convert_with_spec("KiTS23", tmp_path / "nowhere", tmp_path / "out")


def test_find_case_dirs_depth_and_hidden_folders(tmp_path):
    for folder in ("a/case_1", "a/b/case_2", "a/b/c/case_3", ".hidden/case_4", "case_0/case_9"):
        (tmp_path / folder).mkdir(parents=True)
    found = find_case_dirs(tmp_path, "case_*")
    # depth 3 reaches a/b/case_2 but not a/b/c/case_3; a case folder is not searched inside.
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["case_0", "a/case_1", "a/b/case_2"]


# --- ISBI 2012 EM ------------------------------------------------------------------------------------


def make_isbi(root: Path, labels_values=(0, 255)) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    train = RNG.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    labels = RNG.choice(np.array(labels_values, dtype=np.uint8), size=(3, 16, 16))
    test = RNG.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    tifffile.imwrite(root / "train-volume.tif", train, photometric="minisblack")
    tifffile.imwrite(root / "train-labels.tif", labels, photometric="minisblack")
    tifffile.imwrite(root / "test-volume.tif", test, photometric="minisblack")
    return {"train": train, "labels": labels, "test": test}


def test_isbi_sections_become_2d_cases(tmp_path):
    stacks = make_isbi(tmp_path / "isbi")
    dst = convert_with_spec("ISBI2012", tmp_path / "isbi", tmp_path / "out")
    assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == [f"train_{i:03d}_0000.png" for i in range(3)]
    assert sorted(p.name for p in (dst / "imagesTs").iterdir()) == [f"test_{i:03d}_0000.png" for i in range(3)]
    for i in range(3):
        image = read_image(dst / "imagesTr" / f"train_{i:03d}_0000.png")
        assert image.ndim == 2
        np.testing.assert_array_equal(image.array, stacks["train"][i])
        label = read_image(dst / "labelsTr" / f"train_{i:03d}.png").array
        np.testing.assert_array_equal(label, (stacks["labels"][i] == 0).astype(np.uint8))  # membrane = 1
        np.testing.assert_array_equal(read_image(dst / "imagesTs" / f"test_{i:03d}_0000.png").array,
                                      stacks["test"][i])
    data = json.loads((dst / "dataset.json").read_text())
    assert data["file_ending"] == ".png" and data["labels"] == {"background": 0, "membrane": 1}
    cases = assert_usable(dst, 3)
    assert load_case(cases[0]).is_2d


def test_isbi_without_test_stack_and_with_bad_labels(tmp_path):
    make_isbi(tmp_path / "isbi")
    (tmp_path / "isbi" / "test-volume.tif").unlink()
    dst = convert_with_spec("ISBI2012", tmp_path / "isbi", tmp_path / "out")
    assert not (dst / "imagesTs").exists()

    make_isbi(tmp_path / "bad", labels_values=(0, 128, 255))
    with pytest.raises(ConversionError, match=r"train-labels.tif \(case train_000\): unexpected label value"):
        convert_with_spec("ISBI2012", tmp_path / "bad", tmp_path / "out2")
    (tmp_path / "bad" / "train-labels.tif").unlink()
    with pytest.raises(ConversionError, match="train-labels.tif: file does not exist"):
        convert_with_spec("ISBI2012", tmp_path / "bad", tmp_path / "out2")


# --- ACDC --------------------------------------------------------------------------------------------


def make_acdc(root: Path) -> dict:
    arrays = {}
    patients = {"training/patient001": ("01", "12"), "training/patient002": ("01", "09"), "testing/patient101": ("01",)}
    for relative, frames in patients.items():
        folder = root / "database" / relative
        patient = folder.name
        for frame in frames:
            stem = f"{patient}_frame{frame}"
            arrays[stem] = volume((4, 9, 8))
            write_nifti(folder / f"{stem}.nii.gz", arrays[stem])
            write_nifti(folder / f"{stem}_gt.nii.gz", label_map((4, 9, 8), values=(0, 1, 2, 3)))
        write_nifti(folder / f"{patient}_4d.nii.gz", np.stack([volume((4, 9, 8))] * 3))  # all frames: not a case
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: DCM\n")
        (folder / f"._{patient}_frame01.nii.gz").write_bytes(b"junk")
    return arrays


def test_acdc_one_case_per_annotated_frame(tmp_path):
    arrays = make_acdc(tmp_path / "acdc")
    dst = convert_with_spec("ACDC", tmp_path / "acdc", tmp_path / "out")
    assert sorted(p.name for p in (dst / "imagesTr").iterdir()) == [
        "patient001_frame01_0000.nii.gz", "patient001_frame12_0000.nii.gz",
        "patient002_frame01_0000.nii.gz", "patient002_frame09_0000.nii.gz"]
    assert sorted(p.name for p in (dst / "imagesTs").iterdir()) == ["patient101_frame01_0000.nii.gz"]
    assert sorted(p.name for p in (dst / "labelsTs").iterdir()) == ["patient101_frame01.nii.gz"]
    np.testing.assert_array_equal(read_image(dst / "imagesTr" / "patient001_frame12_0000.nii.gz").array,
                                  arrays["patient001_frame12"])
    np.testing.assert_array_equal(read_image(dst / "labelsTr" / "patient002_frame09.nii.gz").array,
                                  label_map((4, 9, 8), values=(0, 1, 2, 3)))
    data = json.loads((dst / "dataset.json").read_text())
    assert data["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert data["numTraining"] == 4 and data["channel_names"] == {"0": "cineMRI"}
    assert_usable(dst, 4)


def test_acdc_training_frame_without_label_is_an_error(tmp_path):
    make_acdc(tmp_path / "acdc")
    gt = tmp_path / "acdc" / "database" / "training" / "patient002" / "patient002_frame09_gt.nii.gz"
    gt.unlink()
    with pytest.raises(ConversionError, match=f"{gt}: label file missing for frame patient002_frame09.nii.gz"):
        convert_with_spec("ACDC", tmp_path / "acdc", tmp_path / "out")
    # The testing folder alone has no training case: nothing to train on is an error too.
    with pytest.raises(ConversionError, match="no labelled training case"):
        convert_with_spec("ACDC", tmp_path / "acdc" / "database" / "testing", tmp_path / "out")
