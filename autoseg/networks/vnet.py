"""V-Net (Milletari et al., 2016), adapted to the plan's topology and anisotropic strides.

Each stage is residual: its convolutions (5x5x5 in the paper, ``options["vnet_kernel"]``) are
added to the stage's input before the last non-linearity. Down-sampling is a strided convolution
whose kernel equals the stride, up-sampling a transposed convolution; the non-linearity is PReLU.
Where the plan's kernel is 1 along an axis (thick slices at the first stages), the V-Net kernel is
1 there too, and a stride of 1 along an axis is kept, so the same plan serves V-Net and U-Net.
Unlike the paper, convolutions are followed by instance normalization (``options["norm"]``),
which keeps training from the plan's learning rate stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.blocks import (
    ConvNormAct,
    SegmentationNetwork,
    conv_class,
    initialise_weights,
    layer_options,
    make_activation,
    make_norm,
    segmentation_head,
    transposed_conv_class,
)
from autoseg.networks.registry import register_network
from autoseg.plan import Topology


def vnet_kernel(topology: Topology, stage: int) -> tuple[int, ...]:
    """The V-Net kernel of a stage: ``vnet_kernel`` where the plan's kernel is > 1, else 1."""
    size = topology.options.get("vnet_kernel", 5)
    if not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"options['vnet_kernel'] = {size!r} must be an odd positive integer")
    return tuple(size if k > 1 else 1 for k in topology.kernel_sizes[stage])


class ResidualStage(nn.Module):
    """``n`` convolutions whose result is added to a residual before the activation.

    The residual is the input (projected when the channel counts differ), or, with
    ``external_residual``, whatever ``forward`` receives as ``residual``.
    """

    def __init__(self, dim: int, n: int, in_channels: int, out_channels: int, kernel: Sequence[int],
                 norm: str, activation: str, external_residual: bool = False):
        super().__init__()
        if n < 1:
            raise ValueError(f"a V-Net stage needs at least one convolution, got {n}")
        channels = [in_channels] + [out_channels] * n
        self.convs = nn.Sequential(*(
            ConvNormAct(dim, channels[i], channels[i + 1], kernel, 1, norm, activation if i < n - 1 else None)
            for i in range(n)))
        # the paper broadcasts a 1-channel input to 16 channels; a 1x1 convolution generalises that
        self.project = (None if external_residual else nn.Identity() if in_channels == out_channels
                        else conv_class(dim)(in_channels, out_channels, 1, bias=False))
        self.activation = make_activation(activation, out_channels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if (residual is None) != (self.project is not None):
            raise ValueError("a residual is passed exactly when the stage was built with external_residual")
        residual = self.project(x) if residual is None else residual
        return self.activation(self.convs(x) + residual)


@register_network("vnet")
class VNet(SegmentationNetwork):
    """V-Net: residual stages, strided-convolution down-sampling, PReLU."""

    def __init__(self, topology: Topology):
        super().__init__(topology)
        norm, activation = layer_options(topology, default_activation="prelu")
        t = topology
        f = t.features_per_stage
        self.downsamples = nn.ModuleList([nn.Identity()])
        self.encoder = nn.ModuleList([ResidualStage(t.dim, t.n_conv_per_stage[0], t.in_channels, f[0],
                                                    vnet_kernel(t, 0), norm, activation)])
        for s in range(1, t.num_stages):
            self.downsamples.append(ConvNormAct(t.dim, f[s - 1], f[s], t.strides[s], t.strides[s], norm, activation,
                                                padding=0))
            self.encoder.append(ResidualStage(t.dim, t.n_conv_per_stage[s], f[s], f[s], vnet_kernel(t, s),
                                              norm, activation))
        up = transposed_conv_class(t.dim)
        self.upsamples, self.decoder, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, s in enumerate(reversed(range(t.num_stages - 1))):
            self.upsamples.append(nn.Sequential(
                up(f[s + 1], f[s], t.strides[s + 1], stride=t.strides[s + 1], bias=False),
                make_norm(t.dim, f[s], norm), make_activation(activation, f[s])))
            self.decoder.append(ResidualStage(t.dim, t.n_conv_per_stage_decoder[i], 2 * f[s], f[s],
                                              vnet_kernel(t, s), norm, activation, external_residual=True))
            self.heads.append(segmentation_head(t.dim, f[s], t.num_classes))
        initialise_weights(self)

    def compute_outputs(self, x: torch.Tensor, all_outputs: bool) -> list[torch.Tensor]:
        skips = []
        for downsample, stage in zip(self.downsamples, self.encoder):
            x = stage(downsample(x))
            skips.append(x)
        outputs = []
        last = len(self.decoder) - 1
        for i, (upsample, stage) in enumerate(zip(self.upsamples, self.decoder)):
            up = upsample(x)
            # the paper's decoder stages add their (up-sampled) input back, like the encoder's
            x = stage(torch.cat([up, skips[-(i + 2)]], dim=1), residual=up)
            if all_outputs or i == last:
                outputs.append(self.heads[i](x))
        return outputs[::-1]
