"""Input-size rules: every spatial edge must be a multiple of the network's total stride.

A U-Net halves (or otherwise divides) the feature maps once per stage and concatenates them with
the skip connection on the way back up; an edge that is not a multiple of the total stride makes the
two disagree by a voxel deep inside the decoder. These helpers say which sizes are valid and turn a
wrong size into an error that names the valid ones, before any layer runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoseg.plan import Topology


def cumulative_strides(topology: Topology) -> list[tuple[int, ...]]:
    """Stride of each stage's output relative to the input, per axis (stage 0 first)."""
    result, current = [], [1] * topology.dim
    for stride in topology.strides:
        current = [c * s for c, s in zip(current, stride)]
        result.append(tuple(current))
    return result


def valid_input_size(topology: Topology, size: Sequence[int]) -> tuple[int, ...]:
    """The smallest valid input size that is at least ``size`` on every axis."""
    size = _spatial(topology, size)
    return tuple(max(s, math.ceil(v / s) * s) for v, s in zip(size, topology.total_stride))


def _spatial(topology: Topology, size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(v) for v in size)
    if len(size) != topology.dim:
        raise ValueError(f"input size {list(size)} has {len(size)} axes, the network is {topology.dim}D")
    return size


def _format(size: Sequence[int]) -> str:
    return "x".join(str(v) for v in size)


def check_input_size(topology: Topology, shape: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``shape`` suits the network.

    ``shape`` is either the spatial size or a whole batch shape ``(N, C, *spatial)``; in the
    latter case the channel count is checked too. The message names the nearest valid sizes.
    """
    shape = tuple(int(v) for v in shape)
    dim = topology.dim
    if len(shape) == dim + 2:
        if shape[1] != topology.in_channels:
            raise ValueError(f"input has {shape[1]} channel(s), the network expects {topology.in_channels}")
        spatial = shape[2:]
    elif len(shape) == dim:
        spatial = shape
    else:
        raise ValueError(f"input of shape {list(shape)} is neither (N, C, {dim} spatial axes) nor "
                         f"{dim} spatial axes for this {dim}D network")
    stride = topology.total_stride
    if all(v % s == 0 and v > 0 for v, s in zip(spatial, stride)):
        return
    above = valid_input_size(topology, spatial)
    below = tuple(max(s, (v // s) * s) for v, s in zip(spatial, stride))
    near = _format(above) if below == above else f"{_format(below)} or {_format(above)}"
    raise ValueError(f"input {_format(spatial)} is not a multiple of the total stride {_format(stride)} on "
                     f"every axis; valid sizes near it: {near}")
