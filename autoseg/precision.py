"""How a device computes: the autocast precision, whether to compile the network, CPU threads.

Training, validation and prediction all ask this module, so one rule decides for every stage:

* ``precision="auto"``: bfloat16 autocast where the hardware computes bf16 natively (a CUDA GPU that
  supports it; a CPU with AVX512-BF16 or AMX, i.e. oneDNN's native bf16 kernels), float16 with a
  gradient scaler on an older CUDA GPU, float32 everywhere else. A CPU without native bf16 emulates
  it: a 3x3x3 convolution (32 channels, 2 x 24 x 96 x 96) took 93 s in bf16 against 0.23 s in
  float32 on an AVX2-only EPYC, so "auto" never picks it there. Autocast leaves the losses in
  float32 (they cast the logits up) and the normalisation layers keep float32 statistics.
* ``compile="auto"``: ``torch.compile`` on CUDA, where nnU-Net also compiles by default and the
  warm-up is small against a run; not on the CPU, where it bought about 10% per step after a warm-up
  of tens of seconds (no gain on top of bf16), so a short CPU run loses by it; ``"on"`` compiles
  anywhere a compiler toolchain exists.

Example:
    >>> import torch
    >>> resolve_precision("fp32", torch.device("cpu"))
    'fp32'
    >>> with autocast(torch.device("cpu"), "fp32"):
    ...     (torch.ones(2) * 2).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from autoseg.constants import COMPILE_CHOICES, PRECISION_CHOICES
from autoseg.errors import AutosegError

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(AutosegError):
    """A precision or compile choice the device cannot honour."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The precision to compute in: ``precision`` itself, or the device's best for ``"auto"``.

    Raises:
        PrecisionError: an unknown name, or float16 off CUDA (the CPU has no fast float16 kernels
            and no gradient scaler).
    """
    if precision not in PRECISION_CHOICES:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    if precision == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError(f"precision fp16 needs a CUDA device, not {device.type}; use bf16 or fp32")
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"{device.type} has no native bfloat16: it will be emulated, which is much slower than "
                      "float32 (precision auto avoids it)", stacklevel=2)
    return precision  # type: ignore[return-value]


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None: float32, no autocast)."""
    return _DTYPES.get(precision)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op for float32)."""
    dtype = autocast_dtype(precision)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        yield


def needs_grad_scaler(precision: Precision) -> bool:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
    return precision == "fp16"


def compiler_available(device: torch.device) -> bool:
    """Whether ``torch.compile``'s default backend can generate code for ``device`` here."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    if device.type == "cpu":
        return any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    return False


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether to compile the network (see the module docstring for ``"auto"``).

    Raises:
        PrecisionError: an unknown mode, or ``"on"`` without a compiler toolchain for the device.
    """
    if mode not in COMPILE_CHOICES:
        raise PrecisionError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_CHOICES)}")
    if mode == "off":
        return False
    available = compiler_available(device)
    if mode == "on" and not available:
        need = "triton" if device.type == "cuda" else "a C++ compiler (g++ or clang++)"
        raise PrecisionError(f"--compile on needs {need} for {device.type}; use --compile off")
    return available and (mode == "on" or device.type == "cuda")


def maybe_compile(network: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(network)`` when ``enabled`` (dynamic shapes off: patches have one size)."""
    return torch.compile(network, dynamic=False) if enabled else network


def default_threads(world_size: int) -> int:
    """OMP_NUM_THREADS when the user set it, else this process's share of the usable cores.

    More threads than free cores costs far more than it gains: two 2-thread trainings on 2 cores ran
    ~2.5x slower each than two pinned 1-thread ones (OpenMP threads spin waiting for each other).
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, usable_cores() // world_size)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1
