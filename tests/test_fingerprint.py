"""The dataset fingerprint on tiny synthetic datasets whose statistics are known exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from autoseg.cluster import WORKER_START_ENV
from autoseg.fingerprint import (
    FingerprintError,
    compute_fingerprint,
    dataset_hash,
    fingerprint_to_dict,
    load_fingerprint,
    load_or_compute_fingerprint,
    modality_from_name,
    nonzero_bbox,
    save_fingerprint,
)
from autoseg.io import Image, write_image

SPACING = (3.0, 1.0, 0.5)


def write_dataset(root: Path, channels: dict[str, str], cases: list[dict], labels: dict | None = None) -> Path:
    """Write ``cases`` (each ``{"images": [array per channel], "label": array}``) as a raw dataset."""
    for i, case in enumerate(cases):
        geometry = {"spacing": case.get("spacing", SPACING), "direction": case.get("direction", ())}
        for c, array in enumerate(case["images"]):
            write_image(Image(array, **geometry), root / "imagesTr" / f"case_{i:03d}_{c:04d}.nii.gz")
        write_image(Image(case["label"], **geometry), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channels,
        "labels": labels or {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }))
    return root


def padded_case(offset: float, shape=(8, 12, 10), pad=2, lesion: bool = True) -> dict:
    """A non-zero block padded with zeros; the organ's intensities are offset + 0..n-1 exactly."""
    inner = tuple(s - 2 * pad for s in shape)
    image = np.zeros(shape, dtype=np.float32)
    block = tuple(slice(pad, s - pad) for s in shape)
    image[block] = 5.0
    label = np.zeros(shape, dtype=np.uint8)
    organ = tuple(slice(pad + 1, pad + 3) for _ in shape)  # 2x2x2 organ
    label[organ] = 1
    image[organ] = offset + np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    if lesion:
        label[pad, pad, pad] = 2
        image[pad, pad, pad] = offset + 100
    return {"images": [image], "label": label, "inner": inner}


@pytest.fixture
def padded_dataset(tmp_path: Path) -> Path:
    cases = [padded_case(0.0), padded_case(1000.0), padded_case(2000.0, lesion=False)]
    return write_dataset(tmp_path / "padded", {"0": "T1"}, cases)


def test_per_case_shapes_spacing_crop_and_classes(padded_dataset: Path):
    fingerprint = compute_fingerprint(padded_dataset, n_jobs=1, progress=False)
    assert fingerprint.num_cases == 3
    assert fingerprint.dataset_dir == str(padded_dataset.resolve())
    assert fingerprint.channel_names == ("T1",)
    for case in fingerprint.cases:
        assert case.spacing == SPACING
        assert case.shape == (8, 12, 10)
        assert case.shape_after_crop == (4, 8, 6)  # 2 zero voxels on each side removed
        assert case.relative_size_after_crop == pytest.approx(4 * 8 * 6 / (8 * 12 * 10))
    first, _, last = fingerprint.cases
    assert first.class_voxels == {0: 8 * 12 * 10 - 9, 1: 8, 2: 1}
    assert last.class_voxels == {0: 8 * 12 * 10 - 8, 1: 8}
    assert fingerprint.classes[1].voxels == 24 and fingerprint.classes[1].cases == 3
    assert fingerprint.classes[2].voxels == 2 and fingerprint.classes[2].cases == 2
    assert fingerprint.spacing.median == SPACING
    assert fingerprint.shape_after_crop.median == (4.0, 8.0, 6.0)
    assert fingerprint.median_relative_size_after_crop == pytest.approx(0.2)


def test_foreground_intensities_match_exact_statistics(padded_dataset: Path):
    fingerprint = compute_fingerprint(padded_dataset, n_jobs=1, progress=False, samples_per_case=20_000)
    # the foreground of each case: its 8 organ voxels (+ the lesion voxel in two cases)
    exact = np.concatenate([np.arange(8.0), [100.0], 1000 + np.arange(8.0), [1100.0], 2000 + np.arange(8.0)])
    foreground = fingerprint.channels[0].foreground
    assert foreground.min == 0.0 and foreground.max == 2007.0  # exact, not sampled
    # every case weighs the same (as in nnU-Net), so the mean is the mean of the per-case means
    case_means = [np.mean(np.r_[np.arange(8.0), 100]), np.mean(np.r_[1000 + np.arange(8.0), 1100]),
                  np.mean(2000 + np.arange(8.0))]
    assert foreground.mean == pytest.approx(np.mean(case_means), rel=0.01)
    assert foreground.median == pytest.approx(1003.5, abs=4.0)
    assert foreground.percentile_00_5 == pytest.approx(0.0, abs=1.0)
    assert foreground.percentile_99_5 == pytest.approx(2007.0, abs=1.0)
    per_case = fingerprint.cases[0].channels[0].foreground
    assert per_case.count == 9 and per_case.mean == pytest.approx(np.mean(exact[:9]))
    assert per_case.percentile_99_5 == pytest.approx(np.percentile(exact[:9], 99.5))


def test_cases_are_counted_in_canonical_orientation(tmp_path: Path):
    canonical = padded_case(0.0)
    # the same case stored with z and x swapped (array axes reversed), and a direction saying so
    stored = {"images": [np.ascontiguousarray(canonical["images"][0].transpose(2, 1, 0))],
              "label": np.ascontiguousarray(canonical["label"].transpose(2, 1, 0)),
              "spacing": SPACING[::-1], "direction": (0, 0, 1, 0, 1, 0, 1, 0, 0)}
    root = write_dataset(tmp_path / "oriented", {"0": "T1"}, [canonical, stored])
    fingerprint = compute_fingerprint(root, n_jobs=1, progress=False)
    for case in fingerprint.cases:
        assert case.spacing == SPACING
        assert case.shape == (8, 12, 10) and case.shape_after_crop == (4, 8, 6)
    assert fingerprint.cases[0].channels == fingerprint.cases[1].channels


def test_fingerprint_is_the_same_serial_and_parallel(padded_dataset: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(WORKER_START_ENV, "0")  # worker processes even for these tiny cases
    serial = compute_fingerprint(padded_dataset, n_jobs=1, progress=False)
    parallel = compute_fingerprint(padded_dataset, n_jobs=2, progress=False)
    assert fingerprint_to_dict(serial) == fingerprint_to_dict(parallel)


def test_json_round_trip_is_exact(padded_dataset: Path, tmp_path: Path):
    fingerprint = compute_fingerprint(padded_dataset, n_jobs=1, progress=False)
    path = save_fingerprint(fingerprint, tmp_path / "work" / "fingerprint.json")
    assert load_fingerprint(path) == fingerprint
    assert load_fingerprint(path.parent) == fingerprint


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("cases"), "cases"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["cases"][0].update(spacing=[1.0, "x", 1.0]), "spacing"),
    (lambda d: d.update(unexpected=1), "unexpected"),
])
def test_hand_broken_fingerprint_is_rejected_naming_the_problem(padded_dataset, tmp_path, edit, message):
    path = save_fingerprint(compute_fingerprint(padded_dataset, n_jobs=1, progress=False), tmp_path / "f.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(FingerprintError, match=message) as error:
        load_fingerprint(path)
    assert str(path) in str(error.value)


def test_missing_fingerprint_names_the_file(tmp_path: Path):
    with pytest.raises(FingerprintError, match="no fingerprint.json here"):
        load_fingerprint(tmp_path)


def test_reuse_and_staleness(padded_dataset: Path, tmp_path: Path):
    work = tmp_path / "work"
    first, reused = load_or_compute_fingerprint(padded_dataset, work, n_jobs=1, progress=False)
    assert not reused and (work / "fingerprint.json").is_file()
    again, reused = load_or_compute_fingerprint(padded_dataset, work, n_jobs=1, progress=False)
    assert reused and again == first
    # a replaced image file (new mtime) makes it stale
    image = padded_dataset / "imagesTr" / "case_000_0000.nii.gz"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dataset_hash(padded_dataset) != first.dataset_hash
    _, reused = load_or_compute_fingerprint(padded_dataset, work, n_jobs=1, progress=False)
    assert not reused
    # so does an edited dataset.json
    data = json.loads((padded_dataset / "dataset.json").read_text())
    data["channel_names"] = {"0": "T2"}
    (padded_dataset / "dataset.json").write_text(json.dumps(data))
    changed, reused = load_or_compute_fingerprint(padded_dataset, work, n_jobs=1, progress=False)
    assert not reused and changed.channel_names == ("T2",)
    # and force recomputes regardless
    _, reused = load_or_compute_fingerprint(padded_dataset, work, n_jobs=1, force=True, progress=False)
    assert not reused


def test_broken_cached_fingerprint_is_recomputed(padded_dataset: Path, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "fingerprint.json").write_text("{ not json")
    with pytest.warns(UserWarning, match="recomputing"):
        fingerprint, reused = load_or_compute_fingerprint(padded_dataset, work, n_jobs=1, progress=False)
    assert not reused and load_fingerprint(work) == fingerprint


def hu_like_case(rng: np.random.Generator, offset: float = 0.0) -> dict:
    """Air around a soft-tissue body, in Hounsfield units."""
    image = np.full((6, 16, 16), -1000.0, dtype=np.float32) + offset
    image[:, 4:12, 4:12] = rng.normal(40, 10, size=(6, 8, 8)) + offset
    label = np.zeros(image.shape, dtype=np.uint8)
    label[:, 6:10, 6:10] = 1
    return {"images": [image], "label": label}


@pytest.mark.parametrize(("name", "offset", "expected"), [
    ("T1", 0.0, "like air in Hounsfield units"),
    ("CT", 1024.0, "no negative value"),
    ("CT", 0.0, None),
])
def test_modality_warnings(tmp_path: Path, name: str, offset: float, expected: str | None):
    rng = np.random.default_rng(0)
    root = write_dataset(tmp_path / "d", {"0": name}, [hu_like_case(rng, offset) for _ in range(2)],
                         labels={"background": 0, "organ": 1})
    fingerprint = compute_fingerprint(root, n_jobs=1, progress=False)
    if expected is None:
        assert fingerprint.warnings == ()
    else:
        assert any(expected in w for w in fingerprint.warnings), fingerprint.warnings
    assert fingerprint.channels[0].median_fraction_below_minus_500 == pytest.approx(
        0.0 if offset else 1 - 64 / 256)


def test_normalized_ct_and_undeclared_labels_are_flagged(tmp_path: Path):
    image = np.zeros((4, 8, 8), dtype=np.float32)
    image[1:3, 2:6, 2:6] = 0.5
    label = np.zeros(image.shape, dtype=np.uint8)
    label[1:3, 3:5, 3:5] = 1
    label[1, 2, 2] = 7
    root = write_dataset(tmp_path / "d", {"0": "CT_venous"}, [{"images": [image], "label": label}],
                         labels={"background": 0, "organ": 1, "never": 2})
    warnings = compute_fingerprint(root, n_jobs=1, progress=False).warnings
    assert any("within [0, 1]" in w for w in warnings)
    assert any("label value 7" in w and "not declared" in w for w in warnings)
    assert any("'never' (value 2) occurs in no training case" in w for w in warnings)


def test_two_dimensional_dataset(make_dataset):
    root = make_dataset(num_cases=2, num_channels=3, shape=(16, 12), ending=".png")
    fingerprint = compute_fingerprint(root, n_jobs=1, progress=False)
    assert fingerprint.is_2d
    assert all(c.shape == (1, 16, 12) and c.is_2d for c in fingerprint.cases)
    assert fingerprint.spacing.median[0] == 1.0


@pytest.mark.parametrize(("name", "modality"), [
    ("CT", "ct"), ("ct", "ct"), ("CT_venous", "ct"), ("non-contrast CT", "ct"),
    ("T1", "mri"), ("t2w", "mri"), ("FLAIR", "mri"), ("ADC", "mri"), ("MRI", "mri"), ("T1Gd", "mri"),
    ("PET", "pet"), ("R", "natural"), ("rgb_to_0_1", "natural"), ("noNorm", "other"), ("scan", "other"),
    ("CTA_phase", "other"),  # a word, not a prefix
])
def test_modality_from_name(name: str, modality: str):
    assert modality_from_name(name) == modality


def test_nonzero_bbox_fills_holes_and_spans_all_channels():
    image = np.zeros((2, 5, 6, 7), dtype=np.float32)
    image[0, 1:4, 1:3, 1:3] = 1
    image[1, 2, 4, 5] = -3  # only the second channel is non-zero here
    assert nonzero_bbox(image) == (slice(1, 4), slice(1, 5), slice(1, 6))
    assert nonzero_bbox(np.zeros((1, 2, 3, 4))) == (slice(0, 2), slice(0, 3), slice(0, 4))
