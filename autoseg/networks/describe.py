"""A readable description of a network: layer table, parameter count, memory estimate.

Built on the ``meta`` device, so describing a large 3D network costs no memory and runs in a
fraction of a second. Used by ``autoseg describe-network``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.build import build_network, resolve_topology
from autoseg.networks.memory import estimate_training_memory
from autoseg.networks.sizes import check_input_size
from autoseg.plan import Configuration, Topology


def count_parameters(spec: Topology | Configuration, arch: str | None = None, **overrides) -> int:
    """Number of parameters of the network, without allocating its weights."""
    with torch.device("meta"):
        net = build_network(spec, arch, **overrides)
    return sum(p.numel() for p in net.parameters())


def layer_table(net: nn.Module, example: torch.Tensor) -> list[tuple[str, str, tuple[int, ...], int]]:
    """``(name, type, output shape without batch, parameters)`` per leaf module, in call order."""
    rows: list[tuple[str, str, tuple[int, ...], int]] = []
    seen: set[str] = set()
    handles = []
    for name, module in net.named_modules():
        if next(module.children(), None) is not None:
            continue

        def record(module: nn.Module, inputs, output, name: str = name) -> None:
            if name in seen or not isinstance(output, torch.Tensor):
                return
            seen.add(name)
            rows.append((name, type(module).__name__, tuple(output.shape[1:]),
                         sum(p.numel() for p in module.parameters(recurse=False))))

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            net(example)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def describe_network(spec: Topology | Configuration, patch_size: Sequence[int] | None = None,
                     batch_size: int | None = None, arch: str | None = None, amp: bool = True) -> str:
    """Layer table, parameter count and training-memory estimate of the network ``spec`` describes.

    For a configuration, the patch and batch sizes default to its own; for a bare topology, to
    four times the total stride per axis and a batch of 2.
    """
    topology = resolve_topology(spec, arch)
    is_configuration = isinstance(spec, Configuration)
    if patch_size is None:
        patch_size = spec.patch_size if is_configuration else tuple(4 * s for s in topology.total_stride)
    if batch_size is None:
        batch_size = spec.batch_size if is_configuration else 2
    patch_size = tuple(int(v) for v in patch_size)
    check_input_size(topology, patch_size)
    with torch.device("meta"):
        net = build_network(topology)
        example = torch.empty((1, topology.in_channels, *patch_size))
    net.train()  # every deep-supervision head shows up in the table
    rows = layer_table(net, example)
    header = ("layer", "type", "output shape", "parameters")
    cells = [(name, kind, "x".join(map(str, shape)), f"{count:,}") for name, kind, shape, count in rows]
    widths = [max(len(header[c]), *(len(row[c]) for row in cells)) if cells else len(header[c])
              for c in range(4)]

    def line(row: Sequence[str]) -> str:
        return (f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
                f"{row[3]:>{widths[3]}}").rstrip()

    total = sum(p.numel() for p in net.parameters())
    estimate = estimate_training_memory(topology, patch_size, batch_size, amp=amp)
    t = topology
    lines = [
        f"network {t.arch!r}, {t.dim}D, {t.in_channels} input channel(s), {t.num_classes} output(s), "
        f"{t.num_stages} stages, features {list(t.features_per_stage)}",
        f"strides {[list(s) for s in t.strides]}, total stride {'x'.join(map(str, t.total_stride))}; "
        f"deep supervision {'on' if t.deep_supervision else 'off'}"
        + (f"; options {t.options}" if t.options else ""),
        f"output shapes for one patch of {'x'.join(map(str, patch_size))} (batch axis left out):",
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(row) for row in cells),
        "",
        f"total parameters: {total:,} ({total / 1e6:.2f} M)",
        estimate.summary(),
    ]
    return "\n".join(lines)
