"""The plain convolutional U-Net in the nnU-Net style, its encoder and decoder, and the classic preset.

Down-sampling is the stride of each stage's first convolution, up-sampling a transposed
convolution whose kernel equals the stride, and every stage has ``n_conv_per_stage`` (encoder) or
``n_conv_per_stage_decoder`` (decoder) convolution-norm-activation blocks.

``n_conv_per_stage_decoder`` is in decoder order, as in nnU-Net: entry 0 is the decoder stage
right above the bottleneck, the last entry the full-resolution one.
"""

from __future__ import annotations

import torch
from torch import nn

from autoseg.networks.blocks import (
    ConvStack,
    SegmentationNetwork,
    initialise_weights,
    layer_options,
    segmentation_head,
    transposed_conv_class,
)
from autoseg.networks.registry import register_network
from autoseg.plan import Topology


class PlainEncoder(nn.Module):
    """One :class:`ConvStack` per stage; returns every stage's output (the skips), finest first."""

    def __init__(self, topology: Topology, norm: str, activation: str):
        super().__init__()
        t = topology
        channels = [t.in_channels, *t.features_per_stage]
        self.stages = nn.ModuleList(
            ConvStack(t.dim, t.n_conv_per_stage[s], channels[s], channels[s + 1], t.kernel_sizes[s],
                      t.strides[s], norm, activation)
            for s in range(t.num_stages))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed convolution up, concatenation with the skip, convolutions; one head per stage.

    Modules are stored in decoder order (deepest first). :meth:`gate_skip` is the hook through
    which the attention U-Net filters each skip connection.
    """

    def __init__(self, topology: Topology, norm: str, activation: str):
        super().__init__()
        t = topology
        f = t.features_per_stage
        up = transposed_conv_class(t.dim)
        self.upsamples, self.stages, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, s in enumerate(reversed(range(t.num_stages - 1))):
            self.upsamples.append(up(f[s + 1], f[s], t.strides[s + 1], stride=t.strides[s + 1], bias=True))
            self.stages.append(ConvStack(t.dim, t.n_conv_per_stage_decoder[i], 2 * f[s], f[s],
                                         t.kernel_sizes[s], 1, norm, activation))
            self.heads.append(segmentation_head(t.dim, f[s], t.num_classes))

    def gate_skip(self, index: int, skip: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        """The skip as the decoder stage ``index`` sees it (unchanged in the plain U-Net)."""
        return skip

    def forward(self, skips: list[torch.Tensor], all_outputs: bool) -> list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for i, (upsample, stage) in enumerate(zip(self.upsamples, self.stages)):
            skip = self.gate_skip(i, skips[-(i + 2)], x)
            x = stage(torch.cat([upsample(x), skip], dim=1))
            if all_outputs or i == last:
                outputs.append(self.heads[i](x))
        return outputs[::-1]


@register_network("unet")
class PlainUNet(SegmentationNetwork):
    """Plain convolutional U-Net (nnU-Net's ``PlainConvUNet``)."""

    def __init__(self, topology: Topology):
        super().__init__(topology)
        norm, activation = layer_options(topology)
        self.encoder = PlainEncoder(topology, norm, activation)
        self.decoder = UNetDecoder(topology, norm, activation)
        initialise_weights(self)

    def compute_outputs(self, x: torch.Tensor, all_outputs: bool) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x), all_outputs)


def classic_unet_2d_topology(in_channels: int = 1, num_classes: int = 2) -> Topology:
    """The 2D U-Net of Ronneberger et al. (2015): 64 to 1024 features, five stages, 3x3 convolutions.

    Padded convolutions (output size equals input size) and strided convolutions instead of
    max-pooling, which keeps the parameter count of the paper (about 31 M); inputs must be
    multiples of 16.
    """
    return Topology(
        arch="unet", dim=2, in_channels=in_channels, num_classes=num_classes,
        features_per_stage=(64, 128, 256, 512, 1024),
        kernel_sizes=((3, 3),) * 5,
        strides=((1, 1),) + ((2, 2),) * 4,
        n_conv_per_stage=(2,) * 5,
        n_conv_per_stage_decoder=(2,) * 4,
        deep_supervision=False,
    )
