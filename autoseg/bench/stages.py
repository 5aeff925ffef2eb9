"""The benchmark's stages, each run by :func:`run_stage` in a fresh Python process of its own.

``python -m autoseg.bench.stages STAGE PARAMS.json RESULT.json`` runs one stage. Each stage function
imports its autoseg stage itself: the process's memory is measured, so it must hold what that
stage needs and nothing more.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoseg.bench.measure import WARMUP_RUNS, Measured, run_measured
from autoseg.errors import AutosegError
from autoseg.processes import exit_with_parent
from autoseg.utils import atomic_write_json, read_json


class BenchmarkError(AutosegError, RuntimeError):
    """A benchmark stage failed; the message says which stage and why."""


def _cuda_peak(device: str) -> dict[str, Any]:
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return {}
    return {"peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3),
            "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / 1024 ** 3, 3)}


def _stage_plan(params: dict[str, Any]) -> dict[str, Any]:
    from autoseg.planning import plan_dataset

    dataset, work = Path(params["dataset"]), Path(params["work"])
    scratch = work.parent / f"{work.name}_plan_runs"
    seconds = []
    for run in range(WARMUP_RUNS + params["repeats"]):
        # The warm-up writes the plan the later stages use; measured runs start from empty folders.
        target = work if run < WARMUP_RUNS else scratch / f"run_{run}"
        started = time.perf_counter()
        plan_dataset(dataset, target, n_jobs=params.get("n_jobs"), force_fingerprint=True, progress=False,
                     **params.get("plan_options", {}))
        elapsed = time.perf_counter() - started
        if run >= WARMUP_RUNS:
            seconds.append(elapsed)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": seconds}


def _stage_preprocess(params: dict[str, Any]) -> dict[str, Any]:
    from autoseg.preprocessing import preprocess_dataset

    runs: list[dict[str, Any]] = []
    for run in range(WARMUP_RUNS + params["repeats"]):
        started = time.perf_counter()
        summaries = preprocess_dataset(params["work"], configurations=params.get("configurations"),
                                       n_jobs=params.get("n_jobs"), force=True, progress=False,
                                       device=params["device"])
        elapsed = time.perf_counter() - started
        if run >= WARMUP_RUNS:
            runs.append({"seconds": elapsed, "configurations": {
                name: {"seconds": s.seconds, "cases": len(s.processed)} for name, s in summaries.items()}})
    return {"runs": runs}


def _stage_train(params: dict[str, Any]) -> dict[str, Any]:
    import torch

    from autoseg.training import TrainOverrides, train
    from autoseg.workdir import WorkDir

    work, name, device = Path(params["work"]), params["configuration"], params["device"]
    fold_dir = WorkDir(work).fold(name, "all")
    shutil.rmtree(fold_dir, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    overrides = TrainOverrides(epochs=WARMUP_RUNS + params["repeats"], iterations_per_epoch=params["iterations"],
                               validation_iterations=0, checkpoint_every=10_000)
    started = time.perf_counter()
    folder = train(work, name, "all", overrides=overrides, device=device, workers=params.get("workers"),
                   progress=False)
    elapsed = time.perf_counter() - started
    log_path = folder / "training_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return {"log": log, "total_seconds": elapsed, **_cuda_peak(device)}


def _stage_predict(params: dict[str, Any]) -> dict[str, Any]:
    from autoseg.inference import predict_folder

    output = Path(params["output"])
    case_dirs = [Path(p) for p in params["case_dirs"]]
    seconds: list[float] = []
    per_case: dict[str, list[float]] = {}
    # The warm-up predicts the first case once; then every case is predicted `repeats` times.
    runs = [(case_dirs[0], False)] * WARMUP_RUNS + [(d, True) for _ in range(params["repeats"]) for d in case_dirs]
    for case_dir, measured in runs:
        started = time.perf_counter()
        predict_folder(params["work"], case_dir, output / case_dir.name, configuration=params["configuration"],
                       folds=["all"], device=params["device"], tta=params["tta"], step=params.get("step", 0.5),
                       overwrite=True, checkpoint="latest", progress=False, runtime=params.get("runtime", "torch"))
        elapsed = time.perf_counter() - started
        if measured:
            seconds.append(elapsed)
            per_case.setdefault(case_dir.name, []).append(elapsed)
    return {"seconds": seconds, "per_case": per_case, **_cuda_peak(params["device"])}


_STAGE_FUNCTIONS = {"plan": _stage_plan, "preprocess": _stage_preprocess, "train": _stage_train,
                    "predict": _stage_predict}


def _stage_main(argv: Sequence[str]) -> int:
    """``python -m autoseg.bench.stages STAGE PARAMS.json RESULT.json`` (what :func:`run_stage` starts)."""
    if len(argv) != 3 or argv[0] not in _STAGE_FUNCTIONS:
        print(f"usage: python -m autoseg.bench.stages {{{','.join(_STAGE_FUNCTIONS)}}} PARAMS.json RESULT.json",
              file=sys.stderr)
        return 2
    stage, params_path, result_path = argv
    params = read_json(params_path)
    assert isinstance(params, dict)
    # run_measured starts this process in a session of its own (so a timeout can end its whole
    # group); it must still end when the benchmark does, even a benchmark killed with -9
    exit_with_parent(int(params.get("parent_pid", os.getppid())), parent_death_signal=True)
    result = _STAGE_FUNCTIONS[stage](params)
    atomic_write_json(result_path, result)
    return 0


def run_stage(stage: str, params: Mapping[str, Any], folder: str | os.PathLike,
              timeout: float | None = None) -> tuple[dict[str, Any], Measured]:
    """Run one stage in a fresh Python process; return its result and the process measurement.

    Raises:
        BenchmarkError: the stage process failed (the message holds the end of its output).
    """
    folder = Path(folder)
    runtime = params.get("runtime", "torch")
    tag = (f"{stage}_{params.get('configuration', '')}_{'tta' if params.get('tta') else ''}"
           f"{'' if runtime == 'torch' else '_' + runtime}").replace("__", "_").rstrip("_")
    params_path, result_path = folder / f"{tag}.params.json", folder / f"{tag}.result.json"
    atomic_write_json(params_path, {**params, "parent_pid": os.getpid()})
    result_path.unlink(missing_ok=True)
    measured = run_measured([sys.executable, "-m", "autoseg.bench.stages", stage, params_path, result_path],
                            log_path=folder / f"{tag}.log", timeout=timeout)
    if measured.returncode != 0 or not result_path.is_file():
        raise BenchmarkError(f"stage {stage} failed (exit code {measured.returncode}); see {folder / f'{tag}.log'}"
                             f"\n{measured.output_tail[-2000:]}")
    result = read_json(result_path)
    assert isinstance(result, dict)
    return result, measured


if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))
