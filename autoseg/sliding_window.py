"""The sliding-window kernel: probabilities of a whole image from overlapping, Gaussian-weighted tiles.

Pure tensor code (a network, an image tensor, a patch size), shared by the end-of-fold validation
of :mod:`autoseg.training` and by :mod:`autoseg.inference`, so it sits below both:

* tiles of the patch size, overlapping by ``1 - step`` of the patch, start positions spread evenly
  so the last tile ends at the edge (nnU-Net's rule, :func:`tile_starts`), several tiles per
  forward pass;
* each tile's softmax (or sigmoid) is weighted by a Gaussian importance map (sigma 1/8 of the
  patch, :func:`gaussian_importance_map`), since a network is least reliable at a tile's border;
  the weighted sum is divided by the summed weights;
* test-time mirroring: every combination of flips along the given axes, each flipped back and
  averaged;
* 2D networks treat the Z axis of a ``(C, Z, Y, X)`` image as a stack of independent slices;
* the accumulators of a large volume on a GPU that cannot hold them in float32 fall back to
  float16, and then to host memory.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from autoseg.precision import Precision, autocast, resolve_precision

Activation = Literal["softmax", "sigmoid", "none"]

# Tiles per forward pass by default: as many as fit in about this many voxels (at least one).
_TILE_BATCH_VOXELS = 1 << 18
# Share of the free GPU memory the accumulators may take; the rest is for the network.
_ACCUMULATOR_GPU_SHARE = 0.4
# Smallest tile weight when accumulating in float16 (float16 resolves ~1e-3 relative near 1).
_HALF_WEIGHT_FLOOR = 2.0 ** -10

__all__ = ["Activation", "gaussian_importance_map", "sliding_window_predict", "tile_starts"]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8,
                            dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """Gaussian tile weights of ``patch_size``: sigma ``sigma_scale * patch`` per axis, maximum 1.

    Centred on the tile's geometric centre (``(p - 1) / 2``, so the map is mirror-symmetric, unlike
    nnU-Net's ``p // 2``), computed in float64, cast to ``dtype``; entries that underflow to zero
    are replaced by the smallest non-zero entry, so every voxel of a tile keeps some weight and the
    division by the summed weights is always defined.
    """
    if not patch_size or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must be positive integers, got {tuple(patch_size)}")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weights = torch.ones((), dtype=torch.float64)
    for size in patch_size:
        size = int(size)
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        profile = torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        weights = weights[..., None] * profile
    weights = (weights / weights.max()).to(dtype)
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights.to(device)


def tile_starts(image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net's rule).

    Per axis, the fewest tiles whose spacing is at most ``step * patch``, spread evenly from 0 to
    ``size - patch`` so the first tile starts at the first voxel and the last ends at the last.
    Every ``size`` must be at least its ``patch`` (pad first).
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if len(image_size) != len(patch_size):
        raise ValueError(f"image size {tuple(image_size)} and patch size {tuple(patch_size)} differ in length")
    starts = []
    for size, patch in zip(image_size, patch_size):
        size, patch = int(size), int(patch)
        if size < patch:
            raise ValueError(f"image size {tuple(image_size)} is smaller than the patch {tuple(patch_size)}; pad it")
        count = math.ceil((size - patch) / (patch * step)) + 1
        if count == 1:
            starts.append([0])
        else:
            spacing = (size - patch) / (count - 1)
            starts.append([int(round(spacing * i)) for i in range(count)])
    return starts


def _activate(logits: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "none":
        return logits
    raise ValueError(f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}")


def _mirror_combinations(dims: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``dims``, the empty one (no flip) first."""
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def _forward(network: nn.Module, batch: torch.Tensor, activation: Activation, precision: Precision) -> torch.Tensor:
    with autocast(batch.device, precision):
        output = network(batch)
    if isinstance(output, (list, tuple)):  # deep supervision left on: the full resolution comes first
        output = output[0]
    return _activate(output.float(), activation)


MirrorReceiver = Callable[[Sequence[torch.Tensor]], None]


def _forward_tta(network: nn.Module, batch: torch.Tensor, mirror_dims: Sequence[int], activation: Activation,
                 precision: Precision, together: bool = False, on_mirrors: MirrorReceiver | None = None
                 ) -> torch.Tensor:
    """Mean activated output over every mirrored copy of ``batch``, each flipped back.

    ``together`` runs all mirrored copies as one batch (one forward pass instead of up to 8: a GPU
    runs a larger batch at nearly the cost of a small one); otherwise one forward per copy.
    ``on_mirrors`` is shown the flipped-back copies (each ``(B, K, *patch)``) before they are averaged.
    """
    combos = _mirror_combinations(mirror_dims)
    if together and len(combos) > 1:
        stacked = torch.cat([torch.flip(batch, dims) if dims else batch for dims in combos])
        outputs = _forward(network, stacked, activation, precision).split(batch.shape[0])
    else:
        outputs = [_forward(network, torch.flip(batch, dims) if dims else batch, activation, precision)
                   for dims in combos]
    copies = [torch.flip(output, dims) if dims else output for dims, output in zip(combos, outputs)]
    if on_mirrors is not None and len(copies) > 1:
        on_mirrors(copies)
    total: torch.Tensor | None = None
    for output in copies:
        # Out of place: an identity-like network may hand back its (reused) input.
        total = output if total is None else total + output
    assert total is not None
    return total / len(combos) if len(combos) > 1 else total


def _choose_accumulator(voxels: int, channels: int, device: torch.device, dtype: torch.dtype | None,
                        accumulate_device: str | torch.device | None) -> tuple[torch.dtype, torch.device]:
    """float32 where it fits; on a GPU float16 for big volumes, then host memory for huge ones."""
    if accumulate_device is not None:
        target = torch.device(accumulate_device)
        return dtype or torch.float32, target
    if device.type != "cuda":
        return dtype or torch.float32, torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    budget = free * _ACCUMULATOR_GPU_SHARE
    weights_bytes = voxels * 4
    for candidate in ([dtype] if dtype is not None else [torch.float32, torch.float16]):
        size = torch.empty((), dtype=candidate).element_size()
        if channels * voxels * size + weights_bytes <= budget:
            return candidate, device
    return dtype or torch.float32, torch.device("cpu")


@torch.no_grad()
def sliding_window_predict(
    network: nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    step: float = 0.5,
    tta_axes: Sequence[int] = (),
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    output_channels: int | None = None,
    activation: Activation = "softmax",
    accumulate_dtype: torch.dtype | None = None,
    accumulate_device: str | torch.device | None = None,
    progress: bool = False,
    precision: Precision | None = None,
    mirror_batch: bool | None = None,
    on_mirrors: Callable[[Sequence[torch.Tensor], torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Probabilities of a whole image from overlapping, Gaussian-weighted tiles.

    Args:
        network: maps ``(B, C, *patch)`` to logits ``(B, K, *patch)`` (a list: its first entry);
            used as given (put it in eval mode and on ``device`` first).
        image: ``(C, Z, Y, X)`` or ``(C, Y, X)``; padded with zeros to at least the patch size
            (centred) and cropped back.
        patch_size: the network's patch, 3 entries, or 2 for a 2D network: then every Z slice of a
            ``(C, Z, Y, X)`` image is an independent 2D image (tiles of several slices are batched).
        step: tile spacing as a fraction of the patch (0.5: tiles overlap by half).
        tta_axes: the network's spatial axes (0-based, in patch order) to mirror along; every
            combination of flips is averaged.
        batch_size: tiles per forward pass; default as many as fit in ~262k voxels, at least one.
        device: where the network runs.
        output_channels: expected number of output channels (checked); None: the network's.
        activation: ``softmax``, ``sigmoid`` or ``none`` (average the raw outputs).
        accumulate_dtype: dtype of the summed predictions; default float32, or float16 on a GPU
            when float32 does not fit.
        accumulate_device: where the sums live; default ``device`` when they fit in
            :data:`_ACCUMULATOR_GPU_SHARE` of the free GPU memory, else the host.
        progress: show a progress bar over tile batches.
        precision: autocast precision of the forward passes (:mod:`autoseg.precision`); None:
            the device's best (``resolve_precision("auto", device)``). Probabilities are always
            summed in ``accumulate_dtype``.
        mirror_batch: run a tile batch's mirrored copies as one forward pass; None: on CUDA (where
            a batch that does not fit in memory falls back to one pass per copy), not on the CPU,
            where a larger batch costs more per tile (1.14 s against 0.90 s per tile measured on 2
            cores for the 24x96x96 network).
        on_mirrors: shown every tile batch's mirrored copies (flipped back, activated, each
            ``(B, K, *patch)``) with the tiles' Gaussian weights ``patch``, before they are
            averaged: how :mod:`autoseg.trust` measures their agreement at no extra cost and
            without changing the result.

    Returns:
        ``(K, *spatial)`` of the image's spatial shape, dtype ``accumulate_dtype``, on the
        accumulation device.
    """
    device = torch.device(device)
    if isinstance(image, np.ndarray) and not image.flags.writeable:
        image = np.array(image)  # a read-only memory map: torch needs its own copy
    image = torch.as_tensor(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, Z, Y, X) or (C, Y, X), got shape {tuple(image.shape)}")
    flat_input = image.ndim == 3
    if flat_input:
        image = image[:, None]
    patch = tuple(int(p) for p in patch_size)
    net_dim = len(patch)
    if net_dim not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 entries, got {patch}")
    tile = patch if net_dim == 3 else (1, *patch)
    bad_axes = [a for a in tta_axes if not 0 <= int(a) < net_dim]
    if bad_axes:
        raise ValueError(f"tta_axes {list(tta_axes)}: {bad_axes} outside 0..{net_dim - 1}")
    mirror_dims = tuple(sorted({2 + int(a) for a in tta_axes}))

    spatial = tuple(int(s) for s in image.shape[1:])
    padded = tuple(max(s, t) for s, t in zip(spatial, tile))
    before = tuple((p - s) // 2 for s, p in zip(spatial, padded))
    if padded != spatial:
        pad: list[int] = []
        for s, p, b in zip(reversed(spatial), reversed(padded), reversed(before)):
            pad += [b, p - s - b]
        image = torch.nn.functional.pad(image, pad)
    if device.type == "cuda":
        image = image.to(device, non_blocking=True)

    starts = tile_starts(padded, tile, step)
    if net_dim == 2:
        starts[0] = list(range(padded[0]))  # every slice once, whatever the step
    positions = list(itertools.product(*starts))
    if batch_size is None:
        batch_size = max(1, _TILE_BATCH_VOXELS // math.prod(patch))
    gaussian = gaussian_importance_map(patch, device=device)
    precision = resolve_precision("auto", device) if precision is None else precision
    together = device.type == "cuda" if mirror_batch is None else mirror_batch
    receiver: MirrorReceiver | None = None
    if on_mirrors is not None:
        def receiver(copies: Sequence[torch.Tensor]) -> None:
            on_mirrors(copies, gaussian)

    accumulator: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    tile_weights: torch.Tensor | None = None
    bar = tqdm(total=len(positions), desc="tiles", unit="tile", disable=not progress, leave=False)
    with bar:
        for first in range(0, len(positions), batch_size):
            chunk = positions[first:first + batch_size]
            windows = [tuple(slice(s, s + t) for s, t in zip(start, tile)) for start in chunk]
            batch = torch.stack([image[(slice(None), *window)] for window in windows])
            batch = batch.to(device, dtype=torch.float32, non_blocking=True)
            if net_dim == 2:
                batch = batch[:, :, 0]
            try:
                probabilities = _forward_tta(network, batch, mirror_dims, activation, precision, together, receiver)
            except torch.cuda.OutOfMemoryError:
                if not together:
                    raise
                together = False  # for the rest of the image too: the next batch would not fit either
                torch.cuda.empty_cache()
                probabilities = _forward_tta(network, batch, mirror_dims, activation, precision, False, receiver)
            if tuple(probabilities.shape[2:]) != patch:
                raise ValueError(f"the network turned a {patch} tile into {tuple(probabilities.shape[2:])}")
            if accumulator is None:
                channels = int(probabilities.shape[1])
                if output_channels is not None and channels != output_channels:
                    raise ValueError(f"the network gives {channels} output channels, expected {output_channels}")
                dtype, where = _choose_accumulator(math.prod(padded), channels, device, accumulate_dtype,
                                                   accumulate_device)
                if dtype == torch.float16:
                    # Weighted probabilities near a tile's corner would underflow in half precision
                    # while their weights do not; a floor keeps both representable.
                    gaussian = gaussian.clamp_min(_HALF_WEIGHT_FLOOR)
                accumulator = torch.zeros((channels, *padded), dtype=dtype, device=where)
                weights = torch.zeros(padded, dtype=torch.float32, device=where)
                tile_weights = gaussian.to(where).reshape(tile)
            assert weights is not None and tile_weights is not None
            probabilities *= gaussian
            if net_dim == 2:
                probabilities = probabilities[:, :, None]
            probabilities = probabilities.to(accumulator.device, accumulator.dtype)
            for index, window in enumerate(windows):
                accumulator[(slice(None), *window)] += probabilities[index]
                weights[window] += tile_weights
            bar.update(len(chunk))
    assert accumulator is not None and weights is not None
    accumulator.div_(weights)
    del weights
    result = accumulator[(slice(None), *(slice(b, b + s) for b, s in zip(before, spatial)))]
    if padded != spatial:
        result = result.clone()  # release the padding
    return result[:, 0] if flat_input else result
