"""``build_network``: a registered architecture sized by a plan's topology (see :mod:`autoseg.networks`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from autoseg.networks.prior import AnatomicalPriorNetwork, prior_settings
from autoseg.networks.registry import get_builder
from autoseg.networks.stems import StemmedNetwork, build_stem
from autoseg.plan import Configuration, Topology

_TOPOLOGY_FIELDS = frozenset(f.name for f in dataclasses.fields(Topology))


def resolve_topology(spec: Topology | Configuration, arch: str | None = None, **overrides: Any) -> Topology:
    """The topology a network would be built from: ``spec``'s, with ``arch`` and overrides applied.

    Overrides naming a :class:`Topology` field replace it; any other keyword becomes an option.
    """
    if isinstance(spec, Configuration):
        topology = spec.topology
    elif isinstance(spec, Topology):
        topology = spec
    else:
        raise TypeError(f"build_network needs a Topology or a Configuration, got {type(spec).__name__}")
    changes = {k: v for k, v in overrides.items() if k in _TOPOLOGY_FIELDS}
    extra_options = {k: v for k, v in overrides.items() if k not in _TOPOLOGY_FIELDS}
    if arch is not None:
        changes["arch"] = arch
    if extra_options:
        changes["options"] = {**changes.get("options", topology.options), **extra_options}
    return dataclasses.replace(topology, **changes) if changes else topology


def build_network(spec: Topology | Configuration, arch: str | None = None, **overrides: Any) -> nn.Module:
    """Build the network ``arch`` (default: ``spec``'s own) sized by ``spec``'s topology.

    Weights are initialised deterministically from torch's global seed. A stem asked for in the
    options (per-channel fusion, multi-scale) is put in front of the architecture; the anatomical
    prior (``options["anatomical_prior"]``, :mod:`autoseg.networks.prior`) is fused with the result.
    """
    topology = resolve_topology(spec, arch, **overrides)
    builder = get_builder(topology.arch)
    prior = prior_settings(topology)  # validated before anything is built
    stem = build_stem(topology)
    if stem is None:
        network = builder(topology)
    else:
        network = StemmedNetwork(topology, stem,
                                 builder(dataclasses.replace(topology, in_channels=stem.out_channels)))
    return network if prior is None else AnatomicalPriorNetwork(topology, network, prior)
