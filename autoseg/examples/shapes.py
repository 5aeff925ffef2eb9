"""Shape building blocks shared by the example kinds: smooth random fields, deformed ellipsoids, and
storage of canonical arrays with another axis order (see :mod:`autoseg.examples`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.io import Image


@dataclass
class ExampleCase:
    """One generated case: one image per channel and the label, sharing one geometry."""

    images: list[Image]
    label: Image



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


def stored_as(arrays: list[np.ndarray], spacing: tuple[float, ...], origin: Sequence[float],
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


def index_axes(shape: Sequence[int], spacing: Sequence[float], unit: float,
                shift: Sequence[float]) -> list[np.ndarray]:
    """Per-axis coordinates in ``unit`` mm, centred on the volume and then moved by ``shift`` units."""
    return [((np.arange(n) - (n - 1) / 2.0) * s / unit - d) for n, s, d in zip(shape, spacing, shift)]


def make_case(arrays: list[np.ndarray], label: np.ndarray, spacing: tuple[float, ...],
          origin: Sequence[float], storage: tuple[Sequence[int], Sequence[bool]] | None) -> ExampleCase:
    if storage is None:
        order, flips = tuple(range(label.ndim)), (False,) * label.ndim
    else:
        order, flips = storage
    stored, spacing, origin, direction = stored_as([*arrays, label], spacing, origin, order, flips)
    images = [Image(a, spacing, origin, direction) for a in stored[:-1]]
    return ExampleCase(images, Image(stored[-1], spacing, origin, direction))

