"""U-Net with a residual encoder (nnU-Net's ``ResidualEncoderUNet``) and its M/L/XL presets.

The encoder is a stem convolution followed, per stage, by residual blocks (two convolutions and a
shortcut each); the first block of a stage carries its stride. The number of blocks per stage is
``options["blocks_per_stage"]`` when given, else ``n_conv_per_stage`` (which is how nnU-Net's
ResEnc plans record it). The decoder is the plain U-Net decoder.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from autoseg.networks.blocks import (
    ConvNormAct,
    ResidualBlock,
    SegmentationNetwork,
    initialise_weights,
    layer_options,
)
from autoseg.networks.registry import register_network
from autoseg.networks.unet import UNetDecoder
from autoseg.plan import Topology

# nnU-Net ResEnc: blocks per encoder stage, deeper stages get more (extended with 6 beyond the list)
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6)
# the presets differ only in the GPU memory the planner may fill (GB), as in nnU-Net
RESENC_PRESETS = {"resenc-m": 8.0, "resenc-l": 24.0, "resenc-xl": 40.0}


def blocks_per_stage(topology: Topology) -> tuple[int, ...]:
    """Residual blocks per stage: ``options["blocks_per_stage"]`` or ``n_conv_per_stage``."""
    blocks = tuple(topology.options.get("blocks_per_stage", topology.n_conv_per_stage))
    if len(blocks) != topology.num_stages or any(not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(f"blocks_per_stage {list(blocks)} needs {topology.num_stages} positive integers "
                         "(one per stage)")
    return blocks


class ResidualEncoder(nn.Module):
    """Stem convolution, then one sequence of residual blocks per stage; returns every stage's output."""

    def __init__(self, topology: Topology, norm: str, activation: str):
        super().__init__()
        t = topology
        f = t.features_per_stage
        self.stem = ConvNormAct(t.dim, t.in_channels, f[0], t.kernel_sizes[0], 1, norm, activation)
        self.stages = nn.ModuleList()
        channels = f[0]
        for s, n_blocks in enumerate(blocks_per_stage(t)):
            blocks = [ResidualBlock(t.dim, channels, f[s], t.kernel_sizes[s], t.strides[s], norm, activation)]
            blocks += [ResidualBlock(t.dim, f[s], f[s], t.kernel_sizes[s], 1, norm, activation)
                       for _ in range(n_blocks - 1)]
            self.stages.append(nn.Sequential(*blocks))
            channels = f[s]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


@register_network("resenc")
class ResidualEncoderUNet(SegmentationNetwork):
    """U-Net with a residual encoder and the plain decoder."""

    def __init__(self, topology: Topology):
        super().__init__(topology)
        norm, activation = layer_options(topology)
        self.encoder = ResidualEncoder(topology, norm, activation)
        self.decoder = UNetDecoder(topology, norm, activation)
        initialise_weights(self)

    def compute_outputs(self, x: torch.Tensor, all_outputs: bool) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x), all_outputs)


def resenc_topology(base: Topology, blocks: tuple[int, ...] = RESENC_BLOCKS_PER_STAGE) -> Topology:
    """A planned topology turned into nnU-Net's ResEnc preset.

    Same kernels, strides and features; residual blocks ``(1, 3, 4, 6, 6, 6, ...)`` per encoder
    stage (recorded in ``n_conv_per_stage``) and one convolution per decoder stage. The M, L and XL
    presets (:data:`RESENC_PRESETS`) share this topology and differ in the memory budget only.
    """
    n = base.num_stages
    per_stage = tuple(blocks[s] if s < len(blocks) else blocks[-1] for s in range(n))
    options = {k: v for k, v in base.options.items() if k != "blocks_per_stage"}
    return dataclasses.replace(base, arch="resenc", n_conv_per_stage=per_stage,
                               n_conv_per_stage_decoder=(1,) * (n - 1), options=options)
