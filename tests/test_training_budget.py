"""Training within a wall-clock budget: the pure fitting rules, and a real run that ends on time."""

from __future__ import annotations

import doctest
import json
import time
from pathlib import Path

import pytest
from test_training_support import cube_cases, make_work, tiny_plan

import autoseg.precision
import autoseg.training.budget as budget
from autoseg.training import TrainingError, train
from autoseg.training.budget import (
    MIN_EPOCHS,
    SAFETY,
    TimeBudget,
    approximate_tiles,
    fit_schedule,
    format_duration,
    parse_duration,
    refit_epochs,
)
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.monitor import read_log


@pytest.mark.parametrize("text, seconds", [
    ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400), ("45", 2700), (" 1d ", 86400),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "0m", "-5", "5m extra"])
def test_parse_duration_rejects_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(TrainingError, match="time budget"):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (45, 750, 3900, -3)] == ["45s", "12m30s", "1h05m", "0s"]


def test_fit_spends_the_budget_and_no_more() -> None:
    fit = fit_schedule(1800, 2.0, plan_epochs=1000, plan_iterations=250, validation_iterations=50,
                       final_validation_seconds=100)
    assert fit.epochs == MIN_EPOCHS  # short budget: at least MIN_EPOCHS epochs of fewer iterations
    per_epoch_seconds = fit.iterations_per_epoch * 2.0 + fit.validation_iterations * 2.0 / 3
    spent = fit.epochs * per_epoch_seconds + 100
    assert 0.9 * 1800 * SAFETY <= spent <= 1800 * SAFETY
    assert fit.validation_iterations * 250 >= 50 * fit.iterations_per_epoch  # in proportion, rounded up


def test_fit_never_exceeds_the_plan() -> None:
    fit = fit_schedule(10 ** 7, 0.1, plan_epochs=5, plan_iterations=10, validation_iterations=2,
                       final_validation_seconds=0)
    assert (fit.epochs, fit.iterations_per_epoch, fit.validation_iterations) == (5, 10, 2)


def test_fit_keeps_finished_epochs_and_counts_the_current_one() -> None:
    fit = fit_schedule(600, 1.0, plan_epochs=100, plan_iterations=50, validation_iterations=0,
                       final_validation_seconds=0, done_epochs=3, done_iterations=7)
    assert fit.epochs > 3
    assert (fit.epochs - 3) * fit.iterations_per_epoch <= 7 + 600 * SAFETY


def test_fit_of_a_budget_already_spent_still_gives_one_epoch() -> None:
    fit = fit_schedule(5, 10.0, plan_epochs=100, plan_iterations=50, validation_iterations=10,
                       final_validation_seconds=60)
    assert (fit.epochs, fit.iterations_per_epoch) == (1, 1)


def test_refit_uses_the_median_of_epochs_after_the_first() -> None:
    # the first epoch's warm-up (100 s) is ignored once later epochs exist; one slow epoch too
    assert refit_epochs(300, [100, 10, 10, 50], done_epochs=4, plan_epochs=1000,
                        final_validation_seconds=0) == 4 + int(300 * SAFETY / 10)
    assert refit_epochs(300, [30], done_epochs=1, plan_epochs=5, final_validation_seconds=0) == 5
    assert refit_epochs(-5, [30, 30], done_epochs=2, plan_epochs=5, final_validation_seconds=0) == 2


def test_time_budget_observes_then_fits_once(monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(budget.time, "monotonic", lambda: now[0])
    keeper = TimeBudget(deadline=1600.0, max_epochs=1000, max_iterations=250, max_validation_iterations=50)
    assert not keeper.overdue()  # nothing measured yet
    assert [keeper.observe(s) for s in (9.0, 1.0, 3.0)] == [None, None, None]
    assert keeper.observe(2.0) == 2.0  # median of the timed iterations after the warm-up one
    assert keeper.observe(2.0) is None  # fitted once
    assert not keeper.overdue()
    now[0] = 1599.0
    assert keeper.overdue()


def test_approximate_tiles() -> None:
    assert approximate_tiles((10, 100, 100), (50, 50)) == 10 * 4 * 4  # 2D patch: per slice
    assert approximate_tiles((20, 20, 20), (40, 40, 40)) == 1  # padded up to one tile


def test_examples_in_the_docstrings_run() -> None:
    for module in (budget, autoseg.precision):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.slow
def test_a_budgeted_run_ends_on_time_with_a_validated_model(tmp_path: Path) -> None:
    plan = tiny_plan(epochs=1000, iterations_per_epoch=250, validation_iterations=10)
    work = make_work(tmp_path / "work", plan, cube_cases(4))
    budget_seconds = 25.0
    started = time.monotonic()
    fold_dir = train(work, "3d_fullres", 0, workers=0, progress=False, num_threads=1, time_budget=budget_seconds)
    elapsed = time.monotonic() - started
    assert elapsed <= budget_seconds * 1.1  # start-up before the first iteration is inside the budget
    schedule = json.loads((fold_dir / "schedule.json").read_text())
    log = read_log(fold_dir / "training_log.jsonl")
    assert 1 < schedule["epochs"] < 1000 and schedule["iterations_per_epoch"] < 250
    assert len(log) == schedule["epochs"]  # every fitted epoch ran: the model is finished
    assert log[-1]["lr"] < 0.2 * log[0]["lr"]  # the poly decay ran its course within the budget
    assert (fold_dir / "validation" / "summary.json").is_file()
    assert load_checkpoint(fold_dir / "checkpoint_latest.pt")["schedule"]["epochs"] == schedule["epochs"]
    assert elapsed >= 0.5 * budget_seconds  # and the budget was used, not thrown away


def test_a_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="longer than 0"):
        train(tmp_path, "3d_fullres", 0, time_budget=0)
