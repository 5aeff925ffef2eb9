"""Prediction of a folder on a Dask cluster or several GPUs: one case per task, one loaded model per worker.

``autoseg predict ... --scheduler ADDRESS`` (or ``--devices cuda:0 cuda:1``, a local cluster with
one worker per device) hands every case still to do to the cluster (:func:`predict_on_cluster`).
Each worker builds a :class:`~autoseg.inference.Predictor` on its first case and keeps it for the
next ones (:func:`worker_predictor`); the case then takes the same path as in a local run (read,
preprocess, sliding window, TTA, ensemble, restore, :func:`~autoseg.inference.folder.write_case`),
so the files are the same.

Workers read the model folder and the inputs and write the outputs themselves: the three must be
on storage every worker sees (docs/scale.md). Every output is written under a temporary name and
renamed, and a task first checks whether its case is already written: a worker killed mid-case
leaves no half-written file, the scheduler re-runs its cases on the other workers, and a case
finished just before its worker died is not written again.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from autoseg.dataset import CaseFiles, load_case
from autoseg.inference.predictor import Predictor

_PREDICTORS: dict[tuple, Predictor] = {}
_PREDICTORS_LOCK = threading.Lock()


@dataclass(frozen=True)
class PredictorOptions:
    """What every worker needs to build the same :class:`Predictor` (plain values: sent to the workers)."""

    model_dir: str
    configuration: str | None
    folds: tuple[int | str, ...] | None
    tta: bool
    checkpoint: str
    precision: str
    step: float
    runtime: str
    device: str = "auto"


@dataclass(frozen=True)
class CaseWriter:
    """How the folder's outputs are checked and written (:mod:`autoseg.inference.folder`'s functions,
    passed in because that module starts the cluster)."""

    is_done: Callable[[Any], bool]
    write: Callable[..., Path]


@dataclass(frozen=True)
class CaseResult:
    """One task's outcome, sent back to the command."""

    case_id: str
    error: str | None
    worker: str
    seconds: float
    skipped: bool = False


def worker_predictor(options: PredictorOptions, device: str | None = None) -> Predictor:
    """This worker process's predictor for ``options``, built on first use and kept for later cases."""
    key = (options, device)
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            _PREDICTORS[key] = Predictor.from_model(
                options.model_dir, options.configuration, list(options.folds) if options.folds else None,
                device or options.device, options.tta, options.checkpoint, options.precision, options.step,
                options.runtime)  # type: ignore[arg-type]
        return _PREDICTORS[key]


def _worker_device(devices: Sequence[str] | None) -> str | None:
    """The device of this worker when the cluster was started with ``--devices`` (workers named 0, 1, ...)."""
    if not devices:
        return None
    from distributed import get_worker

    return devices[int(get_worker().name) % len(devices)]


def predict_case_task(options: PredictorOptions, case: CaseFiles, outputs: Any, overwrite: bool,
                      devices: Sequence[str] | None, writer: CaseWriter) -> CaseResult:
    """One case on a worker: the whole local path, with the worker's cached predictor."""
    started = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if not overwrite and writer.is_done(outputs):  # written by an attempt whose worker died before reporting
        return CaseResult(case.case_id, None, worker, 0.0, skipped=True)
    try:
        predictor = worker_predictor(options, _worker_device(devices))
        prepared = predictor.prepare(load_case(case, load_label=False))
        labels, probabilities = predictor.infer(prepared, keep_probabilities=outputs.probabilities is not None)
        restored, full = predictor.restore(prepared, labels, probabilities)
        writer.write(predictor, prepared, outputs, restored, full)
    except Exception as error:  # reported per case, like a local run; the other cases go on
        files = ", ".join(str(p) for p in case.images)
        return CaseResult(case.case_id, f"{case.case_id} ({files}): {type(error).__name__}: {error}", worker,
                          time.perf_counter() - started)
    return CaseResult(case.case_id, None, worker, time.perf_counter() - started)


def predict_on_cluster(client: Any, options: PredictorOptions, cases: Sequence[CaseFiles], outputs: dict[str, Any],
                       overwrite: bool, writer: CaseWriter, devices: Sequence[str] | None = None,
                       progress: bool = True) -> dict[str, str]:
    """Predict ``cases`` on the client's cluster; returns the failed cases' messages by case id.

    A progress bar follows the cases as they finish; the end prints cases per hour per worker.
    """
    from distributed import as_completed

    futures = [client.submit(predict_case_task, options, case, outputs[case.case_id], overwrite, devices, writer,
                             key=f"autoseg-predict-{case.case_id}-{os.getpid()}", pure=False)
               for case in cases]
    results: list[CaseResult] = []
    with tqdm(total=len(futures), desc="predict (cluster)", unit="case", disable=not progress) as bar:
        for future in as_completed(futures):
            results.append(future.result())
            bar.update(1)
    if progress:
        for line in throughput_lines(results):
            print(line)
    return {r.case_id: r.error for r in results if r.error is not None}


def throughput_lines(results: Sequence[CaseResult]) -> list[str]:
    """Cases per hour of each worker, from the seconds its cases took (skipped ones left out).

    >>> throughput_lines([CaseResult("a", None, "node1:7", 30.0), CaseResult("b", None, "node1:7", 30.0)])
    ['node1:7: 2 case(s), 120.0 cases/hour']
    """
    seconds: dict[str, list[float]] = defaultdict(list)
    for result in results:
        if not result.skipped and result.error is None:
            seconds[result.worker].append(result.seconds)
    return [f"{worker}: {len(times)} case(s), {3600 * len(times) / max(sum(times), 1e-9):.1f} cases/hour"
            for worker, times in sorted(seconds.items())]
