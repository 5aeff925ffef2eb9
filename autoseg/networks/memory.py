"""Training-memory estimate computed from the network itself, for any registered architecture.

The network is built on PyTorch's ``meta`` device (shapes only, no memory, no arithmetic) and
run forward once on a meta tensor of the patch size while ``saved_tensors_hooks`` record every
tensor autograd keeps for the backward pass. That is exactly the activation memory of a training
step, whatever the architecture does, without a hand-written formula per architecture.

What the estimate counts (bytes), for one SGD step with momentum:

* ``parameters``: fp32 weights, plus under AMP the fp16 copies autocast caches during forward;
* ``gradients``: one fp32 gradient per parameter;
* ``optimizer_state``: one momentum buffer per parameter (SGD with Nesterov momentum, as nnU-Net);
* ``activations``: every distinct tensor storage saved for backward (parameters excluded), plus
  the network's outputs and the loss's own buffers (``LOSS_BYTES_PER_OUTPUT_ELEMENT`` per logit:
  softmax, log-softmax and one-hot target in fp32). Under AMP, tensors with spatial axes count
  2 bytes per element (fp16), the small per-channel tensors (normalization statistics) stay fp32;
  that is autocast's behaviour for convolutions and instance norm;
* ``backward_peak``: the extra memory alive at the start of backward, when nearly every saved
  tensor still exists and the gradients of the largest activations are being formed: taken as
  ``BACKWARD_PEAK_FACTOR`` times the largest single activation;
* ``workspace``: a constant for cuDNN workspaces and allocator rounding (counted by
  ``torch.cuda.max_memory_allocated``);
* ``cuda_context``: a constant for the CUDA context and the caching allocator's slack (not
  counted by ``max_memory_allocated``; zero makes sense on the CPU).

``allocated`` is everything but the context (compare with ``torch.cuda.max_memory_allocated``);
``total`` is what must fit on the GPU. Everything except parameters is linear in the batch size,
so the network is traced once per (topology, patch) with batch 1 and cached: the planner can call
this many times while it shrinks the patch and grows the batch.

Approximations: the backward peak is a rule of thumb (measured within the tolerance stated in
``tests/test_network_memory.py`` on the CPU); cuDNN may pick algorithms with larger workspaces;
fragmentation of the caching allocator is folded into the context constant.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import TypeAdapter
from torch.utils._python_dispatch import TorchDispatchMode

from autoseg.networks.build import build_network, resolve_topology
from autoseg.networks.sizes import check_input_size
from autoseg.plan import Configuration, Topology

MiB = 1024**2
DEFAULT_WORKSPACE_BYTES = 256 * MiB
DEFAULT_CUDA_CONTEXT_BYTES = 768 * MiB
LOSS_BYTES_PER_OUTPUT_ELEMENT = 12
BACKWARD_PEAK_FACTOR = 2.0

_TOPOLOGY_ADAPTER = TypeAdapter(Topology)
_CACHE: OrderedDict[str, _Trace] = OrderedDict()
_CACHE_SIZE = 1024


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated memory of one training step, in bytes, by kind (see the module docstring)."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    backward_peak: int
    workspace: int
    cuda_context: int
    num_parameters: int
    patch_size: tuple[int, ...]
    batch_size: int
    amp: bool

    @property
    def allocated(self) -> int:
        """Bytes the allocator hands out at the peak (compare with ``torch.cuda.max_memory_allocated``)."""
        return (self.parameters + self.gradients + self.optimizer_state + self.activations
                + self.backward_peak + self.workspace)

    @property
    def total(self) -> int:
        """Bytes the GPU must have free: :attr:`allocated` plus the CUDA context."""
        return self.allocated + self.cuda_context

    @property
    def total_gb(self) -> float:
        return self.total / 1024**3

    def summary(self) -> str:
        """A few aligned lines, one per kind, for ``describe-network`` and plan explanations."""
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations", self.activations),
                ("backward peak", self.backward_peak), ("workspace", self.workspace),
                ("CUDA context", self.cuda_context), ("total", self.total)]
        head = (f"training memory, patch {'x'.join(map(str, self.patch_size))}, batch {self.batch_size}, "
                f"{'AMP (fp16 activations)' if self.amp else 'fp32'}:")
        return "\n".join([head] + [f"  {name:<16}{value / MiB:>10.1f} MiB" for name, value in rows])


@dataclass(frozen=True)
class _Trace:
    """Per-sample (batch 1) sizes recorded from one meta-device forward pass."""

    num_parameters: int
    spatial_elements: int  # saved tensors with spatial axes, plus outputs
    other_bytes: int  # saved small tensors (statistics), kept at their own precision
    output_elements: int
    largest_spatial_elements: int


def _elementwise(*args: Any, **kwargs: Any) -> torch.Tensor:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return tensors[0].new_empty(shape)


def _in_place(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def _cat(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return tensors[0].new_empty(shape)


def _batch_norm(x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    return torch.empty_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


def _group_norm(x: torch.Tensor, weight: Any, bias: Any, n: int, c: int, hw: int, groups: int,
                eps: float) -> tuple[torch.Tensor, ...]:
    return torch.empty_like(x), x.new_empty((n, groups)), x.new_empty((n, groups))


def _log_sigmoid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)  # the CPU kernel keeps a buffer as large as x


def _upsample(x: torch.Tensor, output_size: Sequence[int], *args: Any) -> torch.Tensor:
    return x.new_empty((*x.shape[:2], *output_size))


_aten = torch.ops.aten
# Output shapes of the ops the registered networks call whose meta kernels are Python
# decompositions (``torch._refs``): the first of those calls imports torch._dynamo, about 2 s of
# every ``autoseg plan``. Any other op keeps torch's own meta kernel, so a network using one is
# still estimated, only more slowly (and the dynamo test in tests/test_network_memory.py says so).
_SHAPE_RULES: dict[Any, Callable[..., Any]] = {
    **{op: _elementwise for op in (_aten.add.Tensor, _aten.mul.Tensor, _aten.relu.default,
                                   _aten.clamp_min.default, _aten._prelu_kernel.default)},
    **{op: _in_place for op in (_aten.add_.Tensor, _aten.leaky_relu_.default,
                                _aten.normal_.default)},  # normal_: weight initialisation
    _aten.cat.default: _cat,
    _aten.native_batch_norm.default: _batch_norm,
    _aten.native_group_norm.default: _group_norm,
    _aten.log_sigmoid_forward.default: _log_sigmoid,
    _aten.upsample_bilinear2d.default: _upsample,
    _aten.upsample_trilinear3d.default: _upsample,
}


class _ShapesOnly(TorchDispatchMode):
    """On meta tensors, answers the ops of :data:`_SHAPE_RULES` with empty tensors of the right shape.

    It works below autograd, so autograd still saves exactly the tensors the real kernels would;
    ``tests/test_network_memory.py`` checks the meta trace against a real one on the CPU.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in dynamo.disable, whose first call imports
        # torch._dynamo; this mode only ever runs eagerly, in the trace below
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        rule = _SHAPE_RULES.get(func)
        if rule is None:
            return func(*args, **(kwargs or {}))
        return rule(*args, **(kwargs or {}))


def _trace(topology: Topology, patch_size: tuple[int, ...], device: str = "meta") -> _Trace:
    """Record one training forward at batch 1 on ``device``: ``meta`` for the estimate, ``cpu`` for
    tests that compare the meta trace with a real one (small patches only)."""
    key = json.dumps([_TOPOLOGY_ADAPTER.dump_python(topology, mode="json"), patch_size, device], sort_keys=True)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    shapes_only = _ShapesOnly if device == "meta" else contextlib.nullcontext
    with torch.device(device), shapes_only():
        net = build_network(topology)
        x = torch.empty((1, topology.in_channels, *patch_size))
    net.train()
    parameter_storages = {p.untyped_storage()._cdata for p in net.parameters()}
    spatial_ndim = topology.dim + 2
    saved: dict[int, tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameter_storages:
            is_spatial = tensor.dim() == spatial_ndim and tensor.is_floating_point()
            saved[storage._cdata] = (storage.nbytes() // tensor.element_size() if is_spatial
                                     else storage.nbytes(), is_spatial)
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), shapes_only():
        outputs = net(x)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    output_elements = 0
    for output in outputs:
        if output.untyped_storage()._cdata not in saved:
            output_elements += output.numel()
    spatial = [size for size, is_spatial in saved.values() if is_spatial]
    trace = _Trace(
        num_parameters=sum(p.numel() for p in net.parameters()),
        spatial_elements=sum(spatial) + output_elements,
        other_bytes=sum(size for size, is_spatial in saved.values() if not is_spatial),
        output_elements=sum(o.numel() for o in outputs),
        largest_spatial_elements=max(spatial, default=0),
    )
    _CACHE[key] = trace
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return trace


def estimate_training_memory(spec: Topology | Configuration, patch_size: Sequence[int] | None = None,
                             batch_size: int | None = None, amp: bool = True, arch: str | None = None,
                             workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                             cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES) -> MemoryEstimate:
    """Estimate the memory of one training step of ``arch`` (default: the topology's).

    ``spec`` is a topology or a configuration; for a configuration, ``patch_size`` and
    ``batch_size`` default to its own. Fast (meta device, cached per topology and patch).
    """
    topology = resolve_topology(spec, arch)
    if patch_size is None or batch_size is None:
        if not isinstance(spec, Configuration):
            raise ValueError("patch_size and batch_size are needed when estimating from a topology")
        patch_size = spec.patch_size if patch_size is None else patch_size
        batch_size = spec.batch_size if batch_size is None else batch_size
    patch_size = tuple(int(v) for v in patch_size)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = int(batch_size)
    check_input_size(topology, patch_size)
    trace = _trace(topology, patch_size)
    activation_bytes = 2 if amp else 4
    n = trace.num_parameters
    return MemoryEstimate(
        parameters=n * 4 + (n * 2 if amp else 0),
        gradients=n * 4,
        optimizer_state=n * 4,
        activations=batch_size * (trace.spatial_elements * activation_bytes + trace.other_bytes
                                  + trace.output_elements * LOSS_BYTES_PER_OUTPUT_ELEMENT),
        backward_peak=int(BACKWARD_PEAK_FACTOR * batch_size * trace.largest_spatial_elements * activation_bytes),
        workspace=int(workspace_bytes),
        cuda_context=int(cuda_context_bytes),
        num_parameters=n,
        patch_size=patch_size,
        batch_size=batch_size,
        amp=bool(amp),
    )
