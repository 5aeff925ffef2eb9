"""Benchmark: resampling a large CT, and preprocessing the example CT dataset (not a test).

Usage::

    python benchmarks/bench_resampling.py                 # volume benchmark, torch only
    python benchmarks/bench_resampling.py --skimage       # ... plus nnU-Net's scikit-image path
    python benchmarks/bench_resampling.py --dataset       # example CT dataset with 1 and 2 workers
    python benchmarks/bench_resampling.py --shape 150 256 256   # a smaller volume

Volume benchmark: a synthetic CT-like volume of 300 x 512 x 512 (z, y, x) voxels, stored as int16
and converted to float32, at (2.5, 0.7, 0.7) mm is resampled to (1.5, 0.8, 0.8) mm: the image with
order 3 (the slow axis apart, nearest, since 2.5 / 0.7 > 3), and a 4-class label with per-class
linear interpolation. Every measurement runs in its own subprocess, so the peak resident memory
(``ru_maxrss``) belongs to that step alone; the input volume's own size is printed next to it.

The scikit-image comparison re-implements nnU-Net's ``resample_data_or_seg`` for this case:
``skimage.transform.resize`` per slice (order 3 for the image; one-hot order 1 per class for the
label), then nearest-neighbour along z with ``scipy.ndimage.map_coordinates``.

Dataset benchmark: ``autoseg.examples.make_example(kind="ct")`` (10 cases), planned with
``autoseg.planning.make_plan`` when available, preprocessed with ``-j 1`` and ``-j 2``; prints cases
per second, the peak memory of the whole process tree (sampled from ``/proc``) and the on-disk size
against the raw size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SPACING = (2.5, 0.7, 0.7)
TARGET = (1.5, 0.8, 0.8)


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume (air, body, organs, spine, noise) and a 4-class label.

    Built slice by slice so that making the data does not set the peak memory being measured.
    """
    rng = np.random.default_rng(seed)
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    y, x = np.ogrid[-1:1:shape[1] * 1j, -1:1:shape[2] * 1j]
    body = (y / 0.75) ** 2 + (x / 0.9) ** 2 < 1
    spine = (y - 0.45) ** 2 + x ** 2 < 0.01
    organs = [((0.1, -0.1, 0.3), (0.5, 0.35, 0.3), 1, 60), ((-0.2, 0.2, -0.4), (0.3, 0.15, 0.1), 2, 30),
              ((0.0, 0.0, 0.3), (0.05, 0.05, 0.05), 3, 90)]
    for k, z in enumerate(np.linspace(-1, 1, shape[0])):
        plane = np.where(body, 40, -1000).astype(np.int16)
        for (cz, cy, cx), (rz, ry, rx), value, hu in organs:
            inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            label[k][inside] = value
            plane[inside] = hu
        plane[spine] = 700
        image[k] = plane + rng.normal(0, 20, plane.shape).astype(np.int16)
    return image, label


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def run_step(step: str, shape: tuple[int, int, int], threads: int | None) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from autoseg.resampling import resample_image, resample_label

    if threads:
        torch.set_num_threads(threads)
    if step.startswith("skimage"):
        import scipy.ndimage  # noqa: F401  (imports are not the step's memory)
        import skimage.transform  # noqa: F401
    # Warm up on a tiny volume, so loading torch's kernels is not counted as the step's memory.
    tiny = np.arange(6 * 10 * 10, dtype=np.uint8).reshape(6, 10, 10) % 4
    resample_image(tiny[None].astype(np.float32), SPACING, TARGET, order=3)
    resample_label(tiny, SPACING, TARGET, order=1)
    raw, label = synthetic_ct(shape)
    if step.endswith("image"):
        data = raw.astype(np.float32)[None]  # what load_case gives: float32 (C, Z, Y, X)
    elif step.endswith("label"):
        data = label
    else:
        raise ValueError(step)
    del raw, label
    run = {"torch-image": lambda: resample_image(data, SPACING, TARGET, order=3),
           "torch-label": lambda: resample_label(data, SPACING, TARGET, order=1),
           "skimage-image": lambda: _nnunet_like(data[0], is_seg=False),
           "skimage-label": lambda: _nnunet_like(data, is_seg=True)}[step]
    result: dict = {"step": step, "threads": torch.get_num_threads(), "input_mb": data.nbytes / 2**20}
    before = _rss_mb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    out = run()
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = _cpu_seconds() - cpu_before
    result["output_shape"] = list(out.shape[-3:])
    result["output_mb"] = out.nbytes / 2**20
    result["peak_rss_mb"] = _peak_mb()
    result["rss_before_mb"] = before
    return result


def _nnunet_like(volume: np.ndarray, is_seg: bool) -> np.ndarray:
    """nnU-Net's separate-z resampling with scikit-image (in-plane per slice, nearest along z)."""
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    from autoseg.resampling import compute_new_shape

    new_shape = compute_new_shape(volume.shape, SPACING, TARGET)
    plane = new_shape[1:]
    if is_seg:
        values = np.unique(volume)
        slices = np.zeros((volume.shape[0], *plane), dtype=volume.dtype)
        for k in range(volume.shape[0]):
            for value in values[1:]:  # nnU-Net's resize_segmentation: one-hot order 1, >= 0.5
                hit = resize((volume[k] == value).astype(float), plane, order=1, mode="edge",
                             clip=True, anti_aliasing=False)
                slices[k][hit >= 0.5] = value
    else:
        slices = np.stack([resize(volume[k], plane, order=3, mode="edge", anti_aliasing=False)
                           for k in range(volume.shape[0])]).astype(np.float32)
    zs = (np.arange(new_shape[0]) + 0.5) * volume.shape[0] / new_shape[0] - 0.5
    coords = np.meshgrid(zs, np.arange(plane[0]), np.arange(plane[1]), indexing="ij")
    return map_coordinates(slices, coords, order=0, mode="nearest")


def _tree_usage(root: int, cpu: dict[int, float]) -> float:
    """Resident MB of a process and all its descendants, from /proc; records each one's CPU seconds."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            pid = int(entry)
            parents[pid] = int(fields[1])
            rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            times[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    for pid in tree:
        if pid in times:
            cpu[pid] = max(cpu.get(pid, 0.0), times[pid])
    return sum(rss.get(p, 0) for p in tree) / 2**20


def _run_measured(command: list[str]) -> tuple[str, float, float, float]:
    """Run a command, sampling its process tree; (stdout, seconds, peak MB, CPU seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = [0.0]
    cpu: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_usage(process.pid, cpu))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return stdout, time.perf_counter() - started, peak[0], sum(cpu.values())


def run_dataset_step(work: str, n_jobs: int) -> dict:
    from autoseg.preprocessing import preprocess_dataset

    started = time.perf_counter()
    summaries = preprocess_dataset(work, ["3d_fullres"], n_jobs=n_jobs, force=True, progress=False, device="cpu")
    summary = summaries["3d_fullres"]
    return {"cases": len(summary.processed), "seconds": time.perf_counter() - started,
            "raw_bytes": summary.raw_bytes, "stored_bytes": summary.stored_bytes}


def prepare_dataset(root: Path) -> Path:
    from autoseg.examples import make_example
    from autoseg.fingerprint import compute_fingerprint, save_fingerprint
    from autoseg.plan import save_plan
    from autoseg.planning import make_plan

    dataset = make_example(root / "raw", kind="ct")
    work = root / "work"
    fingerprint = compute_fingerprint(dataset, 1)
    save_fingerprint(fingerprint, work / "fingerprint.json")
    save_plan(make_plan(fingerprint, dataset), work / "plan.json")
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="volume (z y x)")
    parser.add_argument("--skimage", action="store_true", help="also time nnU-Net's scikit-image path")
    parser.add_argument("--dataset", action="store_true", help="preprocess the example CT dataset instead")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the core count)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)

    if args.step == "dataset":
        print(json.dumps(run_dataset_step(args.work, args.jobs)))
        return
    if args.step:
        print(json.dumps(run_step(args.step, shape, args.threads)))
        return

    if args.dataset:
        with tempfile.TemporaryDirectory() as tmp:
            work = prepare_dataset(Path(tmp))
            print(f"example CT dataset, 3d_fullres, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            for jobs in (1, 2):
                stdout, wall, peak, cpu = _run_measured([sys.executable, __file__, "--step", "dataset",
                                                    "--work", str(work), "--jobs", str(jobs)])
                result = json.loads(stdout.strip().splitlines()[-1])
                print(f"  -j {jobs}: {result['cases']} cases in {result['seconds']:.1f} s = "
                      f"{result['cases'] / result['seconds']:.2f} cases/s; peak memory (process tree) "
                      f"{peak:.0f} MB; CPU {cpu:.1f} s (whole run, imports included); stored {result['stored_bytes'] / 2**20:.1f} MB vs raw "
                      f"{result['raw_bytes'] / 2**20:.1f} MB ({result['stored_bytes'] / result['raw_bytes']:.1f}x)")
        return

    steps = ["torch-image", "torch-label"] + (["skimage-image", "skimage-label"] if args.skimage else [])
    print(f"volume {shape} (z, y, x) at {SPACING} mm -> {TARGET} mm, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    for step in steps:
        threads = ["--threads", str(args.threads)] if args.threads else []
        stdout = subprocess.run([sys.executable, __file__, "--step", step, "--shape", *map(str, shape), *threads],
                                check=True, capture_output=True, text=True).stdout
        r = json.loads(stdout.strip().splitlines()[-1])
        print(f"  {step:14s} {r['seconds']:6.1f} s ({r['cpu_seconds']:5.1f} CPU s)  peak RSS {r['peak_rss_mb']:5.0f} MB"
              f" = before {r['rss_before_mb']:4.0f} (input {r['input_mb']:3.0f} + libraries)"
              f" + output {r['output_mb']:3.0f} + at most "
              f"{r['peak_rss_mb'] - r['rss_before_mb'] - r['output_mb']:4.0f} MB working memory; torch threads "
              f"{r['threads']}")


if __name__ == "__main__":
    main()
