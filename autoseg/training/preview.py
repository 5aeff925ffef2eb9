"""``autoseg augment-preview``: a PNG grid that shows what the training augmentation does.

Rows are samples; columns are the unaugmented patch (centre crop), the augmented image and the
augmented label over it (the middle z slice for 3D patches), titled with the sampled parameters.
Patches come from the preprocessed cases of a work folder (``WORK/preprocessed/<configuration>/``,
see docs/architecture.md), centred on a random foreground voxel, or from a synthetic example when
there are none.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from autoseg.cascade import one_hot
from autoseg.plan import Configuration, load_plan
from autoseg.training.augment import build_augmentation, summarize_params
from autoseg.utils import atomic_write, read_json
from autoseg.workdir import WorkDir

PREFERRED_CONFIGURATIONS = ("3d_fullres", "2d", "3d_lowres")


def augment_preview(work_dir_or_config: str | os.PathLike | Configuration, out_png: str | os.PathLike,
                    num_samples: int = 8, seed: int = 0, case: str | None = None, *,
                    configuration: str | None = None, preset: str | None = None,
                    options: dict[str, Any] | None = None, channel: int = 0) -> Path:
    """Write a PNG grid of augmented training patches and return its path.

    Args:
        work_dir_or_config: a work folder (its ``plan.json`` and preprocessed cases are used) or a
            plan :class:`Configuration` (a synthetic example is augmented).
        out_png: where to write the PNG (atomically).
        num_samples: rows of the grid.
        seed: seeds the patch choice and the augmentation, so a preview can be reproduced.
        case: a preprocessed case id to take every patch from (default: a random case per row).
        configuration: the plan configuration to preview (default: 3d_fullres, else 2d, else the
            first); only with a work folder.
        preset, options: as in :func:`autoseg.training.augment.build_augmentation`.
        channel: the input channel shown.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if isinstance(work_dir_or_config, Configuration):
        config, source = work_dir_or_config, None
        if case is not None:
            raise ValueError("a case can only be chosen from a work folder's preprocessed data")
    else:
        config, source = _configuration_and_cases(Path(work_dir_or_config), configuration, case)
    if not 0 <= channel < len(config.normalization):
        raise ValueError(f"channel {channel} does not exist; configuration {config.name!r} has "
                         f"{len(config.normalization)} input channel(s)")
    augmentation = build_augmentation(config, preset, options)
    input_size = augmentation.input_patch_size()
    rng = np.random.default_rng(seed)

    rows = []
    for _ in range(num_samples):
        if source is None:
            image, seg = synthetic_example(config, input_size, rng)
        else:
            image, seg = _random_patch(source, config.dim, input_size, rng)
        image = _with_cascade_stand_in(config, image, seg)
        data, labels, params = augmentation(image[None], seg[None], rng)
        original = _center_crop(image, augmentation.patch_size)
        rows.append((original[channel], data[0, channel], labels[0, 0], summarize_params(params[0])))

    origin = "synthetic example" if source is None else f"{len(source[1])} preprocessed case(s)"
    title = (f"{config.name}: preset {preset or config.schedule.augmentation}, patch "
             f"{list(augmentation.patch_size)} from input {list(input_size)}, {origin}, seed {seed}")
    figure = _grid_figure(rows, title)
    return atomic_write(out_png, lambda tmp: figure.savefig(tmp, format="png", dpi=80))


def _with_cascade_stand_in(config: Configuration, image: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """A cascade stage's image with one-hot channels of label values 1..K standing in for the
    previous stage's prediction (only the image channel is shown; the pipeline needs them all)."""
    extra = config.topology.in_channels - config.base_channels if config.previous_stage else 0
    if extra <= 0:
        return image
    stand_in = one_hot(seg[0], [(value,) for value in range(1, extra + 1)])
    return np.concatenate([image[: config.base_channels], stand_in])


def synthetic_example(configuration: Configuration, shape: tuple[int, ...],
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A normalized image ``(C, *shape)`` and label ``(1, *shape)``: a striped body with two
    ellipsoids (labels 1 and 2), with CT channels in z-scored Hounsfield units."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    unit = [(g - (n - 1) / 2) / (n / 2) for g, n in zip(grids, shape)]  # -1..1 per axis

    def ellipsoid(centre: list[float], radii: list[float]) -> np.ndarray:
        return sum(((u - c) / r) ** 2 for u, c, r in zip(unit, centre, radii)) <= 1.0

    jitter = rng.uniform(-0.08, 0.08, size=(2, len(shape)))
    body = ellipsoid([0.0] * len(shape), [0.8] * len(shape))
    organ = ellipsoid(list(jitter[0] - 0.2), [0.3] * len(shape))
    bone = ellipsoid(list(jitter[1] + 0.3), [0.15] * len(shape))
    seg = np.zeros(shape, dtype=np.int16)
    seg[organ] = 1
    seg[bone] = 2
    stripes = 0.5 + 0.5 * (np.sin(unit[-1] * 12.0) > 0)  # texture that shows rotation and flips
    image = np.empty((len(configuration.normalization), *shape), dtype=np.float32)
    for c, norm in enumerate(configuration.normalization):
        if norm.scheme == "ct":
            hu = np.where(body, -50.0 + 60.0 * stripes, -1000.0)
            hu = np.where(organ, 120.0, np.where(bone, 700.0, hu))
            hu = np.clip(hu + rng.normal(0.0, 15.0, size=shape), norm.clip_low, norm.clip_high)
            image[c] = (hu - norm.mean) / norm.std
        else:
            values = np.where(body, 0.2 + 0.4 * stripes, -1.5)
            values = np.where(organ, 1.5, np.where(bone, -0.8, values))
            image[c] = values + rng.normal(0.0, 0.05, size=shape)
    return image, seg[None]


# --- preprocessed data -----------------------------------------------------------------------------


def _configuration_and_cases(work: Path, name: str | None,
                             case: str | None) -> tuple[Configuration, tuple[Path, list[str]] | None]:
    plan = load_plan(work)
    if name is None:
        name = next((n for n in PREFERRED_CONFIGURATIONS if n in plan.configurations), next(iter(plan.configurations)))
    config = plan.configuration(name)
    folder = WorkDir(work).preprocessed(config.data_name)
    cases = sorted(p.name[:-4] for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy")) \
        if folder.is_dir() else []
    if case is not None:
        if case not in cases:
            raise FileNotFoundError(f"{folder / (case + '.npy')}: no preprocessed case {case!r} "
                                    f"(found {len(cases)} case(s))")
        cases = [case]
    return config, ((folder, cases) if cases else None)


def _load_case(folder: Path, case: str) -> tuple[np.ndarray, np.ndarray, dict]:
    image_path, seg_path, sidecar_path = folder / f"{case}.npy", folder / f"{case}_seg.npy", folder / f"{case}.json"
    try:
        image = np.load(image_path, mmap_mode="r")
        seg = np.load(seg_path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / case}: cannot read the preprocessed case ({error})") from None
    if image.ndim != 4:
        raise ValueError(f"{image_path}: expected a (C, Z, Y, X) array, got shape {image.shape}")
    if seg.shape != image.shape[1:]:
        raise ValueError(f"{seg_path}: label shape {seg.shape} does not match the image's {image.shape[1:]}")
    sidecar = read_json(sidecar_path) if sidecar_path.is_file() else {}
    return image, seg, sidecar if isinstance(sidecar, dict) else {}


def _random_patch(source: tuple[Path, list[str]], dim: int, size: tuple[int, ...],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A patch of ``size`` around a random foreground voxel of a random case (any voxel if none)."""
    folder, cases = source
    image, seg, sidecar = _load_case(folder, cases[int(rng.integers(len(cases)))])
    centre = _foreground_point(seg, sidecar, rng)
    if dim == 2:
        image, seg, centre = image[:, centre[0]], seg[centre[0]], centre[1:]
    patch = _crop_padded(image, centre, size, 0.0).astype(np.float32)
    # -1 is what the patch sampler and the loss read as padding/background
    labels = _crop_padded(seg[None], centre, size, -1).astype(np.int16)
    return patch, labels


def _foreground_point(seg: np.ndarray, sidecar: dict, rng: np.random.Generator) -> list[int]:
    locations = [point for value, points in (sidecar.get("class_locations") or {}).items()
                 if str(value) not in ("0", "-1") for point in points]
    if not locations:
        found = np.argwhere(np.asarray(seg) > 0)
        locations = found[:: max(1, len(found) // 1000)].tolist()
    if locations:
        return [int(v) for v in locations[int(rng.integers(len(locations)))]]
    return [int(rng.integers(n)) for n in seg.shape]


def _crop_padded(array: np.ndarray, centre: list[int], size: tuple[int, ...], fill: float) -> np.ndarray:
    """``array[:, box]`` for the box of ``size`` centred at ``centre``; outside the array is ``fill``."""
    out = np.full((array.shape[0], *size), fill, dtype=array.dtype)
    source, target = [slice(None)], [slice(None)]
    for c, n, s in zip(centre, array.shape[1:], size):
        start = c - s // 2
        source.append(slice(max(start, 0), min(start + s, n)))
        target.append(slice(max(-start, 0), max(-start, 0) + min(start + s, n) - max(start, 0)))
    out[tuple(target)] = array[tuple(source)]
    return out


def _center_crop(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    starts = [(n - s) // 2 for n, s in zip(array.shape[1:], size)]
    return array[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(starts, size))]


# --- drawing -------------------------------------------------------------------------------------


def _grid_figure(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], title: str) -> Figure:
    figure = Figure(figsize=(9.0, 3.2 * len(rows) + 0.6))
    axes = figure.subplots(len(rows), 3, squeeze=False)
    for row, (original, augmented, labels, description) in zip(axes, rows):
        original, augmented, labels = (_middle_slice(a) for a in (original, augmented, labels))
        # one window for the pair, from the original, so intensity changes stay visible
        low, high = np.percentile(original, [0.5, 99.5])
        high = high if high > low else low + 1.0
        row[0].imshow(original, cmap="gray", vmin=low, vmax=high)
        row[0].set_title("original patch", fontsize=8)
        row[1].imshow(augmented, cmap="gray", vmin=low, vmax=high)
        row[1].set_title("\n".join(textwrap.wrap(description, 48)), fontsize=7)
        row[2].imshow(augmented, cmap="gray", vmin=low, vmax=high)
        foreground = np.ma.masked_less_equal(labels, 0)
        row[2].imshow(foreground, cmap="tab10", vmin=0, vmax=9, alpha=0.5, interpolation="nearest")
        row[2].set_title("augmented label", fontsize=8)
        for axis in row:
            axis.set_axis_off()
    figure.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    figure.tight_layout()
    return figure


def _middle_slice(array: np.ndarray) -> np.ndarray:
    return array[array.shape[0] // 2] if array.ndim == 3 else array
