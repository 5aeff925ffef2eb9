"""U-Net with additive attention gates on every skip connection (Oktay et al., 2018).

Each skip is multiplied by a voxel-wise coefficient in [0, 1] computed from the skip itself and
from the coarser decoder features ("gating signal") just below it, so the decoder can suppress
regions that the coarser context says are irrelevant. Everything else is the plain U-Net.
``options["attention_channels"]`` sets the gates' intermediate width as a fraction of the skip's
channels (default 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.blocks import (
    ConvNormAct,
    SegmentationNetwork,
    conv_class,
    initialise_weights,
    layer_options,
)
from autoseg.networks.registry import register_network
from autoseg.networks.unet import PlainEncoder, UNetDecoder
from autoseg.plan import Topology


class AttentionGate(nn.Module):
    """Additive attention: ``skip * sigmoid(psi(relu(theta(skip) + phi(gate))))``, then a 1x1 conv.

    ``theta`` brings the skip down to the gate's resolution with a convolution whose kernel and
    stride equal the stage stride; the coefficients are interpolated back up.
    """

    def __init__(self, dim: int, skip_channels: int, gate_channels: int, inter_channels: int,
                 stride: Sequence[int], norm: str):
        super().__init__()
        conv = conv_class(dim)
        self.theta = conv(skip_channels, inter_channels, tuple(stride), stride=tuple(stride), bias=False)
        self.phi = conv(gate_channels, inter_channels, 1, bias=True)
        self.psi = conv(inter_channels, 1, 1, bias=True)
        self.project = ConvNormAct(dim, skip_channels, skip_channels, (1,) * dim, 1, norm, None)
        self.mode = "trilinear" if dim == 3 else "bilinear"

    def attention(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The coefficients in [0, 1] at the skip's resolution, shape ``(N, 1, *skip.shape[2:])``."""
        coarse = torch.sigmoid(self.psi(F.relu(self.theta(skip) + self.phi(gate))))
        return F.interpolate(coarse, size=skip.shape[2:], mode=self.mode, align_corners=False)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.project(skip * self.attention(skip, gate))


class AttentionDecoder(UNetDecoder):
    """The plain decoder with one attention gate per skip connection."""

    def __init__(self, topology: Topology, norm: str, activation: str):
        super().__init__(topology, norm, activation)
        t = topology
        f = t.features_per_stage
        fraction = t.options.get("attention_channels", 0.5)
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 4:
            raise ValueError(f"options['attention_channels'] = {fraction!r} must be a number in (0, 4]")
        self.gates = nn.ModuleList(
            AttentionGate(t.dim, f[s], f[s + 1], max(1, round(f[s] * fraction)), t.strides[s + 1], norm)
            for s in reversed(range(t.num_stages - 1)))

    def gate_skip(self, index: int, skip: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        return self.gates[index](skip, below)


@register_network("attention_unet")
class AttentionUNet(SegmentationNetwork):
    """Plain U-Net encoder, decoder with additive attention gates on every skip."""

    def __init__(self, topology: Topology):
        super().__init__(topology)
        norm, activation = layer_options(topology)
        self.encoder = PlainEncoder(topology, norm, activation)
        self.decoder = AttentionDecoder(topology, norm, activation)
        initialise_weights(self)

    def compute_outputs(self, x: torch.Tensor, all_outputs: bool) -> list[torch.Tensor]:
        return self.decoder(self.encoder(x), all_outputs)
