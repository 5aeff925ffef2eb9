"""Training monitoring: per-epoch pseudo-Dice, the JSON-lines log and ``progress.png``.

Pseudo-Dice is nnU-Net's cheap validation signal: TP, FP and FN of the thresholded network
output on the validation patches, summed over every validation batch of the epoch, then
``2 TP / (2 TP + FP + FN)`` per scored class (``None`` when the class appears in neither the
prediction nor the target). The best checkpoint follows an exponential moving average of its
mean over classes, ``ema = 0.9 ema + 0.1 mean`` (the first epoch's mean starts it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from autoseg.training.labels import IGNORE_INDEX, LabelInfo
from autoseg.utils import atomic_write, atomic_write_text

EMA_DECAY = 0.9


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, label_info: LabelInfo) -> torch.Tensor:
    """``(3, scored classes)`` float64 tensor of TP, FP, FN over a batch (ignored voxels excluded)."""
    valid = target[:, :1] != IGNORE_INDEX
    channels = list(label_info.scored_channels)
    if label_info.is_regions:
        predicted = logits[:, channels] > 0
        truth = target[:, channels] > 0
    else:
        classes = torch.tensor(channels, device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        predicted = logits.argmax(1, keepdim=True) == classes
        truth = target[:, :1] == classes
    predicted = predicted & valid
    truth = truth & valid
    axes = [0, *range(2, logits.ndim)]
    tp = (predicted & truth).sum(axes)
    fp = (predicted & ~truth).sum(axes)
    fn = (~predicted & truth).sum(axes)
    return torch.stack([tp, fp, fn]).to(torch.float64)


def pseudo_dice(counts: torch.Tensor, label_info: LabelInfo) -> dict[str, float | None]:
    """Per scored class name, Dice from accumulated :func:`confusion_counts` (None if undefined)."""
    tp, fp, fn = (counts[i].tolist() for i in range(3))
    names = [label_info.names[c] for c in label_info.scored_channels]
    return {name: (2 * t / (2 * t + p + n) if 2 * t + p + n > 0 else None)
            for name, t, p, n in zip(names, tp, fp, fn)}


def mean_defined(values: dict[str, float | None]) -> float | None:
    """Mean of the defined values (None if there are none)."""
    defined = [v for v in values.values() if v is not None]
    return sum(defined) / len(defined) if defined else None


def update_ema(ema: float | None, value: float | None) -> float | None:
    """One EMA step; an undefined value leaves the EMA unchanged."""
    if value is None:
        return ema
    return value if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * value


def write_log(path: str | os.PathLike, entries: Sequence[dict[str, Any]]) -> Path:
    """Write the whole log as JSON lines (rewritten atomically, so a resumed run never duplicates)."""
    return atomic_write_text(path, "".join(json.dumps(e, allow_nan=False) + "\n" for e in entries))


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``training_log.jsonl``."""
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return entries


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: undefined or non-finite numbers become None."""
    return None if value is None or not math.isfinite(value) else float(value)


def plot_progress(path: str | os.PathLike, entries: Sequence[dict[str, Any]]) -> Path:
    """Losses, pseudo-Dice (with its EMA), learning rate and epoch time, one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # no automatic layout engine: it costs about a second per plot, and this runs every epoch
    figure = Figure(figsize=(9, 9))
    figure.subplots_adjust(left=0.09, right=0.97, top=0.98, bottom=0.06, hspace=0.12)
    FigureCanvasAgg(figure)
    losses, dice, lr, timing = figure.subplots(4, 1, sharex=True)
    epochs = [e["epoch"] for e in entries]

    def series(key: str) -> list[float]:
        return [math.nan if e.get(key) is None else e[key] for e in entries]

    losses.plot(epochs, series("train_loss"), label="train loss")
    losses.plot(epochs, series("val_loss"), label="validation loss")
    losses.set_ylabel("loss")
    losses.legend(loc="upper right")
    names = list(entries[-1].get("pseudo_dice", {})) if entries else []
    for name in names:
        values = [math.nan if e.get("pseudo_dice", {}).get(name) is None else e["pseudo_dice"][name]
                  for e in entries]
        dice.plot(epochs, values, linestyle=":", label=f"pseudo-Dice {name}")
    dice.plot(epochs, series("ema_pseudo_dice"), color="black", label="EMA of mean pseudo-Dice")
    dice.set_ylabel("pseudo-Dice")
    dice.set_ylim(0, 1)
    dice.legend(loc="lower right", fontsize="small")
    lr.plot(epochs, series("lr"))
    lr.set_ylabel("learning rate")
    timing.plot(epochs, series("epoch_time"), label="epoch")
    timing.plot(epochs, series("data_time"), label="waiting for data")
    timing.set_ylabel("seconds")
    timing.set_xlabel("epoch")
    timing.legend(loc="upper right")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=80))


def epoch_line(entry: dict[str, Any], epochs: int) -> str:
    """The one line printed after each epoch."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    dice = ", ".join(f"{k} {number(v)}" for k, v in entry["pseudo_dice"].items())
    return (f"epoch {entry['epoch'] + 1}/{epochs}: train loss {number(entry['train_loss'])}, validation loss "
            f"{number(entry['val_loss'])}, pseudo-Dice [{dice}] (EMA {number(entry['ema_pseudo_dice'])}), "
            f"lr {entry['lr']:.2e}, {entry['epoch_time']:.1f} s ({entry['data_time']:.1f} s waiting for data)")
