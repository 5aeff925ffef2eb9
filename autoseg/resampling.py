"""Fast, memory-bounded resampling of images, labels and probabilities with torch.

nnU-Net resamples on the CPU with scikit-image, one class at a time on the whole volume, which for
a large CT takes minutes and tens of GB. Here every resampling is *separable* and *streamed*:

1. **In-plane pass** (the two axes other than the streaming axis) with
   :func:`torch.nn.functional.interpolate` on slabs of slices: ``nearest-exact`` for order 0,
   ``bilinear`` for order 1, ``bicubic`` (Keys cubic convolution, a = -0.75) for orders 2 and 3.
2. **Streaming-axis pass**, computed per slab of *output* slices as a weighted sum of at most four
   in-plane-resampled input slices, with exactly torch's formulas (``align_corners=False``), so
   order 1 is trilinear and order 3 is separable tricubic. In-plane results are cached in a sliding
   window, so every input slice is resampled in-plane once.

Extra memory is therefore a few slabs, independent of the volume size; the result is written into
one preallocated array. Everything runs on ``device`` (a CUDA device when given).

The streaming axis is the slow axis of anisotropic data (nnU-Net's "separate z" rule: when the
largest spacing exceeds ``anisotropy_threshold`` times the smallest, of the current spacing or else
of the target spacing, that axis is resampled separately with ``slow_axis_order``, nearest by
default, so thick slices are not smeared into each other); otherwise it is axis 0 and every axis
uses ``order``.

Labels are resampled class by class (one-hot, :func:`resample_label`) with a running argmax, so
memory is O(volume) whatever the number of classes, the output holds only values of the input, and
a class that would vanish (thinner than the new voxel) keeps its voxel of highest interpolated
probability. Interpolation weights sum to one, so the most frequent class (usually background) is
not interpolated at all: its probability is one minus the others'.

Shapes follow nnU-Net: ``new_shape = round(shape * spacing / target_spacing)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_CUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution parameter
_SLAB_ELEMENTS = 1 << 19  # ~2 MB of float32 per output slab when chunk_slices is not given
_INPLANE_MODES = {0: "nearest-exact", 1: "bilinear", 2: "bicubic", 3: "bicubic"}

Device = str | torch.device


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float],
                      target_spacing: Sequence[float]) -> tuple[int, ...]:
    """``round(shape * spacing / target_spacing)`` per axis, at least 1 (nnU-Net's rule)."""
    if len(shape) != len(spacing) or len(shape) != len(target_spacing):
        raise ValueError(f"shape {tuple(shape)}, spacing {tuple(spacing)} and target spacing "
                         f"{tuple(target_spacing)} must have the same length")
    if any(s <= 0 for s in spacing) or any(s <= 0 for s in target_spacing):
        raise ValueError(f"spacings must be positive, got {tuple(spacing)} -> {tuple(target_spacing)}")
    ratio = np.asarray(spacing, dtype=np.float64) / np.asarray(target_spacing, dtype=np.float64)
    new = np.round(ratio * np.asarray(shape, dtype=np.float64)).astype(int)
    return tuple(max(1, int(n)) for n in new)


def _single_slow_axis(spacing: Sequence[float], threshold: float) -> int | None:
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() / spacing.min() <= threshold:
        return None
    slow = np.flatnonzero(spacing == spacing.max())
    # Two equally coarse axes (e.g. 3 x 3 x 1 mm) have no single slow axis to treat apart.
    return int(slow[0]) if slow.size == 1 else None


def find_slow_axis(current_spacing: Sequence[float], target_spacing: Sequence[float],
                   anisotropy_threshold: float = 3.0) -> int | None:
    """The axis to resample separately, or None (nnU-Net's rule, see the module docstring).

    The current spacing decides first; when it is isotropic enough, an anisotropic target decides.
    """
    axis = _single_slow_axis(current_spacing, anisotropy_threshold)
    if axis is None and _single_slow_axis(target_spacing, anisotropy_threshold) is not None:
        axis = _single_slow_axis(target_spacing, anisotropy_threshold)
    return axis


def axis_weights(in_size: int, out_size: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of a 1D resampling, ``(out_size, taps)`` each.

    Exactly torch's ``interpolate(align_corners=False)`` conventions: ``nearest-exact`` for order
    0, linear for 1, cubic convolution with a = -0.75 and border replication for 2 and 3.
    """
    if order not in (0, 1, 2, 3):
        raise ValueError(f"interpolation order must be 0, 1, 2 or 3, got {order}")
    if in_size == out_size:
        return np.arange(out_size)[:, None], np.ones((out_size, 1), dtype=np.float32)
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    if order == 0:
        src = np.minimum(np.floor((dst + 0.5) * scale).astype(np.int64), in_size - 1)
        return src[:, None], np.ones((out_size, 1), dtype=np.float32)
    src = (dst + 0.5) * scale - 0.5
    if order == 1:
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(np.int64)
        frac = src - i0
        i1 = np.minimum(i0 + 1, in_size - 1)
        return np.stack([i0, i1], 1), np.stack([1 - frac, frac], 1).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    a = _CUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1).astype(np.float32)
    indices = np.clip(np.stack([i0 - 1, i0, i0 + 1, i0 + 2], 1), 0, in_size - 1)
    return indices, weights


@dataclass(frozen=True)
class _Scheme:
    """How one resampling is carried out: streaming axis and the order of each pass."""

    new_shape: tuple[int, int, int]
    stream_axis: int
    inplane_order: int
    stream_order: int


def _scheme(shape: Sequence[int], current_spacing: Sequence[float], target_spacing: Sequence[float] | None,
            new_shape: Sequence[int] | None, order: int, separate_slow_axis: bool | None,
            slow_axis_order: int, anisotropy_threshold: float, slow_axis: int | None = None) -> _Scheme:
    shape = tuple(int(s) for s in shape)
    if len(current_spacing) != 3:
        raise ValueError(f"current_spacing must be (z, y, x), got {tuple(current_spacing)}")
    if new_shape is None:
        if target_spacing is None:
            raise ValueError("give target_spacing or new_shape")
        new_shape = compute_new_shape(shape, current_spacing, target_spacing)
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3 or min(new_shape) < 1:
        raise ValueError(f"new_shape must be three positive sizes, got {new_shape}")
    if target_spacing is None:
        target_spacing = tuple(c * s / n for c, s, n in zip(current_spacing, shape, new_shape))
    for name, value in (("order", order), ("slow_axis_order", slow_axis_order)):
        if value not in (0, 1, 2, 3):
            raise ValueError(f"{name} must be 0, 1, 2 or 3, got {value}")
    if slow_axis is not None:
        if slow_axis not in (0, 1, 2):
            raise ValueError(f"slow_axis must be 0, 1 or 2, got {slow_axis}")
        slow = slow_axis
    elif separate_slow_axis is False:
        slow = None
    elif separate_slow_axis is True:
        # Forced: the coarsest axis, if there is a single one; with a tie there is nothing to separate.
        slow = _single_slow_axis(current_spacing, 1.0)
    else:
        slow = find_slow_axis(current_spacing, target_spacing, anisotropy_threshold)
    if slow is None:
        return _Scheme(new_shape, 0, order, order)
    return _Scheme(new_shape, slow, order, slow_axis_order)


def _default_chunk(new_shape: Sequence[int], axis: int) -> int:
    plane = int(np.prod([s for i, s in enumerate(new_shape) if i != axis]))
    return max(1, _SLAB_ELEMENTS // max(plane, 1))


class _InPlane:
    """In-plane resampling of input slices ``[start, stop)`` along the streaming axis, cached.

    Output slabs ask for monotonically advancing windows that overlap by a few slices; the cache
    keeps the last window so each input slice is interpolated once.
    """

    def __init__(self, source: Callable[[int, int], np.ndarray], out_plane: tuple[int, int], order: int,
                 device: torch.device) -> None:
        self.source = source
        self.out_plane = out_plane
        self.mode = _INPLANE_MODES[order]
        self.device = device
        self.start = 0
        self.block: torch.Tensor | None = None

    def _compute(self, start: int, stop: int) -> torch.Tensor:
        slab = np.ascontiguousarray(self.source(start, stop), dtype=np.float32)
        tensor = torch.from_numpy(slab).to(self.device)
        if tuple(tensor.shape[1:]) == self.out_plane:
            return tensor
        options = {} if self.mode == "nearest-exact" else {"align_corners": False}
        return F.interpolate(tensor[:, None], size=self.out_plane, mode=self.mode, **options)[:, 0]

    def get(self, start: int, stop: int) -> torch.Tensor:
        block = self.block
        if block is not None and self.start <= start < self.start + block.shape[0]:
            end = self.start + block.shape[0]
            if stop <= end:
                return block[start - self.start: stop - self.start]
            block = torch.cat([block[start - self.start:], self._compute(end, stop)])
        else:
            block = self._compute(start, stop)
        self.start, self.block = start, block
        return block


def _stream(source: Callable[[int, int], np.ndarray], in_shape: tuple[int, int, int],
            scheme: _Scheme, device: torch.device, chunk_slices: int | None
            ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, slab)`` output slabs along the streaming axis.

    ``source(a, b)`` returns input slices ``[a, b)`` along the streaming axis (that axis first, then
    the two in-plane axes in their original order); slabs have the same layout and belong to the
    caller (they may be modified in place).
    """
    axis = scheme.stream_axis
    out_plane = tuple(s for i, s in enumerate(scheme.new_shape) if i != axis)
    n_in, n_out = in_shape[axis], scheme.new_shape[axis]
    indices, weights = axis_weights(n_in, n_out, scheme.stream_order)
    taps = indices.shape[1]
    inplane = _InPlane(source, out_plane, scheme.inplane_order, device)  # type: ignore[arg-type]
    chunk = chunk_slices or _default_chunk(scheme.new_shape, axis)
    for z0 in range(0, n_out, chunk):
        z1 = min(z0 + chunk, n_out)
        rows = indices[z0:z1]
        first, last = int(rows.min()), int(rows.max()) + 1
        window = inplane.get(first, last)
        local = torch.from_numpy(rows - first).to(device)
        if taps == 1:
            if n_in == n_out:
                slab = window.clone()  # the window is the cache's: callers may modify the slab
            else:
                slab = window.index_select(0, local[:, 0])
        else:
            w = torch.from_numpy(weights[z0:z1]).to(device)
            slab = window.index_select(0, local[:, 0]) * w[:, 0, None, None]
            for t in range(1, taps):
                slab.addcmul_(window.index_select(0, local[:, t]), w[:, t, None, None])
        yield z0, z1, slab


def _as_device(device: Device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def _resample_channels(array: np.ndarray, current_spacing: Sequence[float],
                       target_spacing: Sequence[float] | None, new_shape: Sequence[int] | None, order: int,
                       separate_slow_axis: bool | None, slow_axis_order: int, anisotropy_threshold: float,
                       device: Device, chunk_slices: int | None, out: np.ndarray | None,
                       slow_axis: int | None) -> np.ndarray:
    squeeze = array.ndim == 3
    if squeeze:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"expected an array (C, Z, Y, X) or (Z, Y, X), got shape {array.shape}")
    scheme = _scheme(array.shape[1:], current_spacing, target_spacing, new_shape, order,
                     separate_slow_axis, slow_axis_order, anisotropy_threshold, slow_axis)
    expected = (array.shape[0], *scheme.new_shape)
    if out is None:
        out = np.empty(expected, dtype=np.float32)
    elif squeeze and out.shape == scheme.new_shape:
        out = out[None]
    if out.shape != expected or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {expected}, got {out.dtype} {out.shape}")
    torch_device = _as_device(device)
    axis = scheme.stream_axis
    for channel in range(array.shape[0]):
        moved = np.moveaxis(array[channel], axis, 0)
        target = np.moveaxis(out[channel], axis, 0)
        for z0, z1, slab in _stream(lambda a, b, m=moved: m[a:b], array.shape[1:], scheme,
                                    torch_device, chunk_slices):
            target[z0:z1] = slab.cpu().numpy()
    return out[0] if squeeze else out


def resample_image(array: np.ndarray, current_spacing: Sequence[float],
                   target_spacing: Sequence[float] | None = None, new_shape: Sequence[int] | None = None,
                   order: int = 3, separate_slow_axis: bool | None = None, slow_axis_order: int = 0,
                   anisotropy_threshold: float = 3.0, device: Device = "cpu",
                   chunk_slices: int | None = None, out: np.ndarray | None = None,
                   slow_axis: int | None = None) -> np.ndarray:
    """Resample an image ``(C, Z, Y, X)`` (or ``(Z, Y, X)``) to a target spacing or shape.

    Args:
        array: the image; any real dtype, computed in float32.
        current_spacing: ``(z, y, x)`` spacing of ``array`` in mm.
        target_spacing: wanted spacing; or give ``new_shape`` directly.
        new_shape: wanted ``(Z, Y, X)``; when given it wins over ``target_spacing`` (which then only
            serves the anisotropy decision).
        order: 0 nearest, 1 linear, 2 and 3 cubic convolution.
        separate_slow_axis: resample the slow axis separately with ``slow_axis_order``; None decides
            from the spacings and ``anisotropy_threshold`` (module docstring).
        device: torch device for the arithmetic (the result is always a numpy array).
        chunk_slices: output slices per slab along the streaming axis (bounds the extra memory);
            default: about 2 MB (float32) per slab.
        out: optional preallocated float32 result (e.g. a channel range of a larger array).
        slow_axis: force this axis to be the separate slow axis (e.g. to undo a resampling exactly
            as it was done); overrides ``separate_slow_axis``.

    Returns:
        float32 array ``(C, *new_shape)`` (or ``new_shape`` for a 3D input).
    """
    return _resample_channels(array, current_spacing, target_spacing, new_shape, order, separate_slow_axis,
                              slow_axis_order, anisotropy_threshold, device, chunk_slices, out, slow_axis)


def resample_probabilities(probabilities: np.ndarray, current_spacing: Sequence[float],
                           target_spacing: Sequence[float] | None = None,
                           new_shape: Sequence[int] | None = None, order: int = 1,
                           separate_slow_axis: bool | None = None, slow_axis_order: int = 0,
                           anisotropy_threshold: float = 3.0, device: Device = "cpu",
                           chunk_slices: int | None = None, out: np.ndarray | None = None,
                           slow_axis: int | None = None) -> np.ndarray:
    """Resample per-class probabilities or logits ``(K, Z, Y, X)`` (prediction export).

    Same as :func:`resample_image` with linear interpolation by default: linear weights are convex,
    so probabilities stay in [0, 1] and keep summing to one.
    """
    return _resample_channels(probabilities, current_spacing, target_spacing, new_shape, order,
                              separate_slow_axis, slow_axis_order, anisotropy_threshold, device,
                              chunk_slices, out, slow_axis)


def label_values(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values present in an integer label map and their voxel counts.

    Counted in chunks when the value range is compact (``np.bincount`` would otherwise make an
    int64 copy of the whole volume).
    """
    if label.size == 0:
        return np.zeros(0, dtype=label.dtype), np.zeros(0, dtype=np.int64)
    low, high = int(label.min()), int(label.max())
    if high - low >= 1 << 20:
        return np.unique(label, return_counts=True)
    counts = np.zeros(high - low + 1, dtype=np.int64)
    flat = label.reshape(-1)
    for start in range(0, flat.size, _SLAB_ELEMENTS):
        chunk = flat[start: start + _SLAB_ELEMENTS].astype(np.int64) - low
        counts += np.bincount(chunk, minlength=counts.size)
    present = np.flatnonzero(counts)
    return (present + low).astype(label.dtype), counts[present]


def _nearest_label(label: np.ndarray, new_shape: tuple[int, int, int]) -> np.ndarray:
    picks = [axis_weights(n, m, 0)[0][:, 0] for n, m in zip(label.shape, new_shape)]
    return label[np.ix_(*picks)]


def _nearest_voxel(label: np.ndarray, value: int, new_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """The output voxel containing the centre of the middle (in memory order) voxel of ``value``."""
    flat = np.flatnonzero(label == value)
    source = np.unravel_index(flat[len(flat) // 2], label.shape)
    return tuple(min(int((s + 0.5) * m / n), m - 1) for s, n, m in zip(source, label.shape, new_shape))


def resample_label(label: np.ndarray, current_spacing: Sequence[float],
                   target_spacing: Sequence[float] | None = None, new_shape: Sequence[int] | None = None,
                   order: int = 1, separate_slow_axis: bool | None = None, slow_axis_order: int = 0,
                   anisotropy_threshold: float = 3.0, device: Device = "cpu",
                   chunk_slices: int | None = None, keep_classes: bool = True,
                   slow_axis: int | None = None) -> np.ndarray:
    """Resample an integer label map ``(Z, Y, X)`` class by class.

    Each class' one-hot mask is interpolated with ``order`` (``slow_axis_order`` along a separate
    slow axis) and every output voxel takes the class of highest probability (ties go to the larger
    label value, as in nnU-Net where later classes overwrite at >= 0.5). Order 0 is a plain
    nearest-neighbour lookup. The result holds only values present in ``label``; with
    ``keep_classes`` a class that would vanish gets the voxel where its probability is highest (for
    order 0: the voxel holding the centre of one of its voxels). Rescuing a class can, in the
    pathological case where that voxel was another class' only one, remove that other class.

    Returns:
        an array of ``new_shape`` with the dtype of ``label``.
    """
    if label.ndim != 3:
        raise ValueError(f"expected a label map (Z, Y, X), got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label maps must be integers, got {label.dtype}")
    scheme = _scheme(label.shape, current_spacing, target_spacing, new_shape, order, separate_slow_axis,
                     slow_axis_order, anisotropy_threshold, slow_axis)
    new_shape = scheme.new_shape
    values, counts = label_values(label)
    if new_shape == label.shape:
        return label.copy()
    if len(values) <= 1:
        return np.full(new_shape, values[0] if len(values) else 0, dtype=label.dtype)
    if scheme.inplane_order == 0 and scheme.stream_order == 0:
        out = _nearest_label(label, new_shape)
        if keep_classes:
            present = set(label_values(out)[0].tolist())
            for value in values.tolist():
                if value not in present:
                    out[_nearest_voxel(label, value, new_shape)] = value
        return out

    torch_device = _as_device(device)
    axis = scheme.stream_axis
    moved = np.moveaxis(label, axis, 0)
    out = np.empty(new_shape, dtype=label.dtype)
    out_moved = np.moveaxis(out, axis, 0)
    # The most frequent class is implicit: its probability is 1 - sum(others), since weights sum to 1.
    implicit = int(values[np.argmax(counts)])
    explicit = [int(v) for v in values if v != implicit]
    # Compute in the label's own integer type where torch has it (memory), else in int64.
    native = label.dtype in (np.int8, np.uint8, np.int16, np.int32, np.int64)
    value_dtype = torch.from_numpy(np.zeros(1, dtype=label.dtype if native else np.int64)).dtype

    def streams(classes: list[int]) -> list[Iterator]:
        return [_stream(lambda a, b, v=v: moved[a:b] == v, label.shape, scheme, torch_device, chunk_slices)
                for v in classes]

    # Ties between the implicit class and the best explicit one go to the larger value.
    implicit_is_smallest = all(v > implicit for v in explicit)
    implicit_is_largest = all(v < implicit for v in explicit)

    for class_slabs in _lockstep(streams(explicit)):
        # One class slab at a time, so the extra memory is a few slabs whatever the number of classes.
        for k, (start, stop, prob) in enumerate(class_slabs):
            if k == 0:
                z0, z1, best, total = start, stop, prob, prob.clone()
                current = torch.full(prob.shape, explicit[0], dtype=value_dtype, device=torch_device)
            else:
                current.masked_fill_(prob >= best, explicit[k])  # ascending: a tie goes to the larger
                torch.maximum(best, prob, out=best)
                total += prob
            del prob
        rest = total.neg_().add_(1.0)
        if implicit_is_smallest:
            wins = rest > best
        elif implicit_is_largest:
            wins = rest >= best
        else:
            wins = (rest > best) | ((rest == best) & (current < implicit))
        current.masked_fill_(wins, implicit)
        out_moved[z0:z1] = current.cpu().numpy().astype(label.dtype, copy=False)
        del best, rest, current, wins
    if keep_classes:
        present = set(label_values(out)[0].tolist())
        for value in [v for v in explicit + [implicit] if v not in present]:
            # Rare, so found by a second pass: the voxel where this class' probability peaks.
            z0, flat = _class_peak(streams, explicit, value)
            z, a, b = np.unravel_index(flat, out_moved.shape)  # slabs share the in-plane shape
            out_moved[z0 + z, a, b] = value
    return out


def _lockstep(streams: list[Iterator]) -> Iterator[Iterator]:
    """Per output slab, an iterator over the classes' slabs, pulled one at a time."""
    while True:
        first = next(streams[0], None)
        if first is None:
            return

        def one_slab(first: tuple = first) -> Iterator:
            yield first
            for stream in streams[1:]:
                yield next(stream)

        yield one_slab()


def _class_peak(streams: Callable[[list[int]], list[Iterator]], explicit: list[int],
                value: int) -> tuple[int, int]:
    """``(slab start, flat index in the slab)`` of the highest probability of class ``value``."""
    best, where = -np.inf, (0, 0)
    for start, prob in _class_probabilities(streams, explicit, value):
        flat = int(torch.argmax(prob))
        peak = float(prob.flatten()[flat])
        if peak > best:
            best, where = peak, (start, flat)
    return where


def _class_probabilities(streams: Callable[[list[int]], list[Iterator]], explicit: list[int],
                         value: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(slab start, probability slab)`` of one class; the implicit one is one minus the others."""
    if value in explicit:
        for start, _, prob in streams([value])[0]:
            yield start, prob
        return
    for parts in _lockstep(streams(explicit)):
        first, _, total = next(parts)
        for _, _, prob in parts:
            total += prob
        yield first, total.neg_().add_(1.0)
