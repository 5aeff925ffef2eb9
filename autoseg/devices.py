"""Which device a stage runs on: ``"auto"`` picks CUDA, then Apple MPS, then the CPU.

Every command with ``--device`` defaults to ``auto`` and prints the device it chose, so a user on a
GPU machine never trains on the CPU without being told. Every library entry point that takes a
device string passes it through :func:`resolve_device`, so ``"auto"`` works there too.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in ("cuda", "mps", "cpu")
    True
"""

from __future__ import annotations

import torch

from autoseg.errors import AutosegError

AUTO = "auto"


class DeviceError(AutosegError, ValueError):
    """A device name torch does not know, or a device this machine does not have."""


def mps_available() -> bool:
    """Whether Apple's Metal backend can run here (absent from some torch builds)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """The torch device for ``device``; ``"auto"`` (or None): CUDA, else MPS, else CPU.

    Raises:
        DeviceError: an unknown name, or CUDA / MPS asked for where torch sees none.
    """
    if isinstance(device, torch.device):
        chosen = device
    elif device is None or str(device).strip().lower() == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    else:
        try:
            chosen = torch.device(str(device).strip())
        except RuntimeError:
            raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device} was asked for but torch sees no CUDA device; use --device auto or cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if chosen.type == "mps" and not mps_available():
        raise DeviceError(f"device {device} was asked for but Apple MPS is not available; use --device auto or cpu")
    return chosen


def describe_device(device: torch.device) -> str:
    """A one-line name for the start of a command, e.g. ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type
