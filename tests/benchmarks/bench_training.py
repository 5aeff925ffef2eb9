"""Benchmark: training iterations per second, split into waiting for data and the network step (not a test).

Usage::

    python benchmarks/bench_training.py                                 # example CT, 3d_fullres, CPU
    python benchmarks/bench_training.py WORK -c 3d_fullres              # your own preprocessed work folder
    python benchmarks/bench_training.py --workers 0 2 --iterations 20   # in-process loading vs 2 workers
    python benchmarks/bench_training.py -o bench_training.json          # also write the figures as JSON

Without WORK the example CT dataset (``autoseg.examples.make_example``, 8 cases) is generated,
planned and preprocessed in a temporary folder first. Training runs through ``autoseg.training.train``
on fold ``all`` in a scratch work folder whose ``preprocessed/<configuration>`` links to the real
one, so the work folder's models are never touched. Every epoch has ``--iterations`` iterations
and no validation; epoch 0 is the warm-up (imports, worker start, first reads of the memory maps)
and each later epoch is one measured run. The figures come from the trainer's own log:

* ``data_time``: seconds the loop waited for a batch (``next()`` on the loader);
* ``compute_time``: forward, loss, backward, gradient clipping and optimizer step;
* iterations per second: ``iterations / (data_time + compute_time)``.

Torch uses every core (the trainer's default) unless ``--threads`` is given.

One recorded run (example CT, 4 cases, 3d_fullres planned for an 8 GB GPU: patch 40 x 160 x 160,
batch 2, 6-stage U-Net; 2 CPU cores shared with other jobs, 2 loading workers, 1 iteration per run,
2 runs): 0.0058 it/s, 173 s per iteration in the network and 0.0015 s waiting for data. One
augmented batch (drawn at 40 x 316 x 316, then cropped) takes 0.04-0.5 s on one core, so on the
CPU the network step is the whole cost and the workers hide the loading completely.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any


def prepare_example(root: Path, configuration: str, num_cases: int) -> Path:
    """Generate, plan and preprocess the example CT dataset; returns the work folder."""
    from autoseg.examples import make_example
    from autoseg.planning import plan_dataset
    from autoseg.preprocessing import preprocess_dataset

    dataset = make_example(root / "ct", kind="ct", num_cases=num_cases, seed=0)
    work = root / "work"
    plan_dataset(dataset, work, progress=False)
    preprocess_dataset(work, configurations=[configuration], progress=False)
    return work


def scratch_work(work: Path, configuration: str, scratch: Path) -> Path:
    """A work folder sharing ``work``'s plan and preprocessed data but with its own ``models/``."""
    (scratch / "preprocessed").mkdir(parents=True)
    shutil.copy2(work / "plan.json", scratch / "plan.json")
    os.symlink((work / "preprocessed" / configuration).resolve(), scratch / "preprocessed" / configuration)
    return scratch


def measure(work: Path, configuration: str, iterations: int, repeats: int, workers: int, device: str,
            threads: int | None) -> dict[str, Any]:
    """Train ``1 + repeats`` epochs of ``iterations`` iterations and summarize the measured epochs."""
    from autoseg.training import TrainOverrides, train
    from autoseg.training.monitor import read_log

    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        scratch = scratch_work(work, configuration, Path(tmp) / "work")
        overrides = TrainOverrides(epochs=1 + repeats, iterations_per_epoch=iterations, validation_iterations=0,
                                   checkpoint_every=10**6)
        fold_dir = train(scratch, configuration, "all", overrides=overrides, device=device, workers=workers,
                         progress=False, num_threads=threads)
        log = read_log(fold_dir / "training_log.jsonl")[1:]
    speed = [e["iterations"] / (e["data_time"] + e["compute_time"]) for e in log]
    data = [e["data_time"] / e["iterations"] for e in log]
    network = [e["compute_time"] / e["iterations"] for e in log]
    return {
        "workers": workers,
        "iterations_per_run": iterations,
        "iterations_per_second": {"median": statistics.median(speed), "runs": speed},
        "data_wait_seconds_per_iteration": {"median": statistics.median(data), "runs": data},
        "network_seconds_per_iteration": {"median": statistics.median(network), "runs": network},
        "data_wait_fraction": statistics.median(d / (d + n) for d, n in zip(data, network)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", nargs="?", type=Path, default=None, help="preprocessed work folder "
                        "(default: generate the example CT dataset)")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--iterations", type=int, default=10, help="iterations per measured run")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="data loading processes to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: every core)")
    parser.add_argument("--num-cases", type=int, default=8, help="cases of the generated example")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)

    from autoseg.plan import load_plan

    with tempfile.TemporaryDirectory(prefix="bench_training_example_") as tmp:
        work = args.work or prepare_example(Path(tmp), args.configuration, args.num_cases)
        configuration = load_plan(work).configuration(args.configuration)
        header = (f"{args.configuration}: patch {list(configuration.patch_size)}, batch {configuration.batch_size}, "
                  f"{configuration.topology.arch} with {len(configuration.topology.features_per_stage)} stages, "
                  f"device {args.device}, {os.cpu_count()} cores")
        print(header)
        results = []
        for workers in args.workers:
            figures = measure(work, args.configuration, args.iterations, args.repeats, workers, args.device,
                              args.threads)
            results.append(figures)
            print(f"  workers {workers}: {figures['iterations_per_second']['median']:.3f} it/s; per iteration "
                  f"{figures['data_wait_seconds_per_iteration']['median']:.3f} s waiting for data, "
                  f"{figures['network_seconds_per_iteration']['median']:.3f} s in the network "
                  f"({100 * figures['data_wait_fraction']:.0f}% waiting)")
    if args.output:
        from autoseg.utils import atomic_write_json

        atomic_write_json(args.output, {"configuration": args.configuration, "device": args.device,
                                        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                                    "python": sys.version.split()[0]},
                                        "patch_size": list(configuration.patch_size),
                                        "batch_size": configuration.batch_size, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
