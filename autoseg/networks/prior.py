"""The anatomical-prior constraint: a small network that learns where each structure can be.

The textbook strategy for radiographs: a second network sees a heavily down-sampled image (global
context only: where is the thorax, which side is the heart on) and predicts, for each output
channel, the probability that the structure is at each place. The segmentation network's logits
are then fused with that prior, so that a lung field outside the thorax or an island in the
background is suppressed, while the full-resolution network still draws the exact borders.

Switched on by ``topology.options["anatomical_prior"]`` (``True`` for the defaults, or a dict of
:class:`PriorSettings` fields), around any registered 2D or 3D architecture (stems included)::

    >>> net = build_network(topology, anatomical_prior=True)          # doctest: +SKIP
    >>> net = build_network(topology, anatomical_prior={"floor": 0.05})  # doctest: +SKIP

**Fusion: an additive log-prior**, ``fused_c = logits_c + max(log p_c, log floor)`` with
``p_c = sigmoid(prior_c)`` up-sampled to each output's size. For softmax outputs this is the
multiplicative gate of the chapter renormalised: ``softmax(fused)_c ∝ softmax(logits)_c * p_c``
(a product of experts); for sigmoid (region) outputs it multiplies the odds by ``p_c``. Chosen over
a gate on probabilities because it acts on logits, so every loss, TTA, ensembling and export keep
seeing ordinary logits of the same shape; and the floor bounds the penalty at ``log floor``
(default ``log 0.01`` = -4.6 nats), so the prior can never make a structure impossible: wherever
the segmentation network is confident enough (a logit margin above 4.6) it overrules the prior,
and the prior's own gradient keeps flowing where the labels show a structure the prior missed.

**Training.** In training mode the wrapper keeps the prior's low-resolution logits in
``net.prior_logits``; :func:`autoseg.training.losses.anatomical_prior_loss` trains them against
the labels average-pooled to the prior's grid (the fraction of each cell a structure covers),
weighted by ``loss_weight``, on top of the segmentation loss of the fused outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks.blocks import NetworkWrapper, conv_class, initialise_weights
from autoseg.plan import Topology

PRIOR_OPTION = "anatomical_prior"


@dataclass(frozen=True)
class PriorSettings:
    """The prior's options (``topology.options["anatomical_prior"]``; ``True``: these defaults).

    Attributes:
        downsample: the prior sees the input average-pooled by this factor per axis (limited to
            what divides the network's total stride, so every valid input size stays valid).
        features: channels of the prior's convolutions.
        floor: the smallest prior probability the fusion uses: the largest penalty is ``-log floor``.
        loss_weight: weight of the prior's own loss term next to the segmentation loss.
    """

    downsample: int = 8
    features: int = 16
    floor: float = 0.01
    loss_weight: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise ValueError(f"options['{PRIOR_OPTION}']['downsample'] must be a positive integer, "
                             f"got {self.downsample!r}")
        if not isinstance(self.features, int) or self.features < 1:
            raise ValueError(f"options['{PRIOR_OPTION}']['features'] must be a positive integer, "
                             f"got {self.features!r}")
        if not 0 < self.floor < 1:
            raise ValueError(f"options['{PRIOR_OPTION}']['floor'] must lie in (0, 1) (0 would make a "
                             f"structure impossible), got {self.floor!r}")
        if not self.loss_weight >= 0:
            raise ValueError(f"options['{PRIOR_OPTION}']['loss_weight'] must be >= 0, got {self.loss_weight!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prior_settings(topology: Topology) -> PriorSettings | None:
    """The prior the topology's options ask for, or None (option absent, ``False`` or ``None``).

    Example:
        >>> from autoseg.networks.unet import classic_unet_2d_topology
        >>> t = classic_unet_2d_topology(1, 2)
        >>> prior_settings(t) is None
        True
        >>> import dataclasses
        >>> prior_settings(dataclasses.replace(t, options={"anatomical_prior": {"floor": 0.05}})).floor
        0.05
    """
    value = topology.options.get(PRIOR_OPTION)
    if value is None or value is False:
        return None
    if value is True:
        return PriorSettings()
    if not isinstance(value, Mapping):
        raise ValueError(f"options['{PRIOR_OPTION}'] must be true, false or a mapping of "
                         f"{', '.join(f.name for f in fields(PriorSettings))}; got {value!r}")
    unknown = sorted(set(value) - {f.name for f in fields(PriorSettings)})
    if unknown:
        raise ValueError(f"options['{PRIOR_OPTION}'] has unknown key(s) {unknown}; known: "
                         f"{', '.join(f.name for f in fields(PriorSettings))}")
    return PriorSettings(**value)


def prior_pool(topology: Topology, downsample: int) -> tuple[int, ...]:
    """Pooling factor per axis: ``downsample`` limited to a divisor of the total stride.

    Example:
        >>> from autoseg.networks.unet import classic_unet_2d_topology
        >>> prior_pool(classic_unet_2d_topology(1, 2), 8)
        (8, 8)
    """
    return tuple(math.gcd(downsample, stride) for stride in topology.total_stride)


class PriorNetwork(nn.Module):
    """Average-pool, then dilated convolutions (dilations 1, 2, 4, 8: a receptive field of 31 cells,
    most of a heavily down-sampled image), then one logit per output channel and cell.

    Group normalization rather than instance normalization: the pooled grid may be a single cell
    along an axis, where instance statistics do not exist.
    """

    def __init__(self, dim: int, in_channels: int, num_classes: int, pool: tuple[int, ...], features: int):
        super().__init__()
        self.pool = pool
        conv = conv_class(dim)
        layers: list[nn.Module] = []
        channels = in_channels
        for dilation in (1, 2, 4, 8):
            layers += [conv(channels, features, 3, padding=dilation, dilation=dilation, bias=False),
                       nn.GroupNorm(min(4, features), features), nn.LeakyReLU(1e-2, inplace=True)]
            channels = features
        self.body = nn.Sequential(*layers)
        self.head = conv(features, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooling = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        if any(p > 1 for p in self.pool):
            x = pooling(x, kernel_size=self.pool, stride=self.pool)
        return self.head(self.body(x))


class AnatomicalPriorNetwork(NetworkWrapper):
    """Any segmentation network fused with a :class:`PriorNetwork` (see the module docstring).

    Behaves like the wrapped network: same outputs (fused logits, a list in training mode with deep
    supervision), ``deep_supervision`` and ``output_strides`` pass through, other attributes are
    reachable on the wrapper.
    """

    def __init__(self, topology: Topology, network: nn.Module, settings: PriorSettings):
        super().__init__()
        self.topology = topology
        self.settings = settings
        self.network = network
        self.prior = PriorNetwork(topology.dim, topology.in_channels, topology.num_classes,
                                  prior_pool(topology, settings.downsample), settings.features)
        initialise_weights(self.prior)
        self.log_floor = math.log(settings.floor)
        self.prior_loss_weight = settings.loss_weight
        # training mode: the last forward's prior logits, for the prior's own loss term
        self.prior_logits: torch.Tensor | None = None

    def log_prior(self, prior_logits: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """``max(log sigmoid(prior), log floor)`` interpolated to ``size`` (linear, so no blocky steps)."""
        log_p = F.logsigmoid(prior_logits.float()).clamp_min(self.log_floor)
        if tuple(log_p.shape[2:]) == tuple(size):
            return log_p
        mode = "bilinear" if log_p.ndim == 4 else "trilinear"
        return F.interpolate(log_p, size=tuple(size), mode=mode, align_corners=False)

    def prior_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The prior alone: each structure's probability at each pixel/voxel of ``x``'s size."""
        return torch.exp(self.log_prior(self.prior(x), x.shape[2:]))

    def forward(self, x: torch.Tensor):
        outputs = self.network(x)  # checks the input size first
        prior_logits = self.prior(x)
        if self.training:
            self.prior_logits = prior_logits
        if isinstance(outputs, torch.Tensor):
            return outputs + self.log_prior(prior_logits, outputs.shape[2:]).to(outputs.dtype)
        return [o + self.log_prior(prior_logits, o.shape[2:]).to(o.dtype) for o in outputs]
