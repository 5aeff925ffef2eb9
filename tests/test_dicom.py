"""Tests for autoseg.dicom: DICOM series in, DICOM SEG out, and SEGs in evaluation.

The end-to-end tests predict a small synthetic CT series with the threshold network of
tests/test_inference.py (its correct output is the thresholded source image), once as NIfTI and
once as DICOM SEG, and require the SEG, read back with highdicom alone, to equal the NIfTI voxel
for voxel.
"""

from __future__ import annotations

import builtins
import doctest
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from test_inference import expected_labels, make_model, threshold_network  # noqa: F401  (autouse fixture)

import autoseg.dicom
from autoseg.cli import main
from autoseg.dicom import (
    MISSING_EXTRA,
    DicomError,
    dicom_libraries,
    is_dicom_seg,
    read_dicom_seg,
    read_dicom_series,
    series_cases,
    write_dicom_seg,
)
from autoseg.evaluation import evaluate_folders
from autoseg.inference import PredictionError, Predictor, predict_folder
from autoseg.io import Image, read_image, write_image
from autoseg.labels import LabelInfo

SHAPE = (8, 32, 32)
PIXEL_SPACING = (0.75, 0.8)  # DICOM order: between rows, between columns
SLICE_THICKNESS = 2.5
ORIGIN = (-20.0, 12.5, 40.0)
LABELS = {"background": 0, "liver": 1, "lesion": 2}  # tests/test_inference.py's


def ct_volume() -> np.ndarray:
    """HU values the threshold network sorts into background (30), class 1 (100) and 2 (200)."""
    volume = np.full(SHAPE, -1000, dtype=np.int16)
    volume[1:7, 3:29, 3:29] = 30
    volume[2:6, 6:18, 5:20] = 100
    volume[3:6, 20:27, 8:24] = 200
    return volume


def write_ct_series(folder: Path, volume: np.ndarray) -> list[pydicom.Dataset]:
    """CT Image Storage, one file per slice: the slices are stored from the top down (positions
    fall as the instance number rises), so slice order is something the reader must work out."""
    folder.mkdir(parents=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for z in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.StudyID = "CT", "synthetic", 3, "1"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Tiny", "P001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
        ds.InstanceNumber = volume.shape[0] - z
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + SLICE_THICKNESS * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(PIXEL_SPACING), SLICE_THICKNESS
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (volume[z].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), folds=("0",))


@pytest.fixture(scope="module")
def series_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An input folder with one DICOM series per sub-folder: case ``ct_a``."""
    folder = tmp_path_factory.mktemp("dicom_inputs")
    write_ct_series(folder / "ct_a", ct_volume())
    return folder


@pytest.fixture(scope="module")
def predictions(model_dir: Path, series_inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same cases predicted as NIfTI (the default) and, from the command line, as DICOM SEG."""
    nifti, seg = tmp_path_factory.mktemp("nifti"), tmp_path_factory.mktemp("seg")
    predict_folder(model_dir, series_inputs, nifti, tta=False, progress=False, num_workers=0)
    assert main(["predict", str(model_dir), "-i", str(series_inputs), "-o", str(seg), "--no-tta",
                 "--output-format", "dicom-seg"]) == 0
    return {"nifti": nifti, "seg": seg}


def test_series_read_with_its_datasets_in_slice_order(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ct", ct_volume())
    image, datasets = read_dicom_series(tmp_path / "ct")
    assert np.array_equal(sitk.GetArrayFromImage(image), ct_volume())  # rescaled to HU
    assert [float(d.ImagePositionPatient[2]) for d in datasets] == [
        image.TransformIndexToPhysicalPoint((0, 0, z))[2] for z in range(SHAPE[0])]
    assert image.GetSpacing() == pytest.approx((PIXEL_SPACING[1], PIXEL_SPACING[0], SLICE_THICKNESS))
    assert "PixelData" not in datasets[0]
    assert [c.case_id for c in series_cases(tmp_path)] == ["ct"]
    assert series_cases(tmp_path / "ct")[0].images == (tmp_path / "ct",)  # a series folder given itself
    with pytest.raises(DicomError, match="takes 2 channels"):
        series_cases(tmp_path, num_channels=2)


def test_seg_equals_the_nifti_prediction_voxel_for_voxel(predictions: dict[str, Path], series_inputs: Path) -> None:
    assert sorted(p.name for p in predictions["seg"].glob("*.dcm")) == ["ct_a.dcm"]
    for case in ("ct_a",):
        nifti = read_image(predictions["nifti"] / f"{case}.nii.gz")
        assert set(np.unique(nifti.array)) == {0, 1, 2}
        # the threshold network's answer, but for the edges that resampling to the plan's spacing moves
        assert np.mean(nifti.array == expected_labels(read_image(series_inputs / case).array)) > 0.95

        # highdicom alone: one frame per source instance, in the series' slice order
        _, sources = read_dicom_series(series_inputs / case)
        seg = highdicom.seg.segread(predictions["seg"] / f"{case}.dcm")
        stacked = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources],
                                                    assert_missing_frames_are_empty=True)
        from_highdicom = stacked[..., 0] * 1 + stacked[..., 1] * 2  # segments 1, 2: liver, lesion
        assert np.array_equal(from_highdicom, nifti.array)

        # autoseg's reader, onto the NIfTI's grid: identical array and geometry
        back = read_dicom_seg(predictions["seg"] / f"{case}.dcm", reference_geometry=nifti)
        assert np.array_equal(sitk.GetArrayFromImage(back), nifti.array)
        assert back.GetOrigin() == pytest.approx(nifti.origin)
        assert back.GetDirection() == pytest.approx(nifti.direction)


def test_seg_references_the_series_and_names_its_segments(predictions: dict[str, Path], series_inputs: Path) -> None:
    _, sources = read_dicom_series(series_inputs / "ct_a")
    seg = highdicom.seg.segread(predictions["seg"] / "ct_a.dcm")
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in sources}
    assert seg.SegmentationType == "BINARY"
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["liver", "lesion"]
    algorithm = seg.get_segment_description(1).algorithm_identification
    assert (algorithm[0].AlgorithmName, algorithm[0].AlgorithmVersion) == ("autoseg", autoseg.__version__)
    assert (seg.Manufacturer, seg.SoftwareVersions) == ("autoseg", autoseg.__version__)
    assert seg.PatientID == "P001"


def test_python_route_writes_the_same_seg(model_dir: Path, predictions: dict[str, Path], series_inputs: Path,
                                          tmp_path: Path) -> None:
    """The README's snippet: Predictor on a series folder, then write_dicom_seg."""
    predictor = Predictor.from_model(model_dir, device="cpu", tta=False)
    labels = predictor.predict(series_inputs / "ct_a")
    path = write_dicom_seg(labels, series_inputs / "ct_a", predictor.model.label_info, tmp_path / "ct_a.dcm")
    expected = read_image(predictions["nifti"] / "ct_a.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(read_dicom_seg(path, expected)), expected.array)


def test_evaluate_scores_a_seg_as_the_nifti(predictions: dict[str, Path], series_inputs: Path,
                                            tmp_path: Path) -> None:
    references = tmp_path / "references"
    for case in ("ct_a",):
        source = read_image(series_inputs / case)
        truth = expected_labels(source.array)
        truth[4] = 0  # not a perfect prediction, so the scores say something
        write_image(source.with_array(truth), references / f"{case}.nii.gz")
    nifti = evaluate_folders(predictions["nifti"], references, labels=LABELS)
    as_prediction = evaluate_folders(predictions["seg"], references, labels=LABELS)
    as_reference = evaluate_folders(references, predictions["seg"], labels=LABELS)
    assert nifti.rows[0]["dice"] < 1
    assert as_prediction.rows == nifti.rows
    flipped = evaluate_folders(references, predictions["nifti"], labels=LABELS)
    assert as_reference.rows == flipped.rows
    both = evaluate_folders(predictions["seg"], predictions["seg"], labels=LABELS)
    assert all(row["dice"] == 1 for row in both.rows)


def test_dicom_seg_needs_dicom_inputs(model_dir: Path, tmp_path: Path) -> None:
    write_image(Image(ct_volume(), (2.5, 0.75, 0.8)), tmp_path / "in" / "case_0000.nii.gz")
    with pytest.raises(PredictionError, match="dicom-seg.*DICOM series"):
        predict_folder(model_dir, tmp_path / "in", tmp_path / "out", output_format="dicom-seg", progress=False)
    with pytest.raises(PredictionError, match="'dicom_seg' is not one of nifti, dicom-seg"):
        predict_folder(model_dir, tmp_path / "in", tmp_path / "out", output_format="dicom_seg", progress=False)


def test_regions_round_trip_and_wrong_grids_are_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ct", ct_volume())
    image, datasets = read_dicom_series(tmp_path / "ct")
    labels = expected_labels(sitk.GetArrayFromImage(image))
    label_map = sitk.GetImageFromArray(labels)
    label_map.CopyInformation(image)
    regions = LabelInfo.from_labels({"background": 0, "organ": [1, 2], "core": [2]}, regions_class_order=(1, 2))
    path = write_dicom_seg(label_map, datasets, regions, tmp_path / "regions.dcm")
    assert is_dicom_seg(path) and not is_dicom_seg(tmp_path / "ct" / "IM0001.dcm")
    assert np.array_equal(sitk.GetArrayFromImage(read_dicom_seg(path, image)), labels)
    own = read_dicom_seg(path)  # without a reference: just the slices the SEG stores
    assert own.GetSize()[2] == int(np.any(labels, axis=(1, 2)).sum())

    # values that are not 1..N, and an ignore label, which gets no segment
    sparse = sitk.GetImageFromArray((labels * 3 + (labels == 2) * 1).astype(np.uint8))  # 0, 3, 7
    sparse.CopyInformation(image)
    path = write_dicom_seg(sparse, datasets, {"background": 0, "kidney": 3, "cyst": 7, "ignore": 9},
                           tmp_path / "sparse.dcm")
    assert [d.SegmentLabel for d in highdicom.seg.segread(path).SegmentSequence] == ["kidney", "cyst"]
    assert np.array_equal(sitk.GetArrayFromImage(read_dicom_seg(path, image)), sitk.GetArrayFromImage(sparse))

    shifted = sitk.Image(image)
    shifted.SetOrigin((ORIGIN[0] + 0.3, ORIGIN[1], ORIGIN[2]))
    with pytest.raises(DicomError, match="do not lie on the reference image's grid"):
        read_dicom_seg(path, shifted)
    with pytest.raises(DicomError, match="does not fit the source series"):
        write_dicom_seg(label_map[:, :, :4], datasets, LABELS, tmp_path / "short.dcm")
    with pytest.raises(DicomError, match="cannot be read as a DICOM Segmentation"):
        read_dicom_seg(tmp_path / "ct" / "IM0001.dcm")


def test_missing_extra_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def without_highdicom(name: str, *args, **kwargs):
        if name.split(".")[0] == "highdicom":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_highdicom)
    with pytest.raises(DicomError) as caught:
        dicom_libraries()
    assert str(caught.value) == MISSING_EXTRA == "DICOM support needs the dicom extra: pip install 'autoseg[dicom]'"


def test_docstring_examples_run() -> None:
    result = doctest.testmod(autoseg.dicom)
    assert result.attempted > 0 and result.failed == 0
