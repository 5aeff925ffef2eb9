"""How a benchmark measures: statistics over runs, the machine, and a process tree's memory and time.

Nothing here imports autoseg's stages (or torch, until :func:`machine_info` is called), so the
measuring parent stays small and ``tests/benchmarks/compare_nnunet.py`` measures nnU-Net's
commands with the same code.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SAMPLE_INTERVAL = 0.1
WARMUP_RUNS = 1
MIB = 1024 * 1024


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
        try:
            with TreeMemorySampler(process.pid, interval) as sampler:
                returncode, usage = _wait_with_rusage(process, timeout)
        except BaseException:  # Ctrl-C or SIGTERM of the benchmark ends the command's whole group too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
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
