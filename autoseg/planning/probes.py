"""Planning checks that run the planned network on a device: a speed probe and a memory check.

Kept apart from the rules (:mod:`autoseg.planning.heuristics`) because these need a real device and
take seconds: :func:`probe_seconds_per_iteration` times training steps on random tensors for the
time budget (``autoseg plan --time-budget``), and :func:`verify_memory` runs one training step on a
CUDA GPU and compares its peak memory with the estimate the plan was sized with (``autoseg plan --verify``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autoseg.devices import resolve_device
from autoseg.networks import build_network, estimate_training_memory
from autoseg.plan import Configuration, Plan, PlanError
from autoseg.planning.heuristics import GIB


def _outputs(result: Any) -> list:
    # with deep supervision a network returns one output per decoder resolution, otherwise a tensor
    return list(result) if isinstance(result, (list, tuple)) else [result]


def probe_seconds_per_iteration(configuration: Configuration, device: str = "cpu", steps: int = 3,
                                max_seconds: float = 20.0) -> tuple[float, int]:
    """Measure seconds per training iteration at the planned patch and batch.

    One warm-up step, then up to ``steps`` timed SGD steps on random tensors, stopping early once
    ``max_seconds`` have passed (the warm-up time is used when no timed step fits). AMP on CUDA.

    Returns:
        ``(seconds per iteration, timed steps)``.
    """
    dev = resolve_device(device)
    network = build_network(configuration.topology).to(dev)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    shape = (configuration.batch_size, configuration.topology.in_channels, *configuration.patch_size)
    x = torch.randn(shape, device=dev)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, enabled=amp):
            loss = sum(o.float().square().mean() for o in _outputs(network(x)))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if amp:
            torch.cuda.synchronize(dev)

    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    timed, begin = 0, time.perf_counter()
    while timed < steps and (time.perf_counter() - start) + warmup <= max_seconds:
        step()
        timed += 1
    seconds = (time.perf_counter() - begin) / timed if timed else warmup
    return seconds, timed


@dataclass(frozen=True)
class MemoryCheck:
    """Measured against estimated peak training memory of one configuration (GiB).

    ``estimated_gb`` is the estimate of what the allocator hands out (comparable with
    ``torch.cuda.max_memory_allocated``); ``planned_gb`` the plan's figure, which adds the CUDA context.
    """

    configuration: str
    device: str
    measured_gb: float
    estimated_gb: float
    planned_gb: float

    @property
    def ratio(self) -> float:
        return self.measured_gb / self.estimated_gb if self.estimated_gb else float("inf")

    def __str__(self) -> str:
        return (f"{self.configuration}: measured peak {self.measured_gb:.3f} GiB allocated, estimated "
                f"{self.estimated_gb:.3f} GiB (measured/estimated {self.ratio:.2f}; with the CUDA context the "
                f"plan counts {self.planned_gb:.3f} GiB) on {self.device}")


def verify_memory(plan: Plan, configuration: str, device: str = "cuda") -> MemoryCheck:
    """Run one real training step (AMP, SGD, deep supervision) and compare peak memory with the estimate.

    Needs a CUDA device: the peak is ``torch.cuda.max_memory_allocated`` above what was allocated
    before the network was built.
    """
    config = plan.configuration(configuration)
    dev = resolve_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise PlanError(f"--verify runs a training step on a CUDA GPU; device {device!r} is not one "
                        f"(CUDA available: {torch.cuda.is_available()})")
    estimate = estimate_training_memory(config.topology, config.patch_size, config.batch_size, amp=True)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    network = build_network(config.topology).to(dev)
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=config.schedule.initial_lr,
                                momentum=config.schedule.momentum, nesterov=True,
                                weight_decay=config.schedule.weight_decay)
    scaler = torch.amp.GradScaler("cuda")
    topology = config.topology
    x = torch.randn((config.batch_size, topology.in_channels, *config.patch_size), device=dev)
    target = torch.randint(0, topology.num_classes, (config.batch_size, 1, *config.patch_size), device=dev)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda"):
        outputs = _outputs(network(x))
        loss = 0.0
        for output in outputs:
            small = F.interpolate(target.float(), size=output.shape[2:], mode="nearest").long()[:, 0]
            loss = loss + F.cross_entropy(output.float(), small)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del network, optimizer, x, target, outputs, loss
    torch.cuda.empty_cache()
    return MemoryCheck(configuration=configuration, device=torch.cuda.get_device_name(dev),
                       measured_gb=peak / GIB, estimated_gb=estimate.allocated / GIB,
                       planned_gb=config.estimated_memory_gb)

