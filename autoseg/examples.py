"""Small, seeded, realistic example datasets in the nnU-Net v2 raw layout.

Three kinds, each exercising what later stages must cope with in real data:

* ``ct``: abdominal CT in Hounsfield units (air, fat, muscle, lungs, bone, liver, kidneys, liver
  lesions), anisotropic voxels (thick slices), varying sizes and fields of view;
* ``mri``: BraTS-like multi-sequence brain MRI (T1, T1ce, T2, FLAIR), skull-stripped, with nested
  tumour sub-regions declared as overlapping regions, a bias field and Rician noise;
* ``2d``: grey microscopy-like PNG images of cells with nuclei, uneven background and noise.

Every case is generated from its own generator seeded by ``(seed, kind, case index)``, so a case does
not depend on how many others are made, and the same seed gives identical arrays. Anatomy is built
in a canonical physical frame (ITK identity direction: array axes run superior, posterior, left) and
some cases are then *stored* flipped or with permuted axes (like RAS or sagittal files), with the
direction and origin that keep every voxel at the same physical place. Some cases are small or
lack a class, as real datasets do.

Shapes are smooth ellipsoids deformed by a low-frequency random field; images are assembled from
tissue intensities, then blurred (partial volume) and made noisy, all with vectorised numpy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.special import ndtri
from tqdm import tqdm

from autoseg.dataset import IMAGES_TR, IMAGES_TS, LABELS_TR, write_dataset_json
from autoseg.io import Image, write_image

ExampleKindName = Literal["ct", "mri", "2d"]
LABELS_TS = "labelsTs"

# Stable integers per kind for seeding (str hashes change between interpreter runs).
_KIND_SEED = {"ct": 1, "mri": 2, "2d": 3}


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
}


@dataclass
class ExampleCase:
    """One generated case: one image per channel and the label, sharing one geometry."""

    images: list[Image]
    label: Image


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
        kind: ``"ct"``, ``"mri"`` or ``"2d"`` (see :data:`EXAMPLE_KINDS`).
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


# --- shape building blocks ---------------------------------------------------------------------------


def smooth_field(rng: np.random.Generator, axes: Sequence[np.ndarray], scale: float) -> np.ndarray:
    """A random smooth field with zero mean and unit standard deviation.

    Args:
        rng: random generator.
        axes: the coordinate of every index along each array axis (any isotropic unit).
        scale: distance over which the field varies, in the units of ``axes``.

    The field is a sum of Gaussian bumps on a lattice of knots ``scale`` apart with random weights.
    Being separable, it costs a few small matrix products rather than a filter over the volume.
    """
    weights = []
    for coords in axes:
        coords = np.asarray(coords, dtype=np.float64)
        knots = np.arange(coords.min() - scale, coords.max() + 1.5 * scale, scale)
        weights.append(np.exp(-0.5 * ((coords[:, None] - knots[None, :]) / (0.7 * scale)) ** 2))
    result = rng.standard_normal(tuple(w.shape[1] for w in weights))
    for w in weights:
        # Contract the leading coefficient axis; the new spatial axis lands last, so after all
        # axes the order is the array's.
        result = np.tensordot(result, w, axes=(0, 1))
    result -= result.mean()
    std = result.std()
    return (result / std if std > 0 else result).astype(np.float32)


def deformed_ellipsoid(
    rng: np.random.Generator,
    axes: Sequence[np.ndarray],
    center: Sequence[float],
    radii: Sequence[float],
    deform: float = 0.0,
    scale: float = 0.5,
    angle: float = 0.0,
) -> np.ndarray:
    """Mask of an ellipsoid (ellipse in 2D) whose surface is bent by a smooth random field.

    Args:
        rng: random generator (drawn from only when ``deform > 0``).
        axes: coordinate of each index along each array axis, in one isotropic unit.
        center, radii: per array axis, in that unit.
        deform: surface displacement relative to the radius (std of the field); ~0.1 is organ-like.
        scale: smoothness of the deformation, in the same unit.
        angle: rotation (radians) in the plane of the last two axes (the axial plane).

    Only the bounding box the shape can reach is evaluated, so small shapes in large volumes are cheap.
    """
    shape = tuple(len(a) for a in axes)
    mask = np.zeros(shape, dtype=bool)
    # The field is within ~4 std everywhere, so no point beyond this reach can be inside.
    reach = max(radii) * (1.0 + 4.0 * deform)
    box = []
    for coords, c in zip(axes, center):
        inside = np.flatnonzero(np.abs(np.asarray(coords) - c) <= reach)
        if inside.size == 0:
            return mask
        box.append(slice(int(inside[0]), int(inside[-1]) + 1))
    sub_axes = [np.asarray(coords)[s] for coords, s in zip(axes, box)]
    ndim = len(axes)
    offsets = [(coords - c).reshape([-1 if i == a else 1 for i in range(ndim)])
               for a, (coords, c) in enumerate(zip(sub_axes, center))]
    if angle:
        cos, sin = np.cos(angle), np.sin(angle)
        dy, dx = offsets[-2], offsets[-1]
        offsets[-2], offsets[-1] = cos * dy + sin * dx, -sin * dy + cos * dx
    radius = np.sqrt(sum((d / r) ** 2 for d, r in zip(offsets, radii)))
    if deform > 0:
        radius = radius + deform * smooth_field(rng, sub_axes, scale)
    mask[tuple(box)] = radius < 1.0
    return mask


def _stored_as(arrays: list[np.ndarray], spacing: tuple[float, ...], origin: Sequence[float],
               order: Sequence[int], flips: Sequence[bool]) -> tuple[list[np.ndarray], tuple[float, ...],
                                                                     tuple[float, ...], tuple[float, ...]]:
    """Store canonical arrays (identity direction) with another axis order and flips.

    New array axis ``k`` is canonical axis ``order[k]``, reversed when ``flips[k]``. Direction and origin
    are chosen so that every voxel keeps its physical position, as a scanner writing the same data in
    another convention would.
    """
    ndim = len(spacing)
    shape = arrays[0].shape
    direction = np.zeros((ndim, ndim))
    new_origin = np.asarray(origin, dtype=np.float64).copy()
    for k, source in enumerate(order):
        # ITK index axis i is array axis ndim - 1 - i; column i of the direction is its physical axis.
        column = np.zeros(ndim)
        column[ndim - 1 - source] = 1.0
        if flips[k]:
            new_origin += column * spacing[source] * (shape[source] - 1)
            column = -column
        direction[:, ndim - 1 - k] = column
    flipped = tuple(k for k in range(ndim) if flips[k])
    stored = [np.ascontiguousarray(np.flip(np.transpose(a, order), axis=flipped)) for a in arrays]
    return (stored, tuple(spacing[s] for s in order), tuple(float(o) for o in new_origin),
            tuple(float(d) for d in direction.ravel()))


def _index_axes(shape: Sequence[int], spacing: Sequence[float], unit: float,
                shift: Sequence[float]) -> list[np.ndarray]:
    """Per-axis coordinates in ``unit`` mm, centred on the volume and then moved by ``shift`` units."""
    return [((np.arange(n) - (n - 1) / 2.0) * s / unit - d) for n, s, d in zip(shape, spacing, shift)]


def _case(arrays: list[np.ndarray], label: np.ndarray, spacing: tuple[float, ...],
          origin: Sequence[float], storage: tuple[Sequence[int], Sequence[bool]] | None) -> ExampleCase:
    if storage is None:
        order, flips = tuple(range(label.ndim)), (False,) * label.ndim
    else:
        order, flips = storage
    stored, spacing, origin, direction = _stored_as([*arrays, label], spacing, origin, order, flips)
    images = [Image(a, spacing, origin, direction) for a in stored[:-1]]
    return ExampleCase(images, Image(stored[-1], spacing, origin, direction))


# --- CT ------------------------------------------------------------------------------------------------

# How cases are stored, by case index modulo 3: canonical (LPS, ITK identity); RAS-like (x and y
# reversed); in-plane axes swapped with the slices in reverse order. The slice axis stays first, so
# spacing[0] is always the thick one.
_CT_STORAGE: tuple[tuple[tuple[int, ...], tuple[bool, ...]], ...] = (
    ((0, 1, 2), (False, False, False)),
    ((0, 1, 2), (False, True, True)),
    ((0, 2, 1), (True, False, False)),
)


def _ct_case(rng: np.random.Generator, index: int) -> ExampleCase:
    small = index % 5 == 3
    if small:
        shape = (int(rng.integers(12, 17)), int(rng.integers(64, 81)), int(rng.integers(64, 81)))
    else:
        shape = (int(rng.integers(20, 41)), int(rng.integers(96, 161)), int(rng.integers(96, 161)))
    in_plane = round(float(rng.uniform(0.6, 0.9)), 3)
    spacing = (round(float(rng.uniform(2.5, 5.0)), 2), in_plane, in_plane)
    fov_z, fov_y, fov_x = ((n - 1) * s for n, s in zip(shape, spacing))

    # Patient frame in units of the body's half-width, so organs scale with the patient.
    aspect = float(rng.uniform(0.65, 0.8))  # antero-posterior / lateral body size
    half_width = min(fov_x / 2 * rng.uniform(0.8, 0.92), fov_y / 2 * 0.92 / aspect)
    # The volume's top slice lies between the lung bases and the mid-chest: lungs and liver are
    # always seen; how far down the kidneys are covered depends on the slice count and thickness.
    top = float(rng.uniform(0.5, 1.5))
    z_shift = top - fov_z / 2 / half_width
    shift = (-z_shift, rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06))
    axes = _index_axes(shape, spacing, half_width, shift)
    w, v, u = axes  # superior, posterior, left (canonical axes)
    w3, v3, u3 = w[:, None, None], v[None, :, None], u[None, None, :]

    # Body outline and layers from one deformed elliptic "radius", so fat and muscle follow its shape.
    body_radius = np.sqrt(u3 ** 2 + (v3 / aspect) ** 2) + 0.03 * smooth_field(rng, axes, 0.8)
    fat_depth, muscle_depth = rng.uniform(0.05, 0.14), rng.uniform(0.04, 0.07)
    body = body_radius < 1.0
    wall_inner = 1.0 - fat_depth
    cavity = body_radius < wall_inner - muscle_depth

    fat_hu = rng.uniform(-110, -90)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = fat_hu
    hu[body & (body_radius < wall_inner)] = rng.uniform(45, 55)  # abdominal wall muscle
    # Inside: bowel and mesentery (soft tissue) mixed with visceral fat in smooth patches.
    visceral_fat = smooth_field(rng, axes, 0.25) < ndtri(rng.uniform(0.2, 0.45))
    hu[cavity] = np.where(visceral_fat[cavity], fat_hu, rng.uniform(30, 40))

    heart = cavity & deformed_ellipsoid(rng, axes, (1.45, -0.2 * aspect, 0.1), (0.45, 0.4 * aspect, 0.4),
                                        0.05, 0.6)
    hu[heart] = rng.uniform(35, 45)
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lungs |= deformed_ellipsoid(rng, axes, (1.1, 0.05 * aspect, 0.48 * side),
                                    (0.8, 0.65 * aspect, 0.4), 0.06, 0.6)
    lungs &= cavity & ~heart
    hu[lungs] = rng.uniform(-870, -830) + 25.0 * smooth_field(rng, axes, 0.1)[lungs]  # vessels

    label = np.zeros(shape, dtype=np.uint8)
    kidney_centers = ((-0.7, -0.42), (-0.55, 0.42))  # (superior, left): the right kidney sits lower
    kidneys = np.zeros(shape, dtype=bool)
    kidney_fat = np.zeros(shape, dtype=bool)
    for (kw, ku) in kidney_centers:
        center = (kw + rng.uniform(-0.05, 0.05), 0.48 * aspect, ku + rng.uniform(-0.03, 0.03))
        radii = (0.36, 0.16, 0.19)
        angle = float(np.sign(ku)) * rng.uniform(0.2, 0.5)
        kidney = deformed_ellipsoid(rng, axes, center, radii, 0.06, 0.3, angle)
        # The renal sinus: a notch of fat on the medial side gives the bean shape.
        hilum = deformed_ellipsoid(rng, axes, (center[0], center[1] - 0.02, center[2] - np.sign(ku) * 0.15),
                                   (0.12, 0.05, 0.06))
        kidneys |= kidney & ~hilum
        kidney_fat |= deformed_ellipsoid(rng, axes, center, tuple(1.5 * r for r in radii), 0.1, 0.3, angle)
    hu[kidney_fat & cavity] = fat_hu  # perirenal fat: what makes kidneys stand out in CT

    liver = deformed_ellipsoid(rng, axes, (0.0, -0.02 * aspect, -0.42), (0.7, 0.6 * aspect, 0.5),
                               0.1, 0.5, rng.uniform(-0.2, 0.2))
    liver |= deformed_ellipsoid(rng, axes, (0.2, -0.4 * aspect, 0.05), (0.3, 0.28 * aspect, 0.35), 0.12, 0.4)
    liver &= cavity & ~kidneys
    liver_hu = rng.uniform(55, 65)
    hu[liver] = liver_hu + 6.0 * smooth_field(rng, axes, 0.2)[liver]
    label[liver] = 1

    kidneys &= cavity
    hu[kidneys] = rng.uniform(28, 38)
    label[kidneys] = 2

    # Aorta left of the midline in front of the spine; unenhanced, so only its fat border shows it.
    spine_v = 0.62 * aspect
    aorta = ((u3 - 0.1) ** 2 + (v3 - spine_v + 0.22) ** 2 < 0.07 ** 2) & cavity & ~liver
    hu[np.broadcast_to(aorta, shape)] = rng.uniform(40, 50)

    bone = _spine_and_ribs(w3, v3, u3, spine_v, body_radius, wall_inner, muscle_depth, half_width, rng)
    bone &= body & ~liver & ~kidneys
    hu[bone] = rng.uniform(650, 750) + 40.0 * smooth_field(rng, axes, 0.15)[bone]
    canal = np.broadcast_to(u3 ** 2 + (v3 - spine_v - 0.17) ** 2 < 0.045 ** 2, shape) & body
    hu[canal] = rng.uniform(10, 25)  # spinal canal (CSF, cord)

    # Liver lesions: every fourth case has none (a class absent); the others one to three.
    n_lesions = 0 if index % 4 == 2 else int(rng.integers(1, 4))
    # Depth below the liver surface (mm) places lesions mostly inside the liver, not across its edge.
    depth = ndimage.distance_transform_edt(liver, sampling=spacing) if n_lesions else None
    # Lesions of one patient look alike (one primary): all darker or, less often, all brighter.
    lesion_hu = liver_hu + rng.uniform(30, 50) * (1.0 if rng.uniform() < 0.25 else -1.0)
    for _ in range(n_lesions):
        _add_lesion(rng, axes, liver, depth, label, hu, lesion_hu, half_width)

    # Partial volume and the scanner's slightly correlated noise.
    hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.7, 0.7))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 0.5)
    hu += noise * (rng.uniform(10, 20) / max(float(noise.std()), 1e-6))
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    if index == 0:
        origin = (0.0, 0.0, 0.0)  # as many converted datasets have
    else:
        origin = (-fov_x / 2 + rng.uniform(-20, 20), -fov_y / 2 + rng.uniform(-20, 20),
                  rng.uniform(-600, -100))  # table position
    return _case([image], label, spacing, origin, _CT_STORAGE[index % len(_CT_STORAGE)])


def _spine_and_ribs(w3: np.ndarray, v3: np.ndarray, u3: np.ndarray, spine_v: float, body_radius: np.ndarray,
                    wall_inner: float, muscle_depth: float, half_width: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Bone: vertebral bodies with discs, neural arches, and ribs in the body wall."""
    period = 28.0 / half_width  # a vertebra with its disc is ~28 mm
    phase = rng.uniform(0, period)
    disc = np.mod(w3 + phase, period) < 0.22 * period
    vertebral_body = ((u3 / 0.14) ** 2 + ((v3 - spine_v) / 0.11) ** 2 < 1.0) & ~disc
    canal_distance = np.sqrt(u3 ** 2 + (v3 - spine_v - 0.17) ** 2)
    arch = (canal_distance < 0.09) & (canal_distance >= 0.045)
    spinous = (np.abs(u3) < 0.025) & (v3 > spine_v + 0.2) & (v3 < spine_v + 0.32)
    # Ribs: a band inside the wall muscle, below the chest and above the pelvis, sloping
    # downwards towards the front (phase depends on the angle) and absent at the front midline.
    angle = np.arctan2(v3, np.abs(u3))
    rib_period = 22.0 / half_width
    slope = 0.5 * np.sin(angle)  # over a period or more: an axial slice cuts each rib as a short arc
    rib_band = np.mod(w3 + slope + rng.uniform(0, rib_period), rib_period) < 0.35 * rib_period
    in_wall = (body_radius > wall_inner - muscle_depth * 0.85) & (body_radius < wall_inner - muscle_depth * 0.2)
    ribs = in_wall & rib_band & (w3 > -0.9) & ~((v3 < 0) & (np.abs(u3) < 0.3))
    return np.broadcast_to(vertebral_body | arch | spinous, ribs.shape) | ribs


def _add_lesion(rng: np.random.Generator, axes: list[np.ndarray], liver: np.ndarray, depth: np.ndarray,
                label: np.ndarray, hu: np.ndarray, lesion_hu: float, half_width: float) -> None:
    """A small lesion (2-6 mm radius) in the liver, not overlapping earlier ones."""
    radius_mm = rng.uniform(2.0, 6.0)
    free_depth = np.where(label == 3, 0.0, depth)
    # 1.5 radii deep: the deformed outline reaches beyond the nominal radius.
    candidates = np.flatnonzero(free_depth >= min(1.5 * radius_mm, float(free_depth.max())))
    if candidates.size == 0:
        return
    center_index = np.unravel_index(candidates[rng.integers(candidates.size)], liver.shape)
    center = tuple(float(a[i]) for a, i in zip(axes, center_index))
    radius = radius_mm / half_width
    lesion = deformed_ellipsoid(rng, axes, center, (radius, radius * rng.uniform(0.8, 1.0), radius),
                                0.1, radius * 1.5)
    lesion[center_index] = True  # even a lesion thinner than a slice covers its centre voxel
    lesion &= liver
    hu[lesion] = lesion_hu
    label[lesion] = 3


# --- MRI -----------------------------------------------------------------------------------------------

# Tissue codes for the MRI phantom, and their relative intensity per sequence (T1, T1ce, T2, FLAIR).
_OUTSIDE, _WM, _GM, _CSF, _EDEMA, _NECROSIS, _ENHANCING, _NON_ENHANCING = range(8)
_MRI_CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],  # outside the brain (skull-stripped: zero)
    [1.00, 1.00, 0.55, 0.70],  # white matter
    [0.72, 0.75, 0.80, 0.90],  # grey matter
    [0.30, 0.30, 1.60, 0.20],  # CSF: dark on T1, bright on T2, suppressed on FLAIR
    [0.65, 0.68, 1.25, 1.45],  # edema: bright on T2 and FLAIR
    [0.35, 0.38, 1.45, 0.80],  # necrosis: dark on T1/T1ce, bright on T2
    [0.72, 1.60, 0.95, 1.10],  # enhancing tumour: bright on T1ce
    [0.55, 0.60, 1.10, 1.25],  # non-enhancing solid core
], dtype=np.float32)

_MRI_STORAGE: tuple[tuple[tuple[int, ...], tuple[bool, ...]], ...] = (
    ((0, 1, 2), (False, False, False)),
    ((0, 1, 2), (False, True, True)),  # RAS-like
    ((2, 0, 1), (False, True, False)),  # sagittal slices first
)


def _mri_case(rng: np.random.Generator, index: int) -> ExampleCase:
    small = index % 5 == 3
    low, high = (40, 49) if small else (48, 65)
    shape = tuple(int(rng.integers(low, high)) for _ in range(3))
    voxel = round(float(rng.uniform(0.9, 1.1)), 2)
    spacing = (voxel, voxel, voxel)
    half_extent = [(n - 1) * voxel / 2 for n in shape]
    # Brain semi-axes (z, y, x) in mm; coordinates are in units of their mean, so shapes stay round.
    semi = np.array([half_extent[0] * rng.uniform(0.75, 0.85), half_extent[1] * rng.uniform(0.82, 0.92),
                     half_extent[2] * rng.uniform(0.78, 0.88)])
    unit = float(semi.mean())
    radii = semi / unit
    axes = _index_axes(shape, spacing, unit, (rng.uniform(-0.04, 0.04) for _ in range(3)))
    w, v, u = axes
    w3, v3, u3 = w[:, None, None], v[None, :, None], u[None, None, :]

    brain_radius = np.sqrt((w3 / radii[0]) ** 2 + (v3 / radii[1]) ** 2 + (u3 / radii[2]) ** 2)
    brain_radius = brain_radius + 0.04 * smooth_field(rng, axes, 0.5)
    brain = brain_radius < 1.0
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[brain] = _WM
    cortex_depth = rng.uniform(0.12, 0.18)
    cortex = brain & (brain_radius >= 1.0 - cortex_depth)
    tissue[cortex] = _GM
    # Sulci: fine CSF clefts through the cortex, and the CSF around the brain surface.
    sulci = cortex & ((smooth_field(rng, axes, 0.12) > 1.0) | (brain_radius > 0.97))
    tissue[sulci] = _CSF
    fissure = brain & np.broadcast_to((np.abs(u3) < 0.02) & (w3 > -0.3 * radii[0]), shape)
    tissue[fissure & (brain_radius > 0.45)] = _CSF
    for side in (-1, 1):
        deep_grey = deformed_ellipsoid(rng, axes, (0.0, 0.02, 0.22 * side), (0.12, 0.18, 0.1), 0.08, 0.3)
        tissue[deep_grey & brain] = _GM
        ventricle = deformed_ellipsoid(rng, axes, (0.12, -0.05, 0.1 * side), (0.12, 0.32, 0.06), 0.15, 0.3)
        tissue[ventricle & brain] = _CSF

    label = _add_tumour(rng, axes, brain, brain_radius, tissue, index)

    contrast = _MRI_CONTRAST * rng.uniform(0.95, 1.05, size=_MRI_CONTRAST.shape).astype(np.float32)
    texture = 1.0 + 0.03 * smooth_field(rng, axes, 0.1)
    shared_bias = smooth_field(rng, axes, 1.5) * rng.uniform(0.05, 0.15)
    noise_level = rng.uniform(0.02, 0.05)
    channels = []
    for c in range(contrast.shape[1]):
        clean = ndimage.gaussian_filter(contrast[tissue, c], 0.6) * texture
        bias = np.exp(shared_bias + 0.03 * smooth_field(rng, axes, 1.0))
        gain = rng.uniform(200, 2000)  # MR intensities have no unit: every scan its own scale
        signal = clean * bias * gain
        sigma = noise_level * gain
        # Magnitude images carry Rician noise: the modulus of a complex signal with Gaussian noise.
        noisy = np.hypot(signal + sigma * rng.standard_normal(shape, dtype=np.float32),
                         sigma * rng.standard_normal(shape, dtype=np.float32))
        channels.append(np.where(brain, np.maximum(noisy, 1e-3 * gain), 0.0).astype(np.float32))

    if index == 0:
        origin = (0.0, 0.0, 0.0)
    else:
        origin = tuple(-e + rng.uniform(-15, 15) for e in reversed(half_extent))
    return _case(channels, label, spacing, origin, _MRI_STORAGE[index % len(_MRI_STORAGE)])


def _add_tumour(rng: np.random.Generator, axes: list[np.ndarray], brain: np.ndarray,
                brain_radius: np.ndarray, tissue: np.ndarray, index: int) -> np.ndarray:
    """Nested tumour: edema around a core; the core is a ring of enhancement around necrosis.

    Every fourth case (index 1, 5, ...) is solid enhancing (no necrosis) and every fourth (3, 7, ...)
    is non-enhancing (no label 3), as lower-grade tumours are. Returns the BraTS 2021 label map.
    """
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    center = (0.0, 0.0, 0.0)
    for _ in range(20):  # a centre deep enough in the brain for the whole tumour to fit mostly
        center = (rng.uniform(-0.25, 0.35), rng.uniform(-0.4, 0.4), side * rng.uniform(0.2, 0.4))
        position = tuple(int(np.argmin(np.abs(a - c))) for a, c in zip(axes, center))
        if brain_radius[position] < 0.6:
            break
    whole_radius = rng.uniform(0.42, 0.6)
    whole = deformed_ellipsoid(rng, axes, center, (whole_radius,) * 3, 0.3, 0.3) & brain
    core_radius = whole_radius * rng.uniform(0.55, 0.72)
    core = deformed_ellipsoid(rng, axes, center, (core_radius,) * 3, 0.12, 0.3)
    # Edema always surrounds the core: keep the core two voxels inside the whole tumour.
    core &= ndimage.binary_erosion(whole, iterations=2)
    if not core.any():
        core[position] = whole[position] = True
    variant = index % 4
    if variant == 1:
        necrosis, enhancing = np.zeros_like(core), core
    elif variant == 3:
        necrosis, enhancing = core, np.zeros_like(core)
    else:
        necrosis = core & deformed_ellipsoid(rng, axes, center, (core_radius * rng.uniform(0.55, 0.8),) * 3,
                                             0.1, 0.2)
        necrosis &= ndimage.binary_erosion(core)  # a rim of enhancement all round
        enhancing = core & ~necrosis
    tissue[whole] = _EDEMA
    tissue[necrosis] = _NON_ENHANCING if variant == 3 else _NECROSIS
    tissue[enhancing] = _ENHANCING
    label = np.zeros(brain.shape, dtype=np.uint8)
    label[whole] = 2
    label[necrosis] = 1
    label[enhancing] = 3
    return label


# --- 2D microscopy -------------------------------------------------------------------------------------


def _cells_case(rng: np.random.Generator, index: int) -> ExampleCase:
    small = index % 5 == 3
    low, high = (80, 97) if small else (128, 193)
    shape = (int(rng.integers(low, high)), int(rng.integers(low, high)))
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    yy, xx = axes[0][:, None], axes[1][None, :]

    # Uneven illumination: a linear ramp in a random direction plus slow blotches.
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (yy * np.cos(direction) + xx * np.sin(direction)) / max(shape)
    image = rng.uniform(25, 50) + rng.uniform(15, 40) * ramp + 5.0 * smooth_field(rng, axes, 40.0)
    image = image.astype(np.float32)

    mean_radius = rng.uniform(8.0, 13.0)
    wanted = int(shape[0] * shape[1] * rng.uniform(0.25, 0.45) / (np.pi * mean_radius ** 2))
    centers: list[np.ndarray] = []
    sizes: list[float] = []
    for candidate in rng.uniform((0, 0), shape, size=(4 * wanted + 4, 2)):
        size = mean_radius * rng.uniform(0.7, 1.3)
        if len(centers) >= wanted:
            break
        if centers and np.min(np.linalg.norm(np.array(centers) - candidate, axis=1)
                              - 0.85 * (np.array(sizes) + size)) < 0:
            continue  # cells may touch but not pile up
        centers.append(candidate)
        sizes.append(size)

    # Every fifth case (4, 9, ...) shows cells without stained nuclei: a class absent.
    with_nuclei = index % 5 != 4
    label = np.zeros(shape, dtype=np.uint8)
    cell_texture = 6.0 * smooth_field(rng, axes, 4.0)
    for center, size in zip(centers, sizes):
        elongation = rng.uniform(0.65, 1.0)
        angle = rng.uniform(0, np.pi)
        cell = deformed_ellipsoid(rng, axes, center, (size, size * elongation), 0.12, size * 0.6, angle)
        image[cell] = rng.uniform(100, 150) + cell_texture[cell]
        label[cell] = 1
        if with_nuclei:
            offset = rng.uniform(-0.25, 0.25, size=2) * size
            nucleus = deformed_ellipsoid(rng, axes, center + offset, (size * rng.uniform(0.35, 0.5),) * 2,
                                         0.08, size * 0.4)
            nucleus &= ndimage.binary_erosion(cell, iterations=2)
            image[nucleus] += rng.uniform(40, 70)
            label[nucleus] = 2

    image = ndimage.gaussian_filter(image, rng.uniform(0.8, 1.3))
    image += rng.standard_normal(shape).astype(np.float32) * rng.uniform(4, 10)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return ExampleCase([Image(image, (1.0, 1.0))], Image(label, (1.0, 1.0)))


_GENERATORS: dict[str, Callable[[np.random.Generator, int], ExampleCase]] = {
    "ct": _ct_case,
    "mri": _mri_case,
    "2d": _cells_case,
}
