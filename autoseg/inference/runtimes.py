"""What runs a fold's network: PyTorch, TorchScript or onnxruntime, behind one callable.

The sliding window (:func:`autoseg.sliding_window.sliding_window_predict`) needs one thing from a
network: a callable that maps a ``(B, C, *patch)`` tensor to ``(B, K, *patch)`` logits. A PyTorch
module is such a callable already; :class:`OnnxNetwork` wraps an onnxruntime session the same way,
so preprocessing, tiling, mirroring, ensembling and export are one code path for every runtime.

An exported fold folder (``autoseg export-model --format onnx|torchscript``) holds the network file
(:data:`NETWORK_FILES`) and ``network.json`` (:class:`ExportedNetwork`: topology, schedule, plan
hash), which stand in for what a checkpoint records.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from autoseg.errors import AutosegError
from autoseg.utils import atomic_write_json, read_json

Runtime = Literal["torch", "onnx", "torchscript"]
RUNTIMES: tuple[str, ...] = ("torch", "onnx", "torchscript")
NETWORK_FILES = {"onnx": "network.onnx", "torchscript": "network_torchscript.pt"}
NETWORK_JSON = "network.json"
EXPORT_FORMAT = 1
ONNX_INPUT, ONNX_OUTPUT = "image", "logits"

NetworkCallable = Callable[[torch.Tensor], Any]


class RuntimeMissingError(AutosegError, ImportError):
    """An optional extra that a runtime or export format needs is not installed."""


def require_onnx(purpose: str = "the onnx runtime", modules: tuple[str, ...] = ("onnxruntime",)) -> Any:
    """The first of ``modules`` (all imported), or a one-line error saying how to install them.

    Raises:
        RuntimeMissingError: the ``onnx`` extra is not installed.
    """
    try:
        loaded = [importlib.import_module(name) for name in modules]
    except ImportError:
        raise RuntimeMissingError(f"{purpose} needs the onnx extra: pip install 'autoseg[onnx]'") from None
    return loaded[0]


@dataclass(frozen=True)
class ExportedNetwork:
    """``network.json`` beside an exported network: what its checkpoint recorded."""

    format: str
    file: str
    fold: str
    configuration: str
    topology: dict
    schedule: dict
    plan_hash: str | None = None
    export_format: int = EXPORT_FORMAT

    def save(self, fold_dir: Path) -> Path:
        return atomic_write_json(fold_dir / NETWORK_JSON, asdict(self))

    @classmethod
    def load(cls, fold_dir: Path) -> ExportedNetwork:
        path = fold_dir / NETWORK_JSON
        try:
            data = read_json(path)
            return cls(**data)
        except (OSError, ValueError, TypeError) as error:
            raise AutosegError(f"{path}: not a valid exported network description ({error})") from None


class OnnxNetwork:
    """An onnxruntime session as a network callable: tensors in, logits tensor out (same device)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        ort = require_onnx()
        options = ort.SessionOptions()
        # As many threads as torch uses, so the two runtimes compete on equal terms.
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        (logits,) = self.session.run(None, {self.input_name: array})[:1]
        return torch.from_numpy(logits).to(batch.device)

    def eval(self) -> OnnxNetwork:
        return self


def load_exported_network(fold_dir: Path, runtime: Runtime, device: torch.device) -> NetworkCallable:
    """The network callable of an exported fold folder for ``runtime`` (``onnx`` or ``torchscript``)."""
    path = fold_dir / NETWORK_FILES[runtime]
    if runtime == "onnx":
        return OnnxNetwork(path, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript for torch.export
        network = torch.jit.load(str(path), map_location=device)
    return network.eval()
