"""Local per-case work (autoseg.cluster.run_cases): worker processes only where they pay for their start."""

from __future__ import annotations

import doctest
import os
import time

import pytest
from joblib import delayed

import autoseg.cluster as cluster
from autoseg.cluster import WORKER_START_ENV, ClusterError, run_cases, worker_start_seconds, workers_pay


def where(index: int, seconds: float = 0.0) -> tuple[int, int]:
    time.sleep(seconds)
    return index, os.getpid()


def fails(index: int) -> None:
    raise ValueError(f"case {index} is broken")


def test_the_cost_rule_and_its_examples() -> None:
    assert doctest.testmod(cluster).failed == 0
    assert not workers_pay(10.0, 5, 1, 0.0)  # one worker: its start is pure cost
    assert not workers_pay(10.0, 1, 8, 0.0)  # one task left: nothing to share
    assert workers_pay(1.0, 10, 2, 4.9) and not workers_pay(1.0, 10, 2, 5.0)  # 4.9 + 5 < 10; 5 + 5 is not


def test_small_work_stays_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_START_ENV, raising=False)
    results = list(run_cases((delayed(where)(i) for i in range(6)), n_jobs=2))
    assert [index for index, _ in results] == list(range(6))
    assert {pid for _, pid in results} == {os.getpid()}


@pytest.mark.parametrize("unordered", [False, True])
def test_work_that_pays_goes_to_workers_after_the_first_case(monkeypatch: pytest.MonkeyPatch,
                                                             unordered: bool) -> None:
    monkeypatch.setenv(WORKER_START_ENV, "0.05")  # a first case of 0.2 s: 5 more cost 1 s alone
    tasks = [delayed(where)(0, 0.2)] + [delayed(where)(i) for i in range(1, 6)]
    results = list(run_cases(tasks, n_jobs=2, unordered=unordered))
    assert results[0] == (0, os.getpid())  # the timed first case
    indices = [index for index, _ in results[1:]]
    assert (sorted(indices) if unordered else indices) == list(range(1, 6))
    assert os.getpid() not in {pid for _, pid in results[1:]}


def test_an_error_comes_back_as_itself_from_this_process_and_from_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="case 0 is broken"):
        list(run_cases([delayed(fails)(0), delayed(where)(1)], n_jobs=2))
    monkeypatch.setenv(WORKER_START_ENV, "0")
    with pytest.raises(ValueError, match="case 2 is broken"):
        list(run_cases([delayed(where)(0, 0.05), delayed(where)(1), delayed(fails)(2)], n_jobs=2))


def test_the_start_cost_can_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_START_ENV, raising=False)
    assert worker_start_seconds() == cluster.WORKER_START_SECONDS
    monkeypatch.setenv(WORKER_START_ENV, "0")
    assert worker_start_seconds() == 0.0
    for bad in ("soon", "-1"):
        monkeypatch.setenv(WORKER_START_ENV, bad)
        with pytest.raises(ClusterError, match=WORKER_START_ENV):
            worker_start_seconds()
