"""Segmentation losses: soft Dice, cross-entropy, Focal, their sums, a boundary term, deep supervision.

Every loss takes raw network outputs (logits) ``(B, C, *spatial)`` and an encoded target from
:meth:`autoseg.training.labels.LabelInfo.encode`: ``(B, 1, *spatial)`` class indices for softmax
outputs, ``(B, C, *spatial)`` 0/1 maps for region (sigmoid) outputs, :data:`IGNORE_INDEX` where a
voxel is ignored. Ignored voxels contribute nothing to any term.

Choices (nnU-Net's, written down):

* Soft Dice uses probabilities (softmax or sigmoid), ``smooth = 1e-5`` in numerator and denominator,
  and leaves the background channel out for softmax outputs. ``batch_dice`` pools TP/FP/FN over the
  batch before the ratio (one Dice per class); otherwise one Dice per sample and class, averaged.
  The Dice term is ``1 - mean Dice`` so a perfect prediction has loss 0.
* Cross-entropy and Focal average over the valid voxels; with class weights, a voxel counts with
  the weight of its target class (PyTorch's ``cross_entropy`` convention), so Focal with gamma 0 is
  exactly cross-entropy. For regions, they are the binary versions per region.
* The boundary term (Kervadec et al. 2019) is ``mean(p_c * phi_c)`` over foreground channels, with
  ``phi_c`` the signed Euclidean distance (voxels) to the border of the target, negative inside;
  it is computed on the CPU with scipy and only at the highest output resolution.
* Deep supervision: output ``i`` (highest resolution first) has weight ``1 / 2**i``, the lowest
  resolution gets 0 (as nnU-Net), and the weights are normalized to sum to 1; targets are
  downsampled to each output's size with nearest-neighbour sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from autoseg.constants import LOSS_NAMES
from autoseg.plan import Schedule, Topology, deep_supervision_weights
from autoseg.training.errors import TrainingError
from autoseg.training.labels import IGNORE_INDEX, LabelInfo

LOSS_OPTIONS = {
    "batch_dice": "pool Dice statistics over the batch (default: True for 2D, False for 3D)",
    "smooth": "Dice smoothing term (default 1e-5)",
    "dice_weight": "weight of the Dice term in dice_ce/dice_focal (default 1)",
    "ce_weight": "weight of the cross-entropy/Focal term in dice_ce/dice_focal (default 1)",
    "focal_gamma": "Focal loss focusing parameter (default 2; 0 gives cross-entropy)",
    "boundary": "weight of the optional boundary term (default 0: off)",
    "class_weights": "one weight per output channel, for every term (default: all 1)",
    "ce_class_weights": "one weight per output channel for the cross-entropy/Focal term only (default: "
                        "class_weights)",
}
DEFAULT_SMOOTH = 1e-5
DEFAULT_FOCAL_GAMMA = 2.0


class LossConfigError(TrainingError):
    """An unknown loss name or loss option."""


def _valid_mask(target: torch.Tensor) -> torch.Tensor:
    """``(B, 1, *spatial)`` float mask of voxels that are not ignored."""
    return (target[:, :1] != IGNORE_INDEX).to(torch.float32)


def _one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices ``(B, 1, ...)`` to a float one-hot ``(B, C, ...)``; ignored voxels are all-zero."""
    index = target[:, :1].long().clamp_min(0)
    one_hot = torch.zeros((target.shape[0], num_classes, *target.shape[2:]), device=target.device,
                          dtype=torch.float32)
    one_hot.scatter_(1, index, 1.0)
    return one_hot * _valid_mask(target)


def _register_class_weights(module: nn.Module, class_weights: Sequence[float] | None) -> None:
    """``module.class_weights``: a float tensor that follows the module's device, or None."""
    module.register_buffer("class_weights", None if class_weights is None else
                           torch.as_tensor(class_weights, dtype=torch.float32), persistent=False)


class SoftDiceLoss(nn.Module):
    """``1 - mean soft Dice`` over the scored channels (see module docstring)."""

    def __init__(self, regions: bool, batch_dice: bool = False, smooth: float = DEFAULT_SMOOTH,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.regions = regions
        self.batch_dice = batch_dice
        self.smooth = smooth
        _register_class_weights(self, class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _valid_mask(target)
        if self.regions:
            probs = torch.sigmoid(logits) * valid
            truth = target.clamp_min(0).float() * valid
            first = 0
        else:
            probs = torch.softmax(logits, 1) * valid
            truth = _one_hot(target, logits.shape[1])
            first = 1  # background is not scored
        probs, truth = probs[:, first:], truth[:, first:]
        axes = tuple(range(2, logits.ndim))
        tp = (probs * truth).sum(axes)
        denominator = probs.sum(axes) + truth.sum(axes)  # = 2TP + FP + FN
        if self.batch_dice:
            tp, denominator = tp.sum(0), denominator.sum(0)
        dice = (2 * tp + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        weights = None if self.class_weights is None else self.class_weights[first:]
        if weights is None:
            return 1 - dice.mean()
        return 1 - (dice * weights).sum(-1).mean() / weights.sum()


class FocalLoss(nn.Module):
    """Focal loss ``-(1 - p_t)**gamma * log p_t`` over valid voxels; gamma 0 is cross-entropy."""

    def __init__(self, regions: bool, gamma: float = DEFAULT_FOCAL_GAMMA,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.regions = regions
        self.gamma = gamma
        _register_class_weights(self, class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _valid_mask(target)
        if self.regions:
            truth = target.clamp_min(0).float()
            log_p = -F.binary_cross_entropy_with_logits(logits, truth, reduction="none")  # log p_t
            shape = (1, -1) + (1,) * (logits.ndim - 2)
            weight = valid if self.class_weights is None else valid * self.class_weights.view(shape)
            weight = weight.expand_as(log_p)
        else:
            log_p_all = torch.log_softmax(logits, 1)
            index = target[:, :1].long().clamp_min(0)
            log_p = log_p_all.gather(1, index)
            weight = valid if self.class_weights is None else valid * self.class_weights[index]
        modulation = (1 - log_p.exp()).clamp_min(0) ** self.gamma if self.gamma else 1.0
        total = weight.sum()
        if total == 0:  # every voxel ignored: no signal, but keep the graph
            return logits.sum() * 0
        return -(modulation * log_p * weight).sum() / total


class BoundaryLoss(nn.Module):
    """``mean(p_c * phi_c)`` with ``phi_c`` the signed distance map of the target (see module doc)."""

    def __init__(self, regions: bool) -> None:
        super().__init__()
        self.regions = regions

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = _valid_mask(target)
        if self.regions:
            probs, truth = torch.sigmoid(logits), target.clamp_min(0)
        else:
            probs = torch.softmax(logits, 1)[:, 1:]
            truth = _one_hot(target, logits.shape[1])[:, 1:]
        distance = torch.from_numpy(signed_distance(truth.detach().cpu().numpy() > 0)).to(probs.device)
        return (probs * distance * valid).mean()


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance (voxels) to the border of each ``mask[b, c]``: < 0 inside, > 0 outside.

    An empty (or full) channel has no border and gets zeros, so it adds nothing to the loss.
    """
    out = np.zeros(mask.shape, dtype=np.float32)
    for b in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            inside = mask[b, c]
            if inside.any() and not inside.all():
                out[b, c] = ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)
    return out


class CombinedLoss(nn.Module):
    """Weighted sum of named terms; ``last_terms`` keeps each term's value for logging."""

    def __init__(self, terms: Mapping[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: module for name, (_, module) in terms.items()})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for name, module in self.terms.items():
            if self.weights[name]:
                total = total + self.weights[name] * module(logits, target)
        return total


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of an encoded target to a spatial ``shape``."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest").to(target.dtype)


def anatomical_prior_loss(prior_logits: torch.Tensor, target: torch.Tensor, regions: bool) -> torch.Tensor:
    """The anatomical prior's own term (:mod:`autoseg.networks.prior`): binary cross-entropy of its
    low-resolution logits against the fraction of each prior cell that each output channel covers
    (the target average-pooled to the prior's grid), ignored voxels left out of the fraction.

    A probability per structure and place, not a class decision: each channel is scored alone,
    background included for softmax outputs.
    """
    logits = prior_logits.float()
    valid = _valid_mask(target)
    truth = target.clamp_min(0).float() * valid if regions else _one_hot(target, logits.shape[1])
    pool = F.adaptive_avg_pool2d if logits.ndim == 4 else F.adaptive_avg_pool3d
    covered = pool(valid, logits.shape[2:])  # the valid fraction of each cell
    fraction = (pool(truth, logits.shape[2:]) / covered.clamp_min(1e-6)).clamp(0.0, 1.0)
    bce = F.binary_cross_entropy_with_logits(logits, fraction, reduction="none")
    return (bce * covered).sum() / (covered.sum() * logits.shape[1]).clamp_min(1e-6)


def prior_loss_term(network: nn.Module, target: torch.Tensor, label_info: LabelInfo) -> torch.Tensor | float:
    """The weighted prior term of the network's last training forward; 0 for a network without a prior.

    The prior's logits are taken from the network once (so a step's graph is not kept alive).
    """
    prior_logits = getattr(network, "prior_logits", None)
    if prior_logits is None:
        return 0.0
    network.prior_logits = None
    return network.prior_loss_weight * anatomical_prior_loss(prior_logits, target, label_info.is_regions)


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to each output (highest resolution first) with a weight per output.

    A single tensor (deep supervision off, or evaluation mode) is scored at weight 1. The
    highest-resolution-only terms (boundary) are applied by ``first_only``.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None,
                 first_only: nn.Module | None = None, first_only_weight: float = 0.0) -> None:
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.first_only = first_only
        self.first_only_weight = first_only_weight

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outputs))
        if len(outputs) == 1:
            weights = (1.0,)
        elif len(weights) != len(outputs):
            raise LossConfigError(f"deep_supervision_weights has {len(weights)} entries but the network "
                                  f"returns {len(outputs)} outputs")
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, output in zip(weights, outputs):
            # Terms of weight 0 are still computed: every output head then takes part in the
            # graph, which DistributedDataParallel requires (nnU-Net sets a weight of 1e-6).
            total = total + weight * self.loss(output, downsample_target(target, output.shape[2:]))
        if self.first_only is not None and self.first_only_weight:
            total = total + self.first_only_weight * self.first_only(outputs[0], target)
        return total


def build_loss(schedule: Schedule, topology: Topology, label_info: LabelInfo) -> nn.Module:
    """The training loss named by ``schedule.loss`` with ``schedule.loss_options``.

    Names: ``dice_ce`` (default), ``dice``, ``ce``, ``focal``, ``dice_focal``; for region outputs
    "ce" is binary cross-entropy. Options: see :data:`LOSS_OPTIONS`.

    Raises:
        LossConfigError: unknown name or option, or class weights of the wrong length.
    """
    options: dict[str, Any] = dict(schedule.loss_options)
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise LossConfigError(f"unknown loss option(s) {unknown}; known: {sorted(LOSS_OPTIONS)}")
    if schedule.loss not in LOSS_NAMES:
        raise LossConfigError(f"unknown loss {schedule.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
    label_info.check_network(topology.num_classes)
    class_weights = options.get("class_weights")
    ce_class_weights = options.get("ce_class_weights", class_weights)
    for name, weights in (("class_weights", class_weights), ("ce_class_weights", ce_class_weights)):
        if weights is not None and len(weights) != label_info.num_outputs:
            raise LossConfigError(f"{name} has {len(weights)} entries, the network has "
                                  f"{label_info.num_outputs} outputs {list(label_info.names)}")
    regions = label_info.is_regions
    batch_dice = bool(options.get("batch_dice", topology.dim == 2))
    dice = SoftDiceLoss(regions, batch_dice, float(options.get("smooth", DEFAULT_SMOOTH)), class_weights)
    gamma = 0.0 if schedule.loss in ("dice_ce", "ce") else float(options.get("focal_gamma", DEFAULT_FOCAL_GAMMA))
    voxelwise = FocalLoss(regions, gamma, ce_class_weights)
    dice_weight = float(options.get("dice_weight", 1.0))
    ce_weight = float(options.get("ce_weight", 1.0))
    terms = {
        "dice_ce": {"dice": (dice_weight, dice), "ce": (ce_weight, voxelwise)},
        "dice_focal": {"dice": (dice_weight, dice), "focal": (ce_weight, voxelwise)},
        "dice": {"dice": (1.0, dice)},
        "ce": {"ce": (1.0, voxelwise)},
        "focal": {"focal": (1.0, voxelwise)},
    }[schedule.loss]
    weights = tuple(schedule.deep_supervision_weights) or None
    boundary = float(options.get("boundary", 0.0))
    return DeepSupervisionLoss(CombinedLoss(terms), weights, BoundaryLoss(regions) if boundary else None,
                               boundary)
