"""Several processes (GPUs or machines) under ``torchrun``: one model replica per process.

``torchrun --nproc_per_node N -m autoseg.cli train ...`` starts N copies of the same command with
torchrun's standard variables ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`setup_distributed`
reads them, joins the process group (NCCL on CUDA, gloo on the CPU) and picks this process's
device. Gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel`; each rank
draws its own batches (its rank is part of the loader's random stream) and only rank 0 writes files.
Without those variables everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autoseg.devices import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this module started the process group, so it ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and results."""
        return self.rank == 0


def setup_distributed(device: str | torch.device = "cpu") -> DistributedContext:
    """Join the process group if launched by torchrun (``WORLD_SIZE`` > 1), else a single-process context.

    On CUDA each process uses ``cuda:<LOCAL_RANK>``.
    """
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(0, 1, 0, device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, device, owns)


def cleanup_distributed(context: DistributedContext) -> None:
    """Leave the process group if :func:`setup_distributed` joined it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed (it also broadcasts rank 0's weights)."""
    if not context.enabled:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (checkpoints store its state)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (identity in a single process)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(context: DistributedContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if context.enabled:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()

