"""U-Net++ (Zhou et al., 2018): nested, densely connected skip pathways and a pruned inference mode.

Node ``X[i][j]`` lives at stage ``i``'s resolution; ``X[i][0]`` is the encoder, and every other node
convolves the concatenation of all earlier nodes of its row with the up-sampled node
``X[i+1][j-1]`` below. The full network's output is ``X[0][L-1]`` (``L`` stages).

Deep supervision (``options["unetpp_supervision"]``):

* ``"resolutions"`` (default): one output per decoder resolution, highest first, taken from the
  last nested node of each row, ``X[i][L-1-i]``; the same contract as every other architecture,
  so the trainer's per-scale targets work unchanged;
* ``"nested"``: the paper's supervision of the nested full-resolution nodes ``X[0][L-1], ...,
  X[0][1]`` (all at full resolution: ``output_strides`` is all ones, and the loss must compare each
  with the full-resolution target).

Pruned inference (the paper's "fast mode"): ``set_pruned_depth(d)`` (or ``options["pruned_depth"]``)
computes only the sub-network ``X[i][j]`` with ``i + j <= d`` and returns ``X[0][d]``'s logits as a
single tensor; it needs nested supervision, which is what trains those heads.
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
from autoseg.networks.sizes import check_input_size
from autoseg.networks.unet import PlainEncoder
from autoseg.plan import Topology

SUPERVISIONS = ("resolutions", "nested")


@register_network("unetpp")
class UNetPlusPlus(SegmentationNetwork):
    """U-Net++ with dense skip pathways, deep supervision and pruned inference."""

    def __init__(self, topology: Topology):
        super().__init__(topology)
        norm, activation = layer_options(topology)
        t = topology
        f = t.features_per_stage
        self.supervision = t.options.get("unetpp_supervision", "resolutions")
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"options['unetpp_supervision'] = {self.supervision!r} is not one of "
                             f"{', '.join(SUPERVISIONS)}")
        self.encoder = PlainEncoder(t, norm, activation)
        depth = t.num_stages - 1
        up = transposed_conv_class(t.dim)
        self.upsamples, self.nodes = nn.ModuleDict(), nn.ModuleDict()
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                key = f"{i}_{j}"
                self.upsamples[key] = up(f[i + 1], f[i], t.strides[i + 1], stride=t.strides[i + 1], bias=True)
                # n_conv_per_stage_decoder is in decoder order: entry 0 is the row right above the bottleneck
                self.nodes[key] = ConvStack(t.dim, t.n_conv_per_stage_decoder[depth - 1 - i], (j + 1) * f[i],
                                            f[i], t.kernel_sizes[i], 1, norm, activation)
        # heads in output order, highest resolution (and, for "nested", deepest node) first
        self.head_nodes = ([(i, depth - i) for i in range(depth)] if self.supervision == "resolutions"
                           else [(0, j) for j in range(depth, 0, -1)])
        self.heads = nn.ModuleList(segmentation_head(t.dim, f[i], t.num_classes) for i, _ in self.head_nodes)
        self._pruned_depth: int | None = None
        self.set_pruned_depth(t.options.get("pruned_depth"))
        initialise_weights(self)

    @property
    def output_strides(self) -> list[tuple[int, ...]]:
        if self.supervision == "nested":
            return [(1,) * self.topology.dim] * len(self.head_nodes)
        return super().output_strides

    @property
    def pruned_depth(self) -> int | None:
        """Depth of the pruned sub-network used for inference, None for the whole network."""
        return self._pruned_depth

    @pruned_depth.setter
    def pruned_depth(self, depth: int | None) -> None:
        self.set_pruned_depth(depth)

    def set_pruned_depth(self, depth: int | None) -> None:
        """Infer with the sub-network of ``depth`` levels below the top (None: the whole network)."""
        full = self.topology.num_stages - 1
        if depth is None or depth == full:
            self._pruned_depth = None
            return
        if not isinstance(depth, int) or not 1 <= depth <= full:
            raise ValueError(f"pruned depth {depth!r} must be an integer from 1 to {full}")
        if self.supervision != "nested":
            raise ValueError("pruned inference needs options['unetpp_supervision'] = 'nested': only then "
                             f"is the head of node X[0][{depth}] trained")
        self._pruned_depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self._pruned_depth is None:
            return super().forward(x)
        check_input_size(self.topology, x.shape)
        return self.compute_outputs(x, all_outputs=False)[0]

    def compute_outputs(self, x: torch.Tensor, all_outputs: bool) -> list[torch.Tensor]:
        depth = self.topology.num_stages - 1 if self._pruned_depth is None else self._pruned_depth
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i, stage in enumerate(self.encoder.stages[:depth + 1]):
            x = stage(x)
            grid[i, 0] = x
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                key = f"{i}_{j}"
                inputs = [grid[i, k] for k in range(j)] + [self.upsamples[key](grid[i + 1, j - 1])]
                grid[i, j] = self.nodes[key](torch.cat(inputs, dim=1))
        if self._pruned_depth is not None:
            return [self.heads[self.head_nodes.index((0, depth))](grid[0, depth])]
        wanted = self.head_nodes if all_outputs else self.head_nodes[:1]
        return [head(grid[node]) for head, node in zip(self.heads, wanted)]
