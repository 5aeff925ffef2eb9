"""Optional input stems, usable in front of any registered architecture.

* Per-channel fusion (``options["fusion"] = "per_channel"``; the default ``"early"`` stacks the
  channels): each input channel (an MRI sequence) gets its own small encoder, and a learned 1x1
  convolution fuses them, so that sequences with different contrast are not mixed by the very first
  filters.
* Multi-scale stem (``options["multiscale_stem"] = True``): parallel convolutions with kernels 3, 5
  and 7 (``options["multiscale_kernels"]``) fused by a 1x1 convolution, for targets of very different
  sizes (small nodules next to large organs). Along axes where the first stage's kernel is 1
  (thick slices) the stem's kernels are 1 too.

A stem keeps the spatial size and outputs ``features_per_stage[0]`` channels; the architecture
behind it is built with that many input channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.blocks import ConvNormAct, ConvStack, NetworkWrapper, initialise_weights, layer_options
from autoseg.networks.sizes import check_input_size
from autoseg.plan import Topology

FUSIONS = ("early", "per_channel")


class PerChannelFusionStem(nn.Module):
    """A separate two-convolution encoder per input channel, fused by a learned 1x1 convolution."""

    def __init__(self, dim: int, in_channels: int, features: int, kernel: Sequence[int],
                 norm: str = "instance", activation: str = "leakyrelu", n_conv: int = 2):
        super().__init__()
        self.branches = nn.ModuleList(ConvStack(dim, n_conv, 1, features, kernel, 1, norm, activation)
                                      for _ in range(in_channels))
        self.fuse = ConvNormAct(dim, in_channels * features, features, (1,) * dim, 1, norm, activation)
        self.out_channels = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = [branch(x[:, c:c + 1]) for c, branch in enumerate(self.branches)]
        return self.fuse(torch.cat(per_channel, dim=1))


class MultiScaleStem(nn.Module):
    """Parallel convolutions with several kernel sizes, concatenated and fused by a 1x1 convolution."""

    def __init__(self, dim: int, in_channels: int, features: int, kernels: Sequence[int] = (3, 5, 7),
                 flat_axes: Sequence[int] = (), norm: str = "instance", activation: str = "leakyrelu"):
        super().__init__()
        self.branches = nn.ModuleList(
            ConvNormAct(dim, in_channels, features, tuple(1 if a in flat_axes else k for a in range(dim)),
                        1, norm, activation)
            for k in kernels)
        self.fuse = ConvNormAct(dim, len(kernels) * features, features, (1,) * dim, 1, norm, activation)
        self.out_channels = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))


def build_stem(topology: Topology) -> nn.Module | None:
    """The stem the topology's options ask for (fusion first, then multi-scale), or None."""
    options = topology.options
    fusion = options.get("fusion", "early")
    if fusion not in FUSIONS:
        raise ValueError(f"options['fusion'] = {fusion!r} is not one of {', '.join(FUSIONS)}")
    multiscale = options.get("multiscale_stem", False)
    if not isinstance(multiscale, bool):
        raise ValueError(f"options['multiscale_stem'] must be true or false, got {multiscale!r}")
    kernels = tuple(options.get("multiscale_kernels", (3, 5, 7)))
    if multiscale and (not kernels or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernels)):
        raise ValueError(f"options['multiscale_kernels'] = {list(kernels)} must be odd positive integers")
    norm, activation = layer_options(topology)
    features = topology.features_per_stage[0]
    layers: list[nn.Module] = []
    channels = topology.in_channels
    if fusion == "per_channel":
        layers.append(PerChannelFusionStem(topology.dim, channels, features, topology.kernel_sizes[0],
                                           norm, activation))
        channels = features
    if multiscale:
        flat = [a for a, k in enumerate(topology.kernel_sizes[0]) if k == 1]
        layers.append(MultiScaleStem(topology.dim, channels, features, kernels, flat, norm, activation))
        channels = features
    if not layers:
        return None
    stem = nn.Sequential(*layers)
    stem.out_channels = channels
    initialise_weights(stem)
    return stem


class StemmedNetwork(NetworkWrapper):
    """A stem followed by an architecture; behaves like the architecture itself.

    ``deep_supervision`` and ``output_strides`` read and write through to the body, and any
    other attribute the body has (e.g. ``set_pruned_depth``) is reachable on the wrapper.
    """

    wrapped = "body"

    def __init__(self, topology: Topology, stem: nn.Module, body: nn.Module):
        super().__init__()
        self.topology = topology
        self.stem = stem
        self.body = body

    def forward(self, x: torch.Tensor):
        check_input_size(self.topology, x.shape)
        return self.body(self.stem(x))
