"""Precision and compile choices: what "auto" picks per device, and that every stage honours them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_support import cube_cases, make_work, tiny_plan

import autoseg.precision as precision
from autoseg.errors import AutosegError
from autoseg.precision import (
    PrecisionError,
    autocast,
    maybe_compile,
    needs_grad_scaler,
    resolve_compile,
    resolve_precision,
)
from autoseg.sliding_window import sliding_window_predict
from autoseg.training import TrainingError, train
from autoseg.training.checkpoint import load_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, native, expected", [
    (CPU, True, "bf16"),  # AVX512-BF16 / AMX
    (CPU, False, "fp32"),  # emulated bf16 is far slower than float32
    (CUDA, True, "bf16"),
    (CUDA, False, "fp16"),  # an older GPU: float16 with a gradient scaler
])
def test_auto_picks_the_fastest_native_precision(monkeypatch, device, native, expected) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: native)
    assert resolve_precision("auto", device) == expected
    assert needs_grad_scaler(resolve_precision("auto", device)) == (expected == "fp16")


def test_explicit_choices_are_checked(monkeypatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: False)
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(PrecisionError, match="unknown precision 'half'"):
        resolve_precision("half", CPU)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert resolve_precision("bf16", CPU) == "bf16"
    assert issubclass(PrecisionError, AutosegError)


def test_native_bf16_on_this_cpu_matches_onednn() -> None:
    assert precision.native_bf16(CPU) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_compile_auto_is_on_for_cuda_only(monkeypatch) -> None:
    monkeypatch.setattr(precision, "compiler_available", lambda d: True)
    assert resolve_compile("auto", CUDA) is True
    assert resolve_compile("auto", CPU) is False
    assert resolve_compile("on", CPU) is True
    assert resolve_compile("off", CUDA) is False
    monkeypatch.setattr(precision, "compiler_available", lambda d: False)
    assert resolve_compile("auto", CUDA) is False  # no triton: eager, no error
    with pytest.raises(PrecisionError, match="needs a C\\+\\+ compiler"):
        resolve_compile("on", CPU)
    with pytest.raises(PrecisionError, match="unknown compile mode"):
        resolve_compile("yes", CPU)


def test_compiler_available_looks_for_a_cpp_compiler(monkeypatch) -> None:
    monkeypatch.setattr(precision.shutil, "which", lambda name: None)
    assert not precision.compiler_available(CPU)
    monkeypatch.setattr(precision.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert precision.compiler_available(CPU)
    assert not precision.compiler_available(torch.device("mps"))


def test_autocast_computes_in_the_chosen_dtype() -> None:
    a = torch.randn(4, 4)
    with autocast(CPU, "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    assert maybe_compile(torch.nn.Identity(), False).__class__ is torch.nn.Identity


def _tiny_network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 3, 3, padding=1)).eval()


def test_sliding_window_in_bf16_agrees_with_float32() -> None:
    """Labels from bf16 forward passes agree with float32's on at least 99.5% of voxels."""
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 40, 40)).astype(np.float32))
    network = _tiny_network()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = sliding_window_predict(network, image, (16, 16), tta_axes=(0, 1), precision="fp32")
        half = sliding_window_predict(network, image, (16, 16), tta_axes=(0, 1), precision="bf16")
    assert half.dtype == torch.float32  # summed in float32 whatever the forward precision
    agreement = (full.argmax(0) == half.argmax(0)).float().mean().item()
    assert agreement >= 0.995
    assert not torch.equal(full, half)  # bf16 really ran: the probabilities differ in the last bits
    assert torch.allclose(full, half, atol=0.05)


def test_training_records_its_precision_and_refuses_what_the_device_cannot_do(tmp_path: Path) -> None:
    plan = tiny_plan(epochs=1, iterations_per_epoch=2, validation_iterations=1)
    work = make_work(tmp_path / "work", plan, cube_cases(4))
    fold_dir = train(work, "3d_fullres", 0, workers=0, progress=False, num_threads=1, precision="fp32",
                     compile_network="off")
    state = load_checkpoint(fold_dir / "checkpoint_latest.pt")
    assert state["precision"] == "fp32" and state["grad_scaler"] is None
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device"):
        train(work, "3d_fullres", 1, workers=0, progress=False, num_threads=1, precision="fp16")


class _CountingNetwork(torch.nn.Module):
    """A non-symmetric network that counts its forward passes and can run out of memory on demand."""

    def __init__(self, max_batch: int | None = None) -> None:
        super().__init__()
        self.inner = _tiny_network(seed=3)
        self.calls = 0
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_mirrored_copies_in_one_forward_equal_one_forward_each() -> None:
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 2, 20, 20)).astype(np.float32))
    separate, together = _CountingNetwork(), _CountingNetwork()
    one = sliding_window_predict(separate, image, (16, 16), tta_axes=(0, 1), mirror_batch=False, precision="fp32")
    all_ = sliding_window_predict(together, image, (16, 16), tta_axes=(0, 1), mirror_batch=True, precision="fp32")
    assert torch.allclose(one, all_, atol=1e-6)
    assert separate.calls == 4 * together.calls  # 4 mirror combinations of a 2D tile batch


def test_mirrored_batch_that_does_not_fit_falls_back_to_one_forward_each() -> None:
    image = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 20, 20)).astype(np.float32))
    reference = sliding_window_predict(_CountingNetwork(), image, (16, 16), tta_axes=(0, 1), mirror_batch=False,
                                       precision="fp32", batch_size=2)
    tight = _CountingNetwork(max_batch=2)
    result = sliding_window_predict(tight, image, (16, 16), tta_axes=(0, 1), mirror_batch=True, precision="fp32",
                                    batch_size=2)
    assert torch.allclose(reference, result, atol=1e-6)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no mirrored batch to give up: the error stands
        sliding_window_predict(_CountingNetwork(max_batch=1), image, (16, 16), tta_axes=(0, 1),
                               mirror_batch=False, precision="fp32", batch_size=2)
