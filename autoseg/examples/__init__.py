"""Small, seeded, realistic example datasets in the nnU-Net v2 raw layout.

Three kinds, each exercising what later stages must cope with in real data:

* ``ct``: abdominal CT in Hounsfield units (air, fat, muscle, lungs, bone, liver, kidneys, liver
  lesions), anisotropic voxels (thick slices), varying sizes and fields of view;
* ``mri``: BraTS-like multi-sequence brain MRI (T1, T1ce, T2, FLAIR), skull-stripped, with nested
  tumour sub-regions declared as overlapping regions, a bias field and Rician noise;
* ``2d``: grey microscopy-like PNG images of cells with nuclei, uneven background and noise;
* ``xray``: 2D chest radiographs (16-bit PNG) with lungs, heart and clavicles, collimation, burned-in
  markers, low-dose noise and some cases with an effusion or consolidation.

Every case is generated from its own generator seeded by ``(seed, kind, case index)``, so a case does
not depend on how many others are made, and the same seed gives identical arrays. Anatomy is built
in a canonical physical frame (ITK identity direction: array axes run superior, posterior, left) and
some cases are then *stored* flipped or with permuted axes (like RAS or sagittal files), with the
direction and origin that keep every voxel at the same physical place. Some cases are small or
lack a class, as real datasets do.

Shapes are smooth ellipsoids deformed by a low-frequency random field; images are assembled from
tissue intensities, then blurred (partial volume) and made noisy, all with vectorised numpy.
One module per kind (:mod:`.ct`, :mod:`.mri`, :mod:`.cells`, :mod:`.xray`), the shared building
blocks in :mod:`.shapes`; every public name is importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from autoseg.dataset import IMAGES_TR, IMAGES_TS, LABELS_TR, write_dataset_json
from autoseg.examples.cells import cells_case
from autoseg.examples.ct import ct_case
from autoseg.examples.mri import mri_case
from autoseg.examples.shapes import ExampleCase, deformed_ellipsoid, smooth_field
from autoseg.examples.shapes import stored_as as _stored_as  # noqa: F401  (the old private name, for tests)
from autoseg.examples.xray import xray_case
from autoseg.io import write_image

ExampleKindName = Literal["ct", "mri", "2d", "xray"]
LABELS_TS = "labelsTs"

# Stable integers per kind for seeding (str hashes change between interpreter runs).
_KIND_SEED = {"ct": 1, "mri": 2, "2d": 3, "xray": 4}

__all__ = [
    "EXAMPLE_KINDS",
    "LABELS_TS",
    "ExampleCase",
    "ExampleKind",
    "ExampleKindName",
    "deformed_ellipsoid",
    "example_case",
    "example_dataset_json",
    "make_example",
    "smooth_field",
]


@dataclass(frozen=True)
class ExampleKind:
    """What one example kind generates (used for ``dataset.json`` and CLI help)."""

    summary: str
    default_num_cases: int
    file_ending: str
    channel_names: tuple[str, ...]
    labels: Mapping[str, int | list[int]]
    case_prefix: str
    regions_class_order: tuple[int, ...] | None = None
    description: str = ""


EXAMPLE_KINDS: dict[str, ExampleKind] = {
    "ct": ExampleKind(
        summary="3D abdominal CT in HU (.nii.gz, 1 channel): liver, kidneys, liver lesions; "
                "thick slices, ~10 cases",
        default_num_cases=10,
        file_ending=".nii.gz",
        channel_names=("CT",),
        labels={"background": 0, "liver": 1, "kidney": 2, "lesion": 3},
        case_prefix="abdomen",
        description="Synthetic abdominal CT (autoseg example): Hounsfield units, int16, anisotropic "
                    "spacing, air, fat, muscle, lungs, spine and ribs; labels liver, kidneys and "
                    "liver lesions (some cases have none).",
    ),
    "mri": ExampleKind(
        summary="3D BraTS-like brain MRI (.nii.gz, 4 channels T1/T1ce/T2/FLAIR): nested tumour "
                "regions, ~8 cases",
        default_num_cases=8,
        file_ending=".nii.gz",
        channel_names=("T1", "T1ce", "T2", "FLAIR"),
        # BraTS 2021 values: 1 necrotic/non-enhancing core, 2 edema, 3 enhancing tumour.
        labels={"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing_tumor": [3]},
        regions_class_order=(2, 1, 3),
        case_prefix="brain",
        description="Synthetic skull-stripped brain MRI (autoseg example), BraTS-like: zeros outside "
                    "the brain, ~1 mm isotropic, multiplicative bias field, Rician noise; label values "
                    "1 necrosis/non-enhancing core, 2 edema, 3 enhancing tumour, trained as the "
                    "overlapping regions whole tumour, tumour core and enhancing tumour.",
    ),
    "2d": ExampleKind(
        summary="2D grey microscopy-like images (.png, 1 channel): cells and nuclei, ~12 cases",
        default_num_cases=12,
        file_ending=".png",
        channel_names=("microscopy",),
        labels={"background": 0, "cell": 1, "nucleus": 2},
        case_prefix="cells",
        description="Synthetic 2D microscopy (autoseg example): uint8 PNG, cells with brighter nuclei "
                    "on an uneven background, blur and noise.",
    ),
    "xray": ExampleKind(
        summary="2D chest radiographs (.png, 1 channel X-ray): lungs, heart, clavicles; some effusions, "
                "~20 cases",
        default_num_cases=20,
        file_ending=".png",
        channel_names=("X-ray",),
        labels={"background": 0, "right_lung": 1, "left_lung": 2, "heart": 3, "clavicles": 4},
        case_prefix="chest",
        description="Synthetic posterior-anterior chest radiographs (autoseg example): 12-bit values in "
                    "16-bit PNG, dense structures bright, varying patient size, position and rotation, "
                    "collimation borders, burned-in side marker and text, low-dose quantum noise; some "
                    "cases with a pleural effusion or a consolidation. Labels as JSRT/SCR: lung fields "
                    "without the heart, clavicles over the lungs; the patient's right lung on the "
                    "image's left.",
    ),
}


def make_example(
    dest: str | os.PathLike,
    kind: ExampleKindName = "ct",
    num_cases: int | None = None,
    seed: int = 0,
    num_test_cases: int = 0,
    progress: bool = False,
) -> Path:
    """Write a complete example dataset (nnU-Net v2 layout) into the new folder ``dest``.

    Args:
        dest: dataset folder to create; it must not exist or be empty.
        kind: ``"ct"``, ``"mri"``, ``"2d"`` or ``"xray"`` (see :data:`EXAMPLE_KINDS`).
        num_cases: training cases (``imagesTr``/``labelsTr``); default per kind.
        seed: the same seed gives identical arrays.
        num_test_cases: held-out cases in ``imagesTs``, their references in ``labelsTs`` (an autoseg
            convenience for evaluating a demo; nnU-Net has no such folder).
        progress: show a progress bar.

    Returns:
        The dataset folder. ``dataset.json`` is written last, so a folder without it is an
        interrupted run.

    Raises:
        ValueError: unknown kind or a bad count or seed.
        FileExistsError: ``dest`` holds files already (nothing is overwritten).
    """
    spec = _kind_spec(kind)
    num_cases = spec.default_num_cases if num_cases is None else num_cases
    if not _is_int(num_cases) or num_cases < 1:
        raise ValueError(f"num_cases must be a positive integer, got {num_cases!r}")
    if not _is_int(num_test_cases) or num_test_cases < 0:
        raise ValueError(f"num_test_cases must be a non-negative integer, got {num_test_cases!r}")
    _check_seed(seed)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: already exists and is not an empty folder; choose a new folder "
                              "or delete this one")

    jobs = [(IMAGES_TR, LABELS_TR, i) for i in range(num_cases)]
    # Test cases continue the numbering, so they never repeat a training case.
    jobs += [(IMAGES_TS, LABELS_TS, num_cases + j) for j in range(num_test_cases)]
    for images_dir, labels_dir, index in tqdm(jobs, desc=f"example {kind}", unit="case",
                                               disable=not progress):
        case = example_case(kind, index, seed)
        case_id = f"{spec.case_prefix}_{index:03d}"
        for channel, image in enumerate(case.images):
            write_image(image, dest / images_dir / f"{case_id}_{channel:04d}{spec.file_ending}")
        write_image(case.label, dest / labels_dir / f"{case_id}{spec.file_ending}")

    write_dataset_json(example_dataset_json(kind, num_cases, seed, num_test_cases), dest)
    return dest


def example_case(kind: ExampleKindName = "ct", index: int = 0, seed: int = 0) -> ExampleCase:
    """Generate case number ``index`` of an example dataset in memory (what :func:`make_example` writes)."""
    _kind_spec(kind)
    _check_seed(seed)
    if not _is_int(index) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    rng = np.random.default_rng([seed, _KIND_SEED[kind], index])
    return _GENERATORS[kind](rng, index)


def example_dataset_json(kind: ExampleKindName, num_cases: int, seed: int = 0,
                         num_test_cases: int = 0) -> dict:
    """The ``dataset.json`` content of an example dataset."""
    spec = _kind_spec(kind)
    data: dict = {
        "name": f"autoseg_example_{kind}",
        "description": spec.description,
        "channel_names": {str(i): name for i, name in enumerate(spec.channel_names)},
        "labels": dict(spec.labels),
        "numTraining": num_cases,
        "file_ending": spec.file_ending,
    }
    if spec.regions_class_order is not None:
        data["regions_class_order"] = list(spec.regions_class_order)
    if num_test_cases:
        data["numTest"] = num_test_cases
    data["licence"] = "CC0 (synthetic data)"
    data["reference"] = f"generated by autoseg.examples.make_example(kind={kind!r}, seed={seed})"
    return data


def _kind_spec(kind: str) -> ExampleKind:
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; choose one of {', '.join(EXAMPLE_KINDS)}")
    return EXAMPLE_KINDS[kind]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_seed(seed: object) -> None:
    if not _is_int(seed) or seed < 0:  # type: ignore[operator]
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")



_GENERATORS: dict[str, Callable[[np.random.Generator, int], ExampleCase]] = {
    "ct": ct_case,
    "mri": mri_case,
    "2d": cells_case,
    "xray": xray_case,
}
