"""The training-memory estimate, checked against memory measured on the CPU.

Measurement: the peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) of one
real forward + Dice/CE loss with deep supervision + backward + SGD-momentum step, minus the
resident memory just before it, with glibc told to serve every allocation above 64 KiB by
``mmap`` so that freed tensors leave the resident set at once. A warm-up step first loads the
kernels and creates the momentum buffers; the gradients are then freed (``set_to_none``), so the
measured step allocates activations, backward buffers and gradients, and the estimate's
``activations + backward_peak + gradients`` is compared with it.

Tolerance: the estimate lies between 10 % below and 25 % above the measurement (it errs on the
side of too much, which is the safe side for the planner).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter

from autoseg.networks import available_networks, build_network, estimate_training_memory
from autoseg.networks.memory import MemoryEstimate, _trace
from autoseg.plan import ChannelNormalization, Configuration, Topology

LOWER, UPPER = 0.90, 1.25


def topology(dim: int, features: tuple[int, ...], anisotropic: bool = False, **options) -> Topology:
    n = len(features)
    if anisotropic:
        kernels, strides = ((1, 3, 3),) + ((3, 3, 3),) * (n - 1), ((1, 1, 1),) + ((1, 2, 2),) * (n - 1)
    else:
        kernels, strides = ((3,) * dim,) * n, ((1,) * dim,) + ((2,) * dim,) * (n - 1)
    return Topology(arch="unet", dim=dim, in_channels=1, num_classes=3, features_per_stage=features,
                    kernel_sizes=kernels, strides=strides, n_conv_per_stage=(2,) * n,
                    n_conv_per_stage_decoder=(2,) * (n - 1), options=options)


def nnunet_3d_topology() -> Topology:
    """The size of nnU-Net's default 3D full-resolution network: six stages, 32 to 320 features."""
    features = (32, 64, 128, 256, 320, 320)
    return Topology(arch="unet", dim=3, in_channels=1, num_classes=3, features_per_stage=features,
                    kernel_sizes=((3, 3, 3),) * 6, strides=((1, 1, 1),) + ((2, 2, 2),) * 5,
                    n_conv_per_stage=(2,) * 6, n_conv_per_stage_decoder=(2,) * 5)


def dice_ce_loss(outputs: list[torch.Tensor], target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy plus soft Dice at every deep-supervision scale, like the trainer's default."""
    total = torch.zeros(())
    for output in outputs:
        scaled = F.interpolate(target[:, None].float(), size=output.shape[2:], mode="nearest")[:, 0].long()
        probabilities = torch.softmax(output, 1)
        one_hot = F.one_hot(scaled, num_classes).movedim(-1, 1).float()
        axes = tuple(range(2, output.dim()))
        dice = (2 * (probabilities * one_hot).sum(axes) + 1) / ((probabilities + one_hot).sum(axes) + 1)
        total = total + F.cross_entropy(output, scaled) + 1 - dice.mean()
    return total


def _resident() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":")
            values[key] = int(value.split()[0]) * 1024
    return values


def _can_measure() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        return False


def measured_step_bytes(topology: Topology, patch: tuple[int, ...], batch: int) -> int:
    """Peak extra resident memory of one training step (see the module docstring)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks go back at free()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-thread scratch buffers would blur the measurement
    try:
        torch.manual_seed(0)
        net = build_network(topology).train()
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
        x = torch.randn(batch, topology.in_channels, *patch)
        y = torch.randint(0, topology.num_classes, (batch, *patch))

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            outputs = net(x)
            loss = dice_ce_loss(outputs if isinstance(outputs, list) else [outputs], y, topology.num_classes)
            loss.backward()
            optimizer.step()

        step()
        optimizer.zero_grad(set_to_none=True)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
        before = _resident()["VmRSS"]
        step()
        return _resident()["VmHWM"] - before
    finally:
        torch.set_num_threads(threads)


def measured_in_fresh_process(topology: Topology, patch: tuple[int, ...], batch: int) -> int:
    """:func:`measured_step_bytes` in a new interpreter: memory that earlier tests left to the
    allocator would otherwise serve the step without raising the resident peak."""
    spec = json.dumps({"topology": TypeAdapter(Topology).dump_python(topology, mode="json"),
                       "patch": list(patch), "batch": batch})
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from pydantic import TypeAdapter; from autoseg.plan import Topology;"
        "from test_network_memory import measured_step_bytes;"
        "spec = json.loads(sys.argv[2]);"
        "print(measured_step_bytes(TypeAdapter(Topology).validate_python(spec['topology']),"
        " tuple(spec['patch']), spec['batch']))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), spec],
                            capture_output=True, text=True, timeout=240, check=True)
    return int(result.stdout.strip().splitlines()[-1])


MEASURED_CASES = [
    ("unet", topology(3, (8, 16, 32), anisotropic=True), (16, 64, 64), 2),
    ("resenc", topology(3, (8, 16, 32), anisotropic=True), (16, 48, 48), 2),
    ("vnet", topology(2, (8, 16, 32)), (128, 128), 4),
    ("unetpp", topology(2, (8, 16, 32, 64)), (128, 128), 4),
    ("attention_unet", topology(3, (8, 16, 32)), (32, 32, 32), 2),
    ("unet", topology(2, (8, 16, 32), fusion="per_channel", multiscale_stem=True), (128, 128), 4),
]


@pytest.mark.skipif(not _can_measure(), reason="needs Linux /proc/self/clear_refs and glibc")
@pytest.mark.parametrize(("arch", "topo", "patch", "batch"), MEASURED_CASES,
                         ids=[f"{c[0]}{'+stems' if c[1].options else ''}-{'x'.join(map(str, c[2]))}"
                              for c in MEASURED_CASES])
def test_estimate_matches_measured_cpu_peak(arch: str, topo: Topology, patch: tuple, batch: int) -> None:
    topo = dataclasses.replace(topo, arch=arch)
    measured = measured_in_fresh_process(topo, patch, batch)
    estimate = estimate_training_memory(topo, patch, batch, amp=False)
    estimated = estimate.activations + estimate.backward_peak + estimate.gradients
    assert measured > 20 * 1024**2, "the case is too small to measure reliably"
    ratio = estimated / measured
    assert LOWER <= ratio <= UPPER, (f"{arch}: estimated {estimated / 2**20:.1f} MiB, measured "
                                     f"{measured / 2**20:.1f} MiB (ratio {ratio:.2f})")


@pytest.mark.parametrize("arch", available_networks())
def test_parameter_terms_are_exact(arch: str) -> None:
    topo = topology(3, (4, 8, 16), anisotropic=True, fusion="per_channel")
    topo = dataclasses.replace(topo, in_channels=2)
    n = sum(p.numel() for p in build_network(topo, arch=arch).parameters())
    fp32 = estimate_training_memory(topo, (4, 16, 16), 2, amp=False, arch=arch)
    amp = estimate_training_memory(topo, (4, 16, 16), 2, amp=True, arch=arch)
    assert fp32.num_parameters == n
    assert (fp32.parameters, fp32.gradients, fp32.optimizer_state) == (4 * n, 4 * n, 4 * n)
    assert amp.parameters == 6 * n  # fp32 weights plus autocast's fp16 copies


@pytest.mark.parametrize("arch", available_networks())
def test_scaling_with_batch_patch_and_amp(arch: str) -> None:
    topo = topology(3, (8, 16, 32))
    two = estimate_training_memory(topo, (32, 32, 32), 2, amp=False, arch=arch)
    four = estimate_training_memory(topo, (32, 32, 32), 4, amp=False, arch=arch)
    assert four.activations == 2 * two.activations and four.backward_peak == 2 * two.backward_peak
    assert four.parameters == two.parameters
    larger = estimate_training_memory(topo, (32, 32, 64), 2, amp=False, arch=arch)
    assert 1.8 < larger.activations / two.activations <= 2.0  # the per-channel statistics do not double
    half = estimate_training_memory(topo, (32, 32, 32), 2, amp=True, arch=arch)
    assert 0.5 <= half.activations / two.activations < 0.65  # fp16 maps, fp32 statistics and loss


def test_estimate_fields_and_configuration_defaults() -> None:
    topo = topology(3, (8, 16, 32), anisotropic=True)
    configuration = Configuration(
        name="3d_fullres", spacing=(3.0, 1.0, 1.0), patch_size=(8, 32, 32), batch_size=3,
        median_shape=(20, 64, 64), normalization=(ChannelNormalization(channel="CT", scheme="none"),),
        topology=topo)
    estimate = estimate_training_memory(configuration)
    assert isinstance(estimate, MemoryEstimate)
    assert (estimate.patch_size, estimate.batch_size, estimate.amp) == ((8, 32, 32), 3, True)
    assert estimate == estimate_training_memory(topo, (8, 32, 32), 3)
    assert estimate.total == estimate.allocated + estimate.cuda_context
    assert estimate.allocated == sum((estimate.parameters, estimate.gradients, estimate.optimizer_state,
                                      estimate.activations, estimate.backward_peak, estimate.workspace))
    no_context = estimate_training_memory(topo, (8, 32, 32), 3, cuda_context_bytes=0, workspace_bytes=0)
    assert no_context.total == estimate.total - estimate.cuda_context - estimate.workspace
    assert "total" in estimate.summary() and "batch 3" in estimate.summary()
    with pytest.raises(ValueError, match="valid sizes"):
        estimate_training_memory(topo, (8, 30, 32), 2)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_training_memory(topo, (8, 32, 32), 0)
    with pytest.raises(ValueError, match="patch_size and batch_size"):
        estimate_training_memory(topo)
    with pytest.raises(ValueError, match="unknown network"):
        estimate_training_memory(topo, (8, 32, 32), 2, arch="nope")


def test_stems_cost_memory() -> None:
    plain = estimate_training_memory(topology(2, (8, 16, 32)), (64, 64), 2)
    stemmed = estimate_training_memory(topology(2, (8, 16, 32), multiscale_stem=True), (64, 64), 2)
    assert stemmed.activations > plain.activations and stemmed.num_parameters > plain.num_parameters


@pytest.mark.parametrize("arch", available_networks())
def test_estimate_is_fast_for_a_large_3d_network(arch: str) -> None:
    topo = nnunet_3d_topology()
    estimate_training_memory(topo, (64, 64, 64), 2, arch=arch)  # first call pays one-off imports
    start = time.perf_counter()
    estimate = estimate_training_memory(topo, (128, 128, 160), 2, arch=arch)
    assert time.perf_counter() - start < 2.0
    assert estimate.total_gb > 1  # 128x128x160 patches at 32..320 features are gigabytes, not megabytes


def test_estimating_leaves_the_random_state_alone() -> None:
    # the planner estimates before the trainer seeds and builds: tracing must not consume random numbers
    topo = topology(2, (4, 8, 16))
    torch.manual_seed(0)
    expected = build_network(topo).state_dict()
    torch.manual_seed(0)
    estimate_training_memory(topo, (48, 48), 2, arch="resenc")
    built = build_network(topo).state_dict()
    assert all(torch.equal(expected[k], built[k]) for k in expected)


TRACE_OPTIONS = ({}, {"norm": "batch"}, {"norm": "none"}, {"fusion": "per_channel", "multiscale_stem": True},
                 {"anatomical_prior": True})


@pytest.mark.parametrize("options", TRACE_OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("arch", available_networks())
def test_meta_trace_saves_what_a_real_forward_saves(arch: str, options: dict) -> None:
    # the meta trace answers some ops with shape-only stand-ins (no torch._dynamo import); autograd
    # must still keep exactly the tensors a real forward on the CPU keeps
    for dim, patch in ((2, (32, 32)), (3, (8, 16, 16))):
        topo = dataclasses.replace(topology(dim, (4, 8, 16), anisotropic=dim == 3, **options), arch=arch,
                                   in_channels=2)
        assert _trace(topo, patch, "meta") == _trace(topo, patch, "cpu"), f"{arch} {dim}D {options}"


def test_estimating_every_network_leaves_torch_dynamo_unimported() -> None:
    # torch._dynamo takes about 2 s to import; the planner estimates memory on every `autoseg plan`
    script = (
        "import sys, dataclasses\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_network_memory import TRACE_OPTIONS, topology\n"
        "from autoseg.networks import available_networks, estimate_training_memory\n"
        "for arch in available_networks():\n"
        "    for options in TRACE_OPTIONS:\n"
        "        for dim, patch in ((2, (64, 64)), (3, (16, 32, 32))):\n"
        "            topo = dataclasses.replace(topology(dim, (8, 16, 32), **options), arch=arch)\n"
        "            estimate_training_memory(topo, patch, 2)\n"
        "print('torch._dynamo' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "a network op fell back to torch's Python meta kernels"
