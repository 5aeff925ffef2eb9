"""Training: ``train(work, configuration, fold, overrides) -> Path`` (see :mod:`autoseg.training.loop`).

Small parts, each usable alone: :mod:`.splits` (cross-validation), :mod:`.data` (patch batches and
background loading), :mod:`.augment` (augmentation), :mod:`.labels` (targets), :mod:`.losses`,
:mod:`.checkpoint`, :mod:`.monitor` (log, pseudo-Dice, progress plot), :mod:`.distributed`
(torchrun) and :mod:`.validation` (end-of-fold prediction and scores).
"""

from __future__ import annotations

from autoseg.training.loop import TrainingError, TrainOverrides, poly_lr, train

__all__ = ["TrainOverrides", "TrainingError", "poly_lr", "train"]
