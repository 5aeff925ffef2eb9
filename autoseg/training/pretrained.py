"""Fine-tuning: start a run from another model's weights (``autoseg train ... --pretrained DIR``).

The network is built with the pretrained model's topology (recorded in its checkpoint) and this
dataset's number of classes; every tensor whose name and shape match is copied, and the output
heads start from scratch when the number of classes differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import TypeAdapter
from torch import nn

from autoseg.plan import Configuration, Topology
from autoseg.training.checkpoint import CHECKPOINT_BEST, CHECKPOINT_LATEST, Checkpoint, read_checkpoint
from autoseg.training.errors import TrainingError

_TOPOLOGY = TypeAdapter(Topology)


def load_pretrained(path: Path) -> Checkpoint:
    """The checkpoint of a fold folder (its latest, else its best) or of a checkpoint file."""
    file = path
    if path.is_dir():
        file = path / CHECKPOINT_LATEST if (path / CHECKPOINT_LATEST).exists() else path / CHECKPOINT_BEST
    state = read_checkpoint(file)
    if state.topology is None:
        raise TrainingError(f"{file}: the checkpoint records no topology, so it cannot be fine-tuned from")
    return state


def adopt_topology(state: Checkpoint, configuration: Configuration, source: Path) -> Topology:
    """The pretrained model's topology, with this dataset's number of classes."""
    theirs = _TOPOLOGY.validate_python(state.topology)
    ours = configuration.topology
    if theirs.dim != ours.dim:
        raise TrainingError(f"{source}: the pretrained network is {theirs.dim}D, configuration "
                            f"{configuration.name!r} is {ours.dim}D")
    if theirs.in_channels != ours.in_channels:
        raise TrainingError(f"{source}: the pretrained network takes {theirs.in_channels} input channel(s), "
                            f"this dataset has {ours.in_channels}")
    return dataclasses.replace(theirs, num_classes=ours.num_classes)


def load_matching_weights(network: nn.Module, weights: Mapping[str, torch.Tensor], source: Path) -> None:
    """Copy every pretrained tensor whose name and shape match; only output heads may differ."""
    own = network.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise TrainingError(f"{source}: the pretrained weights lack {len(missing)} tensor(s) of this network, "
                            f"e.g. {missing[:3]}")
    skipped = [k for k in own if weights[k].shape != own[k].shape]
    network.load_state_dict({k: (own[k] if k in skipped else weights[k]) for k in own})
    if skipped:
        print(f"fine-tuning from {source}: {len(skipped)} tensor(s) with another shape start fresh "
              f"(the output heads, as the number of classes differs): {skipped}")
