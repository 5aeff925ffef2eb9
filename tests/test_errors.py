"""Every user-facing error derives from AutosegError and travels between processes intact.

Worker processes (joblib in fingerprinting and preprocessing, ``concurrent.futures`` in
evaluation) send exceptions back pickled; an error that fails to unpickle turns into a
``BrokenProcessPool`` traceback instead of its own one-line message.
"""

from __future__ import annotations

import importlib
import inspect
import multiprocessing
import pickle
import pkgutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import autoseg
from autoseg.errors import AutosegError

# A value for every constructor parameter an error class takes; a new parameter needs one here.
SAMPLE_ARGUMENTS: dict[str, Any] = {
    "message": "something went wrong: /data/case_001.nii.gz",
    "path": "/data/case_001.nii.gz",
    "reason": "file is truncated",
    "problems": ["imagesTr/case_001_0000.nii.gz: empty file", "labelsTr/case_002.nii.gz: missing"],
    "case": "case_001",
    "worker_traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\n',
    "failures": {"case_001": "case_001: cannot be read"},
    "outputs": [Path("/predictions/case_000.nii.gz")],
    "summaries": {},
}

# The classes the CLI used to list by name, plus the rest: the module walk must find all of them.
KNOWN_ERRORS = {
    "AutosegError", "BenchmarkError", "CheckpointError", "CommandError", "ConversionError", "DataLoadingError",
    "DatasetError", "EvaluationError", "FingerprintError", "ImageReadError", "LabelError", "LossConfigError",
    "ModelArchiveError", "PlanError", "PostprocessingError", "PredictionError", "PreprocessingError",
    "SpecError", "SplitError", "TrainingError",
}


def all_error_classes() -> list[type[AutosegError]]:
    """AutosegError and every subclass defined in any autoseg module (each module imported)."""
    for module in pkgutil.walk_packages(autoseg.__path__, "autoseg."):
        importlib.import_module(module.name)
    found: list[type[AutosegError]] = []
    pending = [AutosegError]
    while pending:
        cls = pending.pop()
        if cls.__module__.startswith("autoseg.") and cls not in found:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def make_error(cls: type[AutosegError]) -> AutosegError:
    """An instance built from :data:`SAMPLE_ARGUMENTS`, the way the library would build it."""
    if not inspect.isfunction(cls.__init__):  # the built-in Exception.__init__: a message only
        return cls(SAMPLE_ARGUMENTS["message"])
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    missing = [p.name for p in parameters if p.name not in SAMPLE_ARGUMENTS]
    assert not missing, f"{cls.__name__}: add sample values for {missing} to SAMPLE_ARGUMENTS"
    return cls(**{p.name: SAMPLE_ARGUMENTS[p.name] for p in parameters})


def assert_same_error(copy: BaseException, original: AutosegError) -> None:
    assert type(copy) is type(original)
    assert str(copy) == str(original)
    assert copy.args == original.args
    assert vars(copy) == vars(original)


def raise_error(cls: type[AutosegError]) -> None:
    """Run in a worker process: raise the error there."""
    raise make_error(cls)


ERROR_CLASSES = all_error_classes()


def test_the_walk_finds_every_known_error() -> None:
    assert KNOWN_ERRORS <= {cls.__name__ for cls in ERROR_CLASSES}


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_error_survives_pickle(cls: type[AutosegError]) -> None:
    original = make_error(cls)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert_same_error(pickle.loads(pickle.dumps(original, protocol)), original)


def test_errors_come_back_from_worker_processes() -> None:
    # fork where there is one: the children need not import torch again, and the way back (the
    # pickled exception) is the same for every start method
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {cls: pool.submit(raise_error, cls) for cls in ERROR_CLASSES}
        for cls, future in futures.items():
            error = future.exception(timeout=60)
            assert_same_error(error, make_error(cls))
