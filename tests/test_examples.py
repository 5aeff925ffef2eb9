"""Tests of autoseg.examples: layout, determinism, and the physics each kind promises."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from autoseg.dataset import (
    CaseData,
    index_cases,
    load_case,
    load_dataset_json,
    parse_dataset_json,
    training_cases,
)
from autoseg.examples import (
    EXAMPLE_KINDS,
    _stored_as,
    deformed_ellipsoid,
    example_case,
    example_dataset_json,
    make_example,
    smooth_field,
)
from autoseg.io import read_image

KINDS = ("ct", "mri", "2d", "xray")
NUM_CASES = 3
# One core shared with others: generous, but far below what a per-voxel Python loop would take.
MAX_SECONDS = 30.0


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, float]]:
    """Each kind generated once with three cases: folder and generation time."""
    out = {}
    for kind in KINDS:
        dest = tmp_path_factory.mktemp(f"example_{kind}") / "dataset"
        start = time.perf_counter()
        make_example(dest, kind=kind, num_cases=NUM_CASES, seed=0)
        out[kind] = (dest, time.perf_counter() - start)
    return out


@pytest.fixture(scope="module")
def loaded(datasets: dict[str, tuple[Path, float]]) -> dict[str, list[CaseData]]:
    return {kind: [load_case(c) for c in training_cases(folder)] for kind, (folder, _) in datasets.items()}


def physical_centroid(mask: np.ndarray, reference) -> np.ndarray:
    """Mean physical position (ITK x, y, z in mm) of a mask's voxels, from the file's geometry."""
    indices = np.argwhere(mask).mean(axis=0)  # array order (z, y, x)
    itk_index = indices[::-1] * np.asarray(reference.spacing)[::-1]
    direction = np.asarray(reference.direction).reshape(3, 3)
    return np.asarray(reference.origin) + direction @ itk_index


def body_mask(ct: np.ndarray) -> np.ndarray:
    """Everything enclosed by the body outline, slice by slice (lungs are holes in each slice)."""
    return np.stack([ndimage.binary_fill_holes(s > -500) for s in ct])


# --- layout and dataset.json ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_generates_quickly_and_loads(kind: str, datasets, loaded) -> None:
    folder, seconds = datasets[kind]
    assert seconds < MAX_SECONDS, f"{kind}: {seconds:.1f} s for {NUM_CASES} cases"
    spec = EXAMPLE_KINDS[kind]
    dataset = load_dataset_json(folder)
    assert dataset.num_training == NUM_CASES
    assert dataset.channel_list == list(spec.channel_names)
    assert dataset.file_ending == spec.file_ending
    assert dataset.name == f"autoseg_example_{kind}" and dataset.description
    cases = loaded[kind]
    assert [c.case_id for c in cases] == [f"{spec.case_prefix}_{i:03d}" for i in range(NUM_CASES)]
    for case in cases:
        assert case.image.dtype == np.float32 and case.image.shape[0] == len(spec.channel_names)
        assert case.label.shape == case.image.shape[1:]
        assert set(np.unique(case.label)) <= dataset.label_values
        assert case.is_2d == (kind in ("2d", "xray"))
    # No test split was asked for, so no test folders.
    assert not (folder / "imagesTs").exists() and not (folder / "labelsTs").exists()


def test_dataset_json_declares_labels_and_regions(datasets) -> None:
    ct = load_dataset_json(datasets["ct"][0])
    assert ct.labels == {"background": 0, "liver": 1, "kidney": 2, "lesion": 3}
    assert ct.channel_names == {"0": "CT"} and not ct.has_regions
    mri = load_dataset_json(datasets["mri"][0])
    assert mri.channel_list == ["T1", "T1ce", "T2", "FLAIR"]
    assert mri.labels == {"background": 0, "whole_tumor": (1, 2, 3), "tumor_core": (1, 3), "enhancing_tumor": 3}
    assert mri.regions_class_order == (2, 1, 3)
    cells = load_dataset_json(datasets["2d"][0])
    assert cells.file_ending == ".png" and cells.labels == {"background": 0, "cell": 1, "nucleus": 2}


@pytest.mark.parametrize("kind", KINDS)
def test_example_kinds_describe_valid_datasets(kind: str) -> None:
    spec = EXAMPLE_KINDS[kind]
    assert spec.summary and spec.default_num_cases >= 8
    model, problems = parse_dataset_json(example_dataset_json(kind, spec.default_num_cases))
    assert problems == [] and model is not None
    assert model.num_training == spec.default_num_cases


def test_held_out_cases_go_to_images_ts_with_references(tmp_path: Path) -> None:
    dest = make_example(tmp_path / "cells", kind="2d", num_cases=2, num_test_cases=2, seed=3)
    dataset = load_dataset_json(dest)
    assert dataset.num_training == 2 and dataset.extra["numTest"] == 2
    assert [c.case_id for c in training_cases(dest)] == ["cells_000", "cells_001"]
    test = index_cases(dest / "imagesTs", ".png", 1, dest / "labelsTs")
    assert test.problems == []
    assert [c.case_id for c in test.cases] == ["cells_002", "cells_003"]
    # A held-out case is the case that index would be in a bigger training set, not a repeat.
    held_out = load_case(test.cases[0])
    assert np.array_equal(held_out.image[0, 0], example_case("2d", 2, seed=3).images[0].array)
    assert not np.array_equal(held_out.label[0], load_case(training_cases(dest)[0]).label[0])


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"kind": "pet"}, ValueError, "unknown example kind"),
    ({"num_cases": 0}, ValueError, "num_cases"),
    ({"num_test_cases": -1}, ValueError, "num_test_cases"),
    ({"seed": -2}, ValueError, "seed"),
])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make_example(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_example(tmp_path, kind="2d", num_cases=1)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_example(empty, kind="2d", num_cases=1) == empty  # an empty folder is fine


# --- determinism ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_arrays_other_seed_different(kind: str, datasets, tmp_path: Path) -> None:
    again = make_example(tmp_path / "again", kind=kind, num_cases=2, seed=0)
    first = training_cases(datasets[kind][0])
    for original, repeat in zip(first, training_cases(again)):
        for a, b in zip(original.images + (original.label,), repeat.images + (repeat.label,)):
            image_a, image_b = read_image(a), read_image(b)
            assert image_a.array.dtype == image_b.array.dtype
            assert np.array_equal(image_a.array, image_b.array)
            assert image_a.spacing == image_b.spacing and image_a.direction == image_b.direction
    other = example_case(kind, 0, seed=1)
    same = example_case(kind, 0, seed=0)
    assert other.images[0].array.shape != same.images[0].array.shape or \
        not np.array_equal(other.images[0].array, same.images[0].array)
    assert not np.array_equal(example_case(kind, 1, seed=0).label.array, same.label.array)


# --- CT -----------------------------------------------------------------------------------------------


def test_ct_is_in_hounsfield_units(datasets, loaded) -> None:
    for case, files in zip(loaded["ct"], training_cases(datasets["ct"][0])):
        assert read_image(files.images[0]).array.dtype == np.int16
        ct, label = case.image[0], case.label
        body = body_mask(ct)
        air = ~ndimage.binary_dilation(body, iterations=3)  # away from the body, air is noise only
        assert -1010 < ct[air].mean() < -985, f"{case.case_id}: air at {ct[air].mean():.0f} HU"
        assert 5 < ct[air].std() < 30
        lungs = body & (ct < -500)
        assert lungs.sum() > 100, f"{case.case_id}: no lungs"
        # The median, as the lung edges are a partial-volume mix with the chest wall.
        assert -900 < np.median(ct[lungs]) < -800, f"{case.case_id}: lungs at {np.median(ct[lungs]):.0f} HU"
        bone = ct > 400
        assert bone.sum() > 50 and 500 < ct[bone].mean() < 900
        soft = body & (ct > -500)
        assert -120 < np.median(ct[soft]) < 80, f"{case.case_id}: body median {np.median(ct[soft]):.0f} HU"
        # Organ rims are a partial-volume mix with their neighbours (fat, lung), so look inside.
        liver = ndimage.binary_erosion(label == 1, np.ones((1, 3, 3), bool))
        assert 45 < ct[liver].mean() < 75, f"{case.case_id}: liver at {ct[liver].mean():.0f} HU"
        kidney = ndimage.binary_erosion(label == 2, np.ones((1, 3, 3), bool))
        if kidney.sum() > 100:  # kidneys may lie below a small field of view
            assert 15 < ct[kidney].mean() < 50, f"{case.case_id}: kidneys at {ct[kidney].mean():.0f} HU"
        fat = soft & (ct < -50)
        assert fat.sum() > 100 and -130 < np.median(ct[fat]) < -70  # subcutaneous and visceral fat


def test_ct_lesions_sit_in_the_liver_with_contrast(loaded) -> None:
    lesion_cases = [c for c in loaded["ct"] if (c.label == 3).any()]
    assert lesion_cases
    for case in lesion_cases:
        ct, label = case.image[0], case.label
        lesion = label == 3
        # Every lesion voxel touches only liver or lesion (liver ring around it), give or take the edge.
        ring = ndimage.binary_dilation(lesion, np.ones((1, 3, 3), bool)) & ~lesion
        assert np.mean(label[ring] == 1) > 0.8, case.case_id
        # Each lesion is 30-50 HU darker or brighter than the liver; small ones lose some of that
        # to partial volume.
        components, count = ndimage.label(lesion)
        means = ndimage.mean(ct, components, range(1, count + 1))
        assert np.all(np.abs(np.asarray(means) - ct[label == 1].mean()) > 12), (case.case_id, means)


def test_ct_has_a_case_without_lesion(loaded) -> None:
    has_lesion = [bool((c.label == 3).any()) for c in loaded["ct"]]
    assert not all(has_lesion) and any(has_lesion)
    assert all((c.label == 1).any() for c in loaded["ct"])  # the liver is always in view


def test_ct_spacing_is_anisotropic_with_thick_slices(loaded) -> None:
    for case in loaded["ct"]:
        z, y, x = case.spacing
        assert 2.5 <= z <= 5.0 and 0.6 <= y <= 0.9 and y == pytest.approx(x)
        assert z > 2.5 * y
    assert len({c.image.shape for c in loaded["ct"]}) == NUM_CASES  # sizes vary


@pytest.mark.parametrize("kind", ["ct", "mri"])
def test_some_cases_are_stored_flipped_or_permuted(kind: str, loaded) -> None:
    references = [c.reference for c in loaded[kind]]
    identity = tuple(np.eye(3).ravel())
    assert any(r.direction != identity and any(o != 0 for o in r.origin) for r in references)
    assert any(r.direction == identity for r in references)


def test_ct_anatomy_is_physically_consistent_whatever_the_storage(loaded) -> None:
    """In LPS physical space, the liver is on the patient's right, the spine behind, lungs above."""
    for case in loaded["ct"]:
        ct, label, reference = case.image[0], case.label, case.reference
        liver = physical_centroid(label == 1, reference)
        bone = physical_centroid(ct > 400, reference)
        lungs = physical_centroid(body_mask(ct) & (ct < -500), reference)
        assert liver[0] < bone[0] - 5, f"{case.case_id}: liver not on the right"
        assert bone[1] > liver[1] + 5, f"{case.case_id}: spine not behind the liver"
        assert lungs[2] > liver[2], f"{case.case_id}: lungs not above the liver"


def test_storage_keeps_every_voxel_in_place() -> None:
    rng = np.random.default_rng(0)
    array = rng.random((4, 5, 6))
    spacing, origin = (3.0, 0.7, 0.8), (10.0, -20.0, 30.0)
    peak = np.unravel_index(np.argmax(array), array.shape)
    expected = np.asarray(origin) + (np.asarray(peak) * spacing)[::-1]
    for order in [(0, 1, 2), (0, 2, 1), (2, 0, 1), (1, 2, 0)]:
        for flips in [(False, False, False), (True, False, True), (False, True, True)]:
            (stored,), new_spacing, new_origin, direction = _stored_as([array], spacing, origin, order, flips)
            assert stored.shape == tuple(array.shape[s] for s in order)
            index = np.unravel_index(np.argmax(stored), stored.shape)
            position = np.asarray(new_origin) + np.reshape(direction, (3, 3)) @ (
                np.asarray(index) * new_spacing)[::-1]
            np.testing.assert_allclose(position, expected, atol=1e-9)


# --- MRI ----------------------------------------------------------------------------------------------


def test_mri_is_skull_stripped_float_and_isotropic(datasets, loaded) -> None:
    for case, files in zip(loaded["mri"], training_cases(datasets["mri"][0])):
        assert read_image(files.images[0]).array.dtype == np.float32
        assert max(case.spacing) - min(case.spacing) < 1e-6 and 0.85 < case.spacing[0] < 1.15
        assert all(48 <= n <= 64 for n in case.image.shape[1:]) or case.case_id.endswith("3")
        nonzero = case.image != 0
        assert all(np.array_equal(nonzero[0], nonzero[c]) for c in range(1, 4))  # one brain mask
        assert 0.15 < nonzero[0].mean() < 0.6
        assert not (case.label[~nonzero[0]]).any()  # tumour only inside the brain


def test_mri_tumour_regions_nest(loaded) -> None:
    for case in loaded["mri"]:
        label = case.label
        whole, core, enhancing = label > 0, np.isin(label, (1, 3)), label == 3
        assert whole.sum() > core.sum() > 0
        # Edema surrounds the core and the core surrounds nothing but tumour: a one-voxel dilation
        # of the core (and so of the enhancing part) stays inside the whole tumour.
        assert not (ndimage.binary_dilation(core) & ~whole).any(), case.case_id
        assert not (ndimage.binary_dilation(enhancing) & ~whole).any(), case.case_id


def test_mri_channel_contrasts(loaded) -> None:
    t1, t1ce, t2, flair = range(4)
    with_enhancing = [c for c in loaded["mri"] if (c.label == 3).sum() > 20]
    assert with_enhancing
    for case in loaded["mri"]:
        image, label = case.image, case.label
        brain = image[0] > 0
        edema = label == 2

        def mean(channel: int, mask: np.ndarray, image: np.ndarray = image) -> float:
            return float(image[channel][mask].mean())

        assert mean(flair, edema) > 1.2 * mean(flair, brain), case.case_id
        assert mean(t2, edema) > 1.2 * mean(t2, brain), case.case_id
        if case in with_enhancing:
            enhancing = label == 3
            assert mean(t1ce, enhancing) > 1.2 * mean(t1ce, brain), case.case_id
            # Enhancement is a T1ce effect: the same voxels are unremarkable on plain T1.
            assert mean(t1ce, enhancing) / mean(t1ce, brain) > 1.3 * mean(t1, enhancing) / mean(t1, brain)


def test_mri_variants_lack_a_class() -> None:
    assert not (example_case("mri", 3).label.array == 3).any()  # non-enhancing tumour
    assert not (example_case("mri", 1).label.array == 1).any()  # solid enhancing, no necrosis


# --- 2D -----------------------------------------------------------------------------------------------


def test_2d_cases_are_grey_png_with_cells_and_nuclei(datasets, loaded) -> None:
    for case, files in zip(loaded["2d"], training_cases(datasets["2d"][0])):
        assert files.images[0].name.endswith(".png")
        raw = read_image(files.images[0])
        assert raw.array.ndim == 2 and raw.array.dtype == np.uint8
        assert all(80 <= n <= 192 for n in raw.array.shape)
        assert case.image.shape == (1, 1, *raw.array.shape) and case.spacing == (1.0, 1.0, 1.0)
        image, label = case.image[0, 0], case.label[0]
        background, cell = image[label == 0].mean(), image[label == 1].mean()
        assert cell > background + 40
        if (label == 2).any():
            assert image[label == 2].mean() > cell + 20
        # Nuclei lie inside cells: they never touch the background.
        assert not (ndimage.binary_dilation(label == 2) & (label == 0)).any()
        # The background is uneven (illumination ramp), not a constant plus noise.
        smooth_background = ndimage.uniform_filter(np.where(label == 0, image, 0).astype(float), 15)
        assert np.ptp(smooth_background[label == 0]) > 10


def test_2d_case_without_nuclei_exists_in_larger_sets() -> None:
    assert not (example_case("2d", 4).label.array == 2).any()
    assert (example_case("2d", 4).label.array == 1).any()


# --- building blocks ----------------------------------------------------------------------------------


def test_smooth_field_is_standardised_and_smooth() -> None:
    axes = [np.arange(30.0), np.arange(40.0), np.arange(20.0)]
    field = smooth_field(np.random.default_rng(1), axes, scale=8.0)
    assert field.shape == (30, 40, 20) and field.dtype == np.float32
    assert abs(field.mean()) < 1e-5 and field.std() == pytest.approx(1.0, abs=1e-4)
    for axis in range(3):
        assert np.abs(np.diff(field, axis=axis)).mean() < 0.3  # neighbours are alike
    assert np.corrcoef(field[:, :, :10].ravel(), field[:, :, 10:].ravel())[0, 1] < 0.9  # not constant


@pytest.mark.parametrize(("radii", "angle"), [((10.0, 6.0, 8.0), 0.0), ((5.0, 12.0, 7.0), 0.7)])
def test_undeformed_ellipsoid_has_the_analytic_volume(radii: tuple[float, ...], angle: float) -> None:
    axes = [np.arange(-20.0, 21.0)] * 3
    mask = deformed_ellipsoid(np.random.default_rng(0), axes, (0.5, -1.0, 2.0), radii, angle=angle)
    assert mask.sum() == pytest.approx(4 / 3 * np.pi * np.prod(radii), rel=0.03)
    deformed = deformed_ellipsoid(np.random.default_rng(0), axes, (0.5, -1.0, 2.0), radii, 0.1, 6.0, angle)
    assert deformed.sum() == pytest.approx(mask.sum(), rel=0.35) and not np.array_equal(deformed, mask)
    assert not deformed_ellipsoid(np.random.default_rng(0), axes, (90.0, 0.0, 0.0), radii).any()


# --- X-ray ---------------------------------------------------------------------------------------------


def test_xray_is_a_projection_with_dense_structures_bright(datasets, loaded) -> None:
    xray = load_dataset_json(datasets["xray"][0])
    assert xray.channel_list == ["X-ray"] and xray.file_ending == ".png"
    assert xray.labels == {"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3, "clavicles": 4}
    for case, files in zip(loaded["xray"], training_cases(datasets["xray"][0])):
        stored = read_image(files.images[0]).array
        assert stored.dtype == np.uint16 and stored.max() <= 4095  # 12 bits in a 16-bit PNG
        image, label = case.image[0, 0], case.label[0]
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}, case.case_id
        lungs = np.median(image[(label == 1) | (label == 2)])
        heart = np.median(image[label == 3])
        clavicles = np.median(image[label == 4])
        assert lungs < heart and lungs < clavicles, f"{case.case_id}: lungs must be the dark fields"
        # the patient's right lung on the image's left, the heart towards the patient's left
        columns = {v: np.argwhere(label == v)[:, 1].mean() for v in (1, 2, 3)}
        assert columns[1] < columns[3] and columns[1] < columns[2]
        assert columns[3] > label.shape[1] / 2 - 0.1 * label.shape[1]
        # burned-in marker and text: saturated pixels outside every structure
        assert ((stored == 4095) & (label == 0)).sum() > 20


def test_xray_has_pathology_that_makes_a_lung_dense() -> None:
    """An effusion (index 2) makes part of a lung as bright as soft tissue while keeping its label."""
    healthy, effusion = example_case("xray", 0), example_case("xray", 2)

    def dense_lung_fraction(case) -> float:
        """Lung pixels brighter than the median background pixel (mostly soft tissue)."""
        image, label = case.images[0].array.astype(float), case.label.array
        lungs = (label == 1) | (label == 2)
        return float((image[lungs] > np.median(image[label == 0])).mean())
    assert dense_lung_fraction(effusion) > 0.1 > 0.03 > dense_lung_fraction(healthy)
