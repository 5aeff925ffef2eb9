"""Training within a wall-clock budget: ``autoseg train ... --time-budget 30m``.

The plan's schedule counts epochs; a user counts minutes. With a budget the trainer measures its
own speed in the first iterations and refits the schedule to the time left:

1. after :data:`MEASURED_ITERATIONS` timed iterations (the first one, with its warm-up, is not
   timed) it knows the seconds per iteration ``s``. What one epoch costs is
   ``iterations * s + validation_iterations * s * FORWARD_SHARE``; the end-of-fold validation
   (sliding window with mirroring over the held-out cases) is estimated from the tile count of
   those cases, and set aside first.
2. the iterations that fit are spread over at least :data:`MIN_EPOCHS` epochs (fewer iterations
   per epoch when the plan's epochs are longer than that allows), so the learning rate still
   decays in steps and checkpoints come often; never more epochs or iterations than the plan asks.
3. after every epoch the number of epochs is refitted from the measured epoch times, so a machine
   that slows down or speeds up moves the end, and the poly learning rate follows the new length.
4. if an epoch would still overrun (the machine slowed down sharply) the epoch stops early and is
   the last one: the run ends on time with a validated model.

The functions here are pure (numbers in, numbers out) so they are tested without training.

Example:
    >>> parse_duration("1h30m")
    5400.0
    >>> fit_schedule(1800, 4.0, plan_epochs=1000, plan_iterations=250, validation_iterations=50,
    ...              final_validation_seconds=120)
    BudgetFit(epochs=20, iterations_per_epoch=19, validation_iterations=4)
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from autoseg.training.errors import TrainingError

MEASURED_ITERATIONS = 3  # timed iterations before the first fit
MIN_EPOCHS = 20  # enough poly-decay steps and checkpoints for any budget
FORWARD_SHARE = 1 / 3  # a forward pass costs about a third of forward + backward + step
SAFETY = 0.97  # plan to finish with 3% of the budget to spare
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])")


def parse_duration(text: str) -> float:
    """Seconds in ``"30m"``, ``"2h"``, ``"1h30m"``, ``"90s"``, ``"1.5h"`` or a bare number of minutes.

    Raises:
        TrainingError: not a positive duration.
    """
    value = text.strip().lower()
    try:
        seconds = float(value) * 60.0
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or _DURATION.sub("", value).strip():
            raise TrainingError(f"time budget {text!r}: write it like 30m, 2h, 1h30m or 90s") from None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not seconds > 0:
        raise TrainingError(f"time budget {text!r} must be longer than 0")
    return seconds


def format_duration(seconds: float) -> str:
    """``"1h05m"``, ``"12m30s"`` or ``"45s"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class BudgetFit:
    """The schedule that fits: ``epochs`` of ``iterations_per_epoch`` (and validation batches)."""

    epochs: int
    iterations_per_epoch: int
    validation_iterations: int


def _training_seconds(seconds_left: float, final_validation_seconds: float) -> float:
    """What the training may spend: the time left, less the safety margin and the final validation."""
    return max(0.0, seconds_left * SAFETY - final_validation_seconds)


def fit_schedule(seconds_left: float, seconds_per_iteration: float, plan_epochs: int, plan_iterations: int,
                 validation_iterations: int, final_validation_seconds: float, done_epochs: int = 0,
                 done_iterations: int = 0, min_epochs: int = MIN_EPOCHS) -> BudgetFit:
    """The first fit, from the speed measured in the first iterations (see the module docstring).

    ``seconds_left`` counts from now. ``done_epochs`` finished epochs and ``done_iterations`` of the
    current one are kept; ``plan_epochs`` and ``plan_iterations`` are upper bounds. Validation
    batches shrink in proportion to the iterations.
    """
    if not seconds_per_iteration > 0:
        raise ValueError(f"seconds_per_iteration must be > 0, got {seconds_per_iteration}")
    usable = _training_seconds(seconds_left, final_validation_seconds)
    validation_share = validation_iterations / plan_iterations * FORWARD_SHARE
    epochs_left = max(1, plan_epochs - done_epochs)
    total = done_iterations + int(usable / (seconds_per_iteration * (1 + validation_share)))
    total = min(total, epochs_left * plan_iterations)
    per_epoch = max(1, min(plan_iterations, total // min(epochs_left, max(1, min_epochs))))
    epochs = max(1, min(epochs_left, total // per_epoch))
    validation = min(validation_iterations, math.ceil(validation_iterations * per_epoch / plan_iterations))
    return BudgetFit(done_epochs + epochs, per_epoch, validation)


def refit_epochs(seconds_left: float, epoch_seconds: Sequence[float], done_epochs: int, plan_epochs: int,
                 final_validation_seconds: float) -> int:
    """Total epochs after ``done_epochs`` finished ones, from the measured epoch times.

    The first epoch of a run carries the warm-up (worker start, first reads), so it is left out
    once a later one has been measured; the median of the rest is robust to one slow epoch.
    """
    times = list(epoch_seconds[1:] if len(epoch_seconds) > 1 else epoch_seconds)
    if not times:
        return plan_epochs
    times.sort()
    per_epoch = times[len(times) // 2]
    usable = _training_seconds(seconds_left, final_validation_seconds)
    return max(done_epochs, min(plan_epochs, done_epochs + int(usable / per_epoch)))


def sliding_window_seconds(tile_counts: Sequence[float], mirrorings: int, seconds_per_iteration: float,
                           batch_size: int) -> float:
    """Estimated seconds of the end-of-fold validation: every tile, every mirrored copy, forward only."""
    per_tile = seconds_per_iteration / batch_size * FORWARD_SHARE
    return sum(tile_counts) * mirrorings * per_tile


def approximate_tiles(shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> float:
    """About how many sliding-window tiles cover ``shape`` (``(Z, Y, X)``; a 2D patch tiles each slice).

    Only an estimate for the budget: tiles overlap so that one lies every ``step * patch``.
    """
    spatial = list(shape[-len(patch_size):])
    slices = math.prod(shape[:-len(patch_size)]) if len(patch_size) < len(shape) else 1
    return slices * math.prod(max(1.0, size / (patch * step)) for size, patch in zip(spatial, patch_size))


@dataclass
class TimeBudget:
    """The state of one run's budget: when it ends, what bounds the fit, what was measured.

    The trainer feeds it the seconds of each iteration and epoch and applies what it returns.
    """

    deadline: float  # time.monotonic() at which the run must have ended
    max_epochs: int  # the plan's schedule with the run's overrides: the fit never exceeds it
    max_iterations: int
    max_validation_iterations: int
    final_validation: float = 0.0  # estimated seconds of the end-of-fold validation
    timed: list[float] = field(default_factory=list)  # seconds of this run's first iterations
    epoch_seconds: list[float] = field(default_factory=list)
    seconds_per_iteration: float | None = None  # set by the first fit

    def left(self) -> float:
        """Seconds until the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    def observe(self, seconds: float) -> float | None:
        """Record one iteration; the seconds per iteration once enough are timed (then once only)."""
        if self.fitted:
            return None
        self.timed.append(seconds)
        if len(self.timed) <= MEASURED_ITERATIONS:  # the first one carries the warm-up
            return None
        self.seconds_per_iteration = statistics.median(self.timed[1:])
        return self.seconds_per_iteration

    @property
    def fitted(self) -> bool:
        return self.seconds_per_iteration is not None

    def fit(self, seconds_per_iteration: float, done_epochs: int, done_iterations: int) -> BudgetFit:
        """The schedule that fits the time left (after the final validation is estimated)."""
        return fit_schedule(self.left(), seconds_per_iteration, self.max_epochs, self.max_iterations,
                            self.max_validation_iterations, self.final_validation, done_epochs, done_iterations)

    def overdue(self) -> bool:
        """Whether one more iteration would eat into the end-of-fold validation's time: stop now."""
        if self.seconds_per_iteration is None:
            return False
        return self.left() - self.final_validation < self.seconds_per_iteration

    def refit(self, epoch_seconds: float, done_epochs: int) -> int:
        """Total epochs after an epoch of ``epoch_seconds`` (``done_epochs`` finished, it included)."""
        self.epoch_seconds.append(epoch_seconds)
        return refit_epochs(self.left(), self.epoch_seconds, done_epochs, self.max_epochs, self.final_validation)
