"""``autoseg benchmark``: how fast autoseg runs on this machine, measured the same way every time.

Four stages are measured on one dataset (your own, or a generated example):

* **plan**: fingerprint + plan wall time (the fingerprint is recomputed every run);
* **preprocess**: cases per second for each planned configuration, all cases redone every run;
* **train**: iterations per second for each planned configuration, split into the time the loop
  waited for a batch (``data``) and the time of the network step (``network``: forward, loss,
  backward, optimizer step); on CUDA also the peak GPU memory next to the planner's estimate;
* **predict**: sliding-window inference seconds per case and input voxels per second, with and
  without mirroring test-time augmentation.

How each figure is taken, so numbers from different machines and versions compare:

* Every stage runs in a fresh Python process (``python -m autoseg.benchmark STAGE ...``) so that
  its memory is its own. The parent samples the memory of the stage's whole process tree (the stage
  and every process it starts: preprocessing workers, data-loading workers) from ``/proc`` every
  :data:`SAMPLE_INTERVAL` seconds, summing resident set sizes (RSS), and less often proportional
  set sizes (PSS: shared pages split between the processes that share them, the fairer figure when
  forked workers share libraries); see :class:`TreeMemorySampler`. It also keeps the peak RSS of
  the largest single process (from the same samples: ``wait4``'s ``ru_maxrss`` would count a large
  parent's memory in a forked child) and the CPU time of the tree (``wait4``).
* Inside the stage process each measurement runs once as a warm-up (imports, file caches, lazy
  CUDA and cuDNN initialisation, worker start) and then ``repeats`` times. Each figure is reported
  as ``{"median", "min", "max", "runs"}`` where ``runs`` lists every measured value.
* Training epochs are the repeats: epoch 0 is the warm-up, each later epoch of
  ``iterations_per_epoch`` iterations is one run; the times come from the trainer's own
  ``training_log.jsonl`` (``data_time`` and ``compute_time``).

The same process-tree measurement (:func:`run_measured`) is used by
``tests/benchmarks/compare_nnunet.py`` for nnU-Net's commands, so both frameworks are measured alike.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.utils import atomic_write_json, read_json

SCHEMA = "autoseg-benchmark/1"
SAMPLE_INTERVAL = 0.1
WARMUP_RUNS = 1
# Iterations per training epoch (one measured run): enough to average out batch-to-batch noise,
# few enough that `make bench` takes minutes on a laptop CPU.
DEFAULT_ITERATIONS = {"cpu": 2, "cuda": 25}
DEFAULT_EXAMPLE_CASES = {"ct": 8, "mri": 6, "2d": 12}
# Cases predicted per run: a full-size 3D case with mirroring takes minutes on a laptop CPU.
DEFAULT_INFERENCE_CASES = {"cpu": 1, "cuda": 3}
STAGES = ("plan", "preprocess", "train", "predict")
MIB = 1024 * 1024


class BenchmarkError(RuntimeError):
    """A benchmark stage failed; the message says which stage and why."""


# --- statistics -----------------------------------------------------------------------------------


def summarize(values: Iterable[float], digits: int = 6) -> dict[str, Any]:
    """``{"median", "min", "max", "runs"}`` of measured values (``runs``: every value, in order).

    Raises:
        ValueError: no values, or a value that is not a finite number.
    """
    runs = [float(v) for v in values]
    if not runs:
        raise ValueError("no measured values to summarize")
    if any(v != v or v in (float("inf"), float("-inf")) for v in runs):
        raise ValueError(f"measured values must be finite numbers, got {runs}")
    return {"median": round(statistics.median(runs), digits), "min": round(min(runs), digits),
            "max": round(max(runs), digits), "runs": [round(v, digits) for v in runs]}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def training_figures(log: Sequence[Mapping[str, Any]], warmup_epochs: int = WARMUP_RUNS) -> dict[str, Any]:
    """Training speed from the trainer's per-epoch log entries, the first ``warmup_epochs`` skipped.

    Each epoch entry needs ``iterations``, ``data_time`` (seconds waiting for batches) and
    ``compute_time`` (seconds in the network step). Every later epoch is one run.

    Raises:
        ValueError: no epoch left after the warm-up, or an entry without those fields.
    """
    measured = list(log)[warmup_epochs:]
    if not measured:
        raise ValueError(f"the training log has {len(log)} epoch(s); at least {warmup_epochs + 1} are needed "
                         f"({warmup_epochs} warm-up)")
    speed, data, network, waiting = [], [], [], []
    for entry in measured:
        try:
            iterations = int(entry["iterations"])
            data_time, compute_time = float(entry["data_time"]), float(entry["compute_time"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"training log entry {entry!r} lacks iterations/data_time/compute_time: "
                             f"{error}") from None
        total = data_time + compute_time
        if iterations < 1 or total <= 0:
            raise ValueError(f"training log entry has {iterations} iteration(s) in {total} s")
        speed.append(iterations / total)
        data.append(data_time / iterations)
        network.append(compute_time / iterations)
        waiting.append(data_time / total)
    return {
        "iterations_per_second": summarize(speed),
        "data_wait_seconds_per_iteration": summarize(data),
        "network_seconds_per_iteration": summarize(network),
        "data_wait_fraction": summarize(waiting),
        "iterations_per_run": int(measured[0]["iterations"]),
    }


# --- machine ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, RAM, versions, and the GPU when on CUDA."""
    import numpy
    import torch

    ram = _total_ram_bytes()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(ram / 1024 ** 3, 2) if ram else None,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "autoseg": _autoseg_version(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        info["gpu"] = properties.name
        info["gpu_memory_gb"] = round(properties.total_memory / 1024 ** 3, 2)
        info["cuda"] = torch.version.cuda
    return info


def _autoseg_version() -> str:
    try:
        from importlib.metadata import version

        return version("autoseg")
    except Exception:  # an uninstalled checkout still benchmarks
        return "unknown"


# --- process-tree memory ----------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:  # the process ended while we looked
            continue
        # The command name (2nd field) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now (Linux ``/proc``)."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_of(pid: int) -> int:
    """Resident set size of one process in bytes (0 once it is gone); cheap: one small read."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def pss_of(pid: int) -> int:
    """Proportional set size in bytes (shared pages divided among their users); falls back to RSS.

    The kernel walks the page tables for this, which takes milliseconds for a process of some GB,
    so samplers read it less often than RSS.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss_of(pid)


def tree_memory(pid: int, pss: bool = True) -> tuple[int, int, int]:
    """``(rss, pss, processes)`` of a process and its descendants now: bytes summed over the tree.

    With ``pss=False`` the PSS entry is 0 (and the call is much cheaper).
    """
    pids = process_tree(pid)
    return sum(rss_of(p) for p in pids), sum(pss_of(p) for p in pids) if pss else 0, len(pids)


class TreeMemorySampler:
    """Sample a process tree's summed RSS and PSS in a background thread; keep the peaks.

    Use as a context manager around the life of the process; ``peak_rss``/``peak_pss`` are bytes.
    The sampler must not steal the CPU it measures (a 2-core laptop has no core to spare), so
    RSS is read every ``interval`` seconds from the processes known, the process list is rescanned
    every ``rescan`` seconds, and PSS (expensive, see :func:`pss_of`) is read every ``pss_every``
    seconds and whenever the summed RSS reaches a new high, at most every ``interval * 5`` seconds.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL, rescan: float = 0.5,
                 pss_every: float = 2.0) -> None:
        self.pid = pid
        self.interval = interval
        self.rescan = rescan
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_process_rss = 0
        self.max_processes = 0
        self.samples = 0
        self._pids: list[int] = []
        self._last_scan = self._last_pss = -float("inf")
        self._pss_owed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self, force_pss: bool = False) -> None:
        """Take one sample now (also called by the thread)."""
        now = time.monotonic()
        if now - self._last_scan >= self.rescan:
            self._pids = process_tree(self.pid)
            self._last_scan = now
            self.max_processes = max(self.max_processes, len(self._pids))
        each = [rss_of(p) for p in self._pids]
        rss = sum(each)
        self.peak_process_rss = max([self.peak_process_rss, *each])
        # A new RSS high owes a PSS reading, taken as soon as the rate limit allows.
        self._pss_owed |= rss > self.peak_rss
        self.peak_rss = max(self.peak_rss, rss)
        since_pss = now - self._last_pss
        if force_pss or since_pss >= self.pss_every or (self._pss_owed and since_pss >= 5 * self.interval):
            self.peak_pss = max(self.peak_pss, sum(pss_of(p) for p in self._pids))
            self._last_pss = now
            self._pss_owed = False
        self.samples += 1

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measured:
    """One measured command: wall time, exit status, memory peaks (MiB), and its output's tail."""

    command: list[str]
    seconds: float
    returncode: int
    peak_tree_rss_mb: float
    peak_tree_pss_mb: float
    peak_process_rss_mb: float
    max_processes: int
    output_tail: str = ""
    cpu_seconds: float = 0.0  # user + system time of the command and the descendants it waited for

    def memory(self) -> dict[str, float]:
        """The memory figures (and the CPU time) as JSON-ready data."""
        return {"peak_tree_rss_mb": self.peak_tree_rss_mb, "peak_tree_pss_mb": self.peak_tree_pss_mb,
                "peak_process_rss_mb": self.peak_process_rss_mb, "max_processes": self.max_processes,
                "cpu_seconds": self.cpu_seconds}


def run_measured(command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 log_path: str | os.PathLike | None = None, timeout: float | None = None,
                 interval: float = SAMPLE_INTERVAL, tail_chars: int = 4000) -> Measured:
    """Run a command to completion, measuring wall time and the memory of its whole process tree.

    Output (stdout and stderr together) goes to ``log_path`` (default: a temporary file) and its
    last ``tail_chars`` characters are kept in the result. A command running past ``timeout``
    seconds is killed with its process group and reported with return code -9.
    """
    command = [str(c) for c in command]
    own_log = log_path is None
    log = Path(tempfile.mkstemp(prefix="autoseg_bench_", suffix=".log")[1]) if own_log else Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        # A new session, so that a timeout can end every process the command started.
        process = subprocess.Popen(command, env=dict(env) if env is not None else None, cwd=cwd,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        with TreeMemorySampler(process.pid, interval) as sampler:
            returncode, usage = _wait_with_rusage(process, timeout)
        seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if own_log:
        log.unlink(missing_ok=True)
    return Measured(command, seconds, returncode, round(sampler.peak_rss / MIB, 1), round(sampler.peak_pss / MIB, 1),
                    round(sampler.peak_process_rss / MIB, 1), sampler.max_processes, text[-tail_chars:],
                    round(usage.ru_utime + usage.ru_stime, 2))


def _wait_with_rusage(process: subprocess.Popen, timeout: float | None) -> tuple[int, Any]:
    """Wait for ``process``; return its exit code and resource usage (CPU times include the
    descendants it waited for). Its ``ru_maxrss`` is not used: a forked child starts with its
    parent's resident size as its high-water mark, so a large parent inflates it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage
        if deadline is not None and time.monotonic() > deadline:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = -9
            return -9, usage
        time.sleep(0.02)


# --- stages (run inside a fresh process) ------------------------------------------------------------


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
                       overwrite=True, checkpoint="latest", progress=False)
        elapsed = time.perf_counter() - started
        if measured:
            seconds.append(elapsed)
            per_case.setdefault(case_dir.name, []).append(elapsed)
    return {"seconds": seconds, "per_case": per_case, **_cuda_peak(params["device"])}


_STAGE_FUNCTIONS = {"plan": _stage_plan, "preprocess": _stage_preprocess, "train": _stage_train,
                    "predict": _stage_predict}


def _stage_main(argv: Sequence[str]) -> int:
    """``python -m autoseg.benchmark STAGE PARAMS.json RESULT.json`` (what :func:`run_stage` starts)."""
    if len(argv) != 3 or argv[0] not in _STAGE_FUNCTIONS:
        print(f"usage: python -m autoseg.benchmark {{{','.join(_STAGE_FUNCTIONS)}}} PARAMS.json RESULT.json",
              file=sys.stderr)
        return 2
    stage, params_path, result_path = argv
    params = read_json(params_path)
    assert isinstance(params, dict)
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
    tag = f"{stage}_{params.get('configuration', '')}_{'tta' if params.get('tta') else ''}".rstrip("_")
    params_path, result_path = folder / f"{tag}.params.json", folder / f"{tag}.result.json"
    atomic_write_json(params_path, dict(params))
    result_path.unlink(missing_ok=True)
    measured = run_measured([sys.executable, "-m", "autoseg.benchmark", stage, params_path, result_path],
                            log_path=folder / f"{tag}.log", timeout=timeout)
    if measured.returncode != 0 or not result_path.is_file():
        raise BenchmarkError(f"stage {stage} failed (exit code {measured.returncode}); see {folder / f'{tag}.log'}"
                             f"\n{measured.output_tail[-2000:]}")
    result = read_json(result_path)
    assert isinstance(result, dict)
    return result, measured


# --- the whole benchmark -----------------------------------------------------------------------------


@dataclass
class _Context:
    dataset: Path
    work: Path
    folder: Path
    device: str
    repeats: int
    iterations: int
    n_jobs: int | None
    inference_cases: int
    results: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    show: bool = True

    def say(self, text: str) -> None:
        if self.show:
            print(text, flush=True)


def run_benchmark(dataset: str | os.PathLike | None = None, example: str | None = None, device: str = "cpu",
                  output: str | os.PathLike | None = "bench_results.json", repeats: int = 3, *,
                  configurations: Sequence[str] | None = None, iterations: int | None = None,
                  num_cases: int | None = None, inference_cases: int | None = None,
                  n_jobs: int | None = None, work_dir: str | os.PathLike | None = None,
                  stages: Sequence[str] = STAGES, verbose: bool = True) -> dict[str, Any]:
    """Measure planning, preprocessing, training and inference on this machine; write JSON.

    Args:
        dataset: a raw dataset folder (nnU-Net v2 layout); or
        example: ``"ct"``, ``"mri"`` or ``"2d"``: generate that example dataset (``ct`` when neither
            is given) with ``num_cases`` training cases and ``inference_cases`` test cases.
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        output: JSON file to write (None: write nothing).
        repeats: measured runs per figure, after one warm-up run.
        configurations: configurations to plan and measure (default: the planner's choice).
        iterations: training iterations per measured run (default 2 on CPU, 25 on CUDA).
        num_cases: training cases of a generated example.
        inference_cases: cases predicted per run (test cases, or the first training cases of a
            dataset without ``imagesTs``; default 1 on CPU, 3 on CUDA).
        n_jobs: processes for fingerprint and preprocessing (default: every core).
        work_dir: keep every artifact here (default: a temporary folder, deleted at the end).
        stages: the stages to run, in order (later stages need the earlier ones' outputs).
        verbose: print each figure as it is measured, and the summary table.

    Returns:
        The results (also written to ``output``): ``schema``, ``machine``, ``settings``, one entry
        per stage, and ``errors`` (stage -> message) for stages that failed; a failed stage does
        not stop the others.

    Raises:
        ValueError: both or bad sources, ``repeats`` < 1, or an unknown stage.
        BenchmarkError: CUDA asked for but not available.
    """
    if dataset is not None and example is not None:
        raise ValueError("give either a dataset folder or an example kind, not both")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    device = str(device)
    _check_device(device)
    if dataset is None:
        example = example or "ct"
        if example not in DEFAULT_EXAMPLE_CASES:
            raise ValueError(f"unknown example kind {example!r}; choose ct, mri or 2d")
    elif not (Path(dataset) / "dataset.json").is_file():
        raise ValueError(f"{dataset}: not a dataset folder (no dataset.json)")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    iterations = iterations or DEFAULT_ITERATIONS[kind]
    inference_cases = inference_cases or DEFAULT_INFERENCE_CASES[kind]

    root = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="autoseg_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if dataset is None:
            from autoseg.examples import make_example

            dataset_dir = root / f"example_{example}"
            if not (dataset_dir / "dataset.json").is_file():
                shutil.rmtree(dataset_dir, ignore_errors=True)
                make_example(dataset_dir, kind=example, num_cases=num_cases or DEFAULT_EXAMPLE_CASES[example],
                             seed=0, num_test_cases=inference_cases, progress=verbose)
        else:
            dataset_dir = Path(dataset)
        results: dict[str, Any] = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(device),
            "settings": {"dataset": str(dataset_dir), "example": example, "device": device, "repeats": repeats,
                         "warmup_runs": WARMUP_RUNS, "training_iterations_per_run": iterations,
                         "inference_cases": inference_cases, "n_jobs": n_jobs,
                         "configurations": list(configurations) if configurations else None},
        }
        ctx = _Context(dataset_dir, root / "work", root / "stages", device, repeats, iterations, n_jobs,
                       inference_cases, results, show=verbose)
        ctx.folder.mkdir(parents=True, exist_ok=True)
        steps = {"plan": lambda: _bench_plan(ctx, configurations), "preprocess": lambda: _bench_preprocess(ctx),
                 "train": lambda: _bench_train(ctx), "predict": lambda: _bench_predict(ctx)}
        for stage in stages:
            try:
                steps[stage]()
            except Exception as error:  # one failed stage still leaves the others' figures
                ctx.errors[stage] = f"{type(error).__name__}: {error}"
                ctx.say(f"[{stage}] failed: {ctx.errors[stage]}")
        results["errors"] = ctx.errors
        if output is not None:
            atomic_write_json(output, results)
        if verbose:
            print(format_report(results))
            if output is not None:
                print(f"wrote {output}")
        return results
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise BenchmarkError("device cuda was asked for but torch sees no CUDA device; use --device cpu")


def _bench_plan(ctx: _Context, configurations: Sequence[str] | None) -> None:
    options: dict[str, Any] = {"configurations": list(configurations)} if configurations else {}
    params = {"dataset": str(ctx.dataset), "work": str(ctx.work), "repeats": ctx.repeats, "n_jobs": ctx.n_jobs,
              "plan_options": options}
    result, measured = run_stage("plan", params, ctx.folder)
    from autoseg.plan import load_plan

    plan = load_plan(ctx.work)
    ctx.results["plan"] = {"seconds": summarize(result["seconds"]), **measured.memory(),
                           "configurations": {name: _configuration_summary(c) for name, c in
                                              plan.configurations.items()}}
    ctx.say(f"[plan] fingerprint+plan {_fmt_stat(ctx.results['plan']['seconds'], 's')}, "
            f"peak {measured.peak_tree_rss_mb:.0f} MiB")


def _configuration_summary(configuration: Any) -> dict[str, Any]:
    return {"patch_size": list(configuration.patch_size), "batch_size": configuration.batch_size,
            "spacing": [round(s, 4) for s in configuration.spacing],
            "features_per_stage": list(configuration.topology.features_per_stage),
            "estimated_memory_gb": configuration.estimated_memory_gb}


def _planned(ctx: _Context) -> list[str]:
    """The configurations with data of their own (the cascade shares 3d_fullres's)."""
    from autoseg.plan import load_plan

    return [n for n, c in load_plan(ctx.work).configurations.items() if c.preprocessed_data is None]


def _skip_cascade(ctx: _Context, stage: str, configuration: Any) -> bool:
    """The cascade needs every fold of its previous stage: not measured (its network is 3d_fullres's
    with a few more input channels, so 3d_fullres's figures stand for it)."""
    if not configuration.previous_stage:
        return False
    ctx.say(f"[{stage}] {configuration.name}: not measured (needs every {configuration.previous_stage} fold; "
            f"its network is {configuration.preprocessed_data or 'full resolution'}'s with "
            f"{configuration.topology.in_channels - configuration.base_channels} more input channel(s))")
    return True


def _bench_preprocess(ctx: _Context) -> None:
    names = _planned(ctx)
    params = {"work": str(ctx.work), "configurations": names, "repeats": ctx.repeats, "n_jobs": ctx.n_jobs,
              "device": ctx.device}
    result, measured = run_stage("preprocess", params, ctx.folder)
    runs = result["runs"]
    cases = runs[0]["configurations"][names[0]]["cases"]
    per_configuration = {}
    for name in names:
        seconds = [r["configurations"][name]["seconds"] for r in runs]
        count = runs[0]["configurations"][name]["cases"]
        per_configuration[name] = {"cases": count, "seconds": summarize(seconds),
                                   "cases_per_second": summarize(count / s for s in seconds)}
    ctx.results["preprocess"] = {"cases": cases, "seconds": summarize(r["seconds"] for r in runs),
                                 "configurations": per_configuration, **measured.memory()}
    for name, figures in per_configuration.items():
        ctx.say(f"[preprocess] {name}: {_fmt_stat(figures['cases_per_second'], 'cases/s')}")
    ctx.say(f"[preprocess] peak {measured.peak_tree_rss_mb:.0f} MiB over {measured.max_processes} processes")


def _bench_train(ctx: _Context) -> None:
    from autoseg.plan import load_plan

    plan = load_plan(ctx.work)
    ctx.results["train"] = {}
    for name in plan.configurations:
        if _skip_cascade(ctx, "train", plan.configuration(name)):
            continue
        try:
            params = {"work": str(ctx.work), "configuration": name, "device": ctx.device, "repeats": ctx.repeats,
                      "iterations": ctx.iterations}
            result, measured = run_stage("train", params, ctx.folder)
            figures = training_figures(result["log"])
            configuration = plan.configuration(name)
            entry = {**figures, **_configuration_summary(configuration), **measured.memory(),
                     "total_seconds": round(result["total_seconds"], 3)}
            for key in ("peak_gpu_allocated_gb", "peak_gpu_reserved_gb"):
                if key in result:
                    entry[key] = result[key]
            ctx.results["train"][name] = entry
            ctx.say(f"[train] {name}: {_fmt_stat(figures['iterations_per_second'], 'it/s')}, data wait "
                    f"{figures['data_wait_fraction']['median']:.1%}, peak {measured.peak_tree_rss_mb:.0f} MiB")
        except Exception as error:
            ctx.errors[f"train/{name}"] = f"{type(error).__name__}: {error}"
            ctx.say(f"[train] {name} failed: {ctx.errors[f'train/{name}']}")


def inference_inputs(dataset_dir: str | os.PathLike, destination: str | os.PathLike,
                     count: int) -> list[tuple[Path, int]]:
    """One folder per case under ``destination`` (links to the images) for timing case by case.

    Test cases (``imagesTs``) are used when there are any, else the first training cases.
    Returns ``(folder, number of voxels)`` per case (voxels of one channel: the spatial size).
    """
    from autoseg.dataset import IMAGES_TS, index_cases, load_dataset_json, training_cases
    from autoseg.io import read_image

    dataset_dir, destination = Path(dataset_dir), Path(destination)
    dataset = load_dataset_json(dataset_dir)
    cases = index_cases(dataset_dir / IMAGES_TS, dataset.file_ending, dataset.num_channels).cases \
        if (dataset_dir / IMAGES_TS).is_dir() else []
    cases = (cases or training_cases(dataset_dir, dataset))[:count]
    inputs = []
    for case in cases:
        folder = destination / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        for image in case.images:
            link = folder / image.name
            if not link.exists():
                try:
                    link.symlink_to(image.resolve())
                except OSError:
                    shutil.copy2(image, link)
        inputs.append((folder, int(read_image(case.images[0]).array.size)))
    return inputs


def _bench_predict(ctx: _Context) -> None:
    from autoseg.plan import load_plan

    plan = load_plan(ctx.work)
    inputs = inference_inputs(ctx.dataset, ctx.folder / "inference_input", ctx.inference_cases)
    voxels = {folder.name: n for folder, n in inputs}
    ctx.results["predict"] = {"cases": len(inputs), "voxels_per_case": voxels, "configurations": {}}
    from autoseg.workdir import WorkDir

    for name in plan.configurations:
        if _skip_cascade(ctx, "predict", plan.configuration(name)):
            continue
        if not (WorkDir(ctx.work).fold(name, "all") / "checkpoint_latest.pt").is_file():
            ctx.errors[f"predict/{name}"] = "no trained model (the train stage failed or did not run)"
            continue
        entry: dict[str, Any] = {}
        for tta in (False, True):
            label = "tta" if tta else "no_tta"
            try:
                params = {"work": str(ctx.work), "configuration": name, "device": ctx.device, "repeats": ctx.repeats,
                          "tta": tta, "case_dirs": [str(f) for f, _ in inputs],
                          "output": str(ctx.folder / f"predictions_{name}_{label}")}
                result, measured = run_stage("predict", params, ctx.folder)
                speeds = [voxels[case] / s for case, runs in result["per_case"].items() for s in runs]
                entry[label] = {"seconds_per_case": summarize(result["seconds"]),
                                "voxels_per_second": summarize(speeds), **measured.memory()}
                for key in ("peak_gpu_allocated_gb", "peak_gpu_reserved_gb"):
                    if key in result:
                        entry[label][key] = result[key]
                ctx.say(f"[predict] {name} {label}: {_fmt_stat(entry[label]['seconds_per_case'], 's/case')}, "
                        f"peak {measured.peak_tree_rss_mb:.0f} MiB")
            except Exception as error:
                ctx.errors[f"predict/{name}/{label}"] = f"{type(error).__name__}: {error}"
                ctx.say(f"[predict] {name} {label} failed: {ctx.errors[f'predict/{name}/{label}']}")
        ctx.results["predict"]["configurations"][name] = entry


# --- report -------------------------------------------------------------------------------------------


def _fmt_stat(stat: Mapping[str, Any] | None, unit: str = "", digits: int = 3) -> str:
    if not stat:
        return "-"
    return (f"{stat['median']:.{digits}g} {unit} (min {stat['min']:.{digits}g}, max {stat['max']:.{digits}g}, "
            f"n={len(stat['runs'])})").replace("  ", " ")


def format_report(results: Mapping[str, Any]) -> str:
    """A plain-text table of a benchmark's results (what ``autoseg benchmark`` prints)."""
    machine = results.get("machine", {})
    lines = [f"autoseg benchmark on {machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} cores, "
             f"{machine.get('ram_gb', '?')} GB RAM), device {machine.get('device', '?')}"
             + (f" ({machine['gpu']})" if machine.get("gpu") else "") + f", torch {machine.get('torch', '?')}"]
    rows: list[tuple[str, str, str]] = []
    if "plan" in results:
        plan = results["plan"]
        rows.append(("fingerprint + plan", _fmt_stat(plan["seconds"], "s"), f"{plan['peak_tree_rss_mb']:.0f}"))
    if "preprocess" in results:
        pre = results["preprocess"]
        for name, figures in pre["configurations"].items():
            rows.append((f"preprocess {name}", _fmt_stat(figures["cases_per_second"], "cases/s"),
                         f"{pre['peak_tree_rss_mb']:.0f}"))
    for name, figures in results.get("train", {}).items():
        memory = f"{figures['peak_tree_rss_mb']:.0f}"
        if "peak_gpu_allocated_gb" in figures:
            memory += f" (GPU {figures['peak_gpu_allocated_gb']:.2f} GB, planned {figures['estimated_memory_gb']:.2f})"
        rows.append((f"train {name}", _fmt_stat(figures["iterations_per_second"], "it/s")
                     + f", data wait {figures['data_wait_fraction']['median']:.1%}", memory))
    for name, entry in results.get("predict", {}).get("configurations", {}).items():
        for label, figures in entry.items():
            rows.append((f"predict {name} {label.replace('_', '-')}",
                         _fmt_stat(figures["seconds_per_case"], "s/case")
                         + f", {figures['voxels_per_second']['median'] / 1e6:.3g} Mvox/s",
                         f"{figures['peak_tree_rss_mb']:.0f}"))
    if rows:
        widths = [max(len(r[i]) for r in rows + [("stage", "median (min, max, runs)", "peak MiB")]) for i in range(3)]
        header = ("stage", "median (min, max, runs)", "peak MiB")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for stage, message in results.get("errors", {}).items():
        lines.append(f"FAILED {stage}: {message.splitlines()[0] if message else ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))
