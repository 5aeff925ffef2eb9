"""Cascade transforms: corrupt the previous stage's prediction so the network does not trust it blindly.

Cascade stages (``configuration.previous_stage`` set) get the previous stage's prediction as one
one-hot channel per foreground class after the image and prior channels (0/1, at most one 1 per
voxel). As in nnU-Net, the ``spatial`` op resamples them nearest-neighbour (listed in its
``nearest_channels``), and two ops, drawn last, teach the network not to trust them blindly:
``binary_operator`` (dilation, erosion, opening or closing with a ball of a few voxels) and
``remove_component`` (one small connected component deleted). Both keep the channels 0/1 and
mutually exclusive. They are nnU-Net's ApplyRandomBinaryOperatorTransform and
RemoveRandomConnectedComponentFromOneHotEncodingTransform.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autoseg.training.augment.base import InPlaceTransform, draw_seed, fires, register_transform
from autoseg.utils import bounding_slices

MORPHOLOGY_OPERATIONS = ("dilation", "erosion", "opening", "closing")


@register_transform("binary_operator", order=140)
class BinaryOperator(InPlaceTransform):
    """``{"op": "binary_operator", "channels": [...], "operations": [...], "radius": r}``: one
    morphological operation per cascade channel, applied in the listed (shuffled) order."""

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_cascade_binary_operator``: a channel order, an operation per channel, one radius."""
        s, cascade_channels = self.settings, self.context.cascade_channels
        if not cascade_channels or not fires(rng, s.p_cascade_binary_operator):
            return []
        channels = [int(c) for c in rng.permutation(cascade_channels)]
        operations = [MORPHOLOGY_OPERATIONS[int(i)] for i in rng.integers(0, len(MORPHOLOGY_OPERATIONS),
                                                                         size=len(channels))]
        low, high = s.cascade_operator_radius
        return [{"op": self.name, "channels": channels, "operations": operations,
                 "radius": int(rng.integers(low, high + 1))}]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """One morphological operation per listed channel, in the listed order; the voxels a
        channel gains are taken from the other listed channels, so the one-hot channels stay exclusive."""
        channels = [int(c) for c in op["channels"]]
        for channel, operation in zip(channels, op["operations"], strict=True):
            before = image[channel] > 0.5
            after = binary_morphology(before, operation, int(op["radius"]))
            image[channel] = after
            gained = after & ~before
            for other in channels:
                if other != channel:
                    image[other][gained] = 0.0

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """E.g. ``cascade dilation/erosion r3``."""
        return f"cascade {'/'.join(dict.fromkeys(op['operations']))} r{op['radius']}"


def binary_morphology(mask: np.ndarray, operation: str, radius: int) -> np.ndarray:
    """Binary dilation, erosion, opening or closing of ``mask`` with a ball (disk in 2D) of
    ``radius`` voxels: skimage's ``ball``/``disk`` footprint, offsets with ``|o|^2 <= radius^2``.

    The patch border is ignored, as by skimage's ``mode="ignore"``: no voxel outside the array
    dilates into it or erodes it (the patch is a crop; what lies beyond is unknown). Computed with
    Euclidean distance transforms over the mask's bounding box instead of a structuring element,
    whose cost grows with the ball's volume (seconds for radius 8 on a 64x128x128 patch).
    """
    mask = np.asarray(mask, dtype=bool)
    if operation == "dilation":
        return _dilate(mask, radius)
    if operation == "erosion":
        return _erode(mask, radius)
    if operation == "opening":
        return _dilate(_erode(mask, radius), radius)
    if operation == "closing":
        return _erode(_dilate(mask, radius), radius)
    raise ValueError(f"unknown morphological operation {operation!r}; choose one of "
                     f"{', '.join(MORPHOLOGY_OPERATIONS)}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = np.zeros_like(mask)
    # every voxel within the radius of the mask lies in its bounding box grown by the radius
    box = bounding_slices(mask, radius)
    if box is not None:
        # distances are square roots of integers: exact at integer radii, so <= matches |o|^2 <= r^2
        out[box] = ndimage.distance_transform_edt(~mask[box]) <= radius
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    out = np.zeros_like(mask)
    # one background layer around the bounding box (where the array has one) holds, for every
    # voxel inside, a background voxel at least as close as any background voxel further out
    box = bounding_slices(mask, 1)
    if box is None:
        return out
    inside = mask[box]
    if inside.all():  # the mask fills the array: with the border ignored nothing erodes
        out[box] = True
    else:
        out[box] = ndimage.distance_transform_edt(inside) > radius
    return out


@register_transform("remove_component", order=150)
class RemoveComponent(InPlaceTransform):
    """``{"op": "remove_component", "channel": c, "seed": n, "max_fraction": f}``: one small
    connected component of a cascade channel deleted."""

    def sample(self, rng: np.random.Generator) -> list[dict]:
        """With ``p_cascade_remove_component``: one op (with its own seed) per cascade channel."""
        s, cascade_channels = self.settings, self.context.cascade_channels
        if not cascade_channels or not fires(rng, s.p_cascade_remove_component):
            return []
        return [{"op": self.name, "channel": c, "seed": draw_seed(rng),
                 "max_fraction": s.cascade_remove_max_fraction} for c in cascade_channels]

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        """Delete one connected component of the channel, drawn among those covering at most
        ``max_fraction`` of the patch (nnU-Net: a large structure is never removed whole).

        Components use full connectivity (26 neighbours in 3D, 8 in 2D), like skimage.measure.label's
        default that nnU-Net uses.
        """
        c = op["channel"]
        mask = image[c] > 0.5
        labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
        if count == 0:
            return
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        small = np.flatnonzero(sizes <= op["max_fraction"] * mask.size) + 1
        if small.size == 0:
            return
        chosen = small[np.random.default_rng(op["seed"]).integers(small.size)]
        image[c][labels == chosen] = 0.0

    @classmethod
    def summarize(cls, op: dict, digits: int) -> str | None:
        """``cascade remove-cc`` (repeats per channel collapse in the summary)."""
        return "cascade remove-cc"
