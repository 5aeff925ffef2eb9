"""How far a prediction's members agree, and how uncertain its voxels are.

A prediction is already an average of *members*: the folds of an ensemble, and within each fold the
mirrored copies of test-time augmentation. Where they disagree the model is guessing. Two numbers
per class come at no extra network cost, from probabilities that prediction computes anyway:

* **agreement**: the pooled pairwise overlap between members,
  ``sum_{i != j} <p_i, p_j> / ((n - 1) sum_i ||p_i||^2)`` over the class' probability channel: 1
  when every member gives the same probabilities (however soft), 0 when they put the class in
  disjoint places, and never above 1 (``<p_i, p_j> <= (||p_i||^2 + ||p_j||^2) / 2``). Unlike a soft
  Dice it does not drop for soft but identical members, so it measures disagreement only; the
  softness is the entropy's job. It needs only the members' mean and each member's squared norm,
  so :class:`AgreementAccumulator` streams members one at a time (a few numbers per channel).
* **entropy**: the voxel-wise entropy of the (calibrated) probabilities, normalised to ``[0, 1]``
  (softmax: divided by ``log K``; sigmoid: the mean binary entropy of the channels, in bits),
  averaged over the voxels predicted as the class. A confident model is near 0 inside a structure.

Everything here is pure tensor code over ``(K, *spatial)`` probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoseg.labels import Activation, LabelInfo, label_mask

__all__ = ["AgreementAccumulator", "ClassConfidence", "class_confidence", "entropy_map", "pooled_agreement"]

_EPS = 1e-12


def _as_tensor(probabilities: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(probabilities)
    return tensor.float() if tensor.dtype != torch.float64 else tensor


_CHUNK = 1 << 24  # elements per partial sum: float32 temporaries of 64 MB, not a float64 copy of the volume


def _squared_norms(probabilities: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per channel, the sum of squares (float64 on the CPU), in chunks."""
    tensor = torch.as_tensor(probabilities)
    flat = tensor.reshape(tensor.shape[0], -1)
    result = torch.zeros(flat.shape[0], dtype=torch.float64)
    for channel in range(flat.shape[0]):
        for start in range(0, flat.shape[1], _CHUNK):
            chunk = flat[channel, start:start + _CHUNK].float()
            result[channel] += float(torch.dot(chunk, chunk))
    return result


class AgreementAccumulator:
    """Pooled pairwise overlap per channel between members added one at a time.

    >>> acc = AgreementAccumulator()
    >>> a = torch.tensor([[0.0, 1.0, 1.0, 0.0]]); b = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    >>> acc.add(a); acc.add(b)
    >>> [round(v, 3) for v in acc.agreement((a + b) / 2)]
    [0.667]
    >>> soft = AgreementAccumulator(); soft.add(a / 2); soft.add(a / 2)
    >>> soft.agreement(a / 2)
    [1.0]
    """

    def __init__(self) -> None:
        self.count = 0
        self._squares: torch.Tensor | None = None  # per channel, sum over members of ||p_i||^2

    def add(self, member: np.ndarray | torch.Tensor) -> None:
        """Count one member's probabilities ``(K, *spatial)`` (on any device; only K numbers come back)."""
        squares = _squared_norms(member)
        self._squares = squares if self._squares is None else self._squares + squares
        self.count += 1

    def agreement(self, mean: np.ndarray | torch.Tensor) -> list[float] | None:
        """Per channel agreement, given the members' mean; None with fewer than two members.

        A channel no member predicts anywhere counts as full agreement (1.0).
        """
        if self.count < 2 or self._squares is None:
            return None
        total_squares = _squared_norms(mean) * self.count ** 2  # ||sum_i p_i||^2
        cross = total_squares - self._squares                            # sum_{i != j} <p_i, p_j>
        denominator = (self.count - 1) * self._squares
        values = torch.where(denominator > _EPS, cross / denominator.clamp_min(_EPS), torch.ones_like(cross))
        return [float(min(1.0, max(0.0, v))) for v in values]


def pooled_agreement(members: Sequence[np.ndarray | torch.Tensor]) -> list[float] | None:
    """Agreement of members held in memory (see :class:`AgreementAccumulator`); None for fewer than two.

    >>> pooled_agreement([np.ones((1, 3)), np.ones((1, 3))])
    [1.0]
    """
    accumulator = AgreementAccumulator()
    for member in members:
        accumulator.add(member)
    if accumulator.count < 2:
        return None
    mean = sum(_as_tensor(m).double() for m in members) / len(members)
    return accumulator.agreement(mean)


def entropy_map(probabilities: np.ndarray | torch.Tensor, activation: Activation) -> torch.Tensor:
    """Voxel-wise uncertainty in ``[0, 1]`` of probabilities ``(K, *spatial)`` (float32, ``*spatial``).

    >>> float(entropy_map(torch.tensor([[0.5], [0.5]]), "softmax")[0])
    1.0
    >>> abs(float(entropy_map(torch.tensor([[1.0], [0.0]]), "softmax")[0]))
    0.0
    """
    p = _as_tensor(probabilities).clamp(0.0, 1.0)
    if activation == "sigmoid":
        q = 1 - p
        bits = -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q)) / math.log(2)
        return bits.mean(0).clamp(0, 1).float()
    channels = p.shape[0]
    if channels < 2:
        return torch.zeros(p.shape[1:])
    return (-torch.special.xlogy(p, p).sum(0) / math.log(channels)).clamp(0, 1).float()


@dataclass(frozen=True)
class ClassConfidence:
    """One class' confidence in one case (``None`` where there is nothing to measure).

    Attributes:
        voxels: voxels predicted as the class (preprocessed grid).
        probability: mean probability of the class' channel over those voxels.
        entropy: mean normalised entropy over those voxels (0: certain, 1: uniform).
        fold_agreement: pooled overlap between the folds' probabilities (``None``: one fold).
        mirror_agreement: pooled overlap between the mirrored copies (``None``: not measured).
    """

    voxels: int
    probability: float | None
    entropy: float | None
    fold_agreement: float | None = None
    mirror_agreement: float | None = None

    @property
    def score(self) -> float:
        """One number in ``[0, 1]`` to sort by: the weakest of the measured signals."""
        signals = [v for v in (self.fold_agreement, self.mirror_agreement) if v is not None]
        if self.entropy is not None:
            signals.append(1.0 - self.entropy)
        return min(signals, default=1.0)


def class_confidence(probabilities: np.ndarray | torch.Tensor, labels: np.ndarray, label_info: LabelInfo,
                     entropy: torch.Tensor | None = None,
                     fold_agreement: Sequence[float] | None = None,
                     mirror_agreement: Sequence[float] | None = None) -> dict[str, ClassConfidence]:
    """Confidence per class (name -> :class:`ClassConfidence`) of one predicted case.

    ``labels`` is the decoded label map on the probabilities' grid; ``entropy`` defaults to
    :func:`entropy_map` of the probabilities; the agreements are per output channel.

    >>> info = LabelInfo.from_labels({"background": 0, "a": 1})
    >>> p = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    >>> c = class_confidence(p, np.array([0, 1]), info)["a"]
    >>> c.voxels, round(c.probability, 2)
    (1, 0.8)
    """
    probabilities = _as_tensor(probabilities)
    if entropy is None:
        entropy = entropy_map(probabilities, label_info.activation)
    entropy_np = entropy.detach().cpu().numpy()
    channel_of = {name: label_info.names.index(name) for name in label_info.classes}
    result: dict[str, ClassConfidence] = {}
    for name, value in label_info.classes.items():
        channel = channel_of[name]
        mask = label_mask(labels, value)
        voxels = int(np.count_nonzero(mask))
        probability = entropy_value = None
        if voxels:
            channel_probabilities = probabilities[channel].detach().cpu().numpy()
            probability = float(channel_probabilities[mask].mean())
            entropy_value = float(entropy_np[mask].mean())
        result[name] = ClassConfidence(
            voxels=voxels, probability=probability, entropy=entropy_value,
            fold_agreement=None if fold_agreement is None else float(fold_agreement[channel]),
            mirror_agreement=None if mirror_agreement is None else float(mirror_agreement[channel]))
    return result
