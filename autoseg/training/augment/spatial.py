"""Spatial transforms: the centred crop or resampling that opens every sample, flips, quarter turns.

The first op always brings the input to the patch size: ``crop`` (a centred crop) or ``spatial``
(rotation, scaling and elastic deformation fused into one ``grid_sample`` resampling that also
crops; image linear, label nearest, so the label map never gets a value the input did not have).
Mirroring and 90-degree rotations (exact array flips) come after the intensity ops.

``scale`` follows nnU-Net/batchgenerators: output coordinates are multiplied by it, so
``scale > 1`` shows more context (structures look smaller) and the input patch must be
``scale`` times larger (:func:`input_patch_size`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize

from autoseg.plan import is_dummy_2d_patch
from autoseg.training.augment.base import (
    ExactTransform,
    Transform,
    TransformContext,
    fires,
    register_transform,
    sample_around_one,
    short_number,
)

# --- geometry rules ----------------------------------------------------------------------------------


def is_dummy_2d(patch_size: tuple[int, ...], option: bool | None) -> bool:
    """Whether a patch is augmented slice-wise: the option if set (3D only), else nnU-Net's rule."""
    if len(patch_size) != 3:
        return False
    return option if option is not None else is_dummy_2d_patch(patch_size)


def rotation_limit(patch_size: tuple[int, ...], dummy_2d: bool, option: float | None) -> float:
    """nnU-Net's rule: +-30 deg in 3D, +-180 deg in (dummy) 2D, +-15 deg for elongated 2D patches."""
    if option is not None:
        return float(option)
    if len(patch_size) == 3:
        return 180.0 if dummy_2d else 30.0
    return 15.0 if max(patch_size) / min(patch_size) > 1.5 else 180.0


def rotation_axes(context: TransformContext) -> tuple[int, ...]:
    """Axes rotated around: all of them in 3D, only z for dummy 2D, the single plane in 2D."""
    if context.settings.p_rotation == 0 or context.rotation_limit_deg == 0:
        return ()
    if context.dim == 2:
        return (0,)
    return (0,) if context.dummy_2d else (0, 1, 2)


def elastic_max_voxels(context: TransformContext) -> list[float]:
    """The largest elastic displacement per axis in voxels (0 on axes that are not deformed)."""
    return [context.settings.elastic_max_mm / s if axis in context.in_plane_axes else 0.0
            for axis, s in enumerate(context.spacing)]


def input_patch_size(context: TransformContext, patch_size: Sequence[int]) -> tuple[int, ...]:
    """The patch to crop before augmenting so that no sampled voxel falls outside it.

    The output patch's half-extent, stretched by the largest scale, rotated by every allowed
    rotation (the bounding box's maximum over the whole angle range, per axis, found on a grid
    and refined by a bounded optimizer), plus the largest elastic displacement. Equal to
    ``patch_size`` when no spatial transform can fire.
    """
    patch = np.asarray(patch_size, dtype=np.int64)
    if len(patch) != context.dim:
        raise ValueError(f"patch size {list(patch)} has {len(patch)} axes, the configuration is "
                         f"{context.dim}D")
    settings = context.settings
    half = (patch - 1) / 2.0
    stretched = half.copy()
    if settings.p_scaling > 0:
        for axis in context.in_plane_axes:
            stretched[axis] *= max(1.0, settings.scaling[1])
    extent = _max_rotated_extent(tuple(stretched.tolist()), rotation_axes(context),
                                 math.radians(context.rotation_limit_deg))
    if settings.p_elastic > 0:
        maximum = np.asarray(elastic_max_voxels(context))
        # + rounding slack of the recorded displacements
        extent = extent + np.where(maximum > 0, maximum + 1e-3, 0.0)
    margin = np.maximum(0, np.ceil(extent - half - 1e-6)).astype(np.int64)
    return tuple(int(v) for v in patch + 2 * margin)


def _max_rotated_extent(half: tuple[float, ...], axes: tuple[int, ...], limit: float) -> np.ndarray:
    """Per axis, the largest half-extent of the box ``|x_i| <= half_i`` over all rotations with
    every angle around ``axes`` in ``[-limit, limit]``: ``max_R (|R| half)``."""
    return np.array(_max_rotated_extent_cached(half, axes, limit))


@functools.lru_cache(maxsize=64)
def _max_rotated_extent_cached(half: tuple[float, ...], axes: tuple[int, ...], limit: float) -> tuple[float, ...]:
    half_array = np.asarray(half)
    if not axes or limit == 0:
        return half
    dim = len(half)
    steps = 721 if len(axes) == 1 else 21
    values = np.linspace(-limit, limit, steps)
    angles = np.stack(np.meshgrid(*[values] * len(axes), indexing="ij"), axis=-1).reshape(-1, len(axes))
    extents = np.abs(_rotation_matrices(angles, dim, axes)) @ half_array
    best = extents.max(axis=0)
    for k in range(dim):
        def negative_extent(a: np.ndarray, k: int = k) -> float:
            return -float((np.abs(_rotation_matrices(a[None], dim, axes)) @ half_array)[0, k])
        for start in angles[np.argsort(extents[:, k])[-3:]]:
            result = optimize.minimize(negative_extent, start, bounds=[(-limit, limit)] * len(axes),
                                       method="L-BFGS-B")
            best[k] = max(best[k], -result.fun)
    return tuple(float(b) for b in best)


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation in array-axis order: one angle (2D) or angles around the z, y and x axes (3D)."""
    angles = np.radians(np.asarray(angles_deg, dtype=np.float64))[None]
    dim = 2 if angles.shape[1] == 1 else 3
    return _rotation_matrices(angles, dim, tuple(range(angles.shape[1])))[0]


def _rotation_matrices(angles: np.ndarray, dim: int, axes: tuple[int, ...]) -> np.ndarray:
    """``(M, dim, dim)`` rotations for ``(M, len(axes))`` angles (radians) around ``axes``."""
    result = np.broadcast_to(np.eye(dim), (len(angles), dim, dim)).copy()
    for column, axis in enumerate(axes):
        i, j = (0, 1) if dim == 2 else [a for a in range(3) if a != axis]
        cos, sin = np.cos(angles[:, column]), np.sin(angles[:, column])
        step = np.broadcast_to(np.eye(dim), result.shape).copy()
        step[:, i, i], step[:, i, j], step[:, j, i], step[:, j, j] = cos, -sin, sin, cos
        result = result @ step
    return result


def input_coordinates(op: dict, input_shape: Sequence[int], output_shape: Sequence[int],
                      device: torch.device | None = None) -> torch.Tensor:
    """Input voxel coordinates ``(dim, *output_shape)`` that a ``spatial`` op samples.

    ``input = centre_in + R diag(scale) (output - centre_out) + elastic(output)``, with the centres
    chosen so that the identity transform reproduces the centred crop voxel for voxel. Computed on
    ``device`` (default the CPU): :mod:`.on_device` builds the grids where it resamples.
    """
    out = np.asarray(output_shape, dtype=np.int64)
    dim = len(out)
    half = (out - 1) / 2.0
    centre_in = (np.asarray(input_shape) - out) // 2 + half
    affine = rotation_matrix(op["rotation_deg"]) @ np.diag(op["scale"])
    offsets = [torch.arange(n, dtype=torch.float32, device=device) - float(h) for n, h in zip(out, half)]
    coordinates = torch.empty((dim, *out.tolist()), dtype=torch.float32, device=device)
    for k in range(dim):
        total = torch.full((1,) * dim, float(centre_in[k]), device=device)
        for j in range(dim):
            if affine[k, j] != 0.0:
                shape = [1] * dim
                shape[j] = -1
                total = total + offsets[j].reshape(shape) * float(affine[k, j])
        coordinates[k] = total.expand(*out.tolist())
    if op.get("elastic"):
        coarse = torch.tensor(op["elastic"]["grid"], dtype=torch.float32, device=device)[None]
        mode = "bilinear" if dim == 2 else "trilinear"
        coordinates += F.interpolate(coarse, size=tuple(out.tolist()), mode=mode, align_corners=True)[0]
    return coordinates


def sampling_grid(coordinates: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample``'s grid ``(*output_shape, dim)`` for input voxel ``coordinates`` ``(dim, *output_shape)``
    into an array of spatial shape ``input_shape``."""
    # grid_sample wants [-1, 1] coordinates (align_corners=True: -1 and 1 are the outer voxel
    # centres) with the last axis in x, y, z order
    scale = torch.tensor([2.0 / (s - 1) if s > 1 else 0.0 for s in input_shape], device=coordinates.device)
    return (coordinates * scale.reshape(-1, *(1,) * (coordinates.ndim - 1)) - 1.0).flip(0).movedim(0, -1)


def _grid_sample(array: np.ndarray, grid: torch.Tensor, mode: str) -> np.ndarray:
    # border padding: a sample that reaches past the input (it should not, given
    # input_patch_size) repeats the edge instead of inventing a value or label 0
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.grid_sample(tensor, grid, mode=mode, padding_mode="border", align_corners=True)[0].numpy()


def center_crop(array: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """The centred ``out_shape`` block of ``array`` ``(C, *spatial)`` (a view)."""
    starts = [(s - o) // 2 for s, o in zip(array.shape[1:], out_shape)]
    return array[(slice(None),) + tuple(slice(a, a + o) for a, o in zip(starts, out_shape))]


# --- the transforms ----------------------------------------------------------------------------------


@register_transform("crop", order=None)
class CenterCrop(Transform):
    """``{"op": "crop"}``: the centred patch, what :class:`Spatial` records when nothing fires."""

    sets_output_shape = True

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """Always one crop; draws nothing."""
        return [{"op": "crop"}]

    @classmethod
    def apply(cls, image: np.ndarray, seg: np.ndarray, op: dict,
              output_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Views of the centred blocks of both arrays."""
        return center_crop(image, output_shape), center_crop(seg, output_shape)

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """Nothing: a crop is no augmentation."""
        return None


@register_transform("spatial", order=10)
class Spatial(Transform):
    """Rotation, scaling and elastic deformation fused into one resampling that also crops.

    ``{"op": "spatial", "rotation_deg": [z, y, x] or [angle], "scale": [per axis],
    "elastic": null or {"max_voxels", "grid"}, "nearest_channels": [...] (cascade stages only)}``.
    """

    fresh_output = True
    sets_output_shape = True

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """The resampling, or a centred crop when neither rotation, scaling nor elastic fires."""
        context, s = self.context, self.settings
        n_angles = 1 if context.dim == 2 else 3
        angles = [0.0] * n_angles
        scale = [1.0] * context.dim
        elastic = None
        axes = rotation_axes(context)
        if fires(rng, s.p_rotation) and axes:
            limit = context.rotation_limit_deg
            for axis in axes:
                angles[axis] = round(float(rng.uniform(-limit, limit)), 4)
        if fires(rng, s.p_scaling):
            factor = round(sample_around_one(rng, s.scaling), 4)
            for axis in context.in_plane_axes:
                scale[axis] = factor
        if fires(rng, s.p_elastic):
            elastic = self._sample_elastic(rng)
        if not any(angles) and all(v == 1.0 for v in scale) and elastic is None:
            return [{"op": CenterCrop.name}]
        op = {"op": self.name, "rotation_deg": angles, "scale": scale, "elastic": elastic}
        if context.cascade_channels:
            # interpolating one-hot channels would make them fractional and overlapping
            op["nearest_channels"] = list(context.cascade_channels)
        return [op]

    def _sample_elastic(self, rng: np.random.Generator) -> dict:
        """A coarse random displacement grid (voxels), linearly upsampled when applied: smooth and
        bounded by the maximum (a convex combination of node values never exceeds them)."""
        context = self.context
        extent_mm = [p * sp for p, sp in zip(context.patch_size, context.spacing)]
        nodes = [max(2, math.ceil(e / self.settings.elastic_grid_mm) + 1) for e in extent_mm]
        maximum = elastic_max_voxels(context)
        grid = rng.uniform(-1.0, 1.0, size=(context.dim, *nodes)) * np.reshape(maximum, (-1,) + (1,) * context.dim)
        return {"max_voxels": [round(m, 4) for m in maximum], "grid": np.round(grid, 3).tolist()}

    @classmethod
    def apply(cls, image: np.ndarray, seg: np.ndarray, op: dict,
              output_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Resample image (linear; ``nearest_channels`` nearest) and label (nearest) to ``output_shape``."""
        coordinates = input_coordinates(op, image.shape[1:], output_shape)
        # only the block the coordinates reach is converted and sampled: a small rotation of a patch
        # cut for the largest one touches far less than the whole input
        flat = coordinates.reshape(len(output_shape), -1)
        starts = [max(0, min(n - 1, math.floor(v) - 1)) for v, n in zip(flat.amin(1).tolist(), image.shape[1:])]
        stops = [max(a + 1, min(n, math.ceil(v) + 2))
                 for a, v, n in zip(starts, flat.amax(1).tolist(), image.shape[1:])]
        block = (slice(None),) + tuple(slice(a, b) for a, b in zip(starts, stops))
        image, seg_block = image[block], seg[block]
        coordinates -= torch.tensor(starts, dtype=torch.float32).reshape(-1, *(1,) * len(output_shape))
        grid = sampling_grid(coordinates, image.shape[1:])[None]
        nearest = [int(c) for c in op.get("nearest_channels", ())]
        if not nearest:
            out_image = _grid_sample(image, grid, "bilinear")
        else:
            linear = [c for c in range(image.shape[0]) if c not in nearest]
            out_image = np.empty((image.shape[0], *output_shape), dtype=np.float32)
            out_image[linear] = _grid_sample(image[linear], grid, "bilinear")
            out_image[nearest] = _grid_sample(image[nearest], grid, "nearest")
        out_seg = _grid_sample(seg_block, grid, "nearest")
        return out_image, np.rint(out_seg).astype(seg.dtype)

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """E.g. ``rot(12,-3,5) scale 1.1 elastic``."""
        words = []
        if any(op["rotation_deg"]):
            words.append("rot(" + ",".join(f"{a:.0f}" for a in op["rotation_deg"]) + ")")
        if any(s != 1 for s in op["scale"]):
            words.append(f"scale {short_number(max(op['scale'], key=lambda s: abs(s - 1)), digits + 1)}")
        if op.get("elastic"):
            words.append("elastic")
        return " ".join(words)


@register_transform("mirror", order=120)
class Mirror(ExactTransform):
    """``{"op": "mirror", "axes": [...]}``: flips along the schedule's mirror axes, each with ``p_mirror``."""

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """One draw per mirror axis (none when mirroring is off); no op when no axis is drawn."""
        p, mirror_axes = self.settings.p_mirror, self.context.mirror_axes
        if p == 0 or not mirror_axes:
            return []
        axes = [a for a in mirror_axes if rng.random() < p]
        return [{"op": self.name, "axes": axes}] if axes else []

    @classmethod
    def apply_to_array(cls, array: np.ndarray, op: dict) -> np.ndarray:
        """``array`` flipped along the recorded spatial axes."""
        return np.flip(array, axis=tuple(1 + a for a in op["axes"]))

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """E.g. ``mirror[0,2]``."""
        return "mirror" + str(op["axes"]).replace(" ", "")


@register_transform("rot90", order=130)
class Rot90(ExactTransform):
    """``{"op": "rot90", "k": 1..3}``: quarter turns in the (y, x) plane (option ``rot90``)."""

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """A uniform number of quarter turns; half turns only when the plane is not square."""
        if not self.settings.rot90:
            return []
        patch = self.context.patch_size
        square = patch[-1] == patch[-2]
        # a quarter turn of a non-square plane would change the patch shape: half turns only
        k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
        return [{"op": self.name, "k": k}] if k else []

    @classmethod
    def apply_to_array(cls, array: np.ndarray, op: dict) -> np.ndarray:
        """``array`` turned ``k`` times by 90 degrees in its last two axes."""
        return np.rot90(array, k=op["k"], axes=(-2, -1))

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """E.g. ``rot90x2``."""
        return f"rot90x{op['k']}"
