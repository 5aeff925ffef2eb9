"""Canonical orientation by axis permutation and flips only (never interpolation).

The same patient scanned once and stored once in LPS and once in RAS (or sagittally, or with the
slices in reverse order) gives differently ordered arrays. Bringing every case to one canonical
orientation means the network sees anatomy the same way round whatever the file convention, at the
cost of a transpose and a few flips, which are exactly invertible.

Conventions (see :mod:`autoseg.io`): ITK's direction matrix ``D`` is stored flattened row-major;
column ``i`` of ``D`` is the physical direction (ITK ``x, y, z``, i.e. LPS) of index axis ``i``.
Numpy array axes are the index axes reversed: array axis ``a`` is ITK index axis ``ndim - 1 - a``.

The canonical orientation is the one whose direction matrix is closest to the identity: array axis
``0`` runs along physical ``+z`` (superior), axis ``1`` along ``+y`` (posterior), axis ``2`` along
``+x`` (left), i.e. ITK's identity direction. Oblique scans get the permutation that maximises the
alignment of each array axis with its physical axis; they are not resampled.

A transform is the JSON-ready dict ``{"axes": [a0, a1, a2], "flips": [f0, f1, f2]}``: canonical
spatial axis ``n`` is original spatial axis ``axes[n]``, then flipped when ``flips[n]``. Arrays may
have leading (channel) axes; the transform acts on the last three.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

OrientationTransform = dict  # {"axes": list[int], "flips": list[bool]}

IDENTITY: OrientationTransform = {"axes": [0, 1, 2], "flips": [False, False, False]}


def direction_matrix_3d(direction: Sequence[float]) -> np.ndarray:
    """The 3x3 ITK direction matrix of a 2D or 3D image.

    A 2D image becomes a single-slice 3D case in the pipeline (array ``(1, y, x)``); its extra index
    axis ``k`` (array axis 0) is given the physical ``z`` direction.
    """
    values = np.asarray(direction, dtype=np.float64)
    if values.size == 9:
        return values.reshape(3, 3)
    if values.size == 4:
        matrix = np.eye(3)
        matrix[:2, :2] = values.reshape(2, 2)
        return matrix
    raise ValueError(f"a direction needs 4 (2D) or 9 (3D) values, got {values.size}")


def canonical_transform(direction: Sequence[float]) -> OrientationTransform:
    """The permutation and flips that bring an array with this ITK direction to canonical orientation.

    Each index axis is matched to a distinct physical axis so that the total alignment
    ``sum |D[physical, index]|`` is largest (all six permutations are tried, so oblique matrices
    still give a valid permutation), and flipped when it points along the negative physical axis.
    """
    matrix = direction_matrix_3d(direction)
    best_score, best = -1.0, (0, 1, 2)
    for assignment in itertools.permutations(range(3)):  # index axis i -> physical axis assignment[i]
        score = sum(abs(matrix[assignment[i], i]) for i in range(3))
        if score > best_score + 1e-9:
            best_score, best = score, assignment
    axes = [0, 0, 0]
    flips = [False, False, False]
    for index_axis, physical_axis in enumerate(best):
        array_axis = 2 - index_axis
        canonical_axis = 2 - physical_axis
        axes[canonical_axis] = array_axis
        flips[canonical_axis] = bool(matrix[physical_axis, index_axis] < 0)
    return {"axes": axes, "flips": flips}


def _check(transform: OrientationTransform, array: np.ndarray) -> tuple[list[int], list[bool]]:
    axes = [int(a) for a in transform["axes"]]
    flips = [bool(f) for f in transform["flips"]]
    if sorted(axes) != [0, 1, 2] or len(flips) != 3:
        raise ValueError(f"not an orientation transform: {transform}")
    if array.ndim < 3:
        raise ValueError(f"orientation acts on the last three axes; got an array of shape {array.shape}")
    return axes, flips


def to_canonical(array: np.ndarray, transform: OrientationTransform) -> np.ndarray:
    """Apply ``transform`` to the last three axes of ``array`` (a view: no data is copied)."""
    axes, flips = _check(transform, array)
    lead = array.ndim - 3
    out = np.transpose(array, list(range(lead)) + [lead + a for a in axes])
    flip_axes = tuple(lead + n for n in range(3) if flips[n])
    return np.flip(out, axis=flip_axes) if flip_axes else out


def from_canonical(array: np.ndarray, transform: OrientationTransform) -> np.ndarray:
    """The exact inverse of :func:`to_canonical` (a view)."""
    axes, flips = _check(transform, array)
    lead = array.ndim - 3
    flip_axes = tuple(lead + n for n in range(3) if flips[n])
    out = np.flip(array, axis=flip_axes) if flip_axes else array
    inverse = np.argsort(axes)
    return np.transpose(out, list(range(lead)) + [lead + int(a) for a in inverse])


def canonical_spacing(spacing: Sequence[float], transform: OrientationTransform) -> tuple[float, float, float]:
    """The ``(z, y, x)`` spacing after :func:`to_canonical`."""
    return tuple(float(spacing[a]) for a in transform["axes"])  # type: ignore[return-value]


def canonical_shape(shape: Sequence[int], transform: OrientationTransform) -> tuple[int, int, int]:
    """The spatial shape after :func:`to_canonical`."""
    spatial = tuple(shape)[-3:]
    return tuple(int(spatial[a]) for a in transform["axes"])  # type: ignore[return-value]


def is_identity(transform: OrientationTransform) -> bool:
    """Whether the transform leaves arrays unchanged."""
    return list(transform["axes"]) == [0, 1, 2] and not any(transform["flips"])
