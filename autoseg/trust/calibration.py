"""Temperature scaling: one number per configuration that makes its probabilities mean what they say.

A network's softmax is usually over-confident (and a fold-and-mirror average can be under-confident).
Temperature scaling (Guo et al., 2017) divides the logits by one temperature ``T`` fitted on
held-out predictions; ``T > 1`` softens, ``T < 1`` sharpens. Dividing every logit by the same
positive number keeps each voxel's argmax (and a sigmoid's side of 0.5), so the label maps do not
change, only how much their probabilities can be believed.

Prediction stores probabilities, not logits: ``log p`` is a softmax's logits up to a per-voxel
constant, ``log(p / (1 - p))`` a sigmoid's exactly, so scaling works on stored probabilities too
(:func:`apply_temperature`).

The expected calibration error (:func:`expected_calibration_error`) bins voxels by confidence (the
top class' probability; for sigmoid regions each channel's ``max(p, 1 - p)``) into equal-width bins
and averages ``|accuracy - confidence|`` weighted by the bins' voxel counts.

The fitted :class:`Calibration` is stored as ``models/<config>/calibration.json``
(:func:`save_calibration`, :func:`load_calibration`); :mod:`autoseg.trust.fit` fits it from the
cross-validation predictions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from pydantic import ConfigDict, TypeAdapter
from pydantic.dataclasses import dataclass
from scipy.optimize import minimize_scalar

from autoseg.errors import AutosegError
from autoseg.labels import Activation
from autoseg.utils import atomic_write_json, read_model_file, validate_model

__all__ = ["CALIBRATION_FILE", "Calibration", "CalibrationError", "apply_temperature", "expected_calibration_error",
           "fit_temperature", "load_calibration", "negative_log_likelihood", "save_calibration"]

CALIBRATION_FILE = "calibration.json"
SCHEMA_VERSION = 1
ECE_BINS = 15
# the search range of log(T): temperatures from 1/20 to 20 cover any network we have seen
_LOG_T_BOUNDS = (-3.0, 3.0)
_EPS = 1e-6


class CalibrationError(AutosegError, ValueError):
    """No held-out probabilities to fit on, or a bad ``calibration.json`` (the message names the file)."""


@dataclass(config=ConfigDict(extra="forbid", frozen=True))
class Calibration:
    """A configuration's temperature and how much it helped on held-out predictions.

    Attributes:
        temperature: divide the logits by this (fitted on every fold's held-out voxels).
        ece_before, ece_after: expected calibration error of the held-out voxels without and
            with scaling; ``ece_evaluation`` says how ``ece_after`` was held out.
        nll_before, nll_after: mean negative log-likelihood per voxel, likewise.
        structure_entropy: per class, the largest mean entropy (calibrated, normalised) over the
            predicted structure of any held-out case: how unsure the model is on data like its
            training data; prediction flags a class well above it.
    """

    configuration: str
    activation: str
    temperature: float
    folds: tuple[str, ...]
    num_cases: int
    num_voxels: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    ece_evaluation: str
    structure_entropy: dict[str, float]
    bins: int = ECE_BINS
    schema_version: int = SCHEMA_VERSION


_ADAPTER = TypeAdapter(Calibration)


def save_calibration(calibration: Calibration, path: str | os.PathLike) -> Path:
    """Write ``calibration.json`` atomically (``path`` is the file)."""
    return atomic_write_json(path, _ADAPTER.dump_python(calibration, mode="json"))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read a ``calibration.json`` (or the folder holding one); every bad field is named."""
    data, source = read_model_file(path, CALIBRATION_FILE, CalibrationError,
                                   "run `autoseg calibrate WORK -c CONFIG` first")
    return validate_model(_ADAPTER, data, str(source), "calibration", CalibrationError)


def _logits(probabilities: torch.Tensor, activation: Activation | str) -> torch.Tensor:
    # float32 (a float64 copy of a CT's probabilities would be gigabytes); 1 - 1e-6 is exact enough there
    p = probabilities.float().clamp(_EPS, 1 - _EPS)
    return torch.log(p) if activation == "softmax" else torch.log(p) - torch.log1p(-p)


def apply_temperature(probabilities: np.ndarray | torch.Tensor, temperature: float,
                      activation: Activation | str, channel_axis: int = 0) -> torch.Tensor:
    """Probabilities re-scaled by ``temperature`` (float32, same shape; channels on ``channel_axis``).

    >>> p = torch.tensor([[0.9], [0.1]])
    >>> apply_temperature(p, 2.0, "softmax")[:, 0].round(decimals=3).tolist()
    [0.75, 0.25]
    >>> torch.equal(apply_temperature(p, 1.0, "softmax").argmax(0), p.argmax(0))
    True
    """
    probabilities = torch.as_tensor(probabilities)
    logits = _logits(probabilities, activation) / float(temperature)
    scaled = torch.softmax(logits, dim=channel_axis) if activation == "softmax" else torch.sigmoid(logits)
    return scaled.float()


def negative_log_likelihood(probabilities: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                            activation: Activation | str) -> float:
    """Mean NLL per voxel of samples ``(N, K)`` against targets (class index ``(N,)``; or ``(N, K)`` binary)."""
    p = torch.as_tensor(probabilities).double().clamp(_EPS, 1 - _EPS)
    t = torch.as_tensor(targets).long()
    if activation == "softmax":
        return float(-torch.log(p.gather(1, t[:, None])).mean())
    t = t.double()
    return float(-(t * torch.log(p) + (1 - t) * torch.log1p(-p)).mean())


def expected_calibration_error(probabilities: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                               activation: Activation | str, bins: int = ECE_BINS) -> float:
    """ECE of samples ``(N, K)`` (targets as in :func:`negative_log_likelihood`).

    >>> p = torch.tensor([[0.2, 0.8]] * 10)
    >>> t = torch.tensor([1] * 8 + [0] * 2)
    >>> round(expected_calibration_error(p, t, "softmax"), 6)   # 80% right at 80% confidence
    0.0
    """
    p = torch.as_tensor(probabilities).double()
    t = torch.as_tensor(targets).long()
    if activation == "softmax":
        confidence, predicted = p.max(1)
        correct = (predicted == t).double()
    else:
        flat, truth = p.reshape(-1), t.reshape(-1)
        confidence = torch.maximum(flat, 1 - flat)
        correct = ((flat > 0.5).long() == truth).double()
    if confidence.numel() == 0:
        return 0.0
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    # per bin, |voxels right - summed confidence| is the bin's count times |accuracy - mean confidence|
    right = torch.bincount(index, weights=correct, minlength=bins)
    believed = torch.bincount(index, weights=confidence, minlength=bins)
    gap = (right - believed).abs()
    return float(gap.sum() / confidence.numel())


def fit_temperature(probabilities: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
                    activation: Activation | str) -> float:
    """The temperature minimising the NLL of samples ``(N, K)`` (bounded scalar search over log T).

    >>> g = torch.Generator().manual_seed(0)
    >>> logits = torch.randn(4000, 3, generator=g) * 3
    >>> truth = torch.multinomial(torch.softmax(logits, 1), 1, generator=g)[:, 0]
    >>> 1.8 < fit_temperature(torch.softmax(logits * 2, 1), truth, "softmax") < 2.2  # over-confident x2
    True
    """
    p = torch.as_tensor(probabilities)
    t = torch.as_tensor(targets)
    if p.shape[0] == 0:
        raise CalibrationError("no voxels to fit a temperature on")

    def loss(log_t: float) -> float:
        return negative_log_likelihood(apply_temperature(p, float(np.exp(log_t)), activation, channel_axis=1),
                                       t, activation)

    result = minimize_scalar(loss, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-3})
    return float(np.exp(result.x))
