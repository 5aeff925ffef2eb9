"""Building blocks shared by every architecture, and the base class of autoseg's networks.

Every layer is built from the plan's :class:`~autoseg.plan.Topology` (dimension, kernel sizes,
strides, features); nothing here hard-codes a size. Convolutions are "same"-padded (``k // 2``),
so a stride-1 block keeps the spatial size and only strides change it.

Options read from ``topology.options`` (all optional):

* ``norm``: ``"instance"`` (default, affine instance normalization), ``"batch"`` or ``"none"``;
* ``activation``: ``"leakyrelu"`` (default, slope 0.01), ``"relu"`` or ``"prelu"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.sizes import check_input_size, cumulative_strides
from autoseg.plan import Topology

NORMS = ("instance", "batch", "none")
ACTIVATIONS = ("leakyrelu", "relu", "prelu")


def conv_class(dim: int) -> type[nn.Module]:
    return {2: nn.Conv2d, 3: nn.Conv3d}[dim]


def transposed_conv_class(dim: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]


def same_padding(kernel: Sequence[int]) -> tuple[int, ...]:
    """Padding that keeps the size for odd kernels at stride 1."""
    return tuple(k // 2 for k in kernel)


def make_norm(dim: int, channels: int, kind: str) -> nn.Module:
    """A normalization layer; ``"none"`` gives an identity."""
    if kind == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim](channels, eps=1e-5, affine=True)
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](channels, eps=1e-5)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def make_activation(kind: str, channels: int) -> nn.Module:
    """A non-linearity; in place where that is safe, which saves one activation map per layer."""
    if kind == "leakyrelu":
        return nn.LeakyReLU(negative_slope=1e-2, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "prelu":
        return nn.PReLU(num_parameters=channels)
    raise ValueError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")


def layer_options(topology: Topology, default_activation: str = "leakyrelu") -> tuple[str, str]:
    """``(norm, activation)`` from the topology's options, validated."""
    norm = topology.options.get("norm", "instance")
    activation = topology.options.get("activation", default_activation)
    if norm not in NORMS:
        raise ValueError(f"options['norm'] = {norm!r} is not one of {', '.join(NORMS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"options['activation'] = {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return norm, activation


class ConvNormAct(nn.Sequential):
    """Convolution, normalization, non-linearity (``activation=None``: no non-linearity).

    Padding defaults to "same" (``k // 2``); pass ``padding=0`` for a kernel that equals its stride.

    The convolution has no bias when a normalization follows: the norm subtracts the mean, so a
    bias would be a parameter that never receives a gradient.
    """

    def __init__(self, dim: int, in_channels: int, out_channels: int, kernel: Sequence[int],
                 stride: Sequence[int] | int = 1, norm: str = "instance", activation: str | None = "leakyrelu",
                 padding: Sequence[int] | int | None = None):
        kernel = tuple(kernel)
        stride = (stride,) * dim if isinstance(stride, int) else tuple(stride)
        padding = same_padding(kernel) if padding is None else padding
        layers: list[nn.Module] = [conv_class(dim)(in_channels, out_channels, kernel, stride=stride,
                                                   padding=padding, bias=norm == "none")]
        if norm != "none":
            layers.append(make_norm(dim, out_channels, norm))
        if activation is not None:
            layers.append(make_activation(activation, out_channels))
        super().__init__(*layers)
        self.out_channels = out_channels


class ConvStack(nn.Sequential):
    """``n`` :class:`ConvNormAct` blocks; the first one carries the stride and changes the channels."""

    def __init__(self, dim: int, n: int, in_channels: int, out_channels: int, kernel: Sequence[int],
                 first_stride: Sequence[int] | int = 1, norm: str = "instance", activation: str = "leakyrelu"):
        if n < 1:
            raise ValueError(f"a convolution stack needs at least one convolution, got {n}")
        blocks = [ConvNormAct(dim, in_channels, out_channels, kernel, first_stride, norm, activation)]
        blocks += [ConvNormAct(dim, out_channels, out_channels, kernel, 1, norm, activation) for _ in range(n - 1)]
        super().__init__(*blocks)
        self.out_channels = out_channels


class ResidualBlock(nn.Module):
    """Basic residual block (two convolutions) in the "D" variant used by nnU-Net's ResEnc.

    When the block downsamples, the shortcut average-pools before its 1x1 convolution instead of
    using a strided 1x1 convolution, which would simply drop three quarters of the voxels.
    """

    def __init__(self, dim: int, in_channels: int, out_channels: int, kernel: Sequence[int],
                 stride: Sequence[int] | int = 1, norm: str = "instance", activation: str = "leakyrelu"):
        super().__init__()
        stride = (stride,) * dim if isinstance(stride, int) else tuple(stride)
        self.conv1 = ConvNormAct(dim, in_channels, out_channels, kernel, stride, norm, activation)
        self.conv2 = ConvNormAct(dim, out_channels, out_channels, kernel, 1, norm, None)
        shortcut: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = {2: nn.AvgPool2d, 3: nn.AvgPool3d}[dim]
            shortcut.append(pool(kernel_size=stride, stride=stride))
        if in_channels != out_channels:
            shortcut.append(ConvNormAct(dim, in_channels, out_channels, (1,) * dim, 1, norm, None))
        self.shortcut = nn.Sequential(*shortcut)
        self.activation = make_activation(activation, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv2(self.conv1(x)) + self.shortcut(x))


def segmentation_head(dim: int, in_channels: int, num_classes: int) -> nn.Module:
    """1x1 convolution to the class logits."""
    return conv_class(dim)(in_channels, num_classes, 1, bias=True)


def initialise_weights(module: nn.Module) -> None:
    """Kaiming-normal convolution weights (a = 0.01, as nnU-Net) and zero biases.

    Deterministic given ``torch.manual_seed``: modules are visited in construction order.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(layer.weight, a=1e-2)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def require_full_resolution_first_stage(topology: Topology) -> None:
    """The decoder ends at the first stage's resolution, so that stage must not downsample."""
    if any(s != 1 for s in topology.strides[0]):
        raise ValueError(f"strides[0] = {list(topology.strides[0])}: the first stage must not downsample "
                         "(all ones), otherwise the output would be smaller than the input")
    if topology.num_stages < 2:
        raise ValueError("an encoder-decoder network needs at least two stages")


class SegmentationNetwork(nn.Module):
    """Base class: topology and input-size checks, and deep supervision on or off.

    Subclasses implement :meth:`compute_outputs`. ``forward`` returns, in training mode with
    ``deep_supervision`` on, a list of logits, highest resolution first (one per entry of
    :attr:`output_strides`); otherwise the full-resolution logits alone.
    """

    def __init__(self, topology: Topology):
        super().__init__()
        require_full_resolution_first_stage(topology)
        self.topology = topology
        self.deep_supervision = bool(topology.deep_supervision)

    def set_deep_supervision(self, enabled: bool) -> None:
        """Switch the extra low-resolution outputs on or off (off for inference)."""
        self.deep_supervision = bool(enabled)

    @property
    def output_strides(self) -> list[tuple[int, ...]]:
        """Stride of each deep-supervision output relative to the input, highest resolution first."""
        return cumulative_strides(self.topology)[:-1]

    def compute_outputs(self, x: torch.Tensor, all_outputs: bool) -> list[torch.Tensor]:
        """Logits, highest resolution first; only the first is needed when ``all_outputs`` is False."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input_size(self.topology, x.shape)
        all_outputs = self.training and self.deep_supervision
        outputs = self.compute_outputs(x, all_outputs)
        return outputs if all_outputs else outputs[0]


class NetworkWrapper(nn.Module):
    """A module around a segmentation network that behaves like that network.

    ``deep_supervision`` and ``output_strides`` read and write through to the wrapped network, and
    any other attribute it has (e.g. ``set_pruned_depth``) is reachable on the wrapper. Subclasses
    name the attribute that holds it (``wrapped``), which is also its state-dict prefix.
    """

    wrapped: str = "network"

    @property
    def inner(self) -> nn.Module:
        return self._modules[self.wrapped]  # type: ignore[return-value]

    @property
    def deep_supervision(self) -> bool:
        return self.inner.deep_supervision  # type: ignore[return-value]

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.inner.deep_supervision = bool(enabled)

    def set_deep_supervision(self, enabled: bool) -> None:
        self.deep_supervision = enabled

    @property
    def output_strides(self) -> list[tuple[int, ...]]:
        return self.inner.output_strides  # type: ignore[return-value]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(type(self).wrapped)
            if inner is None:
                raise
            return getattr(inner, name)
