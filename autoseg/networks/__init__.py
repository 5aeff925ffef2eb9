"""Segmentation networks built from the plan's topology, by name.

    >>> net = build_network(configuration)              # the plan's architecture
    >>> net = build_network(topology, arch="resenc")    # another one, same sizes
    >>> net = build_network(topology, deep_supervision=False, fusion="per_channel")

Every architecture is sized only by the :class:`~autoseg.plan.Topology` (dimension, kernel sizes
and strides per stage, features per stage, convolutions per stage, classes, deep supervision), so
the planner can size any of them. Built-in names: ``unet``, ``resenc``, ``vnet``, ``unetpp``,
``attention_unet``; plugins add their own with :func:`register_network`.

Output contract: in training mode with deep supervision on, ``net(x)`` is a list of logits,
highest resolution first, one per decoder resolution (``len = stages - 1``; ``net.output_strides``
gives each one's stride relative to the input); otherwise it is the full-resolution logits.
``net.deep_supervision = False`` (or ``net.set_deep_supervision(False)``) switches the extra
outputs off. Inputs whose size is not a multiple of the total stride are refused with an error
naming the valid sizes (:func:`valid_input_size`, :func:`check_input_size`).

Options read from ``topology.options`` (all optional): ``norm``, ``activation`` (see
:mod:`autoseg.networks.blocks`), ``fusion`` and ``multiscale_stem`` (:mod:`autoseg.networks.stems`),
``blocks_per_stage`` (resenc), ``vnet_kernel`` (vnet), ``unetpp_supervision`` and
``pruned_depth`` (unetpp), ``attention_channels`` (attention_unet), ``anatomical_prior``
(:mod:`autoseg.networks.prior`: a prior network fused with any architecture's logits).
"""

from __future__ import annotations

# importing the architecture modules registers them
from autoseg.networks import attention_unet, resenc, unet, unetpp, vnet  # noqa: F401
from autoseg.networks.build import build_network, resolve_topology
from autoseg.networks.describe import count_parameters, describe_network
from autoseg.networks.memory import MemoryEstimate, estimate_training_memory
from autoseg.networks.prior import PRIOR_OPTION, AnatomicalPriorNetwork, PriorSettings, prior_settings
from autoseg.networks.registry import available_networks, get_builder, register_network, unregister_network
from autoseg.networks.resenc import RESENC_PRESETS, resenc_topology
from autoseg.networks.sizes import check_input_size, cumulative_strides, valid_input_size
from autoseg.networks.unet import classic_unet_2d_topology

__all__ = [
    "PRIOR_OPTION",
    "RESENC_PRESETS",
    "AnatomicalPriorNetwork",
    "PriorSettings",
    "MemoryEstimate",
    "available_networks",
    "build_network",
    "check_input_size",
    "count_parameters",
    "classic_unet_2d_topology",
    "cumulative_strides",
    "describe_network",
    "estimate_training_memory",
    "get_builder",
    "prior_settings",
    "register_network",
    "unregister_network",
    "resenc_topology",
    "resolve_topology",
    "valid_input_size",
]
