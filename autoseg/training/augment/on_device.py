"""The spatial augmentation of a whole batch on the training device, after the workers hand it over.

Resampling every sample in the loader workers (:class:`.spatial.Spatial`) is what starves a fast
GPU fed by few CPU cores. With ``PatchLoader(..., spatial_on_device=True)`` the workers only read,
crop the (larger) input patch, encode its labels and draw every transform's parameters, with
exactly the draws of the regular path (:meth:`.pipeline.Augmentation.sample_batch`). They hand over
a *deferred batch* (:func:`deferred_batch`), and :func:`apply_deferred` finishes it where the
network runs:

1. the opening op of every sample, for the whole batch at once: one ``grid_sample`` call for the
   linearly interpolated image channels of the samples with a ``spatial`` op, one nearest-neighbour
   gather each for their labels and the cascade's one-hot channels, a slice for ``crop`` samples;
2. the ops after it, per sample: nnU-Net's intensity ops, mirroring and quarter turns as torch ops
   on the device (:data:`DEVICE_OPS`); any other op (the medical and cascade ops, plugins) replayed
   exactly by its numpy applier on the CPU.

The labels travel raw and are encoded last, on the device (:func:`encode_labels`), through
:meth:`LabelInfo.encode` itself applied to the few values present: the workers skip the encoding of
the whole input patch (half their time in a deferred batch), and the ops after ``spatial`` see
raw labels, as on the workers.

Agreement with the worker path on the CPU (``tests/test_augment_on_device.py``): the same
parameters and the same targets, bit for bit (:func:`nearest_indices` repeats the worker's index
arithmetic, near-halfway ties included); images within 1e-4 (measured 5e-5), because the worker
normalizes the sampling grid to the block its coordinates reach and this module to the whole input.
One op does not survive that rounding: Poisson noise (``medical`` preset) comes from numpy's
rejection sampler, which draws another realization of the same noise once its input differs in
the last bit; after a ``crop`` it agrees too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from autoseg.training.augment.base import get_transform
from autoseg.training.augment.spatial import (
    CenterCrop,
    Spatial,
    center_crop,
    input_coordinates,
    sampling_grid,
)
from autoseg.training.labels import LabelInfo

__all__ = ["DEVICE_OPS", "apply_deferred", "deferred_batch", "encode_labels", "is_deferred", "nearest_indices",
           "resample_batch"]

# keys of a deferred batch; "data" and "target" are absent, so a consumer that does not know the
# format fails loudly instead of training on unaugmented input-size patches
INPUT_DATA = "input_data"
INPUT_SEG = "input_seg"
PARAMS = "params"
LABEL_INFO = "label_info"

DeviceOp = Callable[[torch.Tensor, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


def deferred_batch(data: np.ndarray, seg: np.ndarray, params: Sequence[dict], label_info: LabelInfo,
                   as_tensors: bool = False) -> dict[str, Any]:
    """What a worker hands over instead of an augmented batch: input-size patches and parameters.

    Args:
        data: float32 ``(B, C, *input_shape)``.
        seg: raw integer labels ``(B, 1, *input_shape)``.
        params: one sampled parameter dict per sample (:meth:`.pipeline.Augmentation.sample_batch`).
        label_info: how :func:`apply_deferred` encodes the targets (a small frozen dataclass).
        as_tensors: torch tensors instead of numpy arrays (so the augmenter can pin them).
    """
    batch: dict[str, Any] = {INPUT_DATA: np.ascontiguousarray(data, dtype=np.float32),
                             INPUT_SEG: np.ascontiguousarray(seg), PARAMS: list(params), LABEL_INFO: label_info}
    if as_tensors:
        batch[INPUT_DATA] = torch.from_numpy(batch[INPUT_DATA])
        batch[INPUT_SEG] = torch.from_numpy(batch[INPUT_SEG])
    return batch


def is_deferred(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` still needs :func:`apply_deferred` (rather than holding finished patches)."""
    return INPUT_DATA in batch


def apply_deferred(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device`` and finish its augmentation there: ``(data, target)``.

    A deferred batch (:func:`deferred_batch`) gets its spatial op for the whole batch at once and
    then every later op; a finished batch (``"data"`` and ``"target"``, e.g. a validation batch) is
    only moved. Copies are non-blocking on CUDA (the loader pins its tensors there).

    Returns:
        float32 data ``(B, C, *patch_size)`` and the int16 encoded target ``(B, T, *patch_size)``.
    """
    non_blocking = device.type == "cuda"
    if not is_deferred(batch):
        data, target = (torch.as_tensor(batch[k]).to(device, non_blocking=non_blocking) for k in ("data", "target"))
        return data, target
    data = torch.as_tensor(batch[INPUT_DATA]).to(device, non_blocking=non_blocking)
    seg = torch.as_tensor(batch[INPUT_SEG]).to(device, non_blocking=non_blocking)
    params = batch[PARAMS]
    data, seg = resample_batch(data, seg, params)
    for b, sample in enumerate(params):
        data[b], seg[b] = _finish_sample(data[b], seg[b], sample["ops"][1:], tuple(data.shape[2:]))
    try:
        return data, encode_labels(batch[LABEL_INFO], seg)
    except Exception as error:
        if hasattr(error, "add_note"):  # Python 3.11+: name the cases, as the workers do
            error.add_note(f"in the batch of cases {', '.join(batch.get('keys', []))}")
        raise


def encode_labels(label_info: LabelInfo, seg: torch.Tensor) -> torch.Tensor:
    """:meth:`LabelInfo.encode` of raw labels ``(B, 1, *spatial)`` on their device: int16 ``(B, T, *spatial)``.

    The encoding is voxel-wise, so it is computed once per value present (by ``LabelInfo.encode``
    itself, which also raises :class:`LabelError` for an undeclared one) and looked up per voxel.
    """
    values = torch.unique(seg)
    table = label_info.encode(values.cpu().numpy().reshape(1, 1, -1))[0]  # (T, values)
    lookup = torch.from_numpy(table).to(seg.device)
    encoded = lookup[:, torch.searchsorted(values, seg.reshape(-1))]
    return encoded.reshape(table.shape[0], seg.shape[0], *seg.shape[2:]).movedim(0, 1).contiguous()


def resample_batch(data: torch.Tensor, seg: torch.Tensor,
                   params: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply every sample's opening op (``spatial`` or ``crop``) to an input-size batch on its device.

    The samples with a ``spatial`` op are resampled together: one ``grid_sample`` call for the
    linearly interpolated image channels, one nearest-neighbour gather each for the labels and the
    cascade's one-hot channels (:func:`nearest_indices`); ``crop`` samples are sliced. The outputs
    are new tensors (the inputs are never written).
    """
    if len(params) != data.shape[0] or seg.shape[0] != data.shape[0]:
        raise ValueError(f"{len(params)} parameter sets for a batch of {data.shape[0]} (labels {seg.shape[0]})")
    in_shape = tuple(int(s) for s in data.shape[2:])
    out_shape = tuple(int(s) for s in params[0]["output_shape"]) if params else in_shape
    groups: dict[tuple[int, ...], list[int]] = {}  # spatial samples by their nearest-neighbour channels
    out_data = data.new_empty((data.shape[0], data.shape[1], *out_shape))
    out_seg = seg.new_empty((seg.shape[0], seg.shape[1], *out_shape))
    for b, sample in enumerate(params):
        if tuple(sample["output_shape"]) != out_shape or tuple(sample["input_shape"]) != in_shape:
            raise ValueError(f"sample {b} was sampled for {sample['input_shape']} -> {sample['output_shape']}, "
                             f"the batch is {list(in_shape)} -> {list(out_shape)}")
        op = sample["ops"][0]
        if op["op"] == Spatial.name:
            groups.setdefault(tuple(int(c) for c in op.get("nearest_channels", ())), []).append(b)
        elif op["op"] == CenterCrop.name:
            out_data[b] = center_crop(data[b], out_shape)
            out_seg[b] = center_crop(seg[b], out_shape)
        else:
            raise ValueError(f"sample {b} opens with op {op['op']!r}; a deferred batch opens with "
                             f"{Spatial.name!r} or {CenterCrop.name!r}")
    for nearest, samples in groups.items():
        rows = _index(samples)
        coordinates = torch.stack([input_coordinates(params[b]["ops"][0], in_shape, out_shape, data.device)
                                   for b in samples])
        linear = _index([c for c in range(data.shape[1]) if c not in nearest])
        if linear:
            grid = torch.stack([sampling_grid(c, in_shape) for c in coordinates])
            # border padding and voxel centres at -1 and 1, as the worker path (Spatial.apply)
            _assign(out_data, rows, linear, F.grid_sample(data[rows][:, linear], grid, mode="bilinear",
                                                          padding_mode="border", align_corners=True))
        voxels = nearest_indices(coordinates, in_shape)
        _assign(out_seg, rows, slice(None), _gather(seg[rows], voxels, out_shape))
        if nearest:
            _assign(out_data, rows, _index(nearest), _gather(data[rows][:, _index(nearest)], voxels, out_shape))
    return out_data, out_seg


def _index(items: Sequence[int]) -> slice | list[int]:
    """A slice for consecutive ``items`` (a view, no copy of a whole input batch), else the list."""
    items = list(items)
    if items and items == list(range(items[0], items[-1] + 1)):
        return slice(items[0], items[-1] + 1)
    return items


def _assign(out: torch.Tensor, rows: slice | list[int], columns: slice | list[int], values: torch.Tensor) -> None:
    """``out[rows][:, columns] = values``, written into ``out`` also when ``rows`` is a list."""
    if isinstance(rows, slice):
        out[rows][:, columns] = values  # a view of out
    else:
        for row, value in zip(rows, values):
            out[row][columns] = value


def nearest_indices(coordinates: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Flat input indices ``(B, prod(output_shape))`` of the voxels nearest to ``coordinates``
    ``(B, dim, *output_shape)``, chosen bit for bit as the worker path chooses them.

    The worker (:meth:`.spatial.Spatial.apply`) resamples only the block its coordinates reach and
    calls ``grid_sample(mode="nearest")`` with coordinates normalized to that block. A coordinate
    within rounding of a point halfway between two voxels goes to either, depending on that
    arithmetic, so it is repeated here per sample, batched: the block, the normalization, then
    grid_sample's own unnormalization (``((g + 1) / 2) * (size - 1)``, clipped to the block for
    border padding, rounded half to even). Labels then agree exactly, not only almost everywhere.
    """
    batch, dim = coordinates.shape[:2]
    flat = coordinates.reshape(batch, dim, -1)
    sizes = torch.tensor([int(n) for n in input_shape], device=coordinates.device)
    starts = torch.minimum(torch.clamp(flat.amin(2).floor().long() - 1, min=0), sizes - 1)
    stops = torch.maximum(starts + 1, torch.minimum(sizes, flat.amax(2).ceil().long() + 2))
    block = stops - starts
    # the scale is computed in double and rounded once to float32, as Python floats give it there
    scale = torch.where(block > 1, 2.0 / (block - 1).clamp(min=1).double(), 0.0).float()
    grid = (flat - starts[..., None].float()) * scale[..., None] - 1.0
    extent = (block - 1).float()[..., None]
    position = torch.minimum(torch.clamp(((grid + 1) / 2) * extent, min=0.0), extent)
    voxel = torch.round(position).long() + starts[..., None]
    strides = [math.prod(int(n) for n in input_shape[k + 1:]) for k in range(dim)]
    return sum(voxel[:, k] * strides[k] for k in range(dim))  # type: ignore[return-value]


def _gather(tensor: torch.Tensor, voxels: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` ``(B, C, *input_shape)`` at the flat ``voxels`` ``(B, N)``: ``(B, C, *out_shape)``."""
    flat = tensor.reshape(*tensor.shape[:2], -1)
    picked = torch.gather(flat, 2, voxels[:, None].expand(-1, tensor.shape[1], -1))
    return picked.reshape(*tensor.shape[:2], *out_shape)


def _finish_sample(image: torch.Tensor, seg: torch.Tensor, ops: Sequence[dict],
                   out_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ops after the opening one, in order: torch ops where :data:`DEVICE_OPS` has them, else
    the numpy applier on the CPU (consecutive CPU ops share one round trip)."""
    device = image.device
    on_cpu: tuple[np.ndarray, np.ndarray] | None = None
    for op in ops:
        device_op = DEVICE_OPS.get(op["op"])
        if device_op is not None:
            if on_cpu is not None:
                image, seg = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in on_cpu)
                on_cpu = None
            image, seg = device_op(image, seg, op)
            continue
        if on_cpu is None:
            # copies: the numpy appliers write in place
            on_cpu = (image.detach().cpu().numpy().copy(), seg.detach().cpu().numpy().copy())
        on_cpu = get_transform(op["op"]).apply(*on_cpu, op, out_shape)
    if on_cpu is not None:
        image, seg = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in on_cpu)
    return image, seg


# --- torch versions of the ops after ``spatial`` ---------------------------------------------------
# Each mirrors its numpy applier in autoseg/training/augment/intensity.py or spatial.py operation for
# operation (same float32 or float64 arithmetic), changing the image in place where that one does.


def _brightness(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    image[op["channel"]] *= _float32(op["factor"], image)
    return image, seg


def _contrast(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    channel = image[op["channel"]]
    mean, low, high = channel.mean(), channel.min(), channel.max()
    image[op["channel"]] = torch.clamp((channel - mean) * _float32(op["factor"], image) + mean, low, high)
    return image, seg


def _gamma(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 like the numpy applier: the power amplifies rounding near the channel minimum
    channel = image[op["channel"]].to(torch.float64)
    if op["invert"]:
        channel = -channel
    mean, std = channel.mean(), channel.std(correction=0)
    low = channel.min()
    span = channel.max() - low + 1e-7
    channel = torch.pow((channel - low) / span, op["gamma"]) * span + low
    channel = (channel - channel.mean()) / (channel.std(correction=0) + 1e-8) * std + mean
    image[op["channel"]] = (-channel if op["invert"] else channel).to(image.dtype)
    return image, seg


def _gaussian_noise(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # the field comes from numpy's generator, as in the worker path, so both add the same noise
    rng = np.random.default_rng(op["seed"])
    std = _float32(op["std"], image)
    for c in op["channels"]:
        noise = torch.from_numpy(rng.standard_normal(tuple(image.shape[1:]), dtype=np.float32)).to(image.device)
        image[c] += noise * std
    return image, seg


def _gaussian_blur(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # scipy's gaussian_filter(mode="nearest", truncate=3.0): one 1D pass per axis, edges repeated
    channel = image[op["channel"]]
    for axis, sigma in enumerate(op["sigma"]):
        radius = int(3.0 * float(sigma) + 0.5)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=image.device)
        weights = torch.exp(-0.5 / (float(sigma) ** 2) * offsets**2)
        weights = (weights / weights.sum()).to(torch.float32).reshape(1, 1, -1)
        moved = channel.movedim(axis, -1)
        rows = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (radius, radius), mode="replicate")
        channel = F.conv1d(rows, weights).reshape(moved.shape).movedim(-1, axis)
    image[op["channel"]] = channel
    return image, seg


def _low_resolution(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    c, shape = op["channel"], tuple(image.shape[1:])
    small = [max(1, round(n * op["zoom"])) if axis in op["axes"] else n for axis, n in enumerate(shape)]
    if list(small) == list(shape):
        return image, seg
    down = F.interpolate(image[c][None, None], size=small, mode="nearest-exact")
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    image[c] = F.interpolate(down, size=shape, mode=mode, align_corners=False)[0, 0]
    return image, seg


def _mirror(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [1 + a for a in op["axes"]]
    return torch.flip(image, dims), torch.flip(seg, dims)


def _rot90(image: torch.Tensor, seg: torch.Tensor, op: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.rot90 turns from the first towards the second axis, as np.rot90 does
    return torch.rot90(image, op["k"], dims=(-2, -1)), torch.rot90(seg, op["k"], dims=(-2, -1))


def _float32(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a float32 scalar tensor: numpy multiplies by ``np.float32(value)``."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


DEVICE_OPS: dict[str, DeviceOp] = {
    "brightness": _brightness,
    "contrast": _contrast,
    "gamma": _gamma,
    "gaussian_noise": _gaussian_noise,
    "gaussian_blur": _gaussian_blur,
    "low_resolution": _low_resolution,
    "mirror": _mirror,
    "rot90": _rot90,
}
"""Ops with a torch version here, by op name; every other op is replayed by its numpy applier."""
