"""Preprocessing: orientation, crop, normalization, CT priors, storage, resume, and the inverse."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cluster import WORKER_START_ENV
from autoseg.dataset import CaseData, load_case, training_cases, write_dataset_json
from autoseg.io import Image, read_image, write_image, write_like
from autoseg.orientation import (
    canonical_shape,
    canonical_spacing,
    canonical_transform,
    from_canonical,
    is_identity,
    to_canonical,
)
from autoseg.plan import (
    ChannelNormalization,
    Configuration,
    IntensityWindow,
    Plan,
    Resampling,
    Topology,
    configuration_hash,
    save_plan,
)
from autoseg.preprocessing import (
    MANIFEST,
    PRIOR_EDGE_HU,
    PreprocessingError,
    bounding_box,
    case_paths,
    class_locations,
    ct_prior_channels,
    load_preprocessed_case,
    nonzero_mask,
    normalize_channel,
    preprocess_case,
    preprocess_dataset,
    restore_to_original,
)
from autoseg.validate import DatasetValidationError

CT = ChannelNormalization("CT", "ct", clip_low=-500.0, clip_high=300.0, mean=20.0, std=150.0)
PRIORS = (IntensityWindow("lung", -1000.0, -400.0), IntensityWindow("soft_tissue", -100.0, 100.0),
          IntensityWindow("bone", 400.0))


# --- helpers: tiny hand-made plans and datasets ---------------------------------------------------


def make_config(spacing, normalization=(CT,), dim=3, name="3d_fullres", ct_priors=(), resampling=None,
                num_classes=3) -> Configuration:
    kernel = (3,) * dim
    topology = Topology(arch="unet", dim=dim, in_channels=len(normalization) + len(ct_priors),
                        num_classes=num_classes, features_per_stage=(4, 8), kernel_sizes=(kernel, kernel),
                        strides=((1,) * dim, (2,) * dim), n_conv_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
    return Configuration(name=name, spacing=tuple(float(s) for s in spacing), patch_size=(8,) * dim,
                         batch_size=2, median_shape=(8,) * dim, normalization=tuple(normalization),
                         topology=topology, resampling=resampling or Resampling(), ct_priors=tuple(ct_priors))


def make_plan(*configurations: Configuration, channels=("CT",), labels=None) -> Plan:
    labels = labels or {"background": 0, "liver": 1, "tumour": 2}
    return Plan(dataset_name="test", channel_names=tuple(channels), labels=labels,
                configurations={c.name: c for c in configurations})


def make_case(image: np.ndarray, label: np.ndarray | None, spacing=(1.0, 1.0, 1.0), case_id="case",
              direction=()) -> CaseData:
    image = image.astype(np.float32)
    if image.ndim == 3:
        image = image[None]
    return CaseData(case_id, image, label, tuple(spacing), False, Image(image[0], spacing, (), direction))


def blob_case(seed: int = 0, shape=(12, 20, 22)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like body (HU) in air-free zero background, with a liver and a tumour."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (y ** 2 + x ** 2) < 0.8
    image = np.where(body, rng.normal(40, 200, shape), 0.0)
    image[body & (x < -0.5)] = -800.0  # "lung", below the clip range
    image[body & (y > 0.6)] = 900.0    # "bone", above it
    label = np.zeros(shape, dtype=np.int16)
    label[(z ** 2 + (y + 0.1) ** 2 + (x - 0.2) ** 2) < 0.3] = 1
    label[(z ** 2 + (y + 0.1) ** 2 + (x - 0.2) ** 2) < 0.05] = 2
    return image.astype(np.float32), label


def write_dataset(folder: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], spacing=(2.0, 1.0, 1.0),
                  labels=None) -> Path:
    for case_id, (image, label) in cases.items():
        write_image(Image(image.astype(np.int16), spacing), folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_image(Image(label.astype(np.uint8), spacing), folder / "labelsTr" / f"{case_id}.nii.gz")
    write_dataset_json({"channel_names": {"0": "CT"}, "labels": labels or {"background": 0, "liver": 1, "tumour": 2},
                        "numTraining": len(cases), "file_ending": ".nii.gz"}, folder)
    return folder


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path, Plan]:
    """A 4-case CT dataset, a work folder with plan.json and fingerprint.json pointing at it."""
    dataset = write_dataset(tmp_path / "raw", {f"c{i}": blob_case(i) for i in range(4)})
    plan = make_plan(make_config((1.5, 1.2, 1.2)), make_config((2.0, 1.2, 1.2), dim=2, name="2d"))
    work_dir = tmp_path / "work"
    save_plan(plan, work_dir / "plan.json")
    (work_dir / "fingerprint.json").write_text(json.dumps({"dataset_dir": str(dataset)}))
    return work_dir, dataset, plan


# --- orientation ----------------------------------------------------------------------------------


def _stored(canonical: np.ndarray, axes: tuple[int, ...], flips: tuple[bool, ...]) -> tuple[np.ndarray, list]:
    """A copy of ``canonical`` stored with another axis order/flips, and the ITK direction that says so."""
    stored = canonical
    flip_axes = tuple(a for a in range(3) if flips[a])
    stored = np.flip(stored, flip_axes) if flip_axes else stored
    stored = np.transpose(stored, axes)  # stored axis a is canonical axis axes[a]
    direction = np.zeros((3, 3))
    for array_axis, canonical_axis in enumerate(axes):
        # array axis a is ITK index axis 2 - a; canonical axis n runs along physical axis 2 - n
        direction[2 - canonical_axis, 2 - array_axis] = -1.0 if flips[canonical_axis] else 1.0
    return np.ascontiguousarray(stored), direction.ravel().tolist()


def test_every_permutation_and_flip_is_found_and_inverted():
    canonical = np.random.default_rng(0).random((3, 4, 5, 6))  # a channel axis in front
    for axes in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            stored, direction = _stored(canonical[0], axes, flips)
            transform = canonical_transform(direction)
            np.testing.assert_array_equal(to_canonical(stored, transform), canonical[0])
            stored_channels = np.stack([_stored(c, axes, flips)[0] for c in canonical])
            assert np.shares_memory(to_canonical(stored_channels, transform), stored_channels)  # a view
            np.testing.assert_array_equal(to_canonical(stored_channels, transform), canonical)
            np.testing.assert_array_equal(from_canonical(to_canonical(stored, transform), transform), stored)
            spacing = tuple(float(s) for s in np.array([0.5, 1.0, 3.0])[list(axes)])
            assert canonical_spacing(spacing, transform) == (0.5, 1.0, 3.0)
            assert canonical_shape(stored.shape, transform) == (4, 5, 6)


@pytest.mark.parametrize("code", ["LPS", "RAS", "RAI", "LPI", "ASL", "PIR", "SLA"])
def test_lps_and_ras_stored_copies_become_identical(code):
    """The same physical volume reoriented by ITK (any file convention) canonicalises identically."""
    volume = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.8, 2.5))  # ITK (x, y, z)
    image.SetOrigin((10.0, -20.0, 30.0))
    stored = sitk.DICOMOrient(image, code)
    array = sitk.GetArrayFromImage(stored)
    transform = canonical_transform(stored.GetDirection())
    np.testing.assert_array_equal(to_canonical(array, transform), volume)
    assert canonical_spacing(tuple(reversed(stored.GetSpacing())), transform) == pytest.approx((2.5, 0.8, 0.7))
    assert is_identity(transform) == (code == "LPS")


def test_oblique_and_2d_directions():
    angle = np.deg2rad(25)  # rotated about z: still closest to identity
    rotation = [np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1]
    assert is_identity(canonical_transform(rotation))
    assert canonical_transform([-1, 0, 0, 1]) == {"axes": [0, 1, 2], "flips": [False, False, True]}
    assert canonical_transform([0, 1, 1, 0]) == {"axes": [0, 2, 1], "flips": [False, False, False]}
    with pytest.raises(ValueError, match="4 .* or 9"):
        canonical_transform([1, 0, 0])


# --- per-case steps -------------------------------------------------------------------------------


def test_nonzero_mask_fills_holes_and_bounding_box():
    image = np.zeros((2, 10, 10, 10), np.float32)
    image[0, 2:8, 3:9, 1:6] = 5
    image[0, 4, 5, 3] = 0  # a hole inside
    image[1, 9, 9, 9] = -1  # the second channel counts too
    mask = nonzero_mask(image)
    assert mask[4, 5, 3] and mask[9, 9, 9] and not mask[0, 0, 0]
    assert bounding_box(mask) == [[2, 10], [3, 10], [1, 10]]
    assert bounding_box(np.zeros((3, 4, 5), bool)) == [[0, 3], [0, 4], [0, 5]]


@pytest.mark.parametrize("scheme, check", [
    (CT, lambda x, out, m: np.allclose(out, (np.clip(x, -500, 300) - 20) / 150, atol=1e-5)),
    (ChannelNormalization("MR", "zscore"), lambda x, out, m: abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4),
    (ChannelNormalization("MR", "zscore", use_nonzero_mask=True),
     lambda x, out, m: abs(out[m].mean()) < 1e-5 and abs(out[m].std() - 1) < 1e-4 and not out[~m].any()),
    (ChannelNormalization("X", "rescale01"), lambda x, out, m: out.min() == 0 and abs(out.max() - 1) < 1e-6),
    (ChannelNormalization("X", "none"), lambda x, out, m: np.array_equal(out, x)),
])
def test_normalize_channel(scheme, check):
    rng = np.random.default_rng(2)
    values = rng.normal(100, 400, (6, 7, 8)).astype(np.float32)
    mask = rng.random((6, 7, 8)) > 0.3
    assert check(values, normalize_channel(values.copy(), scheme, mask), mask)


def test_ct_prior_channels_are_soft_windows_of_raw_hu():
    hu = np.array([-1000, -700, -400, -100, 0, 100, 300, 400, 1500], np.float32)
    priors = ct_prior_channels(hu, PRIORS)
    lung, soft, bone = priors
    assert lung[1] > 0.99 and soft[4] > 0.99 and bone[8] > 0.99  # well inside each window
    assert lung[2] == pytest.approx(0.5, abs=1e-3) and bone[7] == pytest.approx(0.5)  # edges are 0.5
    assert soft[3] == pytest.approx(0.5, abs=1e-3) and soft[5] == pytest.approx(0.5, abs=1e-3)
    assert lung[4] < 1e-6 and soft[1] < 1e-6 and bone[5] < 1e-6  # far outside
    ramp = ct_prior_channels(np.array([390.0, 410.0], np.float32), PRIORS[2:])[0]
    assert ramp == pytest.approx([0.119, 0.881], abs=1e-3)  # PRIOR_EDGE_HU wide, 12% -> 88%
    assert PRIOR_EDGE_HU == 20.0


def test_class_locations_are_bounded_seeded_and_exact():
    seg = np.zeros((10, 10, 10), np.int16)
    seg[2:8, 2:8, 2:8] = 1
    seg[0, 0, :3] = 4
    seg[9, 9, 9] = 9  # an "ignore" value
    seg[:, :, 9] = -1
    locations = class_locations(seg, exclude=[9], max_per_class=50, seed=3)
    assert set(locations) == {"1", "4"}
    assert len(locations["1"]) == 50 and len(locations["4"]) == 3
    assert all(seg[tuple(c)] == 1 for c in locations["1"])
    assert len({tuple(c) for c in locations["1"]}) == 50  # without replacement
    assert locations == class_locations(seg, exclude=[9], max_per_class=50, seed=3)
    assert locations["1"] != class_locations(seg, exclude=[9], max_per_class=50, seed=4)["1"]


def test_chunked_volume_scans_give_the_same_results(monkeypatch):
    import autoseg.preprocessing as preprocessing
    import autoseg.resampling as resampling

    rng = np.random.default_rng(5)
    seg = rng.integers(-1, 4, (9, 11, 13)).astype(np.int16)
    values = rng.normal(300, 500, (9, 11, 13)).astype(np.float32)
    zscore = ChannelNormalization("MR", "zscore", use_nonzero_mask=True)

    def run():
        return (class_locations(seg, max_per_class=40, seed=1), normalize_channel(values.copy(), zscore, seg >= 0),
                ct_prior_channels(values, PRIORS))

    whole = run()
    monkeypatch.setattr(preprocessing, "_CHUNK", 7)
    monkeypatch.setattr(resampling, "_SLAB_ELEMENTS", 5)
    chunked = run()
    assert chunked[0] == whole[0]
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-6)
    np.testing.assert_allclose(chunked[2], whole[2], rtol=1e-6, atol=1e-7)  # SIMD tails differ by an ulp


def test_ct_case_clip_zscore_priors_and_seg_marker():
    image, label = blob_case()
    plan = make_plan(make_config((1.0, 1.0, 1.0), ct_priors=PRIORS))  # own spacing: no resampling
    result = preprocess_case(make_case(image, label), plan, "3d_fullres")
    props = result.properties
    body = nonzero_mask(image[None])
    box = tuple(slice(a, b) for a, b in props.crop_bbox)
    assert result.image.shape == (4, *props.shape_after_crop) and result.image.dtype == np.float32
    expected = (np.clip(image[box], -500, 300) - 20) / 150
    np.testing.assert_allclose(result.image[0], expected, atol=1e-5)
    assert result.image[0].min() == pytest.approx((-500 - 20) / 150)
    assert result.image[0].max() == pytest.approx((300 - 20) / 150)
    # Priors come from the raw HU, not the clipped values: "lung" at -800 HU is ~1 though clipped to -500.
    lung = image[box] == -800
    assert lung.any() and result.image[1][lung].min() > 0.99 and result.image[3][lung].max() < 1e-6
    assert result.image[3][image[box] == 900].min() > 0.99
    assert props.channels == ["CT", "prior_lung", "prior_soft_tissue", "prior_bone"]
    assert result.label.dtype == np.int16
    np.testing.assert_array_equal(result.label == -1, ~body[box])  # background outside the body
    np.testing.assert_array_equal(np.maximum(result.label, 0), label[box])


def test_zscore_uses_the_nonzero_region_after_resampling():
    image, label = blob_case(1)
    norm = ChannelNormalization("MR", "zscore", use_nonzero_mask=True)
    plan = make_plan(make_config((1.5, 0.7, 0.7), normalization=(norm,)), channels=("MR",))
    result = preprocess_case(make_case(np.abs(image) + 1 * (image != 0), label), plan, "3d_fullres")
    inside = result.label >= 0
    assert result.image.shape[1:] == result.label.shape == tuple(result.properties.shape_after_resampling)
    assert abs(result.image[0][inside].mean()) < 1e-4 and abs(result.image[0][inside].std() - 1) < 1e-3
    assert not result.image[0][~inside].any()


def test_sidecar_has_the_documented_fields_and_is_json():
    image, label = blob_case(2)
    plan = make_plan(make_config((1.5, 0.8, 0.8)))
    props = preprocess_case(make_case(image, label, (2.0, 1.0, 1.0)), plan, "3d_fullres").properties
    for key in ("case_id", "source_files", "spacing", "origin", "direction", "shape", "orientation", "crop_bbox",
                "shape_after_crop", "shape_after_resampling", "spacing_after_resampling", "class_locations",
                "configuration_hash", "plan_hash"):
        assert key in props.to_dict(), key
    assert props.configuration_hash == configuration_hash(plan, "3d_fullres")
    assert props.shape_after_resampling == [round(s * 2 / 1.5) if i == 0 else round(s / 0.8)
                                            for i, s in enumerate(props.shape_after_crop)]
    assert json.loads(json.dumps(props.to_dict())) == props.to_dict()


def test_unlabelled_case_gives_the_same_image():
    image, label = blob_case(3)
    plan = make_plan(make_config((1.3, 0.9, 0.9), normalization=(ChannelNormalization("MR", "zscore", True),)),
                     channels=("MR",))
    labelled = preprocess_case(make_case(image, label, (2.0, 1.0, 1.0)), plan, "3d_fullres")
    unlabelled = preprocess_case(make_case(image, None, (2.0, 1.0, 1.0)), plan, "3d_fullres")
    assert unlabelled.label is None and unlabelled.properties.class_locations == {}
    np.testing.assert_array_equal(unlabelled.image, labelled.image)


def test_anisotropic_case_resamples_the_slow_axis_separately():
    rng = np.random.default_rng(4)
    image = rng.normal(0, 1, (6, 16, 16)).astype(np.float32) + 10  # no zeros: no crop
    label = (rng.random((6, 16, 16)) > 0.5).astype(np.int16)
    none = ChannelNormalization("X", "none")
    plan = make_plan(make_config((2.0, 1.0, 1.0), normalization=(none,)), channels=("X",))
    result = preprocess_case(make_case(image, label, (5.0, 1.0, 1.0)), plan, "3d_fullres")
    assert result.properties.resampling.slow_axis == 0
    assert result.image.shape == (1, 15, 16, 16)
    picks = np.minimum(((np.arange(15) + 0.5) * 6 / 15).astype(int), 5)
    np.testing.assert_array_equal(result.image[0], image[picks])  # whole slices, never blended
    np.testing.assert_array_equal(result.label, label[picks])


def test_2d_configuration_never_resamples_z_and_2d_cases_come_back_2d():
    image, label = blob_case(5)
    plan = make_plan(make_config((9.0, 0.8, 0.8), dim=2, name="2d", resampling=Resampling(label_order=0)))
    result = preprocess_case(make_case(image, label, (2.0, 1.0, 1.0)), plan, "2d")
    assert result.image.shape[1] == result.properties.shape_after_crop[0]
    image2d, label2d = image[6], label[6]
    case = CaseData("flat", image2d[None, None], label2d[None], (1.0, 1.0, 1.0), True,
                    Image(image2d, (1.0, 1.0), (), (1, 0, 0, -1)))
    flat = preprocess_case(case, plan, "2d")
    assert flat.image.shape[1] == 1
    restored = restore_to_original(flat.label, flat.properties, "label")
    assert restored.shape == label2d.shape
    np.testing.assert_array_equal(restored, label2d)


# --- the inverse ----------------------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _example_cases(kind: str, num_cases: int, tmp_path: Path) -> list[CaseData]:
    examples = pytest.importorskip("autoseg.examples")
    folder = examples.make_example(tmp_path / kind, kind=kind, num_cases=num_cases, seed=0)
    return [load_case(c) for c in training_cases(folder)], folder


def _plan_for(cases: list[CaseData], spacing, label_order: int, dim: int) -> Plan:
    channels = cases[0].image.shape[0]
    norms = tuple(ChannelNormalization(f"c{i}", "zscore", use_nonzero_mask=True) for i in range(channels))
    config = make_config(spacing, normalization=norms, dim=dim, name="3d_fullres" if dim == 3 else "2d",
                         resampling=Resampling(label_order=label_order))
    return make_plan(config, channels=tuple(n.channel for n in norms),
                     labels={"background": 0, "a": 1, "b": 2, "c": 3})


@pytest.mark.parametrize("kind, num_cases", [("ct", 4), ("mri", 3), ("2d", 3)])
def test_label_round_trip_on_example_datasets(kind, num_cases, tmp_path):
    """Nearest-neighbour path: exact (Dice 1) when no axis is downsampled, and the same geometry."""
    cases, folder = _example_cases(kind, num_cases, tmp_path)
    spacings = np.array([canonical_spacing(c.spacing, canonical_transform(c.reference.direction)) for c in cases])
    dim = 2 if kind == "2d" else 3
    plan = _plan_for(cases, spacings.min(0), label_order=0, dim=dim)
    name = next(iter(plan.configurations))
    for case, files in zip(cases, training_cases(folder)):
        result = preprocess_case(case, plan, name)
        restored = restore_to_original(result.label, result.properties, "label")
        original = read_image(files.label)
        assert restored.shape == original.array.shape
        for value in np.unique(original.array)[1:]:
            assert _dice(restored == value, original.array == value) >= 0.99
        np.testing.assert_array_equal(restored, original.array)
        # Geometry: written like the source image, the result sits exactly where the label was.
        out_path = tmp_path / "out" / files.label.name
        write_like(restored.astype(original.array.dtype), case.reference, out_path)
        written = read_image(out_path)
        assert written.spacing == original.spacing and written.origin == original.origin
        assert written.direction == original.direction


@pytest.mark.parametrize("kind, num_cases, floor", [("ct", 4, 0.96), ("mri", 3, 0.96)])
def test_label_round_trip_at_median_spacing_loses_only_resolution(kind, num_cases, floor, tmp_path):
    """Downsampled cases lose detail thinner than the new voxel; pooled Dice per class stays high."""
    cases, _ = _example_cases(kind, num_cases, tmp_path)
    spacings = np.array([canonical_spacing(c.spacing, canonical_transform(c.reference.direction)) for c in cases])
    plan = _plan_for(cases, np.median(spacings, 0), label_order=1, dim=3)
    overlap, total = np.zeros(4), np.zeros(4)
    for case in cases:
        result = preprocess_case(case, plan, "3d_fullres")
        restored = restore_to_original(result.label, result.properties, "label")
        for value in range(1, 4):
            a, b = restored == value, case.label == value
            overlap[value] += 2 * np.logical_and(a, b).sum()
            total[value] += a.sum() + b.sum()
    pooled = overlap[total > 0] / total[total > 0]
    assert pooled.min() >= floor, pooled


def test_restore_probabilities_fill_and_orientation():
    image, label = blob_case(6)
    stored, direction = _stored(image, (2, 0, 1), (True, False, True))
    stored_label, _ = _stored(label, (2, 0, 1), (True, False, True))
    plan = make_plan(make_config((1.5, 0.8, 0.8)))
    result = preprocess_case(make_case(stored, stored_label, direction=direction), plan, "3d_fullres")
    one_hot = np.stack([result.label == v for v in (0, 1, 2)]).astype(np.float32)
    one_hot[0][result.label == -1] = 1
    probabilities = restore_to_original(one_hot, result.properties, "probabilities")
    assert probabilities.shape == (3, *stored.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    outside = ~nonzero_mask(stored[None].astype(np.float32))
    assert np.all(probabilities[0][outside] > 0.5)
    assert _dice(probabilities.argmax(0) == 1, stored_label == 1) > 0.9
    regions = restore_to_original(one_hot[1:], result.properties, "probabilities", fill=0.0)
    box = result.properties.crop_bbox
    if any(a > 0 or b < s for (a, b), s in zip(box, result.properties.shape_canonical)):
        assert regions.min() == 0.0
    with pytest.raises(ValueError, match="expected"):
        restore_to_original(one_hot[:, :-1], result.properties, "probabilities")


# --- the dataset ----------------------------------------------------------------------------------


def test_preprocess_dataset_writes_the_documented_layout(work, monkeypatch):
    monkeypatch.setenv(WORKER_START_ENV, "0")  # worker processes even for these tiny cases
    work_dir, dataset, plan = work
    summaries = preprocess_dataset(work_dir, n_jobs=2, progress=False)
    assert set(summaries) == {"3d_fullres", "2d"}
    for name, summary in summaries.items():
        folder = work_dir / "preprocessed" / name
        assert summary.processed == ["c0", "c1", "c2", "c3"] and not summary.failed
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["configuration_hash"] == configuration_hash(plan, name)
        assert manifest["cases"] == ["c0", "c1", "c2", "c3"]
        assert manifest["stored_bytes_total"] == sum(os.path.getsize(p) for p in folder.iterdir()
                                                     if p.name != MANIFEST)
        assert manifest["raw_bytes_total"] == sum(os.path.getsize(p) for p in dataset.rglob("*.nii.gz"))
        image, seg, props = load_preprocessed_case(folder, "c1")
        assert isinstance(image, np.memmap) and image.dtype == np.float32 and seg.dtype == np.int16
        assert image.shape == (1, *seg.shape) and list(seg.shape) == props.shape_after_resampling
        assert props.source_files["label"].endswith("c1.nii.gz")
        assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert summaries["2d"].stored_bytes != summaries["3d_fullres"].stored_bytes  # z kept in 2d


def test_resume_redoes_half_written_cases_and_leaves_finished_ones(work):
    work_dir, _, _ = work
    preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)
    folder = work_dir / "preprocessed" / "3d_fullres"
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name.startswith(("c2", "c3"))}
    (folder / ".c0.npy.abc123.tmp.npy").write_bytes(b"half a file")  # killed while writing c0
    case_paths(folder, "c1")[2].unlink()  # killed after the arrays, before the sidecar
    summary = preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)["3d_fullres"]
    assert summary.processed == ["c0", "c1"] and summary.skipped == ["c2", "c3"]
    assert not (folder / ".c0.npy.abc123.tmp.npy").exists()
    assert case_paths(folder, "c1")[2].exists()
    assert stamps == {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name.startswith(("c2", "c3"))}
    again = preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)["3d_fullres"]
    assert again.processed == [] and len(again.skipped) == 4


def test_corrupted_case_is_named_and_the_others_complete(work):
    work_dir, dataset, _ = work
    broken = dataset / "imagesTr" / "c2_0000.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    with pytest.raises(DatasetValidationError, match="c2_0000.nii.gz"):  # the dataset checks stop it first
        preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)
    assert not (work_dir / "preprocessed" / "3d_fullres").exists()
    with pytest.raises(PreprocessingError) as caught:  # a file that breaks after the checks: its case fails
        preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False, validate=False)
    message = str(caught.value)
    assert "c2" in message and str(broken) in message and "c0" not in message
    assert set(caught.value.failures) == {"3d_fullres/c2"}
    folder = work_dir / "preprocessed" / "3d_fullres"
    assert [c for c in ("c0", "c1", "c2", "c3") if case_paths(folder, c)[2].exists()] == ["c0", "c1", "c3"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["cases"] == ["c0", "c1", "c3"] and list(manifest["failed"]) == ["c2"]
    write_image(Image(blob_case(2)[0].astype(np.int16), (2.0, 1.0, 1.0)), broken)
    fixed = preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)["3d_fullres"]
    assert fixed.processed == ["c2"]


def test_plan_change_is_detected_and_force_redoes_everything(work):
    work_dir, _, plan = work
    preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)
    changed = make_plan(make_config((1.0, 1.0, 1.0)), make_config((2.0, 1.2, 1.2), dim=2, name="2d"))
    save_plan(changed, work_dir / "plan.json")
    with pytest.raises(PreprocessingError, match="another plan.*--force"):
        preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, progress=False)
    summary = preprocess_dataset(work_dir, ["3d_fullres"], n_jobs=1, force=True, progress=False)["3d_fullres"]
    assert summary.processed == ["c0", "c1", "c2", "c3"]
    folder = work_dir / "preprocessed" / "3d_fullres"
    assert json.loads((folder / MANIFEST).read_text())["configuration_hash"] == configuration_hash(changed, "3d_fullres")
    _, seg, props = load_preprocessed_case(folder, "c0")
    assert props.spacing_after_resampling == [1.0, 1.0, 1.0] and seg.shape[0] > 12


def test_dataset_location_comes_from_the_fingerprint_or_the_argument(work, tmp_path):
    work_dir, dataset, _ = work
    (work_dir / "fingerprint.json").write_text("{}")
    with pytest.raises(PreprocessingError, match="dataset_dir"):
        preprocess_dataset(work_dir, n_jobs=1, progress=False)
    summaries = preprocess_dataset(work_dir, ["2d"], n_jobs=1, dataset_dir=dataset, progress=False)
    assert list(summaries) == ["2d"] and len(summaries["2d"].processed) == 4


def test_summary_reads_well(work):
    work_dir, _, _ = work
    summary = preprocess_dataset(work_dir, ["2d"], n_jobs=1, progress=False)["2d"]
    text = str(summary)
    assert text.startswith("4 case(s) preprocessed, 0 already done, 0 failed in ")
    assert str(work_dir / "preprocessed" / "2d") in text and "MB on disk" in text


def test_end_to_end_with_the_planner_on_the_example_ct(tmp_path):
    """make_example -> fingerprint -> make_plan (CT priors) -> preprocess_dataset -> stored cases."""
    examples = pytest.importorskip("autoseg.examples")
    fingerprint_module = pytest.importorskip("autoseg.fingerprint")
    planning = pytest.importorskip("autoseg.planning")
    dataset = examples.make_example(tmp_path / "raw", kind="ct", num_cases=3, seed=0)
    work_dir = tmp_path / "work"
    fingerprint, _ = fingerprint_module.load_or_compute_fingerprint(dataset, work_dir, n_jobs=1, progress=False)
    plan = planning.make_plan(fingerprint, dataset, configurations=["3d_fullres"], ct_priors=True)
    save_plan(plan, work_dir / "plan.json")
    summary = preprocess_dataset(work_dir, n_jobs=1, progress=False)["3d_fullres"]
    assert len(summary.processed) == 3 and summary.stored_bytes > summary.raw_bytes
    config = plan.configuration("3d_fullres")
    ct = config.normalization[0]
    low, high = (ct.clip_low - ct.mean) / ct.std, (ct.clip_high - ct.mean) / ct.std
    for files in training_cases(dataset):
        image, seg, props = load_preprocessed_case(summary.output_dir, files.case_id)
        assert image.shape[0] == 1 + len(config.ct_priors) == config.topology.in_channels
        assert low - 1e-5 <= image[0].min() and image[0].max() <= high + 1e-5  # clipped per the plan
        assert 0 <= image[1:].min() and image[1:].max() <= 1  # soft masks
        assert props.spacing_after_resampling == pytest.approx(list(config.spacing))
        original = read_image(files.label).array
        restored = restore_to_original(np.asarray(seg), props, "label")
        assert restored.shape == original.shape
        for value in np.unique(original)[1:]:
            assert _dice(restored == value, original == value) > 0.85  # small lesions lose most
        for value, points in props.class_locations.items():
            assert all(seg[tuple(p)] == int(value) for p in points[:50])
