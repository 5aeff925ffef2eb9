"""Per-case work on a Dask cluster: the same functions, run by the cluster's workers instead of local processes.

``--scheduler ADDRESS`` on ``plan``, ``preprocess`` and ``predict`` names the cluster:

- ``tcp://host:8786`` (or ``tls://``, ``ws://``, ``wss://``, ``inproc://``): a running
  ``dask.distributed`` scheduler, started by hand (``dask scheduler`` + ``dask worker``), by
  dask-jobqueue on SLURM or PBS, or by the Dask Kubernetes operator;
- ``local:N``: a local cluster of ``N`` worker processes, started and ended with the command.

Fingerprinting and preprocessing already run through joblib; joblib's ``dask`` backend hands its
tasks to the cluster (:func:`case_runner`), so there is no second code path for the per-case work:
the output is the same files, byte for byte, and a failing case names its file as it does locally.
Without ``--scheduler`` nothing here imports Dask. Dask is the optional extra
``autoseg[distributed]``; asking for a scheduler without it is a one-line error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from joblib import Parallel, parallel_config

from autoseg.errors import AutosegError
from autoseg.processes import exit_with_parent

INSTALL_HINT = "pip install 'autoseg[distributed]'"
_LOCAL = re.compile(r"^local:(?P<workers>\d+)$")
_REMOTE = re.compile(r"^(tcp|tls|ws|wss|inproc)://\S+$")
# A local worker process imports numpy, SimpleITK, scipy and torch before its first case: 1-4 s
# on one core. Starting workers only pays when the work they take over is larger.
WORKER_START_SECONDS = 3.0
WORKER_START_ENV = "AUTOSEG_WORKER_START_SECONDS"


class ClusterError(AutosegError):
    """A scheduler address that cannot be used, or Dask missing."""


@dataclass(frozen=True)
class Scheduler:
    """Where per-case tasks go: ``local_workers`` processes started here, or a running ``address``.

    >>> parse_scheduler("local:4")
    Scheduler(address=None, local_workers=4)
    >>> parse_scheduler("tcp://10.0.0.5:8786").address
    'tcp://10.0.0.5:8786'
    """

    address: str | None = None
    local_workers: int = 0


def parse_scheduler(text: str) -> Scheduler:
    """Read a ``--scheduler`` value: ``local:N`` or a scheduler URL such as ``tcp://host:8786``."""
    local = _LOCAL.match(text)
    if local:
        workers = int(local["workers"])
        if workers < 1:
            raise ClusterError(f"--scheduler {text}: a local cluster needs at least one worker (local:1)")
        return Scheduler(local_workers=workers)
    if _REMOTE.match(text):
        return Scheduler(address=text)
    raise ClusterError(f"--scheduler {text!r}: expected local:N (N worker processes here) or a scheduler "
                       "address such as tcp://host:8786")


def require_distributed() -> ModuleType:
    """``dask.distributed``, or a one-line error saying how to install it."""
    try:
        return importlib.import_module("dask.distributed")
    except ImportError:
        raise ClusterError(f"--scheduler needs Dask: {INSTALL_HINT}") from None


@contextlib.contextmanager
def connect(scheduler: str | Scheduler | None) -> Iterator[Any]:
    """A ``distributed.Client`` on the scheduler (None without one); a ``local:N`` cluster lives as long as the block.

    While the block runs, :func:`case_runner` hands its tasks to that client. A connection that
    fails names the address (a wrong host or port, or no scheduler running).
    """
    if scheduler is None:
        yield None
        return
    if isinstance(scheduler, str):
        scheduler = parse_scheduler(scheduler)
    distributed = require_distributed()
    with contextlib.ExitStack() as stack:
        if scheduler.address is None:
            # one thread per worker process: autoseg's per-case work is numpy and torch, which
            # thread themselves; several cases at once per process would fight for the cores
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=scheduler.local_workers, threads_per_worker=1, processes=True,
                dashboard_address=":0"))  # any free port: two commands may run at once
            address = cluster.scheduler_address
        else:
            address = scheduler.address
        try:
            client = stack.enter_context(distributed.Client(address, timeout="30s"))
        except OSError as error:
            raise ClusterError(f"--scheduler {address}: cannot connect ({error})") from None
        # joblib's Dask backend, registered on first use, sends tasks to the current client
        stack.enter_context(parallel_config(backend="dask"))
        yield client


def worker_start_seconds() -> float:
    """What starting a local worker process is taken to cost: :data:`WORKER_START_SECONDS`, or the
    environment variable ``AUTOSEG_WORKER_START_SECONDS`` (0: always start the workers ``-j`` asks for).
    """
    text = os.environ.get(WORKER_START_ENV)
    if text is None:
        return WORKER_START_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ClusterError(f"{WORKER_START_ENV}={text!r}: expected a number of seconds") from None
    if value < 0:
        raise ClusterError(f"{WORKER_START_ENV}={text!r}: expected a number of seconds >= 0")
    return value


def workers_pay(task_seconds: float, remaining_tasks: int, workers: int, start_seconds: float) -> bool:
    """Whether ``workers`` new processes finish ``remaining_tasks`` sooner than this process alone.

    The tasks are taken to last ``task_seconds`` each (the first one, timed here); the workers first
    spend ``start_seconds`` starting (importing numpy, SimpleITK, torch), in parallel.

    >>> workers_pay(0.2, 7, 2, 3.0)  # the example CT: 1.4 s of work left, less than the start
    False
    >>> workers_pay(2.0, 99, 2, 3.0)  # a real CT dataset
    True
    """
    workers = min(workers, remaining_tasks)
    if workers < 2:  # one worker only adds its start to the same work
        return False
    serial = task_seconds * remaining_tasks
    return start_seconds + serial / workers < serial


def run_cases(tasks: Iterable[Any], n_jobs: int, on_cluster: bool = False, unordered: bool = False) -> Iterator[Any]:
    """Results of joblib ``delayed`` tasks, one per case, as they finish (in order unless ``unordered``).

    On a cluster every task goes to it. Locally the first task runs in this process and is timed,
    and the others go to at most ``n_jobs`` worker processes only where :func:`workers_pay`: a
    small dataset is done before a pool of workers would have started (each imports numpy,
    SimpleITK and torch again), a large one gets its pool after the first case. Closing the
    generator (an error, Ctrl-C) stops the workers at once.
    """
    tasks = list(tasks)
    if on_cluster:
        yield from _closing(case_runner(n_jobs, True, unordered)(tasks))
        return
    if not tasks:
        return
    function, args, kwargs = tasks[0]
    started = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - started
    yield result
    rest = tasks[1:]
    if not workers_pay(seconds, len(rest), n_jobs, worker_start_seconds()):
        for function, args, kwargs in rest:
            yield function(*args, **kwargs)
        return
    yield from _closing(case_runner(min(n_jobs, len(rest)), False, unordered)(rest))


def _closing(outcomes: Generator[Any, None, None]) -> Iterator[Any]:
    try:
        yield from outcomes
    finally:
        outcomes.close()  # stops joblib's workers now, not when the generator is garbage-collected


def case_runner(n_jobs: int, on_cluster: bool = False, unordered: bool = False) -> Any:
    """A joblib ``Parallel`` running one task per case: local processes, or the cluster of :func:`connect`.

    Used by :func:`autoseg.fingerprint.compute_fingerprint` and
    :func:`autoseg.preprocessing.preprocess_dataset`; results come back as a generator (as they
    finish when ``unordered``), so progress bars follow them. On a cluster, ``n_jobs`` gives way
    to every worker the cluster has.
    """
    return_as = "generator_unordered" if unordered else "generator"
    if on_cluster:  # the backend is the one connect() configured
        return Parallel(n_jobs=-1, return_as=return_as)
    # local workers exit with this command even after kill -9, idle ones too (autoseg.processes)
    with parallel_config(backend="loky", initializer=exit_with_parent, initargs=(os.getpid(),)):
        return Parallel(n_jobs=n_jobs, return_as=return_as)
